"""The hub process's memory and CPU: with no servers, during a storm, with 30 running.

The hub is a MockHub in this very process, driven from its own event loop, so
"the hub process" is the hub plus the benchmark's driver (its HTTP client,
its tasks, the results it keeps). The driver is the same for both spawners
and idle while these are read, so the fair comparisons are the deltas (RSS
with 30 servers minus RSS with none) and CPU time over the same stretch.

RSS is VmRSS from /proc, after a gc.collect(); CPU is getrusage(RUSAGE_SELF)
(user + system, every thread of the process: DockerSpawner's executor and
the build threads too). The probe (benchmarks.probe) is a child process and
not counted. The proxy (configurable-http-proxy, node) is its own process:
its RSS is read from the pid in the hub's pid file.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
from pathlib import Path
from time import perf_counter

from .hub import BenchHub


def rss_mib(pid: int | str = "self") -> float | None:
    """Resident memory of process `pid` in MiB (None if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)  # reported in kB
    return None


def hub_rss_mib() -> float | None:
    gc.collect()  # garbage waiting for a collection is no one's footprint
    return rss_mib()


def proxy_rss_mib(hub: BenchHub) -> float | None:
    try:
        pid = int(Path(hub.app.proxy.pid_file).read_text().strip())
    except (OSError, ValueError, AttributeError):
        return None
    return rss_mib(pid)


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds all of the machine's cores have spent not idle so far (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, iowait = ticks[3], ticks[4]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - idle - iowait) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU use from now until `read()`: the hub process's and the whole machine's."""

    def __init__(self) -> None:
        self.t0, self.hub0, self.machine0 = perf_counter(), cpu_s(), machine_busy_s()

    def read(self) -> dict:
        wall = perf_counter() - self.t0
        hub, machine = cpu_s() - self.hub0, machine_busy_s() - self.machine0
        return {
            "wall_s": round(wall, 2),
            "hub_cpu_s": round(hub, 3),
            "hub_cpu_percent": round(100 * hub / wall, 1),
            # of all cores: 100% is every core busy the whole time
            "machine_busy_percent": round(100 * machine / wall / (os.cpu_count() or 1), 1),
        }


def snapshot(hub: BenchHub) -> dict:
    return {"hub_rss_mib": hub_rss_mib(), "proxy_rss_mib": proxy_rss_mib(hub)}


def poll_window_s(hub: BenchHub, user: str, margin_s: float = 3.0) -> float:
    """Long enough to see every running server polled once: the spawner's poll
    interval at its longest (tornado's jitter is +-half of poll_jitter) plus a margin."""
    spawner = hub.spawner(user)
    return spawner.poll_interval * (1 + spawner.poll_jitter / 2) + margin_s


async def idle_window(hub: BenchHub, users: list[str], seconds: float) -> dict:
    """The hub's CPU over `seconds` in which nothing but the hub itself runs."""
    spawners = [hub.spawner(u) for u in users]
    polls = [s.bench_polls for s in spawners]
    t0, cpu0 = perf_counter(), cpu_s()
    await asyncio.sleep(seconds)
    cpu, wall = cpu_s() - cpu0, perf_counter() - t0
    polled = [s.bench_polls - n for s, n in zip(spawners, polls, strict=True)]
    return {
        "window_s": round(wall, 2),
        "cpu_s": round(cpu, 3),
        "cpu_percent": round(100 * cpu / wall, 2),
        "poll_interval_s": spawners[0].poll_interval if spawners else None,
        "polls": sum(polled),
        "servers_polled": sum(n > 0 for n in polled),
    }
