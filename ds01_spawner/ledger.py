"""Who holds which GPU, as the containers record it: the ledger.

The ledger lives in Docker: every container that holds GPUs says so in its
``ds01.gpu.*`` labels (`gpu_labels`), sealed by `LedgerSeal`, so a restarted
hub sees what surviving containers hold and a container that is gone (retired,
crashed, removed behind the hub's back) holds nothing. A stopped project's GPU
kept for its owner outlives its container, so `GpuHolds` keeps it in a file.
`gpu_report` puts the two beside what NVML says: the admin view.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import labels
from .nvml import GpuSlot
from .statefiles import write_json

LIVE_STATES = frozenset({"created", "running", "restarting", "paused"})


@dataclass(frozen=True)
class Holder:
    """One GPU held by one (running or starting) server: a ledger entry."""

    uuid: str
    user: str
    project: str
    server: str
    since: str
    fraction: float = 1.0
    container: str = ""


@dataclass(frozen=True)
class Hold:
    """A stopped project's GPU, kept for its owner until `until` (gpu_hold_after_stop)."""

    uuid: str
    user: str
    project: str
    until: float


class LedgerSeal:
    """Proof that the spawner wrote a container's ledger labels.

    A container's labels merge its image's: a user's Dockerfile (or any image)
    could claim GPUs it never got. The spawner seals what it writes with an HMAC
    over the container's name and its ledger labels, keyed by a secret in the
    hub-side state directory that no container sees; the ledger (in the hub and
    in the service, which share the state directory) counts only sealed ones.
    """

    FIELDS = (
        labels.USER,
        labels.PROJECT,
        labels.SERVER_NAME,
        labels.GPU_UUIDS,
        labels.GPU_EQUIVALENTS,
        labels.GPU_ALLOCATED_AT,
    )

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "ledger.key"

    def _key(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return self.path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        return self.path.read_bytes()

    def _message(self, name: str, lab: dict[str, str]) -> bytes:
        parts = [name.lstrip("/"), *(lab.get(k, "") for k in self.FIELDS)]
        return "\n".join(parts).encode("utf-8", "replace")

    def seal(self, name: str, lab: dict[str, str]) -> str:
        return hmac.new(self._key(), self._message(name, lab), hashlib.sha256).hexdigest()

    def valid(self, name: str, lab: dict[str, str]) -> bool:
        given = lab.get(labels.GPU_SEAL, "")
        return bool(given) and hmac.compare_digest(given, self.seal(name, lab))


def holders_from_containers(
    containers: Iterable[dict],
    *,
    seal: LedgerSeal | None = None,
    inventory: Iterable[str] | None = None,
) -> list[Holder]:
    """The ledger as the engine records it: labels of live ds01 project containers.

    Only what the spawner wrote counts: the container must be a managed project
    container, sealed by `seal` (when given), holding UUIDs of the `inventory`
    (when given) at a finite, positive cost of at most one per GPU.
    """
    known = set(inventory) if inventory is not None else None
    found = []
    for c in containers:
        lab = c.get("Labels") or {}
        uuids = [u for u in lab.get(labels.GPU_UUIDS, "").split(",") if u]
        if not uuids or c.get("State", "running") not in LIVE_STATES:
            continue
        if lab.get(labels.MANAGED) != "true" or lab.get(labels.ROLE) != "project":
            continue
        names = c.get("Names") or [""]
        if seal is not None and not seal.valid(names[0], lab):
            continue
        if known is not None and not set(uuids) <= known:
            continue
        try:
            total = float(lab.get(labels.GPU_EQUIVALENTS, len(uuids)))
        except ValueError:
            total = float(len(uuids))
        if not math.isfinite(total) or total <= 0 or total > len(uuids):
            total = float(len(uuids))  # never cheaper than what the labels name
        since = lab.get(labels.GPU_ALLOCATED_AT, "")
        container = names[0].lstrip("/")
        found += [labelled_holder(u, lab, since, container, total / len(uuids)) for u in uuids]
    return found


def labelled_holder(
    uuid: str, lab: dict[str, str], since: str, container: str, fraction: float = 1.0
) -> Holder:
    """A ledger entry for `uuid`, its holder named by a container's or service's labels."""
    return Holder(
        uuid=uuid,
        user=lab.get(labels.USER, "?"),
        project=lab.get(labels.PROJECT, "?"),
        server=lab.get(labels.SERVER_NAME, ""),
        since=since,
        fraction=fraction,
        container=container,
    )


class GpuHolds:
    """GPUs kept for the owners of stopped projects (`gpu_hold_after_stop`).

    A hold outlives its container, so it cannot be a label: it is a small JSON
    file in the state directory, changed under a file lock, and read (expired
    entries dropped) on every GPU decision.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "gpu_holds.json"

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[Hold]:
        try:
            return [Hold(**entry) for entry in json.loads(self.path.read_text())]
        except (OSError, ValueError, TypeError):
            return []

    def _write(self, holds: list[Hold]) -> None:
        write_json(self.path, [asdict(h) for h in holds])

    def active(self, now: float | None = None) -> list[Hold]:
        now = time.time() if now is None else now
        return [h for h in self._read() if h.until > now]

    def keep(self, user: str, project: str, uuids: Iterable[str], seconds: float) -> list[Hold]:
        until = time.time() + seconds
        new = [Hold(uuid, user, project, until) for uuid in uuids]
        with self._locked():
            taken = {h.uuid for h in new}
            self._write([h for h in self.active() if h.uuid not in taken] + new)
        return new

    def release(self, user: str, project: str | None = None, uuids: Iterable[str] = ()) -> None:
        """Drop `user`'s holds on `uuids`, or for `project` (its restart took them back)."""
        gone = set(uuids)
        with self._locked():
            current = self.active()
            kept = [
                h
                for h in current
                if h.user != user or (h.uuid not in gone and h.project != project)
            ]
            if len(kept) != len(current):
                self._write(kept)


def gpu_labels(slots: list[GpuSlot], since: str) -> dict[str, str]:
    """The ledger labels of a container holding `slots` (empty values for none)."""
    return {
        labels.GPU_UUIDS: ",".join(s.uuid for s in slots),
        labels.GPU_INDICES: ",".join(s.index for s in slots),
        labels.GPU_EQUIVALENTS: f"{sum(s.fraction for s in slots):g}",
        labels.GPU_ALLOCATED_AT: since if slots else "",
    }


def held_uuids(container_labels: dict[str, str]) -> list[str]:
    """The GPUs a container's ledger labels say it holds."""
    return [u for u in (container_labels or {}).get(labels.GPU_UUIDS, "").split(",") if u]


def gpu_audit_fields(container_labels: dict[str, str]) -> dict[str, object] | None:
    """What a gpu grant or release in the audit trail says of a container's ledger labels
    (the GPUs, their equivalents, since when); None when it holds no GPU."""
    uuids = held_uuids(container_labels)
    if not uuids:
        return None
    try:
        equivalents: float | None = float(container_labels.get(labels.GPU_EQUIVALENTS) or 0)
    except ValueError:
        equivalents = None
    since = container_labels.get(labels.GPU_ALLOCATED_AT) or None
    return {"uuids": uuids, "equivalents": equivalents, "since": since}


def _holder_row(h: Holder) -> dict:
    return {
        "user": h.user,
        "project": h.project,
        "server": h.server,
        "since": h.since,
        "container": h.container,
    }


def _hold_row(hold: Hold | None) -> dict | None:
    if hold is None:
        return None
    until = time.strftime("%H:%M", time.localtime(hold.until))
    return {"user": hold.user, "project": hold.project, "until": hold.until, "until_text": until}


def gpu_report(
    slots: list[GpuSlot], holders: list[Holder], holds: Iterable[Hold] = ()
) -> list[dict]:
    """Who holds which GPU, with what NVML says of it now: the admin view's rows."""
    by_uuid: dict[str, list[Holder]] = {}
    for h in holders:
        by_uuid.setdefault(h.uuid, []).append(h)
    kept = {h.uuid: h for h in holds}
    rows = [
        {
            "index": s.index,
            "uuid": s.uuid,
            "name": s.name,
            "mig": s.is_mig,
            "memory_used": s.memory_used,
            "memory_total": s.memory_total,
            "utilization": s.utilization,
            "holders": [_holder_row(h) for h in by_uuid.pop(s.uuid, [])],
            "kept_for": _hold_row(kept.get(s.uuid)),
        }
        for s in slots
    ]
    # held, but no longer in the inventory (a GPU that fell off the bus, reserved later, ...)
    rows += [
        {
            "index": "?",
            "uuid": uuid,
            "name": "not in inventory",
            "mig": False,
            "memory_used": None,
            "memory_total": None,
            "utilization": None,
            "holders": [_holder_row(h) for h in hs],
            "kept_for": None,
        }
        for uuid, hs in by_uuid.items()
    ]
    return rows
