"""Who holds which GPU: the admin's page and its JSON twin."""

from __future__ import annotations

from typing import Any

from tornado import web

from ..gpus import GpuAllocator
from ..ledger import GpuHolds, gpu_report
from ..nvml import GpuUnavailable
from .base import BaseHandler


async def gpu_view(allocator: GpuAllocator, holds: GpuHolds) -> dict[str, Any]:
    """Every GPU, what NVML says of it now, who holds it (user, project, since), and
    for whom a stopped project's GPU is kept."""
    try:
        slots = await allocator.slots()
        error = None
    except GpuUnavailable as e:
        slots, error = [], str(e)
    report = gpu_report(slots, await allocator.ledger(), holds.active())
    return {"gpus": report, "error": error}


class GpuHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        view = await gpu_view(self.settings["allocator"], self.settings["gpu_holds"])
        self.respond(view, "gpus.html", refresh=self.ds01.refresh_seconds, **view)
