"""What the retirement loop remembers of each running server between checks.

`Remembered` is one server's run: its last CPU/network reading, how many
checks in a row found it quiet, when it was last busy, which warnings went
out (so each threshold is sent once per run), and a future-dated
`.keep-alive` first seen. `observe`, `keep_alive_time`, `is_new` and `sent`
are pure steps; `CheckMemory` keeps it all in
`{state_dir}/retirement-memory.json`, so a restarted service neither warns
again nor forgets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .activity import Counters, is_quiet, rates
from .limits import RetirementSettings
from .retirement import Crossed
from .statefiles import write_json

log = logging.getLogger("ds01.retirement")


@dataclass(frozen=True)
class Remembered:
    """What the retirement loop knows of one server's run from earlier checks."""

    started: float  # the run: a server started again is remembered afresh
    counters: Counters | None = None
    quiet_checks: int = 0
    busy_at: float | None = None  # CPU or network
    gpu_busy_at: float | None = None
    # reason -> (the clock's start, the highest threshold sent): each goes out once
    warned: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    keep_alive_seen: tuple[float, float] | None = None  # (a future mtime, when first seen)


def observe(
    previous: Remembered,
    counters: Counters | None,
    gpu_busy: bool,
    settings: RetirementSettings,
    now: float,
) -> Remembered:
    """One more check of a server: its quiet streak, when it was last in use."""
    quiet = is_quiet(rates(previous.counters, counters), settings)
    return replace(
        previous,
        counters=counters or previous.counters,
        quiet_checks=previous.quiet_checks + 1 if quiet else 0,
        busy_at=now if quiet is False else previous.busy_at,
        gpu_busy_at=now if gpu_busy else previous.gpu_busy_at,
    )


def keep_alive_time(
    previous: Remembered | None, mtime: float | None, now: float
) -> tuple[float | None, tuple[float, float] | None]:
    """When a `.keep-alive` counts as touched, and what to remember of it.

    An mtime in the future counts as now, the first time it is seen, and as
    that time after: `touch -d 2099-01-01` holds for `keep_alive_max`, no longer.
    """
    if mtime is None:
        return None, None
    if mtime <= now:
        return mtime, None
    seen = previous.keep_alive_seen if previous is not None else None
    if seen is not None and seen[0] == mtime:
        return seen[1], seen
    return now, (mtime, now)


def is_new(remembered: Remembered, crossed: Crossed) -> bool:
    """Has this warning (its limit, its clock, its threshold or a higher one) not been sent?"""
    sent = remembered.warned.get(crossed.reason)
    return sent is None or sent[0] != crossed.since or crossed.level > sent[1]


def sent(remembered: Remembered, crossed: Crossed) -> Remembered:
    return replace(
        remembered, warned={**remembered.warned, crossed.reason: (crossed.since, crossed.level)}
    )


class CheckMemory:
    """`Remembered` per running server, in `{state_dir}/retirement-memory.json`: a restarted
    service neither warns again what it sent nor forgets when a server was last in use."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "retirement-memory.json"
        self.servers: dict[tuple[str, str], Remembered] = self._load()

    def get(self, key: tuple[str, str], started: float) -> Remembered | None:
        """What is remembered of this run of the server (not of an earlier one)."""
        found = self.servers.get(key)
        return found if found is not None and found.started == started else None

    def keep_only(self, keys: Iterable[tuple[str, str]]) -> None:
        wanted = set(keys)
        self.servers = {k: v for k, v in self.servers.items() if k in wanted}

    def save(self) -> None:
        rows = []
        for (user, server), r in self.servers.items():
            row = asdict(r)
            row["warned"] = {k: list(v) for k, v in r.warned.items()}
            rows.append({"user": user, "server": server, **row})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, rows)

    def _load(self) -> dict[tuple[str, str], Remembered]:
        try:
            rows = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("Retirement memory %s unreadable, starting afresh: %s", self.path, e)
            return {}
        out = {}
        for row in rows if isinstance(rows, list) else []:
            try:
                counters = row.pop("counters", None)
                seen = row.pop("keep_alive_seen", None)
                key = (row.pop("user"), row.pop("server"))
                out[key] = Remembered(
                    counters=Counters(**counters) if counters else None,
                    keep_alive_seen=tuple(seen) if seen else None,
                    warned={k: tuple(v) for k, v in (row.pop("warned", None) or {}).items()},
                    **row,
                )
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
        return out
