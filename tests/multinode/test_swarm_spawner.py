"""The `ds01-swarm` spawner on the real test swarm, through a real hub and proxy.

Two nodes of two simulated GPUs (docs/swarm.md); project images go through the
test registry; the hub listens on the bridge (198.18.0.1) so tasks reach it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
from jupyterhub.tests.utils import api_request

from ds01_spawner import labels
from ds01_spawner.ledger import LedgerSeal
from ds01_spawner.service.gpu_page import swarm_rows
from ds01_spawner.swarmservice import assigned_gpus

from . import swarm as swarm_infra
from .conftest import GPU_ENV, eventually, gpu_resources, service_of, take_gpus_of


async def test_a_project_starts_on_the_second_node_and_answers_through_the_hub(swarm, swarm_hub):
    hub = await swarm_hub(extra_placement_spec={"constraints": ["node.hostname==n2"]})
    user = hub.new_user()
    await hub.start(user, "p", {"project": "p", "type": "base"})

    r = await hub.get_server_api(user, "p")
    assert r.status_code == 200, r.text  # JupyterLab on n2 answers through the proxy

    service = service_of(swarm, user, "p")
    (task,) = swarm.tasks(service, "running")
    assert swarm.node_name(task["NodeID"]) == "n2"
    image = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert image.startswith(f"{swarm.registry}/ds01-") and "@sha256:" in image, image
    assert service.attrs["Spec"]["Labels"][labels.USER] == user
    env = swarm.container_env(task)
    assert env["DS01_PROJECT"] == "p" and env[GPU_ENV] == ""  # no GPU: the variable is empty
    assert assigned_gpus(task) == []
    spawner = hub.app.users[user].spawners["p"]
    assert spawner.node == "n2"
    assert spawner.server.ip == swarm.ips["n2"]

    await hub.stop(user, "p")
    assert swarm.manager.services.list(filters={"label": f"ds01.user={user}"}) == []


async def start_outcome(hub, user: str, server: str, options: dict) -> str:
    """Start; "ready", or "<status> <message>" of the refusal (at once or later)."""
    r = await hub.request_start(user, server, options)
    if r.status_code in (201, 202):
        return await outcome(hub, user, server)
    return f"{r.status_code} {r.json().get('message', r.text)}"


async def outcome(hub, user: str, server: str, timeout: float = 240) -> str:
    """ "ready", or the message of the refusal that ended the start."""
    try:
        await hub.wait_ready(user, server, timeout)
    except AssertionError:
        future = getattr(hub.app.users[user].spawners[server], "_spawn_future", None)
        exc = future.exception() if future is not None and future.done() else None
        if exc is None:
            raise
        return f"{getattr(exc, 'status_code', '?')} {getattr(exc, 'jupyterhub_message', exc)}"
    return "ready"


async def test_six_users_race_for_four_gpus_on_two_nodes(swarm, swarm_hub):
    hub = await swarm_hub(policy={"defaults": {"max_gpus": 1}})
    users = [hub.new_user() for _ in range(6)]
    starts = await asyncio.gather(
        *(hub.request_start(u, "g", {"project": "g", "type": "base", "gpus": 1}) for u in users)
    )
    results = {}
    for user, r in zip(users, starts, strict=True):
        if r.status_code in (201, 202):
            results[user] = await outcome(hub, user, "g")
        else:
            results[user] = f"{r.status_code} {r.json().get('message', r.text)}"
    ready = [u for u, o in results.items() if o == "ready"]
    refused = {u: o for u, o in results.items() if o != "ready"}
    assert len(ready) == 4, results
    assert len(refused) == 2, results
    for message in refused.values():
        assert message.startswith("409 no GPU for you right now"), message  # not pending

    pairs, pair_of = set(), {}
    for user in ready:
        (task,) = swarm.tasks(service_of(swarm, user, "g"), "running")
        node = swarm.node_name(task["NodeID"])
        (gpu,) = assigned_gpus(task)
        assert swarm.container_env(task)[GPU_ENV] == gpu
        assert gpu.startswith(f"GPU-{node}-")
        assert hub.app.users[user].spawners["g"].node == node
        pairs.add((node, gpu))
        pair_of[user] = (node, gpu)
    assert len(pairs) == 4, pairs  # four distinct (node, GPU) pairs over both nodes

    # the admin GPU page's swarm table: every node's GPUs, the four holders
    seal = LedgerSeal(hub.app.config.DS01SwarmSpawner.state_dir)
    rows = swarm_rows(swarm.manager.api, seal)
    assert {(r["node"], r["gpu"]) for r in rows} == {
        (f"n{i}", f"GPU-n{i}-000{k}") for i in (1, 2) for k in (0, 1)
    }
    assert {(r["node"], r["gpu"], r["user"]) for r in rows if r["state"] == "held"} == {
        (node, gpu, user) for user in ready for node, gpu in [pair_of[user]]
    }

    # as after a hub restart: a new spawner from the hub's saved state polls the same
    # service and knows its node and GPU (the swarm is the record)
    user = ready[0]
    old = hub.app.users[user].spawners["g"]
    node, gpus = old.node, [s.uuid for s in old.plan.gpus]
    hub.app.users[user].spawners.pop("g")
    fresh = hub.app.users[user].spawners["g"]
    assert fresh is not old
    assert await fresh.poll() is None
    assert (fresh.node, [s.uuid for s in fresh.plan.gpus]) == (node, gpus)

    # the refused left nothing behind: no service, nothing pending
    for user in refused:
        assert swarm.manager.services.list(filters={"label": f"ds01.user={user}"}) == []
    pending = [t for s in swarm.manager.services.list() for t in swarm.tasks(s, "pending")]
    assert pending == []

    for user in ready:
        await hub.stop(user, "g")
    assert swarm.manager.services.list(filters={"label": "ds01.managed=true"}) == []
    eventually(
        lambda: all(not c.containers.list(all=True, sparse=True) for c in swarm.nodes.values()),
        "every task container gone after the stops",
        timeout=15,
    )


async def test_a_start_the_swarm_cannot_place_is_refused_within_seconds_not_left_pending(
    swarm, swarm_hub, services
):
    # every GPU taken outside ds01 (the ledger sees none held): only the swarm can say no
    for _ in range(4):
        swarm.running(services(resources=gpu_resources()))
    hub = await swarm_hub(policy={"defaults": {"max_gpus": 1}})
    user = hub.new_user()
    began = time.monotonic()
    result = await start_outcome(hub, user, "g", {"project": "g", "type": "base", "gpus": 1})
    assert "no GPU for you right now" in result and "insufficient resources" in result, result
    assert time.monotonic() - began < 60  # a build, then placement_timeout (3 s), not start_timeout
    assert swarm.manager.services.list(filters={"label": f"ds01.user={user}"}) == []


async def test_a_start_that_waits_for_a_gpu_gets_the_first_one_freed(swarm, swarm_hub, services):
    taken = [services(resources=gpu_resources()) for _ in range(4)]
    for service in taken:
        swarm.running(service)
    hub = await swarm_hub(policy={"defaults": {"max_gpus": 1, "queue_timeout": "2m"}})
    user = hub.new_user()
    r = await hub.request_start(
        user, "g", {"project": "g", "type": "base", "gpus": 1, "wait": True}
    )
    assert r.status_code in (201, 202), r.text
    await asyncio.sleep(8)  # longer than placement_timeout: it waits, it is not refused
    assert hub.app.users[user].spawners["g"].pending == "spawn"
    (task,) = swarm.running(taken[0])
    freed = swarm.container_env(task)[GPU_ENV]
    taken[0].remove()
    await hub.wait_ready(user, "g", timeout=60)
    (task,) = swarm.tasks(service_of(swarm, user, "g"), "running")
    assert assigned_gpus(task) == [freed]


async def test_the_fair_gpu_queue_serves_waiters_in_order_on_the_swarm(swarm, swarm_hub):
    from ds01_spawner.gpuqueue import QueueFile
    from ds01_spawner.service.gpu_page import queue_rows

    policy = {"defaults": {"max_gpus": 2, "max_gpus_per_project": 2, "queue_timeout": "3m"}}
    fast_202 = {"tornado_settings": {"slow_spawn_timeout": 0.5}}
    hub = await swarm_hub(_jupyterhub=fast_202, policy=policy)
    a, b, c, d, e = (hub.new_user() for _ in range(5))
    for holder in (a, b):  # the four GPUs held: two each, one node each
        await hub.start(holder, "g", {"project": "g", "type": "base", "gpus": 2})
    state_dir = hub.app.config.DS01SwarmSpawner.state_dir

    async def waiting() -> list[tuple[str, int]]:
        return [(w.user, w.position) for w in QueueFile(state_dir).read().waiting()]

    async def joins(user: str, gpus: int, place: int) -> None:
        r = await hub.request_start(
            user, "g", {"project": "g", "type": "base", "gpus": gpus, "wait": True}
        )
        assert r.status_code in (201, 202), r.text
        deadline = time.monotonic() + 120  # its image builds first
        while (user, place) not in await waiting():
            assert time.monotonic() < deadline, f"{user} not {place} in the queue"
            await asyncio.sleep(0.3)

    await joins(c, 2, 1)  # c asks for two, first
    await joins(d, 1, 2)  # d for one, after c
    assert [r["user"] for r in queue_rows(QueueFile(state_dir))] == [c, d]  # the GPU page
    # waiting creates nothing on the swarm
    assert swarm.manager.services.list(filters={"label": f"ds01.user={c}"}) == []
    result = await start_outcome(hub, e, "g", {"project": "g", "type": "base", "gpus": 1})
    assert "no GPU for you right now" in result and "wait" in result, result

    # a's two GPUs free: they go to c, first in line, though d asks for fewer
    await hub.stop(a, "g")
    await hub.wait_ready(c, "g", timeout=60)
    (task,) = swarm.tasks(service_of(swarm, c, "g"), "running")
    assert len(assigned_gpus(task)) == 2
    assert hub.app.users[d].spawners["g"].pending == "spawn"
    assert await waiting() == [(d, 1)]
    await hub.stop(b, "g")
    await hub.wait_ready(d, "g", timeout=60)
    assert await waiting() == []
    for user in (c, d):
        await hub.stop(user, "g")


@pytest.fixture
def restored_swarm(swarm):
    """The test may kill a node: afterwards the swarm is taken down and brought up again
    (the crashed node's data root is discarded, as `scripts/swarm` does after a crash)."""
    yield swarm
    layout = swarm_infra.Layout()
    if swarm_infra.problems(layout, swarm_infra.read_up(layout)):
        swarm_infra.down(layout)
        swarm.state.update(swarm_infra.up(layout, len(swarm.nodes), 2))
        swarm.base_image = swarm.state["base_image"]
        swarm._names.clear()


async def test_a_node_killed_under_a_server_frees_its_gpu_and_the_restart_lands_on_the_other(
    restored_swarm, swarm_hub, services
):
    swarm = restored_swarm
    # a short heartbeat: the manager declares a dead node down within seconds
    swarm.manager.swarm.update(dispatcher_heartbeat_period=1_000_000_000)
    # n1's GPUs taken for a moment, so the server lands on n2 (n1 is the manager)
    filler = take_gpus_of(swarm, services, "n1", name="filler")
    hub = await swarm_hub(policy={"defaults": {"max_gpus": 1}}, _jupyterhub={}, poll_interval=1)
    user = hub.new_user()
    await hub.start(user, "p", {"project": "p", "type": "base", "gpus": 1})
    spawner = hub.app.users[user].spawners["p"]
    assert spawner.node == "n2"
    filler.remove()
    (task,) = swarm.tasks(service_of(swarm, user, "p"), "running")
    assert assigned_gpus(task)[0].startswith("GPU-n2-")
    container = swarm.nodes["n2"].containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    code, _ = container.exec_run(["sh", "-c", "echo kept > /workspace/note.txt"])
    assert code == 0

    node = next(n for n in swarm_infra.Layout().known_nodes() if n.name == "n2")
    os.kill(int(node.pidfile.read_text()), signal.SIGKILL)

    async def stopped() -> bool:
        model = (await api_request(hub.app, "users", user)).json()
        return "p" not in model["servers"]

    deadline = time.monotonic() + 60
    while not await stopped():
        assert time.monotonic() < deadline, "the hub did not notice the dead node in 60 s"
        await asyncio.sleep(0.5)
    assert swarm.manager.services.list(filters={"label": f"ds01.user={user}"}) == []

    await hub.start(user, "p", {"project": "p", "type": "base", "gpus": 1})
    assert hub.app.users[user].spawners["p"].node == "n1"
    (task,) = swarm.tasks(service_of(swarm, user, "p"), "running")
    assert assigned_gpus(task)[0].startswith("GPU-n1-")
    container = swarm.nodes["n1"].containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    code, out = container.exec_run(["cat", "/workspace/note.txt"])
    assert (code, out.decode().strip()) == (0, "kept")  # the same workspace on the other node
    r = await hub.get_server_api(user, "p")
    assert r.status_code == 200, r.text
    await hub.stop(user, "p")


def image_of(service) -> str:
    service.reload()
    return service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]


async def test_an_image_rebuilt_from_the_image_page_runs_on_the_other_node_by_digest(
    swarm, swarm_hub, services, tmp_path
):
    from traitlets.config import Config

    from ds01_spawner.service.image_manager import ImageManager
    from ds01_spawner.settings import DS01Settings

    hub = await swarm_hub(policy={"defaults": {"max_gpus": 1}})
    user = hub.new_user()
    filler = take_gpus_of(swarm, services, "n2")
    await hub.start(user, "p", {"project": "p", "type": "base", "gpus": 1})
    assert hub.app.users[user].spawners["p"].node == "n1"
    first = image_of(service_of(swarm, user, "p"))
    filler.remove()

    # the image page's rebuild (the service's ImageManager, on the hub's settings and
    # the same engine: the manager), after a change to the project's Dockerfile
    cfg = hub.app.config.DS01SwarmSpawner
    settings = DS01Settings(
        config=Config(
            {
                "DS01Settings": {
                    k: cfg[k]
                    for k in ("state_dir", "workspace_root", "base_image", "project_types_dir")
                }
            }
        )
    )
    manager = ImageManager(settings, hub=None)
    project = manager.project(user, "p")
    dockerfile = manager._workspace(project) / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\nRUN echo rebuilt > /etc/ds01-rebuilt\n")
    await manager.act(project, "rebuild", {}, by_admin=False, by=user)
    build = manager.current_build(project)
    await asyncio.wait_for(build.done.wait(), 240)
    assert build.error is None, build.error

    # the restart lands on n2 (n1's GPUs taken meanwhile) and runs the new build by digest
    await hub.stop(user, "p")
    take_gpus_of(swarm, services, "n1")
    await hub.start(user, "p", {"project": "p", "type": "base", "gpus": 1})
    assert hub.app.users[user].spawners["p"].node == "n2"
    service = service_of(swarm, user, "p")
    second = image_of(service)
    assert second != first and second.startswith(f"{swarm.registry}/") and "@sha256:" in second
    (task,) = swarm.tasks(service, "running")
    container = swarm.nodes["n2"].containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    assert container.exec_run(["cat", "/etc/ds01-rebuilt"]).output.decode().strip() == "rebuilt"

    # a push that fails leaves the previous build in use
    await hub.stop(user, "p")
    cfg.registry = "198.18.0.1:5999"  # nothing listens there
    _, events = await hub.start_watching(user, "p", {"project": "p", "type": "base", "gpus": 1})
    await hub.wait_ready(user, "p")
    assert hub.app.users[user].spawners["p"].registry == "198.18.0.1:5999"
    assert any("Push failed" in e.get("message", "") for e in events), events
    assert image_of(service_of(swarm, user, "p")) == second


@pytest.fixture
def registry_blocked_from():
    """`block(node)`: the node's namespace can no longer reach the registry (an iptables
    REJECT of its port, in the node's network namespace); lifted after the test."""
    rules: list[list[str]] = []

    def block(node: str) -> None:
        rule = ["OUTPUT", "-d", "198.18.0.1", "-p", "tcp", "--dport", "5000", "-j", "REJECT"]
        run = ["nsenter", f"--net=/run/netns/ds01-{node}", "iptables"]
        subprocess.run([*run, "-A", *rule], check=True)
        rules.append([*run, "-D", *rule])

    yield block
    for rule in rules:
        subprocess.run(rule, check=False)


async def test_a_node_that_cannot_pull_the_image_refuses_the_start_clearly(
    swarm, swarm_hub, services, registry_blocked_from
):
    hub = await swarm_hub(policy={"defaults": {"max_gpus": 1}})
    user = hub.new_user()
    take_gpus_of(swarm, services, "n1")
    registry_blocked_from("n2")  # the project's new image exists only in the registry
    result = await start_outcome(hub, user, "p", {"project": "p", "type": "base", "gpus": 1})
    assert result.startswith("502 node n2 could not pull your image"), result
    assert "your image and workspace are unchanged" in result
    assert swarm.manager.services.list(filters={"label": f"ds01.user={user}"}) == []
