"""A project's status from plain facts (`projectstatus`): the hub's servers, builds, the
GPU ledger and queue, as the home page and the image list show it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ds01_spawner.gpuqueue import Waiter
from ds01_spawner.ledger import Holder
from ds01_spawner.projects import Project
from ds01_spawner.projectstatus import (
    BUILDING,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    WAITING,
    HubServer,
    ImageFacts,
    hub_servers,
    project_status,
)

NOW = 1_800_000_000.0
THESIS = Project("alice", "thesis", "pytorch", created=NOW - 86400, last_used=NOW - 3600)


def server(name: str = "thesis", *, ready: bool = True, pending: str | None = None) -> HubServer:
    return HubServer(name, "thesis", ready=ready, pending=pending, url=f"/user/alice/{name}/")


def waiter(state: str = "waiting", position: int = 2, deadline: float = NOW + 600) -> Waiter:
    return Waiter(
        "alice",
        "thesis",
        "thesis",
        gpus=1,
        state=state,
        position=position,
        deadline=deadline,
        message=f"Waiting for a GPU, {position} in line" if state == "waiting" else "ended",
    )


# ---------------------------------------------------------------- the hub's servers


def test_a_named_server_runs_the_project_of_its_name():
    model = {"servers": {"thesis": {"ready": True, "url": "/user/alice/thesis/"}}}
    assert hub_servers(model)["thesis"] == HubServer(
        "thesis", "thesis", ready=True, url="/user/alice/thesis/"
    )


def test_the_default_server_runs_the_project_its_options_name():
    model = {
        "servers": {"": {"ready": False, "pending": "spawn", "user_options": {"project": "x"}}}
    }
    assert hub_servers(model) == {"x": HubServer("", "x", pending="spawn")}


def test_a_default_server_that_names_no_project_runs_none():
    assert hub_servers({"servers": {"": {"ready": True, "user_options": {}}}}) == {}


def test_should_two_servers_claim_a_project_its_named_server_wins():
    model = {
        "servers": {
            "thesis": {"ready": True},
            "": {"ready": True, "user_options": {"project": "thesis"}},
        }
    }
    assert hub_servers(model)["thesis"].name == "thesis"


@pytest.mark.parametrize("model", [{}, {"servers": None}, {"servers": {"x": "junk"}}])
def test_a_model_without_servers_has_none(model):
    assert hub_servers(model) == {}


# ---------------------------------------------------------------- the states


def test_without_a_server_a_project_is_stopped_and_may_start():
    status = project_status(THESIS, None, now=NOW)
    assert (status.state, status.label, status.url) == (STOPPED, "stopped", "")
    assert status.can_start and not status.can_stop and not status.can_open and not status.busy


def test_a_ready_server_is_running_and_opens_at_its_url():
    status = project_status(THESIS, server(), now=NOW)
    assert (status.state, status.label, status.url) == (RUNNING, "running", "/user/alice/thesis/")
    assert status.can_open and status.can_stop and not status.can_start


def test_a_pending_spawn_is_starting_and_has_no_url_yet():
    status = project_status(THESIS, server(ready=False, pending="spawn"), now=NOW)
    assert (status.state, status.url) == (STARTING, "")
    assert status.busy and status.can_stop and not status.can_open


def test_a_spawn_whose_image_builds_is_building():
    status = project_status(THESIS, server(ready=False, pending="spawn"), building=True, now=NOW)
    assert (status.state, status.label) == (BUILDING, "building")


def test_a_rebuild_with_no_server_is_building_and_a_start_may_wait_for_it():
    status = project_status(THESIS, None, building=True, now=NOW)
    assert status.state == BUILDING and status.can_start and not status.can_stop


def test_a_spawn_in_the_gpu_queue_is_waiting_with_its_position():
    status = project_status(
        THESIS, server(ready=False, pending="spawn"), waiter=waiter(position=2), now=NOW
    )
    assert (status.state, status.label, status.position) == (WAITING, "waiting (2nd)", 2)
    assert status.message == "Waiting for a GPU, 2 in line"


def test_a_wait_without_a_position_says_waiting():
    status = project_status(THESIS, server(ready=False, pending="spawn"), waiter=waiter(position=0))
    assert status.label == "waiting"


def test_a_wait_the_queue_file_tells_nothing_of_is_still_told_in_words():
    quiet = dataclasses.replace(waiter(position=3), message="")
    status = project_status(THESIS, server(ready=False, pending="spawn"), waiter=quiet)
    assert status.message == "Waiting for a GPU, 3rd in line"


def test_the_hub_decides_whether_a_server_exists_not_the_queue_file():
    status = project_status(THESIS, None, waiter=waiter(), now=NOW)
    assert status.state == STOPPED and status.message == ""


def test_a_wait_the_hubs_restart_ended_is_told_until_its_deadline():
    ended = waiter("interrupted", position=0, deadline=NOW + 60)
    assert project_status(THESIS, None, waiter=ended, now=NOW).message == "ended"
    assert project_status(THESIS, None, waiter=ended, now=NOW + 61).message == ""


def test_an_ended_wait_is_not_told_once_the_project_runs_again():
    ended = waiter("interrupted", position=0)
    assert project_status(THESIS, server(), waiter=ended, now=NOW).message == ""


@pytest.mark.parametrize("ready", [True, False])
def test_a_server_the_hub_stops_is_stopping_and_cannot_be_stopped_twice(ready):
    status = project_status(THESIS, server(ready=ready, pending="stop"), now=NOW)
    assert (status.state, status.label) == (STOPPING, "stopping")
    assert not status.can_stop and not status.can_start and status.busy


def test_the_default_server_running_a_project_is_named_empty():
    status = project_status(THESIS, HubServer("", "thesis", ready=True, url="/user/alice/"))
    assert status.server == "" and status.can_stop and status.url == "/user/alice/"


# ---------------------------------------------------------------- GPUs, image, record


def test_the_gpus_are_the_ledgers_for_this_owners_project_only():
    ledger = [
        Holder("GPU-a", "alice", "thesis", "thesis", "t"),
        Holder("MIG-b", "alice", "thesis", "thesis", "t", fraction=1 / 7),
        Holder("GPU-c", "alice", "other", "other", "t"),
        Holder("GPU-d", "bob", "thesis", "thesis", "t"),
    ]
    status = project_status(THESIS, server(), holders=ledger, now=NOW)
    assert status.gpus == ("GPU-a", "MIG-b")
    assert status.gpu_equivalents == round(1 + 1 / 7, 4)


def test_the_record_and_the_image_pass_through():
    image = ImageFacts(built_at=NOW - 60, outdated=True, lost_packages=("rich==13.7.1",))
    status = project_status(THESIS, None, image=image, notices=["retiring soon"], now=NOW)
    assert (status.type, status.last_used) == ("pytorch", NOW - 3600)
    assert status.image == image and status.notices == ("retiring soon",)


def test_as_dict_is_plain_json_with_what_may_be_done():
    image = ImageFacts(built_at=NOW, lost_packages=("rich",))
    data = project_status(THESIS, server(), image=image, now=NOW).as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["image"]["lost_packages"] == ["rich"]
    assert (data["can_open"], data["can_start"], data["can_stop"], data["busy"]) == (
        True,
        False,
        True,
        False,
    )
