"""GPU-hours from the audit trail: GPU-equivalents held times hours, per month.

The trail's ``gpu`` events (grant, release) are paired into holds, one server
at a time, in time order, by these rules:

- A grant opens a hold for its (user, server). A release closes the server's
  open hold at the release's time.
- A grant for a server that already holds the *same* GPUs is the same hold
  announced again (a restarted hub re-reading its containers): ignored.
- A grant for a server that holds *other* GPUs means the first hold's release
  was lost (the hub died with it): the first closes at the new grant.
- A release with no open grant (the trail began while it was held, or a
  duplicate) counts from its ``since``, but never over time already counted
  for that server.
- A grant never released is held until `now`.

Holds are split at month boundaries (UTC). Efficiency is the mean GPU
utilization while held, from `gpu_samples` (time-weighted); None where no
sample was taken (MIG devices, a service that was not running).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .audit import read_events
from .gpu_samples import GpuSamples, Sample

SAMPLE_SLACK = timedelta(minutes=5)  # a sample this far outside a hold's times is still its own
CSV_HEADER = ("month", "user", "group", "project", "gpu_hours", "efficiency_percent")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Hold:
    """GPUs held by one server from `start` to `end` (`now` while `open`)."""

    user: str
    server: str
    project: str
    group: str  # the policy group at the grant; "" for none
    uuids: tuple[str, ...]
    equivalents: float
    start: datetime
    end: datetime
    open: bool = False


@dataclass
class Amount:
    """GPU-hours, and the utilization samples taken during them."""

    gpu_hours: float = 0.0
    busy: float = 0.0  # sum of utilization % times seconds sampled
    sampled: float = 0.0  # seconds sampled

    @property
    def efficiency(self) -> float | None:
        """Mean utilization in percent while held; None without samples."""
        return self.busy / self.sampled if self.sampled > 0 else None

    def add(self, other: Amount) -> None:
        self.gpu_hours += other.gpu_hours
        self.busy += other.busy
        self.sampled += other.sampled

    def as_json(self) -> dict[str, Any]:
        eff = self.efficiency
        return {
            "gpu_hours": round(self.gpu_hours, 4),
            "efficiency": None if eff is None else round(eff, 1),
        }


@dataclass(frozen=True)
class RowKey:
    month: str  # "YYYY-MM", UTC
    user: str
    group: str
    project: str


# ---------------------------------------------------------------- months


def month_of(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m")


def month_start(when: datetime) -> datetime:
    when = when.astimezone(timezone.utc)
    return when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(start: datetime) -> datetime:
    return (start.replace(day=1) + timedelta(days=32)).replace(day=1)


def this_and_last_month(now: datetime) -> tuple[str, str]:
    this = month_start(now)
    return month_of(this), month_of(this - timedelta(days=1))


def split_by_month(start: datetime, end: datetime) -> list[tuple[str, float]]:
    """(month, hours) for each UTC month the interval [start, end) touches."""
    pieces = []
    cursor = start
    while cursor < end:
        boundary = min(next_month(month_start(cursor)), end)
        pieces.append((month_of(cursor), (boundary - cursor).total_seconds() / 3600))
        cursor = boundary
    return pieces


# ---------------------------------------------------------------- pairing


def _parse_since(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _hold(event: dict[str, Any], start: datetime, end: datetime, open: bool = False) -> Hold:
    uuids = tuple(event.get("uuids") or ())
    equivalents = event.get("equivalents")
    return Hold(
        user=event["user"],
        server=event.get("server", ""),
        project=event.get("project") or event.get("server") or "default",
        group=event.get("group") or "",
        uuids=uuids,
        equivalents=float(len(uuids) if equivalents is None else equivalents),
        start=start,
        end=end,
        open=open,
    )


def holds_from_events(events: Iterable[dict[str, Any]], now: datetime) -> list[Hold]:
    """The trail's grants and releases paired into holds, by the rules in the module's doc.

    `events` are the trail's (``read_events``: each with ``at``), in any order.
    """
    holds: list[Hold] = []
    opened: dict[tuple[str, str], dict[str, Any]] = {}
    counted_to: dict[tuple[str, str], datetime] = {}  # where the server's last hold ended

    def close(grant: dict[str, Any], end: datetime) -> None:
        holds.append(_hold(grant, grant["at"], end))
        counted_to[(grant["user"], grant.get("server", ""))] = end

    for event in sorted(events, key=lambda e: e["at"]):
        if event.get("kind", "gpu") != "gpu" or "user" not in event:
            continue
        key = (event["user"], event.get("server", ""))
        held = opened.get(key)
        if event.get("action") == "grant":
            if held is not None and sorted(held.get("uuids") or ()) == sorted(
                event.get("uuids") or ()
            ):
                continue  # the same hold announced again
            if held is not None:
                close(held, event["at"])  # its release was lost
            opened[key] = event
        elif event.get("action") == "release":
            if held is not None:
                del opened[key]
                close(held, event["at"])
                continue
            start = _parse_since(event.get("since"))
            if start is None:
                continue
            start = max(start, counted_to.get(key, start))
            if start < event["at"]:
                holds.append(_hold(event, start, event["at"]))
                counted_to[key] = event["at"]
    for grant in opened.values():
        holds.append(_hold(grant, grant["at"], max(now, grant["at"]), open=True))
    return holds


# ---------------------------------------------------------------- rows


def _hold_for(sample: Sample, holds: list[Hold]) -> Hold | None:
    """The hold a sample was taken during: same server and GPU, the most time in common."""
    first = datetime.fromtimestamp(sample.first, timezone.utc)
    last = datetime.fromtimestamp(sample.last, timezone.utc)
    best, best_overlap = None, None
    for h in holds:
        if (h.user, h.server) != (sample.user, sample.server) or sample.uuid not in h.uuids:
            continue
        overlap = min(last, h.end + SAMPLE_SLACK) - max(first, h.start - SAMPLE_SLACK)
        if overlap >= timedelta(0) and (best_overlap is None or overlap > best_overlap):
            best, best_overlap = h, overlap
    return best


def usage_rows(
    holds: Iterable[Hold], samples: Iterable[Sample], months: Collection[str]
) -> dict[RowKey, Amount]:
    """GPU-hours and efficiency per (month, user, group, project), for `months` only."""
    holds = list(holds)
    rows: dict[RowKey, Amount] = {}
    for h in holds:
        for month, hours in split_by_month(h.start, h.end):
            if month in months:
                key = RowKey(month, h.user, h.group, h.project)
                rows.setdefault(key, Amount()).gpu_hours += h.equivalents * hours
    for sample in samples:
        hold = _hold_for(sample, holds)
        if hold is None:
            continue  # no grant or release of it in the trail: nothing to attribute it to
        for month, (busy, seconds) in sample.months.items():
            if month in months:
                amount = rows.setdefault(
                    RowKey(month, hold.user, hold.group, hold.project), Amount()
                )
                amount.busy += busy
                amount.sampled += seconds
    return rows


def totals(
    rows: Mapping[RowKey, Amount], by: Callable[[RowKey], str], this: str, last: str
) -> list[dict[str, Any]]:
    """Rows summed by `by(key)`: each name with its ``this_month`` and ``last_month``."""
    sums: dict[str, dict[str, Amount]] = {}
    for key, amount in rows.items():
        if key.month not in (this, last):
            continue
        months = sums.setdefault(by(key), {this: Amount(), last: Amount()})
        months[key.month].add(amount)
    return [
        {"name": name, "this_month": months[this], "last_month": months[last]}
        for name, months in sorted(sums.items())
    ]


def usage_from_trail(
    state_dir: str | os.PathLike[str], now: datetime
) -> tuple[dict[RowKey, Amount], str, str]:
    """This month's and last month's rows, from the trail and the samples in `state_dir`."""
    this, last = this_and_last_month(now)
    holds = holds_from_events(read_events(state_dir, until=now, kinds=["gpu"]), now)
    return usage_rows(holds, GpuSamples(state_dir).read(), (this, last)), this, last


# ---------------------------------------------------------------- CSV


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``), quoted
    with a leading apostrophe: user and project names are not ours to trust."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def usage_csv(rows: Mapping[RowKey, Amount]) -> str:
    """A header, then one line per (month, user, group, project), oldest month first."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for key in sorted(rows, key=lambda k: (k.month, k.user, k.group, k.project)):
        amount = rows[key]
        eff = amount.efficiency
        writer.writerow(
            [
                csv_cell(key.month),
                csv_cell(key.user),
                csv_cell(key.group),
                csv_cell(key.project),
                f"{amount.gpu_hours:.4f}",
                "" if eff is None else f"{eff:.1f}",
            ]
        )
    return out.getvalue()
