"""DS01Spawner: DockerSpawner for a shared lab server, one project per server.

Glue only: projects, images and identities live in their own modules; this
class holds the configuration (its traitlets' help text is the config
reference) and wires those modules into JupyterHub's spawn lifecycle:

    apply_user_options -> validate the project request (400 on bad input)
    start              -> uid, workspace, image (built here if missing,
                          streamed to progress()), then DockerSpawner.start
    stop               -> retire: the container is removed, workspace and
                          image stay
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import requests.exceptions
from dockerspawner import DockerSpawner
from jinja2 import Environment, PackageLoader, select_autoescape
from jupyterhub.spawner import SpawnException
from traitlets import (
    Bool,
    Callable,
    Dict,
    Enum,
    Float,
    Integer,
    List,
    TraitError,
    Tuple,
    Unicode,
    default,
    validate,
)

from . import labels
from .container import ContainerPlan, container_env, harden_request
from .events import EventLog
from .gpus import (
    GpuAllocator,
    GpuHolds,
    GpuPolicy,
    GpuRefusal,
    GpuRequest,
    LedgerSeal,
    choose,
    gpu_allocator,
)
from .identity import UidAllocator, UserIds, resolve_ids
from .images import (
    BUILD_NETWORK,
    BuildError,
    BuildRecords,
    BuildSettings,
    ImageBuilder,
    default_client,
    image_ref,
    project_build_spec,
)
from .installed import InstalledRecords, read_added_packages
from .limits import Limits, PolicyError, PolicyStore, format_size, parse_size
from .nvml import GpuSlot, GpuUnavailable
from .projects import (
    DOCKERFILE,
    InvalidRequest,
    Project,
    ProjectRequest,
    ProjectStore,
    ProjectType,
    WorkspaceError,
    discover_types,
    options_from_form,
    parse_user_options,
    prepare_workspace,
    read_workspace_file,
    workspace_path,
    write_new_file,
)
from .retirement import RetirementLog

_REPO_TYPES = Path(__file__).resolve().parent.parent / "images" / "types"
_templates = Environment(
    loader=PackageLoader("ds01_spawner", "templates"), autoescape=select_autoescape()
)


def refusal(
    message: str, *, reason: str, status_code: int = 400, message_html: str = ""
) -> SpawnException:
    """A SpawnException whose clean message (and HTML) reach the spawn page and REST client.

    JupyterHub's progress stream and error pages read `jupyterhub_message` /
    `jupyterhub_html_message`; without them they show the exception's repr.
    """
    e = SpawnException(message, reason=reason, status_code=status_code, message_html=message_html)
    e.jupyterhub_message = message
    if message_html:
        e.jupyterhub_html_message = message_html
    return e


# The share of the progress bar each spawn phase uses; the spawn page keeps the last
# MAX_PROGRESS_EVENTS lines (a build may print without end).
MAX_PROGRESS_EVENTS = 2000
_BUILD_START, _BUILD_END, _CONTAINER = 10, 85, 90


class DS01Spawner(DockerSpawner):
    """Spawn each project of a user in a container of the project's own image."""

    # ------------------------------------------------------------ configuration

    workspace_root = Unicode(
        "/srv/ds01/workspaces",
        help="Host directory under which all workspaces live. Created if missing.",
    ).tag(config=True)

    workspace_template = Unicode(
        "{workspace_root}/{user}/{project}",
        help="""Host path of a project's workspace, mounted at `workspace_mount`.

        Fields: {workspace_root}, {user} (the user's slug: the hub name when it is
        plain [a-z0-9-], else a folded name plus a hash; `-2`, `-3`, ... when another
        user already holds that slug, as recorded in state_dir/slugs.json) and
        {project}. The result must lie under workspace_root.
        """,
    ).tag(config=True)

    workspace_mount = Unicode(
        "/workspace",
        help="Where the workspace appears inside the container; also the working directory.",
    ).tag(config=True)

    state_dir = Unicode(
        "/srv/ds01/state",
        help="""Hub-side state: project records, the uid and slug maps, the GPU ledger's
        key, build records. Shared with the ds01 service; never visible to containers.""",
    ).tag(config=True)

    project_types_dir = Unicode(
        str(_REPO_TYPES),
        help="""Directory of project type templates: each `<type>/Dockerfile` is a type.

        A new project's workspace gets a copy of its type's Dockerfile; the first
        comment line is the description shown in the project picker.
        """,
    ).tag(config=True)

    project_types = List(
        Unicode(),
        help="Project types users may choose, in picker order. Empty: every type found.",
    ).tag(config=True)

    default_project_type = Unicode(
        "base", help="Type of a project created without one (e.g. through the REST API)."
    ).tag(config=True)

    default_project = Unicode(
        "default",
        help="Project the default server opens when the user has none and names none.",
    ).tag(config=True)

    base_image = Unicode(
        "ds01/singleuser:latest",
        help="""Passed to every project build as the BASE_IMAGE build argument.

        `images/build` makes ds01/singleuser:latest locally; on a server with a
        registry, any jupyterhub-singleuser image works.
        """,
    ).tag(config=True)

    build_args = Dict(
        value_trait=Unicode(),
        help="""Extra build arguments for every project build.

        E.g. {"PIP_INDEX_URL": "https://pypi.lab.example/simple"} for a lab
        package mirror: the project templates declare `ARG PIP_INDEX_URL`.
        """,
    ).tag(config=True)

    build_network_mode = Unicode(
        BUILD_NETWORK,
        allow_none=True,
        help="""Network of image builds' RUN steps.

        Default `ds01-build`: a bridge network of their own (made on first use, no
        traffic between its containers), not the bridge every user container
        shares. `none`: builds reach no network at all (a lab without a package
        mirror, or with wheels in the image). A network of your own (e.g.
        `docker network create --internal`) that reaches only the lab's package
        mirror. `host` only for tests against a package index on 127.0.0.1.
        """,
    ).tag(config=True)

    build_memory_limit = Unicode(
        "4G",
        allow_none=True,
        help="Memory of each build step (RUN), no swap on top, e.g. '4G'. Empty: no limit.",
    ).tag(config=True)

    @validate("build_memory_limit")
    def _valid_build_memory(self, proposal: Any) -> str:
        try:
            parse_size(proposal.value)
        except ValueError as e:
            raise TraitError(f"build_memory_limit: {e}") from None
        return proposal.value

    build_pids_limit = Integer(
        1024,
        min=0,
        help="""Processes all of one user's build steps may run together (0: no limit).

        Set on a cgroup parent of the user's builds (the classic builder has no
        pids limit of its own); needs the engine's cgroupfs driver and a hub that
        may write the cgroup tree, else builds run without it (logged once).
        """,
    ).tag(config=True)

    build_time_limit = Float(
        7200,
        min=0,
        help="""Seconds a whole build may take, output or not (0: no limit).

        A build past it is cancelled (nothing is tagged, the previous image stays);
        `build_timeout` is the separate limit on a build that sends no output.
        """,
    ).tag(config=True)

    max_builds_per_user = Integer(
        1,
        min=1,
        help="""Builds of one user that run at once; their others wait (in order) while
        other users' builds take the free slots, so nobody holds every slot.""",
    ).tag(config=True)

    allowed_base_images = List(
        Unicode(),
        default_value=["ds01/*"],
        help="""Images a project's Dockerfile may build FROM (or COPY --from), besides
        `base_image` and the user's own project images. Patterns as in `ds01/*`;
        checked after build arguments are expanded. Another user's images never.
        """,
    ).tag(config=True)

    build_cpu_shares = Integer(
        256,
        min=0,
        help="""CPU weight of image builds' RUN steps (Docker's --cpu-shares; servers have 1024).

        Only matters when the CPUs are all busy: then a build gets a quarter of
        what a running server gets, so a long pip build slows nobody's notebook
        or spawn much. 0: Docker's default (builds weigh as much as servers).
        """,
    ).tag(config=True)

    max_concurrent_builds = Integer(
        2,
        min=1,
        help="""Image builds allowed at once, hub-wide. Further builds wait for a slot.

        Builds run on their own threads, never on DockerSpawner's shared executor,
        so a long build does not hold up other users' spawns, polls or stops.
        """,
    ).tag(config=True)

    build_timeout = Integer(
        3600, help="Seconds a build may run without sending output before it is failed."
    ).tag(config=True)

    max_dockerfile_bytes = Integer(
        256 * 1024, help="Largest workspace Dockerfile the hub will build."
    ).tag(config=True)

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

    save_packages_timeout = Float(
        5.0,
        help="""Seconds to read, at retire, which pip packages were installed in the
        container beyond its image (offered on the image page), from the engine's
        list of the container's file changes: nothing runs inside the container.
        0 turns it off. The stop is never held up longer: an engine that does not
        answer in time leaves nothing recorded, and the container is retired anyway.
        """,
    ).tag(config=True)

    # ------------------------------------------------------------ lab policy

    policy_file = Unicode(
        "",
        help="""YAML file of per-user and per-group limits (see policy.yaml in the repo).

        Sections `defaults`, `groups` (JupyterHub groups; a user in several gets
        the first one listed), `users` and `retirement`. Validated when the hub
        starts (an error names the file, line and key and stops the hub) and
        re-read whenever it changes: a broken edit keeps the previous policy in
        force and is logged. Empty: only `policy` applies.
        """,
    ).tag(config=True)

    policy = Dict(
        help="""The same limits as `policy_file`, as a dict, for jupyterhub_config.py.

        E.g. {"defaults": {"memory": "8G", "max_gpus": 1}, "groups": {"faculty":
        {"max_gpus": 2}}}. Where both set a value, the file wins.
        """,
    ).tag(config=True)

    # ------------------------------------------------------------ GPUs

    simulated_gpus = Integer(
        0,
        help="""Present this many simulated GPUs instead of reading NVML (laptops, tests).

        They look like real ones to the picker, the policy and the ledger, and
        are passed to containers as environment variables only. The repo's
        jupyterhub_config.py sets it from DS01_SIMULATED_GPUS.
        """,
    ).tag(config=True)

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

    containers_per_gpu = Integer(
        1,
        min=1,
        help="1: a GPU belongs to one container at a time (exclusive). N: up to N share it.",
    ).tag(config=True)

    gpus_reserved = List(
        Unicode(),
        help="GPUs never handed out, by index ('3', '0:1' for a MIG device) or UUID.",
    ).tag(config=True)

    offer_mig = Bool(
        False,
        help='Offer MIG devices of MIG-enabled GPUs (`gpus: "mig"`); whole GPUs otherwise.',
    ).tag(config=True)

    gpu_busy_memory_fraction = Float(
        0.10,
        help="A GPU no server holds is busy (a process outside the hub) above this memory share.",
    ).tag(config=True)

    gpu_busy_utilization = Integer(
        10,
        help="... or above this utilization in percent, as NVML reports it.",
    ).tag(config=True)

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
        return "skip"  # project images are local; start() builds what is missing

    @default("start_timeout")
    def _default_start_timeout(self) -> int:
        return 900  # a first spawn may build the project's image

    @default("notebook_dir")
    def _default_notebook_dir(self) -> str:
        return self.workspace_mount

    @default("options_form")
    def _default_options_form(self) -> Any:
        return lambda spawner: spawner.render_options_form()

    @default("options_from_form")
    def _default_options_from_form(self) -> Any:
        return options_from_form

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        return lambda spawner, user_options: spawner.apply_project_options(user_options)

    # ------------------------------------------------------------ shared objects

    _builders: ClassVar[dict[tuple[str, int, int], ImageBuilder]] = {}

    @property
    def builder(self) -> ImageBuilder:
        """The hub's build pool (one per state_dir and size: shared by every spawner)."""
        key = (self.state_dir, self.max_concurrent_builds, self.max_builds_per_user)
        if key not in self._builders:
            timeout = self.build_timeout
            self._builders[key] = ImageBuilder(
                self.max_concurrent_builds,
                lambda: default_client(timeout),
                BuildRecords(self.state_dir),
                max_per_user=self.max_builds_per_user,
            )
        return self._builders[key]

    @property
    def build_settings(self) -> BuildSettings:
        return BuildSettings(
            base_image=self.base_image,
            build_args=dict(self.build_args),
            network_mode=self.build_network_mode or None,
            cpu_shares=self.build_cpu_shares or None,
            memory=parse_size(self.build_memory_limit) if self.build_memory_limit else None,
            pids_limit=self.build_pids_limit or None,
            time_limit=self.build_time_limit or None,
            allowed_images=tuple(self.allowed_base_images),
        )

    @property
    def gpu_allocator(self) -> GpuAllocator:
        return gpu_allocator(self.simulated_gpus, self.state_dir)

    _policies: ClassVar[dict[tuple[str, str], PolicyStore]] = {}

    @property
    def policy_store(self) -> PolicyStore:
        """This hub's policy (one per file and settings: every spawner shares it)."""
        key = (self.policy_file, json.dumps(self.policy, sort_keys=True, default=str))
        if key not in self._policies:
            self._policies[key] = PolicyStore(self.policy_file, self.policy, self.types())
        return self._policies[key]

    def limits(self) -> Limits:
        """This user's limits under the policy in force now."""
        try:
            policy = self.policy_store.current()
        except PolicyError as e:
            raise refusal(
                f"the lab policy cannot be read, so no server can start: {e}. "
                "Tell the hub's admin.",
                reason="policy",
                status_code=500,
            ) from None
        return policy.resolve(self.user.name, [g.name for g in self.user.groups])

    def gpu_policy(self, limits: Limits) -> GpuPolicy:
        return GpuPolicy(
            max_per_user=limits.max_gpus,
            max_per_project=limits.max_gpus_per_project,
            allow_full_gpu=limits.allow_full_gpu,
            containers_per_gpu=self.containers_per_gpu,
            reserved=frozenset(self.gpus_reserved),
            offer_mig=self.offer_mig,
            busy_memory_fraction=self.gpu_busy_memory_fraction,
            busy_utilization=self.gpu_busy_utilization,
        )

    @property
    def store(self) -> ProjectStore:
        return ProjectStore(self.state_dir)

    @property
    def user_slug(self) -> str:
        """This user's slug, from the hub-wide registry (never another user's)."""
        return self.store.slug(self.user.name)

    @property
    def gpu_holds(self) -> GpuHolds:
        return GpuHolds(self.state_dir)

    def types(self) -> dict[str, ProjectType]:
        return discover_types(self.project_types_dir, self.project_types or None)

    # ------------------------------------------------------------ per-server state

    _request: ProjectRequest | None = None
    _limits: Limits | None = None
    _configured_limits: tuple[Any, Any] | None = None
    _project: Project | None = None
    _ids: UserIds | None = None
    _workspace: str = ""
    _gpus: list[GpuSlot] = []
    _unsaved: list[str] = []  # packages the last session installed and lost
    _gpus_since: str = ""
    _events: EventLog[dict[str, Any]] | None = None

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        ds01 = state.get("ds01") or {}
        if ds01.get("project"):
            self._project = Project(
                owner=self.user.name, name=ds01["project"], type=ds01.get("type", ""), created=0
            )
            self._workspace = ds01.get("workspace", "")
            if ds01.get("uid"):
                self._ids = UserIds(ds01["uid"], ds01["gid"], ds01.get("ids_source", "state"))

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.object_id and self._project is not None:
            state["ds01"] = {
                "project": self._project.name,
                "type": self._project.type,
                "workspace": self._workspace,
                "image": self.image,
                "uid": self._ids.uid if self._ids else None,
                "gid": self._ids.gid if self._ids else None,
            }
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self._project = None
        self._workspace = ""
        self._gpus = []

    def template_namespace(self) -> dict[str, str]:
        ns = super().template_namespace()
        ns["user_slug"] = self.user_slug
        ns["project"] = self._project.name if self._project else (self.name or "default")
        return ns

    # ------------------------------------------------------------ requests

    def apply_project_options(self, user_options: dict[str, Any]) -> None:
        """Validate the request before anything is created (bad input -> 400)."""
        try:
            self._request = self._validate(user_options)
        except SpawnException:
            self._forget_refused_options()
            raise
        self._store_user_options(self._request)

    def _forget_refused_options(self) -> None:
        """The hub saved a request's options as the server's defaults before we refused
        it; forget them, so a later start without options is not refused again."""
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = None
            self.db.commit()

    def _store_user_options(self, request: ProjectRequest) -> None:
        """Canonical options, persisted: the admin panel's Profile column shows the project."""
        self.user_options = request.user_options()
        if self.orm_spawner is not None:
            self.orm_spawner.user_options = request.user_options()

    def _validate(self, user_options: Any) -> ProjectRequest:
        existing = {p.name: p for p in self.store.list_owned(self.user.name)}
        try:
            request = parse_user_options(
                user_options,
                server_name=self.name,
                types=self.types(),
                existing=existing,
                default_type=self.default_project_type,
                fallback_project=next(iter(existing), self.default_project),
            )
        except InvalidRequest as e:
            raise refusal(str(e), reason="invalid_options", status_code=400) from None
        if request.new:
            self._own_record(request.name)  # refuses a name another user's record holds
        self._check_not_running_elsewhere(request.name)
        self._limits = self.limits()
        self._check_limits(request, self._limits)
        return request

    def _own_record(self, name: str) -> Project | None:
        """This user's record of project `name`, or None if there is none.

        A record under the user's slug that names another owner (two users once
        shared a slug, or a forged record) is not theirs: not listed, not opened,
        and not created over, since its workspace and image are the other's.
        """
        project = self.store.get(self.user_slug, name)
        if project is not None and project.owner != self.user.name:
            raise refusal(
                f"project {name!r} cannot be created: under your slug {self.user_slug!r} "
                "there is already another user's project of that name (two users share the "
                "slug). Nothing was changed; choose another name, and ask an admin to give "
                "the two users separate slugs.",
                reason="project_clash",
                status_code=409,
            )
        return project

    def _check_limits(self, request: ProjectRequest, limits: Limits) -> None:
        """The policy's limits a request can break before anything exists (403/409)."""
        if not limits.allows_type(request.type):
            allowed = ", ".join(limits.allowed_types or ()) or "none"
            raise refusal(
                f"project type {request.type!r} is not allowed for you (allowed_types: "
                f"{allowed}); choose another type, or ask the hub's admin",
                reason="policy",
                status_code=403,
            )
        if limits.max_running_projects is None:
            return
        running = sorted(
            getattr(other._project, "name", None) or name or "default"
            for name, other in self._other_servers()
            if other.active
        )
        if len(running) >= limits.max_running_projects:
            noun = "project" if len(running) == 1 else "projects"
            advice = (
                f"stop one of {', '.join(running)} first"
                if running
                else "ask the hub's admin for more"
            )
            raise refusal(
                f"you run {len(running)} {noun}, your limit is {limits.max_running_projects} "
                f"(max_running_projects): {advice}",
                reason="policy",
                status_code=409,
            )

    def _other_servers(self) -> list[tuple[str, Any]]:
        """The user's other servers' spawners (name, spawner)."""
        return [
            (name, other)
            for name, other in self.user.spawners.items()
            if other is not self and name != self.name
        ]

    def _check_not_running_elsewhere(self, project: str) -> None:
        for name, other in self._other_servers():
            running = other.active or getattr(other, "object_id", None)
            if running and getattr(other, "_project", None) and other._project.name == project:
                where = f"server {name!r}" if name else "your default server"
                raise refusal(
                    f"project {project!r} is already running in {where}; open or stop it there",
                    reason="project_in_use",
                    status_code=409,
                )

    # ------------------------------------------------------------ the picker

    async def render_options_form(self) -> str:
        projects = self.store.list_owned(self.user.name)
        fixed = bool(self.name) and self.name in {p.name for p in projects}
        limits = self.limits()
        gpus = await self._gpu_choices(limits)
        if fixed and not gpus["max"]:
            return ""  # a named server's project is fixed and there is nothing else to pick
        return _templates.get_template("options_form.html").render(
            projects=projects,
            built=await self._built_projects(),
            types={k: t for k, t in self.types().items() if limits.allows_type(k)},
            default_type=self.default_project_type,
            server_name=self.name,
            fixed_project=fixed,
            selected=projects[0].name if projects else "__new__",
            gpus=gpus,
        )

    async def _gpu_choices(self, limits: Limits) -> dict[str, Any]:
        """What the picker offers: up to `max` whole GPUs, MIG, and how many are free now."""
        limit = limits.max_gpus
        if limits.max_gpus_per_project is not None:
            limit = min(limit, limits.max_gpus_per_project)
        if limit <= 0:
            return {"max": 0, "mig": False, "note": ""}
        allocator = self.gpu_allocator
        try:
            slots = await allocator.slots()
        except GpuUnavailable:
            return {"max": 0, "mig": False, "note": "This server has no usable GPUs."}
        ledger = await allocator.ledger()
        whole = [s for s in slots if not s.is_mig and s.uuid not in set(self.gpus_reserved)]
        held = {h.uuid for h in ledger}
        free = sum(s.uuid not in held for s in whole)
        return {
            "max": min(int(limit), len(whole)) if limits.allow_full_gpu else 0,
            "mig": self.offer_mig and any(s.is_mig for s in slots),
            "note": f"{free} of {len(whole)} GPUs free right now; your limit is {limit:g}.",
        }

    async def _built_projects(self) -> dict[str, str]:
        """project -> creation time of its image, for this user."""
        try:
            images = await self.docker("images", filters=labels.managed_filter(self.user.name))
        except docker.errors.DockerException:
            return {}
        built = {}
        for image in images:
            project = (image.get("Labels") or {}).get(labels.PROJECT)
            if project and any(t.endswith(":latest") for t in image.get("RepoTags") or []):
                built[project] = time.strftime("%Y-%m-%d %H:%M", time.localtime(image["Created"]))
        return built

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
            return await self._start()
        except SpawnException:
            self._forget_refused_options()
            raise
        finally:
            self._events.close()

    async def _start(self) -> tuple[str, int]:
        # validated (and checked against the user's other servers) just before,
        # by apply_user_options; or here, if an admin replaced that hook
        request = self._request or self._validate(self.user_options)
        limits = self._limits or self.limits()
        self._request = None
        ids = self._resolve_ids()
        types = self.types()
        self._emit(2, f"{'Creating' if request.new else 'Opening'} project {request.name}")
        gpu_request = GpuRequest(self.user.name, request.name, self.name, request.gpus, request.mig)
        if gpu_request.count:
            await self._check_gpus(gpu_request, limits)  # refuse early, before a long build
        project, workspace = self._open_project(request, ids, types)
        self._unsaved = self._unsaved_packages(project)
        image = await self._ensure_image(project, workspace, ids)

        self._project, self._ids, self._workspace = project, ids, str(workspace)
        self._store_user_options(request)
        self.image = image  # re-renders object_name from name_template
        self.object_name = self._render_templates(self.name_template)
        self._gpus = await self._assign_gpus(gpu_request, limits) if gpu_request.count else []
        self._apply_container_limits(limits)
        self._emit(_CONTAINER, f"Starting container {self.object_name}")
        try:
            ip_port = await super().start()
        finally:
            # the container now carries the ledger labels, or it never will
            self.gpu_allocator.settle(self.user.name, self.name)
        return ip_port

    def _unsaved_packages(self, project: Project) -> list[str]:
        """Packages the last session installed that are not in the image: tell the user."""
        record = InstalledRecords(self.state_dir).last_session(self.user_slug, project.name)
        if not record:
            return []
        packages = record["packages"]
        shown = ", ".join(packages[:8]) + (" ..." if len(packages) > 8 else "")
        self._emit(
            5,
            f"Last session you installed packages that are not in the image and are gone "
            f"now: {shown}. Add them to the image on the ds01 image page "
            f"(/services/ds01/images/{self.user.name}/{project.name}).",
        )
        return packages

    async def _record_installed(self, inspected: dict[str, Any]) -> None:
        """Before retire: what was pip-installed here beyond the image? Bounded in time.

        Read from the container's writable layer (or the engine's list of its file
        changes), never by running anything in the container. Not after the stop:
        the container is created with auto_remove, so the engine removes it (and
        its writable layer) as soon as it has stopped.
        """
        if not (self.save_packages_timeout > 0 and self._project and self.object_id):
            return
        image_id = inspected["Image"]
        added = await read_added_packages(
            self.object_id, self.save_packages_timeout, inspected.get("GraphDriver")
        )
        if added is None:
            self.log.info("No file changes for %s: not recording its packages", self.object_name)
            return
        InstalledRecords(self.state_dir).record_session(
            self.user_slug, self._project.name, image_id, added
        )
        if added:
            self.log.info("%s installed %s beyond its image", self.object_name, added[:20])

    async def _check_gpus(self, request: GpuRequest, limits: Limits) -> None:
        """Would `request` get GPUs now? Raise the refusal if not (nothing is held)."""
        try:
            allocator = self.gpu_allocator
            choose(
                await allocator.slots(),
                await allocator.ledger(),
                request,
                self.gpu_policy(limits),
                self.gpu_holds.active(),
            )
        except (GpuRefusal, GpuUnavailable) as e:
            raise self._gpu_refusal(e) from None

    async def _assign_gpus(self, request: GpuRequest, limits: Limits) -> list[GpuSlot]:
        self._gpus_since = labels.now_iso()
        holds = self.gpu_holds
        try:
            chosen = await self.gpu_allocator.allocate(
                request, self.gpu_policy(limits), self._gpus_since, holds.active()
            )
        except (GpuRefusal, GpuUnavailable) as e:
            raise self._gpu_refusal(e) from None
        # a hold ends when its owner takes the GPU (or the project) back
        holds.release(self.user.name, request.project, [s.uuid for s in chosen])
        for slot in chosen:
            self._emit(_CONTAINER, f"Assigned GPU {slot.index} ({slot.name}, {slot.uuid})")
        return chosen

    def _apply_container_limits(self, limits: Limits) -> None:
        """CPU and memory as DockerSpawner's own settings (they also reach the server as
        CPU_LIMIT / MEM_LIMIT); shm and pids are set in `_harden`."""
        self._limits = limits
        if self._configured_limits is None:  # the admin's own mem_limit / cpu_limit, if any
            self._configured_limits = (self.mem_limit, self.cpu_limit)
        mem, cpu = self._configured_limits
        self.mem_limit = limits.memory if limits.memory is not None else mem
        self.cpu_limit = limits.max_cpus if limits.max_cpus is not None else cpu
        shown = [
            f"{name} {value}"
            for name, value in (
                ("CPUs", limits.max_cpus),
                ("memory", format_size(limits.memory) if limits.memory else None),
                ("/dev/shm", format_size(limits.shm_size) if limits.shm_size else None),
                ("processes", limits.pids_limit),
            )
            if value is not None
        ]
        if shown:
            self._emit(_CONTAINER, f"Limits: {', '.join(shown)}")

    def _gpu_refusal(self, e: Exception) -> SpawnException:
        if isinstance(e, GpuUnavailable):
            return refusal(
                f"this server has no usable GPUs ({e}); start without a GPU",
                reason="gpu",
                status_code=503,
            )
        return refusal(f"no GPU for you right now: {e}", reason="gpu", status_code=409)

    def _resolve_ids(self) -> UserIds:
        try:
            if self.user_ids_hook is not None:
                ids = self.user_ids_hook(self)
                if ids is not None:
                    return UserIds(int(ids[0]), int(ids[1]), "hook")
            allocator = UidAllocator(Path(self.state_dir) / "uids.json", *self.uid_range)
            return resolve_ids(
                self.user.name,
                use_system_users=self.use_system_users,
                min_system_uid=self.min_system_uid,
                allocator=allocator,
            )
        except (ValueError, RuntimeError) as e:
            raise refusal(
                f"cannot decide which uid to run as: {e}", reason="uid", status_code=500
            ) from None

    def _open_project(
        self, request: ProjectRequest, ids: UserIds, types: dict[str, ProjectType]
    ) -> tuple[Project, Path]:
        """The project's record and workspace, created on first use (`project init`)."""
        slug = self.user_slug
        try:
            project = self._own_record(request.name)  # before anything is created
            workspace = workspace_path(
                self.workspace_template, root=self.workspace_root, user=slug, project=request.name
            )
            created = prepare_workspace(workspace, ids, root=self.workspace_root)
            if project is None:
                project = Project(self.user.name, request.name, request.type, time.time())
            if created or not (workspace / DOCKERFILE).exists():
                write_new_file(workspace / DOCKERFILE, types[project.type].template(), ids)
        except WorkspaceError as e:
            raise refusal(str(e), reason="workspace", status_code=400) from None
        except OSError as e:
            raise refusal(
                f"cannot prepare the workspace of {request.name!r}: {e.strerror} "
                f"({e.filename}). Ask an admin to check that the "
                f"workspace root {self.workspace_root} is writable by the hub.",
                reason="workspace",
                status_code=500,
            ) from None
        except KeyError as e:
            raise refusal(
                f"cannot prepare the workspace of {request.name!r}: {e}",
                reason="workspace",
                status_code=500,
            ) from None
        self.store.touch(slug, project)
        return project, workspace

    async def _ensure_image(self, project: Project, workspace: Path, ids: UserIds) -> str:
        """The project's image, built now (with progress events) if it does not exist."""
        ref = image_ref(self.user_slug, project.name)
        try:
            await self.docker("inspect_image", ref)
            self._emit(_BUILD_END, f"Image {ref} is built")
            return ref
        except docker.errors.ImageNotFound:
            pass
        try:
            dockerfile = read_workspace_file(workspace / DOCKERFILE, self.max_dockerfile_bytes)
        except WorkspaceError as e:
            raise refusal(str(e), reason="build", status_code=400) from None
        spec = project_build_spec(
            self.build_settings,
            owner=self.user.name,
            slug=self.user_slug,
            project=project.name,
            project_type=project.type,
            dockerfile=dockerfile,
        )
        last = self.builder.records.read(ref) if self.builder.records else None
        if last is not None and last.get("status") == "interrupted":
            self.log.warning(
                "The last build of %s (started %s) was interrupted; building it again",
                ref,
                last.get("started", "?"),
            )
            self._emit(
                _BUILD_START,
                f"The last build of {ref} was interrupted (the hub or the image page "
                "stopped during it); nothing was tagged, building it again",
            )
        self._emit(_BUILD_START, f"Building image {ref} (first start of this project)")
        build = self.builder.build(spec)
        span = _BUILD_END - _BUILD_START
        async for event in build.follow():
            if event.phase == "building":
                continue  # said above, with more context
            progress = _BUILD_START + span * (event.progress or 0) // 100
            self._emit(progress, event.message)
        try:
            await build.wait()
        except BuildError as e:
            tail = "\n".join(e.log_tail)
            raise refusal(
                f"{e}. The previous image and the workspace are unchanged; "
                f"fix the Dockerfile in {self.workspace_mount} and start again.",
                reason="build",
                status_code=500,
                message_html=(
                    f"<p>{html.escape(str(e))}</p><pre>{html.escape(tail)}</pre>"
                    "<p>The previous image and the workspace are unchanged.</p>"
                ),
            ) from None
        return ref

    async def stop(self, now: bool = False) -> None:
        """Retire: remove the container; the workspace and the image stay.

        Returns only once the container is gone: Docker removes an auto-removed
        container in the background, and a quick restart would otherwise clash
        with the old name (and its GPU would still look held).
        """
        project = self._project.name if self._project else "?"
        container = self.object_id
        inspected = None
        if container:
            with contextlib.suppress(docker.errors.NotFound):
                inspected = await self.docker("inspect_container", container)
        if inspected is not None:
            await self._record_installed(inspected)
        held = self._gpus_to_keep(project, inspected)
        await super().stop(now=now)
        if held:
            seconds, uuids = held
            self.gpu_holds.keep(self.user.name, project, uuids, seconds)
            self.log.info(
                "GPU %s kept for %s/%s for %ss", ",".join(uuids), self.user.name, project, seconds
            )
        if container:
            await self._wait_gone(container)
        self.log.info("Retired %s (project %s) of %s", self.object_name, project, self.user.name)

    def _gpus_to_keep(self, project: str, inspected: dict | None) -> tuple[float, list[str]] | None:
        """The GPUs to keep for a quick restart (`gpu_hold_after_stop`): not after a
        retirement by policy, whose point is to free them."""
        if inspected is None:
            return None
        uuids = [u for u in inspected["Config"]["Labels"].get(labels.GPU_UUIDS, "").split(",") if u]
        if not uuids:
            return None
        try:
            seconds = self.limits().gpu_hold_after_stop
        except SpawnException:
            return None
        if not seconds or RetirementLog(self.state_dir).retired_lately(self.user.name, self.name):
            return None
        return seconds, uuids

    async def _wait_gone(self, container: str, timeout: float = 30) -> None:
        """Until the engine has removed `container`: its own wait, not a poll (which
        costs a poll interval on every stop), on a client of its own."""

        def wait() -> bool:
            client = docker.APIClient(
                version="auto", timeout=timeout, **docker.utils.kwargs_from_env()
            )
            try:
                client.wait(container, condition="removed")
                return True
            except docker.errors.NotFound:
                return True  # already gone
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                return False
            finally:
                client.close()

        if await asyncio.to_thread(wait):
            return
        self.log.warning("Container %s still exists %ss after its removal", container[:12], timeout)

    # ------------------------------------------------------------ container spec

    @property
    def volume_binds(self) -> dict[str, dict[str, str]]:
        binds = super().volume_binds
        if self._workspace:
            binds[self._workspace] = {"bind": self.workspace_mount, "mode": "rw"}
        return binds

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        plan = self._container_plan()
        if plan is not None:
            env.update(container_env(plan, self._unsaved))
        return env

    def docker(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Future:
        if method == "create_container":
            kwargs = self._harden(kwargs)
        return super().docker(method, *args, **kwargs)

    def _container_plan(self) -> ContainerPlan | None:
        if self._ids is None or self._project is None:
            return None
        return ContainerPlan(
            owner=self.user.name,
            server=self.name,
            project=self._project.name,
            project_type=self._project.type,
            image=self.image,
            ids=self._ids,
            workspace_mount=self.workspace_mount,
            gpus=tuple(self._gpus),
            gpus_since=self._gpus_since,
            gpu_passing=self.gpu_passing,
            simulated_gpus=bool(self.simulated_gpus),
            limits=self._limits,
        )

    def _harden(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """ds01's rules, last, over any extra_create_kwargs / extra_host_config."""
        plan = self._container_plan()
        if plan is None:
            raise refusal("no project resolved for this container", reason="internal")
        kwargs.setdefault("name", self.object_name)
        return harden_request(
            kwargs, plan, seal=LedgerSeal(self.state_dir).seal, started_at=labels.now_iso()
        )
