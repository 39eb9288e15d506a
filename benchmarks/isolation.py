"""Benchmark 4: does one user's long image build slow down everybody else?

In a DS01 hub, user B's project image is built (B's warm-up spawn builds it),
and B starts and stops its server `n` times in a row (REST start -> ready,
and -> the server first answers HTTP, as benchmark 1 times them) while a
separate process times `GET /hub/api/users` (benchmarks.probe): first with
nothing else going on, then while user A's first spawn of a new project
builds its image in the hub (DS01Spawner._ensure_image -> ImageBuilder).

A's project type, `slowbuild`, exists only here: `project_types_dir` points
at a copy of images/types plus `slowbuild/Dockerfile`, the base type's
Dockerfile with a `RUN` that keeps one CPU core busy for 45 s (a Python busy
loop: like a pip build, one core's work). A `LABEL` with this run's id right
after `FROM` makes every later step new, so the build never comes from the
cache; its image goes with A's objects at the end (and a sweep removes any
layer this run left). B's "with a build" spawns start once the build's busy
`RUN` step has started; a spawn counts as overlapped when it started and
ended while the build ran, and the API samples of that phase are those sent
while B spawned and the build still ran.

Target (the issue): with a build running, B's spawn time and the API's
latency within 1.2 times what they are without one.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from pathlib import Path
from statistics import median
from time import monotonic, perf_counter

import docker

from ds01_spawner.builds import Build
from ds01_spawner.identity import user_slug
from ds01_spawner.images import image_ref

from .footprint import CpuMeter
from .hub import BENCH_PROJECT, BenchHub, ds01_config, running_hub
from .probe import Probe, latencies, percentiles_ms
from .rebuild import REPO_ROOT, remove_run, with_run_id
from .spawn import server_answers
from .storm import ratio

TARGET_RATIO = 1.2
BURN_S = 45
SLOW_TYPE = "slowbuild"
# one core busy until the deadline; exec() because a `while` needs its own line
BURN_RUN = (
    "RUN python3 -c \"exec('import time\\nend = time.time() + {seconds}\\n"
    "while time.time() < end: pass')\""
)


def slow_types(directory: Path, run_id: str, burn_s: float) -> Path:
    """A copy of images/types with the `slowbuild` type added; returns the copy."""
    shutil.copytree(REPO_ROOT / "images" / "types", directory)
    base = (directory / "base" / "Dockerfile").read_text()
    slow = directory / SLOW_TYPE
    slow.mkdir()
    (slow / "Dockerfile").write_text(
        f"# Benchmark only: the base type plus {burn_s:g} s of one busy CPU core\n"
        + with_run_id(base, run_id)
        + BURN_RUN.format(seconds=burn_s)
        + "\n"
    )
    return directory


async def spawns(hub: BenchHub, user: str, n: int) -> list[dict]:
    """`n` starts and stops of `user`'s default server (B's bench project)."""
    series = []
    for _ in range(n):
        spawn = await hub.start(user, "", {"project": BENCH_PROJECT})
        if not spawn.ready:
            raise RuntimeError(f"spawn of {user} failed ({spawn.status}): {spawn.message}")
        answers = server_answers(spawn)
        series.append(
            {
                "start_s": spawn.seconds,
                "to_server_answers_s": (spawn.t_done if answers is None else answers)
                - spawn.t_post,
                "t_post": spawn.t_post,
                "t_done": spawn.t_done,
            }
        )
        container = hub.spawner(user).object_name
        await hub.stop(user)
        await hub.container_gone(container)
    return series


async def busy_step_started(hub: BenchHub, user: str, ref: str, spawn: asyncio.Future) -> Build:
    """The build of `ref` once its busy `RUN` step has begun."""
    deadline = perf_counter() + 300
    while perf_counter() < deadline:
        if spawn.done():
            raise RuntimeError(f"{user}'s spawn ended before its build got busy: {spawn.result()}")
        spawner = hub.app.users[user].spawners.get("")
        for build in spawner.builder.running() if spawner is not None else []:
            steps = [e.message for e in build.events if e.phase == "step"]
            if build.spec.image == ref and any("RUN python3" in s for s in steps):
                return build
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the build of {ref} did not reach its busy step in 300 s")


async def build_isolation(
    engine: docker.DockerClient, workdir: Path, n: int, burn_s: float = BURN_S
) -> dict:
    run_id = secrets.token_hex(4)
    types = slow_types(workdir / "types", run_id, burn_s)
    config = ds01_config(workdir, project_types_dir=str(types))
    slow_project = f"slow-{run_id}"
    a_slug = ""
    try:
        async with running_hub(config, engine) as hub:
            b, a = hub.new_user("b"), hub.new_user("a")
            a_slug = user_slug(a)
            warm = await hub.start(b, "", {"project": BENCH_PROJECT})  # builds B's image
            if not warm.ready:
                raise RuntimeError(f"warm-up spawn of {b} failed ({warm.status}): {warm.message}")
            container = hub.spawner(b).object_name
            await hub.stop(b)
            await hub.container_gone(container)

            probe = await Probe.start(hub.api_url.rstrip("/") + "/users", hub.token)
            try:
                await asyncio.sleep(1.0)
                quiet_from, quiet_cpu = monotonic(), CpuMeter()
                quiet = await spawns(hub, b, n)
                quiet_to, quiet_cpu = monotonic(), quiet_cpu.read()

                a_spawn = asyncio.ensure_future(
                    hub.start(a, "", {"project": slow_project, "type": SLOW_TYPE})
                )
                ref = image_ref(a_slug, slow_project)
                build = await busy_step_started(hub, a, ref, a_spawn)
                busy_from, busy_step_at, busy_cpu = monotonic(), perf_counter(), CpuMeter()
                build_done = asyncio.ensure_future(build.done.wait())
                build_end: dict[str, float] = {}
                build_done.add_done_callback(
                    lambda _: build_end.update(perf=perf_counter(), mono=monotonic())
                )
                busy = await spawns(hub, b, n)
                busy_to, busy_cpu = monotonic(), busy_cpu.read()
                a_result = await a_spawn
            finally:
                samples = await probe.finish()
            if not a_result.ready:
                raise RuntimeError(f"{a}'s slow build/spawn failed: {a_result.message}")
            await hub.stop(a)
    finally:
        if a_slug:
            await asyncio.to_thread(remove_run, engine.api, f"ds01-{a_slug}/", run_id)

    build_perf_end = build_end.get("perf", perf_counter())
    overlapped = sum(s["t_post"] >= busy_step_at and s["t_done"] <= build_perf_end for s in busy)
    api_quiet = percentiles_ms(latencies(samples, quiet_from, quiet_to))
    api_busy = percentiles_ms(
        latencies(samples, busy_from, min(busy_to, build_end.get("mono", busy_to)))
    )
    quiet_answers = median(s["to_server_answers_s"] for s in quiet)
    busy_answers = median(s["to_server_answers_s"] for s in busy)

    return {
        "n": n,
        "burn_s": burn_s,
        "run_id": run_id,
        "target_ratio": TARGET_RATIO,
        "without_build": strip_times(quiet),
        "with_build": strip_times(busy),
        "to_server_answers_median_s": {"without": quiet_answers, "with": busy_answers},
        "start_median_s": {
            "without": median(s["start_s"] for s in quiet),
            "with": median(s["start_s"] for s in busy),
        },
        "spawn_ratio": ratio(busy_answers, quiet_answers),
        "start_ratio": ratio(
            median(s["start_s"] for s in busy), median(s["start_s"] for s in quiet)
        ),
        "api_users_without_build": api_quiet,
        "api_users_with_build": api_busy,
        "api_p50_ratio": ratio(api_busy["p50_ms"], api_quiet["p50_ms"]),
        "api_p95_ratio": ratio(api_busy["p95_ms"], api_quiet["p95_ms"]),
        # where the time goes: the hub's own CPU, and how busy the whole machine was
        "cpu_without_build": quiet_cpu,
        "cpu_with_build": busy_cpu,
        "spawns_overlapping_build": overlapped,
        # from the busy step's start: the build's end, and B's spawns' end
        "build_ran_on_s": round(build_perf_end - busy_step_at, 2),
        "spawns_took_s": round(max(s["t_done"] for s in busy) - busy_step_at, 2),
        "slow_build_spawn_s": a_result.seconds,
    }


def strip_times(series: list[dict]) -> list[dict]:
    """The spawns without their clock readings (meaningless outside this run)."""
    return [{k: v for k, v in s.items() if not k.startswith("t_")} for s in series]
