"""The service's base handler: hub sign-in, the admin scope, pages and JSON errors."""

from __future__ import annotations

import json
from typing import Any

from jupyterhub.services.auth import HubOAuthenticated, check_scopes
from tornado import web

MAX_BODY_BYTES = 256 * 1024  # a requirements.txt of thousands of lines still fits


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """Signed in through the hub; `is_admin` when the token carries the admin scope."""

    def prepare(self) -> None:
        if len(self.request.body or b"") > MAX_BODY_BYTES:
            raise web.HTTPError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")

    @property
    def ds01(self) -> Any:
        return self.settings["ds01"]

    @property
    def is_api(self) -> bool:
        return self.request.path.startswith(self.ds01.prefix + "api/")

    @property
    def is_admin(self) -> bool:
        user = self.current_user
        return bool(user and check_scopes(self.ds01.admin_scope, set(user.get("scopes", []))))

    def require_admin(self) -> None:
        if not self.is_admin:
            raise web.HTTPError(403, f"needs the {self.ds01.admin_scope} scope")

    def require_owner_or_admin(self, owner: str) -> None:
        """Researchers see and change their own projects only; admins everyone's."""
        if self.current_user["name"] != owner and not self.is_admin:
            raise web.HTTPError(403, "this is another user's project")

    def check_xsrf_cookie(self) -> None:
        # a request carrying a token cannot be forged by another site; forms need _xsrf
        if self.request.headers.get("Authorization", "").startswith(("token ", "Bearer ")):
            return
        super().check_xsrf_cookie()

    def json_body(self, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - allowed) if allowed is not None else []
        if unknown:
            raise web.HTTPError(
                400, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(allowed or ()))}"
            )
        return body

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def render_page(self, name: str, **ns: Any) -> None:
        template = self.settings["templates"].get_template(name)
        self.finish(
            template.render(
                user=self.current_user,
                is_admin=self.is_admin,
                prefix=self.ds01.prefix,
                hub_base_url=self.settings["hub_base_url"],
                xsrf_form_html=self.xsrf_form_html(),
                # scripts' requests (EventSource) are not navigations: the hub's
                # auth accepts their cookie only with the xsrf token in the URL
                xsrf_token=self.xsrf_token.decode("ascii"),
                **ns,
            )
        )

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        if self.is_api:
            self.write_json({"status": status_code, "message": message}, status_code)
        else:
            self.finish(f"<h1>{status_code}</h1><p>{web.escape.xhtml_escape(message)}</p>")
