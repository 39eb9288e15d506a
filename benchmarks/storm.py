"""Benchmark 2: many users ask for a GPU at the same moment.

Every user's project image already exists (the benchmark project's image,
tagged under each user's name, as `docker tag` would), so the storm measures
the GPU decision and the container starts, not builds. The hub API is timed
from another process the whole time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from statistics import median, quantiles
from time import monotonic, perf_counter

import docker

from ds01_spawner import labels
from ds01_spawner.identity import user_slug
from ds01_spawner.images import image_ref

from .hub import BenchHub, TimedDS01Spawner

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Probe:
    """`benchmarks.probe` in a child process: GET a hub URL in a loop, timed."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, token: str, interval: float = 0.1) -> Probe:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.probe",
            url,
            str(interval),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
            env={**os.environ, "DS01_BENCH_TOKEN": token},
        )
        return cls(process)

    async def finish(self) -> list[list[float]]:
        self.process.stdin.close()
        out, _ = await self.process.communicate()
        return json.loads(out or b"[]")


def percentiles_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    cuts = quantiles(seconds, n=20, method="inclusive") if len(seconds) > 1 else seconds * 19
    return {
        "n": len(seconds),
        "p50_ms": round(median(seconds) * 1000, 1),
        "p95_ms": round(cuts[18] * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
    }


def gpus_given_twice(engine: docker.DockerClient, users: set[str]) -> tuple[int, int]:
    """(GPU hand-outs beyond the first per UUID, running containers holding GPUs)."""
    running = engine.containers.list(filters={"label": [labels.GPU_UUIDS], "status": "running"})
    mine = [c for c in running if c.labels.get(labels.USER) in users]
    held = Counter(u for c in mine for u in c.labels[labels.GPU_UUIDS].split(",") if u)
    return sum(n - 1 for n in held.values() if n > 1), len(mine)


async def spawn_storm(
    hub: BenchHub, source_image: str, *, users: int = 20, gpus: int = 4, idle_s: float = 2.0
) -> dict:
    names = [hub.new_user(f"s{i:02d}") for i in range(users)]
    project = TimedDS01Spawner.default_project.default_value  # the default server's project
    tags = [image_ref(user_slug(u), project) for u in names]
    for tag in tags:
        repository, _, version = tag.rpartition(":")
        hub.engine.api.tag(source_image, repository, version)
    options = {"gpus": 1}
    users_url = hub.api_url.rstrip("/") + "/users"
    try:
        probe = await Probe.start(users_url, hub.token)
        await asyncio.sleep(idle_s)  # the API's latency before the storm, for comparison
        storm_from = monotonic()
        t0 = perf_counter()
        spawns = await asyncio.gather(*(hub.start(u, "", options) for u in names))
        settled = perf_counter() - t0
        storm_to = monotonic()
        samples = await probe.finish()
        twice, holding = gpus_given_twice(hub.engine, set(names))

        ready = [s for s in spawns if s.ready]
        refused = [s for s in spawns if not s.ready and "gpu" in s.message.lower()]
        failed = [s for s in spawns if not s.ready and s not in refused]
        idle = [dt for sent, dt, status in samples if status == 200 and sent < storm_from]
        during = [
            dt for sent, dt, status in samples if status == 200 and storm_from <= sent <= storm_to
        ]
        result = {
            "users": users,
            "simulated_gpus": gpus,
            "settled_s": settled,
            "ready": len(ready),
            "refused": len(refused),
            "failed": len(failed),
            "gpus_given_twice": twice,
            "containers_holding_gpus": holding,
            "ready_median_s": median(s.seconds for s in ready) if ready else None,
            "refused_median_s": median(s.seconds for s in refused) if refused else None,
            "post_status_codes": dict(Counter(str(s.status) for s in spawns)),
            "refusal_example": refused[0].message if refused else "",
            "failures": [f"{s.user}: {s.status} {s.message}"[:300] for s in failed],
            "api_users_idle": percentiles_ms(idle),
            "api_users_during_storm": percentiles_ms(during),
            "api_errors": sum(1 for _, _, status in samples if status != 200),
        }
        await asyncio.gather(*(hub.stop(s.user) for s in ready))
        return result
    finally:
        for tag in tags:
            with contextlib.suppress(docker.errors.APIError):
                hub.engine.images.remove(tag)
