"""Retirement by policy: when a running server has run too long or sat idle too long.

`judge` is a pure function of (limits, retirement settings, what is known of
one server, the share of GPUs allocated, now); the service's loop
(`service/retirer.py`) gathers those facts and acts on the verdicts. A
server is idle when the hub saw no Jupyter activity **and**, for a GPU
server, no check saw its GPUs at or above `gpu_busy_percent` utilization.

The records here are what people see: `Notices` (warnings before a retirement,
and recent retirements, shown on the hub's pages) and `RetirementLog` (every
retirement by policy, for the admin).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .ledger import Holder
from .limits import Limits, RetirementSettings
from .nvml import GpuSlot
from .statefiles import write_json
from .units import format_duration


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


@dataclass(frozen=True)
class Verdict:
    action: str  # "keep", "warn" or "retire"
    reason: str  # "", "max_runtime" or "idle_timeout"
    message: str
    retire_at: float | None  # when a limit will be reached (idle: if it stays idle)
    runtime_left: float | None
    idle_left: float | None
    idle_limit: float | None  # the idle timeout in force for this server now


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


def idle_since(server: ServerFacts) -> float:
    return max(server.started, server.last_activity or 0.0, server.gpu_busy_at or 0.0)


def judge(
    limits: Limits,
    settings: RetirementSettings,
    server: ServerFacts,
    share: float,
    now: float,
) -> Verdict:
    """Keep, warn (within `warn_before` of a limit) or retire this server."""
    runtime_left = idle_left = None
    deadlines: list[tuple[float, str, str]] = []
    if limits.max_runtime is not None:
        runtime_left = server.started + limits.max_runtime - now
        deadlines.append(
            (
                server.started + limits.max_runtime,
                "max_runtime",
                f"it has run for {format_duration(now - server.started)}; "
                f"the limit (max_runtime) is {format_duration(limits.max_runtime)}",
            )
        )
    limit = idle_limit(limits, settings, bool(server.gpus), share)
    if limit is not None:
        since = idle_since(server)
        idle_left = since + limit - now
        what = "no Jupyter activity" + (" and no GPU use" if server.gpus else "")
        demand = (
            f", shortened while more than {settings.high_demand_share:.0%} of GPUs are allocated"
            if limit != limits.idle_timeout
            else ""
        )
        deadlines.append(
            (
                since + limit,
                "idle_timeout",
                f"it has been idle ({what}) for {format_duration(now - since)}; "
                f"the limit (idle_timeout) is {format_duration(limit)}{demand}",
            )
        )
    if not deadlines:
        return Verdict("keep", "", "", None, None, None, None)
    at, reason, why = min(deadlines)
    if at <= now:
        return Verdict("retire", reason, why, at, runtime_left, idle_left, limit)
    if at - now <= settings.warn_before:
        when = time.strftime("%H:%M", time.localtime(at))
        if reason == "idle_timeout":
            message = (
                f"will be retired at {when} (in {format_duration(at - now)}) if it stays idle: "
                f"{why}. Use it to keep it running."
            )
        else:
            message = (
                f"will be retired at {when} (in {format_duration(at - now)}): {why}. "
                "Save your work; the workspace is kept."
            )
        return Verdict("warn", reason, message, at, runtime_left, idle_left, limit)
    return Verdict("keep", reason, "", at, runtime_left, idle_left, limit)


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
