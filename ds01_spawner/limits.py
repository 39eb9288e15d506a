"""The lab policy: per-user and per-group limits, from one YAML file (or traitlets).

    defaults:              # everyone
      memory: 16G
      max_gpus: 1
    groups:                # JupyterHub groups; a user in several: the first listed here wins
      students: {max_gpus: 0.5, allow_full_gpu: false}
    users:
      alice: {max_runtime: 3d}
    retirement:            # how the hub retires servers by policy (not per user)
      check_interval: 1m
      warn_idle: [80%, 95%]
    exemptions:            # limits lifted for a user or group, until a date (exemptions.py)
      - {user: alice, lifts: [idle_timeout], until: 2027-01-31}
    images:                # how the service cleans project images (not per user)
      disk_high_watermark: 80%

A limit resolves user -> first matching group -> defaults -> built-in default,
key by key. Everything here is pure: `parse_policy` turns text (or a dict)
into a `Policy` or raises `PolicyError` naming the file, line and key;
`PolicyStore` is the one I/O edge, re-reading the file when it changes and
keeping the last good policy when the new text is broken. Reading the YAML
safely is `policyfile`; durations and sizes are `units`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .exemptions import Exemption, parse_exemptions
from .policyfile import MAX_POLICY_BYTES, Located, PolicyError, check_size, load_policy_text
from .units import OFF_WORDS, format_duration, format_size, parse_duration, parse_size

log = logging.getLogger("ds01.policy")


# ---------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """What one user may do; None means no limit. Per container unless the name says."""

    max_cpus: float | None = None
    memory: int | None = None  # bytes; swap is not added on top
    shm_size: int | None = None  # bytes of /dev/shm (Docker's own default: 64M)
    pids_limit: int | None = None
    max_running_projects: int | None = None  # per user
    max_gpus: float = 1.0  # per user, across running projects, in GPU-equivalents
    max_gpus_per_project: float | None = None  # GPU-equivalents one server may hold
    allow_full_gpu: bool = True  # False: MIG slices only
    max_runtime: float | None = None  # seconds
    idle_timeout: float | None = None  # seconds
    gpu_hold_after_stop: float | None = None  # seconds a stopped project's GPU stays its own
    queue_timeout: float | None = 3600.0  # seconds a spawn may wait for a GPU; None: no queue
    queue_priority: int = 0  # the GPU queue serves higher first, then first come
    allowed_types: tuple[str, ...] | None = None  # project types; None: all
    # where each value came from: "users.alice", "groups.students", "defaults", "built-in"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def allows_type(self, project_type: str) -> bool:
        return self.allowed_types is None or project_type in self.allowed_types

    def describe(self) -> dict[str, Any]:
        """Each limit as people write it, with its source: the "check limits" rows."""
        return {
            name: {"value": _show(name, getattr(self, name)), "source": self.sources.get(name, "")}
            for name in LIMIT_KEYS
        }


def _show(name: str, value: Any) -> Any:
    if name in _DURATIONS:
        return format_duration(value)
    if name in _SIZES:
        return format_size(value)
    if name == "allowed_types":
        return "all" if value is None else ", ".join(value) or "none"
    return "none" if value is None else value


def _number(kind: type, low: float, high: float | None = None, *, off: bool = True):
    def parse(value: Any) -> Any:
        if off and (value is None or (isinstance(value, str) and value.lower() in OFF_WORDS)):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")
        if kind is int and value != int(value):
            raise ValueError(f"{value!r} is not a whole number")
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"at least {low:g}" + (f" and at most {high:g}" if high is not None else "")
            raise ValueError(f"{value!r} is impossible: it must be {bound}")
        return kind(value)

    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _types(value: Any) -> tuple[str, ...] | None:
    if value is None or value == "all":
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{value!r} is not a list of project types (or all)")
    return tuple(value)


def _size_at_least(minimum: int, what: str):
    def parse(value: Any) -> int | None:
        size = parse_size(value)
        if size is not None and size < minimum:
            least = format_size(minimum)
            raise ValueError(f"{value!r} is impossible: {what} needs at least {least}")
        return size

    return parse


_DURATIONS = {"max_runtime", "idle_timeout", "gpu_hold_after_stop", "queue_timeout"}
_SIZES = {"memory", "shm_size"}
_PARSERS = {
    "max_cpus": _number(float, 0.01),
    "memory": _size_at_least(64 * 1024**2, "a JupyterLab server"),
    "shm_size": _size_at_least(1024**2, "/dev/shm"),
    "pids_limit": _number(int, 32),
    "max_running_projects": _number(int, 0),
    "max_gpus": _number(float, 0, off=False),
    "max_gpus_per_project": _number(float, 0),
    "allow_full_gpu": _bool,
    "max_runtime": parse_duration,
    "idle_timeout": parse_duration,
    "gpu_hold_after_stop": parse_duration,
    "queue_timeout": parse_duration,
    "queue_priority": _number(int, -100, 100, off=False),
    "allowed_types": _types,
}
LIMIT_KEYS = tuple(_PARSERS)


@dataclass(frozen=True)
class RetirementSettings:
    """How the hub retires servers by policy (the `retirement` section)."""

    check_interval: float = 60.0
    # warnings as the share of a limit reached: idle 80 % and 95 % of idle_timeout, ...
    warn_idle: tuple[float, ...] = (0.8, 0.95)
    warn_runtime: tuple[float, ...] = (0.75, 0.9)
    warn_before: float | None = None  # ... and this long before a retirement (older policies)
    gpu_busy_percent: float = 5.0  # a GPU at or above this utilization is in use
    idle_cpu_percent: float | None = 10.0  # of one CPU: at or above, the server is in use
    idle_network_kbps: float | None = 10.0  # kB/s in and out: at or above, in use
    idle_detection_window: int = 3  # checks in a row that saw the server quiet, to be idle
    keep_alive_max: float | None = 86400.0  # a fresher /workspace/.keep-alive holds off idling
    high_demand_share: float = 0.8  # more than this share of GPUs allocated ...
    high_demand_idle_factor: float = 0.5  # ... multiplies GPU servers' idle timeouts by this


def _is_off(value: Any) -> bool:
    """none, off, never (YAML reads a bare `off` as false)."""
    return (
        value is None or value is False or (isinstance(value, str) and value.lower() in OFF_WORDS)
    )


def _or_off(parse: Any) -> Any:
    return lambda value: None if _is_off(value) else parse(value)


def _warn_levels(value: Any) -> tuple[float, ...]:
    """[80%, 95%] (or [80, 95]) -> (0.8, 0.95): shares of a limit, increasing; off or []: none."""
    if _is_off(value):
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of percentages; write e.g. [80%, 95%]")
    levels = []
    for item in value:
        level = _percent(item)
        if level >= 1:
            raise ValueError(f"{item!r} is impossible: a warning comes before 100%")
        if levels and level <= levels[-1]:
            raise ValueError(f"{item!r} is out of order: write the percentages increasing")
        levels.append(level)
    return tuple(levels)


def _duration_or_zero(value: Any) -> float | None:
    """A duration, or 0 / off: none."""
    return None if _is_off(value) or value in (0, "0") else parse_duration(value)


_RETIREMENT = {
    "check_interval": parse_duration,
    "warn_idle": _warn_levels,
    "warn_runtime": _warn_levels,
    "warn_before": _or_off(parse_duration),
    "gpu_busy_percent": _number(float, 0, 100, off=False),
    "idle_cpu_percent": _or_off(_number(float, 0.01)),
    "idle_network_kbps": _or_off(_number(float, 0.01)),
    "idle_detection_window": _number(int, 1, 1000, off=False),
    "keep_alive_max": _duration_or_zero,
    "high_demand": None,  # a section: share, idle_factor
}
_MAY_BE_OFF = {"warn_before", "idle_cpu_percent", "idle_network_kbps", "keep_alive_max"}
_HIGH_DEMAND = {
    "share": _number(float, 0, 1, off=False),
    "idle_factor": _number(float, 0.01, 1, off=False),
}


@dataclass(frozen=True)
class ImageSettings:
    """How the service cleans project images, and what deleting a project does with its
    workspace (the `images` section). A duration of None keeps those images for ever."""

    keep_previous_for: float | None = 7 * 86400.0  # a superseded :previous, after the rebuild
    keep_latest_for: float | None = 30 * 86400.0  # a :latest its project used or built
    disk_high_watermark: float = 0.8  # the image disk fuller than this share ...
    disk_low_watermark: float = 0.6  # ... is cleaned until under this one
    clean_interval: float | None = 3600.0  # None: the cleaner does not run
    workspace_on_delete: str = "keep"  # or "archive"


WORKSPACE_ON_DELETE = ("keep", "archive")


def _percent(value: Any) -> float:
    """'80%' (or 80) -> 0.8: a share of the image disk."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.endswith("%"):
        try:
            text = float(text[:-1].strip())
        except ValueError:
            text = None
    if isinstance(text, bool) or not isinstance(text, (int, float)):
        raise ValueError(f"{value!r} is not a percentage; write e.g. 80%")
    if not math.isfinite(text) or not 0 < text <= 100:
        raise ValueError(f"{value!r} is impossible: it must be above 0% and at most 100%")
    return text / 100


def _choice(*choices: str):
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return parse


_IMAGES = {
    "keep_previous_for": parse_duration,
    "keep_latest_for": parse_duration,
    "disk_high_watermark": _percent,
    "disk_low_watermark": _percent,
    "clean_interval": parse_duration,
    "workspace_on_delete": _choice(*WORKSPACE_ON_DELETE),
}
_SECTIONS = ("defaults", "groups", "users", "retirement", "images", "exemptions")


@dataclass(frozen=True)
class Policy:
    """Parsed, validated limits; `resolve` gives one user's."""

    defaults: Mapping[str, Any] = field(default_factory=dict)
    groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # in priority order
    users: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    retirement: RetirementSettings = RetirementSettings()
    images: ImageSettings = ImageSettings()
    source: str = "built-in defaults"
    exemptions: tuple[Exemption, ...] = ()  # all of them, expired too (exemptions.py)

    def resolve(self, user: str, groups: Iterable[str] = ()) -> Limits:
        """user -> the first of the user's groups in the policy's order -> defaults."""
        group = self.group_for(groups)
        layers = [
            (f"users.{user}", self.users.get(user, {})),
            (f"groups.{group}", self.groups.get(group, {}) if group else {}),
            ("defaults", self.defaults),
        ]
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name in LIMIT_KEYS:
            for where, layer in layers:
                if name in layer:
                    values[name], sources[name] = layer[name], where
                    break
            else:
                sources[name] = "built-in"
        return Limits(**values, sources=sources)

    def group_for(self, groups: Iterable[str]) -> str | None:
        mine = set(groups)
        return next((g for g in self.groups if g in mine), None)


# ---------------------------------------------------------------- parsing


def parse_policy(
    raw: Mapping[str, Any],
    *,
    source: str = "c.DS01Spawner.policy",
    located: Located | None = None,
    known_types: Iterable[str] | None = None,
) -> Policy:
    """Validate a policy mapping; every error names its key (and line, from a file)."""
    at = located or Located(source)
    for section in raw:
        if section not in _SECTIONS:
            raise at.error(section, f"unknown section; use {', '.join(_SECTIONS)}")
    defaults = _limits(raw.get("defaults"), "defaults", at, known_types)
    groups = {
        name: _limits(value, f"groups.{name}", at, known_types)
        for name, value in _section(raw.get("groups"), "groups", at).items()
    }
    users = {
        name: _limits(value, f"users.{name}", at, known_types)
        for name, value in _section(raw.get("users"), "users", at).items()
    }
    return Policy(
        defaults,
        groups,
        users,
        _retirement(raw.get("retirement"), at),
        _images(raw.get("images"), at),
        source,
        parse_exemptions(raw.get("exemptions"), at),
    )


def _section(value: Any, key: str, at: Located) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise at.error(key, "must be a mapping")
    return value


def _limits(value: Any, key: str, at: Located, known_types: Iterable[str] | None) -> dict[str, Any]:
    out = {}
    for name, raw in _section(value, key, at).items():
        where = f"{key}.{name}"
        if name not in _PARSERS:
            raise at.error(where, f"unknown limit; known: {', '.join(LIMIT_KEYS)}")
        try:
            out[name] = _PARSERS[name](raw)
        except ValueError as e:
            raise at.error(where, str(e)) from None
        if name == "allowed_types" and known_types is not None and out[name]:
            unknown = sorted(set(out[name]) - set(known_types))
            if unknown:
                raise at.error(
                    where,
                    f"no project type {', '.join(unknown)}; "
                    f"types: {', '.join(sorted(known_types))}",
                )
    per_project, per_user = out.get("max_gpus_per_project"), out.get("max_gpus")
    if per_project is not None and per_user is not None and per_project > per_user:
        raise at.error(
            f"{key}.max_gpus_per_project",
            f"{per_project:g} is impossible: more than this entry's max_gpus ({per_user:g})",
        )
    return out


def _setting(parsers: Mapping[str, Any], where: str, name: str, raw: Any, at: Located) -> Any:
    """`raw` as `parsers[name]` reads it; an unknown `name` or a bad value is an error at
    `where` (file, line and key), the known names listed."""
    if name not in parsers:
        raise at.error(where, f"unknown setting; known: {', '.join(parsers)}")
    try:
        return parsers[name](raw)
    except ValueError as e:
        raise at.error(where, str(e)) from None


def _retirement(value: Any, at: Located) -> RetirementSettings:
    settings = RetirementSettings()
    for name, raw in _section(value, "retirement", at).items():
        where = f"retirement.{name}"
        if name == "high_demand":
            for sub, sub_raw in _section(raw, where, at).items():
                parsed = _setting(_HIGH_DEMAND, f"{where}.{sub}", sub, sub_raw, at)
                settings = replace(settings, **{f"high_demand_{sub}": parsed})
            continue
        parsed = _setting(_RETIREMENT, where, name, raw, at)
        if parsed is None and name not in _MAY_BE_OFF:
            raise at.error(where, "needs a value")
        settings = replace(settings, **{name: parsed})
    return settings


def _images(value: Any, at: Located) -> ImageSettings:
    settings = ImageSettings()
    for name, raw in _section(value, "images", at).items():
        parsed = _setting(_IMAGES, f"images.{name}", name, raw, at)
        settings = replace(settings, **{name: parsed})
    if settings.disk_low_watermark >= settings.disk_high_watermark:
        given = value or {}
        key = "disk_low_watermark" if "disk_low_watermark" in given else "disk_high_watermark"
        raise at.error(
            f"images.{key}",
            f"impossible: the low watermark ({settings.disk_low_watermark:.0%}) must be below "
            f"the high one ({settings.disk_high_watermark:.0%})",
        )
    return settings


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` wins key by key inside each section (and each group or user entry)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(section), dict):
            for name, entry in value.items():
                old = out[section].get(name)
                if isinstance(entry, Mapping) and isinstance(old, Mapping):
                    out[section][name] = {**old, **entry}
                else:
                    out[section][name] = entry
        else:
            out[section] = value
    return out


def load_policy(
    path: str | os.PathLike | None,
    overrides: Mapping[str, Any] | None = None,
    known_types: Iterable[str] | None = None,
) -> Policy:
    """The policy from `overrides` (traitlets) with the file's values on top."""
    base = overrides or {}
    if base:
        parse_policy(base, known_types=known_types)  # errors named by their traitlet key
    if not path:
        return parse_policy(base, known_types=known_types)
    source = str(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        reason = f"cannot read the policy file: {e.strerror or e}"
        raise PolicyError(reason, source=source) from None
    check_size(len(data), source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"not UTF-8 text (byte {e.start})", source=source) from None
    raw, located = load_policy_text(text, source)
    parse_policy(raw, located=located, known_types=known_types)  # errors with file and line
    return replace(parse_policy(_merge(base, raw), known_types=known_types), source=source)


class PolicyStore:
    """The current policy of this process: re-read when the file changes, kept when broken.

    `current()` is cheap (one stat); the hub calls it on every spawn and the
    service on every check, so an edited file takes effect without a restart.
    """

    def __init__(
        self,
        path: str | None,
        overrides: Mapping[str, Any] | None = None,
        known_types: Iterable[str] | None = None,
    ) -> None:
        self.path = path or None
        self.overrides = dict(overrides or {})
        self.known_types = None if known_types is None else tuple(known_types)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._policy: Policy | None = None
        self.error: str | None = None  # why the file on disk is not in force, if it is not
        self.loaded_at: float | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return (-1, -1, -1)
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None

    def current(self) -> Policy:
        """The policy in force; raises PolicyError only if none was ever valid."""
        with self._lock:
            stamp = self._file_stamp()
            if self._policy is None or stamp != self._stamp:
                self._load(stamp)
            if self._policy is None:
                raise PolicyError(self.error or "no policy")
            return self._policy

    def reload(self) -> Policy:
        """Re-read now (the service's "reload" action): the new policy, or PolicyError."""
        with self._lock:
            self._load(self._file_stamp())
            if self.error:
                raise PolicyError(self.error)
            assert self._policy is not None
            return self._policy

    def _load(self, stamp: tuple[int, int, int] | None) -> None:
        self._stamp = stamp
        try:
            policy = load_policy(self.path, self.overrides, self.known_types)
        except PolicyError as e:
            self.error = str(e)
            if self._policy is not None:
                log.error("Policy not reloaded, the previous one stays in force: %s", e)
            return
        if self._policy is not None and policy != self._policy:
            log.info("Policy reloaded from %s", policy.source)
        self._policy, self.error, self.loaded_at = policy, None, time.time()
