"""The repo's jupyterhub_config.py as-is, in a real hub process: restart and shutdown."""

from __future__ import annotations

import json

import pytest
import requests

from ds01_spawner import labels

from .hubprocess import HubProcess, remove_user_objects


@pytest.fixture
def hub_process(tmp_path, engine):
    data = tmp_path / "data"
    data.mkdir()
    procs: list[HubProcess] = []

    def make(**env: str) -> HubProcess:
        p = HubProcess(data, tmp_path / "hub.log", **env)
        if procs:  # a restarted hub keeps its ports
            p.port, p.hub_port, p.api_port, p.url = (
                procs[0].port,
                procs[0].hub_port,
                procs[0].api_port,
                procs[0].url,
            )
            p.token = procs[0].token
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()
    for user in ("researcher", "alice", "bob", "carol"):
        remove_user_objects(engine, user)


def containers(engine, user):
    return engine.containers.list(all=True, filters={"label": [f"{labels.USER}={user}"]})


def test_killed_hub_reattaches_and_shutdown_retires(hub_process, engine):
    hub = hub_process()
    hub.start()
    assert hub.api("POST", "users/researcher").status_code in (201, 409)
    r = hub.api("POST", "users/researcher/servers/thesis", data=json.dumps({"user_options": {}}))
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("researcher", "thesis")
    (before,) = containers(engine, "researcher")

    hub.kill()  # SIGKILL: no cleanup at all
    assert before.id in {c.id for c in containers(engine, "researcher")}

    hub2 = hub_process()
    hub2.start()
    server = hub2.wait_ready("researcher", "thesis", timeout=30)
    assert server["user_options"]["profile"] == "thesis"
    (after,) = containers(engine, "researcher")
    assert after.id == before.id, "the restarted hub reattached to the same container"
    r = requests.get(
        f"{hub2.url}/user/researcher/thesis/api/status",
        headers={"Authorization": f"token {hub2.admin_token()}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text

    assert hub2.terminate() == 0  # cleanup_servers: every server is retired
    assert containers(engine, "researcher") == []
    assert engine.images.get(after.labels[labels.IMAGE]).labels[labels.PROJECT] == "thesis"


def start(hub: HubProcess, user: str, server: str, options: dict) -> requests.Response:
    hub.api("POST", f"users/{user}")
    return hub.api(
        "POST", f"users/{user}/servers/{server}", data=json.dumps({"user_options": options})
    )


def start_alice_on_a_gpu(hub: HubProcess, engine):
    """Start the hub, and alice's server 'train' with one GPU; return its container."""
    hub.start()
    assert start(hub, "alice", "train", {"gpus": 1}).status_code in (201, 202)
    hub.wait_ready("alice", "train")
    (held,) = containers(engine, "alice")
    return held


def test_restarted_hub_never_hands_out_a_gpu_a_surviving_container_holds(hub_process, engine):
    hub = hub_process(DS01_SIMULATED_GPUS="2")
    held = start_alice_on_a_gpu(hub, engine)
    alice_gpu = held.labels[labels.GPU_UUIDS]

    hub.kill()
    hub2 = hub_process(DS01_SIMULATED_GPUS="2")
    hub2.start()
    assert start(hub2, "bob", "train", {"gpus": 1}).status_code in (201, 202)
    hub2.wait_ready("bob", "train")
    (bobs,) = containers(engine, "bob")
    assert bobs.labels[labels.GPU_UUIDS] != alice_gpu, "the ledger was rebuilt from labels"

    r = start(hub2, "carol", "train", {"gpus": 1})
    assert r.status_code == 409 and "all 2 GPUs" in r.json()["message"]
    assert containers(engine, "carol") == []


def test_admin_sees_who_holds_which_gpu_in_the_ds01_service(hub_process, engine):
    hub = hub_process(DS01_SIMULATED_GPUS="2")
    held = start_alice_on_a_gpu(hub, engine)

    admin = hub.login("admin")
    r = admin.get(f"{hub.url}/services/ds01/api/gpus", timeout=30)  # OAuth through the hub
    assert r.status_code == 200, r.text
    rows = {g["uuid"]: g for g in r.json()["gpus"]}
    assert len(rows) == 2
    holder = rows[held.labels[labels.GPU_UUIDS]]["holders"]
    assert [(h["user"], h["project"]) for h in holder] == [("alice", "train")]
    assert holder[0]["since"] == held.labels[labels.GPU_ALLOCATED_AT]
    page = admin.get(f"{hub.url}/services/ds01/gpus", timeout=30)
    assert page.status_code == 200 and "alice" in page.text and "free" in page.text

    researcher = hub.login("bob")
    r = researcher.get(f"{hub.url}/services/ds01/api/gpus", timeout=30)
    assert r.status_code == 403 and "custom:ds01:admin" in r.json()["message"]
    assert researcher.get(f"{hub.url}/services/ds01/", timeout=30).status_code == 200

    services = hub.api("GET", "services").json()
    assert services["ds01"]["display"] is True
