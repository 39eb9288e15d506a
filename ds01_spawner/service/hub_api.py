"""The hub's REST API as the service calls it: with its own token, paths quoted whole.

One `HubClient` per service, made from the environment the hub starts the
service with; the image manager (restarts), the retirer (users, activity,
stopping servers) and the limits page (a user's groups) share it. The scopes
its token carries are configure.SERVICE_SCOPES.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..errors import Refusal

DEFAULT_API_URL = "http://127.0.0.1:8081/hub/api"  # JupyterHub's own default
MAX_STREAMS = 200  # event streams open to the hub at once (each user has a few at most)


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


def hub_message(body: bytes, fallback: str) -> str:
    """The hub's own message in an error body ({"status", "message"}), else `fallback`."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return message if isinstance(message, str) and message else fallback


class HubClient:
    """The hub API calls the service makes. Without a token (the service run by hand)
    every call is refused with a 503, and the retirement loop does not run."""

    def __init__(self, api_url: str, token: str) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self._streams: AsyncHTTPClient | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> HubClient:
        """The hub that started this service: $JUPYTERHUB_API_URL and $JUPYTERHUB_API_TOKEN."""
        return cls(
            environ.get("JUPYTERHUB_API_URL") or DEFAULT_API_URL,
            environ.get("JUPYTERHUB_API_TOKEN", ""),
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> HTTPRequest:
        if not self.token:
            raise Refusal("the service has no hub API token", status=503)
        headers = {"Authorization": f"token {self.token}", **(kwargs.pop("headers", None) or {})}
        return HTTPRequest(
            f"{self.api_url}/{path}",
            method=method,
            headers=headers,
            allow_nonstandard_methods=True,
            **kwargs,
        )

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        raw: bool = False,
    ) -> Any:
        """The hub's JSON answer (`raw`: the response itself, to read its status)."""
        request = self._request(
            method,
            path,
            headers=headers,
            body=None if body is None else json.dumps(body),
            request_timeout=60,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except OSError as e:  # no answer at all (an HTTP error status is an HTTPClientError)
            raise Refusal(f"the hub did not answer: {e}", status=502) from None
        if raw:
            return response
        return json.loads(response.body) if response.body else None

    async def stream(self, path: str, on_chunk: Callable[[bytes], None], timeout: float) -> None:
        """GET `path` and hand its body to `on_chunk` as it arrives (an event stream).

        Only a 200's body is handed on; the hub's refusal (a server it does not
        know, say) is a `Refusal` with its message. On a client of its own:
        tornado's shared one runs 10 requests at a time, and long-lived streams
        there would hold up every other hub call (restarts, retirement). An
        exception in `on_chunk` ends the stream.
        """
        status: list[int] = []
        refused = bytearray()

        def on_header(line: str) -> None:
            if line.startswith("HTTP/"):
                status[:] = [int(line.split()[1])]

        def on_body(chunk: bytes) -> None:
            if status == [200]:
                on_chunk(chunk)
            elif len(refused) < 64 * 1024:
                refused.extend(chunk)

        request = self._request(
            "GET",
            path,
            streaming_callback=on_body,
            header_callback=on_header,
            request_timeout=timeout,
        )
        if self._streams is None:
            self._streams = AsyncHTTPClient(force_instance=True, max_clients=MAX_STREAMS)
        try:
            await self._streams.fetch(request)
        except OSError as e:
            raise Refusal(f"the hub did not answer: {e}", status=502) from None
        except HTTPClientError as e:
            if status and status != [200]:
                raise Refusal(hub_message(bytes(refused), str(e)), status=e.code) from None
            raise

    async def stop_server(self, user: str, server: str, timeout: float = 60) -> None:
        """Stop one of `user`'s servers and return once the hub lists it no more."""
        await self.call("DELETE", server_path(user, server))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = await self.call("GET", user_path(user))
            if server not in (model.get("servers") or {}):
                return
            await asyncio.sleep(0.5)
        raise Refusal(
            f"{server or 'the default server'} did not stop in {timeout:.0f}s", status=504
        )
