"""Hostile input at the image-update service's edges: hub API paths built from
user names, JSON bodies, package edits that must not stall the event loop, the
page's rules, and refusals that reach the client with their own status."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import pytest
from jupyterhub.services.auth import HubOAuth
from tornado import httpserver, web
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.testing import bind_unused_port

from ds01_spawner.dockerfile import ManagedPackages, render_managed
from ds01_spawner.errors import Refusal
from ds01_spawner.ledger import Holder
from ds01_spawner.limits import PolicyStore
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.projects import Project
from ds01_spawner.service import image_manager as manager_module
from ds01_spawner.service.base import (
    MAX_BODY_BYTES,
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    BaseHandler,
    json_shape_problem,
    parse_json_object,
)
from ds01_spawner.service.hub_api import HubClient, server_path, user_path
from ds01_spawner.service.image_manager import ImageManager, package_edit
from ds01_spawner.service.retirer import Retirer
from ds01_spawner.settings import DS01Settings

# ---------------------------------------------------------------- hub API paths


@pytest.mark.parametrize(
    ("user", "path"),
    [
        ("alice", "users/alice"),
        ("bob#x", "users/bob%23x"),
        ("a/b", "users/a%2Fb"),
        ("é", "users/%C3%A9"),
        ("x?y", "users/x%3Fy"),
        ("..", "users/.."),  # one segment still: the hub finds no such user
        ("a b", "users/a%20b"),
    ],
)
def test_a_user_name_is_one_quoted_path_segment(user, path):
    assert user_path(user) == path


def test_a_server_name_is_quoted_too():
    assert server_path("bob#x", "my/server?") == "users/bob%23x/servers/my%2Fserver%3F"


def test_the_default_server_has_its_own_path():
    assert server_path("bob#x", "") == "users/bob%23x/server"


# ---------------------------------------------------------------- JSON bodies


def nested(depth: int) -> bytes:
    return ('{"add_pip": ' + "[" * depth + "]" * depth + "}").encode()


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_a_body_nested_too_deeply_is_a_400_not_a_recursion_error(depth):
    started = time.perf_counter()
    with pytest.raises(web.HTTPError) as e:
        parse_json_object(nested(depth))
    assert e.value.status_code == 400 and "nested too deeply" in e.value.log_message
    assert time.perf_counter() - started < 0.5


def test_unclosed_brackets_are_refused_without_parsing():
    with pytest.raises(web.HTTPError, match="nested too deeply"):
        parse_json_object(b"[" * MAX_BODY_BYTES)


def test_a_body_within_the_depth_is_parsed():
    body = {"add_pip": ["numpy"], "x": {"a": [[{"b": [1]}]]}}
    assert parse_json_object(json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": "[[[[[[[[[[[[[[[["}',
        b'{"a": "\\"[[[[[[[[[[[[[[[["}',  # an escaped quote does not end the string
        b'{"a": "\\\\", "b": [1]}',  # nor does an escaped backslash start one
    ],
)
def test_brackets_inside_strings_do_not_count(body):
    assert json_shape_problem(body, max_depth=2) is None
    assert parse_json_object(body) == json.loads(body)


def test_brackets_after_an_escaped_backslash_count():
    assert "nested too deeply" in json_shape_problem(b'{"a": "\\\\", "b": [[[1]]]}', max_depth=3)


def test_a_body_of_thousands_of_small_lists_is_a_400():
    """json.loads would allocate them all, a pause of the event loop."""
    body = b'{"add_pip": [' + b"[]," * 80_000 + b"[]]}"
    with pytest.raises(web.HTTPError, match=f"more than {MAX_JSON_CONTAINERS} arrays"):
        parse_json_object(body)


@pytest.mark.parametrize(
    ("body", "says"),
    [(b"[]", "JSON object"), (b"{", "must be JSON"), (b"\xff", "must be JSON")],
)
def test_other_bad_bodies_are_400s(body, says):
    with pytest.raises(web.HTTPError, match=says):
        parse_json_object(body)


def test_unknown_fields_are_refused():
    with pytest.raises(web.HTTPError, match="unknown field 'image'"):
        parse_json_object(b'{"image": "evil"}', frozenset({"add_pip"}))


WORST_BODIES = {
    "empty lists": b"[]" * (MAX_BODY_BYTES // 2),
    "closing brackets": b"]" * MAX_BODY_BYTES,
    "escaped quotes": b'["' + b'\\"' * (MAX_BODY_BYTES // 2 - 2) + b'"]',
    "quotes": b'"' * MAX_BODY_BYTES,
    "short strings": b"[" + b'"a",' * (MAX_BODY_BYTES // 4 - 1) + b'"a"]',
}


@pytest.mark.parametrize("body", WORST_BODIES.values(), ids=WORST_BODIES.keys())
def test_reading_a_256_kb_body_is_quick(body):
    started = time.perf_counter()
    with pytest.raises(web.HTTPError) as e:
        parse_json_object(body)
    assert e.value.status_code == 400
    assert time.perf_counter() - started < 0.2


# ---------------------------------------------------------------- package edits


@pytest.fixture
def manager(tmp_path, monkeypatch) -> ImageManager:
    # ImageManager makes an APIClient, which asks the engine its version; edits never use it
    monkeypatch.setattr(docker, "APIClient", lambda **kwargs: None)
    settings = DS01Settings(
        workspace_root=str(tmp_path / "workspaces"),
        workspace_template="{workspace_root}/{user}/{project}",
        state_dir=str(tmp_path / "state"),
    )
    return ImageManager(settings, HubClient("http://127.0.0.1:1/hub/api", ""))


@pytest.fixture
def project(manager) -> Project:
    project = Project("alice", "thesis", "base", 0.0)
    workspace = manager._workspace(project)
    workspace.mkdir(parents=True)
    (workspace / "Dockerfile").write_text(render_managed("FROM scratch\n", ManagedPackages()))
    if os.geteuid() == 0:  # the service refuses a workspace owned by root
        os.chown(workspace, 1000, 1000)
    return project


async def max_loop_gap(work: Awaitable[Any]) -> tuple[float, Any]:
    """The longest the event loop went without running a 1 ms ticker while
    `work` ran, and what `work` returned (or raised)."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    try:
        outcome: Any = await work
    except Refusal as e:
        outcome = e
    done.set()
    await task
    return max(gaps), outcome


HUGE_BODIES = {
    "1,500 pip names": {"add_pip": [f"pkg{i}" for i in range(1500)]},
    "1,500 apt names to remove": {"remove_apt": [f"lib{i}" for i in range(1500)]},
    "a 40 KB line of spaces": {"requirements": " " * 40_000 + "\n"},
    "a 40 KB line of '= '": {"requirements": "= " * 20_000},
    "250 KB of package lines": {"requirements": "numpy>=1.24  # arrays\n" * 11_000},
    "250 KB of blank lines": {"requirements": "\n" * 250_000},
    "250 KB of comment lines": {"requirements": "# a comment line\n" * 15_000},
}


@pytest.mark.parametrize("body", HUGE_BODIES.values(), ids=HUGE_BODIES.keys())
async def test_a_huge_body_leaves_the_event_loop_responsive(manager, project, body):
    gap, outcome = await max_loop_gap(manager.update_packages(project, **body))
    assert gap < 0.2, f"the event loop stalled {gap * 1000:.0f} ms"
    if isinstance(outcome, Refusal):
        assert outcome.status == 400 and outcome.message


async def test_package_edits_run_off_the_event_loop(manager, project, monkeypatch):
    """However long validation takes, it takes it on a thread."""

    def slow_requirements(text: str, **kwargs: Any) -> list[str]:
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:  # CPU work, holding the GIL in turns
            pass
        return ["numpy"]

    monkeypatch.setattr(manager_module, "parse_requirements_text", slow_requirements)
    gap, packages = await max_loop_gap(manager.update_packages(project, requirements="numpy"))
    assert packages.pip == ("numpy",)
    assert gap < 0.2, f"the event loop stalled {gap * 1000:.0f} ms"


async def test_concurrent_edits_of_one_project_all_land(manager, project):
    names = [f"pkg{i}" for i in range(8)]
    await asyncio.gather(*(manager.update_packages(project, add_pip=[n]) for n in names))
    final = await manager.update_packages(project)
    assert sorted(final.pip) == sorted(names)


# ---------------------------------------------------------------- the page's rules


class FakeEngine:
    """The engine calls `ImageManager` makes while deleting a project."""

    def __init__(self, images: dict[str, dict] | None = None) -> None:
        self.images = dict(images or {})
        self.removed: list[str] = []

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "inspect_image":
            if args[0] not in self.images:
                raise docker.errors.ImageNotFound(args[0])
            return self.images[args[0]]
        if method == "containers":
            return []
        if method == "remove_image":
            del self.images[args[0]]
            self.removed.append(args[0])
            return None
        raise AssertionError(f"unexpected engine call {method}")


class FakeHub:
    def __init__(self, servers: dict[str, dict] | None = None) -> None:
        self.servers = servers or {}
        self.calls: list[tuple[str, str, Any]] = []

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        self.calls.append((method, path, body))
        return {"name": "alice", "servers": self.servers} if method == "GET" else None


@pytest.fixture
def deletable(manager, project, monkeypatch) -> tuple[ImageManager, Project, FakeEngine]:
    """alice's project "thesis", recorded, built twice, stopped."""
    manager.store.save(manager.store.slug("alice"), project)
    engine = FakeEngine(
        {
            "ds01-alice/thesis:latest": {"Id": "sha256:new", "Size": 300, "Config": {}},
            "ds01-alice/thesis:previous": {"Id": "sha256:old", "Size": 200, "Config": {}},
        }
    )
    monkeypatch.setattr(manager, "_docker", engine)
    monkeypatch.setattr(manager, "hub", FakeHub())
    return manager, project, engine


def unchanged(manager: ImageManager, engine: FakeEngine) -> bool:
    return (
        engine.removed == []
        and manager.store.get("alice", "thesis") is not None
        and (manager._workspace(Project("alice", "thesis", "base", 0.0)) / "Dockerfile").exists()
    )


async def test_only_the_owner_or_an_admin_deletes_a_project(deletable):
    manager, project, engine = deletable
    with pytest.raises(Refusal) as e:
        await manager.delete(project, by_admin=False, by="bob", confirm="thesis")
    assert e.value.status == 403 and unchanged(manager, engine)


async def test_the_owner_deletes_a_project_and_its_workspace_is_kept(deletable):
    manager, project, engine = deletable
    workspace = manager._workspace(project)
    result = await manager.delete(project, by_admin=False, by="alice", confirm="thesis")
    assert engine.removed == ["ds01-alice/thesis:latest", "ds01-alice/thesis:previous"]
    assert manager.store.get("alice", "thesis") is None
    assert (workspace / "Dockerfile").exists() and result["workspace"] == "kept"
    assert (
        result["message"] == "Project thesis deleted: its images are gone; its workspace is kept."
    )
    assert ("DELETE", "users/alice/servers/thesis", {"remove": True}) in manager.hub.calls


async def test_deleting_a_project_is_in_the_audit_trail(deletable):
    from ds01_spawner.audit import read_events

    manager, project, _ = deletable
    await manager.act(project, "delete", {"confirm": "thesis"}, by_admin=False, by="alice")
    events = list(read_events(manager.settings.state_dir, kinds=["image"]))
    assert [(e["image"], e["reason"], e["bytes"], e["by"]) for e in events] == [
        ("ds01-alice/thesis:latest", "project_deleted", 300, "alice"),
        ("ds01-alice/thesis:previous", "project_deleted", 200, "alice"),
    ]


async def test_an_admin_deletes_anyones_project(deletable):
    manager, project, engine = deletable
    await manager.delete(project, by_admin=True, by="root", confirm="thesis")
    assert len(engine.removed) == 2 and manager.store.get("alice", "thesis") is None


async def test_the_policy_can_archive_a_deleted_projects_workspace(deletable, monkeypatch):
    manager, project, _ = deletable
    monkeypatch.setattr(manager, "workspace_on_delete", lambda: "archive")
    workspace = manager._workspace(project)
    result = await manager.delete(project, by_admin=False, by="alice", confirm="thesis")
    archived = Path(result["workspace_path"])
    assert not workspace.exists() and (archived / "Dockerfile").exists()
    assert archived.parent == Path(manager.settings.workspace_root) / ".archive" / "alice"
    assert archived.name.startswith("thesis-") and result["workspace"] == "archived"


@pytest.mark.parametrize(
    "servers",
    [
        {"thesis": {"ready": True}},
        {"thesis": {"ready": False, "pending": "spawn"}},
        {"": {"ready": True, "user_options": {"project": "thesis"}}},
    ],
    ids=["running", "starting", "the default server runs it"],
)
async def test_a_project_that_runs_or_starts_is_not_deleted(deletable, servers):
    manager, project, engine = deletable
    manager.hub.servers = servers
    with pytest.raises(Refusal, match="stop the project's server") as e:
        await manager.delete(project, by_admin=False, by="alice", confirm="thesis")
    assert e.value.status == 409 and unchanged(manager, engine)


@pytest.mark.parametrize("confirm", [None, "", "thesi", "THESIS", ["thesis"]])
async def test_deleting_a_project_needs_its_name_typed(deletable, confirm):
    manager, project, engine = deletable
    with pytest.raises(Refusal, match="type the project's name") as e:
        await manager.delete(project, by_admin=False, by="alice", confirm=confirm)
    assert e.value.status == 400 and unchanged(manager, engine)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"requirements": ["numpy"]}, "requirements must be text"),
        ({"add_pip": [1, 2]}, "lists of strings"),
        ({"remove_apt": {"vim": 1}}, "lists of strings"),
    ],
)
def test_a_package_edit_of_the_wrong_shape_is_a_400(args, says):
    with pytest.raises(Refusal, match=says) as e:
        package_edit(args)
    assert e.value.status == 400


def test_a_form_textarea_is_read_as_lines():
    edit = package_edit({"add_pip": "numpy\n\n  pandas  \n", "requirements": None})
    assert edit["add_pip"] == ["numpy", "pandas"] and edit["requirements"] == ""


async def test_an_unknown_action_is_a_404(manager, project):
    with pytest.raises(Refusal) as e:
        await manager.act(project, "explode", {}, by_admin=True)
    assert e.value.status == 404


async def test_a_rebuild_while_one_runs_follows_it(manager, project, monkeypatch):
    running = SimpleNamespace(done=asyncio.Event(), spec=SimpleNamespace(image="ds01-alice/x"))
    monkeypatch.setattr(manager, "current_build", lambda project: running)
    (manager._workspace(project) / "Dockerfile").unlink()  # not read again
    result = await manager.act(project, "rebuild", {"nocache": "on"}, by_admin=False)
    assert result["message"] == "A build of this image is already running."


# ---------------------------------------------------------------- refusals over HTTP


class Refuses(BaseHandler):
    def get_current_user(self) -> dict[str, Any]:
        return {"name": "alice", "scopes": []}

    async def get(self) -> None:
        raise Refusal("stop the project's server <first>", status=409)


async def fetch(path: str) -> HTTPResponse:
    app = web.Application([(r"/p/(?:api/)?refused", Refuses)], ds01=SimpleNamespace(prefix="/p/"))
    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    try:
        return await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", raise_error=False)
    finally:
        server.stop()


async def test_a_refusal_is_its_own_status_as_json_under_api():
    r = await fetch("/p/api/refused")
    assert r.code == 409
    assert json.loads(r.body) == {"status": 409, "message": "stop the project's server <first>"}


async def test_a_refusal_is_its_own_status_on_a_page_escaped():
    r = await fetch("/p/refused")
    assert r.code == 409 and b"&lt;first&gt;" in r.body and b"<first>" not in r.body
    assert r.headers["X-Frame-Options"] == "DENY"


SERVICE_ACCESS = "access:services!service=ds01"
HUB_TOKENS = {
    "token alice": {"name": "alice", "kind": "user", "scopes": [SERVICE_ACCESS]},
    "token no-access": {"name": "bob", "kind": "user", "scopes": ["self"]},
}


class FakeHubUser(BaseHTTPRequestHandler):
    """The hub's GET /hub/api/user: who a token belongs to, or a 403 for one it does not know.

    On a thread of its own: the hub's auth checks a token synchronously, blocking the
    service's event loop until the hub answers.
    """

    def do_GET(self) -> None:
        model = HUB_TOKENS.get(self.headers.get("Authorization", ""))
        body = json.dumps(model or {"status": 403, "message": "invalid token"}).encode()
        self.send_response(200 if model else 403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hub_api_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubUser)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hub/api"
    server.shutdown()
    server.server_close()
    thread.join()


class Mine(BaseHandler):
    """A handler signed in through the hub, as the service's are."""

    def initialize(self, hub_auth: HubOAuth) -> None:
        self.hub_auth = hub_auth

    @web.authenticated
    async def get(self) -> None:
        self.write_json({"name": self.current_user["name"]})


async def fetch_signed_in(hub_api_url: str, path: str, token: str = "") -> HTTPResponse:
    """`path` of a service signed in through the hub at `hub_api_url`, with `token` if given."""
    auth = HubOAuth(
        api_url=hub_api_url,
        api_token="service-token",
        access_scopes={SERVICE_ACCESS},
        oauth_client_id="service-ds01",
        oauth_redirect_uri="/p/oauth_callback",
        hub_prefix="/hub/",
    )
    app = web.Application(
        [(r"/p/(?:api/)?mine", Mine, {"hub_auth": auth})],
        ds01=SimpleNamespace(prefix="/p/"),
        cookie_secret="test-secret",
    )
    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    headers = {"Authorization": f"token {token}"} if token else {}
    try:
        return await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}{path}",
            headers=headers,
            follow_redirects=False,
            raise_error=False,
        )
    finally:
        server.stop()


@pytest.mark.parametrize("token", ["forged", "no-access"])
async def test_an_api_request_with_a_token_the_hub_refuses_is_a_403_not_a_login_page(
    hub_api_url, token
):
    r = await fetch_signed_in(hub_api_url, "/p/api/mine", token)
    assert r.code == 403 and "Location" not in r.headers
    assert r.headers["Content-Type"] == "application/json"
    body = json.loads(r.body)
    assert body["status"] == 403 and "did not accept this token" in body["message"]


async def test_an_api_request_with_no_token_at_all_goes_to_sign_in_like_a_page(hub_api_url):
    # a page's script without the service's cookie yet: the hub's OAuth sets it
    r = await fetch_signed_in(hub_api_url, "/p/api/mine")
    assert r.code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]


async def test_a_page_without_a_sign_in_still_goes_to_the_hubs_login(hub_api_url):
    r = await fetch_signed_in(hub_api_url, "/p/mine")
    assert r.code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]


async def test_an_api_request_with_a_valid_token_is_answered(hub_api_url):
    r = await fetch_signed_in(hub_api_url, "/p/api/mine", "alice")
    assert r.code == 200 and json.loads(r.body) == {"name": "alice"}


# ---------------------------------------------------------------- the limits page's data


@pytest.fixture
def retirer(tmp_path, monkeypatch) -> Retirer:
    monkeypatch.setattr(docker, "APIClient", lambda **kwargs: None)
    return Retirer(
        HubClient("http://127.0.0.1:1/hub/api", ""), PolicyStore(""), None, str(tmp_path)
    )


@pytest.fixture
def surveys(retirer, monkeypatch) -> list[float]:
    """alice runs a server on a busy GPU; the list grows by one at each survey."""
    seen: list[float] = []

    async def hub_users() -> list[dict[str, Any]]:
        seen.append(time.time())
        started = {"ready": True, "started": "2024-01-01T00:00:00Z"}
        return [{"name": "alice", "servers": {"": started}}]

    async def containers() -> dict:
        return {}

    async def gpu_facts() -> tuple:
        slot = GpuSlot("GPU-1", "0", "A100", 80, 40, utilization=99)
        return [slot], 1.0, {("alice", ""): [Holder("GPU-1", "alice", "p", "", "")]}

    for fake in (hub_users, containers, gpu_facts):
        monkeypatch.setattr(retirer, fake.__name__, fake)
    return seen


async def test_before_the_first_check_a_page_view_surveys_and_records_nothing(retirer, surveys):
    (view,) = (await retirer.latest()).servers
    assert view.facts.gpu_busy_at is not None and len(surveys) == 1
    assert retirer.last is None and retirer.gpu_busy_at == {}, "the loop's bookkeeping"


async def test_page_views_share_one_survey_and_leave_the_loops_record_alone(retirer, surveys):
    now = [1000.0]
    retirer.clock = lambda: now[0]
    first = await retirer.latest()
    now[0] += 1.5
    assert await retirer.latest() is first and len(surveys) == 1, "a burst costs one survey"
    now[0] += 1.0
    assert await retirer.latest() is not first and len(surveys) == 2, "then it is fresh again"
    assert retirer.last is None and retirer.gpu_busy_at == {}, "the loop's bookkeeping"


async def test_a_hub_call_without_a_token_is_a_503():
    with pytest.raises(Refusal) as e:
        await HubClient("http://127.0.0.1:1/hub/api", "").call("GET", "users")
    assert e.value.status == 503
