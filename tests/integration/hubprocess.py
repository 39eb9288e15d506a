"""The repo's own jupyterhub_config.py, run as a real `jupyterhub` process.

Used where an in-process MockHub cannot stand in: killing and restarting the
hub, the hub's shutdown cleanup, and the browser test.

The hub starts its proxy and the ds01 service (in a session of its own), and
a SIGKILLed hub leaves them to init; so each HubProcess notes, by pid, every
process under its hub while it can see them, and `stop()` ends them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import requests

from ds01_spawner import labels
from ds01_spawner.identity import UidAllocator, UserIds, user_slug

REPO = Path(__file__).resolve().parents[2]


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> set[int]:
    """Every live process under `root`, by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int, started: int) -> bool:
    """The same process (not a reused pid) still runs; a zombie has ended."""
    stat = proc_stat(pid)
    return stat is not None and stat[2] == started and stat[1] not in "ZX"


def end_processes(procs: dict[int, int], grace: float = 5) -> list[str]:
    """SIGTERM, then SIGKILL, every process of `procs` (pid -> start time) still running."""
    running = {pid: t for pid, t in procs.items() if alive(pid, t)}
    ended = [f"{pid} {cmdline(pid)}" for pid in running]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            running = {pid: t for pid, t in running.items() if alive(pid, t)}
            if not running:
                return ended
            time.sleep(0.1)
    return ended


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubProcess:
    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        base_url: str = "/",
        args: tuple[str, ...] = (),
        **env: str,
    ) -> None:
        self.extra_env = env
        self.extra_args = args  # more of the hub's command line, e.g. --JupyterHub.x=y
        self.base_url = base_url
        self.data_dir = data_dir
        self.log_path = log_path
        self.port, self.hub_port, self.api_port = free_port(), free_port(), free_port()
        self.service_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{base_url.rstrip('/')}"
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None
        self.started: dict[int, int] = {}  # pid -> start time: the hub and all under it

    def track(self) -> None:
        """Note the hub and every process under it now (the proxy, the ds01 service)."""
        if self.proc is None:
            return
        for pid in {self.proc.pid, *descendants(self.proc.pid)}:
            if stat := proc_stat(pid):
                self.started.setdefault(pid, stat[2])

    def service_pid(self, timeout: float = 30) -> int:
        """The pid of the hub's ds01 service."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.track()
            for pid in descendants(self.proc.pid):
                if "ds01_spawner.service" in cmdline(pid):
                    return pid
            time.sleep(0.2)
        raise AssertionError(f"no ds01 service under the hub after {timeout}s")

    def take_ports_of(self, first: HubProcess) -> None:
        """A restarted hub keeps its ports, its service's too (as in production)."""
        self.port, self.hub_port, self.api_port = first.port, first.hub_port, first.api_port
        self.service_port, self.url, self.token = first.service_port, first.url, first.token

    def start(self, timeout: float = 60) -> None:
        env = {
            **os.environ,
            "DS01_DATA_DIR": str(self.data_dir),
            "DS01_BIND_URL": self.url + "/",
            "DS01_ADMIN_USERS": "admin",
            "DS01_SERVICE_PORT": str(self.service_port),
            **self.extra_env,
        }
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jupyterhub",
                    "-f",
                    str(REPO / "jupyterhub_config.py"),
                    f"--JupyterHub.hub_port={self.hub_port}",
                    f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{self.api_port}",
                    *self.extra_args,
                ],
                cwd=self.data_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.track()
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(f"{self.url}/hub/health", timeout=2).status_code == 200:
                    self.track()
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"hub not up after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: the hub dies without cleaning anything up."""
        assert self.proc is not None
        self.track()  # its children are init's after this: note them while we can
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM: a normal shutdown (cleanup_servers applies)."""
        assert self.proc is not None
        self.track()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def login(self, name: str, password: str = "any-password") -> requests.Session:
        s = requests.Session()
        s.get(f"{self.url}/hub/login", timeout=10).raise_for_status()
        r = s.post(
            f"{self.url}/hub/login?_xsrf={s.cookies['_xsrf']}",
            data={"username": name, "password": password},
            timeout=30,
        )
        r.raise_for_status()
        return s

    def admin_token(self) -> str:
        if self.token is None:
            s = self.login("admin")
            s.get(f"{self.url}/hub/home", timeout=10)
            r = s.post(
                f"{self.url}/hub/api/users/admin/tokens",
                json={"note": "tests", "expires_in": 3600},
                headers={"X-XSRFToken": s.cookies["_xsrf"]},
                timeout=10,
            )
            r.raise_for_status()
            self.token = r.json()["token"]
        return self.token

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {self.admin_token()}"}
        return requests.request(
            method, f"{self.url}/hub/api/{path}", headers=headers, timeout=60, **kwargs
        )

    def wait_ready(self, user: str, server: str = "", timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.api("GET", f"users/{user}").json()["servers"].get(server)
            if s and s["ready"]:
                return s
            if not s:
                raise AssertionError(f"{user}/{server} failed to start; see {self.log_path}")
            time.sleep(0.5)
        raise AssertionError(f"{user}/{server} not ready in {timeout}s")

    def stop(self) -> list[str]:
        """Stop the hub, then end whatever it started that still runs; returns those."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
        return end_processes(self.started)


class Client:
    """A user's token-authenticated client for the service's JSON API."""

    def __init__(self, hub: HubProcess, user: str) -> None:
        hub.api("POST", f"users/{user}")
        token = hub.api("POST", f"users/{user}/tokens", json={"note": "test"}).json()["token"]
        self.base = f"{hub.url}/services/ds01/api/"
        self.headers = {"Authorization": f"token {token}"}

    def get(self, path: str) -> requests.Response:
        return requests.get(self.base + path, headers=self.headers, timeout=60)

    def post(self, path: str, body: dict | None = None) -> requests.Response:
        return requests.post(self.base + path, json=body or {}, headers=self.headers, timeout=120)

    def events(self, path: str) -> list[dict]:
        out = []
        with requests.get(self.base + path, headers=self.headers, stream=True, timeout=300) as r:
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    out.append(json.loads(line[5:]))
        return out

    def wait_build(self, path: str) -> list[dict]:
        """Follow the build's event stream to its end: the live build, or its record."""
        return self.events(f"{path}/events")


@contextlib.contextmanager
def hub_with_index(
    root: Path, index_url: str, users: tuple[str, ...], args: tuple[str, ...] = ()
) -> Iterator[HubProcess]:
    """A hub whose builds install from the local package index at `index_url`; when it
    stops, everything ds01 made for `users` goes too."""
    (root / "data").mkdir()
    hub = HubProcess(
        root / "data",
        root / "hub.log",
        args=args,
        DS01_PIP_INDEX_URL=index_url,
        DS01_BUILD_NETWORK="host",
    )
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
        engine = docker.from_env()
        for user in users:
            remove_user_objects(engine, user)


def remove_user_objects(engine: docker.DockerClient, user: str) -> None:
    """Remove every container and image ds01 made for `user` (test cleanup)."""
    wanted = {"label": [f"{labels.USER}={user}"]}
    for c in engine.containers.list(all=True, filters=wanted):
        with contextlib.suppress(docker.errors.APIError):  # already being removed
            c.remove(force=True)
    for image in engine.images.list(filters=wanted):
        for tag in image.tags:
            with contextlib.suppress(docker.errors.APIError):
                engine.images.remove(tag, force=True)


def seed_workspace(
    state_dir: str | Path, workspace_root: str | Path, user: str, project: str, dockerfile: str
) -> tuple[Path, UserIds]:
    """`project init` by hand: a workspace owned by the user's uid, with this Dockerfile."""
    ids = UidAllocator(Path(state_dir) / "uids.json", 20000, 59999).ids_for(user)
    workspace = Path(workspace_root) / user_slug(user) / project
    workspace.mkdir(parents=True)
    os.chown(workspace, ids.uid, ids.gid)
    (workspace / "Dockerfile").write_text(dockerfile)
    return workspace, ids
