"""DS01Spawner: DockerSpawner for a shared lab server, one project per server.

Glue only. The settings it shares with the ds01 service are `DS01Settings`
(settings.py); the decisions are plain functions it feeds with what it
gathers: `parse_user_options` (projects), `admit` (admission), `gpus.choose`,
`harden_request` (container). JupyterHub's lifecycle:

    apply_user_options -> the request, validated and admitted (400/403/409)
    start              -> uid, workspace, image (built here if missing, streamed
                          to progress()), GPUs, one frozen ContainerPlan, then
                          DockerSpawner.start; returns once the server answers
    stop               -> retire: the container goes; workspace and image stay
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import docker.errors
from dockerspawner import DockerSpawner
from jupyterhub.spawner import SpawnException
from traitlets import (
    Bool,
    Callable,
    Enum,
    Float,
    Integer,
    List,
    TraitError,
    Tuple,
    Unicode,
    default,
)

from . import labels
from .admission import Facts, GpuFacts, admit, gpu_refusal, gpu_request
from .cleanup import rebuild_notice
from .compat import allowed_options_problem, remove_problem
from .configure import server_token_scopes
from .container import ContainerPlan, describe_limits, harden_request, service_url
from .engine import wait_removed
from .errors import Refusal, spawn_exception
from .events import EventLog
from .gpuqueue import QueueTimeout, Waiter
from .gpus import GpuRefusal, GpuRequest
from .identity import UidAllocator, UserIds, resolve_ids
from .images import image_ref, project_build_spec
from .installed import InstalledRecords, record_installed, unsaved_notice
from .launch import build_image, open_workspace
from .ledger import LedgerSeal, held_uuids
from .limits import Limits
from .nvml import GpuSlot, GpuUnavailable
from .picker import built_projects, gpu_choices, render_picker
from .policyfile import PolicyError
from .projects import (
    DOCKERFILE,
    InvalidRequest,
    Project,
    ProjectRequest,
    ProjectType,
    options_from_form,
    parse_user_options,
)
from .ready import server_url, wait_until_answers
from .retirement import RetirementLog
from .serveraudit import ServerAudit
from .settings import DS01Settings
from .workspaces import read_workspace_file

# The share of the progress bar each spawn phase uses; the spawn page keeps the last
# MAX_PROGRESS_EVENTS lines (a build may print without end).
MAX_PROGRESS_EVENTS = 2000
_BUILD_START, _BUILD_END, _WAITING, _CONTAINER, _ANSWER = 10, 85, 88, 90, 95


class DS01Spawner(ServerAudit, DS01Settings, DockerSpawner):
    """Spawn each project of a user in a container of the project's own image."""

    # ------------------------------------------------------------ who runs it

    use_system_users = Bool(
        True,
        help="""Run a user's containers as their host account's uid/gid when one exists.

        Otherwise (and for users without an account) a uid from `uid_range` is
        allocated once, stored in `state_dir`/uids.json, and used forever after,
        with a private group gid == uid.
        """,
    ).tag(config=True)

    min_system_uid = Integer(
        1000,
        help="Host accounts below this uid (daemon, www-data, ...) are never used.",
    ).tag(config=True)

    uid_range = Tuple(
        Integer(),
        Integer(),
        default_value=(20000, 59999),
        help="Range (inclusive) of uids allocated to users without a host account.",
    ).tag(config=True)

    user_ids_hook = Callable(
        None,
        allow_none=True,
        help="""Optional `hook(spawner) -> (uid, gid)` deciding the ids yourself
        (e.g. from LDAP or auth_state). Return None to fall back to the rules above.
        """,
    ).tag(config=True)

    # ------------------------------------------------------------ the container

    gpu_passing = Enum(
        ["device_requests", "nvidia_runtime", "env"],
        "device_requests",
        help="""How assigned GPUs reach the container.

        device_requests: Docker device requests for the chosen UUIDs (like
        `--gpus device=UUID`; needs the NVIDIA Container Toolkit); nvidia_runtime:
        `runtime=nvidia` plus NVIDIA_VISIBLE_DEVICES; env: environment variables
        only (no isolation; for engines without NVIDIA support). All three set
        NVIDIA_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES to the UUIDs.
        """,
    ).tag(config=True)

    save_packages_timeout = Float(
        5.0,
        help="""Seconds to read, at retire, which pip packages were installed in the
        container beyond its image (offered on the image page), from the engine's
        list of the container's file changes: nothing runs inside the container.
        0 turns it off. The stop is never held up longer: an engine that does not
        answer in time leaves nothing recorded, and the container is retired anyway.
        """,
    ).tag(config=True)

    ready_probe_interval = Float(
        0.05,
        min=0,
        help="""Seconds between start()'s own checks that the new server answers.

        start() returns once it does (within `http_timeout`), so the hub's first
        poll finds it up instead of waiting out JupyterHub's backoff (0.2 s
        doubling to 5 s). 0: leave it to the hub's polls, as DockerSpawner does.
        """,
    ).tag(config=True)

    service_url = Unicode(
        "",
        help="""Where the terminal commands in a server (image-update, project, container
        retire, check-limits) reach the ds01 service, as $DS01_SERVICE_URL: its
        prefix on an address containers can reach, `{base_url}` standing for the
        hub's base URL, e.g. http://172.17.0.1:10101{base_url}services/ds01/.
        configure(c) sets it; empty: the commands say the service is out of reach.
        """,
    ).tag(config=True)

    allowed_user_options = List(
        Unicode(),
        help="""Your own user_options keys, accepted besides ds01's (project, type,
        gpus, profile) and passed on as given: fields of your own options form,
        REST automation, or a `pre_spawn_hook` that reads them. Validate their
        values where you use them. ds01's keys and `image` cannot be claimed.
        """,
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # DockerSpawner settings ds01 cannot honour are refused, saying why (compat.py);
        # checked once the config is loaded (traitlets skips validators while loading)
        for problem in (
            remove_problem(self.remove),
            allowed_options_problem(self.allowed_user_options),
        ):
            if problem:
                raise TraitError(problem)
        self._start_timeout = self.start_timeout  # a GPU wait adds its queue_timeout to it

    # DockerSpawner defaults that fit the DS01 model.
    @default("remove")
    def _default_remove(self) -> bool:
        return True  # retire: a stopped container is removed, never restarted stale

    @default("prefix")
    def _default_prefix(self) -> str:
        return "ds01"

    @default("name_template")
    def _default_name_template(self) -> str:
        return "{prefix}-{user_slug}--{project}"

    @default("pull_policy")
    def _default_pull_policy(self) -> str:
        return "skip"  # the base image is local; project images are built, never pulled

    @default("start_timeout")
    def _default_start_timeout(self) -> int:
        return 900  # a first spawn may build the project's image

    @default("notebook_dir")
    def _default_notebook_dir(self) -> str:
        return self.workspace_mount

    @default("server_token_scopes")
    def _default_server_token_scopes(self) -> Any:
        return server_token_scopes  # the server role and access to the ds01 service

    @default("options_form")
    def _default_options_form(self) -> Any:
        return lambda spawner: spawner.render_options_form()

    @default("options_from_form")
    def _default_options_from_form(self) -> Any:
        return lambda formdata: options_from_form(formdata, frozenset(self.allowed_user_options))

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        return lambda spawner, user_options: spawner.apply_project_options(user_options)

    # ------------------------------------------------------------ per-server state

    plan: ContainerPlan | None = None  # what this server runs; None while it is stopped
    _events: EventLog[dict[str, Any]] | None = None  # the current start's progress

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.plan = ContainerPlan.from_state(
            state.get("ds01") or {}, owner=self.user.name, server=self.name
        )

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.object_id and self.plan is not None:
            state["ds01"] = self.plan.to_state()
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.plan = None

    def template_namespace(self) -> dict[str, str]:
        ns = super().template_namespace()
        ns["user_slug"] = self.user_slug
        ns["project"] = self.plan.project if self.plan else (self.name or "default")
        return ns

    @property
    def user_slug(self) -> str:
        """This user's slug, from the hub-wide registry (never another user's)."""
        return self.store.slug(self.user.name)

    def limits(self) -> Limits:
        """This user's limits under the policy in force now."""
        try:
            return self.limits_for(self.user.name, [g.name for g in self.user.groups])
        except PolicyError as e:
            raise Refusal(
                f"the lab policy cannot be read, so no server can start: {e}. "
                "Tell the hub's admin.",
                status=500,
                reason="policy",
            ) from None

    # ------------------------------------------------------------ requests

    def apply_project_options(self, user_options: dict[str, Any]) -> None:
        """Refuse a bad request before anything is created (400, 403, 409)."""
        with self._refusing():
            request = self._parse(user_options, self.types())
            limits = self.limits()
            self._admit(request, limits)
            self.start_timeout = self._start_timeout + self._queue_timeout(request, limits)
            self._store_user_options(request, user_options)

    def _queue_timeout(self, request: ProjectRequest, limits: Limits) -> float:
        """How long this start may wait in the GPU queue (0: it does not wait)."""
        if not request.wait:
            return 0.0
        if limits.queue_timeout is None:
            raise Refusal(
                "waiting for a GPU is off for you (queue_timeout: none in the lab policy); "
                "start without waiting, or without a GPU",
                status=403,
                reason="policy",
            )
        return limits.queue_timeout

    @contextlib.contextmanager
    def _refusing(self) -> Iterator[None]:
        """Refusals become SpawnExceptions with their status, and the refused
        options are forgotten: the hub saved them as the server's defaults before
        we refused, and a later start without options would be refused again."""
        try:
            yield
        except (Refusal, SpawnException) as e:
            if self.orm_spawner is not None:
                self.orm_spawner.user_options = None
                self.db.commit()
            if isinstance(e, Refusal):
                self._audit_refusal(e)
                raise spawn_exception(e) from None
            raise

    def _parse(self, user_options: Any, types: dict[str, ProjectType]) -> ProjectRequest:
        existing = {p.name: p for p in self.store.list_owned(self.user.name)}
        try:
            request = parse_user_options(
                user_options,
                server_name=self.name,
                types=types,
                existing=existing,
                default_type=self.default_project_type,
                fallback_project=next(iter(existing), self.default_project),
                extra_keys=frozenset(self.allowed_user_options),
            )
        except InvalidRequest as e:
            raise Refusal(str(e), status=400, reason="invalid_options") from None
        if request.new:  # a name another user's record holds under our slug: 409
            self.store.get_own(self.user.name, request.name)
        return request

    def _admit(self, request: ProjectRequest, limits: Limits, gpus: GpuFacts | None = None):
        """`admission.admit` with what it needs to know, gathered here."""
        admit(request, Facts(self.user.name, self.name, limits, self._running_projects(), gpus))

    def _running_projects(self) -> dict[str, str]:
        """project -> server, for the user's other servers that run or start.

        Read from what each server was asked to run (its stored user_options,
        made canonical at its start), not from the other spawners' insides.
        """
        running = {}
        for name, other in self.user.spawners.items():
            if other is self or name == self.name:
                continue
            if other.active or getattr(other, "object_id", ""):
                options = other.user_options or {}
                running[options.get("project") or name or self.default_project] = name
        return running

    def _store_user_options(self, request: ProjectRequest, user_options: dict[str, Any]) -> None:
        """Canonical options, persisted: the admin panel's Profile column shows the project,
        and the user's other servers read what this one runs."""
        extras = {k: user_options[k] for k in self.allowed_user_options if k in user_options}
        self.user_options = {**request.user_options(), **extras}
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = dict(self.user_options)

    # ------------------------------------------------------------ the picker

    async def render_options_form(self) -> str:
        projects = self.store.list_owned(self.user.name)
        fixed = bool(self.name) and self.name in {p.name for p in projects}
        limits = self.limits()
        slots, ledger = await self.gpu_allocator.state() if limits.max_gpus > 0 else ([], [])
        gpus = gpu_choices(
            limits, slots, ledger, reserved=self.gpus_reserved, offer_mig=self.offer_mig
        )
        queue = self.gpu_queue
        gpus["waiting"] = len(queue.waiting())
        gpus["queue"] = limits.queue_timeout is not None
        interrupted = queue.interrupted_for(self.user.name, self.name)
        gpus["interrupted"] = interrupted.message if interrupted else ""
        if fixed and not gpus["max"]:
            return ""  # a named server's project is fixed and there is nothing else to pick
        try:
            images = await self.docker("images", filters=labels.managed_filter(self.user.name))
        except docker.errors.DockerException:
            images = []
        return render_picker(
            projects=projects,
            built=built_projects(images),
            types={k: t for k, t in self.types().items() if limits.allows_type(k)},
            default_type=self.default_project_type,
            server_name=self.name,
            fixed_project=fixed,
            selected=projects[0].name if projects else "__new__",
            gpus=gpus,
        )

    # ------------------------------------------------------------ progress

    def _emit(self, progress: int, message: str) -> None:
        if self._events is not None:
            self._events.append({"progress": progress, "message": message})

    async def progress(self):
        """Project, build and container steps, with the build log, as they happen."""
        if self._events is None:
            return
        async for _, event in self._events.follow():
            yield event

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> tuple[str, int]:
        self._events = EventLog(MAX_PROGRESS_EVENTS)
        try:
            with self._refusing():
                return await self._start()
        finally:
            # the container carries the ledger labels now, or never will (a failed or
            # cancelled start): GPUs given to it count no more as "starting"
            self.gpu_allocator.settle(self.user.name, self.name)
            self._events.close()

    async def _start(self) -> tuple[str, int]:
        began = time.monotonic()
        # validated and admitted again (apply_user_options did it too, unless an
        # admin replaced that hook), now with the GPUs as they are
        types = self.types()  # read once per start: each type's Dockerfile is a file
        request = self._parse(self.user_options, types)
        limits = self.limits()
        asked = gpu_request(request, self.user.name, self.name)
        self._admit(request, limits, await self._gpu_facts(limits) if asked.count else None)
        self._store_user_options(request, self.user_options)
        ids = self._resolve_ids()
        self._emit(2, f"{'Creating' if request.new else 'Opening'} project {request.name}")
        project, workspace = self._open_project(request, ids, types)
        unsaved = InstalledRecords(self.state_dir).lost_packages(self.user_slug, project.name)
        if unsaved:
            self._emit(5, unsaved_notice(unsaved, self.user.name, project.name))
        image = await self._ensure_image(project, workspace)
        gpus, since = (
            await self._assign_gpus(asked, limits, wait=request.wait) if asked.count else ((), "")
        )
        self.plan = self.start_plan(
            project, image, ids, workspace, gpus=gpus, since=since, limits=limits, unsaved=unsaved
        )
        self.image = image
        self.object_name = self._render_templates(self.name_template)
        if described := describe_limits(limits):
            self._emit(_CONTAINER, described)
        self._emit(_CONTAINER, f"Starting container {self.object_name}")
        before = self.object_id
        try:
            ip, port = await super().start()
        finally:
            # the container now carries the ledger labels, or it never will
            self.gpu_allocator.settle(self.user.name, self.name)
            if self.object_id and self.object_id != before:
                self._audit_created(self.plan)
        await self._until_it_answers(ip, port)
        self._audit("server", self.plan, action="ready", seconds=round(time.monotonic() - began, 3))
        return ip, port

    def start_plan(
        self,
        project: Project,
        image: str,
        ids: UserIds,
        workspace: Path | str,
        *,
        gpus: Iterable[GpuSlot] = (),
        since: str = "",
        limits: Limits | None = None,
        unsaved: Iterable[str] = (),
    ) -> ContainerPlan:
        """What a start decided, with this hub's container settings, frozen."""
        return ContainerPlan(
            owner=self.user.name,
            server=self.name,
            project=project.name,
            project_type=project.type,
            image=image,
            ids=ids,
            workspace_mount=self.workspace_mount,
            gpus=tuple(gpus),
            gpus_since=since,
            gpu_passing=self.gpu_passing,
            simulated_gpus=bool(self.simulated_gpus),
            limits=limits,
            workspace=str(workspace),
            unsaved_packages=tuple(unsaved),
            service_url=service_url(self.service_url, self.hub.base_url if self.hub else ""),
        )

    async def _until_it_answers(self, ip: str, port: int) -> None:
        """Return when the server answers (its own fast probe), not at the hub's next poll."""
        if not self.ready_probe_interval or self.internal_ssl or self.server is None:
            return
        self._emit(_ANSWER, "Waiting for JupyterLab to answer")
        waited = await wait_until_answers(
            server_url(ip, port, self.server.base_url),
            timeout=self.http_timeout,
            interval=self.ready_probe_interval,
        )
        if waited is None:
            self.log.warning("%s did not answer in %ss", self.object_name, self.http_timeout)
        else:
            self.log.debug("%s answered %.3fs after its start", self.object_name, waited)

    async def _gpu_facts(self, limits: Limits) -> GpuFacts:
        """The GPUs as they are now, for admission."""
        slots, ledger = await self.gpu_allocator.state()
        return GpuFacts(slots, ledger, self.gpu_policy(limits), self.gpu_holds.active())

    async def _assign_gpus(
        self, request: GpuRequest, limits: Limits, *, wait: bool = False
    ) -> tuple[list[GpuSlot], str]:
        """Take the GPUs, now or in the GPU queue (`wait`); a hold on them for this project ends."""
        since = labels.now_iso()
        holds = self.gpu_holds
        queue = self.gpu_queue

        def waiting(waiter: Waiter, message: str) -> None:
            self._emit(_WAITING, message)

        try:
            chosen = await queue.allocate(
                request,
                self.gpu_policy(limits),
                since,
                holds.active,
                wait=wait,
                priority=limits.queue_priority,
                timeout=limits.queue_timeout or 0.0,
                on_update=waiting,
            )
        except QueueTimeout as e:
            raise Refusal(str(e), status=409, reason="gpu_queue") from None
        except (GpuRefusal, GpuUnavailable) as e:
            raise gpu_refusal(e) from None
        holds.release(self.user.name, request.project, [s.uuid for s in chosen])
        self._announce_gpus(chosen)
        return chosen, since

    def _announce_gpus(self, chosen: list[GpuSlot]) -> None:
        for slot in chosen:
            self._emit(_CONTAINER, f"Assigned GPU {slot.index} ({slot.name}, {slot.uuid})")

    def _resolve_ids(self) -> UserIds:
        hook = self.user_ids_hook
        try:
            return resolve_ids(
                self.user.name,
                use_system_users=self.use_system_users,
                min_system_uid=self.min_system_uid,
                allocator=UidAllocator(Path(self.state_dir) / "uids.json", *self.uid_range),
                hook=(lambda: hook(self)) if hook is not None else None,
            )
        except (ValueError, RuntimeError, TypeError) as e:
            raise Refusal(
                f"cannot decide which uid to run as: {e}", status=500, reason="uid"
            ) from None

    def _open_project(
        self, request: ProjectRequest, ids: UserIds, types: dict[str, ProjectType]
    ) -> tuple[Project, Path]:
        """The project's record and workspace, created on first use (`project init`)."""
        project = self.store.get_own(self.user.name, request.name)  # before anything is created
        if project is None:
            project = Project(self.user.name, request.name, request.type, time.time())
        workspace = open_workspace(
            template=self.workspace_template,
            root=self.workspace_root,
            slug=self.user_slug,
            project=project.name,
            ids=ids,
            dockerfile=lambda: types[project.type].template(),
        )
        self.store.touch(self.user_slug, project)
        return project, workspace

    async def _ensure_image(self, project: Project, workspace: Path) -> str:
        """The project's image, built now (with progress events) if it does not exist."""
        ref = image_ref(self.user_slug, project.name)
        with contextlib.suppress(docker.errors.ImageNotFound):
            await self.docker("inspect_image", ref)
            self._emit(_BUILD_END, f"Image {ref} is built")
            return ref
        if notice := rebuild_notice(self.state_dir, self.user_slug, project.name):
            self._emit(_BUILD_START, notice)  # the image cleaner removed it: say so
        dockerfile = read_workspace_file(workspace / DOCKERFILE, self.max_dockerfile_bytes)
        await self._pull_base_image()
        spec = project_build_spec(
            self.build_settings,
            owner=self.user.name,
            slug=self.user_slug,
            project=project.name,
            project_type=project.type,
            dockerfile=dockerfile,
        )
        span = _BUILD_END - _BUILD_START
        await build_image(
            self.builder,
            spec,
            lambda percent, message: self._emit(_BUILD_START + span * percent // 100, message),
            mount=self.workspace_mount,
            log=self.log,
        )
        return ref

    async def pull_image(self, image: str) -> None:
        """Project images are built here, never pulled: a registry may hold a stranger's
        image of the same name. `pull_policy` applies to the base image (before a build)."""
        if self.plan is not None and image == self.plan.image:
            return
        await super().pull_image(image)

    async def _pull_base_image(self) -> None:
        """`pull_policy` for the base image; a failed pull builds from the local copy."""
        try:
            await super().pull_image(self.base_image)
        except docker.errors.DockerException as e:
            self.log.warning(
                "Pulling %s failed (%s); building with the local copy", self.base_image, e
            )

    async def stop(self, now: bool = False) -> None:
        """Retire: remove the container; the workspace and the image stay.

        Returns only once the container is gone: Docker removes an auto-removed
        container in the background, and a quick restart would otherwise clash
        with the old name (and its GPU would still look held).
        """
        plan, container, name = self.plan, self.object_id, self.object_name
        project = plan.project if plan else "?"
        inspected = None
        if container:
            with contextlib.suppress(docker.errors.NotFound):
                inspected = await self.docker("inspect_container", container)
        if inspected is not None and plan is not None and self.save_packages_timeout > 0:
            await record_installed(  # before the stop: the container's layer goes with it
                InstalledRecords(self.state_dir),
                slug=self.user_slug,
                project=plan.project,
                container=container,
                inspected=inspected,
                timeout=self.save_packages_timeout,
                log=self.log,
            )
        held = (inspected["Config"]["Labels"] or {}) if inspected else self._plan_labels(plan)
        uuids = held_uuids(held)
        keep_for = self._hold_seconds() if uuids and not self.gpu_queue.waiting() else 0
        await super().stop(now=now)
        if container:  # a container was started (by this hub, or before its restart)
            self._audit_stopped(plan, name, held)
        if keep_for:
            self.gpu_holds.keep(self.user.name, project, uuids, keep_for)
            self.log.info("GPU %s kept for %s/%s for %ss", uuids, self.user.name, project, keep_for)
        if container and not await asyncio.to_thread(wait_removed, container, 30):
            self.log.warning("Container %s still exists 30s after its removal", container[:12])
        if uuids:
            self.gpu_queue.wake()  # the GPUs are free: the first waiters get them now
        self.log.info("Retired %s (project %s) of %s", self.object_name, project, self.user.name)

    def _hold_seconds(self) -> float:
        """How long to keep this server's GPUs for a quick restart (`gpu_hold_after_stop`):
        not at all after a retirement by policy, whose point is to free them."""
        try:
            seconds = self.limits().gpu_hold_after_stop or 0
        except Refusal:
            return 0
        retired = RetirementLog(self.state_dir).retired_lately(self.user.name, self.name)
        return 0 if retired else seconds

    # ------------------------------------------------------------ the container request

    def docker(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Future:
        """DockerSpawner's engine calls; its create request gets ds01's rules last."""
        if method == "create_container":
            kwargs = self.container_request(kwargs)
        return super().docker(method, *args, **kwargs)

    def container_request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """DockerSpawner's create_container arguments, the plan's request applied over them."""
        if self.plan is None:
            raise Refusal("no project resolved for this container", status=500)
        kwargs.setdefault("name", self.object_name)
        seal = LedgerSeal(self.state_dir).seal
        return harden_request(kwargs, self.plan, seal=seal, started_at=labels.now_iso())
