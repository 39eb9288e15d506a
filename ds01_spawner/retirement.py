"""Retirement by policy: when a running server has run too long or sat idle too long,
and the warnings before it is.

`judge` is a pure function of (limits, retirement settings, what is known of
one server, the share of GPUs allocated, now); the service's loop
(`service/retirer.py`) gathers those facts and acts on the verdicts. A
server is idle when the hub saw no Jupyter activity, no check saw its GPUs
at or above `gpu_busy_percent` utilization, and the last
`idle_detection_window` checks saw its CPU under `idle_cpu_percent` and its
network under `idle_network_kbps` (`checkmemory.observe` keeps that count, and
when it was last busy, from the engine's counters: `activity`). A fresh `.keep-alive` in the
workspace holds idleness off (`keep_alive_end`); an exemption lifts a limit
for a while (`exempted`).

A verdict names every warning threshold crossed (`Crossed`: 80 % of
`idle_timeout`, 75 % of `max_runtime`, ...); what the loop remembers of each
server (`checkmemory.Remembered`) says which it sent already, so
each goes out once per threshold and run of the server.

The records here are what people see: `Notices` (warnings before a retirement,
and recent retirements, shown on the hub's pages) and `RetirementLog` (every
retirement by policy, for the admin).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .exemptions import Exemption
from .ledger import Holder
from .limits import Limits, RetirementSettings
from .nvml import GpuSlot
from .statefiles import write_json
from .units import format_duration

log = logging.getLogger("ds01.retirement")


@dataclass(frozen=True)
class ServerFacts:
    """One running server as the hub, the engine and NVML see it (times: epoch seconds)."""

    user: str
    server: str  # the hub's server name; "" for the default server
    project: str
    started: float
    last_activity: float | None = None
    gpus: tuple[str, ...] = ()  # UUIDs it holds
    gpu_busy_at: float | None = None  # the last check that saw one of its GPUs in use
    busy_at: float | None = None  # the last check that saw its CPU or network in use
    # checks in a row that saw its CPU and network quiet; None: not measured (both off)
    quiet_checks: int | None = None
    keep_alive_at: float | None = None  # when `.keep-alive` in its workspace was touched


@dataclass(frozen=True)
class Crossed:
    """A warning threshold a server has crossed on its way to a limit."""

    reason: str  # "max_runtime" or "idle_timeout"
    level: float  # the share of the limit it marks: 0.8; warn_before's: 1 - warn_before / limit
    since: float  # when this limit's clock started: the server's start, or its idle clock's
    at: float  # when the limit will be reached (idle: if it stays idle)
    message: str


@dataclass(frozen=True)
class Verdict:
    action: str  # "keep", "warn" or "retire"
    reason: str  # "", "max_runtime" or "idle_timeout"
    message: str
    retire_at: float | None  # when a limit will be reached (idle: if it stays idle)
    runtime_left: float | None
    idle_left: float | None
    idle_limit: float | None  # the idle timeout in force for this server now
    level: float | None = None  # a warning's threshold (the most urgent one's)
    warnings: tuple[Crossed, ...] = ()  # each limit's highest threshold crossed
    keep_alive_until: float | None = None  # `.keep-alive` holds off idle retirement until


def gpu_share(slots: Iterable[GpuSlot], holders: Iterable[Holder]) -> float:
    """The allocated share of the host's GPU capacity, in GPU-equivalents (0..1)."""
    capacity = {s.uuid: s.fraction for s in slots}
    total = sum(capacity.values())
    if not total:
        return 0.0
    held = {h.uuid for h in holders if h.uuid in capacity}
    return sum(capacity[u] for u in held) / total


def idle_limit(
    limits: Limits, settings: RetirementSettings, has_gpus: bool, share: float
) -> float | None:
    """The idle timeout for a server now: GPU servers' shrink while GPUs are in high demand."""
    if limits.idle_timeout is None:
        return None
    if has_gpus and share > settings.high_demand_share:
        return limits.idle_timeout * settings.high_demand_idle_factor
    return limits.idle_timeout


def keep_alive_end(server: ServerFacts, settings: RetirementSettings, now: float) -> float | None:
    """When the workspace's `.keep-alive` stops (or stopped) holding off idleness: its
    time (one in the future counts as now) plus `keep_alive_max`; None without one."""
    if settings.keep_alive_max is None or server.keep_alive_at is None:
        return None
    return min(server.keep_alive_at, now) + settings.keep_alive_max


def idle_since(server: ServerFacts, held_until: float | None = None) -> float:
    """Where the idle clock starts: the last sign of use. A keep-alive counts as use
    until it lapses (`held_until`), so the clock starts again from there."""
    return max(
        server.started,
        server.last_activity or 0.0,
        server.gpu_busy_at or 0.0,
        server.busy_at or 0.0,
        held_until or 0.0,
    )


def exempted(limits: Limits, exemptions: Iterable[Exemption]) -> Limits:
    """`limits` with what the exemptions in force lift set to none, each source saying so."""
    lifted: dict[str, None] = {}
    sources = dict(limits.sources)
    for e in exemptions:
        for name in e.lifts:
            lifted[name] = None
            sources[name] = f"exemption ({e.who} {e.name}) until {e.until_text}"
    return replace(limits, **lifted, sources=sources) if lifted else limits


@dataclass(frozen=True)
class _Clock:
    reason: str
    since: float
    limit: float
    levels: tuple[float, ...]
    why: str  # what a retirement by it says


def judge(
    limits: Limits,
    settings: RetirementSettings,
    server: ServerFacts,
    share: float,
    now: float,
) -> Verdict:
    """Keep, warn (a threshold of a limit crossed) or retire this server."""
    runtime_left = idle_left = None
    clocks: list[_Clock] = []
    if limits.max_runtime is not None:
        runtime_left = server.started + limits.max_runtime - now
        why = (
            f"it has run for {format_duration(now - server.started)}; "
            f"the limit (max_runtime) is {format_duration(limits.max_runtime)}"
        )
        clocks.append(
            _Clock("max_runtime", server.started, limits.max_runtime, settings.warn_runtime, why)
        )
    limit = idle_limit(limits, settings, bool(server.gpus), share)
    held = keep_alive_end(server, settings, now)
    kept_until = held if held is not None and held > now else None
    if limit is not None:
        since = idle_since(server, None if held is None else min(held, now))
        idle_left = since + limit - now
        measured = server.quiet_checks is None or (
            server.quiet_checks >= settings.idle_detection_window
        )
        if kept_until is None and measured:
            demand = (
                f", shortened while more than {settings.high_demand_share:.0%} of GPUs are "
                "allocated"
                if limit != limits.idle_timeout
                else ""
            )
            why = (
                f"it has been idle ({_idleness(server, settings)}) for "
                f"{format_duration(now - since)}; "
                f"the limit (idle_timeout) is {format_duration(limit)}{demand}"
            )
            clocks.append(_Clock("idle_timeout", since, limit, settings.warn_idle, why))
    facts = (runtime_left, idle_left, limit)
    if not clocks:
        return Verdict("keep", "", "", None, *facts, keep_alive_until=kept_until)
    nearest = min(clocks, key=lambda c: (c.since + c.limit, c.reason))
    at = nearest.since + nearest.limit
    if at <= now:
        return Verdict("retire", nearest.reason, nearest.why, at, *facts)
    warnings = tuple(w for w in (_crossed(c, settings, now) for c in clocks) if w is not None)
    if warnings:
        first = min(warnings, key=lambda w: (w.at, w.reason))
        return Verdict(
            "warn",
            first.reason,
            first.message,
            first.at,
            *facts,
            level=first.level,
            warnings=warnings,
            keep_alive_until=kept_until,
        )
    return Verdict("keep", nearest.reason, "", at, *facts, keep_alive_until=kept_until)


def _idleness(server: ServerFacts, settings: RetirementSettings) -> str:
    """What idle meant for this server, in words."""
    parts = ["no Jupyter activity"]
    if server.gpus:
        parts.append("no GPU use")
    if server.quiet_checks is not None:
        if settings.idle_cpu_percent is not None:
            parts.append(f"CPU under {settings.idle_cpu_percent:g}%")
        if settings.idle_network_kbps is not None:
            parts.append(f"network under {settings.idle_network_kbps:g} kB/s")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _crossed(clock: _Clock, settings: RetirementSettings, now: float) -> Crossed | None:
    """The highest warning threshold `clock` has passed, if any."""
    at = clock.since + clock.limit
    levels = [level for level in clock.levels if now - clock.since >= level * clock.limit]
    if settings.warn_before is not None and at - now <= settings.warn_before:
        levels.append(round(max(0.0, 1 - settings.warn_before / clock.limit), 4))
    if not levels:
        return None
    when = f"{_clock_time(at, now)} (in {format_duration(at - now)})"
    if clock.reason == "idle_timeout":
        hold = (
            f", or touch /workspace/.keep-alive (it holds for "
            f"{format_duration(settings.keep_alive_max)})"
            if settings.keep_alive_max is not None
            else ""
        )
        message = (
            f"will be retired at {when} if it stays idle: {clock.why}. "
            f"Use it to keep it running{hold}."
        )
    else:
        message = f"will be retired at {when}: {clock.why}. Save your work; the workspace is kept."
    return Crossed(clock.reason, max(levels), clock.since, at, message)


def _clock_time(at: float, now: float) -> str:
    """14:05 today; Tue 03 Feb 14:05 on another day (the host's time zone)."""
    local = time.localtime(at)
    same_day = time.localtime(now)[:3] == local[:3]
    return time.strftime("%H:%M" if same_day else "%a %d %b %H:%M", local)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Retirement:
    user: str
    server: str
    project: str
    reason: str
    message: str
    at: float


class RetirementLog:
    """Every retirement by policy, one JSON line each, in `{state_dir}/retirements.jsonl`."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "retirements.jsonl"

    def add(self, entry: Retirement) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(entry)) + "\n")

    def recent(self, limit: int = 200, user: str | None = None) -> list[Retirement]:
        """Newest first."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in reversed(lines):
            with contextlib.suppress(ValueError, TypeError):
                entry = Retirement(**json.loads(line))
                if user is None or entry.user == user:
                    out.append(entry)
            if len(out) >= limit:
                break
        return out

    def retired_lately(self, user: str, server: str, within: float = 300) -> bool:
        """Was this server just retired by policy? (Its GPU is then not held for it.)"""
        now = time.time()
        return any(e.server == server and now - e.at < within for e in self.recent(20, user=user))


class Notices:
    """What the hub's pages tell each user: coming retirements, and recent ones.

    Written by the service's loop on every check (`{state_dir}/notices.json`),
    read by the hub for its announcement banner.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "notices.json"

    def write(self, warnings: dict[str, list[dict[str, Any]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"written": time.time(), "warnings": warnings}, indent=1)

    def warnings(self, user: str) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return list((data.get("warnings") or {}).get(user, []))
