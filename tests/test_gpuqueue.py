"""The GPU queue: the pure `serve` (order, fairness, kinds) and the hub's live `GpuQueue`."""

from __future__ import annotations

import asyncio
import calendar
import json
import time

import pytest

from ds01_spawner import labels
from ds01_spawner.gpuqueue import (
    INTERRUPTED,
    REJOIN_SECONDS,
    STALE_SECONDS,
    WAITING,
    GpuQueue,
    QueueFile,
    QueueTimeout,
    Waiter,
    describe_wait,
    next_max_runtime,
    ordinal,
    serve,
    with_positions,
)
from ds01_spawner.gpus import GpuAllocator, GpuPolicy, GpuRefusal, GpuRequest, GpuShortage
from ds01_spawner.ledger import Holder
from ds01_spawner.nvml import GpuSlot

GIB = 1024**3


def gpu(i: int) -> GpuSlot:
    return GpuSlot(f"GPU-{i}", str(i), "A100", 80 * GIB, 0, 0)


def mig(i: int) -> GpuSlot:
    return GpuSlot(f"MIG-{i}", f"9:{i}", "A100 MIG 1g", 10 * GIB, 0, None, 0.1429, "GPU-9")


def held(uuid: str, user: str = "zed", since: str = "2026-01-01T00:00:00Z") -> Holder:
    return Holder(uuid, user, f"{user}p", f"{user}p", since, 1.0, f"ds01-{user}")


def waiter(user: str, at: float, *, gpus: int = 1, mig: bool = False, priority: int = 0) -> Waiter:
    return Waiter(user, f"{user}p", f"{user}p", gpus, mig, priority, at, at + 3600, int(at))


POLICY = GpuPolicy(max_per_user=8)


def policies(*waiters: Waiter) -> dict:
    return {w.key: POLICY for w in waiters}


# ------------------------------------------------------------ serve: the pure decision


def test_two_gpus_that_free_at_once_go_to_the_first_two_in_line():
    a, b, c = waiter("a", 1), waiter("b", 2), waiter("c", 3)
    decision = serve([c, a, b], [gpu(0), gpu(1)], [], policies(a, b, c))
    assert [w.user for w, _ in decision.granted] == ["a", "b"]
    assert {s.uuid for _, chosen in decision.granted for s in chosen} == {"GPU-0", "GPU-1"}
    assert [w.user for w in decision.waiting] == ["c"]


def test_a_head_short_of_gpus_blocks_later_waiters_of_its_kind():
    """One GPU free; the first in line wants two: the second (wanting one) does not jump it."""
    head, later = waiter("a", 1, gpus=2), waiter("b", 2)
    decision = serve([later, head], [gpu(0), gpu(1)], [held("GPU-1")], policies(head, later))
    assert decision.granted == []
    assert [w.user for w in decision.waiting] == ["a", "b"]


def test_mig_waiters_are_not_blocked_by_a_whole_gpu_shortage():
    whole, slice_ = waiter("a", 1), waiter("b", 2, mig=True)
    slots = [gpu(0), mig(0)]
    policy = GpuPolicy(max_per_user=8, offer_mig=True)
    decision = serve(
        [whole, slice_], slots, [held("GPU-0")], {whole.key: policy, slice_.key: policy}
    )
    assert [w.user for w, _ in decision.granted] == ["b"]
    assert [w.user for w in decision.waiting] == ["a"]


def test_higher_priority_is_served_first_then_arrival():
    early, urgent = waiter("a", 1), waiter("b", 5, priority=10)
    decision = serve([early, urgent], [gpu(0)], [], policies(early, urgent))
    assert [w.user for w, _ in decision.granted] == ["b"]
    assert [w.user for w in decision.waiting] == ["a"]


def test_a_waiter_over_its_own_limit_is_refused_not_kept_waiting():
    """Waiting cannot help a user whose other project holds their whole GPU allowance."""
    over, next_one = waiter("a", 1), waiter("b", 2)
    decision = serve(
        [over, next_one],
        [gpu(0), gpu(1)],
        [Holder("GPU-0", "a", "other", "other", "", 1.0, "ds01-a--other")],
        {over.key: GpuPolicy(max_per_user=1), next_one.key: POLICY},
    )
    assert [w.user for w, _ in decision.refused] == ["a"]
    assert "your limit is 1 GPU" in decision.refused[0][1]
    assert [w.user for w, _ in decision.granted] == ["b"]


def test_asking_for_more_gpus_than_the_server_has_is_refused():
    greedy = waiter("a", 1, gpus=3)
    decision = serve([greedy], [gpu(0), gpu(1)], [], policies(greedy))
    assert decision.refused and "has 2 GPUs to hand out" in decision.refused[0][1]


def test_gpus_given_to_earlier_waiters_count_as_held_for_later_ones():
    """Three waiters, two GPUs, nobody holds anything yet: the third still waits."""
    ws = [waiter(u, i) for i, u in enumerate("abc")]
    decision = serve(ws, [gpu(0), gpu(1)], [], policies(*ws))
    given = [s.uuid for _, chosen in decision.granted for s in chosen]
    assert len(given) == len(set(given)) == 2
    assert [w.user for w in decision.waiting] == ["c"]


def test_positions_count_per_kind_in_serving_order():
    ws = [waiter("a", 3), waiter("b", 1), waiter("c", 2, mig=True), waiter("d", 4)]
    placed = {w.user: w.position for w in with_positions(ws)}
    assert placed == {"b": 1, "a": 2, "d": 3, "c": 1}


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
    ]  # fmt: skip


def test_a_waiter_is_told_its_place_what_is_held_and_the_next_retirement():
    w = with_positions([waiter("x", 1), waiter("y", 2)])[1]
    text = describe_wait(w, held=4, next_retirement=1000 + 14 * 60, now=1000)
    assert text.startswith("Waiting for a GPU, 2nd in line: 1 ahead of you; 4 GPUs held")
    assert "the next max-runtime retirement is in 14m" in text
    first = with_positions([waiter("x", 1)])[0]
    assert "you are next" in describe_wait(first, held=1, next_retirement=None, now=0)


def test_next_max_runtime_is_the_earliest_end_among_gpu_holders():
    def container(started: str, runtime: str, gpus: str = "GPU-0") -> dict:
        return {
            "Labels": {
                labels.STARTED_AT: started,
                labels.MAX_RUNTIME: runtime,
                labels.GPU_UUIDS: gpus,
            }
        }

    containers = [
        container("2026-01-01T00:00:00Z", "7200"),
        container("2026-01-01T01:00:00Z", "600"),  # ends first: 01:10
        container("2026-01-01T00:00:00Z", ""),  # no max_runtime
        container("2026-01-01T00:00:00Z", "60", gpus=""),  # holds no GPU
        container("garbage", "60"),
        {"Labels": None},
    ]
    assert next_max_runtime(containers) == calendar.timegm((2026, 1, 1, 1, 10, 0))
    assert next_max_runtime([]) is None


# ------------------------------------------------------------ the file


def test_a_file_its_hub_stopped_rewriting_reads_as_interrupted(tmp_path):
    f = QueueFile(str(tmp_path))
    f.write("hub1", with_positions([waiter("a", 1)]), now=1000.0)
    assert f.read(now=1000.0 + 1).waiting()[0].position == 1
    old = f.read(now=1000.0 + STALE_SECONDS + 1)
    assert old.waiting() == [] and old.entries[0].state == INTERRUPTED
    assert "Start again" in old.entries[0].message


def test_a_broken_file_reads_as_an_empty_queue(tmp_path):
    (tmp_path / "gpu-queue.json").write_text("{not json")
    assert QueueFile(str(tmp_path)).read().entries == []
    (tmp_path / "gpu-queue.json").write_text(json.dumps({"entries": [{"bogus": 1}]}))
    assert QueueFile(str(tmp_path)).read().entries == []


# ------------------------------------------------------------ the live queue


class Engine:
    """The allocator's view of containers: a list a test edits (a stop removes one)."""

    def __init__(self) -> None:
        self.holders: list[Holder] = []

    async def list_containers(self) -> list[dict]:
        return []


class Inventory:
    def __init__(self, n: int) -> None:
        self.slots = [gpu(i) for i in range(n)]

    def read(self) -> list[GpuSlot]:
        return list(self.slots)


def allocator(n: int, engine: Engine) -> GpuAllocator:
    alloc = GpuAllocator(Inventory(n), engine.list_containers)

    async def ledger(containers=None) -> list[Holder]:  # the engine's holders, plus claims
        pending = [h for hs in alloc._pending.values() for h in hs]
        return engine.holders + pending

    alloc.ledger = ledger  # type: ignore[method-assign]
    return alloc


def request(user: str, count: int = 1) -> GpuRequest:
    return GpuRequest(user, f"{user}p", f"{user}p", count)


def start(alloc: GpuAllocator, engine: Engine, user: str) -> None:
    """The spawn's container now exists: its claim becomes a ledger entry."""
    claimed = alloc._pending.pop((user, f"{user}p"))
    engine.holders.extend(claimed)


def stop(engine: Engine, user: str) -> None:
    engine.holders = [h for h in engine.holders if h.user != user]


@pytest.fixture
def queue(tmp_path):
    engine = Engine()
    alloc = allocator(2, engine)
    q = GpuQueue(alloc, str(tmp_path), poll=0.05)
    q.engine = engine  # type: ignore[attr-defined]
    return q


async def eventually(condition, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def ask_for(q: GpuQueue, user: str, *, wait: bool = True, timeout: float = 60, said=None):
    return await q.allocate(
        request(user),
        POLICY,
        "2026-01-01T00:00:00Z",
        list,
        wait=wait,
        timeout=timeout,
        on_update=(lambda w, m: said.append(m)) if said is not None else (lambda w, m: None),
    )


async def both_gpus_taken(queue: GpuQueue) -> None:
    """Users a and b start, one GPU each: both GPUs are held."""
    for user in ("a", "b"):
        assert len(await ask_for(queue, user)) == 1
        start(queue.allocator, queue.engine, user)


async def test_two_gpus_four_users_two_run_two_wait_then_the_first_waiter_moves_up(queue):
    engine = queue.engine
    await both_gpus_taken(queue)
    said_c, said_d = [], []
    c = asyncio.ensure_future(ask_for(queue, "c", said=said_c))
    await eventually(lambda: len(queue.waiting()) == 1)
    d = asyncio.ensure_future(ask_for(queue, "d", said=said_d))
    await eventually(lambda: len(queue.waiting()) == 2)
    assert [(w.user, w.position) for w in queue.waiting()] == [("c", 1), ("d", 2)]
    assert said_c[-1].startswith("Waiting for a GPU, 1st in line")
    assert said_d[-1].startswith("Waiting for a GPU, 2nd in line: 1 ahead of you; 2 GPUs held")
    on_file = {w.user: w for w in QueueFile(str(queue.file.path.parent)).read().waiting()}
    assert {u: w.position for u, w in on_file.items()} == {"c": 1, "d": 2}
    assert on_file["d"].message == said_d[-1], "the file says what the spawn page says"

    stop(engine, "a")
    queue.wake()
    got = await asyncio.wait_for(c, 2)
    assert [s.uuid for s in got] == ["GPU-0"] or [s.uuid for s in got] == ["GPU-1"]
    await eventually(lambda: said_d[-1].startswith("Waiting for a GPU, 1st in line"))
    assert not d.done()
    d.cancel()
    with pytest.raises(asyncio.CancelledError):
        await d
    assert queue.waiting() == []
    assert QueueFile(str(queue.file.path.parent)).read().entries == []


async def test_a_poll_serves_waiters_when_a_container_vanished_without_a_stop(queue):
    engine = queue.engine
    await both_gpus_taken(queue)
    c = asyncio.ensure_future(ask_for(queue, "c"))
    await eventually(lambda: queue.waiting())
    stop(engine, "b")  # no wake(): the queue's own poll notices
    assert len(await asyncio.wait_for(c, 2)) == 1


async def test_a_spawn_that_does_not_wait_cannot_jump_the_queue(queue):
    """Not past a head that waits for two GPUs, nor to a GPU that freed before the queue's
    next pass (the queue is served first, under the same lock)."""
    engine = queue.engine
    queue.poll = 60  # nothing serves the queue by itself in this test
    await ask_for(queue, "a", wait=False)
    start(queue.allocator, engine, "a")
    two = asyncio.ensure_future(
        queue.allocate(request("big", 2), POLICY, "", list, wait=True, timeout=60)
    )
    await eventually(lambda: queue.waiting())
    with pytest.raises(GpuShortage, match="1 request waits for a GPU before yours"):
        await ask_for(queue, "late", wait=False)  # one GPU is free, but "big" came first
    stop(engine, "a")
    queue.wake()
    assert len(await asyncio.wait_for(two, 2)) == 2
    start(queue.allocator, engine, "big")
    with pytest.raises(GpuShortage, match=r"all 2 GPUs are in use.*wait for one"):
        await ask_for(queue, "x", wait=False)
    c = asyncio.ensure_future(ask_for(queue, "c"))
    await eventually(lambda: queue.waiting())
    stop(engine, "big")  # two free: c, in line, gets one under the lock; "later" the other
    later = await ask_for(queue, "later", wait=False)
    served = await asyncio.wait_for(c, 2)
    assert {s.uuid for s in later + served} == {"GPU-0", "GPU-1"}


async def test_a_wait_gives_up_at_its_timeout_and_leaves_the_queue(queue):
    engine = queue.engine
    await both_gpus_taken(queue)
    with pytest.raises(QueueTimeout, match="queue_timeout"):
        await ask_for(queue, "c", timeout=0.2)
    assert queue.waiting() == []
    stop(engine, "a")
    queue.wake()
    await asyncio.sleep(0.2)
    assert queue.allocator._pending == {}, "no GPU was claimed for the waiter who left"


async def test_a_user_waits_once_per_server(queue):
    await both_gpus_taken(queue)
    first = asyncio.ensure_future(ask_for(queue, "c"))
    await eventually(lambda: queue.waiting())
    with pytest.raises(GpuRefusal, match="already waiting"):
        await ask_for(queue, "c")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_restarted_hub_ends_old_waits_and_keeps_their_places(tmp_path):
    engine = Engine()
    old = GpuQueue(allocator(1, engine), str(tmp_path), poll=0.05)
    await ask_for(old, "a")
    start(old.allocator, engine, "a")
    waits = [asyncio.ensure_future(ask_for(old, u)) for u in ("b", "c")]
    await eventually(lambda: len(old.waiting()) == 2)
    # the hub dies: its tasks vanish with it, its file stays
    old._task.cancel()
    for w in waits:
        w.cancel()
    saved = (tmp_path / "gpu-queue.json").read_text()
    await asyncio.gather(*waits, return_exceptions=True)
    (tmp_path / "gpu-queue.json").write_text(saved)

    new = GpuQueue(allocator(1, engine), str(tmp_path), poll=0.05)
    kept = new.interrupted_for("c", "cp")
    assert kept is not None and kept.state == INTERRUPTED
    assert "hub restarted" in kept.message
    assert kept.deadline == pytest.approx(time.time() + REJOIN_SECONDS, abs=5)
    snapshot = QueueFile(str(tmp_path)).read()
    assert {w.user: w.state for w in snapshot.entries} == {"b": INTERRUPTED, "c": INTERRUPTED}
    assert new.allocator._pending == {}, "an interrupted wait holds no GPU"

    # c comes back first, then a newcomer, then b: b keeps its place ahead of c
    new.engine = engine
    c = asyncio.ensure_future(ask_for(new, "c"))
    await eventually(lambda: len(new.waiting()) == 1)
    n = asyncio.ensure_future(ask_for(new, "n"))
    await eventually(lambda: len(new.waiting()) == 2)
    b = asyncio.ensure_future(ask_for(new, "b"))
    await eventually(lambda: len(new.waiting()) == 3)
    assert [w.user for w in new.waiting()] == ["b", "c", "n"]
    assert all(w.state == WAITING for w in new.waiting())
    for t in (b, c, n):
        t.cancel()
    await asyncio.gather(b, c, n, return_exceptions=True)
