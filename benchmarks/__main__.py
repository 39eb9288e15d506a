"""Run every benchmark, print the table, write benchmarks/results/latest.json.

Use `benchmarks/run [--quick]` (it prepares the machine first); this module is
what it runs: `python -m benchmarks [--quick] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from statistics import median

import docker

from ds01_spawner.identity import user_slug
from ds01_spawner.images import image_ref

from .allocator import allocator_times
from .hub import BENCH_PROJECT, ds01_config, log_to, plain_config, running_hub, sweep
from .isolation import build_isolation
from .plot import plot
from .rebuild import rebuild_times
from .spawn import NOTICED, merge, spawn_series
from .storm import footprint_ratios, storm_and_footprint, storm_ratios

HERE = Path(__file__).resolve().parent
TARGET_START_RATIO = 1.10  # the issue: DS01 spawns within 10% of plain DockerSpawner
# issue 13: ready the moment the server answers (start()'s own probe), so REST -> ready
# beats plain DockerSpawner, which waits out the hub's poll backoff
TARGET_READY_RATIO = 0.85
TARGET_READY_LAG_S = 0.10
STORM_USERS, STORM_GPU_USERS, STORM_GPUS = 30, 15, 4
LABEL = {"plain": "plain DockerSpawner", "ds01": "DS01Spawner (its warm-up builds the image)"}
STEPS = 6


def machine(engine: docker.DockerClient) -> dict:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True)
        return out.stdout.strip()

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git("rev-parse", "--short", "HEAD"),
        "worktree_dirty": bool(git("status", "--porcelain", "--", "ds01_spawner")),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "docker_engine": engine.version().get("Version"),
        "jupyterhub": version("jupyterhub"),
        "dockerspawner": version("dockerspawner"),
    }


async def run_all(quick: bool) -> dict:
    started = time.monotonic()
    engine = docker.from_env(timeout=120)
    n = 3 if quick else 5
    results: dict = {"quick": quick, "machine": machine(engine), "swept_leftovers": sweep(engine)}
    workdir = Path(tempfile.mkdtemp(prefix="ds01-bench-"))
    log_to(workdir / "hub.log")
    ok = False
    storm: dict[str, dict] = {}
    footprint: dict[str, dict] = {}
    try:
        # ABBA order (plain, ds01, ds01, plain): a machine getting slower or faster
        # during the run (other work on it, caches) favours neither spawner
        sessions: dict[str, list[dict]] = {"plain": [], "ds01": []}
        rounds = [(("plain", "ds01"), (n + 1) // 2), (("ds01", "plain"), n // 2)]
        for r, (order, count) in enumerate(rounds):
            last = r == len(rounds) - 1  # the storms reuse the last sessions' hubs
            for kind in order:
                step(1, f"spawn latency: {LABEL[kind]}, 1 warm-up + {count}")
                if kind == "plain":
                    async with running_hub(plain_config(workdir / f"plain{r}"), engine) as hub:
                        sessions[kind].append(
                            await spawn_series(hub, hub.new_user("p"), None, count)
                        )
                        if last:
                            step(2, f"spawn storm, then {STORM_USERS} servers idle: {LABEL[kind]}")
                            storm[kind], footprint[kind] = await storm_and_footprint(
                                hub, tag="q", users=STORM_USERS, api_idle_s=1.0 if quick else 2.0
                            )
                    continue
                config = ds01_config(
                    workdir / f"ds01{r}",
                    simulated_gpus=STORM_GPUS,
                    policy={"defaults": {"max_gpus": 1}},
                )
                async with running_hub(config, engine) as hub:
                    user = hub.new_user("d")
                    options = {"project": BENCH_PROJECT}
                    sessions[kind].append(await spawn_series(hub, user, options, count))
                    if last:  # every storm user's image: this user's, tagged
                        step(2, f"spawn storm, then {STORM_USERS} servers idle: DS01Spawner")
                        storm[kind], footprint[kind] = await storm_and_footprint(
                            hub,
                            tag="s",
                            users=STORM_USERS,
                            gpu_users=STORM_GPU_USERS,
                            gpus=STORM_GPUS,
                            source_image=image_ref(user_slug(user), BENCH_PROJECT),
                            api_idle_s=1.0 if quick else 2.0,
                        )
        ds01, plain = merge(sessions["ds01"]), merge(sessions["plain"])
        results["spawn"] = spawn_summary(ds01, plain, n)
        results["storm"] = {**storm, "ratios": storm_ratios(storm["ds01"], storm["plain"])}
        results["footprint"] = {
            **footprint,
            "ratios": footprint_ratios(footprint["ds01"], footprint["plain"]),
        }
        step(3, f"build isolation: user B's {n} spawns without, then with, a long build")
        results["isolation"] = await build_isolation(engine, workdir / "isolation", n)
        step(4, "allocator decision time")
        results["allocator"] = allocator_times(200)
        step(5, "rebuild after adding one package vs. a cold build")
        results["rebuild"] = await rebuild_times()
        ok = True
    finally:
        sweep(engine)
        engine.close()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"benchmark failed; the hub's log is in {workdir}/hub.log", file=sys.stderr)
    results["runtime_s"] = round(time.monotonic() - started, 1)
    return results


def step(i: int, what: str) -> None:
    print(f"[{i}/{STEPS}] {what}", flush=True)


def spawn_summary(ds01: dict, plain: dict, n: int) -> dict:
    a, b = ds01["start_profile_median_s"], plain["start_profile_median_s"]
    rows = [
        {"row": name, "ds01_s": a.get(name, 0.0), "plain_s": b.get(name, 0.0)}
        for name in sorted(set(a) | set(b))
    ]
    for r in rows:
        r["extra_s"] = r["ds01_s"] - r["plain_s"]
    rows.sort(key=lambda r: r["extra_s"], reverse=True)
    return {
        "n": n,
        "ds01": ds01,
        "plain": plain,
        "start_ratio": ds01["start_median_s"] / plain["start_median_s"],
        "to_server_answers_ratio": ds01["to_server_answers_median_s"]
        / plain["to_server_answers_median_s"],
        "stop_ratio": ds01["stop_median_s"] / plain["stop_median_s"],
        "start_call_ratio": ds01["start_call_median_s"] / plain["start_call_median_s"],
        "target_start_ratio": TARGET_START_RATIO,
        "start_profile": rows,
    }


def table(r: dict) -> str:
    s, al = r["spawn"], r["allocator"]
    m = r["machine"]
    extra = s["ds01"]["start_median_s"] - s["plain"]["start_median_s"]
    top = ", ".join(
        f"{r['row']} {r['extra_s']:+.3f} s" for r in s["start_profile"][:3] if r["extra_s"] > 0
    )
    lines = [
        f"ds01_spawner benchmarks  {m['date']}  commit {m['commit']}"
        f"{' (+ uncommitted spawner changes)' if m['worktree_dirty'] else ''}",
        f"  {m['cpus']} cpus, docker {m['docker_engine']}, jupyterhub {m['jupyterhub']}, "
        f"dockerspawner {m['dockerspawner']}; runtime {r['runtime_s']:.0f} s"
        f"{', --quick' if r['quick'] else ''}",
        "",
        f"1. Spawn latency, image built: median of {s['n']} (REST start -> ready), after warm-ups",
        f"   {'':24}{'DS01Spawner':>12}{'DockerSpawner':>15}{'ratio':>8}",
        compare("start: REST -> ready", s["ds01"]["start_median_s"], s["plain"]["start_median_s"])
        + f"   target <= {TARGET_READY_RATIO:.2f}: "
        + verdict(s["start_ratio"], TARGET_READY_RATIO),
        f"   {'  answers -> ready (lag)':24}{lag(s, 'ds01'):>10.2f} s{lag(s, 'plain'):>13.2f} s"
        + f"{'':8}   target <= {TARGET_READY_LAG_S:.2f} s: "
        + verdict(lag(s, "ds01"), TARGET_READY_LAG_S),
        compare(
            "  -> server answers",
            s["ds01"]["to_server_answers_median_s"],
            s["plain"]["to_server_answers_median_s"],
        )
        + f"   target <= {TARGET_START_RATIO:.2f}: {verdict(s['to_server_answers_ratio'])}"
        "  (no hub poll jitter)",
        compare(
            "  of which start() call",
            s["ds01"]["start_call_median_s"],
            s["plain"]["start_call_median_s"],
        )
        + "   (the spawner's own work)",
        compare("stop", s["ds01"]["stop_median_s"], s["plain"]["stop_median_s"]),
        compare(
            "first start (warm-up)",
            median(s["ds01"]["warmup_start_s"]),
            median(s["plain"]["warmup_start_s"]),
        )
        + "   (DS01's includes its image build)",
        f"   {'container gone after stop':24}{gone(s['ds01']):>9.0f} ms{gone(s['plain']):>12.0f} ms"
        "          (engine's auto_remove, after the hub says stopped)",
        f"   every start, REST -> ready (s): DS01 {spread(s['ds01']['start_s'])}; "
        f"plain {spread(s['plain']['start_s'])}",
        f"   DS01 extra per start: {extra:+.3f} s; top contributors: {top}",
        "   where the start time goes (median s per spawn; sorted by DS01 extra):",
        f"   {'':52}{'DS01':>7}{'plain':>7}{'extra':>8}",
    ]
    for row in s["start_profile"]:
        lines.append(
            f"   {row['row'][:52]:52}{row['ds01_s']:>7.3f}{row['plain_s']:>7.3f}"
            f"{row['extra_s']:>+8.3f}"
        )
    lines += ["", *storm_table(r["storm"]), "", *footprint_table(r["footprint"])]
    lines += ["", *isolation_table(r["isolation"])]
    lines += [
        "",
        f"5. Allocator decision time: {al['gpus']} GPUs ({al['slots']} slots incl. MIG), "
        f"{al['holders']} ledger entries",
    ]
    for key, label in [
        ("choose_whole_gpu", "choose(), 1 whole GPU"),
        ("choose_mig_slice", "choose(), 1 MIG slice"),
        ("holders_from_1000_containers", "holders_from_containers(1,000)"),
        ("ledger_plus_choose", "both (one spawn's decision)"),
    ]:
        t = al[key]
        lines.append(
            f"   {label:34} median {t['median_us']:>8.1f} us   p95 {t['p95_us']:>8.1f} us"
            f"   ({t['calls']} calls)"
        )
    lines += ["", *rebuild_table(r["rebuild"])]
    lines += ["", f"plot: {r['plot'] or 'none (matplotlib is not installed)'}"]
    for kind in ("ds01", "plain"):
        failures = r["storm"][kind]["failures"] + r["footprint"][kind]["restart_failures"]
        if failures:
            lines += ["", f"{kind} storm failures:", *(f"   {f}" for f in failures)]
    return "\n".join(lines)


def storm_table(st: dict) -> list[str]:
    d, p, q = st["ds01"], st["plain"], st["ratios"]
    idle_d, idle_p = d["api_users_idle"], p["api_users_idle"]
    busy_d, busy_p = d["api_users_during_storm"], p["api_users_during_storm"]
    expect_refused = d["gpu_users"] - d["simulated_gpus"]
    return [
        f"2. Spawn storm: {d['users']} users start at once. DS01: {d['gpu_users']} ask for a GPU"
        f" ({d['simulated_gpus']} simulated, limit 1 per user), {d['users'] - d['gpu_users']}"
        " ask nothing; plain: no options",
        f"   {'':36}{'DS01Spawner':>12}{'DockerSpawner':>15}{'ratio':>8}",
        triple("all ready or refused", d["settled_s"], p["settled_s"], "s", q["settled"]),
        triple(
            f"  plain: {d['ready']} ready (as many as DS01)",
            d["settled_s"],
            q["plain_same_count_ready_s"],
            "s",
            q["settled_vs_plain_same_count"],
        ),
        triple("median POST -> ready", d["ready_median_s"], p["ready_median_s"], "s"),
        triple(
            "GET /hub/api/users p50, storm",
            busy_d["p50_ms"],
            busy_p["p50_ms"],
            "ms",
            q["api_p50_during_storm"],
            1,
        ),
        triple(
            "GET /hub/api/users p95, storm",
            busy_d["p95_ms"],
            busy_p["p95_ms"],
            "ms",
            q["api_p95_during_storm"],
            1,
        ),
        triple("  p50 before the storm", idle_d["p50_ms"], idle_p["p50_ms"], "ms", digits=1),
        triple("  p95 before the storm", idle_d["p95_ms"], idle_p["p95_ms"], "ms", digits=1),
        triple(
            "hub CPU during the storm",
            d["hub_cpu_s"],
            p["hub_cpu_s"],
            "s",
            q["hub_cpu_during_storm"],
        ),
        triple(
            "  per server started",
            d["hub_cpu_per_server_s"],
            p["hub_cpu_per_server_s"],
            "s",
            q["hub_cpu_per_server"],
            3,
        ),
        triple(
            "machine CPU busy (all cores)",
            d["machine_busy_percent"],
            p["machine_busy_percent"],
            "%",
            digits=0,
        ),
        f"   DS01: ready {d['ready_cpu']} CPU-only (expect {d['users'] - d['gpu_users']}) + "
        f"{d['ready_gpu']} with a GPU (expect {d['simulated_gpus']}), refused {d['refused']} "
        f"(expect {expect_refused}), other failures {d['failed']}; "
        f"GPUs given twice: {d['gpus_given_twice']} (must be 0)",
        f"   plain: ready {p['ready']} (expect {p['users']}), other failures {p['failed']}; "
        f"DS01 median POST -> refusal {fmt_s(d['refused_median_s'])}",
        f"   POST answers: DS01 {d['post_status_codes']}, plain {p['post_status_codes']}; "
        f"API samples: {busy_d['n']} / {busy_p['n']} in the storm, errors "
        f"{d['api_errors']} / {p['api_errors']}",
        f"   refusal says: {d['refusal_example'][:150]}",
    ]


def footprint_table(fp: dict) -> list[str]:
    d, p, q = fp["ds01"], fp["plain"], fp["ratios"]
    di, pi = d["idle"], p["idle"]
    return [
        f"3. The hub process with {d['running']} / {p['running']} servers running (the hub runs "
        "in the benchmark's process: compare the deltas; its CPU in the storm: see 2)",
        f"   {'':36}{'DS01Spawner':>12}{'DockerSpawner':>15}{'ratio':>8}",
        *rss_rows(d, p, "hub", " (before storm)", q["hub_rss_delta"]),
        triple(
            f"hub CPU, idle {di['window_s']:.0f} s window",
            di["cpu_percent"],
            pi["cpu_percent"],
            "%",
            q["hub_cpu_idle"],
        ),
        *rss_rows(d, p, "proxy", "", q["proxy_rss_delta"]),
        f"   idle window: poll_interval {di['poll_interval_s']} s; servers polled in it: DS01 "
        f"{di['servers_polled']}/{d['running']}, plain {pi['servers_polled']}/{p['running']}; "
        f"DS01 restarted its {d['restarted']} refused users without a GPU first",
    ]


def rss_rows(d: dict, p: dict, process: str, when: str, ratio: float) -> list[str]:
    """A process's RSS with 0 servers, with them running, and the growth, DS01 and plain."""
    key = f"{process}_rss_mib"
    return [
        triple(
            f"{process} RSS, 0 servers{when}", d["before"][key], p["before"][key], "MiB", digits=1
        ),
        triple(
            f"{process} RSS, servers running", d["after"][key], p["after"][key], "MiB", digits=1
        ),
        triple(
            "  delta", d[f"{process}_rss_delta_mib"], p[f"{process}_rss_delta_mib"], "MiB", ratio, 1
        ),
    ]


def isolation_table(iso: dict) -> list[str]:
    a, b = iso["api_users_without_build"], iso["api_users_with_build"]
    target = iso["target_ratio"]
    s, t = iso["to_server_answers_median_s"], iso["start_median_s"]
    qc, bc = iso["cpu_without_build"], iso["cpu_with_build"]

    def check(ratio: float | None) -> str:
        return "-" if ratio is None else "ok" if ratio <= target else "OVER"

    overlap = (
        f"all {iso['n']} of B's spawns ran inside the build"
        if iso["spawns_overlapping_build"] == iso["n"]
        else f"only {iso['spawns_overlapping_build']} of B's {iso['n']} spawns ran inside the"
        " build (it ended first)"
    )
    return [
        f"4. Build isolation: user B spawns {iso['n']} times with no build running, then while "
        f"user A's first spawn builds an image (one CPU core busy {iso['burn_s']:g} s)",
        f"   {'':36}{'no build':>12}{'build':>15}{'ratio':>8}   target <= {target:.2f}",
        triple(
            "B: REST -> server answers, median", s["without"], s["with"], "s", iso["spawn_ratio"]
        )
        + f"   {check(iso['spawn_ratio'])}",
        triple("B: REST -> ready, median", t["without"], t["with"], "s", iso["start_ratio"])
        + f"   {check(iso['start_ratio'])}  (hub poll jitter)",
        triple("GET /hub/api/users p50", a["p50_ms"], b["p50_ms"], "ms", iso["api_p50_ratio"], 1)
        + f"   {check(iso['api_p50_ratio'])}",
        triple("GET /hub/api/users p95", a["p95_ms"], b["p95_ms"], "ms", iso["api_p95_ratio"], 1)
        + f"   {check(iso['api_p95_ratio'])}",
        f"   {overlap}: the build ran {iso['build_ran_on_s']:.1f} s from its busy step, B's "
        f"spawns took {iso['spawns_took_s']:.1f} s; API samples {a['n']} / {b['n']}; "
        f"A's spawn (build + start) {iso['slow_build_spawn_s']:.1f} s",
        f"   CPU while B spawned: hub process {qc['hub_cpu_percent']:.0f}% -> "
        f"{bc['hub_cpu_percent']:.0f}% of a core, machine {qc['machine_busy_percent']:.0f}% -> "
        f"{bc['machine_busy_percent']:.0f}% of all cores",
        "   every B spawn, REST -> server answers (s): no build "
        + spread([x["to_server_answers_s"] for x in iso["without_build"]])
        + "; build "
        + spread([x["to_server_answers_s"] for x in iso["with_build"]]),
    ]


def triple(
    label: str,
    ds01: float | None,
    plain: float | None,
    unit: str,
    ratio: float | None = None,
    digits: int = 2,
) -> str:
    """`   label      12.34 s      10.00 s    1.23`: two values and, if given, their ratio."""

    def value(x: float | None) -> str:
        return "-" if x is None else f"{x:.{digits}f} {unit}"

    shown = "" if ratio is None else f"{ratio:>8.2f}"
    return f"   {label:36}{value(ds01):>12}{value(plain):>15}{shown}"


def rebuild_table(rb: dict) -> list[str]:
    b = rb["builds"]
    cold, rebuild, unchanged = b["cold_b"], b["rebuild_b"], b["unchanged_a"]
    t = rebuild["seconds_by_kind"]
    return [
        "6. Rebuild after adding one package vs. a cold build of the same Dockerfile, one run",
        f"   {rb['template']} + {len(rb['packages_a'])} pip packages (a RUN each; tiny wheels"
        f" from a local index), then {rb['added']} added",
        f"   {'cold build (nocache)':34}{cold['seconds']:>7.2f} s   {ran(cold)}",
        f"   {'rebuild after adding ' + rb['added']:34}{rebuild['seconds']:>7.2f} s   "
        f"{ran(rebuild)}   ratio {rb['ratio']:.2f}",
        f"   {'same Dockerfile again, no change':34}{unchanged['seconds']:>7.2f} s   "
        f"{ran(unchanged)}",
        f"   {'first build (warm-up, no cache)':34}{b['warmup_a']['seconds']:>7.2f} s   "
        f"{ran(b['warmup_a'])}",
        f"   the rebuild's time: the new RUN {t['run']:.2f} s, other steps that ran "
        f"{t['meta']:.2f} s, cached steps {t['cached']:.2f} s, outside steps "
        f"{t['outside steps']:.2f} s",
        "   only the new package's RUN ran in the rebuild: "
        + ("yes" if rb["only_new_run_ran"] else "NO"),
    ]


def ran(build: dict) -> str:
    """`8 steps ran (1 RUN, 7 LABEL), 7 cached`"""
    kinds = Counter(["RUN"] * len(build["ran_run_steps"]))
    kinds.update(step.split(" ", 1)[0] for step in build["ran_meta_steps"])
    detail = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    return f"{build['ran']} steps ran ({detail}), {build['cached']} cached"


def compare(label: str, ds01: float, plain: float) -> str:
    return f"   {label:24}{ds01:>10.2f} s{plain:>13.2f} s{ds01 / plain:>8.2f}"


def spread(seconds: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in seconds)


def verdict(ratio: float, target: float = TARGET_START_RATIO) -> str:
    return "ok" if ratio <= target else "OVER"


def lag(s: dict, spawner: str) -> float:
    """Median seconds from the server's first answer to the hub calling it ready."""
    rows = {r["row"]: r[f"{spawner}_s"] for r in s["start_profile"]}
    return rows.get(NOTICED, float("nan"))


def gone(series: dict) -> float:
    return median(series["container_gone_after_stop_s"]) * 1000


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 spawns each instead of 5")
    parser.add_argument(
        "--json", default=str(HERE / "results" / "latest.json"), help="where the numbers go"
    )
    args = parser.parse_args()
    results = asyncio.run(run_all(args.quick))
    out = Path(args.json)
    step(6, "plot")
    drawn = plot(results, out.with_name("spawn_latency.png"))
    if drawn is None:
        print("   no plot: matplotlib is not installed (pip install -e '.[bench]')", flush=True)
    results["plot"] = os.path.relpath(drawn, HERE.parent) if drawn else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)
    print()
    print(table(results))
    print(f"\nraw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
