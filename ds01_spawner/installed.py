"""Packages pip-installed in a container beyond its image: found at retire, offered back.

DS01's most common mistake is `pip install` in a running container and losing
it at retire. Just before a container is retired the spawner reads what its
writable layer holds (the overlay upper dir on a local engine, else the
engine's `GET /containers/{id}/changes`); every ``<name>-<version>.dist-info`` directory added
directly under a ``site-packages`` or ``dist-packages`` directory is a package
installed in this session, and an upgrade shows as the new one added. Nothing
runs inside the container: the engine computes the list, the hub only reads it.
The result is recorded per user and project, and the image-update page offers
to add it to the image.

The paths are still the user's: they name files the user created. The
response is read as a stream with a byte and an entry cap, every object is
parsed on its own and every package is re-validated as a spec before it is kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .engine import docker_client
from .packages import PackageError, pip_name, validate_pip_spec
from .statefiles import write_json

MAX_CHANGES_BYTES = 4 * 1024 * 1024  # of the engine's response: about 60 000 entries
MAX_CHANGES_ENTRIES = 100_000
MAX_CHANGE_OBJECT_BYTES = 32 * 1024  # one {"Path":...,"Kind":...}: PATH_MAX, JSON-escaped
MAX_PACKAGES = 500
SITE_DIRECTORIES = ("site-packages", "dist-packages")
ADDED = 1  # the engine's Kind: 0 modified, 1 added, 2 deleted
_CHUNK = 64 * 1024
_CHANGE_OBJECT = re.compile(
    rb'\{"Path":"(?:[^"\\\x00-\x1f]|\\.){1,%d}+","Kind":[0-9]{1,3}\}'
    % (MAX_CHANGE_OBJECT_BYTES - 32)
)


def iter_change_objects(
    chunks: Iterable[bytes],
    max_bytes: int = MAX_CHANGES_BYTES,
    max_objects: int = MAX_CHANGES_ENTRIES,
) -> Iterator[bytes]:
    """The ``{"Path":"...","Kind":N}`` objects of the engine's JSON array arriving in
    `chunks`, as bytes, in order.

    Stops reading after `max_bytes` or `max_objects`, whichever comes first. Only
    the unmatched tail is carried from one chunk to the next, and at most one
    object's worth of it (a longer object is skipped), so memory stays bounded
    whatever the stream holds. The engine escapes every quote inside a string,
    so `{"` never occurs inside one and a match is always a real object.
    """
    seen = emitted = 0
    tail = b""
    for chunk in chunks:
        chunk = chunk[: max_bytes - seen]
        seen += len(chunk)
        buffer = tail + chunk
        end = 0
        for match in _CHANGE_OBJECT.finditer(buffer):
            yield match.group(0)
            emitted += 1
            if emitted >= max_objects:
                return
            end = match.end()
        tail = buffer[end:][-MAX_CHANGE_OBJECT_BYTES:]
        if seen >= max_bytes:
            return


def iter_changes(objects: Iterable[bytes]) -> Iterator[tuple[str, int]]:
    """(path, kind) of each well-formed change object; anything else is dropped."""
    for raw in objects:
        try:
            change = json.loads(raw)
        except ValueError:  # includes bytes that are not UTF-8
            continue
        if not isinstance(change, dict):
            continue
        path, kind = change.get("Path"), change.get("Kind")
        if isinstance(path, str) and isinstance(kind, int) and not isinstance(kind, bool):
            yield path, kind


def dist_info_package(path: str) -> tuple[str, str] | None:
    """``/.../site-packages/<name>-<version>.dist-info`` -> (canonical name, version).

    The directory name follows the wheel spec: the name with runs of ``-_.``
    written as ``_``, the version with ``-`` written as ``_``. Anything else,
    or a name or version that is not one pip could have written, is None.
    """
    if len(path) > 4096 or not path.startswith("/") or not path.isprintable():
        return None
    parts = path.split("/")
    if len(parts) < 3 or parts[-2] not in SITE_DIRECTORIES:
        return None
    if any(p in ("", ".", "..") for p in parts[1:]):
        return None
    stem, dot, suffix = parts[-1].rpartition(".")
    if not dot or suffix != "dist-info":
        return None
    name, dash, raw_version = stem.partition("-")
    if not dash or not name or len(stem) > 200:
        return None
    try:
        version = str(Version(raw_version.replace("_", "-")))
        spec = validate_pip_spec(f"{name}=={version}")
    except (InvalidVersion, PackageError):
        return None
    return canonicalize_name(pip_name(spec)), version


def packages_added(
    changes: Iterable[tuple[str, int]], max_packages: int = MAX_PACKAGES
) -> list[str]:
    """Specs (``name==version``) of the dist-info directories the container added, by name.

    A deleted dist-info (an uninstall, or the old half of an upgrade) adds
    nothing; a changed one is not new. Two added versions of one name (two
    Pythons): the later path wins, so the result depends only on the changes.
    """
    found: dict[str, str] = {}
    for path, kind in changes:
        if kind != ADDED:
            continue
        package = dist_info_package(path)
        if package is None:
            continue
        name, version = package
        if name in found or len(found) < max_packages:
            found[name] = version
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def upper_dir_changes(
    upper: str | os.PathLike[str],
    lowers: Iterable[str | os.PathLike[str]],
    deadline: float,
    max_entries: int = MAX_CHANGES_ENTRIES,
) -> Iterator[tuple[str, int]]:
    """The dist-info directories the container added, read from its overlay upper dir.

    The writable layer on the host holds exactly what the container changed, so
    walking it costs what the user wrote, not the image's size (the engine's
    own changes list walks the whole file system on some engines). Links are
    never followed; at most `max_entries` entries are looked at, until
    `deadline`, else TimeoutError. A directory that is also in a lower layer
    was changed, not added.
    """
    root = Path(upper)
    lower_roots = [Path(p) for p in lowers]
    stack = [root]
    seen = 0
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > max_entries or time.monotonic() > deadline:
                raise TimeoutError(f"more than {max_entries} changed files")
            if not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if entry.name.endswith(".dist-info") and directory.name in SITE_DIRECTORIES:
                relative = path.relative_to(root)
                if not any((lower / relative).exists() for lower in lower_roots):
                    yield "/" + relative.as_posix(), ADDED
                continue
            stack.append(path)


def _overlay_dirs(graph_driver: dict | None) -> tuple[str, list[str]] | None:
    """The container's overlay upper dir and lower dirs, if this host can read them."""
    data = (graph_driver or {}).get("Data") or {}
    if (graph_driver or {}).get("Name") != "overlay2" or not data.get("UpperDir"):
        return None
    upper = data["UpperDir"]
    if not os.access(upper, os.R_OK | os.X_OK):
        return None  # a remote or rootless engine: ask it instead
    return upper, [p for p in (data.get("LowerDir") or "").split(":") if p]


async def read_added_packages(
    container: str, timeout: float, graph_driver: dict | None = None
) -> list[str] | None:
    """What `container` pip-installed beyond its image; None if that cannot be read in time.

    From the container's overlay upper dir when the hub can read it (a local
    engine: milliseconds), else from the engine's changes list, streamed with a
    byte cap. Runs on its own thread and client (never DockerSpawner's shared
    executor) and gives up after `timeout` seconds; the thread stops by then too.
    """
    deadline = time.monotonic() + timeout
    overlay = _overlay_dirs(graph_driver)

    def from_upper_dir() -> list[str] | None:
        assert overlay is not None
        try:
            return packages_added(upper_dir_changes(overlay[0], overlay[1], deadline))
        except TimeoutError:
            return None

    def from_engine() -> list[str] | None:
        client = docker_client(timeout)
        try:
            url = client._url("/containers/{0}/changes", container)
            with client._get(url, stream=True) as response:
                client._raise_for_status(response)

                def chunks() -> Iterator[bytes]:
                    for chunk in response.iter_content(_CHUNK):
                        if time.monotonic() > deadline:
                            raise TimeoutError
                        yield chunk

                return packages_added(iter_changes(iter_change_objects(chunks())))
        except (docker.errors.DockerException, requests.exceptions.RequestException, TimeoutError):
            return None
        finally:
            client.close()

    try:
        return await asyncio.wait_for(
            asyncio.to_thread(from_upper_dir if overlay else from_engine), timeout
        )
    except asyncio.TimeoutError:
        return None


class InstalledRecords:
    """Per user and project: the packages the last session installed beyond its image."""

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

    def _project_path(self, slug: str, project: str) -> Path:
        return self.root / "projects" / slug / f"{project}.json"

    def lost_packages(self, slug: str, project: str) -> list[str]:
        """What the project's last session pip-installed that its image lacks."""
        record = self.last_session(slug, project)
        return list(record["packages"]) if record else []

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


def unsaved_notice(packages: list[str], user: str, project: str) -> str:
    """What a start tells the user about packages its last session installed and lost."""
    shown = ", ".join(packages[:8]) + (" ..." if len(packages) > 8 else "")
    return (
        f"Last session you installed packages that are not in the image and are gone "
        f"now: {shown}. Add them to the image on the ds01 image page "
        f"(/services/ds01/images/{user}/{project})."
    )


async def record_installed(
    records: InstalledRecords,
    *,
    slug: str,
    project: str,
    container: str,
    inspected: dict,
    timeout: float,
    log: logging.Logger,
) -> list[str] | None:
    """At retire: record what `container` pip-installed beyond its image (None: unread).

    Read from the container's writable layer, or the engine's list of its file
    changes, never by running anything in it, before the container is stopped
    (an auto-removed container's layer goes with it).
    """
    name = inspected.get("Name", container).lstrip("/")
    added = await read_added_packages(container, timeout, inspected.get("GraphDriver"))
    if added is None:
        log.info("No file changes for %s: not recording its packages", name)
        return None
    records.record_session(slug, project, inspected["Image"], added)
    if added:
        log.info("%s installed %s beyond its image", name, added[:20])
    return added
