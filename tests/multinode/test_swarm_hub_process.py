"""The repo's own jupyterhub_config.py as a real hub process on the test swarm
(`DS01_SWARM_REGISTRY`: `ds01-swarm`), with its ds01 service: the admin pages see
every node's GPUs, the image page rebuilds, the hub is killed and restarted
under a running server, a drained node's server is noticed as stopped and
starts again on the other node, on the rebuilt image, with the same workspace,
and the image page's rollback brings back the first build, by its digest.
"""

from __future__ import annotations

import time

import pytest
import requests

from ds01_spawner.audit import AuditLog
from ds01_spawner.limits import PolicyStore
from ds01_spawner.service.cleaner import Cleaner
from ds01_spawner.swarmservice import assigned_gpus
from tests.integration.hubprocess import Client, HubProcess

from .conftest import HUB_IP, eventually, service_of, take_gpus_of

USER, PROJECT = "alice", "p"
OPTIONS = {"user_options": {"project": PROJECT, "type": "base", "gpus": 1}}


@pytest.fixture
def swarm_hubs(swarm, tmp_path):
    """`make()`: a HubProcess of the repo's config on the swarm (all share one data dir);
    at the end every hub and what it started is stopped, and n2 is active again."""
    (tmp_path / "data").mkdir()
    made: list[HubProcess] = []

    def make() -> HubProcess:
        hub = HubProcess(
            tmp_path / "data",
            tmp_path / "hub.log",
            args=("--DS01SwarmSpawner.poll_interval=1",),
            DOCKER_HOST=swarm.state["sockets"]["n1"],
            DS01_SWARM_REGISTRY=swarm.registry,
            DS01_HUB_IP=HUB_IP,
            DS01_BASE_IMAGE=swarm.base_image,
        )
        made.append(hub)
        return hub

    try:
        yield make
    finally:
        for hub in made:
            hub.stop()  # and what a killed hub left: its proxy, its service
        node = swarm.node("n2")
        if node.attrs["Spec"].get("Availability") != "active":
            node.update({**node.attrs["Spec"], "Availability": "active"})
        swarm.remove_all_services()


def on_node(swarm, task: dict) -> str:
    return swarm.node_name(task["NodeID"])


def run_in(swarm, task: dict, command: list[str]) -> tuple[int, str]:
    client = swarm.nodes[on_node(swarm, task)]
    container = client.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    code, out = container.exec_run(command)
    return code, out.decode().strip()


def admin_gpus(hub: HubProcess) -> list[dict]:
    r = requests.get(
        f"{hub.url}/services/ds01/api/limits?all=1",
        headers={"Authorization": f"token {hub.admin_token()}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["gpus"]


def test_a_real_hub_on_the_swarm_keeps_its_servers_over_a_restart_and_a_drain_moves_them(
    swarm, services, swarm_hubs, tmp_path
):
    hub = swarm_hubs()
    hub.start()
    alice = Client(hub, USER)

    # alice's project lands on n2 (n1's GPUs taken while it starts)
    filler = take_gpus_of(swarm, services, "n1")
    r = hub.api("POST", f"users/{USER}/servers/{PROJECT}", json=OPTIONS)
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(USER, PROJECT)
    filler.remove()
    service = service_of(swarm, USER, PROJECT)
    (task,) = swarm.tasks(service, "running")
    assert on_node(swarm, task) == "n2"
    (gpu,) = assigned_gpus(task)
    first_image = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert run_in(swarm, task, ["sh", "-c", "echo kept > /workspace/note.txt"])[0] == 0

    # the admin's limits page: every node's GPUs and who holds which
    rows = eventually(
        lambda: (g := admin_gpus(hub)) and all(x["state"] == "free" or x["user"] for x in g) and g,
        "n1's GPUs free again after the filler",
        timeout=30,
    )
    assert sorted((g["node"], g["state"], g["user"]) for g in rows) == [
        ("n1", "free", ""),
        ("n1", "free", ""),
        ("n2", "free", ""),
        ("n2", "held", USER),
    ]
    assert next(g["gpu"] for g in rows if g["user"]) == gpu
    me = alice.get("limits").json()["users"][0]
    assert me["usage"]["gpus"] == 1 and me["servers"][0]["project"] == PROJECT

    # the image page: a changed Dockerfile, rebuilt on the manager; the server is outdated
    dockerfile = tmp_path / "data" / "workspaces" / USER / PROJECT / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\nRUN echo rebuilt > /etc/ds01-rebuilt\n")
    r = alice.post(f"images/{USER}/{PROJECT}/rebuild")
    assert r.status_code == 202, r.text
    events = alice.wait_build(f"images/{USER}/{PROJECT}")
    assert events[-1]["phase"] == "built", events[-5:]
    info = alice.get(f"images/{USER}/{PROJECT}").json()
    assert info["running"] == [{"server": PROJECT, "container": service.name, "outdated": True}]

    # the image cleaner counts a project running on any node as running
    cleaner = Cleaner(
        str(tmp_path / "data" / "state"),
        PolicyStore(None),
        AuditLog(tmp_path / "cleaner-audit", "service"),
        client=swarm.manager.api,
        image_filters={"label": [f"ds01.user={USER}"]},
        swarm=True,
    )
    assert (USER, PROJECT) in cleaner.facts().running

    # the hub dies and comes back: the server, its node and its GPU are as they were
    hub.kill()
    hub2 = swarm_hubs()
    hub2.take_ports_of(hub)
    hub2.start()
    hub2.wait_ready(USER, PROJECT, timeout=60)
    service.reload()
    (after,) = swarm.tasks(service, "running")
    assert (after["ID"], assigned_gpus(after)) == (task["ID"], [gpu])
    r = requests.get(
        f"{hub2.url}/user/{USER}/{PROJECT}/api/status",
        headers={"Authorization": f"token {hub2.admin_token()}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text  # JupyterLab on n2, through the new hub's proxy
    held = [(g["node"], g["gpu"], g["user"]) for g in admin_gpus(hub2) if g["user"]]
    assert held == [("n2", gpu, USER)]

    # n2 is drained: the hub sees the server stopped, the service goes, the GPU is free
    node = swarm.node("n2")
    node.update({**node.attrs["Spec"], "Availability": "drain"})
    deadline = time.monotonic() + 60
    while hub2.api("GET", f"users/{USER}").json()["servers"].get(PROJECT):
        assert time.monotonic() < deadline, "the hub did not notice the drained node in 60 s"
        time.sleep(0.5)
    assert swarm.manager.services.list(filters={"label": f"ds01.user={USER}"}) == []
    rows = admin_gpus(hub2)
    assert not [g for g in rows if g["user"]]
    assert {g["state"] for g in rows if g["node"] == "n2"} == {"unavailable"}

    # started again: on n1, the rebuilt image by digest, the same workspace
    r = hub2.api("POST", f"users/{USER}/servers/{PROJECT}", json=OPTIONS)
    assert r.status_code in (201, 202), r.text
    hub2.wait_ready(USER, PROJECT)
    service = service_of(swarm, USER, PROJECT)
    (task,) = swarm.tasks(service, "running")
    assert on_node(swarm, task) == "n1" and assigned_gpus(task)[0].startswith("GPU-n1-")
    image = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert image != first_image and image.startswith(f"{swarm.registry}/") and "@sha256:" in image
    assert run_in(swarm, task, ["cat", "/etc/ds01-rebuilt"]) == (0, "rebuilt")
    assert run_in(swarm, task, ["cat", "/workspace/note.txt"]) == (0, "kept")
    info = alice.get(f"images/{USER}/{PROJECT}").json()
    assert [r["outdated"] for r in info["running"]] == [False]

    # the image page's rollback and restart: the first build again, the same digest
    assert alice.post(f"images/{USER}/{PROJECT}/rollback").status_code == 200
    r = alice.post(f"images/{USER}/{PROJECT}/restart")
    assert r.status_code == 200, r.text
    hub2.wait_ready(USER, PROJECT)
    service = service_of(swarm, USER, PROJECT)
    assert service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == first_image
    (task,) = swarm.tasks(service, "running")
    assert run_in(swarm, task, ["cat", "/etc/ds01-rebuilt"])[0] != 0

    # a normal shutdown retires every server (cleanup_servers): no service is left
    assert hub2.terminate() == 0
    assert swarm.manager.services.list(filters={"label": f"ds01.user={USER}"}) == []
