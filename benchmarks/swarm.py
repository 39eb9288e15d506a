"""ds01 on the test swarm against plain SwarmSpawner and single-engine DS01Spawner.

    flock /tmp/ds01-integration.lock sh -c 'scripts/swarm up && \
        .venv/bin/python -m benchmarks.swarm [--quick]; scripts/swarm down'

Root, the test swarm up (docs/swarm.md) and the machine's engine with the base
image (the single-engine runs). In one run, for each spawner: the spawn
latency with the image present (REST POST -> ready, median of N start/stop
cycles of one user), and a storm (STORM users started at once: wall time
until all are ready). Ratios are against plain SwarmSpawner and against
single-engine DS01Spawner. Raw numbers: benchmarks/results/swarm.json.

Plain SwarmSpawner cannot use the routing mesh here (no IPVS): it is given the
same host-mode port and reads its task's node and port the way ds01-swarm does
(`swarmservice.task_endpoint`); everything else is dockerspawner's own,
including its start_object's 1 s polling backoff.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import docker
from dockerspawner import SwarmSpawner

from ds01_spawner.identity import user_slug
from ds01_spawner.images import image_ref
from ds01_spawner.swarmservice import task_endpoint
from ds01_spawner.swarmspawner import DS01SwarmSpawner
from tests.multinode import swarm as swarm_infra

from .hub import (
    BENCH_PROJECT,
    PLAIN_USER,
    PhaseTimer,
    TimedDS01Spawner,
    _own_files,
    hub_config,
    log_to,
    running_hub,
)

HERE = Path(__file__).resolve().parent
HUB_IP = "198.18.0.1"


class TimedDS01SwarmSpawner(PhaseTimer, DS01SwarmSpawner):
    """ds01-swarm, timed."""


class TimedPlainSwarmSpawner(PhaseTimer, SwarmSpawner):
    """dockerspawner's SwarmSpawner, timed; the hub reaches it at its task's node."""

    async def get_ip_and_port(self):
        tasks = await self.docker("tasks", filters={"service": self.service_name})
        task = max(tasks, key=lambda t: t.get("CreatedAt", ""))
        node = await self.docker("inspect_node", task["NodeID"])
        return task_endpoint(task, node, self.port)


def _dirs(workdir: Path) -> dict[str, str]:
    return {"workspace_root": str(workdir / "workspaces"), "state_dir": str(workdir / "state")}


def configs(workdir: Path, up: dict) -> dict[str, dict]:
    swarm = hub_config(_dirs(workdir / "swarm"), base_image=up["base_image"])
    swarm["DS01SwarmSpawner"] = {**swarm.pop("DS01Spawner"), "registry": up["registry"]}
    swarm["JupyterHub"].update(
        spawner_class=TimedDS01SwarmSpawner, hub_ip=HUB_IP, hub_connect_ip=HUB_IP
    )
    plain = hub_config(_dirs(workdir / "plain"))
    ds01 = plain.pop("DS01Spawner")
    plain["JupyterHub"].update(
        spawner_class=TimedPlainSwarmSpawner, hub_ip=HUB_IP, hub_connect_ip=HUB_IP
    )
    plain["SwarmSpawner"] = {
        "image": up["base_image"],
        "start_timeout": ds01["start_timeout"],
        "http_timeout": ds01["http_timeout"],
        "extra_container_spec": {"user": PLAIN_USER},
        "extra_endpoint_spec": {
            "ports": [{"Protocol": "tcp", "TargetPort": 8888, "PublishMode": "host"}]
        },
    }
    single = hub_config(_dirs(workdir / "single"))
    single["JupyterHub"]["spawner_class"] = TimedDS01Spawner
    return {
        "ds01-swarm": _own_files(swarm, workdir / "swarm"),
        "plain-swarm": _own_files(plain, workdir / "plain"),
        "ds01-single": _own_files(single, workdir / "single"),
    }


async def measure(name: str, config: dict, engine, n: int, storm: int) -> dict:
    options = None if name == "plain-swarm" else {"project": BENCH_PROJECT, "type": "base"}
    async with running_hub(config, engine) as hub:
        user = hub.new_user(name.replace("-", ""))
        warm = await hub.start(user, BENCH_PROJECT, options)  # builds the image for ds01
        assert warm.ready, warm.message
        await hub.stop(user, BENCH_PROJECT)
        latencies = []
        for _ in range(n):
            spawn = await hub.start(user, BENCH_PROJECT, options)
            assert spawn.ready, spawn.message
            latencies.append(spawn.seconds)
            await hub.stop(user, BENCH_PROJECT)
        users = [hub.new_user(f"{name.replace('-', '')}s{i}") for i in range(storm)]
        if options is not None:  # the image present: the warm-up's, tagged for each
            source = image_ref(user_slug(user), BENCH_PROJECT)
            for u in users:
                repository, _, tag = image_ref(user_slug(u), BENCH_PROJECT).rpartition(":")
                await asyncio.to_thread(engine.api.tag, source, repository, tag)
        t0 = time.perf_counter()
        spawns = await asyncio.gather(*(hub.start(u, BENCH_PROJECT, options) for u in users))
        wall = time.perf_counter() - t0
        ready = sum(s.ready for s in spawns)
        for u in users:
            await hub.stop(u, BENCH_PROJECT)
    return {
        "spawn_s": latencies,
        "spawn_median_s": median(latencies),
        "storm_users": storm,
        "storm_ready": ready,
        "storm_wall_s": wall,
        "storm_median_s": median(s.seconds for s in spawns),
    }


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


async def run(n: int, storm: int) -> dict:
    layout = swarm_infra.Layout()
    up = swarm_infra.read_up(layout)
    if up is None:
        raise SystemExit("the test swarm is not up: scripts/swarm up")
    workdir = Path(tempfile.mkdtemp(prefix="ds01-bench-swarm-"))
    log_to(workdir / "hub.log")
    results = {}
    main_host = os.environ.pop("DOCKER_HOST", None)
    for name, config in configs(workdir, up).items():
        if name == "ds01-single":
            if main_host:
                os.environ["DOCKER_HOST"] = main_host
            else:
                os.environ.pop("DOCKER_HOST", None)
            engine = docker.from_env(timeout=120)
        else:
            os.environ["DOCKER_HOST"] = up["sockets"]["n1"]
            engine = docker.DockerClient(base_url=up["sockets"]["n1"], timeout=120)
        try:
            results[name] = await measure(name, config, engine, n, storm)
        finally:
            if name != "ds01-single":
                for service in engine.services.list():
                    service.remove()
            engine.close()
    s, p, d = results["ds01-swarm"], results["plain-swarm"], results["ds01-single"]
    results["ratios"] = {
        "spawn ds01-swarm / plain SwarmSpawner": ratio(s["spawn_median_s"], p["spawn_median_s"]),
        "spawn ds01-swarm / DS01Spawner": ratio(s["spawn_median_s"], d["spawn_median_s"]),
        "storm ds01-swarm / plain SwarmSpawner": ratio(s["storm_wall_s"], p["storm_wall_s"]),
        "storm ds01-swarm / DS01Spawner": ratio(s["storm_wall_s"], d["storm_wall_s"]),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 cycles, a storm of 4")
    parser.add_argument("--json", default=str(HERE / "results" / "swarm.json"))
    args = parser.parse_args()
    n, storm = (3, 4) if args.quick else (5, 8)
    results = asyncio.run(run(n, storm))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print("| Spawner | spawn, image present (median s) | storm: users ready / wall s |")
    print("| --- | --- | --- |")
    for name in ("ds01-swarm", "plain-swarm", "ds01-single"):
        r = results[name]
        print(
            f"| {name} | {r['spawn_median_s']:.2f} | "
            f"{r['storm_ready']}/{r['storm_users']} in {r['storm_wall_s']:.2f} |"
        )
    for what, value in results["ratios"].items():
        print(f"{what}: {value}")


if __name__ == "__main__":
    main()
