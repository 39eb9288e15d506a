"""A user's projects at a glance: the facts `project_status` needs, gathered at bounded cost.

The hub's home page (through ``api/home``) and the image list show every
project's status; this module reads, once per request, what decides it: the
project records, the user's servers as the hub lists them (one hub call), the
GPU ledger and the GPUs (one engine call and one NVML read, shared by the
requests of two seconds), the GPU queue's file, the retirement notices, and
for the home the images (one engine list call) and each project's state files.

Work is bounded whatever a user owns: the home details the `MAX_LISTED` most
recently used projects (and any that runs), and counts the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

import docker.errors
from tornado.httpclient import HTTPClientError

from .. import labels
from ..cleanup import CleanedRecords
from ..dockerfile import DockerfileError
from ..errors import Refusal
from ..gpuqueue import QueueFile, Waiter
from ..gpus import GpuAllocator
from ..images import dockerfile_digest, image_ref
from ..ledger import Holder
from ..nvml import GpuSlot
from ..picker import gpu_choices
from ..policyfile import PolicyError
from ..projects import Project
from ..projectstatus import ImageFacts, ProjectStatus, hub_servers, project_status
from ..retirement import Notices
from ..settings import DS01Settings
from .hub_api import HubClient, user_path
from .image_manager import ImageManager

log = logging.getLogger("ds01.overview")

MAX_LISTED = 100  # projects the home details; more are counted, and listed on the image page
UNFINISHED = ("running", "failed", "interrupted")  # build records the home tells of
GPU_STATE_SECONDS = 2.0  # how long one reading of the GPUs and the ledger serves every page


class Overview:
    """Project statuses for the home page and the image list (one per service)."""

    def __init__(
        self,
        manager: ImageManager,
        hub: HubClient,
        settings: DS01Settings,
        allocator: GpuAllocator | None,
        *,
        prefix: str = "/services/ds01/",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self.prefix = prefix  # the service's: where the image pages are
        self.hub = hub
        self.settings = settings
        self.allocator = allocator
        self.queue = QueueFile(settings.state_dir)
        self.notices = Notices(settings.state_dir)
        self.cleaned = CleanedRecords(settings.state_dir)
        self.clock = clock
        self._gpu_state: tuple[float, list[GpuSlot] | None, list[Holder]] | None = None
        self._gpu_lock = asyncio.Lock()

    # ------------------------------------------------------------ the facts

    async def hub_user(self, owner: str) -> dict[str, Any]:
        """The hub's model of `owner` (servers, groups); a 404 if the hub has no such user."""
        try:
            return await self.hub.call("GET", user_path(owner)) or {}
        except HTTPClientError as e:
            if e.code == 404:
                raise Refusal(f"the hub has no user {owner!r}", status=404) from None
            raise Refusal(f"the hub did not list {owner}'s servers: {e}", status=502) from None

    async def gpu_state(self) -> tuple[list[GpuSlot] | None, list[Holder]]:
        """The GPUs (None: none usable) and the ledger, read at most every two seconds."""
        if self.allocator is None:
            return None, []
        async with self._gpu_lock:
            now = self.clock()
            if self._gpu_state is None or now - self._gpu_state[0] > GPU_STATE_SECONDS:
                try:
                    slots, holders = await self.allocator.state()
                except (docker.errors.DockerException, OSError) as e:
                    log.warning("No GPU ledger for the projects' status: %s", e)
                    slots, holders = None, []
                self._gpu_state = (now, slots, holders)
            return self._gpu_state[1], self._gpu_state[2]

    def building(self, project: Project) -> bool:
        """A build of the project's image runs, in this service or in the hub (its record)."""
        return (self.manager.build_status(project) or {}).get("status") == "running"

    async def statuses(
        self,
        owner: str,
        projects: Iterable[Project],
        *,
        model: Mapping[str, Any] | None = None,
        building: Mapping[str, bool] | None = None,
        images: Mapping[str, ImageFacts] | None = None,
    ) -> dict[str, ProjectStatus]:
        """Each project's status; `model` (the hub's user), `building` and `images` when
        the caller has them already, else read here."""
        projects = list(projects)
        if model is None:
            model = await self.hub_user(owner)
        servers = hub_servers(model)
        _, holders = await self.gpu_state()
        waiters: dict[str, Waiter] = self.queue.read().for_user(owner)
        notices: dict[str, list[str]] = {}
        for notice in self.notices.warnings(owner):
            project, message = notice.get("project"), notice.get("message")
            if isinstance(project, str) and isinstance(message, str):
                notices.setdefault(project, []).append(message)
        if building is None:
            building = await asyncio.to_thread(lambda: {p.name: self.building(p) for p in projects})
        now = self.clock()
        return {
            p.name: project_status(
                p,
                servers.get(p.name),
                building=building.get(p.name, False),
                holders=holders,
                waiter=waiters.get(p.name),
                image=(images or {}).get(p.name),
                notices=notices.get(p.name, ()),
                now=now,
            )
            for p in projects
        }

    async def image_facts(self, owner: str, projects: list[Project]) -> dict[str, ImageFacts]:
        """Each project's image: one engine call lists the owner's images; the Dockerfiles
        and state files are read on a thread, never on the event loop."""
        slug = self.manager.store.slug(owner)
        try:
            listed = await asyncio.to_thread(
                self.manager.client.images, filters=labels.managed_filter(owner)
            )
        except (docker.errors.DockerException, OSError) as e:
            log.warning("No images listed for %s's projects: %s", owner, e)
            listed = []
        latest: dict[str, dict[str, Any]] = {}
        for image in listed or []:
            for tag in image.get("RepoTags") or []:
                latest[tag] = image
        return await asyncio.to_thread(self._image_facts, slug, projects, latest)

    def _image_facts(
        self, slug: str, projects: list[Project], latest: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, ImageFacts]:
        facts = {}
        for project in projects:
            image = latest.get(image_ref(slug, project.name))
            built_from = (image or {}).get("Labels") or {}
            outdated = False
            if image is not None:
                try:
                    digest = dockerfile_digest(self.manager.dockerfile(project))
                    outdated = built_from.get(labels.DOCKERFILE_SHA256) != digest
                except (Refusal, DockerfileError):
                    outdated = False  # unreadable: the image page says why
            lost = self.manager.installed.last_session(slug, project.name) or {}
            build = self.manager.build_status(project) or {}
            facts[project.name] = ImageFacts(
                built_at=float(image["Created"]) if image and image.get("Created") else None,
                outdated=outdated,
                lost_packages=tuple(str(p) for p in lost.get("packages") or ()),
                lost_at=str(lost.get("recorded_at") or ""),
                last_build=str(build.get("status", ""))
                if build.get("status") in UNFINISHED
                else "",
                cleaned=image is None and self.cleaned.read(slug, project.name) is not None,
            )
        return facts

    # ------------------------------------------------------------ the home

    async def home(self, owner: str) -> dict[str, Any]:
        """The home page's data: `owner`'s projects, newest first, what each may do, and
        the choices a start offers (GPUs within the owner's limits, project types)."""
        model = await self.hub_user(owner)
        projects = await asyncio.to_thread(self.manager.store.list_owned, owner)
        servers = hub_servers(model)
        shown = [p for i, p in enumerate(projects) if i < MAX_LISTED or p.name in servers]
        images = await self.image_facts(owner, shown)
        building = {name: facts.last_build == "running" for name, facts in images.items()}
        statuses = await self.statuses(owner, shown, model=model, building=building, images=images)
        rows = []
        for project in shown:
            row = statuses[project.name].as_dict()
            row["image_page"] = f"{self.prefix}images/{quote(owner, safe='')}/{project.name}"
            rows.append(row)
        start = await self.start_choices(owner, list(model.get("groups") or []))
        return {
            "user": owner,
            "projects": rows,
            "more": len(projects) - len(shown),
            **start,
        }

    async def start_choices(self, owner: str, groups: list[str]) -> dict[str, Any]:
        """What a start may ask for: GPUs (0..the owner's limit, MIG) and, for a new
        project, the types the owner may use. A policy that cannot be read offers none."""
        try:
            limits = self.settings.limits_for(owner, groups)
        except PolicyError as e:
            return {"gpus": {"max": 0, "mig": False, "note": f"the lab policy: {e}"}, "types": []}
        slots, holders = await self.gpu_state() if limits.max_gpus > 0 else ([], [])
        gpus = gpu_choices(
            limits,
            slots,
            holders,
            reserved=self.settings.gpus_reserved,
            offer_mig=self.settings.offer_mig,
        )
        try:
            types = self.settings.types()
        except (OSError, ValueError):
            types = {}
        return {
            "gpus": gpus,
            "types": [
                {"name": t.name, "description": t.description}
                for t in types.values()
                if limits.allows_type(t.name)
            ],
            "default_type": self.settings.default_project_type,
        }
