"""The ds01 service as the terminal commands call it: the server's own hub token,
JSON in and out, server-sent events followed line by line."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a listing of many projects; never a build log
MAX_EVENT_BYTES = 256 * 1024


class ServiceError(Exception):
    """The service refused (`status` its HTTP status) or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Service:
    """Calls to the ds01 service as `user`, authenticated by `token`."""

    def __init__(self, url: str, token: str, user: str, timeout: float = 120) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token
        self.user = user
        self.timeout = timeout

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Service:
        """The service of the hub that started this server, as its environment names it."""
        names = ("DS01_SERVICE_URL", "JUPYTERHUB_API_TOKEN", "JUPYTERHUB_USER")
        missing = [name for name in names if not environ.get(name)]
        if missing:
            raise ServiceError(
                f"this is not a ds01 server ({', '.join(missing)} unset); run the command "
                "in a JupyterLab terminal of your ds01 server"
            )
        return cls(*(environ[name] for name in names))

    def project_path(self, kind: str, project: str, action: str = "") -> str:
        """``api/<kind>/<you>/<project>[/<action>]``: always your own project."""
        path = f"api/{kind}/{quote(self.user, safe='')}/{quote(project, safe='')}"
        return f"{path}/{action}" if action else path

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"token {self.token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise ServiceError(_error_message(e), e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServiceError(f"the ds01 service at {self.url} did not answer: {reason}") from None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON answer) of one request; a refusal raises ServiceError."""
        try:
            with self._open(method, path, body) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
                status = response.status
        except (OSError, http.client.HTTPException) as e:  # cut off mid-answer
            raise ServiceError(f"the ds01 service stopped answering: {e}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ServiceError("the service's answer is too large to show")
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            raise ServiceError(
                "the service's answer is not JSON (wrong DS01_SERVICE_URL?)"
            ) from None

    def get(self, path: str) -> Any:
        return self.call("GET", path)[1]

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, body or {})[1]

    def events(self, path: str, timeout: float = 3600) -> Iterator[dict[str, Any]]:
        """The ``data:`` objects of an event stream, as they arrive, until it ends."""
        try:
            with self._open("GET", path, timeout=timeout) as response:
                yield from parse_events(iter(lambda: response.readline(MAX_EVENT_BYTES + 1), b""))
        except TimeoutError:
            raise ServiceError(f"no news from the service for {timeout:.0f}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise ServiceError(f"the ds01 service stopped answering: {e}") from None


def parse_events(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Server-sent events: each event's ``data:`` lines joined, parsed as JSON.

    Comments (keep-alives) and other fields are skipped; an event with an
    over-long line (read in pieces of at most MAX_EVENT_BYTES) or that is not
    a JSON object is skipped whole, never fatal.
    """
    data: list[str] = []
    skipping = False
    for raw in lines:
        if len(raw) > MAX_EVENT_BYTES or (skipping and raw.strip()):
            data, skipping = [], True  # the rest of this event goes too
            continue
        skipping = False
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            try:
                event = json.loads("\n".join(data))
            except ValueError:
                event = None
            data = []
            if isinstance(event, dict):
                yield event


def _error_message(e: urllib.error.HTTPError) -> str:
    """The service's own message ({"status", "message"}), else the HTTP reason."""
    try:
        body = json.loads(e.read(64 * 1024) or b"{}")
    except (ValueError, OSError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, str) and message:
        return message
    if e.code in (401, 403):
        return "the ds01 service did not accept this server's token"
    return f"the ds01 service answered {e.code} {e.reason}"
