"""What a project is doing now, decided in one place: `project_status`.

The hub's home page and the service's image list both show it. The facts
come from four owners, each read once by the caller: the project record, the
hub's view of the user's servers (`hub_servers`), the image and its builds
(`ImageFacts`, and whether a build runs), the GPU ledger (`Holder`) and the
GPU queue (`Waiter`). The rules between them live here only:

- the hub decides whether a server runs, starts or stops; a server it lists
  as pending is *waiting* while the queue holds its spawn, *building* while
  its image builds, else *starting*;
- with no server, a project whose image builds (a rebuild from the image
  page) is *building*, else *stopped*; a wait the hub's restart interrupted
  is still told, with the time to start again by;
- the GPUs are the ledger's, whatever the server's options asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .gpuqueue import ordinal
from .ledger import Holder
from .projects import Project

RUNNING = "running"
STARTING = "starting"
BUILDING = "building"
WAITING = "waiting"
STOPPING = "stopping"
STOPPED = "stopped"
BUSY = frozenset({STARTING, BUILDING, WAITING, STOPPING})  # changes by itself: poll


class QueueEntry(Protocol):
    """What `project_status` reads of a `gpuqueue.Waiter`."""

    state: str  # "waiting" | "interrupted"
    position: int
    deadline: float
    message: str


@dataclass(frozen=True)
class HubServer:
    """One of the user's servers as the hub lists it (``GET /users/{name}``)."""

    name: str  # "" for the default server
    project: str
    ready: bool = False
    pending: str | None = None  # "spawn", "stop", ...
    url: str = ""
    last_activity: str | None = None


def hub_servers(model: Mapping[str, Any]) -> dict[str, HubServer]:
    """project -> the server that runs it, from the hub's model of one user.

    A server runs the project its stored options name (the default server's
    say which project it opened), else the project of its own name; a server
    that names neither (a default server started before ds01) runs none. The
    spawner lets one project run in one server only; should two claim it, its
    named server wins.
    """
    found: dict[str, HubServer] = {}
    for name, server in (model.get("servers") or {}).items():
        if not isinstance(server, Mapping):
            continue
        options = server.get("user_options") or {}
        project = options.get("project") if isinstance(options, Mapping) else None
        project = project if isinstance(project, str) and project else name
        if not project or (project in found and found[project].name == project):
            continue
        found[project] = HubServer(
            name=name,
            project=project,
            ready=bool(server.get("ready")),
            pending=server.get("pending") or None,
            url=server.get("url") or "",
            last_activity=server.get("last_activity"),
        )
    return found


@dataclass(frozen=True)
class ImageFacts:
    """A project's image as the engine and the state files know it."""

    built_at: float | None = None  # epoch seconds of :latest; None: not built
    outdated: bool = False  # the workspace Dockerfile changed since :latest was built
    lost_packages: tuple[str, ...] = ()  # pip-installed in the last container, gone at retire
    lost_at: str = ""  # when that container was retired (UTC, ISO)
    last_build: str = ""  # "running", "failed" or "interrupted"; "" once one succeeded
    cleaned: bool = False  # the image cleaner removed :latest; the next start rebuilds it


@dataclass(frozen=True)
class ProjectStatus:
    """One project as the pages show it, and what may be done with it now."""

    project: str
    type: str
    state: str  # RUNNING, STARTING, BUILDING, WAITING, STOPPING or STOPPED
    label: str  # the state in words: "waiting (2nd)"
    message: str = ""  # the queue's word on a wait, or on a wait that ended
    server: str | None = None  # the hub server that runs it ("" the default one)
    url: str = ""  # where it opens, once running
    gpus: tuple[str, ...] = ()  # UUIDs the ledger gives it
    gpu_equivalents: float = 0.0
    position: int = 0  # in the GPU queue, while waiting
    last_used: float = 0.0
    last_activity: str | None = None
    image: ImageFacts | None = None
    notices: tuple[str, ...] = field(default_factory=tuple)  # coming or recent retirements

    @property
    def can_open(self) -> bool:
        return self.state == RUNNING and bool(self.url)

    @property
    def can_start(self) -> bool:
        """No server runs it (a start during a rebuild waits for the new image)."""
        return self.server is None

    @property
    def can_stop(self) -> bool:
        return self.server is not None and self.state != STOPPING

    @property
    def busy(self) -> bool:
        return self.state in BUSY

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = list(self.gpus)
        data["notices"] = list(self.notices)
        if self.image is not None:
            data["image"]["lost_packages"] = list(self.image.lost_packages)
        data.update(
            can_open=self.can_open, can_start=self.can_start, can_stop=self.can_stop, busy=self.busy
        )
        return data


def project_status(
    project: Project,
    server: HubServer | None,
    *,
    building: bool = False,
    holders: Iterable[Holder] = (),
    waiter: QueueEntry | None = None,
    image: ImageFacts | None = None,
    notices: Sequence[str] = (),
    now: float = 0.0,
) -> ProjectStatus:
    """The status of `project` from the facts (see the module's docstring).

    `holders` may be the whole ledger: only the owner's entries for this
    project count. `waiter` is the project's queue entry, if any; an
    interrupted one whose `deadline` is past `now` is over and not told.
    """
    held = [h for h in holders if h.user == project.owner and h.project == project.name]
    waiting = waiter is not None and waiter.state == "waiting"
    interrupted = waiter is not None and waiter.state == "interrupted" and waiter.deadline > now
    message = ""
    position = 0
    if server is not None and server.pending == "stop":
        state, label = STOPPING, "stopping"
    elif server is not None and server.ready and not server.pending:
        state, label = RUNNING, "running"
    elif server is not None and waiting:
        assert waiter is not None
        state, position = WAITING, waiter.position
        place = f", {ordinal(position)} in line" if position > 0 else ""
        label = f"waiting ({ordinal(position)})" if position > 0 else "waiting"
        message = waiter.message or f"Waiting for a GPU{place}"
    elif building:
        state, label = BUILDING, "building"
    elif server is not None:
        state, label = STARTING, "starting"
    else:
        state, label = STOPPED, "stopped"
        if interrupted:
            assert waiter is not None
            message = waiter.message
    return ProjectStatus(
        project=project.name,
        type=project.type,
        state=state,
        label=label,
        message=message,
        server=server.name if server is not None else None,
        url=server.url if server is not None and state == RUNNING else "",
        gpus=tuple(h.uuid for h in held),
        gpu_equivalents=round(sum(h.fraction for h in held), 4),
        position=position,
        last_used=project.last_used,
        last_activity=server.last_activity if server is not None else None,
        image=image,
        notices=tuple(notices),
    )
