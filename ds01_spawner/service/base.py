"""The service's base handler: hub sign-in, the admin scope, pages and JSON errors.

A `Refusal` raised anywhere below a handler becomes its own HTTP status and
message here, once: JSON under ``api/``, a short page elsewhere.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

from jupyterhub.services.auth import HubOAuthenticated, check_scopes
from tornado import web

from ..errors import Refusal

MAX_BODY_BYTES = 256 * 1024  # a requirements.txt of thousands of lines still fits
# Our bodies are flat objects of strings and lists of strings. Bounding their
# shape keeps json.loads cheap: no deep recursion (RecursionError, a 500), and
# no 80,000 small lists to allocate (a 100 ms pause of the event loop).
MAX_JSON_DEPTH = 8
MAX_JSON_CONTAINERS = 64
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_shape_problem(
    body: bytes, max_depth: int = MAX_JSON_DEPTH, max_containers: int = MAX_JSON_CONTAINERS
) -> str | None:
    """Why `body` is nested too deeply or holds too many arrays and objects, or None.

    Linear at C speed, then a loop over at most twice `max_containers`
    brackets. Strings are cut out first: drop escaped backslashes and quotes,
    then every other piece between quotes is a string. Malformed JSON may pass;
    json.loads refuses it at once.
    """
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    depth = opened = 0
    for byte in brackets:
        if byte in b"[{":
            depth, opened = depth + 1, opened + 1
            if depth > max_depth:
                return f"the body is nested too deeply (more than {max_depth} levels)"
            if opened > max_containers:
                return f"the body holds more than {max_containers} arrays and objects"
        else:
            depth -= 1
            if depth < 0:
                return None  # a close before its open: not JSON, json.loads says so
    return None


def parse_json_object(body: bytes, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    """A request body as a JSON object with only `allowed` fields, else a 400 saying why."""
    problem = json_shape_problem(body)
    if problem:
        raise web.HTTPError(400, problem)
    try:
        value = json.loads(body)
    except ValueError:
        raise web.HTTPError(400, "the body must be JSON") from None
    if not isinstance(value, dict):
        raise web.HTTPError(400, "the body must be a JSON object")
    unknown = sorted(set(value) - allowed) if allowed is not None else []
    if unknown:
        raise web.HTTPError(
            400, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(allowed or ()))}"
        )
    return value


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """Signed in through the hub; `is_admin` when the token carries the admin scope."""

    _prepared = False
    _xsrf_deferred = False

    def set_default_headers(self) -> None:
        # no other page (another user's server on this origin included) may frame ours
        self.set_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")

    def prepare(self) -> None:
        self._prepared = True
        if len(self.request.body or b"") > MAX_BODY_BYTES:
            raise web.HTTPError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        if self.is_api and "Authorization" in self.request.headers and self.current_user is None:
            # a script's or terminal command's token the hub did not accept: a clear
            # answer, not the login page (a browser, with no such header, is sent there)
            raise web.HTTPError(
                403, "the hub did not accept this token for the ds01 service: sign in again"
            )
        if self._xsrf_deferred:
            # who sent it is known only now: the hub's check skips XSRF for a request
            # that a valid token authenticated, and for nothing else
            self._xsrf_deferred = False
            _ = self.current_user
            super().check_xsrf_cookie()

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
        """XSRF applies unless a *valid* token authenticated the request.

        Tornado checks before anything has resolved the user, so that first call
        is deferred to `prepare`. A header alone proves nothing: with a junk token
        the hub's auth falls back to the cookie, and a same-origin page can send
        any header with fetch().
        """
        if not self._prepared:
            self._xsrf_deferred = True
            return
        super().check_xsrf_cookie()

    def json_body(self, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        return parse_json_object(self.request.body or b"{}", allowed)

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def respond(self, data: Any, page: str, **ns: Any) -> None:
        """A page and its JSON twin: `data` under ``api/``, else `page` rendered with `ns`."""
        if self.is_api:
            self.write_json(data)
        else:
            self.render_page(page, **ns)

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

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(value, Refusal):  # logged as the HTTPError it stands for, no traceback
            value = web.HTTPError(value.status, "%s", value.message)
            typ, tb = web.HTTPError, None
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, Refusal):  # tornado sent a 500: the refusal says which status
            status_code, message = exc.status, exc.message
            self.set_status(status_code)
        else:
            message = getattr(exc, "log_message", None) or self._reason
        if self.is_api:
            self.write_json({"status": status_code, "message": message}, status_code)
        else:
            self.finish(f"<h1>{status_code}</h1><p>{web.escape.xhtml_escape(message)}</p>")
