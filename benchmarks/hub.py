"""A real hub in this process, spawners that time their own phases, and a timing client.

The hub is JupyterHub's MockHub configured exactly as the integration tests
configure it (`tests.integration.conftest.hub_config`): real proxy, real HTTP,
real engine. Requests go through the proxy with an admin token, from a tornado
client on the hub's own loop (jupyterhub.tests.utils.api_request runs one
request at a time, which would serialise a spawn storm).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import docker
from dockerspawner import DockerSpawner
from jupyterhub.tests.mocking import MockHub
from jupyterhub.tests.utils import auth_header, public_url
from jupyterhub.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from traitlets.config import Config

from ds01_spawner import DS01Spawner, labels
from tests.integration.conftest import HubDriver, hub_config
from tests.integration.hubprocess import remove_user_objects

BASE_IMAGE = "ds01/singleuser:latest"
BENCH_PROJECT = "bench"  # the project DS01's timed users start (its image is built once)
USER_PREFIX = "bench"  # every user a benchmark makes starts with this; the sweep relies on it
PLAIN_USER = "20000:20000"  # the uid DS01Spawner gives its first user without an account
POLL_S = 0.01  # how often in-process state is looked at while waiting
SERVER_ANSWERS = "server answers HTTP"


@dataclass(frozen=True)
class Event:
    phase: str
    t0: float
    t1: float

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


class PhaseTimer:
    """Mixin: every docker call, start() and stop() of this spawner, with perf_counter times.

    Docker calls are timed from the call to the future's completion, i.e.
    including the wait for DockerSpawner's single shared executor thread.
    """

    # Watch each started server (GET every 10 ms until it answers). Off in the storm:
    # 30 watchers would be the busiest thing in the hub process it measures.
    bench_watch_server = True

    def _bench_mark(self, phase: str, t0: float) -> None:
        self.__dict__.setdefault("bench_events", []).append(Event(phase, t0, perf_counter()))

    def take_events(self) -> list[Event]:
        return self.__dict__.pop("bench_events", [])

    def docker(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Future:
        t0 = perf_counter()
        future = super().docker(method, *args, **kwargs)
        future.add_done_callback(lambda _: self._bench_mark(f"docker {method}", t0))
        return future

    async def start(self):
        t0 = perf_counter()
        try:
            ip, port = await super().start()
        finally:
            self._bench_mark("start()", t0)
        self._bench_watch = (
            asyncio.ensure_future(self._watch_server(ip, port)) if self.bench_watch_server else None
        )
        return ip, port

    async def _watch_server(self, ip: str, port: int) -> None:
        """Mark when the server first answers HTTP, polling every 10 ms.

        The hub's own readiness check backs off with full jitter (waits of up to
        seconds), so when the hub notices is a noisy measure of when it was up.
        """
        url = f"http://{ip}:{port}{self.server.base_url}api"
        client = AsyncHTTPClient(force_instance=True)
        t0 = perf_counter()
        try:
            while perf_counter() - t0 < 120:
                with contextlib.suppress(Exception):
                    r = await client.fetch(url, raise_error=False, request_timeout=2)
                    if r.code != 599:
                        self._bench_mark(SERVER_ANSWERS, t0)
                        return
                if not self._spawn_pending and not self.ready:
                    return  # the spawn failed
                await asyncio.sleep(POLL_S)
        finally:
            client.close()

    async def stop(self, now: bool = False) -> None:
        t0 = perf_counter()
        try:
            await super().stop(now=now)
        finally:
            self._bench_mark("stop()", t0)

    async def poll(self):
        """Counted, so the footprint benchmark can check its window saw every server polled."""
        self.__dict__["bench_polls"] = self.bench_polls + 1
        return await super().poll()

    @property
    def bench_polls(self) -> int:
        return self.__dict__.get("bench_polls", 0)


@contextlib.contextmanager
def servers_unwatched() -> Iterator[None]:
    """Spawns started in this block are not watched (see PhaseTimer.bench_watch_server)."""
    PhaseTimer.bench_watch_server = False
    try:
        yield
    finally:
        PhaseTimer.bench_watch_server = True


class TimedDockerSpawner(PhaseTimer, DockerSpawner):
    """Plain DockerSpawner, timed."""


class TimedDS01Spawner(PhaseTimer, DS01Spawner):
    """DS01Spawner, timed; its own steps too (see DS01_STEPS)."""


# DS01Spawner's own steps, by method: the profile's rows. A method the spawner no
# longer has is skipped (the spawner is being worked on; the benchmark should not break).
DS01_STEPS = {
    "apply_project_options": "ds01 validate request",
    "_resolve_ids": "ds01 uid",
    "_open_project": "ds01 workspace + project record",
    "_check_gpus": "ds01 gpu check",
    "_assign_gpus": "ds01 gpu assign",
}


def _timed(method: Any, phase: str) -> Any:
    if asyncio.iscoroutinefunction(method):

        async def timed_async(self, *args, **kwargs):
            t0 = perf_counter()
            try:
                return await method(self, *args, **kwargs)
            finally:
                self._bench_mark(phase, t0)

        return timed_async

    def timed(self, *args, **kwargs):
        t0 = perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._bench_mark(phase, t0)

    return timed


for _name, _phase in DS01_STEPS.items():
    if callable(getattr(DS01Spawner, _name, None)):
        setattr(TimedDS01Spawner, _name, _timed(getattr(DS01Spawner, _name), _phase))


def _own_files(config: dict, workdir: Path) -> dict:
    """Keep the hub's files out of the checkout: JupyterHub stops whatever proxy the
    pid file in its working directory names, e.g. that of a test run beside us."""
    workdir.mkdir(parents=True, exist_ok=True)
    config["JupyterHub"]["cookie_secret_file"] = str(workdir / "cookie_secret")
    config["ConfigurableHTTPProxy"] = {"pid_file": str(workdir / "proxy.pid"), "log_level": "warn"}
    return config


def ds01_config(workdir: Path, **spawner: Any) -> dict:
    config = hub_config(_dirs(workdir), **spawner)
    config["JupyterHub"]["spawner_class"] = TimedDS01Spawner
    return _own_files(config, workdir)


def plain_config(workdir: Path) -> dict:
    """The same hub (networking, timeouts) with plain DockerSpawner on the base image.

    It runs the container as a non-root uid, as DS01Spawner does: the base image
    has no USER, and jupyter-server refuses to run as root.
    """
    config = hub_config(_dirs(workdir))
    ds01 = config.pop("DS01Spawner")
    config["JupyterHub"]["spawner_class"] = TimedDockerSpawner
    config["DockerSpawner"] = {
        "image": BASE_IMAGE,
        "remove": True,
        "start_timeout": ds01["start_timeout"],
        "http_timeout": ds01["http_timeout"],
        "extra_create_kwargs": {"user": PLAIN_USER},
    }
    return _own_files(config, workdir)


def _dirs(workdir: Path) -> dict[str, str]:
    return {
        "workspace_root": str(workdir / "workspaces"),
        "state_dir": str(workdir / "state"),
    }


@dataclass
class Spawn:
    """One start through the REST API, as the client saw it."""

    user: str
    server: str
    status: int  # the answer to the POST
    ready: bool
    seconds: float  # POST sent -> ready, or -> failure known
    t_post: float
    t_done: float
    message: str = ""
    events: list[Event] = field(default_factory=list)


class BenchHub:
    def __init__(self, app: MockHub, engine: docker.DockerClient) -> None:
        self.app = app
        self.engine = engine
        self.driver = HubDriver(app, engine)
        self.http = AsyncHTTPClient(force_instance=True, max_clients=64)
        self.headers = auth_header(app.db, "admin")
        self.api_url = url_path_join(public_url(app, path="hub"), "api")

    @property
    def token(self) -> str:
        return self.headers["Authorization"].split(" ", 1)[1]

    def new_user(self, tag: str) -> str:
        return self.driver.new_user(f"{USER_PREFIX}{tag}")

    async def api(self, method: str, *path: str, body: Any = None) -> HTTPResponse:
        return await self.http.fetch(
            url_path_join(self.api_url, *path),
            method=method,
            headers=self.headers,
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            raise_error=False,
            request_timeout=600,
        )

    def spawner(self, user: str, server: str = "") -> Any:
        return self.app.users[user].spawners[server]

    async def start(
        self, user: str, server: str = "", options: dict | None = None, poll: float = POLL_S
    ) -> Spawn:
        """Start through the REST API; wait (looking every `poll` s) until ready or failed."""
        body = {} if options is None else {"user_options": options}
        t_post = perf_counter()
        r = await self.api("POST", *HubDriver.server_path(user, server), body=body)
        message = ""
        # 202: still starting after the hub's slow_spawn_timeout. A 201 can come early
        # too: after a failed start, JupyterHub 6.1 decides 201/202 on a replacement
        # spawner object that is not the one starting, so look at the live one.
        if r.code in (201, 202):
            spawner = self.spawner(user, server)
            while spawner.pending:
                await asyncio.sleep(poll)
            ready = spawner.ready
            failure = spawner._spawn_future and spawner._spawn_future.exception()
            message = getattr(failure, "jupyterhub_message", None) or str(failure or "")
        else:
            ready = r.code == 201
            if not ready:
                with contextlib.suppress(ValueError):
                    message = json.loads(r.body or b"{}").get("message", "")
        t_done = perf_counter()
        spawner = self.app.users[user].spawners.get(server)
        watch = getattr(spawner, "_bench_watch", None)
        if watch is not None:  # in the rare case the hub noticed the server first
            await asyncio.wait([watch], timeout=2)
        events = spawner.take_events() if spawner is not None else []
        return Spawn(user, server, r.code, ready, t_done - t_post, t_post, t_done, message, events)

    async def stop(
        self, user: str, server: str = "", poll: float = POLL_S
    ) -> tuple[float, list[Event]]:
        """Stop through the REST API: seconds until the hub says it is stopped, and events."""
        t0 = perf_counter()
        r = await self.api("DELETE", *HubDriver.server_path(user, server))
        if r.code not in (202, 204):
            raise RuntimeError(f"stopping {user}/{server}: {r.code} {r.body!r}")
        spawner = self.spawner(user, server)
        while spawner.active:
            await asyncio.sleep(poll)
        return perf_counter() - t0, spawner.take_events()

    async def container_gone(self, name: str, timeout: float = 60) -> float:
        """Seconds until the engine no longer lists container `name`.

        DockerSpawner with remove=True creates containers with auto_remove, and its
        stop() returns while the engine is still removing one; starting the same
        server again in that window fails with a name conflict (HTTP 500).
        """
        t0 = perf_counter()
        while perf_counter() - t0 < timeout:
            found = await asyncio.to_thread(
                self.engine.api.containers, all=True, filters={"name": f"^/{name}$"}
            )
            if not found:
                return perf_counter() - t0
            await asyncio.sleep(POLL_S)
        raise RuntimeError(f"container {name} still there {timeout} s after its server stopped")

    async def stop_everything(self) -> None:
        for user in self.driver.users:
            for name, spawner in list(self.app.users[user].spawners.items()):
                if spawner.active:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.app.users[user].stop(name), 120)

    def cleanup(self) -> None:
        for user in self.driver.users:
            remove_user_objects(self.engine, user)
            for c in self.engine.containers.list(all=True, filters={"name": f"jupyter-{user}"}):
                with contextlib.suppress(docker.errors.APIError):
                    c.remove(force=True)


@contextlib.asynccontextmanager
async def running_hub(config: dict, engine: docker.DockerClient) -> AsyncIterator[BenchHub]:
    """Start a MockHub as pytest-jupyterhub's hub_app does; stop it and remove what it made."""
    MockHub.clear_instance()
    app = MockHub.instance(config=Config(config))
    await app.initialize()
    app.log.setLevel(logging.INFO)  # MockHub logs at DEBUG; a real hub runs at INFO
    await app.start()
    hub = BenchHub(app, engine)
    try:
        yield hub
    finally:
        await hub.stop_everything()
        hub.cleanup()
        hub.http.close()
        if app.http_server:
            app.http_server.stop()
        await app.shutdown_cancel_tasks()
        MockHub.clear_instance()


def sweep(engine: docker.DockerClient) -> int:
    """Remove whatever an earlier, interrupted run left: containers and images of bench users."""
    removed = 0
    for c in engine.containers.list(all=True):
        user = (c.labels or {}).get(labels.USER, "")
        if user.startswith(USER_PREFIX) or c.name.startswith(f"jupyter-{USER_PREFIX}"):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)
                removed += 1
    for image in engine.images.list(filters={"label": [f"{labels.MANAGED}=true"]}):
        if (image.labels or {}).get(labels.USER, "").startswith(USER_PREFIX):
            for tag in image.tags or [image.id]:
                with contextlib.suppress(docker.errors.APIError):
                    engine.images.remove(tag, force=True)
                    removed += 1
    return removed


def log_to(path: Path) -> None:
    """The hub's log (it propagates to the root logger in MockHub) goes to a file."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
