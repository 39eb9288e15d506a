"""The spawn plot, benchmarks/results/spawn_latency.png, from a run's results.

Left: every timed sequential spawn of benchmark 1 as a point (REST -> ready
and REST -> the server answers, per spawner), the median as a bar. Right:
the spawn storm, users settled (ready or refused) against seconds since the
storm began, DS01Spawner and plain DockerSpawner. matplotlib is the `bench`
extra (benchmarks/run installs it); without it there is no plot, and
`plot()` says so by returning None.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

SYSTEMS = (("ds01", "DS01Spawner", "tab:blue"), ("plain", "DockerSpawner", "tab:orange"))
MEASURES = (("start_s", "REST -> ready"), ("to_server_answers_s", "REST -> answers"))
OUTCOMES = (  # storm markers: (outcome, asked for a GPU), marker, legend text
    (("ready", False), "o", "ready"),
    (("ready", True), "^", "ready with a GPU"),
    (("refused", True), "x", "refused (no GPU free)"),
    (("refused", False), "x", "refused"),
    (("failed", True), "s", "failed"),
    (("failed", False), "s", "failed"),
)


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (spawns, storm) = plt.subplots(1, 2, figsize=(13, 5.5))
    m = results["machine"]
    fig.suptitle(
        f"ds01_spawner spawn benchmarks, {m['date']}, commit {m['commit']}, {m['cpus']} CPUs"
        f"{' (--quick)' if results['quick'] else ''}"
    )
    sequential(spawns, results["spawn"])
    storm_curve(storm, results["storm"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sequential(ax, spawn: dict) -> None:
    ticks, names = [], []
    for i, (measure, what) in enumerate(MEASURES):
        for j, (key, name, color) in enumerate(SYSTEMS):
            x = i * 3 + j * 1.2
            values = spawn[key][measure]
            offsets = [(k - (len(values) - 1) / 2) * 0.06 for k in range(len(values))]
            ax.scatter(
                [x + o for o in offsets],
                values,
                color=color,
                alpha=0.7,
                label=name if i == 0 else None,
            )
            mid = median(values)
            ax.hlines(mid, x - 0.3, x + 0.3, color=color, linewidth=2.5)
            ax.annotate(f"{mid:.2f} s", (x + 0.32, mid), va="center", fontsize=8, color=color)
            ticks.append(x)
            names.append(f"{name.replace('Spawner', '')}\n{what}")
    ax.set_xticks(ticks, names, fontsize=8)
    ax.set_xlim(-0.6, ticks[-1] + 0.9)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("seconds")
    ax.set_title(f"Sequential spawns, image built ({spawn['n']} each; bar: median)")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)


def storm_curve(ax, storms: dict) -> None:
    users = 0
    for key, name, color in SYSTEMS:
        storm = storms[key]
        users = max(users, storm["users"])
        done = sorted(storm["per_user"], key=lambda u: u["done_at_s"])
        times = [u["done_at_s"] for u in done]
        counts = list(range(1, len(done) + 1))
        asked = f", {storm['gpu_users']} ask a GPU" if storm["gpu_users"] else ""
        ax.step(times, counts, where="post", color=color, label=f"{name}{asked}")
        for kind, marker, what in OUTCOMES:
            picked = [
                (t, c)
                for t, c, u in zip(times, counts, done, strict=True)
                if (u["outcome"], u["gpu"]) == kind
            ]
            if picked:
                ax.scatter(
                    *zip(*picked, strict=True),
                    marker=marker,
                    color=color,
                    s=24,
                    label=f"{name}: {what} ({len(picked)})",
                )
    ax.axhline(users, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(left=0)
    ax.set_ylim(0, users + 1)
    ax.set_xlabel("seconds since the storm began")
    ax.set_ylabel("users settled (ready or refused)")
    ax.set_title(f"Spawn storm: {users} users start at once")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
