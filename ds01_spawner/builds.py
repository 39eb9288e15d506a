"""Running builds: a project image's build, its streamed progress, its record on disk.

Builds run on their own thread pool with a limit on concurrent builds, never
on DockerSpawner's single shared executor, so one user's long build cannot
stall anybody's spawn, poll or stop. Each build publishes typed events
(``phase``, ``message``, ``progress``) that any number of readers can follow,
like BinderHub's build events. What to build, and how to read what the engine
says of a build, is `images`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import docker.errors

from . import labels
from .audit import AuditLog
from .buildrules import BuildRuleError, check_dockerfile, render_for_build
from .events import EventLog
from .images import (
    BUILD_NETWORK,
    BuildError,
    BuildEvent,
    BuildSpec,
    BuildStreamReader,
    context_tar,
    dockerfile_digest,
)
from .statefiles import write_json

MAX_LOG_LINES = 5000


class Build:
    """A running or finished build whose events can be followed from the event loop."""

    def __init__(self, spec: BuildSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.events: EventLog[BuildEvent] = EventLog(MAX_LOG_LINES)
        self.image_id: str | None = None
        self.error: BuildError | None = None
        self.done = asyncio.Event()
        self.started = asyncio.Event()  # it has a build slot
        self._loop = loop
        self.error_pending: BuildError | None = None

    # -- called from the build thread
    def publish(self, event: BuildEvent) -> None:
        self._loop.call_soon_threadsafe(self.events.append, event)

    def finish(self, image_id: str | None, error: BuildError | None) -> None:
        self.error_pending = error  # readable from the build thread at once
        self._loop.call_soon_threadsafe(self._finish, image_id, error)

    # -- on the event loop
    def _finish(self, image_id: str | None, error: BuildError | None) -> None:
        self.image_id, self.error = image_id, error
        self.done.set()
        self.events.close()

    async def follow(self, after: int = -1) -> AsyncIterator[BuildEvent]:
        """Every kept event from the start (or after sequence `after`), then new ones."""
        async for _, event in self.events.follow(after):
            yield event

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


class ImageBuilder:
    """Runs builds on a private thread pool: at most `max_concurrent` at once, one per image,
    and at most `max_per_user` of one user's builds at a time.

    Asking for an image that is already building returns the running build,
    so a second spawn (or page) follows the same log instead of racing it.
    Builds wait in arrival order; a waiting build whose owner already has
    `max_per_user` running lets later builds of other users go first, so one
    user's builds never hold every slot.
    """

    def __init__(
        self,
        max_concurrent: int,
        client_factory: ClientFactory,
        records: BuildRecords | None = None,
        max_per_user: int = 1,
        audit: AuditLog | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_per_user = max_per_user
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="ds01-build")
        self._client_factory = client_factory
        self._running: dict[str, Build] = {}
        self._waiting: list[Build] = []
        self.records = records
        self.audit = audit  # each build's start and end go to the audit trail
        self._networks_ready: set[str] = set()

    def running(self) -> list[Build]:
        return list(self._running.values())

    def build(self, spec: BuildSpec) -> Build:
        existing = self._running.get(spec.image)
        if existing is not None and not existing.done.is_set():
            return existing
        build = Build(spec, asyncio.get_running_loop())
        self._running[spec.image] = build
        self._waiting.append(build)
        self._dispatch()
        if not build.started.is_set():
            build.events.append(BuildEvent("waiting", self._why_waiting(build), 0))
        return build

    def _busy(self) -> list[Build]:
        return [b for b in self._running.values() if b.started.is_set() and not b.done.is_set()]

    def _may_start(self, build: Build, busy: list[Build]) -> bool:
        owner = build.spec.owner
        mine = sum(1 for b in busy if owner and b.spec.owner == owner)
        return len(busy) < self.max_concurrent and mine < self.max_per_user

    def _why_waiting(self, build: Build) -> str:
        busy = self._busy()
        owner = build.spec.owner
        mine = [b.spec.image for b in busy if owner and b.spec.owner == owner]
        if len(mine) >= self.max_per_user:
            return (
                f"Waiting for your build of {', '.join(mine)} to finish "
                f"(one build per user at a time)"
            )
        ahead = self._waiting.index(build) if build in self._waiting else 0
        return f"Waiting for a build slot ({len(busy)} running, {ahead} waiting ahead)"

    def _dispatch(self) -> None:
        """Start waiting builds, first come first served, as slots and owners allow."""
        for build in list(self._waiting):
            busy = self._busy()
            if len(busy) >= self.max_concurrent:
                return
            if not self._may_start(build, busy):
                continue
            self._waiting.remove(build)
            build.started.set()
            future = asyncio.wrap_future(self._executor.submit(self._run, build))
            future.add_done_callback(lambda _, b=build: self._forget(b))

    def _forget(self, build: Build) -> None:
        if self._running.get(build.spec.image) is build:
            del self._running[build.spec.image]
        self._dispatch()

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
        began = time.monotonic()
        self._audit(build, "start")
        try:
            image_id = self._build(build)
        except BuildError as e:
            self._audit_end(build, began, e)
            build.publish(BuildEvent("failed", str(e), 100))
            build.finish(None, e)
        except Exception as e:  # engine gone, socket timeout, ...
            err = BuildError(f"image build could not run: {e}", build.log_lines[-20:])
            self._audit_end(build, began, err)
            build.publish(BuildEvent("failed", str(err), 100))
            build.finish(None, err)
        except BaseException:
            self._audit_end(build, began, None, result="interrupted")
            raise
        else:
            self._audit_end(build, began, None)
            build.publish(BuildEvent("built", f"Built {build.spec.image}", 100))
            build.finish(image_id, None)

    def _audit_end(
        self, build: Build, began: float, error: BuildError | None, result: str = ""
    ) -> None:
        """The build's end in the audit trail, before anyone waiting on it hears of it."""
        result = result or ("failed" if error else "succeeded")
        seconds = round(time.monotonic() - began, 3)
        error_text = str(error) if error else None
        self._audit(build, "end", result=result, seconds=seconds, error=error_text)

    def _audit(self, build: Build, action: str, **data: object) -> None:
        if self.audit is not None:
            spec = build.spec
            project = spec.labels.get(labels.PROJECT)
            self.audit.emit(
                "build",
                action=action,
                image=spec.image,
                user=spec.owner or None,
                project=project,
                **data,
            )

    def _build(self, build: Build) -> str:
        spec = build.spec
        try:
            found = check_dockerfile(
                spec.dockerfile,
                buildargs=spec.buildargs,
                allowed_images=spec.allowed_images,
                own_prefix=spec.own_prefix,
            )
        except BuildRuleError as e:
            raise BuildError(f"the Dockerfile was not built: {e}", []) from None
        client = self._client_factory()
        watchdog = _TimeLimit(spec.time_limit)
        try:
            try:
                previous = client.inspect_image(spec.image)["Id"]
            except docker.errors.ImageNotFound:
                previous = None
            self._ensure_network(client, spec.network_mode)
            build.publish(BuildEvent("building", f"Building {spec.image}", 0))
            repo = spec.image.rpartition(":")[0]
            reader = BuildStreamReader()
            limits: dict[str, int] = {}
            if spec.cpu_shares:
                limits["cpushares"] = spec.cpu_shares
            if spec.memory:
                limits["memory"] = limits["memswap"] = spec.memory  # no swap on top
            params: dict[str, object] = {
                "t": spec.image,
                # no per-build label (a timestamp): each label is a build step, and
                # one that changes every time would rerun them all; Docker records
                # the creation time anyway
                "labels": json.dumps(spec.labels),
                "buildargs": json.dumps(spec.buildargs),
                "nocache": spec.nocache,
                "pull": False,
                "rm": True,
                "forcerm": True,
                **limits,
            }
            if spec.network_mode:
                params["networkmode"] = spec.network_mode
            info = client.info()
            parent = build_cgroup(spec.owner, spec.pids_limit, info, spec.cpu_shares)
            if parent:
                params["cgroupparent"] = parent
            # the engine's build endpoint itself: docker-py's build() cannot set a
            # cgroup parent, and the watchdog needs the response to end a build
            response = client._post(
                client._url("/build"),
                # only an engine whose default runtime is nvidia hands builds GPUs;
                # elsewhere the Dockerfile is built as written (its step numbers too)
                data=context_tar(
                    render_for_build(spec.dockerfile, found)
                    if info.get("DefaultRuntime") == "nvidia"
                    else spec.dockerfile
                ),
                params=params,
                headers={"Content-Type": "application/tar"},
                stream=True,
                timeout=client.timeout,
            )
            client._raise_for_status(response)
            watchdog.start(response)
            try:
                for chunk in client._stream_helper(response, decode=True):
                    for event in reader.feed(chunk):
                        build.publish(event)
            except Exception:
                if not watchdog.fired:
                    raise
            if watchdog.fired:
                raise BuildError(
                    f"image build stopped: it ran longer than the lab's limit of "
                    f"{spec.time_limit:g} s (build_time_limit); nothing was tagged",
                    reader.tail,
                )
            reader.raise_for_error(spec.buildargs)
            image_id = reader.image_id
            if image_id is None:
                image_id = client.inspect_image(spec.image)["Id"]
            if previous and previous != image_id:
                # keep the image this build replaced, for a rollback
                client.tag(previous, repo, "previous")
            return image_id
        finally:
            watchdog.cancel()
            client.close()

    def _ensure_network(self, client: docker.APIClient, name: str | None) -> None:
        """The builds' own network, made on first use: a bridge with no traffic between
        its containers, apart from the bridge every user container shares."""
        if name != BUILD_NETWORK or name in self._networks_ready:
            return
        if not client.networks(names=[name]):
            with contextlib.suppress(docker.errors.APIError):  # made meanwhile
                client.create_network(
                    name,
                    driver="bridge",
                    options={"com.docker.network.bridge.enable_icc": "false"},
                    labels={labels.MANAGED: "true", labels.ROLE: "build-network"},
                )
        self._networks_ready.add(name)


class _TimeLimit:
    """Ends a build at its time limit: the engine cancels a build whose client goes away.

    A build that prints nothing for hours would never reach a per-line check,
    so a timer thread shuts the build's socket.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.fired = False
        self._response = None
        self._timer: threading.Timer | None = None

    def start(self, response) -> None:
        self._response = response
        if self.seconds:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(Exception):
            self._response.raw.connection.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._response.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


_cgroup_warned = False


def build_cgroup(
    owner: str, pids_limit: int | None, info: dict, cpu_shares: int | None = None
) -> str | None:
    """The cgroup parent of `owner`'s build containers, with `pids_limit` for them together.

    The classic builder has no pids limit of its own. Under the cgroupfs driver a
    build's RUN containers are made inside the parent, so a limit set on the
    parent holds for all of them. `cpu_shares` also weighs the parent of every
    user's builds (``/ds01-builds``) against the host's own processes, the hub
    among them: a RUN container's own weight counts only among containers.
    Elsewhere (systemd driver, no write access to the cgroup tree) builds run
    without these and the hub says so once.
    """
    global _cgroup_warned
    if not pids_limit or not owner:
        return None
    slug = re.sub(r"[^a-z0-9-]", "-", owner.lower())[:40] + "-" + dockerfile_digest(owner)[:8]
    parent = f"/ds01-builds/{slug}"
    try:
        if info.get("CgroupDriver") != "cgroupfs":
            raise OSError(f"the engine's cgroup driver is {info.get('CgroupDriver')}")
        version = info.get("CgroupVersion", "1")
        base = Path("/sys/fs/cgroup") / ("pids" if version == "1" else "")
        path = base / parent.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        (path / "pids.max").write_text(str(pids_limit))
        if cpu_shares and version == "1":
            builds = Path("/sys/fs/cgroup/cpu/ds01-builds")
            builds.mkdir(exist_ok=True)
            (builds / "cpu.shares").write_text(str(cpu_shares))
    except (OSError, docker.errors.DockerException) as e:
        if not _cgroup_warned:
            _cgroup_warned = True
            logging.getLogger("ds01").warning(
                "Builds run without a process limit (build_pids_limit): %s", e
            )
        return None
    return parent
