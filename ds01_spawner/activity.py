"""A container's CPU and network use between two checks: what makes a server busy besides
Jupyter and its GPUs.

`read_counters` takes the cumulative counters from one engine stats answer
(`stats(stream=False, one_shot=True)`: no two-sample wait), `rates` turns two
readings into use per second, `is_quiet` compares that use with the policy's
`idle_cpu_percent` and `idle_network_kbps`. All pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .limits import RetirementSettings


@dataclass(frozen=True)
class Counters:
    """A container's cumulative CPU time and network bytes, as one engine stats call read them."""

    container: str  # its id: a new container's counters start over
    at: float
    cpu_ns: int
    net_bytes: int | None  # received and sent; None: no network of its own


@dataclass(frozen=True)
class Rates:
    """A container's use between two checks."""

    cpu_percent: float  # of one CPU
    network_kbps: float | None  # kB/s (1000 bytes), received and sent


def read_counters(stats: Mapping[str, Any], container: str, at: float) -> Counters | None:
    """The counters in the engine's stats answer (`GET /containers/{id}/stats`); None if
    it has none (a container that stopped meanwhile)."""
    try:
        cpu = int(stats["cpu_stats"]["cpu_usage"]["total_usage"])
    except (KeyError, TypeError, ValueError):
        return None
    networks = stats.get("networks")
    net = None
    if isinstance(networks, Mapping) and networks:
        try:
            net = sum(
                int(n.get("rx_bytes") or 0) + int(n.get("tx_bytes") or 0) for n in networks.values()
            )
        except (AttributeError, TypeError, ValueError):
            net = None
    return Counters(container, at, cpu, net)


def rates(before: Counters | None, after: Counters | None) -> Rates | None:
    """Use between two readings of one container; None where there is no telling (no
    earlier reading, another container, counters that went back)."""
    if before is None or after is None or before.container != after.container:
        return None
    wall = after.at - before.at
    if wall <= 0 or after.cpu_ns < before.cpu_ns:
        return None
    net = None
    if None not in (before.net_bytes, after.net_bytes) and after.net_bytes >= before.net_bytes:
        net = (after.net_bytes - before.net_bytes) / wall / 1000
    return Rates((after.cpu_ns - before.cpu_ns) / wall / 1e7, net)


def is_quiet(use: Rates | None, settings: RetirementSettings) -> bool | None:
    """True: CPU and network under their thresholds; False: at or above one (in use);
    None: not measured."""
    if use is None:
        return None
    cpu, net = settings.idle_cpu_percent, settings.idle_network_kbps
    busy = (cpu is not None and use.cpu_percent >= cpu) or (
        net is not None and use.network_kbps is not None and use.network_kbps >= net
    )
    return not busy


def measures_use(settings: RetirementSettings) -> bool:
    """Do CPU and network count towards idleness? (Not when both thresholds are off.)"""
    return settings.idle_cpu_percent is not None or settings.idle_network_kbps is not None
