"""Project images: their names, what a build of one is, and what a build says.

A project's image ``ds01-<user>/<project>:latest`` is built from the
Dockerfile in its workspace. This module is the plain part of that: the
image's names, the build spec (labels, build args, limits) and its one-file
context, the typed events a build publishes, and `BuildStreamReader`, which
turns docker's build stream into those events. Running builds is `builds`.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass, field

from . import labels

_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
# builds' own network: not the bridge every user container shares (see build_network)
BUILD_NETWORK = "ds01-build"


def image_repository(user_slug: str, project: str) -> str:
    return f"ds01-{user_slug}/{project}"


def image_ref(user_slug: str, project: str, tag: str = "latest") -> str:
    return f"{image_repository(user_slug, project)}:{tag}"


def dockerfile_digest(dockerfile: str) -> str:
    return hashlib.sha256(dockerfile.encode("utf-8")).hexdigest()


def context_tar(dockerfile: str) -> io.BytesIO:
    """A build context holding only the Dockerfile.

    The workspace itself is never sent: it can hold datasets of any size and
    links the hub must not follow.
    """
    data = dockerfile.encode("utf-8")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


@dataclass(frozen=True)
class BuildEvent:
    """One thing that happened in a build.

    phase: ``waiting`` | ``building`` (started) | ``step`` (a ``Step N/M`` line) |
    ``log`` (any other build output) | ``built`` | ``failed``; progress: 0-100.
    """

    phase: str
    message: str
    progress: int | None = None


@dataclass(frozen=True)
class BuildSpec:
    """What to build: the image reference, its Dockerfile, labels, build args and limits."""

    image: str
    dockerfile: str
    labels: dict[str, str]
    buildargs: dict[str, str] = field(default_factory=dict)
    network_mode: str | None = None
    nocache: bool = False
    cpu_shares: int | None = None  # the build's RUN containers' CPU weight (Docker: 1024)
    owner: str = ""  # the hub user the build is for: one running build per user
    memory: int | None = None  # bytes per RUN container, no swap on top
    pids_limit: int | None = None  # processes of all the owner's RUN containers together
    time_limit: float | None = None  # seconds the whole build may take
    # FROM / COPY --from may name only these (patterns) and the owner's own images
    allowed_images: tuple[str, ...] = ()
    own_prefix: str = ""


@dataclass(frozen=True)
class BuildSettings:
    """The admin's build settings (DS01Spawner's traits), shared by the hub and the service."""

    base_image: str = "ds01/singleuser:latest"
    build_args: dict[str, str] = field(default_factory=dict)
    network_mode: str | None = BUILD_NETWORK
    cpu_shares: int | None = 256
    memory: int | None = None
    pids_limit: int | None = None
    time_limit: float | None = None
    allowed_images: tuple[str, ...] = ("ds01/*",)


def project_build_spec(
    settings: BuildSettings,
    *,
    owner: str,
    slug: str,
    project: str,
    project_type: str,
    dockerfile: str,
    nocache: bool = False,
) -> BuildSpec:
    """The build of a project's image: the one spec the spawner and the image page use."""
    return BuildSpec(
        image=image_ref(slug, project),
        dockerfile=dockerfile,
        labels={
            **labels.project_labels(owner, project, project_type),
            labels.DOCKERFILE_SHA256: dockerfile_digest(dockerfile),
        },
        buildargs={**settings.build_args, "BASE_IMAGE": settings.base_image},
        network_mode=settings.network_mode,
        nocache=nocache,
        cpu_shares=settings.cpu_shares or None,
        owner=owner,
        memory=settings.memory,
        pids_limit=settings.pids_limit,
        time_limit=settings.time_limit,
        allowed_images=(settings.base_image, *settings.allowed_images),
        own_prefix=f"ds01-{slug}/",
    )


class BuildError(RuntimeError):
    """A build that failed; `log_tail` holds the lines that show why."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class BuildStreamReader:
    """Turns docker's build stream (``stream``/``error``/``aux`` dicts) into BuildEvents.

    Classic-builder ``Step N/M`` lines give the progress; the last lines are
    kept so a failure can show what went wrong.
    """

    def __init__(self, tail_lines: int = 20) -> None:
        self.image_id: str | None = None
        self.error: str | None = None
        self.step = ""
        self.instruction = ""
        self.tail: list[str] = []
        self._tail_lines = tail_lines
        self._progress = 0

    def feed(self, chunk: dict) -> list[BuildEvent]:
        events = []
        if "error" in chunk:
            self.error = str(chunk["error"]).strip()
        aux = chunk.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            self.image_id = str(aux["ID"])
        for line in str(chunk.get("stream", "")).splitlines():
            line = line.rstrip()
            if not line:
                continue
            self.tail = [*self.tail[-(self._tail_lines - 1) :], line]
            match = _STEP.match(line)
            if match:
                n, total = int(match.group(1)), int(match.group(2))
                self._progress = 100 * (n - 1) // total
                self.instruction = match.group(3)
                self.step = f"step {n}/{total} ({self.instruction[:80]})"
            events.append(BuildEvent("step" if match else "log", line, self._progress))
        return events

    def raise_for_error(self, buildargs: dict[str, str] | None = None) -> None:
        if self.error is None:
            return
        where = f" at {self.step}" if self.step else ""
        words = self.instruction.split()
        if len(words) > 1 and words[0].upper() == "FROM":
            # no registry here: a FROM image that is not local fails as a pull
            base = _expand(words[1], buildargs or {})
            raise BuildError(
                f"image build failed{where}: the base image {base} is not on this machine "
                f"and cannot be pulled ({self.error}). The lab's base images are built by an "
                "admin (images/build); check the FROM line of the Dockerfile",
                self.tail,
            )
        raise BuildError(f"image build failed{where}: {self.error}", self.tail)


def _expand(word: str, args: dict[str, str]) -> str:
    """`${BASE_IMAGE}` / `$BASE_IMAGE` in a FROM line, with the build's args."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), word
    )
