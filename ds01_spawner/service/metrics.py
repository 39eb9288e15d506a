"""Prometheus metrics at ``/services/ds01/metrics``, for a hub token that holds ``read:metrics``.

Two kinds of numbers, both worked out when Prometheus scrapes:

- Counters (builds and their durations, retirements, refusals, GPU-seconds)
  come from the audit trail (`audit`), which every process appends to: the
  hub (refusals, its builds, GPU grants and releases) and the service (its
  builds, retirements). Counted from the files, they stay right across hub
  and service restarts and add up what every process did. GPU holds are
  paired by the usage page's rules (`usage.holds_from_events`), so its
  GPU-hours and these GPU-seconds agree; an open hold counts up to the scrape.
- Gauges (who holds which GPU; its memory and utilization from NVML; the disk
  ds01's images take) are read from the ledger, NVML and the engine.

There is no GPU queue (a start that finds no free GPU is refused, and counted
in ``ds01_refusals_total``), so there is no queue length to report.

What a scrape costs: the trail is followed, not re-read: a stat per trail
file, then only the lines appended since the previous scrape (measured: about
1 ms with nothing new, 0.6 s for a first read of 50,000 events). The trail's
gpu events stay in memory (two per GPU session, a few fields each), by
server: holds pair within a server, so only a server with new events is
re-paired, and the open holds' time is added to the cached sums. The GPUs are
one NVML read and one container list, as for the GPU page; the images one
image list at most every 30 s, and each image's history once (an image id
names the same layers for ever).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import accumulate
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from jupyterhub.services.auth import check_scopes
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from tornado import web

from .. import labels
from ..audit import parse_line
from ..engine import docker_client
from ..gpuqueue import QueueFile
from ..settings import DS01Settings
from ..usage import holds_from_events
from .base import BaseHandler
from .gpu_page import gpu_view

log = logging.getLogger(__name__)

SCOPE = "read:metrics"  # as the hub's own /hub/metrics
BUILD_RESULTS = ("succeeded", "failed", "interrupted")
BUILD_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, math.inf)
GPU_STATES = ("allocated", "kept", "free")

# ---------------------------------------------------------------- the audit trail


@dataclass(frozen=True)
class TrailCounts:
    """What the trail counts at one scrape (a copy: a concurrent scrape may move on)."""

    builds: Mapping[str, int]  # result -> ended builds
    build_buckets: Mapping[str, tuple[int, ...]]  # result -> builds per BUILD_BUCKETS bucket
    build_seconds: Mapping[str, float]  # result -> seconds, summed
    retirements: Mapping[str, int]  # reason -> servers retired by policy
    refusals: Mapping[str, int]  # reason -> requests refused
    gpu_seconds: Mapping[tuple[str, str], float]  # (user, group) -> GPU-seconds


@dataclass
class TrailTotals:
    """The counters, grown one event at a time (in any order). Gpu events are kept per
    server for `GpuTime`: their pairing needs all of a server's, and only its."""

    builds: Counter[str] = field(default_factory=Counter)
    build_buckets: dict[str, list[int]] = field(default_factory=dict)
    build_seconds: Counter[str] = field(default_factory=Counter)
    retirements: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    gpu_events: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    gpu_changed: set[tuple[str, str]] = field(default_factory=set)  # servers with new events

    def add(self, event: Mapping[str, Any]) -> None:
        kind, action = event.get("kind"), event.get("action")
        if kind == "build" and action == "end":
            result = str(event.get("result") or "unknown")
            self.builds[result] += 1
            seconds = event.get("seconds")
            if isinstance(seconds, (int, float)) and seconds >= 0:
                slot = next(i for i, le in enumerate(BUILD_BUCKETS) if seconds <= le)
                self.build_buckets.setdefault(result, [0] * len(BUILD_BUCKETS))[slot] += 1
                self.build_seconds[result] += seconds
        elif kind == "server" and action == "retire":
            self.retirements[str(event.get("reason") or "unknown")] += 1
        elif kind == "refusal":
            self.refusals[str(event.get("reason") or "unknown")] += 1
        elif kind == "gpu":
            server = (str(event.get("user", "")), str(event.get("server", "")))
            # the pairing (usage.holds_from_events) reads these; jupyter_events' own are dropped
            kept = {k: v for k, v in event.items() if not k.startswith("__")}
            self.gpu_events.setdefault(server, []).append(kept)
            self.gpu_changed.add(server)


@dataclass(frozen=True)
class GpuTime:
    """GPU-seconds per (user, group): the closed holds' sum, and the open holds, which count
    up to whatever `now` a scrape asks for."""

    closed: Mapping[tuple[str, str], float]
    open: tuple[tuple[str, str, float, float], ...]  # (user, group, start, equivalents)

    @classmethod
    def from_events(cls, events: Iterable[dict[str, Any]]) -> GpuTime:
        closed: Counter[tuple[str, str]] = Counter()
        still_open = []
        for hold in holds_from_events(events, datetime.now(timezone.utc)):
            if hold.open:
                still_open.append((hold.user, hold.group, hold.start.timestamp(), hold.equivalents))
            else:
                seconds = (hold.end - hold.start).total_seconds()
                closed[(hold.user, hold.group)] += hold.equivalents * seconds
        return cls(dict(closed), tuple(still_open))

    def at(self, now: float) -> dict[tuple[str, str], float]:
        seconds = Counter(self.closed)
        for user, group, start, equivalents in self.open:
            seconds[(user, group)] += equivalents * max(now - start, 0.0)
        return dict(seconds)


class TrailFollower:
    """The trail's counts, reading only the lines appended since the previous call.

    A line still being written waits for the next call. A file that shrank or
    was replaced (not something the trail does) makes it start over from every
    file. The GPU-seconds it reports never go down while it runs, so a clock
    step or a late release from another process cannot make a counter fall.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.directory = Path(state_dir) / "audit"
        self._lock = threading.Lock()
        self._start_over()

    def _start_over(self) -> None:
        self.totals = TrailTotals()
        self._read: dict[str, tuple[int, int]] = {}  # file name -> (inode, bytes read)
        self._gpu_time: dict[tuple[str, str], GpuTime] = {}  # per (user, server)
        self._gpu_reported: dict[tuple[str, str], float] = {}

    def update(self, now: float) -> TrailCounts:
        """Read what was appended, and the counts with open GPU holds counted up to `now`."""
        with self._lock:
            if not self._follow():
                self._start_over()
                self._follow()
            totals = self.totals
            for server in totals.gpu_changed:  # holds pair within a server: re-pair its own
                self._gpu_time[server] = GpuTime.from_events(totals.gpu_events[server])
            totals.gpu_changed.clear()
            gpu_seconds: Counter[tuple[str, str]] = Counter()
            for held in self._gpu_time.values():
                gpu_seconds.update(held.at(now))
            for key, seconds in gpu_seconds.items():
                self._gpu_reported[key] = max(seconds, self._gpu_reported.get(key, 0.0))
            return TrailCounts(
                builds=dict(totals.builds),
                build_buckets={r: tuple(b) for r, b in totals.build_buckets.items()},
                build_seconds=dict(totals.build_seconds),
                retirements=dict(totals.retirements),
                refusals=dict(totals.refusals),
                gpu_seconds=dict(self._gpu_reported),
            )

    def _follow(self) -> bool:
        """Add each file's new whole lines; False if a file shrank or was replaced."""
        try:
            paths = sorted(self.directory.glob("*.jsonl"))
        except OSError:
            return True
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile: what it held stays counted
            inode, done = self._read.get(path.name, (stat.st_ino, 0))
            if inode != stat.st_ino or stat.st_size < done:
                return False
            if stat.st_size > done:
                self._read[path.name] = (inode, self._add_lines(path, done))
        return True

    def _add_lines(self, path: Path, offset: int) -> int:
        """Add the whole lines of `path` from `offset`; where the next unread line begins."""
        with open(path, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # being written: read it whole next time
                offset += len(raw)
                event = parse_line(raw)
                if event is not None:
                    self.totals.add(event)
        return offset


# ---------------------------------------------------------------- the images' disk


@dataclass(frozen=True)
class ImageUsage:
    """The disk ds01's images take, each layer counted once (per user, and in all)."""

    images: Mapping[str, int]  # user ("" for images of no user) -> images
    user_bytes: Mapping[str, int]  # user -> bytes of the layers their images use
    total_bytes: int  # bytes of the layers all of them use


def history_layers(history: list[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """An image's layers, oldest first, as (name, bytes), from its history (newest first,
    as the engine gives it).

    A layer is named by the id of the image that step made where the engine
    knows it, else by the name below it and the step's time, command and size:
    two images built on one base name its layers alike, so they count once.
    """
    layers, below = [], ""
    for step in reversed(history):
        name = str(step.get("Id") or "<missing>")
        if name == "<missing>":
            text = f"{below}\0{step.get('Created')}\0{step.get('CreatedBy')}\0{step.get('Size')}"
            name = "chain:" + hashlib.sha256(text.encode()).hexdigest()
        layers.append((name, int(step.get("Size") or 0)))
        below = name
    return layers


def image_usage(
    images: Iterable[Mapping[str, Any]], layers: Mapping[str, list[tuple[str, int]]]
) -> ImageUsage:
    """Count the engine's image list (`images`) with each image id's `layers`."""
    count: Counter[str] = Counter()
    per_user: dict[str, dict[str, int]] = {}
    every: dict[str, int] = {}
    for image in images:
        user = (image.get("Labels") or {}).get(labels.USER, "")
        count[user] += 1
        mine = per_user.setdefault(user, {})
        for name, size in layers.get(image["Id"], ()):
            mine[name] = every[name] = size
    return ImageUsage(
        images=dict(count),
        user_bytes={user: sum(sizes.values()) for user, sizes in per_user.items()},
        total_bytes=sum(every.values()),
    )


class ImageDisk:
    """Reads `ImageUsage` from the engine (blocking: run it on a thread), at most every
    `max_age` seconds: disk use moves slowly, and an image list can take tens of ms."""

    def __init__(
        self,
        client: Callable[[], docker.APIClient] = lambda: docker_client(30),
        max_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_client = client
        self._client: docker.APIClient | None = None
        self._layers: dict[str, list[tuple[str, int]]] = {}  # image id -> its layers
        self._lock = threading.Lock()
        self.max_age, self.clock = max_age, clock
        self._latest: tuple[float, ImageUsage] | None = None

    def read(self) -> ImageUsage:
        with self._lock:
            if self._latest is not None and self.clock() - self._latest[0] < self.max_age:
                return self._latest[1]
            read_at = self.clock()
            if self._client is None:
                self._client = self._make_client()
            images = self._client.images(filters=labels.managed_filter())
            known = {}
            for image in images:
                layers = self._layers.get(image["Id"])
                if layers is None:
                    try:
                        layers = history_layers(self._client.history(image["Id"]))
                    except docker.errors.NotFound:
                        continue  # removed since the list
                known[image["Id"]] = layers
            self._layers = known
            usage = image_usage([i for i in images if i["Id"] in known], known)
            self._latest = (read_at, usage)
            return usage


# ---------------------------------------------------------------- the metrics


def trail_families(counts: TrailCounts) -> Iterator[Metric]:
    builds = CounterMetricFamily(
        "ds01_builds",
        "Image builds ended, by result (succeeded, failed, interrupted), hub's and service's.",
        labels=["result"],
    )
    for result in sorted(set(BUILD_RESULTS) | set(counts.builds)):
        builds.add_metric([result], counts.builds.get(result, 0))
    yield builds

    durations = HistogramMetricFamily(
        "ds01_build_duration_seconds",
        "How long ended image builds took, by result.",
        labels=["result"],
    )
    for result in sorted(counts.build_buckets):
        cumulative = accumulate(counts.build_buckets[result])
        durations.add_metric(
            [result],
            buckets=[
                (floatToGoString(le), n) for le, n in zip(BUILD_BUCKETS, cumulative, strict=True)
            ],
            sum_value=counts.build_seconds.get(result, 0.0),
        )
    yield durations

    reasons = {
        "ds01_retirements": ("Servers the policy retired, by reason.", counts.retirements),
        "ds01_refusals": (
            "Requests ds01 refused (starts, edits, launches), by reason.",
            counts.refusals,
        ),
    }
    for name, (what, values) in reasons.items():
        family = CounterMetricFamily(name, what, labels=["reason"])
        for reason in sorted(values):
            family.add_metric([reason], values[reason])
        yield family

    gpu_seconds = CounterMetricFamily(
        "ds01_gpu_seconds",
        "GPU-equivalents held times seconds, per user and policy group (at the grant; "
        '"" for none). A hold still open counts up to the scrape.',
        labels=["user", "group"],
    )
    for (user, group), seconds in sorted(counts.gpu_seconds.items()):
        gpu_seconds.add_metric([user, group], seconds)
    yield gpu_seconds


def gpu_families(view: Mapping[str, Any]) -> Iterator[Metric]:
    """From the GPU page's view (`gpu_view`): a row per GPU or MIG device."""
    yield GaugeMetricFamily(
        "ds01_gpu_inventory_up",
        "1 if the GPU inventory (NVML, or the simulated GPUs) could be read, else 0.",
        value=0 if view.get("error") else 1,
    )
    ids = ["gpu", "index", "name"]
    allocated = GaugeMetricFamily(
        "ds01_gpu_allocated",
        "Servers holding the GPU, by holder (user, project); a GPU no server holds: 0, with "
        "empty user and project.",
        labels=[*ids, "user", "project"],
    )
    used = GaugeMetricFamily("ds01_gpu_memory_used_bytes", "GPU memory in use.", labels=ids)
    total = GaugeMetricFamily("ds01_gpu_memory_total_bytes", "GPU memory.", labels=ids)
    utilization = GaugeMetricFamily(
        "ds01_gpu_utilization_percent",
        "GPU utilization as NVML reports it (none for MIG devices).",
        labels=ids,
    )
    states = GaugeMetricFamily(
        "ds01_gpus",
        "GPUs (and MIG devices) in the inventory, by state: allocated (a server holds it), "
        "kept (for a stopped project's owner), free.",
        labels=["state"],
    )
    counts: Counter[str] = Counter()
    for row in view.get("gpus", []):
        gpu = [row["uuid"], str(row["index"]), row["name"]]
        holders = Counter((h["user"], h["project"]) for h in row["holders"])
        for (user, project), n in sorted(holders.items()):
            allocated.add_metric([*gpu, user, project], n)
        if not holders:
            allocated.add_metric([*gpu, "", ""], 0)
        for family, value in ((used, "memory_used"), (total, "memory_total")):
            if row.get(value) is not None:
                family.add_metric(gpu, row[value])
        if row.get("utilization") is not None:
            utilization.add_metric(gpu, row["utilization"])
        if row["index"] != "?":  # "?": held, but no longer in the inventory
            counts["allocated" if holders else "kept" if row.get("kept_for") else "free"] += 1
    for state in GPU_STATES:
        states.add_metric([state], counts[state])
    yield from (states, allocated, used, total, utilization)
    queue = GaugeMetricFamily(
        "ds01_gpu_queue_length",
        "Spawns waiting in the GPU queue, by kind (gpu or mig); interrupted: waits a restart "
        "of the hub ended, whose places are kept for a while.",
        labels=["kind", "state"],
    )
    waits: Counter[tuple[str, str]] = Counter(
        ("mig" if w["mig"] else "gpu", w["state"]) for w in view.get("queue", [])
    )
    for kind in ("gpu", "mig"):
        for state in ("waiting", "interrupted"):
            queue.add_metric([kind, state], waits[(kind, state)])
    yield queue


def image_families(usage: ImageUsage) -> Iterator[Metric]:
    images = GaugeMetricFamily(
        "ds01_images", "ds01's images in the engine, per user.", labels=["user"]
    )
    user_bytes = GaugeMetricFamily(
        "ds01_image_bytes",
        "Disk the user's images take, each layer once (layers shared with other users' "
        "images, the base image's, count for each of them).",
        labels=["user"],
    )
    for user in sorted(usage.images):
        images.add_metric([user], usage.images[user])
        user_bytes.add_metric([user], usage.user_bytes.get(user, 0))
    yield images
    yield user_bytes
    yield GaugeMetricFamily(
        "ds01_image_disk_bytes",
        "Disk all of ds01's images take together, each layer once.",
        value=usage.total_bytes,
    )


@dataclass(frozen=True)
class Scrape:
    """One scrape's inputs; None where that source could not be read."""

    counts: TrailCounts
    gpus: Mapping[str, Any]
    images: ImageUsage | None


def families(scrape: Scrape) -> Iterator[Metric]:
    yield from trail_families(scrape.counts)
    yield from gpu_families(scrape.gpus)
    if scrape.images is not None:
        yield from image_families(scrape.images)


class DS01Collector(Collector):
    """Serves the latest `Scrape` (`Metrics.render` sets it just before it collects)."""

    def __init__(self) -> None:
        self.scrape: Scrape | None = None

    def collect(self) -> Iterator[Metric]:
        if self.scrape is not None:
            yield from families(self.scrape)


class Metrics:
    """The service's metrics: a registry of their own, one collector, and the inputs.

    `gpus` returns the GPU page's view; `images` (blocking) the images' disk,
    or raises an engine error (the image metrics are then left out).
    """

    def __init__(
        self,
        trail: TrailFollower,
        gpus: Callable[[], Awaitable[Mapping[str, Any]]],
        images: Callable[[], ImageUsage],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.trail, self.gpus, self.images, self.clock = trail, gpus, images, clock
        self.collector = DS01Collector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    @classmethod
    def for_service(cls, shared: DS01Settings) -> Metrics:
        """Over the service's state directory, GPU allocator and kept GPUs."""
        allocator, holds = shared.gpu_allocator, shared.gpu_holds
        queue = QueueFile(shared.state_dir)
        return cls(
            TrailFollower(shared.state_dir),
            lambda: gpu_view(allocator, holds, queue),
            ImageDisk().read,
        )

    async def render(self) -> bytes:
        """The exposition (text format) of everything, read now."""
        counts = await asyncio.to_thread(self.trail.update, self.clock())
        gpus = await self.gpus()
        try:
            images = await asyncio.to_thread(self.images)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            log.warning("ds01 metrics: the images' disk use could not be read: %s", e)
            images = None
        # no await from here on: a concurrent scrape cannot swap the inputs mid-collect
        self.collector.scrape = Scrape(counts, gpus, images)
        return generate_latest(self.registry)


class MetricsHandler(BaseHandler):
    """``metrics``: for a hub token that holds ``read:metrics`` (a user's, or a Prometheus
    service's in the ``ds01-metrics`` role), as the hub's own /hub/metrics."""

    async def get(self) -> None:
        user = self.current_user
        if user is None or not check_scopes(SCOPE, set(user.get("scopes", []))):
            raise web.HTTPError(403, f"Access to metrics requires scope '{SCOPE}'")
        body = await self.settings["metrics"].render()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)
