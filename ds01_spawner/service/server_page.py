"""Launch and retire a project's server, and follow its start: `project launch`,
`container retire` for the terminal commands (JSON) and the pages (forms).

The handlers only translate HTTP; `ServerManager` holds the rules.
"""

from __future__ import annotations

import json

from tornado import web
from tornado.httpclient import HTTPClientError
from tornado.iostream import StreamClosedError

from ..errors import Refusal
from .image_page import ProjectBase
from .servers import SERVER_ACTION_FIELDS, ServerManager

PROGRESS_TIMEOUT_SECONDS = 3600  # a first start builds an image: minutes, rarely an hour


class ServerBase(ProjectBase):
    @property
    def servers(self) -> ServerManager:
        return self.settings["servers"]


class ServerActionHandler(ServerBase):
    """POST launch | retire (`SERVER_ACTION_FIELDS`) for one of your projects."""

    @web.authenticated
    async def post(self, owner: str, name: str, action: str) -> None:
        self.require_owner_or_admin(owner)
        result = await self.perform(
            owner,
            name,
            SERVER_ACTION_FIELDS[action],
            lambda args: self.servers.act(owner, name, action, args, by=self.current_user["name"]),
        )
        if result is None:
            return
        if self.is_api:
            self.write_json(result, 201 if result.get("status") == "ready" else 200)
        elif action == "launch":
            self.redirect(result["url"])
        else:
            self.redirect(self.page_url(owner, name, msg=result["message"]))


class ServerProgressHandler(ServerBase):
    """The hub's progress events of the project's start, passed through as they come
    (the same stream the spawn page shows: build steps, GPU, "ready" or why it failed)."""

    _gone = False

    def on_connection_close(self) -> None:
        self._gone = True

    @web.authenticated
    async def get(self, owner: str, name: str) -> None:
        self.require_owner_or_admin(owner)
        path = await self.servers.progress_path(owner, name)
        with self.servers.progress_stream(self.current_user["name"]):
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            try:
                await self.flush()
                await self.servers.hub.stream(path, self._relay, PROGRESS_TIMEOUT_SECONDS)
            except (StreamClosedError, HTTPClientError, Refusal) as e:
                if self._gone:
                    return  # the reader went away: the hub's stream is closed too
                # the hub refused (no such server) or the server went away under the stream
                message = e.message if isinstance(e, Refusal) else f"the start's events ended: {e}"
                self.write(f"data: {json.dumps({'failed': True, 'message': message})}\n\n")
            self.finish()

    def _relay(self, chunk: bytes) -> None:
        if self._gone:
            raise StreamClosedError()  # ends the hub request as well
        self.write(chunk)
        self.flush().add_done_callback(lambda f: f.exception())  # a closed reader: noticed above
