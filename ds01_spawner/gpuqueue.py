"""The fair GPU queue: spawns that wait for a GPU instead of failing.

A spawn asked with ``user_options.wait`` that finds no free GPU it may have
joins the queue. `serve` is the pure decision: walking the queue in order
(higher `queue_priority` first, then first come, first served), it gives each
waiter the GPUs `gpus.choose` would give, counting what it gave those ahead;
a waiter short of GPUs blocks every later waiter of the same kind (whole GPUs
or MIG slices), so a GPU never goes to a request that arrived later. A new
spawn that does not wait is judged as if it stood at the end of the queue.

`GpuQueue` is the hub's live queue around the allocator's lock: it serves
waiters whenever GPUs may have freed (a stop in this hub, or its poll of the
engine every few seconds), tells each waiter its position, and writes the
queue to `{state_dir}/gpu-queue.json` for the service's pages and metrics
(`QueueFile`). The file is not a claim on a GPU, the engine's ledger is: a
hub that restarts marks the old waits interrupted, and a waiter who starts
again within `REJOIN_SECONDS` keeps their place.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from . import labels
from .gpus import GpuAllocator, GpuPolicy, GpuRefusal, GpuRequest, GpuShortage, choose
from .ledger import Hold, Holder
from .nvml import GpuSlot
from .statefiles import write_json
from .units import format_duration

log = logging.getLogger("ds01.gpuqueue")

POLL_SECONDS = 2.0  # how often waiters are served when nothing in this hub freed a GPU
REJOIN_SECONDS = 900.0  # a wait the hub's restart interrupted keeps its place this long
STALE_SECONDS = 30.0  # a file with waiters not rewritten for this long: its hub is gone

WAITING, INTERRUPTED = "waiting", "interrupted"


@dataclass(frozen=True)
class Waiter:
    """One spawn waiting for GPUs: what it asks, and its place in the queue."""

    user: str
    server: str
    project: str
    gpus: int
    mig: bool = False
    priority: int = 0
    enqueued_at: float = 0.0  # epoch seconds
    deadline: float = 0.0  # epoch seconds: it gives up then
    seq: int = 0  # ties on enqueued_at
    state: str = WAITING
    position: int = 0  # 1-based among waiters of the same kind; 0 when not waiting
    message: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.server)

    @property
    def request(self) -> GpuRequest:
        return GpuRequest(self.user, self.project, self.server, self.gpus, self.mig)


def order(waiters: Iterable[Waiter]) -> list[Waiter]:
    """Serving order: higher priority first, then who came first."""
    return sorted(waiters, key=lambda w: (-w.priority, w.enqueued_at, w.seq))


def with_positions(waiters: Iterable[Waiter]) -> list[Waiter]:
    """The waiting ones in serving order, each with its position among its kind."""
    counters: dict[bool, int] = {}
    out = []
    for w in order(w for w in waiters if w.state == WAITING):
        counters[w.mig] = counters.get(w.mig, 0) + 1
        out.append(replace(w, position=counters[w.mig]))
    return out


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class Decision:
    """What `serve` decided for each waiter."""

    granted: list[tuple[Waiter, list[GpuSlot]]] = field(default_factory=list)
    refused: list[tuple[Waiter, str]] = field(default_factory=list)  # can never be served now
    waiting: list[Waiter] = field(default_factory=list)  # in order, still short of GPUs


def serve(
    waiters: Iterable[Waiter],
    slots: list[GpuSlot],
    ledger: list[Holder],
    policies: Mapping[tuple[str, str], GpuPolicy],
    holds: Iterable[Hold] = (),
    since: str = "",
) -> Decision:
    """Who gets GPUs now, strictly in queue order (see the module's docstring).

    `policies` gives each waiter's rules (by (user, server)). A waiter that
    `choose` refuses for a reason other than a shortage (its limit, MIG only,
    more GPUs than the server has) is refused: waiting would not help it.
    """
    holds = list(holds)
    given: list[Holder] = []
    blocked: set[bool] = set()  # kinds (mig or not) whose head is short of GPUs
    decision = Decision()
    for w in order(waiters):
        if w.mig in blocked:
            decision.waiting.append(w)
            continue
        policy = policies.get(w.key, GpuPolicy())
        try:
            chosen = choose(slots, ledger + given, w.request, policy, holds)
        except GpuShortage:
            blocked.add(w.mig)
            decision.waiting.append(w)
            continue
        except GpuRefusal as e:
            decision.refused.append((w, str(e)))
            continue
        decision.granted.append((w, chosen))
        given.extend(
            Holder(s.uuid, w.user, w.project, w.server, since, s.fraction, "(starting)")
            for s in chosen
        )
    return decision


def describe_wait(waiter: Waiter, held: int, next_retirement: float | None, now: float) -> str:
    """'2nd in line: 1 ahead of you; 4 GPUs held; the next max-runtime retirement is in 14 min'."""
    ahead = waiter.position - 1
    noun = "MIG slice" if waiter.mig else "GPU"
    parts = [
        "you are next" if ahead == 0 else f"{ahead} ahead of you",
        f"{held} {noun}{'' if held == 1 else 's'} held",
    ]
    if next_retirement is not None:
        left = format_duration(max(0.0, next_retirement - now))
        parts.append(f"the next max-runtime retirement is in {left}")
    return f"Waiting for a {noun}, {ordinal(waiter.position)} in line: {'; '.join(parts)}"


def next_max_runtime(containers: Iterable[Mapping[str, Any]]) -> float | None:
    """When the first GPU-holding container reaches its `max_runtime` (epoch seconds), if
    any has one: from the labels the spawner wrote (`ds01.started_at`, `ds01.max_runtime`)."""
    ends = []
    for c in containers:
        lab = c.get("Labels") or {}
        if not lab.get(labels.GPU_UUIDS) or not lab.get(labels.MAX_RUNTIME):
            continue
        with contextlib.suppress(ValueError):
            started = lab.get(labels.STARTED_AT, "").replace("Z", "+00:00")
            ends.append(
                datetime.fromisoformat(started).timestamp() + float(lab[labels.MAX_RUNTIME])
            )
    return min(ends, default=None)


# ---------------------------------------------------------------- the file


@dataclass(frozen=True)
class QueueSnapshot:
    """The queue as its file says: for the service's pages, metrics and the hub's picker."""

    written: float = 0.0
    hub: str = ""  # the hub process that wrote it
    entries: list[Waiter] = field(default_factory=list)

    def waiting(self) -> list[Waiter]:
        return [w for w in self.entries if w.state == WAITING]

    def for_user(self, user: str) -> dict[str, Waiter]:
        """project -> its entry (waiting or interrupted), for one user."""
        return {w.project: w for w in self.entries if w.user == user}


class QueueFile:
    """`{state_dir}/gpu-queue.json`: written by the hub's queue, read by anyone."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "gpu-queue.json"

    def read(self, now: float | None = None) -> QueueSnapshot:
        """The queue; waits of a hub that stopped rewriting the file read as interrupted."""
        now = time.time() if now is None else now
        try:
            data = json.loads(self.path.read_text())
            entries = [Waiter(**e) for e in data.get("entries", [])]
            written, hub = float(data.get("written", 0)), str(data.get("hub", ""))
        except (OSError, ValueError, TypeError, AttributeError):
            return QueueSnapshot()
        if now - written > STALE_SECONDS:
            entries = [
                replace(w, state=INTERRUPTED, position=0, message=w.message or _stale(written))
                if w.state == WAITING
                else w
                for w in entries
            ]
        entries = [w for w in entries if w.state == WAITING or now - w.enqueued_at < 86400]
        return QueueSnapshot(written, hub, entries)

    def write(self, hub: str, entries: Iterable[Waiter], now: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "written": time.time() if now is None else now,
            "hub": hub,
            "entries": [asdict(w) for w in entries],
        }
        write_json(self.path, data, indent=1)


def _stale(written: float) -> str:
    when = time.strftime("%H:%M", time.localtime(written)) if written else "?"
    return (
        f"Your wait for a GPU ended: the hub stopped serving the queue at {when}. "
        "Start again to rejoin the queue."
    )


def interrupted(waiter: Waiter, now: float) -> Waiter:
    """A wait the hub's restart ended: kept, with its place, for `REJOIN_SECONDS`."""
    until = time.strftime("%H:%M", time.localtime(now + REJOIN_SECONDS))
    return replace(
        waiter,
        state=INTERRUPTED,
        position=0,
        deadline=now + REJOIN_SECONDS,
        message=(
            "Your wait for a GPU ended when the hub restarted; start the project again "
            f"before {until} to keep your place in the queue."
        ),
    )


# ---------------------------------------------------------------- the live queue


def _given(future: asyncio.Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


class QueueTimeout(GpuRefusal):
    """A waiter's `queue_timeout` passed with no GPU for it."""


@dataclass
class _Entry:
    waiter: Waiter
    policy: GpuPolicy
    future: asyncio.Future
    on_update: Callable[[Waiter, str], None]
    said: str = ""


class GpuQueue:
    """The hub's queue in front of `GpuAllocator` (one per hub process: `DS01Settings`).

    `allocate` is what a spawn calls instead of the allocator's: it gets GPUs
    now, joins the queue (when it may wait) until they are given or its
    deadline passes, or is refused. Every decision is taken under the
    allocator's lock, so a GPU given to a waiter is in the allocator's pending
    list before anyone else looks.
    """

    def __init__(
        self,
        allocator: GpuAllocator,
        state_dir: str,
        *,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.allocator = allocator
        self.file = QueueFile(state_dir)
        self.hub = secrets.token_hex(8)
        self._next_retirement: float | None = None
        self.poll = poll
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._interrupted: dict[tuple[str, str], Waiter] = {}
        self._seq = itertools.count(1)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._holds: Callable[[], list[Hold]] = list
        self._recovered = False

    # ------------------------------------------------------------ reading

    def waiting(self) -> list[Waiter]:
        """This hub's waiters, in serving order, with their positions."""
        return with_positions(e.waiter for e in self._entries.values())

    def interrupted_for(self, user: str, server: str) -> Waiter | None:
        """The wait of (user, server) that a restart of the hub ended, while its place is kept."""
        self.recover()
        w = self._interrupted.get((user, server))
        return w if w is not None and w.deadline > time.time() else None

    def recover(self) -> None:
        """Once per hub: the file's waits are a previous hub's. They end; places are kept."""
        if self._recovered:
            return
        self._recovered = True
        now = time.time()
        for w in self.file.read(now).entries:
            if w.state == WAITING:
                self._interrupted[w.key] = interrupted(w, now)
            elif w.deadline > now:
                self._interrupted[w.key] = w
        if self._interrupted:
            log.warning(
                "GPU queue: %d wait(s) ended by the hub's restart; places kept for %s",
                len(self._interrupted),
                format_duration(REJOIN_SECONDS),
            )
        self._save(now)

    def _save(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._interrupted = {k: w for k, w in self._interrupted.items() if w.deadline > now}
        try:
            self.file.write(self.hub, [*self.waiting(), *self._interrupted.values()], now)
        except OSError as e:
            log.warning("GPU queue: cannot write %s: %s", self.file.path, e)

    # ------------------------------------------------------------ a spawn's GPUs

    async def allocate(
        self,
        request: GpuRequest,
        policy: GpuPolicy,
        since: str,
        holds: Callable[[], list[Hold]],
        *,
        wait: bool = False,
        priority: int = 0,
        timeout: float = 3600.0,
        on_update: Callable[[Waiter, str], None] = lambda waiter, message: None,
    ) -> list[GpuSlot]:
        """The GPUs for `request` now, or once the queue serves it (`wait`).

        GpuShortage when none is free and it does not wait (or others wait
        ahead of it), GpuRefusal when it may never have them, QueueTimeout when
        `timeout` passes first. Cancelling the call (the hub stopping a pending
        spawn) leaves the queue, and gives back GPUs it was just given.
        """
        self.recover()
        self._holds = holds
        key = (request.user, request.server)
        if key in self._entries:
            raise GpuRefusal("this server is already waiting for a GPU")
        now = time.time()
        kept = self.interrupted_for(*key) if wait else None
        waiter = Waiter(
            request.user,
            request.server,
            request.project,
            request.count,
            request.mig,
            priority,
            kept.enqueued_at if kept else now,
            now + timeout,
            kept.seq if kept else next(self._seq),
        )
        async with self.allocator.lock():
            slots = await self.allocator.slots()
            containers = await self.allocator.list_containers()  # once: one engine call
            ledger = await self.allocator.ledger(containers)
            if self._serve_locked(slots, ledger, holds(), since):
                ledger = await self.allocator.ledger(containers)  # and what waiters just got
            entries = [e.waiter for e in self._entries.values()]
            decision = serve(
                [*entries, waiter], slots, ledger, self._policies({key: policy}), holds(), since
            )
            mine = [chosen for w, chosen in decision.granted if w.key == key]
            if mine:
                self.allocator.claim(request, mine[0], since)
                self._interrupted.pop(key, None)
                self._save()
                return mine[0]
            refused = [why for w, why in decision.refused if w.key == key]
            if refused:
                raise GpuRefusal(refused[0])
            ahead = sum(w.mig == request.mig for w in entries)
            if not wait:
                self._shortage(request, policy, slots, ledger, holds(), ahead)
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            self._entries[key] = _Entry(waiter, policy, future, on_update)
            self._interrupted.pop(key, None)
            self._save()
        log.info(
            "GPU queue: %s/%s (%s) waits for %d %s",
            request.user,
            request.project,
            request.server or "default server",
            request.count,
            "MIG slice(s)" if request.mig else "GPU(s)",
        )
        self._ensure_running()
        self.wake()  # the loop's first pass tells it where it stands
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, waiter.deadline - now))
        except asyncio.TimeoutError:
            if _given(future):
                return future.result()
            raise QueueTimeout(
                f"no GPU freed for you within {format_duration(timeout)} "
                "(the policy's queue_timeout); start again to queue anew, or start without a GPU"
            ) from None
        except asyncio.CancelledError:
            if _given(future):  # given, but the hub stopped the spawn: they go back
                self.allocator.settle(request.user, request.server)
            raise
        finally:
            self._leave(key, future)

    def _shortage(
        self,
        request: GpuRequest,
        policy: GpuPolicy,
        slots: list[GpuSlot],
        ledger: list[Holder],
        holds: list[Hold],
        ahead: int,
    ) -> None:
        """Refuse a spawn that does not wait: why there is no GPU for it now."""
        try:
            choose(slots, ledger, request, policy, holds)
        except GpuRefusal as e:
            raise GpuShortage(
                f"{e} Or wait for one: the queue serves first come, first served."
            ) from None
        waits = f"{ahead} request{'s' if ahead != 1 else ''} wait{'s' if ahead == 1 else ''}"
        raise GpuShortage(
            f"{waits} for a GPU before yours: a GPU that frees goes to them first. "
            "Wait for a GPU to join the queue, or start without a GPU."
        )

    def _leave(self, key: tuple[str, str], future: asyncio.Future) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.future is future:
            del self._entries[key]
        if not future.done():
            future.cancel()
        self._save()
        self.wake()  # those behind it may move up, or be served

    def _policies(self, extra: Mapping[tuple[str, str], GpuPolicy]) -> dict:
        return {**{k: e.policy for k, e in self._entries.items()}, **extra}

    def _serve_locked(
        self, slots: list[GpuSlot], ledger: list[Holder], holds: list[Hold], since: str
    ) -> bool:
        """Give the GPUs that are free to waiters, in order (the allocator's lock is held);
        True if any waiter was given GPUs."""
        if not self._entries:
            return False
        live = {k: e for k, e in self._entries.items() if not e.future.done()}
        decision = serve(
            [e.waiter for e in live.values()], slots, ledger, self._policies({}), holds, since
        )
        for w, chosen in decision.granted:
            entry = live[w.key]
            self.allocator.claim(w.request, chosen, since)
            entry.future.set_result(chosen)
            del self._entries[w.key]
            log.info("GPU queue: %s/%s gets %s", w.user, w.project, [s.uuid for s in chosen])
        for w, why in decision.refused:
            live[w.key].future.set_exception(GpuRefusal(why))
            del self._entries[w.key]
        if decision.granted or decision.refused:
            self._save()
        return bool(decision.granted)

    # ------------------------------------------------------------ the loop

    def wake(self) -> None:
        """Something may have freed GPUs (a stop in this hub): serve the queue now."""
        if self._wake is not None:
            self._wake.set()

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while self._entries:
            assert self._wake is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()
            try:
                await self.serve_now()
            except Exception:  # the loop must outlive one bad read of the engine or NVML
                log.exception("GPU queue: serving the queue failed; trying again")
        self._save()

    async def serve_now(self) -> None:
        """One pass: give what is free, then tell every waiter where it stands."""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        async with self.allocator.lock():
            slots = await self.allocator.slots()
            containers = await self.allocator.list_containers()  # once: one engine call
            self._serve_locked(slots, await self.allocator.ledger(containers), self._holds(), since)
            ledger = await self.allocator.ledger(containers)  # with what waiters just got
        self._save()
        if self._entries:
            self._next_retirement = next_max_runtime(containers)
            self._tell(slots, ledger)

    def _tell(self, slots: list[GpuSlot], ledger: list[Holder]) -> None:
        """Each waiter's position and why, said again only when it changed."""
        now = time.time()
        uuids = {s.uuid: s for s in slots}
        changed = False
        for w in self.waiting():
            entry = self._entries.get(w.key)
            if entry is None:
                continue
            held = len(
                {h.uuid for h in ledger if h.uuid in uuids and uuids[h.uuid].is_mig == w.mig}
            )
            message = describe_wait(w, held, self._next_retirement, now)
            entry.waiter = replace(w, message=message)  # the file says it too (the home page)
            if message != entry.said:
                entry.said, changed = message, True
                with contextlib.suppress(Exception):
                    entry.on_update(w, message)
        if changed:
            self._save()
