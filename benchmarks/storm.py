"""Benchmarks 2 and 3: 30 users start at once; then the hub with 30 servers running.

DS01Spawner: every other user (15 of 30) asks for a GPU (`{"gpus": 1}`) on 4
simulated GPUs with a limit of 1 per user, the others ask for nothing (CPU
only). Expected: the 15 CPU-only users and 4 GPU users ready, the 11 other
GPU users refused (409, the message naming the GPU), no GPU given twice
(from the `ds01.gpu.uuids` labels of the running containers). Every user's
project image already exists (the benchmark project's image, tagged under
each user's name, as `docker tag` would), so the storm measures the GPU
decision and the container starts, not builds.

Plain DockerSpawner: the same storm, 30 users, no options, on its image.

Measured: the time until every user is ready or refused, each user's time,
`GET /hub/api/users` latency from a separate process before and during the
storm, and the CPU the hub process used during it. Then the footprint: the
users that did not start (the refused ones) start again without a GPU, so 30
servers run, and the hub process's RSS (against the same hub before the
storm) and CPU over an idle window long enough for every server to be polled
once are read (benchmarks.footprint says what they include).

Servers are not watched here (benchmarks.hub.servers_unwatched) and the
client looks at the hub's state every 50 ms, not 10: with 30 spawns at once
that polling would otherwise be a large part of the CPU being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from statistics import median
from time import monotonic, perf_counter

import docker

from ds01_spawner import labels
from ds01_spawner.identity import user_slug
from ds01_spawner.images import image_ref

from .footprint import CpuMeter, idle_window, poll_window_s, snapshot
from .hub import BenchHub, Spawn, TimedDS01Spawner, servers_unwatched
from .probe import Probe, latencies, percentiles_ms

STORM_POLL_S = 0.05
GPU = {"gpus": 1}


def gpus_given_twice(engine: docker.DockerClient, users: set[str]) -> tuple[int, int]:
    """(GPU hand-outs beyond the first per UUID, running containers holding GPUs)."""
    running = engine.containers.list(filters={"label": [labels.GPU_UUIDS], "status": "running"})
    mine = [c for c in running if c.labels.get(labels.USER) in users]
    held = Counter(u for c in mine for u in c.labels[labels.GPU_UUIDS].split(",") if u)
    return sum(n - 1 for n in held.values() if n > 1), len(mine)


def tag_images(hub: BenchHub, users: list[str], source_image: str) -> list[str]:
    """The default project's image of each user: `source_image`, tagged (no build)."""
    project = TimedDS01Spawner.default_project.default_value
    tags = [image_ref(user_slug(u), project) for u in users]
    for tag in tags:
        repository, _, version = tag.rpartition(":")
        hub.engine.api.tag(source_image, repository, version)
    return tags


def outcome(spawn: Spawn) -> str:
    if spawn.ready:
        return "ready"
    return "refused" if "gpu" in spawn.message.lower() else "failed"


async def storm_and_footprint(
    hub: BenchHub,
    *,
    tag: str,
    users: int,
    gpu_users: int = 0,
    gpus: int = 0,
    source_image: str | None = None,
    api_idle_s: float = 2.0,
) -> tuple[dict, dict]:
    """The storm on this hub, then its footprint with `users` servers running.

    `source_image`: DS01Spawner only, the image every user's default project gets.
    """
    names = [hub.new_user(f"{tag}{i:02d}") for i in range(users)]
    asks_gpu = set(names[::2][:gpu_users])
    tags = tag_images(hub, names, source_image) if source_image else []
    users_url = hub.api_url.rstrip("/") + "/users"
    before = snapshot(hub)
    try:
        with servers_unwatched():
            probe = await Probe.start(users_url, hub.token)
            try:
                await asyncio.sleep(api_idle_s)  # the API's latency before the storm
                storm_from, t0, cpu = monotonic(), perf_counter(), CpuMeter()
                spawns = await asyncio.gather(
                    *(
                        hub.start(u, "", GPU if u in asks_gpu else None, poll=STORM_POLL_S)
                        for u in names
                    )
                )
                settled, cpu, storm_to = perf_counter() - t0, cpu.read(), monotonic()
            finally:
                samples = await probe.finish()
            storm = summary(spawns, asks_gpu, t0)
            storm.update(
                users=users,
                gpu_users=len(asks_gpu),
                simulated_gpus=gpus,
                settled_s=settled,
                hub_cpu_s=cpu["hub_cpu_s"],
                # refusals included: what the hub spent per server it started
                hub_cpu_per_server_s=round(cpu["hub_cpu_s"] / max(1, storm["ready"]), 3),
                machine_busy_percent=cpu["machine_busy_percent"],
                api_users_idle=percentiles_ms(latencies(samples, 0, storm_from)),
                api_users_during_storm=percentiles_ms(latencies(samples, storm_from, storm_to)),
                api_errors=sum(1 for _, _, status in samples if status != 200),
            )
            if source_image:
                twice, holding = gpus_given_twice(hub.engine, set(names))
                storm.update(gpus_given_twice=twice, containers_holding_gpus=holding)
            # the footprint wants every user's server running: the refused start again, CPU only
            again = [s.user for s in spawns if not s.ready]
            restarts = await asyncio.gather(
                *(hub.start(u, "", None, poll=STORM_POLL_S) for u in again)
            )
        running = [u for u in names if hub.spawner(u).ready]
        idle = await idle_window(hub, running, poll_window_s(hub, names[0]))
        after = snapshot(hub)
        await asyncio.gather(
            *(hub.stop(u, poll=STORM_POLL_S) for u in running), return_exceptions=True
        )
    finally:
        for image in tags:
            with contextlib.suppress(docker.errors.APIError):
                hub.engine.images.remove(image)
    footprint = {
        "before": before,
        "running": len(running),
        "after": after,
        "hub_rss_delta_mib": delta(after["hub_rss_mib"], before["hub_rss_mib"]),
        "proxy_rss_delta_mib": delta(after["proxy_rss_mib"], before["proxy_rss_mib"]),
        "storm_cpu_s": storm["hub_cpu_s"],
        "restarted": len(again),
        "restart_failures": [
            f"{s.user}: {s.status} {s.message}"[:300] for s in restarts if not s.ready
        ],
        "idle": idle,
    }
    return storm, footprint


def summary(spawns: list[Spawn], asks_gpu: set[str], t0: float) -> dict:
    by = {
        kind: [s for s in spawns if outcome(s) == kind] for kind in ("ready", "refused", "failed")
    }
    ready, refused, failed = by["ready"], by["refused"], by["failed"]
    return {
        "ready": len(ready),
        "ready_cpu": sum(s.user not in asks_gpu for s in ready),
        "ready_gpu": sum(s.user in asks_gpu for s in ready),
        "refused": len(refused),
        "refused_cpu_only": sum(s.user not in asks_gpu for s in refused),
        "failed": len(failed),
        "ready_median_s": median(s.seconds for s in ready) if ready else None,
        "refused_median_s": median(s.seconds for s in refused) if refused else None,
        "post_status_codes": dict(Counter(str(s.status) for s in spawns)),
        "refusal_example": refused[0].message if refused else "",
        "failures": [f"{s.user}: {s.status} {s.message}"[:300] for s in failed],
        # each user: asked for a GPU, what came of it, its own POST -> outcome, and
        # when that was, counted from the storm's start (for the plot)
        "per_user": [
            {
                "gpu": s.user in asks_gpu,
                "outcome": outcome(s),
                "seconds": round(s.seconds, 3),
                "done_at_s": round(s.t_done - t0, 3),
            }
            for s in spawns
        ],
    }


def delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 1)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where it means nothing (a missing value, or a delta that shrank)."""
    return None if a is None or b is None or a < 0 or b <= 0 else round(a / b, 3)


def storm_ratios(ds01: dict, plain: dict) -> dict:
    """DS01 / plain for the storm's comparable numbers."""
    busy_d, busy_p = ds01["api_users_during_storm"], plain["api_users_during_storm"]
    # like for like: DS01 starts fewer servers (the refused get none); plain's time
    # to as many servers ready as DS01 had
    plain_ready = sorted(u["done_at_s"] for u in plain["per_user"] if u["outcome"] == "ready")
    same = plain_ready[ds01["ready"] - 1] if 0 < ds01["ready"] <= len(plain_ready) else None
    return {
        "settled": ratio(ds01["settled_s"], plain["settled_s"]),
        "plain_same_count_ready_s": same,
        "settled_vs_plain_same_count": ratio(ds01["settled_s"], same),
        "api_p50_during_storm": ratio(busy_d["p50_ms"], busy_p["p50_ms"]),
        "api_p95_during_storm": ratio(busy_d["p95_ms"], busy_p["p95_ms"]),
        "hub_cpu_during_storm": ratio(ds01["hub_cpu_s"], plain["hub_cpu_s"]),
        "hub_cpu_per_server": ratio(ds01["hub_cpu_per_server_s"], plain["hub_cpu_per_server_s"]),
    }


def footprint_ratios(ds01: dict, plain: dict) -> dict:
    """DS01 / plain for the footprint's comparable numbers."""
    return {
        "hub_rss_delta": ratio(ds01["hub_rss_delta_mib"], plain["hub_rss_delta_mib"]),
        "proxy_rss_delta": ratio(ds01["proxy_rss_delta_mib"], plain["proxy_rss_delta_mib"]),
        "hub_cpu_idle": ratio(ds01["idle"]["cpu_percent"], plain["idle"]["cpu_percent"]),
        "hub_cpu_during_storm": ratio(ds01["storm_cpu_s"], plain["storm_cpu_s"]),
    }
