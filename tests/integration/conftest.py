"""A real hub (pytest-jupyterhub's MockHub: real proxy, real HTTP) on the real engine.

pytest-jupyterhub 0.1.0's `hub_app` starts and stops the hub; what it lacks for
a Docker spawner is added here: hub networking reachable from containers,
per-test workspace/state directories, unique users, REST/progress helpers and
a cleanup that removes every container and image the test's users got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path

import docker
import pytest
import requests
from jupyterhub.tests.utils import add_user, api_request, auth_header, public_host, public_url

from ds01_spawner import DS01Spawner, labels
from ds01_spawner.configure import docker_bridge_ip
from ds01_spawner.identity import UserIds

from .hubprocess import HubProcess, remove_user_objects, seed_workspace

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def engine():
    client = docker.from_env(timeout=120)
    yield client
    client.close()


@pytest.fixture
def dirs(tmp_path):
    return {"workspace_root": str(tmp_path / "workspaces"), "state_dir": str(tmp_path / "state")}


def hub_config(dirs: dict[str, str], **spawner: object) -> dict:
    ip = docker_bridge_ip()
    return {
        "JupyterHub": {
            "spawner_class": DS01Spawner,
            "hub_ip": ip,
            "hub_connect_ip": ip,
            "allow_named_servers": True,
            # per-test files: a hub started elsewhere in this checkout never stops our proxy
            "cookie_secret_file": str(Path(dirs["state_dir"]).parent / "cookie_secret"),
        },
        "ConfigurableHTTPProxy": {"pid_file": str(Path(dirs["state_dir"]).parent / "proxy.pid")},
        "DS01Spawner": {
            "project_types_dir": str(REPO / "images" / "types"),
            "start_timeout": 300,
            "http_timeout": 60,
            **dirs,
            **spawner,
        },
    }


class HubDriver:
    """Drives a running MockHub through its REST API, as an admin or a client would."""

    def __init__(self, app, engine: docker.DockerClient) -> None:
        self.app = app
        self.engine = engine
        self.users: list[str] = []

    def new_user(self, prefix: str = "u", admin: bool = False) -> str:
        name = f"{prefix}{uuid.uuid4().hex[:6]}"
        add_user(self.app.db, self.app, name=name, admin=admin)
        self.users.append(name)
        return name

    @staticmethod
    def server_path(user: str, server: str) -> tuple[str, ...]:
        return ("users", user, "servers", server) if server else ("users", user, "server")

    async def request_start(self, user: str, server: str = "", options=None, as_user=None):
        body = {} if options is None else {"user_options": options}
        return await api_request(
            self.app,
            *self.server_path(user, server),
            method="post",
            data=json.dumps(body),
            name=as_user or "admin",
        )

    async def start(self, user: str, server: str = "", options=None, timeout: float = 240):
        r = await self.request_start(user, server, options)
        assert r.status_code in (201, 202), r.text
        return await self.wait_ready(user, server, timeout)

    async def wait_ready(self, user: str, server: str = "", timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = (await api_request(self.app, "users", user)).json()
            s = model["servers"].get(server)
            if s and s["ready"]:
                return s
            if not s or not s.get("pending"):
                spawner = self.app.users[user].spawners.get(server)
                error = getattr(spawner, "_spawn_future", None)
                exc = error.exception() if error and error.done() else None
                raise AssertionError(f"server {user}/{server} did not start: {exc!r}")
            await asyncio.sleep(0.5)
        raise AssertionError(f"server {user}/{server} not ready after {timeout}s")

    async def stop(self, user: str, server: str = "", timeout: float = 60) -> None:
        r = await api_request(self.app, *self.server_path(user, server), method="delete")
        assert r.status_code in (202, 204), r.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = (await api_request(self.app, "users", user)).json()["servers"].get(server)
            if not s:
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"server {user}/{server} did not stop")

    def progress_url(self, user: str, server: str = "") -> str:
        return public_url(self.app, path="hub/") + "/".join(
            ["api", *self.server_path(user, server), "progress"]
        )

    async def start_watching(self, user: str, server: str = "", options=None):
        """Start a server and read its spawn's progress stream while it runs.

        Returns (response to the start request, every progress event).
        """
        request = asyncio.ensure_future(self.request_start(user, server, options))
        for _ in range(200):
            spawner = self.app.users[user].spawners.get(server)
            if request.done() or (spawner is not None and spawner.pending == "spawn"):
                break
            await asyncio.sleep(0.05)
        events = await self.progress(user, server)
        return await request, events

    async def progress(self, user: str, server: str = "") -> list[dict]:
        """All events of the spawn in flight, read from the real EventSource endpoint."""
        url = self.progress_url(user, server)
        headers = auth_header(self.app.db, "admin")

        def read() -> list[dict]:
            events = []
            with requests.get(url, headers=headers, stream=True, timeout=300) as r:
                r.raise_for_status()
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data:"):
                        event = json.loads(line[5:])
                        events.append(event)
                        if event.get("ready") or event.get("failed"):
                            break
            return events

        return await asyncio.to_thread(read)

    async def get_server_api(self, user: str, server: str, path: str = "api/status"):
        """A request to the user's Jupyter server through the real proxy."""
        prefix = self.app.users[user].spawners[server].server.base_url
        url = public_host(self.app) + prefix + path
        headers = auth_header(self.app.db, user)
        return await asyncio.to_thread(requests.get, url, headers=headers, timeout=30)

    def containers(self, user: str, **label_values: str):
        wanted = [f"{labels.USER}={user}"] + [f"ds01.{k}={v}" for k, v in label_values.items()]
        return self.engine.containers.list(all=True, filters={"label": wanted})

    def container(self, user: str, project: str):
        found = self.containers(user, project=project)
        assert len(found) == 1, found
        return found[0]

    def images(self, user: str):
        return self.engine.images.list(filters={"label": [f"{labels.USER}={user}"]})

    def seed_workspace(self, user: str, project: str, dockerfile: str) -> tuple[Path, UserIds]:
        """`project init` by hand: a workspace owned by the user's uid, with this Dockerfile."""
        cfg = self.app.config.DS01Spawner
        return seed_workspace(cfg.state_dir, cfg.workspace_root, user, project, dockerfile)

    async def stop_servers(self) -> None:
        """Stop every server of this driver's users that still runs or starts."""
        for user in self.users:
            orm_user = self.app.users[user]
            for name, spawner in list(orm_user.spawners.items()):
                if spawner.active:
                    with contextlib.suppress(Exception):
                        await orm_user.stop(name)

    def cleanup(self) -> None:
        for user in self.users:
            remove_user_objects(self.engine, user)


def eventually(predicate, what: str, timeout: float = 60, interval: float = 0.3):
    """`predicate()`'s first true value, polled until `timeout` (then fails naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def exec_in(container, cmd: str, user: str | None = None) -> tuple[int, str]:
    kwargs = {"user": user} if user else {}
    code, out = container.exec_run(["sh", "-c", cmd], **kwargs)
    return code, out.decode(errors="replace").strip()


@pytest.fixture
async def hub(hub_app, dirs, engine):
    """Start a hub: `driver = await hub(**spawner_config)` (`_jupyterhub={...}` for the hub's)."""
    drivers = []

    async def start(_jupyterhub: dict | None = None, **spawner):
        config = hub_config(dirs, **spawner)
        config["JupyterHub"].update(_jupyterhub or {})
        app = await hub_app(config)
        driver = HubDriver(app, engine)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        await driver.stop_servers()
        driver.cleanup()


# the users the hub-process tests start servers for: their containers and images go
# before (a first start must build) and after each test
HUB_PROCESS_USERS = ("researcher", "alice", "bob", "carol", "dave")


@pytest.fixture
def hub_process(tmp_path, engine):
    """`make(**env)`: a real `jupyterhub` process on one data directory; a second one
    takes the first one's ports (a restart). All are stopped at the end."""
    data = tmp_path / "data"
    data.mkdir()
    procs: list[HubProcess] = []
    for user in HUB_PROCESS_USERS:
        remove_user_objects(engine, user)

    def make(**env: str) -> HubProcess:
        p = HubProcess(data, tmp_path / "hub.log", **env)
        if procs:
            p.take_ports_of(procs[0])
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()
    for user in HUB_PROCESS_USERS:
        remove_user_objects(engine, user)
