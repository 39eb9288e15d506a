"""Request handlers: every page has a JSON twin under ``api/``, sharing one reader."""

from __future__ import annotations

import json
from typing import Any

from jupyterhub.services.auth import HubOAuthenticated, check_scopes
from tornado import web

from ..gpus import GpuAllocator, gpu_report
from ..nvml import GpuUnavailable


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """Signed in through the hub; `is_admin` when the token carries the admin scope."""

    @property
    def is_admin(self) -> bool:
        user = self.current_user
        scope = self.settings["ds01"].admin_scope
        return bool(user and check_scopes(scope, set(user.get("scopes", []))))

    def require_admin(self) -> None:
        if not self.is_admin:
            raise web.HTTPError(403, f"needs the {self.settings['ds01'].admin_scope} scope")

    def render_page(self, name: str, **ns: Any) -> None:
        template = self.settings["templates"].get_template(name)
        self.finish(
            template.render(
                user=self.current_user,
                is_admin=self.is_admin,
                prefix=self.settings["ds01"].prefix,
                hub_base_url=self.settings["hub_base_url"],
                **ns,
            )
        )

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        if self.request.path.startswith(self.settings["ds01"].prefix + "api/"):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"status": status_code, "message": message}))
        else:
            self.finish(f"<h1>{status_code}</h1><p>{web.escape.xhtml_escape(message)}</p>")


async def gpu_view(allocator: GpuAllocator) -> dict[str, Any]:
    """Every GPU, what NVML says of it now, and who holds it (user, project, since)."""
    try:
        slots = await allocator.slots()
        error = None
    except GpuUnavailable as e:
        slots, error = [], str(e)
    return {"gpus": gpu_report(slots, await allocator.ledger()), "error": error}


class HomeHandler(BaseHandler):
    @web.authenticated
    def get(self) -> None:
        self.render_page("home.html")


class GpuPageHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        view = await gpu_view(self.settings["allocator"])
        self.render_page("gpus.html", refresh=self.settings["ds01"].refresh_seconds, **view)


class GpuApiHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(await gpu_view(self.settings["allocator"])))
