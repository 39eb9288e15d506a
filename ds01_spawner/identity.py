"""Who a hub user is on the host: a name safe in Docker and paths (theirs alone), a uid/gid.

Hub usernames can be e-mail addresses, LDAP names or numbers; Docker image
names, container names and directories need something narrower. The uid/gid is
what the user's containers run as and what owns their workspaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .statefiles import write_json

log = logging.getLogger(__name__)

_PLAIN_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-)){0,31}$")


def natural_slug(username: str) -> str:
    """The slug `username` gets unless another user holds it first (see SlugRegistry).

    Plain names (``[a-z0-9-]``, at most 32 characters, no ``--``, no trailing
    ``-``) are kept as they are so admins recognise them. Anything else is
    folded to ``[a-z0-9-]`` and suffixed with a hash of the original, so
    ``H.Baker@uni.edu`` and ``h-baker-uni-edu`` never share a slug. Alone this
    is not injective: the plain name ``h-baker-uni-edu-<that hash>`` is its own
    natural slug too. Only `SlugRegistry` hands out slugs.
    """
    if _PLAIN_NAME.fullmatch(username) and not username.endswith("-"):
        return username
    folded = re.sub(r"[^a-z0-9]+", "-", username.lower()).strip("-")[:20].strip("-")
    digest = hashlib.sha256(username.encode("utf-8")).hexdigest()[:8]
    return f"{folded or 'user'}-{digest}"


# Name-only, for tests and scripts that compute where a user's objects lie when
# that user's slug is known to be natural (a unique name on a fresh state_dir).
# Code with a state_dir asks SlugRegistry.
user_slug = natural_slug


def choose_slug(username: str, taken: set[str]) -> str:
    """The slug for `username`, seen for the first time, while `taken` are held.

    Its natural slug when free, else that slug plus ``-2``, ``-3``, ...: first
    come, first served, never a slug someone holds. Only a fold-shaped name
    (``...-<8 hex>``) can find its natural slug taken, so the suffixed one
    (ending ``-<n>``) looks like no other user's natural slug.
    """
    natural = natural_slug(username)
    slug, n = natural, 1
    while slug in taken:
        n += 1
        slug = f"{natural}-{n}"
    return slug


@contextlib.contextmanager
def _locked_names(path: Path) -> Iterator[dict[str, Any]]:
    """The ``{hub user: value}`` map in `path`, under an exclusive lock held until the
    block ends; written back (atomically) if the block changed it.

    One lock file per map, shared by every process (hub, service) using it, so
    two of them never hand out the same value.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        names = _read_names(path)
        before = dict(names)
        yield names
        if names != before:
            write_json(path, {"users": names}, indent=1, sort_keys=True)


def _read_names(path: Path) -> dict[str, Any]:
    """The map as last written (readable without the lock: writes replace the file)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {str(k): v for k, v in data.get("users", {}).items()}


class SlugRegistry:
    """Which slug each hub user has: chosen at first sight, then kept forever.

    The slug names a user's workspaces, image repositories, containers and
    project records, so two users must never share one; a name-only function
    cannot promise that (see `natural_slug`), a shared record can. Every
    process (hub, image service) reads the same file in state_dir.

    Migration: before the registry, every object was named by the natural
    slug, and that is what a user gets at first sight, so existing workspaces,
    images and records stay where they are. `legacy_owners(slug)` names who
    already has objects under `slug`: a slug holding only other users' objects
    counts as taken, so a literal twin that signs in first cannot walk into
    them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        legacy_owners: Callable[[str], set[str]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.legacy_owners = legacy_owners or (lambda slug: set())

    def slug_for(self, username: str) -> str:
        known = _read_names(self.path).get(username)
        if known is not None:
            return str(known)
        with _locked_names(self.path) as names:
            if username not in names:
                names[username] = self._choose(username, set(names.values()))
            return str(names[username])

    def _choose(self, username: str, registered: set[str]) -> str:
        taken = set(registered)
        while True:
            slug = choose_slug(username, taken)
            owners = self.legacy_owners(slug)
            if not owners or username in owners:
                break
            taken.add(slug)
        natural = natural_slug(username)
        if slug != natural and username in self.legacy_owners(natural):
            log.warning(
                "Hub user %r has projects under slug %r, which another user holds; their "
                "slug is %r from now on. An admin must move their workspaces and records.",
                username,
                natural,
                slug,
            )
        return slug


@dataclass(frozen=True)
class UserIds:
    """The uid/gid a user's containers run as, and where they came from."""

    uid: int
    gid: int
    source: str  # "system", "allocated" or "hook"

    def __post_init__(self) -> None:
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError(
                f"refusing uid/gid {self.uid}:{self.gid}: containers never run as root"
            )

    @property
    def docker_user(self) -> str:
        return f"{self.uid}:{self.gid}"


def system_ids(username: str) -> UserIds | None:
    """The uid/gid of the host account named `username`, if there is one."""
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        return None
    return UserIds(entry.pw_uid, entry.pw_gid, "system")


class UidAllocator:
    """Hands out stable uids to hub users that have no host account.

    The mapping is a small JSON file guarded by an exclusive lock, so every
    hub process sees the same answer and two users never share a uid (which a
    hash of the name could not promise). Each user gets a private group with
    gid == uid. Uids that belong to host accounts are skipped.
    """

    def __init__(self, path: str | os.PathLike[str], first: int, last: int) -> None:
        if not 0 < first <= last:
            raise ValueError(f"invalid uid range {first}-{last}")
        self.path = Path(path)
        self.first = first
        self.last = last

    def ids_for(self, username: str) -> UserIds:
        with _locked_names(self.path) as names:
            if username not in names:
                names[username] = self._next_free({int(v) for v in names.values()})
            uid = int(names[username])
        return UserIds(uid, uid, "allocated")

    def _next_free(self, taken: set[int]) -> int:
        for uid in range(self.first, self.last + 1):
            if uid in taken:
                continue
            try:
                pwd.getpwuid(uid)
            except KeyError:
                return uid
        raise RuntimeError(f"no free uid left in {self.first}-{self.last}; widen uid_range")


def resolve_ids(
    username: str,
    *,
    use_system_users: bool,
    min_system_uid: int,
    allocator: UidAllocator,
    hook: Callable[[], tuple[int, int] | None] | None = None,
) -> UserIds:
    """The admin's `hook` first, then the system account (when enabled), else a stable
    allocated uid.

    A hub user whose name matches a service account (``daemon``, ``www-data``,
    uid below `min_system_uid`) is refused rather than run as that account.
    """
    if hook is not None:
        ids = hook()
        if ids is not None:
            return UserIds(int(ids[0]), int(ids[1]), "hook")
    if use_system_users:
        ids = system_ids(username)
        if ids is not None:
            if ids.uid < min_system_uid:
                raise ValueError(
                    f"hub user {username!r} matches system account uid {ids.uid}, "
                    f"below min_system_uid={min_system_uid}; refusing to run as it"
                )
            return ids
    return allocator.ids_for(username)
