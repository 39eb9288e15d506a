"""The hub's REST API as the service calls it: with its own token, paths quoted whole.

One `HubClient` per service, made from the environment the hub starts the
service with; the image manager (restarts), the retirer (users, activity,
stopping servers) and the limits page (a user's groups) share it. The scopes
its token carries are configure.SERVICE_SCOPES.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from ..errors import Refusal

DEFAULT_API_URL = "http://127.0.0.1:8081/hub/api"  # JupyterHub's own default


def user_path(user: str) -> str:
    """The hub API path of `user`, the name quoted whole.

    A username may hold '#', '?' or '/' (``bob#x``): unquoted, the hub would
    read a shorter path, or another resource's.
    """
    return f"users/{quote(user, safe='')}"


def server_path(user: str, server: str) -> str:
    """The hub API path of one of `user`'s servers; ``""`` is the default server.

    Apart from `user_path` so that no missing server name can turn a DELETE of
    a server into a DELETE of the user.
    """
    if not server:
        return f"{user_path(user)}/server"
    return f"{user_path(user)}/servers/{quote(server, safe='')}"


class HubClient:
    """The hub API calls the service makes. Without a token (the service run by hand)
    every call is refused with a 503, and the retirement loop does not run."""

    def __init__(self, api_url: str, token: str) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> HubClient:
        """The hub that started this service: $JUPYTERHUB_API_URL and $JUPYTERHUB_API_TOKEN."""
        return cls(
            environ.get("JUPYTERHUB_API_URL") or DEFAULT_API_URL,
            environ.get("JUPYTERHUB_API_TOKEN", ""),
        )

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        if not self.token:
            raise Refusal("the service has no hub API token", status=503)
        request = HTTPRequest(
            f"{self.api_url}/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}", **(headers or {})},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            request_timeout=60,
        )
        response = await AsyncHTTPClient().fetch(request)
        return json.loads(response.body) if response.body else None
