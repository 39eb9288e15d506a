"""Who holds which GPU: the admin's page and its JSON twin."""

from __future__ import annotations

import time
from typing import Any

from tornado import web

from ..gpuqueue import QueueFile, ordinal
from ..gpus import GpuAllocator
from ..ledger import GpuHolds, gpu_report
from ..nvml import GpuUnavailable
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


class GpuHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        view = await gpu_view(
            self.settings["allocator"], self.settings["gpu_holds"], self.settings["gpu_queue"]
        )
        self.respond(view, "gpus.html", refresh=self.ds01.refresh_seconds, **view)
