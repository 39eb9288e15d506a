"""Packages installed inside a container beyond its image: found at retire, offered to the image.

DS01's most common mistake is `pip install` in a running container and losing
it at retire. Just before a container is retired the spawner lists what pip
sees there and compares it with the image's own list (taken once per image,
cached by image id); the difference is recorded per user and project, and the
image-update page offers to add it to the image.

`pip list` runs inside the user's container as the user, so its output is
hostile input: every line is parsed strictly and re-validated as a package
spec before it is kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import docker

from .packages import PackageError, pip_name, validate_pip_spec
from .statefiles import write_json

FREEZE_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,99})==([A-Za-z0-9.+!_-]{1,64})$")
MAX_FREEZE_LINES = 5000
MAX_FREEZE_BYTES = 512 * 1024
FREEZE_COMMAND = ["pip", "list", "--format=freeze", "--disable-pip-version-check"]


def parse_freeze(text: str) -> dict[str, str]:
    """`name==version` lines -> {canonical name: version}; anything else is dropped."""
    packages: dict[str, str] = {}
    for line in text[:MAX_FREEZE_BYTES].splitlines()[:MAX_FREEZE_LINES]:
        match = FREEZE_LINE.match(line.strip())
        if not match:
            continue
        try:
            spec = validate_pip_spec(f"{match.group(1)}=={match.group(2)}")
        except PackageError:
            continue
        packages[pip_name(spec)] = match.group(2)
    return packages


def added_in_container(container: dict[str, str], image: dict[str, str]) -> list[str]:
    """Specs (``name==version``) installed or upgraded in the container, by name."""
    return [
        f"{name}=={version}"
        for name, version in sorted(container.items())
        if image.get(name) != version
    ]


class InstalledRecords:
    """Per image id: its own package list; per user and project: the last session's extras."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "installed"

    def _write(self, path: Path, data: object) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(path, data, indent=1)

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _image_path(self, image_id: str) -> Path:
        return self.root / "images" / (image_id.replace(":", "_")[:80] + ".json")

    def _project_path(self, slug: str, project: str) -> Path:
        return self.root / "projects" / slug / f"{project}.json"

    def image_packages(self, image_id: str) -> dict[str, str] | None:
        return self._read(self._image_path(image_id))

    def save_image_packages(self, image_id: str, packages: dict[str, str]) -> None:
        self._write(self._image_path(image_id), packages)

    def last_session(self, slug: str, project: str) -> dict | None:
        """{"packages": [...], "recorded_at": ..., "image_id": ...} or None."""
        return self._read(self._project_path(slug, project))

    def record_session(self, slug: str, project: str, image_id: str, added: list[str]) -> None:
        path = self._project_path(slug, project)
        if not added:
            path.unlink(missing_ok=True)
            return
        self._write(
            path,
            {
                "packages": added,
                "image_id": image_id,
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )

    def forget(self, slug: str, project: str, names: list[str] | None = None) -> None:
        """Drop the record (or the named packages from it), e.g. once they are in the image."""
        record = self.last_session(slug, project)
        if record is None:
            return
        if names is None:
            keep: list[str] = []
        else:
            drop = {pip_name(n) for n in names}
            keep = [p for p in record["packages"] if pip_name(p) not in drop]
        self.record_session(slug, project, record.get("image_id", ""), keep)


async def freeze_in_container(container: str, user: str, timeout: float) -> str | None:
    """`pip list --format=freeze` inside `container`, as `user`; None if it fails or hangs.

    Runs on its own client and thread (never DockerSpawner's shared executor): a
    container that does not answer costs at most `timeout` seconds; the exec dies
    with the container.
    """

    def run() -> str | None:
        client = docker.APIClient(
            version="auto", timeout=timeout + 5, **docker.utils.kwargs_from_env()
        )
        try:
            command = ["timeout", "-s", "KILL", str(int(timeout)), *FREEZE_COMMAND]
            exec_id = client.exec_create(container, command, user=user, stdout=True, stderr=False)
            output = client.exec_start(exec_id)
            if client.exec_inspect(exec_id).get("ExitCode") != 0:
                return None
            return output[:MAX_FREEZE_BYTES].decode("utf-8", errors="replace")
        except docker.errors.DockerException:
            return None
        finally:
            client.close()

    try:
        return await asyncio.wait_for(asyncio.to_thread(run), timeout)
    except asyncio.TimeoutError:
        return None
