"""A project's server, started and retired for its owner: `project launch`, `container retire`.

The ds01 service asks the hub on the user's behalf (its own token holds
``servers``); the spawner's rules still decide every start (names, types,
limits, GPUs), and a refusal comes back with the hub's status and the
spawner's message unchanged. What this module adds is only what the hub does
not know: which server runs a project, that a start waits for the project's
rebuild in this service, and that a retire can first keep the packages the
session pip-installed (the record the image page offers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from jupyterhub.utils import url_escape_path
from tornado.httpclient import HTTPClientError

from ..errors import Refusal
from ..gpuqueue import WAITING, QueueFile, ordinal
from ..images import BuildError
from ..projects import (
    InvalidRequest,
    Project,
    parse_gpus,
    validate_project_name,
)
from .hub_api import HubClient, hub_message, server_path, user_path
from .image_manager import ImageManager, is_set

# The server actions and the fields each takes (a form posts the same names).
SERVER_ACTION_FIELDS: dict[str, frozenset[str]] = {
    "launch": frozenset({"gpus", "type", "create", "wait"}),
    "retire": frozenset({"save_packages", "rebuild"}),
}


MAX_PROGRESS_STREAMS = 4  # per user: a terminal or two, a browser tab; more is a 429


def project_servers(model: Mapping[str, Any], project: str) -> dict[str, dict[str, Any]]:
    """The servers of a hub user model that run `project`: its named server, or another
    one (the default server, say) whose stored options name it."""
    found = {}
    for name, server in (model.get("servers") or {}).items():
        options = server.get("user_options") or {}
        if name == project or options.get("project") == project:
            found[name] = server
    return found


def server_state(server: Mapping[str, Any]) -> str:
    """``running``, ``starting`` or ``stopping``: what the hub says a listed server does."""
    if server.get("pending") == "spawn":
        return "starting"
    if server.get("pending") == "stop":
        return "stopping"
    return "running" if server.get("ready") else "starting"


def hub_refusal(e: HTTPClientError, doing: str) -> Refusal:
    """The hub's answer to a call made for the user, its status and message kept:
    the spawner's refusals (limits, GPUs, options) reach the user as they are."""
    body = e.response.body if e.response is not None else b""
    message = hub_message(body or b"", f"the hub refused to {doing}: {e}")
    status = e.code if 400 <= e.code < 500 else 502
    return Refusal(message, status=status, reason="hub")


class ServerManager:
    """Launch and retire project servers; every call is for `owner`, checked by the handler."""

    def __init__(self, hub: HubClient, images: ImageManager, hub_base_url: str = "/") -> None:
        self.hub = hub
        self.images = images
        self.state_dir = str(images.store.root.parent)
        self.base_url = hub_base_url if hub_base_url.endswith("/") else hub_base_url + "/"
        self._streams: dict[str, int] = {}
        # one launch or retire of a project at a time: a launch right after a retire
        # --save-packages waits for the packages and the rebuild, not the old image
        self._busy: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, owner: str, name: str) -> asyncio.Lock:
        return self._busy.setdefault((owner, name), asyncio.Lock())

    def server_url(self, owner: str, server: str) -> str:
        """The server's path on the hub's public address (the hub adds nothing to it)."""
        return f"{self.base_url}user/{url_escape_path(owner)}/{url_escape_path(server)}/"

    async def act(
        self, owner: str, name: str, action: str, args: Mapping[str, Any], *, by: str = ""
    ) -> dict:
        """One of `SERVER_ACTION_FIELDS` for `owner`'s project, asked by `by` (the audit's)."""
        async with self._lock(owner, name):
            return await self._act(owner, name, action, args, by or owner)

    async def _act(
        self, owner: str, name: str, action: str, args: Mapping[str, Any], by: str
    ) -> dict:
        if action == "launch":
            return await self.launch(
                owner,
                name,
                project_type=args.get("type") or "",
                gpus=args.get("gpus"),
                create=is_set(args.get("create")),
                wait=is_set(args.get("wait")),
            )
        if action == "retire":
            save = is_set(args.get("save_packages"))
            return await self.retire(
                owner, name, save_packages=save, rebuild=is_set(args.get("rebuild", save)), by=by
            )
        raise Refusal(f"unknown action {action!r}", status=404)

    def project_of(self, owner: str, name: str, *, create: bool) -> Project | None:
        """The owner's project `name`; None when `create` asks for a new one."""
        try:
            validate_project_name(name)
        except InvalidRequest as e:
            raise Refusal(str(e), status=400) from None
        project = self.images.store.get_own(owner, name)  # a 409 if the slug holds another's
        if create and project is not None:
            raise Refusal(
                f"project {name!r} exists already (type {project.type}); start it with "
                f"`project launch {name}`",
                status=409,
                reason="project_exists",
            )
        if not create and project is None:
            raise Refusal(
                f"you have no project {name!r}; create it with `project init {name}`",
                status=404,
                reason="no_project",
            )
        return project

    async def servers_of(self, owner: str, name: str) -> dict[str, dict[str, Any]]:
        try:
            model = await self.hub.call("GET", user_path(owner))
        except HTTPClientError as e:
            raise hub_refusal(e, "list your servers") from None
        return project_servers(model, name)

    def _answer(self, owner: str, server: str, status: str, message: str) -> dict[str, Any]:
        return {
            "project": server,
            "server": server,
            "status": status,
            "url": self.server_url(owner, server),
            "message": message,
        }

    async def launch(
        self,
        owner: str,
        name: str,
        *,
        project_type: str = "",
        gpus: Any = None,
        create: bool = False,
        wait: bool = False,
    ) -> dict[str, Any]:
        """Start the project in its named server; a new one (`create`) of `project_type`;
        `wait`: in the GPU queue when no GPU is free.

        Returns at once with ``status`` "running" (it was), "ready" (it answered
        within the hub's slow-spawn wait), "waiting" (in the GPU queue; ``position``
        says where) or "starting" (follow ``progress``).
        """
        project = self.project_of(owner, name, create=create)
        if not isinstance(project_type, str):
            raise Refusal("type must be a string")
        try:
            parse_gpus(gpus)  # the shape only; the spawner decides what may be had
        except InvalidRequest as e:
            raise Refusal(str(e)) from None
        running = await self.servers_of(owner, name)
        for server, entry in running.items():
            state = server_state(entry)
            if state == "stopping":
                raise Refusal(
                    f"project {name!r} is stopping; launch it again in a moment", status=409
                )
            return self._answer(owner, server, state, f"{name} is {state} already")
        if project is not None:
            await self._wait_for_rebuild(project)
        options: dict[str, Any] = {"project": name}
        if create and project_type:
            options["type"] = project_type
        if gpus not in (None, "", 0, "0"):
            options["gpus"] = gpus
            if wait:
                options["wait"] = True
        try:
            response = await self.hub.call(
                "POST", server_path(owner, name), {"user_options": options}, raw=True
            )
        except HTTPClientError as e:
            raise hub_refusal(e, f"start {name}") from None
        state = "ready" if response.code == 201 else "starting"
        verb = "Created and started" if create else "Started"
        answer = self._answer(
            owner, name, state, f"{verb} {name}" if state == "ready" else f"Starting {name}"
        )
        waiter = QueueFile(self.state_dir).read().for_user(owner).get(name)
        if state == "starting" and waiter is not None and waiter.state == WAITING:
            answer.update(
                status="waiting",
                position=waiter.position,
                message=f"{name} waits for a GPU, {ordinal(waiter.position)} in line",
            )
        return answer

    @contextlib.contextmanager
    def progress_stream(self, user: str) -> Iterator[None]:
        """One of `user`'s few progress streams (a 429 past `MAX_PROGRESS_STREAMS`), so that
        no one holds many connections to the hub open."""
        if self._streams.get(user, 0) >= MAX_PROGRESS_STREAMS:
            raise Refusal(
                f"you follow {MAX_PROGRESS_STREAMS} starts already; close one and try again",
                status=429,
            )
        self._streams[user] = self._streams.get(user, 0) + 1
        try:
            yield
        finally:
            self._streams[user] -= 1
            if not self._streams[user]:
                del self._streams[user]

    async def progress_path(self, owner: str, name: str) -> str:
        """The hub API path of the progress events of the server running project `name`:
        its named server when none runs it (a start that failed at once: the hub's
        events say why)."""
        self.project_of(owner, name, create=False)
        servers = await self.servers_of(owner, name)
        server = name if name in servers or not servers else next(iter(servers))
        return f"{server_path(owner, server)}/progress"

    async def _wait_for_rebuild(self, project: Project) -> None:
        """A rebuild of the image running here ends first: the start then uses its image."""
        build = self.images.current_build(project)
        if build is None or build.done.is_set():
            return
        try:
            await build.wait()
        except BuildError as e:
            raise Refusal(
                f"the rebuild of {project.name}'s image failed ({e}); the previous image "
                "is unchanged. Fix the packages and rebuild, or launch again to use it.",
                status=409,
                reason="build",
            ) from None

    async def retire(
        self,
        owner: str,
        name: str,
        *,
        save_packages: bool = False,
        rebuild: bool = False,
        by: str = "",
    ) -> dict[str, Any]:
        """Stop the project's servers (container removed, workspace and image kept).

        With `save_packages`, the packages the session pip-installed (recorded
        as its container is retired) go into the image's Dockerfile, and with
        `rebuild` the image is rebuilt at once.
        """
        project = self.project_of(owner, name, create=False)
        assert project is not None
        servers = await self.servers_of(owner, name)
        if not servers and not save_packages:
            raise Refusal(f"project {name!r} has no running server", status=409)
        for server in servers:
            try:
                await self.hub.stop_server(owner, server)
            except HTTPClientError as e:
                raise hub_refusal(e, f"stop {server or 'your default server'}") from None
        slug = self.images.store.slug(owner)
        saved = self.images.installed.lost_packages(slug, name) if save_packages else []
        if saved:
            await self.images.update_packages(project, add_pip=saved, by=by or owner)
        rebuilding = bool(saved) and rebuild
        if rebuilding:
            self.images.rebuild_unless_building(project)
        stopped = ", ".join(s or "default" for s in servers) or "nothing was running"
        message = f"Retired {name} ({stopped}); the workspace and the image are kept."
        if save_packages:
            message += (
                f" Added to the image: {', '.join(saved)}."
                if saved
                else " The session installed no packages to keep."
            )
        if rebuilding:
            message += " The image is being rebuilt."
        return {
            "project": name,
            "stopped": list(servers),
            "saved": saved,
            "rebuilding": rebuilding,
            "message": message,
        }
