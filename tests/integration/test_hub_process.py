"""The repo's jupyterhub_config.py as-is, in a real hub process: restart and shutdown."""

from __future__ import annotations

import json
import uuid

import requests

from ds01_spawner import labels
from ds01_spawner.builds import BuildRecords
from ds01_spawner.identity import user_slug
from ds01_spawner.images import image_ref

from .conftest import eventually
from .hubprocess import HubProcess, seed_workspace


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


def test_hub_killed_mid_build_with_servers_running_loses_nothing(hub_process, engine, tmp_path):
    """SIGKILL while alice runs on a GPU and bob's first image build is in progress."""
    hub = hub_process(DS01_SIMULATED_GPUS="2")
    held = start_alice_on_a_gpu(hub, engine)
    data = tmp_path / "data"
    marker = f"ds01-build-{uuid.uuid4().hex[:8]}"  # also: no cached layer from an earlier run
    slow = f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {marker} && sleep 600\n"
    workspace, _ = seed_workspace(data / "state", data / "workspaces", "bob", "heavy", slow)
    (workspace / "notes.txt").write_text("bob's work\n")
    ref = image_ref(user_slug("bob"), "heavy")
    records = BuildRecords(data / "state")

    def build_containers():
        return [c for c in engine.containers.list(all=True) if marker in " ".join(c.attrs["Args"])]

    r = hub.api("POST", "users/bob")
    r = hub.api("POST", "users/bob/servers/heavy", data=json.dumps({"user_options": {}}))
    assert r.status_code == 202, r.text  # still building after the hub's slow_spawn_timeout
    eventually(build_containers, "the build's RUN step")
    assert records.read(ref)["status"] == "running"

    hub.kill()

    # the engine cancels a build whose client went away: nothing tagged, nothing left running
    eventually(lambda: not build_containers(), "the engine to drop the build's container")
    assert not engine.images.list(name=ref.rpartition(":")[0]), "no half-tagged image"
    assert containers(engine, "bob") == [], "no orphan server container"
    assert records.read(ref)["status"] == "interrupted"
    assert [c.id for c in containers(engine, "alice")] == [held.id]

    hub2 = hub_process(DS01_SIMULATED_GPUS="2")
    hub2.start()
    hub2.wait_ready("alice", "train", timeout=30)  # reattached, GPU still hers
    assert [c.id for c in containers(engine, "alice")] == [held.id]
    assert "heavy" not in hub2.api("GET", "users/bob").json()["servers"]

    # what bob sees on the image page: the build was interrupted, nothing is built
    token = {"Authorization": f"token {hub2.admin_token()}"}
    page = requests.get(f"{hub2.url}/services/ds01/api/images/bob/heavy", headers=token, timeout=30)
    assert page.status_code == 200, page.text
    assert page.json()["build"]["status"] == "interrupted" and not page.json()["built"]

    # the ledger was rebuilt from labels: carol gets the other GPU, dave none
    assert start(hub2, "carol", "train", {"gpus": 1}).status_code in (201, 202)
    hub2.wait_ready("carol", "train")
    (carols,) = containers(engine, "carol")
    assert carols.labels[labels.GPU_UUIDS] != held.labels[labels.GPU_UUIDS]
    assert start(hub2, "dave", "train", {"gpus": 1}).status_code == 409

    # bob fixes his Dockerfile and starts again: built this time, the workspace intact
    (workspace / "Dockerfile").write_text(slow.replace(" && sleep 600", ""))
    r = hub2.api("POST", "users/bob/servers/heavy", data=json.dumps({"user_options": {}}))
    assert r.status_code in (201, 202), r.text
    hub2.wait_ready("bob", "heavy")
    (bobs,) = containers(engine, "bob")
    assert bobs.exec_run(["cat", "/workspace/notes.txt"]).output == b"bob's work\n"
    assert "The last build of ds01-" in (tmp_path / "hub.log").read_text()
    assert records.read(ref)["status"] == "succeeded"
