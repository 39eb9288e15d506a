"""Who holds which GPU: the admin's page and its JSON twin."""

from __future__ import annotations

from typing import Any

from tornado import web

from ..gpus import GpuAllocator, gpu_report
from ..nvml import GpuUnavailable
from .base import BaseHandler


async def gpu_view(allocator: GpuAllocator) -> dict[str, Any]:
    """Every GPU, what NVML says of it now, and who holds it (user, project, since)."""
    try:
        slots = await allocator.slots()
        error = None
    except GpuUnavailable as e:
        slots, error = [], str(e)
    return {"gpus": gpu_report(slots, await allocator.ledger()), "error": error}


class GpuHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        view = await gpu_view(self.settings["allocator"])
        if self.is_api:
            self.write_json(view)
        else:
            self.render_page("gpus.html", refresh=self.ds01.refresh_seconds, **view)
