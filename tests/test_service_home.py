"""The hub's home page and its data (``api/home``): who may read whose projects, what the
sign-in hands back, bounded work for many projects, and the hub template's override.
A recording stand-in for the hub and the engine; no hub process, no Docker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PrefixLoader
from jupyterhub.app import JupyterHub
from jupyterhub.services.auth import HubOAuth
from tornado import httpserver, web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.testing import bind_unused_port

from ds01_spawner import labels
from ds01_spawner.builds import BuildRecords
from ds01_spawner.configure import ADMIN_SCOPE, HUB_TEMPLATES, with_hub_templates
from ds01_spawner.dockerfile import ManagedPackages, render_managed
from ds01_spawner.errors import Refusal
from ds01_spawner.gpuqueue import QueueFile, Waiter
from ds01_spawner.images import image_ref
from ds01_spawner.ledger import Holder
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.projects import Project
from ds01_spawner.retirement import Notices
from ds01_spawner.service import overview as overview_module
from ds01_spawner.service.home_page import HomeDataHandler, HomeSignInHandler
from ds01_spawner.service.hub_api import HubClient
from ds01_spawner.service.image_manager import ImageManager
from ds01_spawner.service.overview import MAX_LISTED, Overview
from ds01_spawner.settings import DS01Settings

REPO = Path(__file__).resolve().parent.parent
NOW = time.time()


class FakeHub:
    """GET users/{name}: the servers given; any other user is unknown (404)."""

    def __init__(self, servers: dict[str, dict[str, Any]] | None = None) -> None:
        self.servers = servers or {}
        self.calls: list[str] = []

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        self.calls.append(f"{method} {path}")
        if path in ("users/alice", "users/bob"):
            return {"name": path[6:], "groups": [], "servers": self.servers}
        response = HTTPResponse(HTTPRequest("http://hub/hub/api/x"), 404)
        raise HTTPClientError(404, response=response)


class FakeEngine:
    """The one engine call the home makes: list the owner's images."""

    def __init__(self, images: list[dict[str, Any]] | None = None) -> None:
        self.listed = images or []
        self.calls = 0

    def images(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls += 1
        return self.listed


class FakeAllocator:
    def __init__(self, holders: list[Holder] | None = None) -> None:
        self.holders = holders or []
        self.reads = 0

    async def state(self) -> tuple[list[GpuSlot], list[Holder]]:
        self.reads += 1
        return [GpuSlot(f"GPU-{i}", str(i), "A100", 80, 0, 0) for i in range(2)], self.holders


@pytest.fixture
def settings(tmp_path) -> DS01Settings:
    return DS01Settings(
        workspace_root=str(tmp_path / "workspaces"),
        state_dir=str(tmp_path / "state"),
        project_types_dir=str(REPO / "images" / "types"),
        policy={"defaults": {"max_gpus": 2}},
    )


@pytest.fixture
def parts(settings, monkeypatch) -> SimpleNamespace:
    monkeypatch.setattr(docker, "APIClient", lambda **kwargs: None)
    hub = FakeHub()
    manager = ImageManager(settings, HubClient("http://127.0.0.1:1/hub/api", ""))
    manager.hub = hub
    engine = FakeEngine()
    manager.client = engine
    allocator = FakeAllocator()
    overview = Overview(manager, hub, settings, allocator, prefix="/p/")
    return SimpleNamespace(
        hub=hub, manager=manager, engine=engine, allocator=allocator, overview=overview
    )


def record(manager: ImageManager, name: str, last_used: float = 0.0, owner: str = "alice"):
    project = Project(owner, name, "base", 0.0, last_used)
    manager.store.save(manager.store.slug(owner), project)
    return project


# ---------------------------------------------------------------- the home's data


async def test_the_home_lists_every_project_newest_first_with_its_status(parts):
    record(parts.manager, "old", last_used=NOW - 7200)
    record(parts.manager, "thesis", last_used=NOW - 60)
    parts.hub.servers = {
        "": {"ready": True, "url": "/user/alice/", "user_options": {"project": "old"}}
    }
    data = await parts.overview.home("alice")
    rows = {p["project"]: p for p in data["projects"]}
    assert [p["project"] for p in data["projects"]] == ["thesis", "old"]
    assert (rows["old"]["state"], rows["old"]["server"], rows["old"]["url"]) == (
        "running",
        "",
        "/user/alice/",
    )
    assert rows["thesis"]["state"] == "stopped" and rows["thesis"]["can_start"]
    assert rows["thesis"]["image_page"] == "/p/images/alice/thesis"
    assert data["more"] == 0 and data["user"] == "alice"


async def test_a_start_offers_gpus_up_to_the_users_limit_and_their_types(parts):
    data = await parts.overview.home("alice")
    assert data["gpus"]["max"] == 2
    assert "base" in [t["name"] for t in data["types"]]
    assert data["default_type"] == "base"


async def test_the_image_column_says_built_outdated_and_packages_lost(parts, settings):
    project = record(parts.manager, "thesis")
    workspace = parts.manager._workspace(project)
    workspace.mkdir(parents=True)
    (workspace / "Dockerfile").write_text(render_managed("FROM scratch\n", ManagedPackages()))
    slug = parts.manager.store.slug("alice")
    parts.engine.listed = [
        {
            "Id": "sha256:1",
            "RepoTags": [image_ref(slug, "thesis")],
            "Created": 1_700_000_000,
            "Labels": {labels.DOCKERFILE_SHA256: "an older Dockerfile"},
        }
    ]
    parts.manager.installed.record_session(slug, "thesis", "sha256:1", ["rich==13.7.1"])
    BuildRecords(settings.state_dir).write(image_ref(slug, "thesis"), status="failed")
    (row,) = (await parts.overview.home("alice"))["projects"]
    assert row["image"]["built_at"] == 1_700_000_000
    assert row["image"]["outdated"] is True
    assert row["image"]["lost_packages"] == ["rich==13.7.1"]
    assert row["image"]["last_build"] == "failed"


async def test_a_wait_for_a_gpu_shows_its_place_and_an_ended_wait_its_message(parts, settings):
    record(parts.manager, "train")
    record(parts.manager, "eval")
    parts.hub.servers = {"train": {"ready": False, "pending": "spawn"}}
    QueueFile(settings.state_dir).write(
        "hub",
        [
            Waiter("alice", "train", "train", 1, enqueued_at=NOW, position=2, message="2nd"),
            Waiter(
                "alice",
                "eval",
                "eval",
                1,
                enqueued_at=NOW,
                deadline=time.time() + 600,  # NOW is the import's: the suite may run long
                state="interrupted",
                message="Your wait for a GPU ended when the hub restarted; start again",
            ),
            Waiter("bob", "x", "x", 1, enqueued_at=NOW, position=1),
        ],
    )
    rows = {p["project"]: p for p in (await parts.overview.home("alice"))["projects"]}
    assert (rows["train"]["label"], rows["train"]["position"]) == ("waiting (2nd)", 2)
    assert rows["eval"]["state"] == "stopped"
    assert rows["eval"]["message"].startswith("Your wait for a GPU ended")


async def test_retirement_notices_go_to_their_project(parts, settings):
    record(parts.manager, "thesis")
    Notices(settings.state_dir).write(
        {"alice": [{"project": "thesis", "message": "Project thesis: retired in 10 min"}]}
    )
    (row,) = (await parts.overview.home("alice"))["projects"]
    assert row["notices"] == ["Project thesis: retired in 10 min"]


async def test_many_projects_cost_one_engine_call_and_a_bounded_list(parts):
    for i in range(MAX_LISTED * 5):
        record(parts.manager, f"p{i}", last_used=NOW - i)
    last = f"p{MAX_LISTED * 5 - 1}"  # least recently used, but running: listed too
    parts.hub.servers = {last: {"ready": True, "url": f"/user/alice/{last}/"}}
    started = time.perf_counter()
    data = await parts.overview.home("alice")
    assert time.perf_counter() - started < 2.0
    assert len(data["projects"]) == MAX_LISTED + 1
    assert data["projects"][-1]["project"] == last and data["projects"][-1]["state"] == "running"
    assert data["more"] == MAX_LISTED * 5 - MAX_LISTED - 1
    assert parts.engine.calls == 1 and parts.hub.calls == ["GET users/alice"]


async def test_page_views_within_two_seconds_share_one_reading_of_the_gpus(parts):
    clock = [NOW]
    parts.overview.clock = lambda: clock[0]
    await parts.overview.home("alice")
    await parts.overview.home("alice")
    assert parts.allocator.reads == 1
    clock[0] += overview_module.GPU_STATE_SECONDS + 1
    await parts.overview.home("alice")
    assert parts.allocator.reads == 2


async def test_an_engine_that_does_not_answer_leaves_the_home_listed(parts):
    def refuse(**kwargs: Any) -> None:
        raise docker.errors.DockerException("engine gone")

    async def no_ledger() -> None:
        raise docker.errors.DockerException("engine gone")

    record(parts.manager, "thesis")
    parts.engine.images = refuse
    parts.allocator.state = no_ledger
    (row,) = (await parts.overview.home("alice"))["projects"]
    assert (row["state"], row["image"]["built_at"], row["gpus"]) == ("stopped", None, [])


async def test_someone_the_hub_does_not_know_is_a_404(parts):
    with pytest.raises(Refusal) as e:
        await parts.overview.home("nobody")
    assert e.value.status == 404


# ---------------------------------------------------------------- over HTTP


class SignedIn:
    """The hub's sign-in stood in for: the user named in a test header; "admin" holds
    the admin scope."""

    def get_current_user(self) -> dict[str, Any] | None:
        name = self.request.headers.get("X-Test-User")
        if not name:
            return None
        return {"name": name, "scopes": [ADMIN_SCOPE] if name == "admin" else []}


class Data(SignedIn, HomeDataHandler):
    pass


class SignIn(SignedIn, HomeSignInHandler):
    pass


async def fetch(parts, path: str, user: str = "alice", method: str = "GET") -> HTTPResponse:
    auth = HubOAuth(
        api_url="http://127.0.0.1:1/hub/api",
        api_token="service-token",
        oauth_client_id="service-ds01",
        oauth_redirect_uri="/p/oauth_callback",
        hub_prefix="/lab/hub/",
        base_url="/p/",
    )
    app = web.Application(
        [(r"/p/api/home(?:/(?P<owner>[^/]+))?", Data), (r"/p/home", SignIn)],
        ds01=SimpleNamespace(prefix="/p/", admin_scope=ADMIN_SCOPE),
        overview=parts.overview,
        hub_auth=auth,
        hub_base_url="/lab/",
        cookie_secret="test-secret",
        xsrf_cookies=True,
        login_url="/lab/hub/login",
    )
    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    try:
        return await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}{path}",
            method=method,
            body=b"{}" if method == "POST" else None,
            headers={"X-Test-User": user} if user else {},
            follow_redirects=False,
            raise_error=False,
        )
    finally:
        server.stop()


async def test_the_home_data_are_the_signed_in_users_own(parts):
    record(parts.manager, "thesis")
    r = await fetch(parts, "/p/api/home")
    assert r.code == 200 and r.headers["Cache-Control"] == "no-store"
    assert [p["project"] for p in json.loads(r.body)["projects"]] == ["thesis"]


async def test_another_users_home_data_are_refused(parts):
    r = await fetch(parts, "/p/api/home/bob")
    assert r.code == 403
    assert json.loads(r.body)["status"] == 403
    assert parts.hub.calls == []  # refused before anything was read


async def test_an_admin_reads_anyones_home_data(parts):
    record(parts.manager, "x", owner="bob")
    r = await fetch(parts, "/p/api/home/bob", user="admin")
    assert r.code == 200 and [p["project"] for p in json.loads(r.body)["projects"]] == ["x"]


async def test_an_admin_asking_for_an_unknown_user_gets_a_404(parts):
    r = await fetch(parts, "/p/api/home/nobody", user="admin")
    assert r.code == 404 and "no user" in json.loads(r.body)["message"]


async def test_the_home_data_cannot_be_posted_to(parts):
    r = await fetch(parts, "/p/api/home", method="POST")
    assert r.code in (403, 405)  # the XSRF check comes first; either way nothing happens


async def test_without_a_sign_in_the_home_data_go_to_the_hubs_sign_in(parts):
    r = await fetch(parts, "/p/api/home", user="")
    assert r.code == 302 and "/oauth2/authorize" in r.headers["Location"]


async def test_the_sign_in_returns_to_the_hubs_home_only_with_the_token_in_the_fragment(parts):
    r = await fetch(parts, "/p/home?next=https://evil.example/", user="alice")
    assert r.code == 302
    where = urlsplit(r.headers["Location"])
    assert (where.scheme, where.netloc, where.path, where.query) == ("", "", "/lab/hub/home", "")
    name, _, token = where.fragment.partition("=")
    assert name == "ds01-xsrf" and len(token) > 20
    assert r.headers["Cache-Control"] == "no-store"


# ---------------------------------------------------------------- the hub's template


def hub_environment(*admin_paths: str) -> Environment:
    """The hub's template environment, built as JupyterHub 6 builds it (app.py): its own
    templates under "templates/", then c.JupyterHub.template_paths, then its own."""
    default = JupyterHub().template_paths[0]
    paths = [*with_hub_templates(admin_paths), default]
    loader = ChoiceLoader(
        [PrefixLoader({"templates": FileSystemLoader([default])}, "/"), FileSystemLoader(paths)]
    )
    return Environment(loader=loader, autoescape=True)


class HubUser:
    name = 'eve"><script>alert(1)</script>'
    escaped_name = "eve%22%3E%3Cscript%3E"
    json_escaped_name = "eve"
    spawner = SimpleNamespace(options_form="")

    def all_spawners(self, include_default: bool = True) -> list:
        return []

    def server_url(self, name: str) -> str:
        return f"/user/eve/{name}/"


def render_home(env: Environment) -> str:
    return env.get_template("home.html").render(
        user=HubUser(),
        base_url="/lab/hub/",
        prefix="/lab/",
        url="/lab/hub/spawn/eve",
        static_url=lambda *a, **k: "",
        default_server=SimpleNamespace(active=False),
        allow_named_servers=True,
        named_server_limit_per_user=5,
        services=[],
        parsed_scopes=set(),
        announcement="Project thesis: retired in 10 min",
    )


def test_the_home_extends_the_hubs_own_and_keeps_its_server_list():
    html = render_home(hub_environment())
    assert 'id="ds01-home"' in html and 'data-service="/lab/services/ds01/"' in html
    assert 'id="start"' in html and "Named Servers" in html  # the hub's own, kept
    assert "Project thesis: retired in 10 min" in html  # the announcement, as every page
    assert 'require(["home"])' in html and "ds01-xsrf=" in html  # both scripts
    assert "/lab/services/ds01/" in html  # the page says where to go without its script


def test_names_on_the_home_page_are_escaped():
    html = render_home(hub_environment())
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_an_admins_own_home_template_wins(tmp_path):
    (tmp_path / "home.html").write_text('{% extends "templates/home.html" %}ADMIN')
    html = render_home(hub_environment(str(tmp_path)))
    assert "ds01-home" not in html


def test_the_template_paths_are_the_admins_then_ds01s_once():
    assert with_hub_templates(["/mine"]) == ["/mine", HUB_TEMPLATES]
    assert with_hub_templates(["/mine", HUB_TEMPLATES]) == ["/mine", HUB_TEMPLATES]
    assert (Path(HUB_TEMPLATES) / "home.html").is_file()
