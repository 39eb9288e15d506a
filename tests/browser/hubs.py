"""A real hub process for a browser test, stopped (and its users' objects removed) after."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker

from tests.integration.hubprocess import HubProcess, remove_user_objects


def screenshots(tmp_path: Path) -> Path:
    """Where a test saves its screenshots: $DS01_SCREENSHOTS (docs/screenshots for the
    README), else the test's own temporary directory."""
    shots = Path(os.environ.get("DS01_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@contextlib.contextmanager
def browser_hub(
    tmp_path: Path, users: Iterable[str], **env: str
) -> Iterator[tuple[HubProcess, docker.DockerClient]]:
    """The repo's jupyterhub_config.py in a real hub process on a fresh data directory
    (`env`: its DS01_* variables), and the engine; `users`' containers and images go
    at the end, whatever happened."""
    data = tmp_path / "data"
    data.mkdir()
    hub = HubProcess(data, tmp_path / "hub.log", **env)
    engine = docker.from_env()
    try:
        hub.start()
        yield hub, engine
    finally:
        hub.stop()
        for user in users:
            remove_user_objects(engine, user)
        engine.close()
