"""GPU assignment: the ledger of who holds which GPU, and the choice of a free one.

The ledger lives in Docker: every container that holds GPUs says so in its
``ds01.gpu.*`` labels, so a restarted hub sees what surviving containers hold
and a container that is gone (retired, crashed, removed behind the hub's back)
holds nothing. `choose` is a pure function of (GPUs, ledger, request, policy);
`GpuAllocator` wraps it in a lock and remembers the GPUs it handed out until
the container carrying their labels exists, so concurrent spawns never get the
same GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import docker

from . import labels
from .nvml import GpuInventory, GpuSlot, NvmlInventory, SimulatedInventory
from .statefiles import write_json

LIVE_STATES = frozenset({"created", "running", "restarting", "paused"})


class GpuRefusal(Exception):
    """No GPU can be given; the message says why and what the researcher can do."""


@dataclass(frozen=True)
class GpuPolicy:
    """The admin's rules for handing out GPUs (see DS01Spawner's gpu settings)."""

    max_per_user: float = 1.0  # GPU-equivalents across all of a user's servers
    max_per_project: float | None = None  # GPU-equivalents one server may hold
    allow_full_gpu: bool = True  # False: MIG slices only
    containers_per_gpu: int = 1  # 1: exclusive; N: up to N containers share a GPU
    reserved: frozenset[str] = frozenset()  # UUIDs or indices never handed out
    offer_mig: bool = False
    busy_memory_fraction: float = 0.10  # an unheld GPU using more is busy (outside process)
    busy_utilization: int = 10  # ... or more than this % utilization


@dataclass(frozen=True)
class GpuRequest:
    user: str
    project: str
    server: str
    count: int
    mig: bool = False


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
        for uuid in uuids:
            found.append(
                Holder(
                    uuid=uuid,
                    user=lab.get(labels.USER, "?"),
                    project=lab.get(labels.PROJECT, "?"),
                    server=lab.get(labels.SERVER_NAME, ""),
                    since=lab.get(labels.GPU_ALLOCATED_AT, ""),
                    fraction=total / len(uuids),
                    container=names[0].lstrip("/"),
                )
            )
    return found


def _gpus(n: float) -> str:
    n = round(n, 3)
    return f"{n:g} GPU" + ("" if n == 1 else "s")


def _busy_outside(slot: GpuSlot, policy: GpuPolicy) -> bool:
    if slot.memory_total and slot.memory_used > policy.busy_memory_fraction * slot.memory_total:
        return True
    return slot.utilization is not None and slot.utilization > policy.busy_utilization


def _index_key(slot: GpuSlot) -> tuple[int, ...]:
    """'10' after '2', '1:3' after '1:2': indices compare as numbers."""
    return tuple(int(part) for part in slot.index.split(":") if part.isdigit())


def choose(
    slots: list[GpuSlot],
    holders: list[Holder],
    request: GpuRequest,
    policy: GpuPolicy,
    holds: Iterable[Hold] = (),
) -> list[GpuSlot]:
    """The GPUs (or MIG devices) to give `request`, or GpuRefusal saying why not.

    Among free ones, the least loaded first: most free memory, then lowest
    utilization as NVML reports them. A GPU no ds01 server holds but that a
    process outside the hub is using (memory or utilization over the policy's
    thresholds) is not free. A GPU held for another user's stopped project
    (`holds`) is not free either; one held for the requester is taken first.
    """
    if request.count <= 0:
        return []
    if request.mig and not policy.offer_mig:
        raise GpuRefusal("MIG slices are not offered on this server; ask for whole GPUs")
    if not request.mig and not policy.allow_full_gpu:
        advice = "ask for a MIG slice" if policy.offer_mig else "start without a GPU"
        raise GpuRefusal(
            f"your limits allow MIG slices only, not whole GPUs (allow_full_gpu); {advice}"
        )
    # entries of this very server are about to be replaced, not competing
    holders = [h for h in holders if (h.user, h.server) != (request.user, request.server)]
    mine = [h for h in holders if h.user == request.user]
    used = sum(h.fraction for h in mine)

    kind = [s for s in slots if s.is_mig == request.mig]
    usable = [s for s in kind if s.uuid not in policy.reserved and s.index not in policy.reserved]
    noun = "MIG slices" if request.mig else "GPUs"
    if not usable:
        raise GpuRefusal(f"this server has no {noun} to hand out; start without a GPU")

    held = Counter(h.uuid for h in holders)
    kept = {h.uuid: h for h in holds}
    free, outside, kept_for_others = [], 0, 0
    for s in usable:
        if held[s.uuid] >= policy.containers_per_gpu:
            continue
        hold = kept.get(s.uuid)
        if hold is not None and hold.user != request.user:
            kept_for_others += 1
            continue
        if held[s.uuid] == 0 and hold is None and _busy_outside(s, policy):
            outside += 1
            continue
        free.append(s)

    def mine_first(s: GpuSlot) -> int:
        hold = kept.get(s.uuid)
        return 2 if hold is None else 0 if hold.project == request.project else 1

    free.sort(
        key=lambda s: (
            mine_first(s),
            held[s.uuid],
            -s.memory_free,
            s.utilization or 0,
            _index_key(s),
        )
    )

    asked = sum(s.fraction for s in free[: request.count]) if request.mig else request.count
    if policy.max_per_project is not None and asked > policy.max_per_project + 1e-9:
        raise GpuRefusal(
            f"one project may hold at most {_gpus(policy.max_per_project)} "
            f"(max_gpus_per_project); you asked for {_gpus(asked)}"
        )
    if used + asked > policy.max_per_user + 1e-9:
        projects = sorted({f"{h.project!r}" for h in mine})
        holding = (
            f"; {' and '.join(projects)} hold{'s' if len(projects) == 1 else ''} {_gpus(used)}"
            if mine
            else ""
        )
        advice = " Stop a project holding a GPU, or start this one without a GPU." if mine else ""
        raise GpuRefusal(
            f"your limit is {_gpus(policy.max_per_user)}{holding}: "
            f"asking for {_gpus(asked)} more would exceed it.{advice}"
        )
    if len(free) < request.count:
        in_use = len(usable) - len(free) - outside - kept_for_others
        parts = [f"{in_use} held by running servers"] if in_use else []
        if kept_for_others:
            parts.append(f"{kept_for_others} kept for a stopped project's quick restart")
        if outside:
            parts.append(f"{outside} busy with work outside the hub")
        if free:
            have = (
                f"only {len(free)} of {len(usable)} {noun} {'is' if len(free) == 1 else 'are'} free"
            )
        else:
            have = f"all {len(usable)} {noun} are in use"
        raise GpuRefusal(
            f"{have} ({', '.join(parts)}); you asked for {request.count}. A GPU frees up "
            "as soon as a server holding one stops: try again later, ask for fewer, "
            "or start without a GPU."
        )
    return free[: request.count]


@dataclass
class GpuAllocator:
    """Race-free assignment: choose under a lock, count handed-out GPUs until labelled.

    `list_containers` returns the engine's ds01 containers (docker API dicts);
    it is read on every decision, so the ledger is never stale.
    """

    inventory: GpuInventory
    list_containers: Callable[[], Awaitable[list[dict]]]
    seal: LedgerSeal | None = None
    _pending: dict[tuple[str, str], list[Holder]] = field(default_factory=dict)
    _lock: asyncio.Lock | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def _guard(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:  # one hub, one loop (tests run many)
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock

    async def ledger(self) -> list[Holder]:
        pending = [h for entries in self._pending.values() for h in entries]
        claimed = set(self._pending)
        # a sealed container naming a GPU that left the inventory still holds it
        # (the admin page lists it as such); unsealed labels never count
        engine = [
            h
            for h in holders_from_containers(await self.list_containers(), seal=self.seal)
            if (h.user, h.server) not in claimed
        ]
        return engine + pending

    async def slots(self) -> list[GpuSlot]:
        return await asyncio.to_thread(self.inventory.read)

    async def allocate(
        self, request: GpuRequest, policy: GpuPolicy, since: str, holds: Iterable[Hold] = ()
    ) -> list[GpuSlot]:
        async with self._guard():
            slots = await self.slots()
            chosen = choose(slots, await self.ledger(), request, policy, holds)
            if chosen:
                self._pending[(request.user, request.server)] = [
                    Holder(
                        s.uuid,
                        request.user,
                        request.project,
                        request.server,
                        since,
                        s.fraction,
                        "(starting)",
                    )
                    for s in chosen
                ]
            return chosen

    def settle(self, user: str, server: str) -> None:
        """The server's container now carries the labels (or will never exist)."""
        self._pending.pop((user, server), None)


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


_allocators: dict[tuple[int, str], GpuAllocator] = {}


def gpu_allocator(simulated_gpus: int, state_dir: str) -> GpuAllocator:
    """This process's allocator over NVML (or N simulated GPUs) and the engine's ledger.

    One per process (and state directory, whose key seals the ledger), so every
    spawn shares its lock and its pending list.
    """
    key = (simulated_gpus, str(state_dir))
    if key not in _allocators:
        inventory: GpuInventory = (
            SimulatedInventory(simulated_gpus) if simulated_gpus else NvmlInventory()
        )
        client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())

        async def list_containers() -> list[dict]:
            # own client on the default thread pool: never queued behind DockerSpawner's executor
            return await asyncio.to_thread(
                client.containers, all=True, filters=labels.managed_filter()
            )

        _allocators[key] = GpuAllocator(inventory, list_containers, LedgerSeal(state_dir))
    return _allocators[key]


def gpu_labels(slots: list[GpuSlot], since: str) -> dict[str, str]:
    """The ledger labels of a container holding `slots` (empty values for none)."""
    return {
        labels.GPU_UUIDS: ",".join(s.uuid for s in slots),
        labels.GPU_INDICES: ",".join(s.index for s in slots),
        labels.GPU_EQUIVALENTS: f"{sum(s.fraction for s in slots):g}",
        labels.GPU_ALLOCATED_AT: since if slots else "",
    }


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
