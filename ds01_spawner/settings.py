"""The settings the hub and the ds01 service share, declared once.

`DS01Settings` holds every setting both processes read: projects and
workspaces, image builds, the lab policy, the GPU inventory. `DS01Spawner`
inherits it, so admins keep writing ``c.DS01Spawner.<name>``; the service
builds one from the hub's final values, which configure(c) hands it in
$DS01_SERVICE_SETTINGS (`from_environ`). The objects built from these settings
(the build pool, the policy, the GPU allocator, the audit trail) exist once
per process and settings: every spawner, or the service's handlers, share them
(`shared`). One setting is the hub's alone: `audit_handlers` holds objects,
which cannot travel in that JSON (`HUB_ONLY`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from traitlets import Bool, Dict, Float, Instance, Integer, List, TraitError, Unicode, validate
from traitlets.config import Config, LoggingConfigurable

from .audit import AuditLog
from .builds import BuildRecords, ImageBuilder
from .engine import docker_client
from .gpuqueue import GpuQueue
from .gpus import GpuAllocator, GpuPolicy, gpu_allocator
from .images import BUILD_NETWORK, BuildSettings
from .ledger import GpuHolds, LedgerSeal
from .limits import Limits, PolicyStore
from .projects import ProjectStore, ProjectType, discover_types
from .swarmallocator import swarm_gpus
from .units import parse_size
from .workspaces import workspace_path

_REPO_TYPES = Path(__file__).resolve().parent.parent / "images" / "types"
SETTINGS_ENV = "DS01_SERVICE_SETTINGS"  # how configure(c) hands the hub's values to the service
SWARM_GPU_KIND = "swarm_gpu_kind"  # in it: the swarm spawner's GPU kind, on a swarm only

T = TypeVar("T")
_shared: dict[tuple[Any, ...], Any] = {}


def shared(key: tuple[Any, ...], make: Callable[[], T]) -> T:
    """The one object of this process for `key`, made on first use.

    Builds, the policy and GPU allocation keep state (slots, a cached file, a
    lock) that every spawner of the hub, or every handler of the service, must
    share rather than each make its own.
    """
    if key not in _shared:
        _shared[key] = make()
    return _shared[key]


class DS01Settings(LoggingConfigurable):
    """The ds01 settings shared by the hub and the service (config: ``c.DS01Spawner``)."""

    # ------------------------------------------------------------ projects

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

    # ------------------------------------------------------------ images

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
        or spawn much. Under the cgroupfs driver (cgroup v1) it also weighs all
        builds together against the host's own processes, the hub among them.
        0: Docker's default (builds weigh as much as servers).
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

    # ------------------------------------------------------------ lab policy

    policy_file = Unicode(
        "",
        help="""YAML file of per-user and per-group limits (see policy.yaml in the repo).

        Sections `defaults`, `groups` (JupyterHub groups; a user in several gets
        the first one listed), `users`, `retirement` and `images` (the image
        cleaner, a deleted project's workspace). Validated when the hub
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

    # ------------------------------------------------------------ the audit trail

    audit_handlers = List(
        Instance(logging.Handler),
        help="""More destinations for the hub's audit trail (logging handlers), e.g. a
        `logging.handlers.SysLogHandler` for the lab's log collector.

        Every event (server start/ready/stop, GPU grant/release, builds, refusals,
        ...) is always appended to a file per month under `state_dir`/audit
        (`2026-01.hub.jsonl`); these get each event too, as JSON. A failing
        handler is logged and never holds up a spawn. The hub's own: the ds01
        service writes only its own file (`2026-01.service.jsonl`).
        """,
    ).tag(config=True)

    # DockerSpawner defaults that fit the DS01 model.

    # ------------------------------------------------------------ what they make

    audit_process = "hub"  # the audit file's name part; "service" from from_environ
    # the generic resource kind of the swarm's GPUs: "" on one engine; DS01SwarmSpawner's
    # setting, handed to the service with the others (configure.shared_settings)
    swarm_gpu_kind = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> DS01Settings:
        """The hub's settings as configure(c) handed them to the service.

        What the admin left unset has its default here, as in the hub.
        """
        given = json.loads(environ.get(SETTINGS_ENV) or "{}")
        values = {name: given[name] for name in SHARED_SETTINGS if name in given}
        settings = cls(config=Config({"DS01Settings": values}))
        settings.audit_process = "service"
        settings.swarm_gpu_kind = str(given.get(SWARM_GPU_KIND, "") or "")
        return settings

    @property
    def build_settings(self) -> BuildSettings:
        """How every project image is built, by the hub and by the image page alike."""
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
    def builder(self) -> ImageBuilder:
        """This process's build pool (its slots are shared by every build it runs)."""
        key = ("builder", self.state_dir, self.max_concurrent_builds, self.max_builds_per_user)
        timeout = self.build_timeout
        return shared(
            key,
            lambda: ImageBuilder(
                self.max_concurrent_builds,
                lambda: docker_client(timeout),
                BuildRecords(self.state_dir),
                max_per_user=self.max_builds_per_user,
                audit=self.audit,
            ),
        )

    @property
    def audit(self) -> AuditLog:
        """This process's audit trail (audit.py): one writer of its file per process."""
        key = ("audit", self.state_dir, self.audit_process)
        return shared(
            key, lambda: AuditLog(self.state_dir, self.audit_process, self.audit_handlers)
        )

    @property
    def policy_store(self) -> PolicyStore:
        """The lab policy in force (re-read when its file changes)."""
        key = ("policy", self.policy_file, json.dumps(self.policy, sort_keys=True, default=str))
        return shared(key, lambda: PolicyStore(self.policy_file, self.policy, self.types()))

    def limits_for(self, user: str, groups: Iterable[str]) -> Limits:
        """A user's limits under the policy in force now (PolicyError if it cannot be read)."""
        return self.policy_store.current().resolve(user, list(groups))

    @property
    def gpu_allocator(self) -> GpuAllocator:
        """This process's GPU allocator: one lock and one pending list for every spawn.

        On a swarm (`swarm_gpu_kind` set: `ds01-swarm`) over the swarm's GPUs and
        ledger, read from a manager (swarmallocator.SwarmGpus): the swarm assigns which.
        """
        if self.swarm_gpu_kind:
            key = ("swarm-gpus", self.swarm_gpu_kind, self.state_dir)
            seal = LedgerSeal(self.state_dir)
            return shared(key, lambda: swarm_gpus(seal, self.swarm_gpu_kind))
        key = ("gpus", self.simulated_gpus, self.state_dir)
        return shared(key, lambda: gpu_allocator(self.simulated_gpus, self.state_dir))

    @property
    def gpu_queue(self) -> GpuQueue:
        """This hub's GPU queue, in front of its allocator (gpuqueue.py)."""
        key = ("gpu-queue", self.simulated_gpus, self.state_dir)
        return shared(key, lambda: GpuQueue(self.gpu_allocator, self.state_dir))

    def gpu_policy(self, limits: Limits) -> GpuPolicy:
        """The GPU rules for a user with `limits`: the policy's, and the hub's settings."""
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
    def gpu_holds(self) -> GpuHolds:
        """GPUs kept for stopped projects' quick restarts (`gpu_hold_after_stop`)."""
        return GpuHolds(self.state_dir)

    @property
    def store(self) -> ProjectStore:
        return ProjectStore(self.state_dir)

    def workspace_for(self, owner: str, project: str) -> Path:
        """The host path of `owner`'s workspace of `project` (a WorkspaceError if the
        template puts it outside the root)."""
        return workspace_path(
            self.workspace_template,
            root=self.workspace_root,
            user=self.store.slug(owner),
            project=project,
        )

    def types(self) -> dict[str, ProjectType]:
        return discover_types(self.project_types_dir, self.project_types or None)


HUB_ONLY = frozenset({"audit_handlers"})  # objects: they cannot reach the service as JSON
SHARED_SETTINGS: tuple[str, ...] = tuple(
    sorted(set(DS01Settings.class_trait_names(config=True)) - HUB_ONLY)
)
