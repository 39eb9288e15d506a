"""Project images: their names, and builds that stream their progress.

A project's image ``ds01-<user>/<project>:latest`` is built from the
Dockerfile in its workspace. Builds run on their own thread pool with a limit
on concurrent builds, never on DockerSpawner's single shared executor, so one
user's long build cannot stall anybody's spawn, poll or stop. Each build
publishes typed events (``phase``, ``message``, ``progress``) that any number
of readers can follow, like BinderHub's build events.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from . import labels
from .statefiles import write_json

_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
MAX_LOG_LINES = 5000


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
    """What to build: the image reference, its Dockerfile, labels and build args."""

    image: str
    dockerfile: str
    labels: dict[str, str]
    buildargs: dict[str, str] = field(default_factory=dict)
    network_mode: str | None = None
    nocache: bool = False
    cpu_shares: int | None = None  # the build's RUN containers' CPU weight (Docker: 1024)


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


class Build:
    """A running or finished build whose events can be followed from the event loop."""

    def __init__(self, spec: BuildSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.events: list[BuildEvent] = []
        self.image_id: str | None = None
        self.error: BuildError | None = None
        self.done = asyncio.Event()
        self._loop = loop
        self._changed = asyncio.Event()
        self.error_pending: BuildError | None = None

    # -- called from the build thread
    def publish(self, event: BuildEvent) -> None:
        self._loop.call_soon_threadsafe(self._append, event)

    def finish(self, image_id: str | None, error: BuildError | None) -> None:
        self.error_pending = error  # readable from the build thread at once
        self._loop.call_soon_threadsafe(self._finish, image_id, error)

    # -- on the event loop
    def _append(self, event: BuildEvent) -> None:
        self.events.append(event)
        if len(self.events) > MAX_LOG_LINES:
            del self.events[: len(self.events) - MAX_LOG_LINES]
        self._changed.set()
        self._changed = asyncio.Event()

    def _finish(self, image_id: str | None, error: BuildError | None) -> None:
        self.image_id, self.error = image_id, error
        self.done.set()
        self._changed.set()

    async def follow(self) -> AsyncIterator[BuildEvent]:
        """Every event from the start, then new ones as they come, until the build ends."""
        seen = 0
        while True:
            while seen < len(self.events):
                yield self.events[seen]
                seen += 1
            if self.done.is_set():
                return
            await self._changed.wait()

    async def wait(self) -> str:
        """The new image's id; raises BuildError if the build failed."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.image_id is not None
        return self.image_id

    @property
    def log_lines(self) -> list[str]:
        return [e.message for e in self.events if e.phase in ("step", "log")]


ClientFactory = Callable[[], docker.APIClient]


class BuildRecords:
    """The last build of each image, on disk, shared by every process that builds.

    Each image has a lock file held for the whole build, so two processes (the
    hub building on first spawn, the image page rebuilding) never build the same
    image at once, and a record still saying "running" whose lock nobody holds
    was interrupted (its process died); a build that never finished never
    tagged anything, so the previous image is intact.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "builds"

    def _path(self, image: str, suffix: str) -> Path:
        return self.root / (image.replace("/", "__").replace(":", "--") + suffix)

    @contextlib.contextmanager
    def hold(self, image: str) -> Iterator[bool]:
        """Hold `image`'s build lock for the block; yields False if someone else has it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self._path(image, ".lock"), "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, image: str, **fields: object) -> None:
        record = {**(self.read(image) or {}), "image": image, **fields}
        if fields.get("status") == "running":
            for stale in ("finished", "error", "log_tail"):
                record.pop(stale, None)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(image, ".json")
        write_json(path, record, indent=1)

    def read(self, image: str) -> dict | None:
        """The last build's record; status "interrupted" if it says running but nobody is."""
        try:
            record = json.loads(self._path(image, ".json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if record.get("status") == "running":
            with self.hold(image) as free:
                if free:
                    record["status"] = "interrupted"
        return record


def default_client(timeout: int) -> docker.APIClient:
    return docker.APIClient(version="auto", timeout=timeout, **docker.utils.kwargs_from_env())


class ImageBuilder:
    """Runs builds on a private thread pool: at most `max_concurrent` at once, one per image.

    Asking for an image that is already building returns the running build,
    so a second spawn (or page) follows the same log instead of racing it.
    """

    def __init__(
        self,
        max_concurrent: int,
        client_factory: ClientFactory,
        records: BuildRecords | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="ds01-build")
        self._client_factory = client_factory
        self._running: dict[str, Build] = {}
        self.records = records

    def running(self) -> list[Build]:
        return list(self._running.values())

    def build(self, spec: BuildSpec) -> Build:
        existing = self._running.get(spec.image)
        if existing is not None and not existing.done.is_set():
            return existing
        busy = sum(not b.done.is_set() for b in self._running.values())
        build = Build(spec, asyncio.get_running_loop())
        self._running[spec.image] = build
        if busy >= self.max_concurrent:
            build._append(
                BuildEvent("waiting", f"Waiting for a build slot ({busy} builds ahead)", 0)
            )
        future = asyncio.wrap_future(self._executor.submit(self._run, build))
        future.add_done_callback(lambda _: self._forget(build))
        return build

    def _forget(self, build: Build) -> None:
        if self._running.get(build.spec.image) is build:
            del self._running[build.spec.image]

    def _run(self, build: Build) -> None:
        if self.records is None:
            self._run_unrecorded(build)
            return
        with self.records.hold(build.spec.image) as held:
            if not held:
                err = BuildError(
                    f"{build.spec.image} is already being built elsewhere (the hub or the "
                    "image page); wait for that build to finish",
                    [],
                )
                build.publish(BuildEvent("failed", str(err), 100))
                build.finish(None, err)
                return
            self.records.write(build.spec.image, status="running", started=labels.now_iso())
            self._run_unrecorded(build)
            self.records.write(
                build.spec.image,
                status="failed" if build.error_pending else "succeeded",
                finished=labels.now_iso(),
                error=str(build.error_pending or ""),
                log_tail=build.log_lines[-40:],
            )

    def _run_unrecorded(self, build: Build) -> None:
        try:
            image_id = self._build(build)
        except BuildError as e:
            build.publish(BuildEvent("failed", str(e), 100))
            build.finish(None, e)
        except Exception as e:  # engine gone, socket timeout, ...
            err = BuildError(f"image build could not run: {e}", build.log_lines[-20:])
            build.publish(BuildEvent("failed", str(err), 100))
            build.finish(None, err)
        else:
            build.publish(BuildEvent("built", f"Built {build.spec.image}", 100))
            build.finish(image_id, None)

    def _build(self, build: Build) -> str:
        spec = build.spec
        client = self._client_factory()
        try:
            try:
                previous = client.inspect_image(spec.image)["Id"]
            except docker.errors.ImageNotFound:
                previous = None
            build.publish(BuildEvent("building", f"Building {spec.image}", 0))
            repo = spec.image.rpartition(":")[0]
            reader = BuildStreamReader()
            stream = client.build(
                fileobj=context_tar(spec.dockerfile),
                custom_context=True,
                tag=spec.image,
                # no per-build label (a timestamp): each label is a build step, and
                # one that changes every time would rerun them all; Docker records
                # the creation time anyway
                labels=spec.labels,
                buildargs=spec.buildargs,
                network_mode=spec.network_mode,
                nocache=spec.nocache,
                container_limits={"cpushares": spec.cpu_shares} if spec.cpu_shares else None,
                pull=False,
                rm=True,
                forcerm=True,
                decode=True,
            )
            for chunk in stream:
                for event in reader.feed(chunk):
                    build.publish(event)
            reader.raise_for_error(spec.buildargs)
            image_id = reader.image_id
            if image_id is None:
                image_id = client.inspect_image(spec.image)["Id"]
            if previous and previous != image_id:
                # keep the image this build replaced, for a rollback
                client.tag(previous, repo, "previous")
            return image_id
        finally:
            client.close()
