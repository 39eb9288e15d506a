"""The GPU queue through a real hub and engine, on simulated GPUs: who waits, who moves up."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import requests
from jupyterhub.tests.utils import api_request, auth_header

from ds01_spawner import labels
from ds01_spawner.gpuqueue import QueueFile

# the hub answers a start that waits at once (202), not after its 10 s slow-spawn wait
FAST_202 = {"tornado_settings": {"slow_spawn_timeout": 0.5}}


class ProgressWatch:
    """A spawn page's live events, read from the real progress EventSource in a thread."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.events: list[dict] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, headers), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with requests.get(url, headers=headers, stream=True, timeout=300) as r:
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data:"):
                        event = json.loads(line[5:])
                        self.events.append(event)
                        if event.get("ready") or event.get("failed"):
                            break
        finally:
            self.done.set()

    def last_wait(self) -> str:
        waits = [e["message"] for e in self.events if "in line" in e.get("message", "")]
        return waits[-1] if waits else ""


async def until(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached in {timeout}s: {what}")


async def pending(h, user: str, server: str) -> bool:
    model = (await api_request(h.app, "users", user)).json()
    s = model["servers"].get(server)
    return bool(s and s.get("pending") == "spawn")


def watch(h, user: str, server: str) -> ProgressWatch:
    return ProgressWatch(h.progress_url(user, server), auth_header(h.app.db, "admin"))


def gpu_of(h, user: str, server: str) -> str:
    return h.container(user, server).labels[labels.GPU_UUIDS]


async def test_two_gpus_four_users_two_wait_in_order_and_move_up(hub, dirs):
    h = await hub(FAST_202, simulated_gpus=2, policy={"defaults": {"max_gpus": 1}})
    a, b, c, d = (h.new_user() for _ in range(4))
    await h.start(a, "run", {"gpus": 1})
    await h.start(b, "run", {"gpus": 1})

    r = await h.request_start(c, "run", {"gpus": 1})
    assert r.status_code == 409 and "wait" in r.json()["message"], "no wait asked: refused"

    # 201 or 202: after a failed spawn, JupyterHub answers about the discarded spawner
    assert (await h.request_start(c, "run", {"gpus": 1, "wait": True})).status_code in (201, 202)
    assert await pending(h, c, "run"), "c waits"
    watch_c = watch(h, c, "run")
    await until(lambda: "1st in line" in watch_c.last_wait(), "c told it is 1st")
    assert (await h.request_start(d, "run", {"gpus": 1, "wait": True})).status_code in (201, 202)
    assert await pending(h, d, "run"), "d waits"
    watch_d = watch(h, d, "run")
    await until(lambda: "2nd in line" in watch_d.last_wait(), "d told it is 2nd")
    assert "1 ahead of you; 2 GPUs held" in watch_d.last_wait()
    queue = QueueFile(dirs["state_dir"]).read().waiting()
    assert [(w.user, w.position) for w in queue] == [(c, 1), (d, 2)]
    assert h.containers(c) == [] and h.containers(d) == [], "a waiting spawn creates nothing"
    assert h.app.users[c].spawners["run"].user_options["wait"] is True

    freed = gpu_of(h, a, "run")
    await h.stop(a, "run")
    stopped = time.monotonic()
    await h.wait_ready(c, "run", timeout=30)
    assert time.monotonic() - stopped < 5, "the first waiter starts within 5 s of the stop"
    assert gpu_of(h, c, "run") == freed
    await until(lambda: "1st in line" in watch_d.last_wait(), "d moves up to 1st")
    assert await pending(h, d, "run")
    assert gpu_of(h, b, "run") != gpu_of(h, c, "run"), "never the same GPU twice"

    # cancelling is stopping the server: d leaves the queue, nothing is created
    await h.stop(d, "run")
    assert QueueFile(dirs["state_dir"]).read().waiting() == []
    assert h.containers(d) == []
    await h.stop(b, "run")
    await h.start(a, "run", {"gpus": 1})  # the freed GPU went to no ghost of d
    assert gpu_of(h, a, "run") != gpu_of(h, c, "run")


async def test_queue_timeout_ends_a_wait_cleanly(hub, dirs):
    h = await hub(FAST_202, simulated_gpus=1, policy={"defaults": {"queue_timeout": "3s"}})
    a, b = h.new_user(), h.new_user()
    await h.start(a, "run", {"gpus": 1})
    began = time.monotonic()
    assert (await h.request_start(b, "run", {"gpus": 1, "wait": True})).status_code == 202
    events = await h.progress(b, "run")
    assert time.monotonic() - began < 30
    assert events[-1].get("failed"), events[-1]
    assert "no GPU freed for you within 3s" in events[-1]["message"]
    assert not await pending(h, b, "run")
    assert h.containers(b) == [] and QueueFile(dirs["state_dir"]).read().entries == []
    await h.stop(a, "run")
    await h.start(b, "run", {"gpus": 1})  # a start after the timeout works as any other


async def test_waiting_is_refused_where_the_policy_turns_the_queue_off(hub):
    h = await hub(simulated_gpus=1, policy={"defaults": {"queue_timeout": "none"}})
    user = h.new_user()
    r = await h.request_start(user, "run", {"gpus": 1, "wait": True})
    assert r.status_code == 403 and "queue_timeout" in r.json()["message"]
    r = await h.request_start(user, "run", {"gpus": 1, "wait": "maybe"})
    assert r.status_code == 400 and "'wait' must be true or false" in r.json()["message"]


# ------------------------------------------------------------ a hub killed while two wait


def test_hub_killed_while_two_wait_gives_no_gpu_twice_and_says_why(hub_process, engine):
    from .hubprocess import HubProcess

    def start(hub: HubProcess, user: str, options: dict) -> requests.Response:
        hub.api("POST", f"users/{user}")
        body = json.dumps({"user_options": options})
        return hub.api("POST", f"users/{user}/servers/train", data=body)

    def held(user: str) -> str:
        (c,) = engine.containers.list(filters={"label": [f"{labels.USER}={user}"]})
        return c.labels[labels.GPU_UUIDS]

    hub = hub_process(DS01_SIMULATED_GPUS="2")
    hub.start()
    for user in ("alice", "bob"):
        assert start(hub, user, {"gpus": 1}).status_code in (201, 202)
        hub.wait_ready(user, "train")
    for user in ("carol", "dave"):
        assert start(hub, user, {"gpus": 1, "wait": True}).status_code == 202
    queue = QueueFile(str(hub.data_dir / "state"))
    waits = eventually_sync(lambda: len(queue.read().waiting()) == 2 and queue.read().waiting())
    assert [(w.user, w.position) for w in waits] == [("carol", 1), ("dave", 2)]

    hub.kill()  # SIGKILL while two wait
    hub2 = hub_process(DS01_SIMULATED_GPUS="2")
    hub2.start()
    assert {held("alice"), held("bob")} == {
        "GPU-00000000-0000-4000-8000-000000000000",
        "GPU-00000000-0000-4000-8000-000000000001",
    }
    # the waits ended with the hub; each waiter is told why, and keeps its place
    model = hub2.api("GET", "users/carol").json()
    assert not (model["servers"].get("train") or {}).get("pending")
    carol = hub2.login("carol")
    form = carol.get(f"{hub2.url}/hub/spawn/carol/train", timeout=30)
    assert form.status_code == 200
    assert "Your wait for a GPU ended when the hub restarted" in form.text
    admin = hub2.login("admin")  # the admin GPU page lists them (OAuth through the hub)
    view = admin.get(f"{hub2.url}/services/ds01/api/gpus", timeout=30).json()
    assert [(w["user"], w["state"]) for w in view["queue"]] == [
        ("carol", "interrupted"),
        ("dave", "interrupted"),
    ]
    assert engine.containers.list(filters={"label": [f"{labels.USER}=carol"]}) == []

    # dave starts again first, then carol: carol keeps her place ahead of dave
    assert start(hub2, "dave", {"gpus": 1, "wait": True}).status_code == 202
    assert start(hub2, "carol", {"gpus": 1, "wait": True}).status_code == 202
    waits = eventually_sync(lambda: len(queue.read().waiting()) == 2 and queue.read().waiting())
    assert [(w.user, w.position) for w in waits] == [("carol", 1), ("dave", 2)]
    alices = held("alice")
    assert hub2.api("DELETE", "users/alice/servers/train").status_code in (202, 204)
    hub2.wait_ready("carol", "train", timeout=60)
    assert held("carol") == alices and held("carol") != held("bob"), "no GPU given twice"
    assert hub2.api("DELETE", "users/dave/servers/train").status_code in (202, 204)
    eventually_sync(lambda: not queue.read().waiting())


def eventually_sync(predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not reached in {timeout}s")
