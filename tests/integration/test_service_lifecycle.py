"""The ds01 service ends with its hub: promptly on SIGTERM/SIGINT, and by itself when the
hub is SIGKILLed, so a restarted hub's service gets the port and answers at once."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import requests

from ds01_spawner.builds import BuildRecords
from ds01_spawner.identity import user_slug
from ds01_spawner.images import image_ref

from .hubprocess import HubProcess, alive, proc_stat, remove_user_objects

USER = "lifecycle"


@pytest.fixture
def hubs(tmp_path, engine):
    """Make hubs on one data directory; a later one keeps the first one's ports."""
    data = tmp_path / "data"
    data.mkdir()
    made: list[HubProcess] = []

    def make() -> HubProcess:
        hub = HubProcess(data, tmp_path / "hub.log")
        if made:
            hub.take_ports_of(made[0])
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.stop()
    remove_user_objects(engine, USER)


def seconds_until_gone(pid: int, timeout: float) -> float:
    started = proc_stat(pid)[2]
    t0 = time.monotonic()
    while alive(pid, started):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"process {pid} still runs after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - t0


def service_answers(hub: HubProcess) -> requests.Response:
    return requests.get(
        f"{hub.url}/services/ds01/api/gpus",
        headers={"Authorization": f"token {hub.admin_token()}"},
        timeout=10,
    )


def test_a_killed_hubs_service_exits_and_the_restarted_hubs_service_answers(hubs):
    hub = hubs()
    hub.start()
    assert service_answers(hub).status_code == 200
    orphan = hub.service_pid()

    hub.kill()  # SIGKILL: the service, in its own session, is not signalled
    gone = seconds_until_gone(orphan, timeout=3)

    hub2 = hubs()
    t0 = time.monotonic()
    hub2.start()
    deadline = time.monotonic() + 15
    while (r := service_answers(hub2)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    answered = time.monotonic() - t0
    assert r.status_code == 200, r.text  # not the orphan's 500 (a token this hub never made)
    print(
        f"\norphaned service exited {gone:.2f}s after the hub's SIGKILL; "
        f"restarted hub's service answered {answered:.2f}s after the restart began"
    )
    assert hub2.service_pid() != orphan


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_service_ends_within_2s_of_a_signal_recording_its_build_interrupted(hubs, engine, sig):
    hub = hubs()
    hub.start()
    hub.api("POST", f"users/{USER}")
    r = hub.api("POST", f"users/{USER}/servers/slow", data=json.dumps({"user_options": {}}))
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(USER, "slow")
    ref = image_ref(user_slug(USER), "slow")
    built = engine.images.get(ref).id

    marker = f"ds01-build-{uuid.uuid4().hex[:8]}"  # no cached layer from an earlier run
    dockerfile = hub.data_dir / "workspaces" / user_slug(USER) / "slow" / "Dockerfile"
    dockerfile.write_text(f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {marker} && sleep 600\n")
    token = hub.api("POST", f"users/{USER}/tokens", json={"note": "t"}).json()["token"]
    r = requests.post(
        f"{hub.url}/services/ds01/api/images/{USER}/slow/rebuild",
        json={},
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    assert r.status_code == 202, r.text

    def build_containers():
        return [c for c in engine.containers.list(all=True) if marker in " ".join(c.attrs["Args"])]

    deadline = time.monotonic() + 120
    while not build_containers():
        assert time.monotonic() < deadline, "the build's RUN step never started"
        time.sleep(0.3)
    records = BuildRecords(hub.data_dir / "state")
    assert records.read(ref)["status"] == "running"

    service = hub.service_pid()
    os.kill(service, sig)
    took = seconds_until_gone(service, timeout=2)
    print(f"\nservice exited {took:.2f}s after {signal.Signals(sig).name} during a build")

    record = json.loads(next((hub.data_dir / "state" / "builds").glob("*slow*.json")).read_text())
    assert record["status"] == "interrupted"  # written down, not only read so from the lock
    deadline = time.monotonic() + 30
    while build_containers():  # the engine cancels a build whose client went away
        assert time.monotonic() < deadline, "the engine kept the build running"
        time.sleep(0.3)
    assert engine.images.get(ref).id == built, "nothing half-built was tagged"
