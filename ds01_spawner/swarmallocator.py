"""The GPU allocator on a swarm (`ds01-swarm`): `SwarmGpus`, read from a manager.

The same `gpus.GpuAllocator` (its lock, its claims, the GPU queue in front of
it) over the swarm ledger (swarmledger.py) instead of one engine's
containers and NVML: the policy and the fair queue decide whether and when a
server gets GPUs, the swarm which. The hub's swarm spawner and the ds01
service both get it from `DS01Settings.gpu_allocator` when `swarm_gpu_kind`
is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import labels
from .engine import docker_client
from .gpus import GpuAllocator
from .ledger import Holder, LedgerSeal
from .nvml import GpuSlot
from .swarmledger import gpu_slots, holders, node_gpus
from .swarmservice import GPU_KIND


@dataclass(frozen=True)
class SwarmListing:
    """One read of the swarm: its nodes, ds01's services and the live tasks."""

    nodes: list[dict[str, Any]]
    services: list[dict[str, Any]]
    tasks: list[dict[str, Any]]


def read_swarm(client: Any) -> SwarmListing:
    """Everything the swarm ledger is made of, from a manager (docker-py APIClient)."""
    return SwarmListing(
        client.nodes(),
        client.services(filters={"label": f"{labels.MANAGED}=true"}),
        client.tasks(filters={"desired-state": "running"}),
    )


class SwarmInventory:
    """The nodes' declared GPUs that can be given now (ready, active nodes)."""

    def __init__(self, client: Callable[[], Any], kind: str = GPU_KIND) -> None:
        self.client, self.kind = client, kind

    def read(self) -> list[GpuSlot]:
        client = self.client()
        try:
            return gpu_slots(node_gpus(client.nodes(), self.kind))
        finally:
            client.close()


@dataclass
class SwarmGpus(GpuAllocator):
    """The GPU allocator on a swarm: the nodes' GPUs and the swarm ledger, read from a
    manager (the engine DOCKER_HOST names) on each decision.

    The same lock, claims and GPU queue as on one engine, so the policy and the
    fair queue decide *whether and when* a server gets GPUs; the swarm decides
    *which*, assigning them to the task atomically. A claim counts until the
    task holds its GPUs on the swarm (`settle`). Make it with `swarm_gpus`.
    """

    kind: str = GPU_KIND

    async def ledger(self, containers: Any = None) -> list[Holder]:
        """Who holds what: the swarm's sealed services' live tasks (`containers`: a
        `SwarmListing` already read), and GPUs handed out whose tasks do not yet."""
        listing = containers if containers is not None else await self.list_containers()
        found = holders(listing.services, listing.tasks, seal=self.seal, kind=self.kind)
        return self.with_pending(found)

    async def state(self) -> tuple[list[GpuSlot] | None, list[Holder]]:
        """The usable GPUs (None when no node declares one) and the ledger, in one read."""
        listing = await self.list_containers()
        return gpu_slots(node_gpus(listing.nodes, self.kind)) or None, await self.ledger(listing)


def swarm_gpus(
    seal: LedgerSeal | None,
    kind: str = GPU_KIND,
    client: Callable[[], Any] = lambda: docker_client(30),
) -> SwarmGpus:
    """The swarm's GPU allocator, a new client (`client()`) for each read."""

    def read() -> SwarmListing:
        c = client()
        try:
            return read_swarm(c)
        finally:
            c.close()

    async def listing() -> SwarmListing:
        return await asyncio.to_thread(read)

    return SwarmGpus(SwarmInventory(client, kind), listing, seal, kind=kind)
