"""Who holds which GPU: the admin's page and its JSON twin."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import docker.errors
import requests.exceptions
from tornado import web

from ..engine import docker_client
from ..gpuqueue import QueueFile, ordinal
from ..gpus import GpuAllocator
from ..ledger import GpuHolds, LedgerSeal, gpu_report
from ..nvml import GpuUnavailable
from ..swarmledger import gpu_table, holders, node_gpus
from .base import BaseHandler


async def gpu_view(
    allocator: GpuAllocator, holds: GpuHolds, queue: QueueFile | None = None
) -> dict[str, Any]:
    """Every GPU, what NVML says of it now, who holds it (user, project, since), for whom a
    stopped project's GPU is kept, and who waits for one (the hub's GPU queue)."""
    try:
        slots = await allocator.slots()
        error = None
    except GpuUnavailable as e:
        slots, error = [], str(e)
    report = gpu_report(slots, await allocator.ledger(), holds.active())
    return {"gpus": report, "error": error, "queue": queue_rows(queue) if queue else []}


def queue_rows(queue: QueueFile) -> list[dict[str, Any]]:
    """The queue in serving order (waiting), then waits a restart of the hub ended."""
    rows = []
    for w in sorted(queue.read().entries, key=lambda w: (w.state != "waiting", w.position)):
        rows.append(
            {
                "user": w.user,
                "project": w.project,
                "server": w.server,
                "mig": w.mig,
                "asks": "1 MIG slice" if w.mig else f"{w.gpus} GPU{'' if w.gpus == 1 else 's'}",
                "priority": w.priority,
                "state": w.state,
                "position": w.position,
                "place": ordinal(w.position) if w.position else "",
                "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.enqueued_at)),
                "gives_up": time.strftime("%H:%M", time.localtime(w.deadline)),
                "message": w.message,
            }
        )
    return rows


def swarm_rows(client: Any, seal: LedgerSeal) -> list[dict[str, str]] | None:
    """Every swarm node's GPUs and who holds each (node, GPU, user, project), when the
    engine is a swarm manager (`ds01-swarm`); None on a single engine. Blocking."""
    try:
        swarm = client.info().get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            return None
        services = client.services(filters={"label": "ds01.managed=true"})
        tasks = client.tasks(filters={"desired-state": "running"})
        return gpu_table(node_gpus(client.nodes()), holders(services, tasks, seal=seal))
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return None


async def swarm_view(state_dir: str) -> list[dict[str, str]] | None:
    """`swarm_rows` from the engine the service talks to (the hub's: a manager)."""

    def read() -> list[dict[str, str]] | None:
        client = docker_client(10)
        try:
            return swarm_rows(client, LedgerSeal(state_dir))
        finally:
            client.close()

    return await asyncio.to_thread(read)


class GpuHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        view = await gpu_view(
            self.settings["allocator"], self.settings["gpu_holds"], self.settings["gpu_queue"]
        )
        view["swarm"] = await swarm_view(self.ds01.shared_settings.state_dir)
        self.respond(view, "gpus.html", refresh=self.ds01.refresh_seconds, **view)
