"""GPU assignment: the choice of a free GPU, and the allocator that hands it out.

`choose` is a pure function of (GPUs, ledger, request, policy); the ledger of
who holds which GPU is `ledger`. `GpuAllocator` wraps `choose` in a lock and
remembers the GPUs it handed out until the container carrying their labels
exists, so concurrent spawns never get the same GPU.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from . import labels
from .engine import docker_client
from .ledger import Hold, Holder, LedgerSeal, holders_from_containers
from .nvml import GpuInventory, GpuSlot, GpuUnavailable, NvmlInventory, SimulatedInventory


class GpuRefusal(Exception):
    """No GPU can be given; the message says why and what the researcher can do."""


class GpuShortage(GpuRefusal):
    """Not enough free GPUs right now (but the request is allowed): waiting may help."""


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
    if len(usable) < request.count:
        raise GpuRefusal(
            f"this server has {len(usable)} {noun} to hand out; you asked for {request.count}"
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
        raise GpuShortage(
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

    def lock(self) -> asyncio.Lock:
        """The lock every GPU decision of this process is taken under."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:  # one hub, one loop (tests run many)
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock

    async def ledger(self, containers: list[dict] | None = None) -> list[Holder]:
        """Who holds what: the engine's `containers` (listed now if not given) and the
        GPUs handed out whose containers do not exist yet."""
        if containers is None:
            containers = await self.list_containers()
        # a sealed container naming a GPU that left the inventory still holds it
        # (the admin page lists it as such); unsealed labels never count
        return self.with_pending(holders_from_containers(containers, seal=self.seal))

    def with_pending(self, found: Iterable[Holder]) -> list[Holder]:
        """The ledger `found` on the engine, and the GPUs handed out to servers that do not
        hold them there yet (in place of what the engine says of those servers)."""
        claimed = set(self._pending)
        pending = [h for entries in self._pending.values() for h in entries]
        return [h for h in found if (h.user, h.server) not in claimed] + pending

    async def slots(self) -> list[GpuSlot]:
        return await asyncio.to_thread(self.inventory.read)

    async def state(self) -> tuple[list[GpuSlot] | None, list[Holder]]:
        """The GPUs and the ledger now; no GPUs (None) where NVML cannot be read."""
        try:
            slots = await self.slots()
        except GpuUnavailable:
            return None, []
        return slots, await self.ledger()

    async def allocate(
        self, request: GpuRequest, policy: GpuPolicy, since: str, holds: Iterable[Hold] = ()
    ) -> list[GpuSlot]:
        async with self.lock():
            slots = await self.slots()
            chosen = choose(slots, await self.ledger(), request, policy, holds)
            self.claim(request, chosen, since)
            return chosen

    def claim(self, request: GpuRequest, chosen: list[GpuSlot], since: str) -> None:
        """Count `chosen` as held by the request's server until it settles (lock held)."""
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

    def settle(self, user: str, server: str) -> None:
        """The server's container now carries the labels (or will never exist)."""
        self._pending.pop((user, server), None)


def gpu_allocator(simulated_gpus: int, state_dir: str) -> GpuAllocator:
    """An allocator over NVML (or N simulated GPUs) and the engine's ledger.

    Make one per process and state directory (whose key seals the ledger), so
    every spawn shares its lock and its pending list: `DS01Settings.gpu_allocator`.
    """
    inventory: GpuInventory = (
        SimulatedInventory(simulated_gpus) if simulated_gpus else NvmlInventory()
    )
    client = docker_client()

    async def list_containers() -> list[dict]:
        # own client on the default thread pool: never queued behind DockerSpawner's executor
        return await asyncio.to_thread(client.containers, all=True, filters=labels.managed_filter())

    return GpuAllocator(inventory, list_containers, LedgerSeal(state_dir))
