"""GPU utilization while held: the samples behind the usage page's efficiency.

The service's retirement check reads each GPU's utilization from NVML anyway;
`GpuSamples.record` keeps, per hold of one GPU (user, server, uuid and the
ledger's `since`), a running sum per month of utilization weighted by time,
in ``{state_dir}/gpu_samples.json`` (replaced atomically, written by the
service only).

Each sample stands for the time since the hold's previous one (since the
allocation for the first), capped at `max_gap`: irregular sampling (a check
that ran late, a service restart, a page view that surveyed between two
checks) does not tilt the mean. MIG devices have no utilization in NVML, so
their holds have no samples and their efficiency is unknown.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .ledger import Holder
from .nvml import GpuSlot
from .statefiles import write_json

log = logging.getLogger(__name__)

MAX_GAP = 600.0  # seconds one sample may stand for at most
FIRST_SAMPLE = 60.0  # what a first sample stands for when the allocation time is unknown


@dataclass
class Sample:
    """Utilization samples of one GPU held by one server, from its allocation on."""

    user: str
    server: str
    project: str
    uuid: str
    since: str
    first: float
    last: float
    # month ("YYYY-MM", UTC) -> [sum of utilization % times seconds, seconds]
    months: dict[str, list[float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "\t".join((self.user, self.server, self.uuid, self.since))


def month_key(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m")


def parse_since(value: str) -> float | None:
    """The ledger's allocation time (``2025-05-01T10:00:00Z``) as a timestamp, or None."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def add_samples(
    samples: dict[str, Sample],
    holders: Iterable[Holder],
    utilization: Mapping[str, int | None],
    now: float,
    max_gap: float = MAX_GAP,
) -> dict[str, Sample]:
    """`samples` with one more sample for each holder whose GPU's utilization is known.

    Pure: the store's reading and writing sit around it.
    """
    for h in holders:
        value = utilization.get(h.uuid)
        if value is None:
            continue  # a MIG device, or a GPU NVML cannot read
        new = Sample(h.user, h.server, h.project, h.uuid, h.since, now, now)
        sample = samples.setdefault(new.key, new)
        if sample is new:
            allocated = parse_since(h.since)
            previous = allocated if allocated is not None else now - FIRST_SAMPLE
        else:
            previous = sample.last
        weight = min(max(now - previous, 0.0), max_gap)
        if weight <= 0:
            continue
        bucket = sample.months.setdefault(month_key(now), [0.0, 0.0])
        bucket[0] += float(value) * weight
        bucket[1] += weight
        sample.last = max(sample.last, now)
    return samples


def keep_recent(samples: dict[str, Sample], now: float) -> dict[str, Sample]:
    """Only what the usage page can show: samples of this month or the last."""
    this = datetime.fromtimestamp(now, timezone.utc)
    last = (this.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    return {k: s for k, s in samples.items() if month_key(s.last) >= last}


class GpuSamples:
    """``{state_dir}/gpu_samples.json``: `record` adds a sample per held GPU, `read` them all."""

    def __init__(self, state_dir: str | os.PathLike[str], max_gap: float = MAX_GAP) -> None:
        self.path = Path(state_dir) / "gpu_samples.json"
        self.max_gap = max_gap

    def read(self) -> list[Sample]:
        return list(self._load().values())

    def record(self, holders: Iterable[Holder], slots: Iterable[GpuSlot], now: float) -> None:
        """One sample per held GPU. Never raises: a sample lost must not stop a check."""
        try:
            utilization = {s.uuid: s.utilization for s in slots}
            samples = add_samples(self._load(), holders, utilization, now, self.max_gap)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, [vars(s) for s in keep_recent(samples, now).values()])
        except Exception as e:
            log.warning("GPU utilization samples not recorded: %s", e)

    def _load(self) -> dict[str, Sample]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            log.warning("%s is not JSON, starting afresh: %s", self.path, e)
            return {}
        samples = {}
        for item in raw if isinstance(raw, list) else []:
            sample = _sample(item)
            if sample is not None:
                samples[sample.key] = sample
        return samples


def _sample(item: Any) -> Sample | None:
    try:
        sample = Sample(**item)
        sample.months = {str(m): [float(v[0]), float(v[1])] for m, v in dict(sample.months).items()}
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return sample
