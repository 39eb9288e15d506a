"""The audit trail of a real hub process: what a GPU server's life writes, and that a hub
killed with SIGKILL neither loses an event it wrote nor writes one twice after restarting."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import requests

from ds01_spawner import labels
from ds01_spawner.audit import read_events

from .conftest import eventually
from .hubprocess import HubProcess


def trail(hub: HubProcess) -> list[dict]:
    return list(read_events(Path(hub.data_dir) / "state"))


def of(events: list[dict], kind: str, action: str | None, user: str = "alice") -> list[dict]:
    return [
        e
        for e in events
        if e["kind"] == kind and e.get("action") == action and e.get("user") == user
    ]


def key(e: dict) -> tuple:
    return (e["kind"], e.get("action"), e.get("user"), e.get("server"), e["__timestamp__"])


def start(hub: HubProcess, user: str, server: str, options: dict) -> requests.Response:
    hub.api("POST", f"users/{user}")
    body = json.dumps({"user_options": options})
    return hub.api("POST", f"users/{user}/servers/{server}", data=body)


def service(hub: HubProcess, method: str, path: str, body: dict | None = None):
    return requests.request(
        method,
        f"{hub.url}/services/ds01/api/{path}",
        json=body,
        headers={"Authorization": f"token {hub.admin_token()}"},
        timeout=120,
    )


def test_a_gpu_servers_trail_survives_a_hub_sigkill(hub_process, engine):
    hub = hub_process(DS01_SIMULATED_GPUS="2")
    hub.start()
    assert start(hub, "alice", "train", {"gpus": 1}).status_code in (201, 202)
    hub.wait_ready("alice", "train")
    (container,) = engine.containers.list(filters={"label": [f"{labels.USER}=alice"]})

    events = trail(hub)
    (started,) = of(events, "server", "start")
    (ready,) = of(events, "server", "ready")
    (grant,) = of(events, "gpu", "grant")
    assert started["server"] == ready["server"] == grant["server"] == "train"
    assert (started["container"], started["project"]) == (container.name, "train")
    assert started["image"] == container.labels[labels.IMAGE]
    assert ready["seconds"] > 0 and ready["at"] > started["at"]
    assert grant["uuids"] == container.labels[labels.GPU_UUIDS].split(",")
    assert grant["since"] == container.labels[labels.GPU_ALLOCATED_AT]
    assert (grant["equivalents"], grant["node"]) == (1, socket.gethostname())
    build_start, build_end = of(events, "build", "start"), of(events, "build", "end")
    assert len(build_start) == len(build_end) == 1, "alice's first start built her image"
    assert build_end[0]["result"] == "succeeded"

    r = start(hub, "carol", "train", {"gpus": 5})
    assert r.status_code in (400, 403, 409), r.text
    (refusal,) = of(trail(hub), "refusal", None, user="carol")
    assert refusal["status"] == r.status_code and refusal["message"] in r.json()["message"]
    assert of(trail(hub), "server", "start", user="carol") == []

    before = trail(hub)
    hub.kill()  # SIGKILL: nothing flushed on the way out, nothing cleaned up

    hub2 = hub_process(DS01_SIMULATED_GPUS="2")
    hub2.start()
    hub2.wait_ready("alice", "train", timeout=30)  # reattached: no second start or grant
    r = service(hub2, "POST", "images/alice/train/rebuild")  # a build by the service
    assert r.status_code == 202, r.text
    eventually(lambda: of(trail(hub2), "build", "end")[1:], "the service's rebuild to end")
    r = service(hub2, "POST", "images/alice/train/packages", {"add_pip": ["ds01hello==1.0"]})
    assert r.status_code == 200, r.text
    r = hub2.api("DELETE", "users/alice/servers/train")
    assert r.status_code in (202, 204), r.text
    eventually(lambda: of(trail(hub2), "gpu", "release"), "alice's GPU release")

    after = trail(hub2)
    assert len({key(e) for e in after}) == len(after), "no event written twice"
    assert {key(e) for e in before} <= {key(e) for e in after}, "every event before the kill"
    assert [len(of(after, "server", a)) for a in ("start", "ready", "stop")] == [1, 1, 1]
    (stop,) = of(after, "server", "stop")
    (release,) = of(after, "gpu", "release")
    assert len(of(after, "gpu", "grant")) == 1
    assert stop["container"] == container.name and stop["seconds"] > 0
    assert (release["uuids"], release["since"]) == (grant["uuids"], grant["since"])
    assert stop["at"] > before[-1]["at"]

    rebuild = of(after, "build", "end")[1]
    assert rebuild["result"] == "succeeded" and rebuild["image"] == started["image"]
    (packages,) = of(after, "packages", None)
    assert (packages["added"], packages["removed"], packages["by"]) == (
        ["ds01hello==1.0"],
        [],
        "admin",
    )
    audit = Path(hub2.data_dir) / "state" / "audit"
    writers = {p.name.split(".")[1] for p in audit.glob("*.jsonl")}
    assert writers == {"hub", "service"}, "each process writes its own file"
