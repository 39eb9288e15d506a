"""The image-update page: a user's projects, their packages, rebuilds and restarts.

Each page has a JSON twin under ``api/`` (same path, same checks), so the page
and scripts share one implementation. The handlers only translate HTTP: what
may be done, and how, is `ImageManager`'s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from tornado import web
from tornado.iostream import StreamClosedError

from ..builds import Build
from ..errors import Refusal
from ..projects import Project
from ..projectstatus import ProjectStatus
from .base import BaseHandler
from .image_manager import ACTION_FIELDS, ImageManager, disk_use
from .overview import Overview

KEEPALIVE_SECONDS = 25


class ProjectBase(BaseHandler):
    @property
    def manager(self) -> ImageManager:
        return self.settings["manager"]

    def project_for(self, owner: str, name: str) -> Project:
        self.require_owner_or_admin(owner)
        return self.manager.project(owner, name)

    async def perform(
        self,
        owner: str,
        name: str,
        fields: frozenset[str],
        run: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any] | None:
        """`run` an action on its arguments (a JSON body under ``api/``, else a form):
        its result, or None once a refused form went back to the project's page,
        which says why (under ``api/`` the refusal is the answer)."""
        if self.is_api:
            args = self.json_body(fields)
        else:
            args = {k: self.get_body_argument(k) for k in self.request.body_arguments}
        try:
            return await run(args)
        except Refusal as e:
            if self.is_api:
                raise
            self.redirect(self.page_url(owner, name, error=e.message))
            return None

    def page_url(self, owner: str, name: str, **query: str) -> str:
        url = f"{self.ds01.prefix}images/{quote(owner)}/{name}"
        if query:
            url += "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items())
        return url


class ProjectListHandler(ProjectBase):
    """Your projects (admins: ``?all=1`` for everyone's, with the build queue)."""

    @web.authenticated
    async def get(self) -> None:
        everyone = self.get_argument("all", "") == "1"
        if everyone:
            self.require_admin()
        owners = self.manager.owners() if everyone else [self.current_user["name"]]
        projects = []
        for owner in owners:
            owned = self.manager.store.list_owned(owner)
            described = [await self.manager.describe(project) for project in owned]
            statuses = await self.statuses(owner, owned, described)
            for info in described:
                status = statuses.get(info["project"])
                info["status"] = status.as_dict() if status is not None else None
                projects.append(info)
        queue = [
            {"image": b.spec.image, "status": "running" if not b.done.is_set() else "done"}
            for b in self.manager.builder.running()
        ]
        total = disk_use(projects)
        self.respond(
            {"projects": projects, "builds": queue if everyone else None, "disk_use": total},
            "images.html",
            projects=projects,
            everyone=everyone,
            queue=queue,
            disk_use=total,
            message=self.get_argument("msg", ""),
        )

    async def statuses(
        self, owner: str, owned: list[Project], described: list[dict[str, Any]]
    ) -> dict[str, ProjectStatus]:
        """Each project's status, as the hub's home page shows it; none when the hub
        cannot say (the page still lists the images and their containers)."""
        overview: Overview = self.settings["overview"]
        building = {d["project"]: (d["build"] or {}).get("status") == "running" for d in described}
        try:
            return await overview.statuses(owner, owned, building=building)
        except Refusal as e:
            self.log.warning("No project status for %s: %s", owner, e.message)
            return {}


class ProjectHandler(ProjectBase):
    @web.authenticated
    async def get(self, owner: str, name: str) -> None:
        project = self.project_for(owner, name)
        info = await self.manager.describe(project)
        self.respond(
            info,
            "project.html",
            p=info,
            workspace_on_delete=self.manager.workspace_on_delete(),
            message=self.get_argument("msg", ""),
            error=self.get_argument("error", ""),
        )

    @web.authenticated
    async def delete(self, owner: str, name: str) -> None:
        project = self.project_for(owner, name)
        result = await self.manager.delete(
            project,
            by_admin=self.is_admin,
            by=self.current_user["name"],
            confirm=self.get_argument("confirm", None),
        )
        self.write_json(result)


class ProjectActionHandler(ProjectBase):
    """POST packages | rebuild | rollback | restart | delete, from a form or as JSON.

    A refused form goes back to the project's page, which shows why.
    """

    @web.authenticated
    async def post(self, owner: str, name: str, action: str) -> None:
        project = self.project_for(owner, name)
        result = await self.perform(
            owner,
            name,
            ACTION_FIELDS.get(action, frozenset()),
            lambda args: self.manager.act(
                project, action, args, by_admin=self.is_admin, by=self.current_user["name"]
            ),
        )
        if result is None:
            return
        if self.is_api:
            self.write_json(result, 202 if action == "rebuild" else 200)
        elif action == "delete":
            done = f"msg={quote(result['message'])}"
            self.redirect(f"{self.ds01.prefix}?{'all=1&' if self.is_admin else ''}{done}")
        else:
            self.redirect(self.page_url(owner, name, msg=result["message"]))


class BuildEventsHandler(ProjectBase):
    """The build log as server-sent events: the running build live, else the last one's record."""

    @web.authenticated
    async def get(self, owner: str, name: str) -> None:
        project = self.project_for(owner, name)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        build = self.manager.current_build(project)
        try:
            if build is not None:
                await self._stream(build)
            else:
                record = self.manager.build_status(project) or {"status": "none"}
                for line in record.get("log_tail", []):
                    await self._send({"phase": "log", "message": line})
                await self._send({"phase": record.get("status", "none"), "record": record})
        except StreamClosedError:
            return
        self.finish()

    async def _send(self, event: dict[str, Any], seq: int | None = None) -> None:
        head = f"id: {seq}\n" if seq is not None else ""
        self.write(f"{head}data: {json.dumps(event)}\n\n")
        await self.flush()

    async def _stream(self, build: Build) -> None:
        """Followed by sequence number: a log trimmed past its limit never stalls a
        reader, and a reconnecting EventSource (Last-Event-ID) resumes where it was."""
        try:
            after = int(self.request.headers.get("Last-Event-ID", "-1"))
        except ValueError:
            after = -1
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            async for seq, event in build.events.follow(after):
                await queue.put((seq, event))
            await queue.put(None)

        task = asyncio.ensure_future(pump())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    self.write(": keepalive\n\n")
                    await self.flush()
                    continue
                if item is None:
                    return
                seq, event = item
                await self._send(
                    {"phase": event.phase, "message": event.message, "progress": event.progress},
                    seq,
                )
        finally:
            task.cancel()
