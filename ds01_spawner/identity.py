"""Who a hub user is on the host: a name that is safe in Docker and paths, and a uid/gid.

Hub usernames can be e-mail addresses, LDAP names or numbers; Docker image
names, container names and directories need something narrower. The uid/gid is
what the user's containers run as and what owns their workspaces.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from .statefiles import write_json

_PLAIN_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-)){0,31}$")


def user_slug(username: str) -> str:
    """A stable name for `username` usable in image names, container names and paths.

    Plain names (``[a-z0-9-]``, at most 32 characters, no ``--``, no trailing
    ``-``) are kept as they are so admins recognise them. Anything else is
    folded to ``[a-z0-9-]`` and suffixed with a hash of the original, so
    ``H.Baker@uni.edu`` and ``h-baker-uni-edu`` never share a slug.
    """
    if _PLAIN_NAME.fullmatch(username) and not username.endswith("-"):
        return username
    folded = re.sub(r"[^a-z0-9]+", "-", username.lower()).strip("-")[:20].strip("-")
    digest = hashlib.sha256(username.encode("utf-8")).hexdigest()[:8]
    return f"{folded or 'user'}-{digest}"


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(".lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            mapping = self._read()
            uid = mapping.get(username)
            if uid is None:
                uid = self._next_free(set(mapping.values()))
                mapping[username] = uid
                self._write(mapping)
        return UserIds(uid, uid, "allocated")

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): int(v) for k, v in data.get("users", {}).items()}

    def _write(self, mapping: dict[str, int]) -> None:
        write_json(self.path, {"users": mapping}, indent=1, sort_keys=True)

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
    username: str, *, use_system_users: bool, min_system_uid: int, allocator: UidAllocator
) -> UserIds:
    """System account first (when enabled), otherwise a stable allocated uid.

    A hub user whose name matches a service account (``daemon``, ``www-data``,
    uid below `min_system_uid`) is refused rather than run as that account.
    """
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
