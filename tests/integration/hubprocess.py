"""The repo's own jupyterhub_config.py, run as a real `jupyterhub` process.

Used where an in-process MockHub cannot stand in: killing and restarting the
hub, the hub's shutdown cleanup, and the browser test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import docker
import requests

from ds01_spawner import labels
from ds01_spawner.identity import UidAllocator, UserIds, user_slug

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubProcess:
    def __init__(self, data_dir: Path, log_path: Path, base_url: str = "/", **env: str) -> None:
        self.extra_env = env
        self.base_url = base_url
        self.data_dir = data_dir
        self.log_path = log_path
        self.port, self.hub_port, self.api_port = free_port(), free_port(), free_port()
        self.service_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{base_url.rstrip('/')}"
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None

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
                ],
                cwd=self.data_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(f"{self.url}/hub/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"hub not up after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: the hub dies without cleaning anything up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM: a normal shutdown (cleanup_servers applies)."""
        assert self.proc is not None
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()


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
