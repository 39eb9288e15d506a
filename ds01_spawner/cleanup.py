"""Which images the cleaner removes, and why: a pure decision over plain facts.

`plan` takes what the engine and the project records say (images, the images
containers use, which projects run, when each project was last used, the
disk) and the policy's `images` section, and returns the removals in order:

1. ``superseded``: a project's ``:previous`` kept `keep_previous_for` after
   the rebuild that replaced it;
2. ``dangling``: untagged images ds01 made (a ``ds01.*`` label: a replaced
   ``:previous``, a failed build's last layer), older than a build may run;
3. ``disk_watermark``: while the image disk is fuller than the high
   watermark, stopped projects' images, least recently used project first
   (its ``:previous``, then its ``:latest`` unless used or built within
   `keep_latest_for`), until the disk would be under the low watermark.

Never an image a container uses (running or not), never a project that is
running or building, never a project this hub has no record of. The service's
`service/cleaner.py` gathers the facts and removes; `CleanedRecords` tells the
next start of a project why its image is gone (`rebuild_notice`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import labels
from .limits import ImageSettings
from .projects import validate_project_name
from .statefiles import write_json

# ds01-<slug>/<project>:<tag>, as images.image_ref writes it
PROJECT_TAG = re.compile(r"^ds01-(?P<slug>[a-z0-9-]+)/(?P<project>[a-z][a-z0-9-]*):(?P<tag>\w+)$")
REASONS = ("superseded", "dangling", "disk_watermark", "project_deleted")
REASON_WORDS = {
    "superseded": "replaced by a rebuild long enough ago",
    "dangling": "an untagged leftover of a build",
    "disk_watermark": "the image disk was nearly full and the project unused the longest",
    "project_deleted": "its project was deleted",
}


@dataclass(frozen=True)
class ImageFacts:
    """One image as the engine lists it."""

    id: str
    tags: tuple[str, ...] = ()  # "repo:tag"; empty when untagged
    created: float = 0.0
    size: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DiskUsage:
    """The file system holding the engine's images."""

    used: int
    total: int

    @property
    def share(self) -> float:
        return self.used / self.total if self.total else 0.0


@dataclass(frozen=True)
class Known:
    """A project this hub has a record of: its owner and when it was last started
    (or created, if never)."""

    owner: str
    last_used: float


@dataclass(frozen=True)
class Facts:
    images: tuple[ImageFacts, ...]
    used_ids: frozenset[str]  # images of every container, running or not
    running: frozenset[tuple[str, str]]  # (user, project) with a running container
    projects: Mapping[str, Known]  # image repository -> its project's record
    building: frozenset[str] = frozenset()  # repositories being built now
    disk: DiskUsage | None = None  # None: unknown, no watermark pass
    now: float = 0.0


@dataclass(frozen=True)
class Removal:
    ref: str  # "repo:tag", or the id of an untagged image
    image_id: str
    reason: str
    bytes: int  # what it frees: 0 when the image keeps another tag
    user: str = ""
    project: str = ""
    slug: str = ""

    @property
    def tag(self) -> str:
        return self.ref.rpartition(":")[2] if self.slug else ""


@dataclass(frozen=True)
class ProjectImage:
    slug: str
    project: str
    tag: str
    image: ImageFacts

    @property
    def repository(self) -> str:
        return f"ds01-{self.slug}/{self.project}"

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def owner(self) -> str:
        return self.image.labels.get(labels.USER, "")


def project_images(images: Iterable[ImageFacts]) -> dict[str, dict[str, ProjectImage]]:
    """repository -> tag -> image, for the tags of ds01's project images only: an image
    the spawner built (managed, role project) under a name `images.image_ref` writes."""
    found: dict[str, dict[str, ProjectImage]] = {}
    for image in images:
        if image.labels.get(labels.MANAGED) != "true" or image.labels.get(labels.ROLE) != "project":
            continue
        for ref in image.tags:
            match = PROJECT_TAG.match(ref)
            if match and match["project"] == image.labels.get(labels.PROJECT):
                entry = ProjectImage(match["slug"], match["project"], match["tag"], image)
                found.setdefault(entry.repository, {})[entry.tag] = entry
    return found


def is_ds01_leftover(image: ImageFacts) -> bool:
    """Untagged, and ds01's: its own labels, or those inherited from ds01's base image."""
    return not image.tags and any(k.startswith("ds01.") for k in image.labels)


def plan(facts: Facts, settings: ImageSettings, *, dangling_grace: float = 0.0) -> list[Removal]:
    """The removals the policy asks for, in order (see the module's docstring).

    `dangling_grace`: an untagged image younger than this may be a running
    build's last layer, so it stays (the service passes `build_time_limit`).
    """
    tags_left = {i.id: set(i.tags) for i in facts.images}
    removals: list[Removal] = []

    def remove(entry: ProjectImage, reason: str) -> int:
        tags_left[entry.image.id].discard(entry.ref)
        freed = 0 if tags_left[entry.image.id] else entry.image.size
        removals.append(
            Removal(
                entry.ref, entry.image.id, reason, freed, entry.owner, entry.project, entry.slug
            )
        )
        return freed

    def known(repo: str, tags: Mapping[str, ProjectImage]) -> bool:
        record = facts.projects.get(repo)
        owners = {e.owner for e in tags.values()}
        return record is not None and owners == {record.owner} and repo not in facts.building

    repos = {repo: tags for repo, tags in project_images(facts.images).items() if known(repo, tags)}

    def removable(entry: ProjectImage | None) -> bool:
        return entry is not None and entry.image.id not in facts.used_ids

    # 1. superseded :previous
    keep = settings.keep_previous_for
    for tags in repos.values():
        previous, latest = tags.get("previous"), tags.get("latest")
        if keep is None or not removable(previous):
            continue
        replaced_at = max(previous.image.created, latest.image.created if latest else 0.0)
        if facts.now - replaced_at >= keep:
            remove(previous, "superseded")

    # 2. dangling leftovers
    for image in facts.images:
        if (
            is_ds01_leftover(image)
            and image.id not in facts.used_ids
            and facts.now - image.created >= dangling_grace
        ):
            user, project = image.labels.get(labels.USER, ""), image.labels.get(labels.PROJECT, "")
            removals.append(Removal(image.id, image.id, "dangling", image.size, user, project))

    # 3. the disk watermark: stopped projects, least recently used first
    disk = facts.disk
    if disk is None or not disk.total or disk.share <= settings.disk_high_watermark:
        return removals
    used = disk.used - sum(r.bytes for r in removals)
    stopped = []
    for repo, tags in repos.items():
        any_entry = next(iter(tags.values()))
        if (any_entry.owner, any_entry.project) in facts.running:
            continue
        latest = tags.get("latest")
        last = max(facts.projects[repo].last_used, latest.image.created if latest else 0.0)
        stopped.append((last, repo, tags))
    stopped.sort(key=lambda s: (s[0], s[1]))
    keep_latest = settings.keep_latest_for
    for last, _repo, tags in stopped:
        for tag in ("previous", "latest"):
            if used / disk.total < settings.disk_low_watermark:
                return removals
            entry = tags.get(tag)
            if not removable(entry) or entry.ref not in tags_left[entry.image.id]:
                continue
            if tag == "latest" and (keep_latest is None or facts.now - last < keep_latest):
                continue
            used -= remove(entry, "disk_watermark")
    return removals


# ---------------------------------------------------------------- why a start rebuilds


class CleanedRecords:
    """`{state_dir}/cleaned/<slug>/<project>.json`: a project's :latest the cleaner removed,
    kept until the project's next start says why it rebuilds (`take`)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "cleaned"

    def _path(self, slug: str, project: str) -> Path:
        if not re.fullmatch(r"[a-z0-9-]+", slug):
            raise ValueError(f"not a slug: {slug!r}")
        return self.root / slug / f"{validate_project_name(project)}.json"

    def record(self, slug: str, project: str, reason: str, at: float | None = None) -> None:
        path = self._path(slug, project)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(path, {"removed_at": time.time() if at is None else at, "reason": reason})

    def read(self, slug: str, project: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._path(slug, project).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def take(self, slug: str, project: str) -> dict[str, Any] | None:
        """The record, forgotten once read: only the first start after a removal says so."""
        record = self.read(slug, project)
        if record is not None:
            self.forget(slug, project)
        return record

    def forget(self, slug: str, project: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self._path(slug, project).unlink()


def rebuild_message(ref: str, record: Mapping[str, Any]) -> str:
    """What the spawn page says before rebuilding an image the cleaner removed."""
    reason = str(record.get("reason", ""))
    try:
        day = time.strftime("%Y-%m-%d", time.localtime(float(record["removed_at"])))
    except (KeyError, TypeError, ValueError, OverflowError):
        day = "an earlier day"
    why = f"{reason}: {REASON_WORDS[reason]}" if reason in REASON_WORDS else reason or "unknown"
    return f"Image {ref} was removed by the image cleaner on {day} ({why}): rebuilding it"


def rebuild_notice(state_dir: str | os.PathLike[str], slug: str, project: str) -> str | None:
    """The spawner's line when the project's image is missing because the cleaner removed it
    (None otherwise); the record is used up."""
    try:
        record = CleanedRecords(state_dir).take(slug, project)
    except ValueError:
        return None
    if record is None:
        return None
    return rebuild_message(f"ds01-{slug}/{project}", record)
