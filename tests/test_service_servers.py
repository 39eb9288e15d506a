"""A project's server, launched and retired through the hub for its owner (`project launch`,
`container retire`), pinned with a recording stand-in for the hub and real project and
package records on disk: no hub process, no Docker engine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tornado import httpserver, web
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.testing import bind_unused_port

from ds01_spawner.errors import Refusal
from ds01_spawner.images import BuildError
from ds01_spawner.installed import InstalledRecords
from ds01_spawner.projects import Project, ProjectStore
from ds01_spawner.service.hub_api import HubClient
from ds01_spawner.service.servers import (
    MAX_PROGRESS_STREAMS,
    ServerManager,
    hub_refusal,
    project_servers,
    server_state,
)

OWNER = "alice"
READY = {"ready": True, "pending": None}


def hub_error(code: int, body: bytes = b"") -> HTTPClientError:
    """An error as tornado raises it for a hub answer of `code` with `body`."""
    response = HTTPResponse(HTTPRequest("http://hub/hub/api/x"), code, buffer=io.BytesIO(body))
    return HTTPClientError(code, response=response)


def hub_message(code: int, message: Any) -> HTTPClientError:
    return hub_error(code, json.dumps({"status": code, "message": message}).encode())


class FakeHub:
    """The HubClient calls ServerManager makes, recorded; GET answers the user's servers."""

    def __init__(self, servers: dict[str, Any] | None = None, code: int = 202) -> None:
        self.servers = servers or {}
        self.code = code  # the status of a start: 201 ready, 202 still starting
        self.refusal: HTTPClientError | None = None  # what a POST or a stop raises
        self.calls: list[tuple[str, str, Any]] = []
        self.stopped: list[tuple[str, str]] = []

    async def call(self, method: str, path: str, body: Any = None, headers=None, *, raw=False):
        self.calls.append((method, path, body))
        if method == "GET":
            return {"name": OWNER, "servers": self.servers}
        if self.refusal is not None:
            raise self.refusal
        return SimpleNamespace(code=self.code) if raw else None

    async def stop_server(self, user: str, server: str, timeout: float = 60) -> None:
        if self.refusal is not None:
            raise self.refusal
        self.stopped.append((user, server))
        self.servers.pop(server, None)

    @property
    def posts(self) -> list[tuple[str, Any]]:
        return [(path, body) for method, path, body in self.calls if method == "POST"]


class FakeImages:
    """What ServerManager uses of the ImageManager: the real project and package records,
    and package edits and rebuilds recorded instead of made."""

    def __init__(self, state_dir: Path) -> None:
        self.store = ProjectStore(state_dir)
        self.installed = InstalledRecords(state_dir)
        self.build: Any = None
        self.added: list[tuple[str, list[str]]] = []
        self.rebuilt: list[str] = []

    def current_build(self, project: Project) -> Any:
        return self.build

    async def update_packages(self, project: Project, *, add_pip=(), by: str = "") -> None:
        self.added.append((project.name, list(add_pip)))
        self.by = by

    def rebuild_unless_building(self, project: Project, *, nocache: bool = False) -> Any:
        self.rebuilt.append(project.name)
        return SimpleNamespace(), True


@pytest.fixture
def images(tmp_path) -> FakeImages:
    return FakeImages(tmp_path)


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
def servers(hub, images) -> ServerManager:
    return ServerManager(hub, images, "/")


def own(images: FakeImages, name: str = "thesis", owner: str = OWNER) -> Project:
    project = Project(owner, name, "base", 0.0)
    images.store.save(images.store.slug(owner), project)
    return project


def record_lost(images: FakeImages, packages: list[str], name: str = "thesis") -> None:
    """What the spawner records as it retires a container: the session's pip installs."""
    images.installed.record_session(images.store.slug(OWNER), name, "sha256:img", packages)


# ---------------------------------------------------------------- which server runs a project


def test_a_project_runs_in_its_named_server_or_a_server_started_for_it():
    model = {
        "servers": {
            "thesis": READY,
            "": {"ready": True, "user_options": {"project": "thesis"}},
            "other": {"ready": True, "user_options": {"project": "other"}},
            "old": {"ready": True, "user_options": None},
        }
    }
    assert set(project_servers(model, "thesis")) == {"thesis", ""}


def test_a_default_server_of_another_project_is_not_this_ones():
    model = {"servers": {"": {"ready": True, "user_options": {"project": "other"}}}}
    assert project_servers(model, "thesis") == {}
    assert project_servers({"servers": None}, "thesis") == {}


@pytest.mark.parametrize(
    ("server", "state"),
    [
        ({"pending": "spawn", "ready": False}, "starting"),
        ({"pending": "stop", "ready": True}, "stopping"),
        ({"pending": None, "ready": True}, "running"),
        ({"pending": None, "ready": False}, "starting"),
    ],
)
def test_what_a_listed_server_is_doing(server, state):
    assert server_state(server) == state


# ---------------------------------------------------------------- the hub's refusals


def test_a_hub_refusal_keeps_its_status_and_the_spawners_message():
    refusal = hub_refusal(hub_message(400, "over your GPU limit"), "start thesis")
    assert (refusal.status, refusal.message) == (400, "over your GPU limit")


def test_a_4xx_without_a_json_body_keeps_its_status_with_a_generic_message():
    refusal = hub_refusal(hub_error(404, b"<html>not found</html>"), "start thesis")
    assert refusal.status == 404
    assert refusal.message.startswith("the hub refused to start thesis")


@pytest.mark.parametrize("body", [b"<html>oops</html>", b"", b"\xff"])
def test_a_hub_failure_is_a_502_with_a_generic_message(body):
    refusal = hub_refusal(hub_error(500, body), "start thesis")
    assert refusal.status == 502
    assert refusal.message.startswith("the hub refused to start thesis")


def test_a_hub_5xx_is_a_502_whatever_its_body_says():
    assert hub_refusal(hub_message(503, "busy"), "start thesis").status == 502


def test_no_answer_from_the_hub_is_a_502():
    refusal = hub_refusal(HTTPClientError(599, "Timeout"), "list your servers")
    assert refusal.status == 502 and "list your servers" in refusal.message


@pytest.mark.parametrize("message", [{"text": "x"}, ["x"], 3, None])
def test_a_message_that_is_not_text_is_ignored(message):
    refusal = hub_refusal(hub_message(400, message), "start thesis")
    assert refusal.status == 400
    assert refusal.message.startswith("the hub refused to start thesis")


def test_a_json_body_that_is_not_an_object_is_ignored():
    refusal = hub_refusal(hub_error(400, b'["over your GPU limit"]'), "start thesis")
    assert refusal.message.startswith("the hub refused to start thesis")


# ---------------------------------------------------------------- launch


async def test_launching_a_project_you_do_not_have_says_how_to_create_it(servers, hub):
    with pytest.raises(Refusal) as e:
        await servers.launch(OWNER, "thesis")
    assert e.value.status == 404 and "`project init thesis`" in e.value.message
    assert hub.calls == []


async def test_creating_a_project_that_exists_is_a_409(servers, hub, images):
    own(images)
    with pytest.raises(Refusal) as e:
        await servers.launch(OWNER, "thesis", project_type="pytorch", create=True)
    assert e.value.status == 409 and "`project launch thesis`" in e.value.message
    assert hub.calls == []


@pytest.mark.parametrize("name", ["Thesis", "a--b", "thesis-", "9lives", "x" * 31, "a/b", ""])
async def test_an_invalid_project_name_is_a_400(servers, hub, name):
    with pytest.raises(Refusal) as e:
        await servers.launch(OWNER, name, create=True)
    assert e.value.status == 400 and "invalid project name" in e.value.message
    assert hub.calls == []


async def test_launching_a_project_that_runs_already_starts_nothing(servers, hub, images):
    own(images)
    hub.servers = {"thesis": READY}
    result = await servers.launch(OWNER, "thesis")
    assert (result["status"], result["server"]) == ("running", "thesis")
    assert result["url"] == "/user/alice/thesis/"
    assert hub.posts == []


async def test_a_project_running_in_the_default_server_is_found_there(servers, hub, images):
    own(images)
    hub.servers = {"": {"ready": True, "user_options": {"project": "thesis"}}}
    result = await servers.launch(OWNER, "thesis")
    assert (result["status"], result["server"]) == ("running", "")
    assert hub.posts == []


async def test_launching_a_project_that_is_stopping_is_a_409(servers, hub, images):
    own(images)
    hub.servers = {"thesis": {"ready": True, "pending": "stop"}}
    with pytest.raises(Refusal) as e:
        await servers.launch(OWNER, "thesis")
    assert e.value.status == 409 and "stopping" in e.value.message
    assert hub.posts == []


async def test_launch_asks_the_hub_for_the_projects_named_server(servers, hub, images):
    own(images)
    await servers.launch(OWNER, "thesis", project_type="pytorch")
    assert hub.posts == [("users/alice/servers/thesis", {"user_options": {"project": "thesis"}})]


async def test_create_asks_for_the_type_too(servers, hub):
    await servers.launch(OWNER, "thesis", project_type="pytorch", create=True)
    ((_, body),) = hub.posts
    assert body == {"user_options": {"project": "thesis", "type": "pytorch"}}


@pytest.mark.parametrize(("gpus", "sent"), [(2, 2), ("1", "1"), ("mig", "mig")])
async def test_the_gpus_asked_for_are_passed_on(servers, hub, images, gpus, sent):
    own(images)
    await servers.launch(OWNER, "thesis", gpus=gpus)
    ((_, body),) = hub.posts
    assert body["user_options"] == {"project": "thesis", "gpus": sent}


@pytest.mark.parametrize("gpus", [0, "0", "", None])
async def test_no_gpus_asked_for_sends_no_gpus(servers, hub, images, gpus):
    own(images)
    await servers.launch(OWNER, "thesis", gpus=gpus)
    ((_, body),) = hub.posts
    assert "gpus" not in body["user_options"]


@pytest.mark.parametrize(("code", "status"), [(201, "ready"), (202, "starting")])
async def test_the_hubs_answer_says_whether_the_server_is_up(servers, hub, images, code, status):
    own(images)
    hub.code = code
    result = await servers.launch(OWNER, "thesis")
    assert result["status"] == status
    assert result["url"] == "/user/alice/thesis/"


async def test_the_spawners_refusal_comes_back_as_it_is(servers, hub, images):
    own(images)
    hub.refusal = hub_message(400, "over your GPU limit")
    with pytest.raises(Refusal) as e:
        await servers.launch(OWNER, "thesis", gpus=8)
    assert (e.value.status, e.value.message) == (400, "over your GPU limit")


@pytest.mark.parametrize("gpus", ["lots", True, -1, 2.0, "²", [1]])
async def test_a_bad_gpus_value_is_a_400_before_any_hub_call(servers, hub, images, gpus):
    own(images)
    with pytest.raises(Refusal) as e:
        await servers.launch(OWNER, "thesis", gpus=gpus)
    assert e.value.status == 400 and "gpus must be" in e.value.message
    assert hub.calls == []


async def test_a_type_that_is_not_text_is_a_400(servers, hub):
    with pytest.raises(Refusal) as e:
        await servers.launch(OWNER, "thesis", project_type=["pytorch"], create=True)
    assert e.value.status == 400 and hub.calls == []


class FakeBuild:
    """A rebuild of the project's image, running until the test ends it."""

    def __init__(self, error: BuildError | None = None) -> None:
        self.done = asyncio.Event()
        self.error = error

    async def wait(self) -> None:
        await self.done.wait()
        if self.error:
            raise self.error


async def test_a_launch_waits_for_the_running_rebuild_of_its_image(servers, hub, images):
    own(images)
    images.build = FakeBuild()
    launch = asyncio.create_task(servers.launch(OWNER, "thesis"))
    await asyncio.sleep(0.01)
    assert hub.posts == [] and not launch.done()
    images.build.done.set()
    assert (await launch)["status"] == "starting"
    assert len(hub.posts) == 1


async def test_a_failed_rebuild_stops_the_launch_with_a_409(servers, hub, images):
    own(images)
    images.build = FakeBuild(BuildError("pip could not find peft==99", []))
    launch = asyncio.create_task(servers.launch(OWNER, "thesis"))
    await asyncio.sleep(0.01)
    images.build.done.set()
    with pytest.raises(Refusal) as e:
        await launch
    assert e.value.status == 409 and "peft==99" in e.value.message
    assert hub.posts == []


# ---------------------------------------------------------------- the server's address


async def test_the_url_is_the_servers_path_under_the_hubs_base_url(hub, images):
    own(images, owner="a b")
    hub.code = 201
    for base in ("/jh/", "/jh"):
        result = await ServerManager(hub, images, base).launch("a b", "thesis")
        assert result["url"] == "/jh/user/a%20b/thesis/"
    assert hub.posts[0][0] == "users/a%20b/servers/thesis"


# ---------------------------------------------------------------- retire


async def test_retiring_with_nothing_running_and_nothing_to_save_is_a_409(servers, hub, images):
    own(images)
    with pytest.raises(Refusal) as e:
        await servers.retire(OWNER, "thesis")
    assert e.value.status == 409 and "no running server" in e.value.message
    assert hub.stopped == []


async def test_retiring_a_project_you_do_not_have_is_a_404(servers, hub):
    with pytest.raises(Refusal) as e:
        await servers.retire(OWNER, "thesis")
    assert e.value.status == 404 and hub.calls == []


async def test_retire_stops_every_server_running_the_project(servers, hub, images):
    own(images)
    hub.servers = {
        "thesis": READY,
        "": {"ready": True, "user_options": {"project": "thesis"}},
        "other": READY,
    }
    result = await servers.retire(OWNER, "thesis")
    assert sorted(hub.stopped) == [(OWNER, ""), (OWNER, "thesis")]
    assert sorted(result["stopped"]) == ["", "thesis"]
    assert "other" in hub.servers
    assert result["saved"] == [] and result["rebuilding"] is False
    assert images.added == [] and images.rebuilt == []


async def test_a_hub_refusal_to_stop_comes_back_with_its_status(servers, hub, images):
    own(images)
    hub.servers = {"thesis": READY}
    hub.refusal = hub_message(403, "not allowed to stop")
    with pytest.raises(Refusal) as e:
        await servers.retire(OWNER, "thesis")
    assert (e.value.status, e.value.message) == (403, "not allowed to stop")


async def test_retire_keeps_the_sessions_packages_and_rebuilds(servers, hub, images):
    own(images)
    hub.servers = {"thesis": READY}
    record_lost(images, ["peft==0.13.2", "einops"])
    result = await servers.retire(OWNER, "thesis", save_packages=True, rebuild=True)
    assert images.added == [("thesis", ["peft==0.13.2", "einops"])]
    assert images.rebuilt == ["thesis"]
    assert result["saved"] == ["peft==0.13.2", "einops"] and result["rebuilding"] is True
    assert "Added to the image: peft==0.13.2, einops." in result["message"]
    assert "being rebuilt" in result["message"]


async def test_retire_keeps_the_packages_without_a_rebuild_when_told(servers, hub, images):
    own(images)
    hub.servers = {"thesis": READY}
    record_lost(images, ["einops"])
    result = await servers.retire(OWNER, "thesis", save_packages=True, rebuild=False)
    assert images.added == [("thesis", ["einops"])] and images.rebuilt == []
    assert result["rebuilding"] is False and "rebuilt" not in result["message"]


async def test_saving_packages_needs_no_running_server(servers, hub, images):
    own(images)
    record_lost(images, ["einops"])
    result = await servers.retire(OWNER, "thesis", save_packages=True)
    assert hub.stopped == [] and result["stopped"] == []
    assert images.added == [("thesis", ["einops"])]
    assert "nothing was running" in result["message"]


async def test_retire_without_save_leaves_the_record_alone(servers, hub, images):
    own(images)
    hub.servers = {"thesis": READY}
    record_lost(images, ["einops"])
    result = await servers.retire(OWNER, "thesis", rebuild=True)
    assert images.added == [] and images.rebuilt == [] and result["saved"] == []
    assert "Added to the image" not in result["message"]


async def test_retire_says_when_the_session_installed_nothing(servers, hub, images):
    own(images)
    hub.servers = {"thesis": READY}
    result = await servers.retire(OWNER, "thesis", save_packages=True, rebuild=True)
    assert "installed no packages" in result["message"]
    assert images.added == [] and images.rebuilt == [] and result["rebuilding"] is False


# ---------------------------------------------------------------- act, as the handler calls it


@pytest.mark.parametrize(
    ("args", "rebuilt"),
    [
        ({"save_packages": True}, ["thesis"]),
        ({"save_packages": "on"}, ["thesis"]),
        ({"save_packages": True, "rebuild": False}, []),
    ],
)
async def test_saving_packages_rebuilds_unless_told_not_to(servers, hub, images, args, rebuilt):
    own(images)
    hub.servers = {"thesis": READY}
    record_lost(images, ["einops"])
    await servers.act(OWNER, "thesis", "retire", args)
    assert images.rebuilt == rebuilt


async def test_act_launch_reads_create_and_type_as_a_form_sends_them(servers, hub):
    await servers.act(OWNER, "thesis", "launch", {"create": "on", "type": "pytorch"})
    ((_, body),) = hub.posts
    assert body == {"user_options": {"project": "thesis", "type": "pytorch"}}


async def test_an_unknown_server_action_is_a_404(servers, images):
    own(images)
    with pytest.raises(Refusal) as e:
        await servers.act(OWNER, "thesis", "explode", {})
    assert e.value.status == 404


# ---------------------------------------------------------------- progress


async def test_progress_follows_the_server_that_runs_the_project(servers, hub, images):
    own(images)
    hub.servers = {"": {"pending": "spawn", "user_options": {"project": "thesis"}}}
    assert await servers.progress_path(OWNER, "thesis") == "users/alice/server/progress"
    hub.servers["thesis"] = {"pending": "spawn"}
    assert await servers.progress_path(OWNER, "thesis") == "users/alice/servers/thesis/progress"


async def test_progress_of_a_project_that_runs_nowhere_is_its_named_servers(servers, images):
    """A start that failed at once: the hub's events of the named server say why."""
    own(images)
    assert await servers.progress_path(OWNER, "thesis") == "users/alice/servers/thesis/progress"


async def test_progress_of_a_project_you_do_not_have_is_a_404(servers, hub):
    with pytest.raises(Refusal) as e:
        await servers.progress_path(OWNER, "thesis")
    assert e.value.status == 404 and hub.calls == []


def test_a_user_follows_a_few_starts_at_a_time(servers):
    with contextlib.ExitStack() as held:
        for _ in range(MAX_PROGRESS_STREAMS):
            held.enter_context(servers.progress_stream(OWNER))
        with pytest.raises(Refusal) as e, servers.progress_stream(OWNER):
            pass
        assert e.value.status == 429
        with servers.progress_stream("bob"):
            pass  # another user's count is their own
    with servers.progress_stream(OWNER):
        pass  # closed streams are counted no more


# ---------------------------------------------------------------- the hub's event streams


class _Progress(web.RequestHandler):
    def get(self, server: str) -> None:
        if server != "thesis":
            self.set_status(404)
            self.finish({"status": 404, "message": f"alice has no server named {server}"})
            return
        self.set_header("Content-Type", "text/event-stream")
        self.finish('data: {"progress": 50}\n\ndata: {"ready": true}\n\n')


@pytest.fixture
async def stream_hub():
    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(
        web.Application([(r"/hub/api/users/alice/servers/(.*)/progress", _Progress)])
    )
    server.add_sockets([sock])
    yield HubClient(f"http://127.0.0.1:{port}/hub/api", "token")
    server.stop()


async def test_a_hub_stream_hands_on_a_200s_body(stream_hub):
    chunks: list[bytes] = []
    await stream_hub.stream("users/alice/servers/thesis/progress", chunks.append, 10)
    assert b"".join(chunks) == b'data: {"progress": 50}\n\ndata: {"ready": true}\n\n'


async def test_a_hub_refusal_of_a_stream_is_its_message_not_its_body(stream_hub):
    chunks: list[bytes] = []
    with pytest.raises(Refusal) as refused:
        await stream_hub.stream("users/alice/servers/gone/progress", chunks.append, 10)
    assert refused.value.status == 404
    assert refused.value.message == "alice has no server named gone"
    assert chunks == [], "nothing of the error page reaches the reader's event stream"


async def test_a_hub_that_does_not_answer_is_a_502():
    sock, port = bind_unused_port()
    sock.close()
    hub = HubClient(f"http://127.0.0.1:{port}/hub/api", "token")
    with pytest.raises(Refusal) as refused:
        await hub.call("GET", "users/alice")
    assert refused.value.status == 502 and "did not answer" in refused.value.message
    with pytest.raises(Refusal) as refused:
        await hub.stream("users/alice/servers/thesis/progress", lambda chunk: None, 10)
    assert refused.value.status == 502


async def test_a_launch_right_after_a_retire_waits_for_its_saved_packages(servers, hub, images):
    own(images)
    record_lost(images, ["ds01probe==1.0"])
    hub.servers = {"thesis": READY}
    slow = asyncio.Event()
    order: list[str] = []

    async def stop_slowly(user: str, server: str, timeout: float = 60) -> None:
        await slow.wait()  # the container takes its time to go
        hub.servers.pop(server, None)
        order.append("stopped")

    hub.stop_server = stop_slowly
    retire = asyncio.ensure_future(servers.act(OWNER, "thesis", "retire", {"save_packages": True}))
    launch = asyncio.ensure_future(servers.act(OWNER, "thesis", "launch", {}))
    await asyncio.sleep(0.05)
    assert hub.posts == [], "the launch waits while the retire runs"
    slow.set()
    await asyncio.gather(retire, launch)
    assert order == ["stopped"] and images.added == [("thesis", ["ds01probe==1.0"])]
    assert images.rebuilt == ["thesis"] and len(hub.posts) == 1, "then it starts"
    assert images.by == OWNER, "the audit trail says who saved the packages"
