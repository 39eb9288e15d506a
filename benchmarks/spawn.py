"""Benchmark 1: sequential spawns with the image already built, DS01Spawner vs DockerSpawner.

Each spawn is timed as a client sees it (POST sent -> the server is ready)
and cut into rows that add up to that time: JupyterHub's own work before
start(), each docker call and each DS01 step inside start(), the rest of
start(), the server's boot (start() returned -> it first answers HTTP, polled
every 10 ms) and the hub noticing (its readiness check backs off with full
jitter, so this row is noise of up to seconds) plus adding the proxy route.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import median

from .hub import SERVER_ANSWERS, BenchHub, Event, Spawn

HUB_BEFORE = "hub: request -> start()"
START_REST = "start(): rest (python between awaits)"
TO_READY = "start() -> ready: server boots, hub polls, route"
BOOT = "start() -> server answers HTTP (boot)"
NOTICED = "server answers -> ready (hub's poll, proxy route)"
STOP_REST = "stop(): rest"
HUB_STOP = "hub: request -> stop() and after"


def start_rows(spawn: Spawn) -> dict[str, float]:
    """Rows (seconds) that add up to spawn.seconds, from the spawner's own events."""
    starts = [e for e in spawn.events if e.phase == "start()"]
    if not starts:
        return {}
    start = starts[-1]
    rows: dict[str, float] = defaultdict(float)
    inside = 0.0
    before = 0.0
    for e in spawn.events:
        if e is start or e.phase == SERVER_ANSWERS:
            continue
        if e.t0 >= start.t0 and e.t1 <= start.t1:
            rows[e.phase] += e.seconds
            inside += e.seconds
        elif e.t1 <= start.t0 and e.t0 >= spawn.t_post:
            rows[e.phase + " (before start)"] += e.seconds
            before += e.seconds
    rows[HUB_BEFORE] = start.t0 - spawn.t_post - before
    rows[START_REST] = start.seconds - inside
    answers = server_answers(spawn)
    if answers is None:
        rows[TO_READY] = spawn.t_done - start.t1
    else:
        rows[BOOT] = answers - start.t1
        rows[NOTICED] = spawn.t_done - answers
    return dict(rows)


def server_answers(spawn: Spawn) -> float | None:
    """When the single-user server first answered HTTP (perf_counter), if seen."""
    seen = [e.t1 for e in spawn.events if e.phase == SERVER_ANSWERS]
    return seen[-1] if seen else None


def stop_rows(seconds: float, events: list[Event]) -> dict[str, float]:
    stops = [e for e in events if e.phase == "stop()"]
    if not stops:
        return {}
    stop = stops[-1]
    rows: dict[str, float] = defaultdict(float)
    inside = 0.0
    for e in events:
        if e is not stop and e.t0 >= stop.t0 and e.t1 <= stop.t1:
            rows[e.phase] += e.seconds
            inside += e.seconds
    rows[STOP_REST] = stop.seconds - inside
    rows[HUB_STOP] = seconds - stop.seconds
    return dict(rows)


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    names = {name for r in rows for name in r}
    return {name: median(r.get(name, 0.0) for r in rows) for name in sorted(names)}


async def spawn_series(hub: BenchHub, user: str, options: dict | None, n: int) -> dict:
    """One warm-up start/stop, then `n` timed ones, all of the same user's default server."""
    warm = await hub.start(user, "", options)
    if not warm.ready:
        raise RuntimeError(f"warm-up spawn of {user} failed ({warm.status}): {warm.message}")
    container = hub.spawner(user).object_name
    await hub.stop(user)
    await hub.container_gone(container)
    series: dict = {"warmup_start_s": [warm.seconds], "start_profiles": [], "stop_profiles": []}
    keys = (
        "start_s",
        "to_server_answers_s",
        "start_call_s",
        "stop_s",
        "container_gone_after_stop_s",
    )
    for key in keys:
        series[key] = []
    for _ in range(n):
        spawn = await hub.start(user, "", options)
        if not spawn.ready:
            raise RuntimeError(f"spawn of {user} failed ({spawn.status}): {spawn.message}")
        series["start_s"].append(spawn.seconds)
        answers = server_answers(spawn)
        series["to_server_answers_s"].append(
            spawn.seconds if answers is None else answers - spawn.t_post
        )
        series["start_call_s"].append([e for e in spawn.events if e.phase == "start()"][-1].seconds)
        series["start_profiles"].append(start_rows(spawn))
        container = hub.spawner(user).object_name
        seconds, events = await hub.stop(user)
        series["stop_s"].append(seconds)
        series["stop_profiles"].append(stop_rows(seconds, events))
        # the next start would fail with a name conflict while the engine still removes it
        series["container_gone_after_stop_s"].append(await hub.container_gone(container))
    return series


def merge(sessions: list[dict]) -> dict:
    """Several hub sessions of one spawner as one series, with medians."""
    merged = {key: [x for s in sessions for x in s[key]] for key in sessions[0]}
    start_profiles, stop_profiles = merged.pop("start_profiles"), merged.pop("stop_profiles")
    return {
        **merged,
        "start_median_s": median(merged["start_s"]),
        "to_server_answers_median_s": median(merged["to_server_answers_s"]),
        "start_call_median_s": median(merged["start_call_s"]),
        "stop_median_s": median(merged["stop_s"]),
        "start_profile_median_s": medians(start_profiles),
        "stop_profile_median_s": medians(stop_profiles),
    }
