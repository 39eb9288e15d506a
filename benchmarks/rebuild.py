"""Benchmark 4: the rebuild after adding one package vs. a cold build of the same Dockerfile.

The real code path of the image-update page: `dockerfile.add_packages` edits
the base project type's Dockerfile (each pip package its own `RUN`), and
`builds.ImageBuilder` builds it with the labels and build args the page
passes. The packages are tiny wheels served from a package index on
127.0.0.1 (builds use host networking), so pip's own work is small and the
numbers are mostly the engine's: a container per `RUN`, a commit per step.

Dockerfile A is the template with 4 packages, B is A plus a fifth. A is built
once first (its layers are then in the cache, as after any earlier build of
the project). Then, timed:

- cold: B with ``nocache=True`` (every step runs), tagged under its own name;
  that image and its whole layer chain are removed straight after, or the
  rebuild below would find B's new layer in it;
- A again (nothing changed: all cached), then B: the rebuild after adding one
  package, where only the new `RUN` should run (checked: the steps that ran
  and those that were cached are counted from the build's log).

Every step after `FROM` carries this run's id (a `LABEL` line), so no layer
of an earlier run is ever reused. Image names are `ds01-bench-<hex>/...`; all
tags made are removed at the end (and the hub's sweep removes them after an
interrupted run: the images carry a `bench-` user label).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
from pathlib import Path
from time import perf_counter

import docker
import docker.errors

from ds01_spawner import labels
from ds01_spawner.builds import Build, ImageBuilder
from ds01_spawner.dockerfile import add_packages
from ds01_spawner.engine import docker_client
from ds01_spawner.images import BuildSpec, dockerfile_digest, image_ref
from tests.pkgindex import PackageIndex

from .hub import BASE_IMAGE

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "images" / "types" / "base" / "Dockerfile"
PACKAGES = ("dbencha", "dbenchb", "dbenchc", "dbenchd")  # in Dockerfile A
ADDED = "dbenche"  # the one package B adds
PROJECT_TYPE = "base"


def with_run_id(template: str, run_id: str) -> str:
    """The template with a `LABEL` carrying the run id right after its `FROM`."""
    lines = template.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().upper().startswith("FROM "):
            lines.insert(i + 1, f"LABEL bench.ds01.run={run_id}\n")
            return "".join(lines)
    raise ValueError(f"{TEMPLATE} has no FROM line")


class TimedBuild:
    """A build, with the moment each of its events reached the event loop."""

    def __init__(self, build: Build) -> None:
        self.build = build
        self.t0 = perf_counter()
        self.times: list[float] = []
        self._follower = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        async for _ in self.build.follow():
            self.times.append(perf_counter())

    async def wait(self) -> dict:
        await self.build.wait()
        seconds = perf_counter() - self.t0
        await self._follower
        return summary(seconds, self.steps())

    def steps(self) -> list[dict]:
        """Each `Step N/M`: instruction, kind, seconds (to the next step or the build's end).

        kind: ``cached`` (the classic builder logged ` ---> Using cache`), ``run``
        (a `RUN` that ran), ``meta`` (another instruction that made a layer:
        LABEL, USER, ARG, ...), ``no-layer`` (`FROM` and the `ARG`s before it).
        """
        steps: list[dict] = []
        end = self.times[-1] if self.times else self.t0
        seen_from = False
        for event, t in zip(self.build.events, self.times, strict=False):
            if event.phase == "step":
                if steps:
                    steps[-1]["seconds"] = t - steps[-1]["seconds"]
                instruction = event.message.partition(" : ")[2]
                keyword = instruction.split(" ", 1)[0].upper()
                no_layer = keyword == "FROM" or (keyword == "ARG" and not seen_from)
                seen_from = seen_from or keyword == "FROM"
                kind = "no-layer" if no_layer else "run" if keyword == "RUN" else "meta"
                steps.append({"instruction": instruction, "kind": kind, "seconds": t})
            elif event.phase == "log" and steps and "Using cache" in event.message:
                steps[-1]["kind"] = "cached"
        if steps:
            steps[-1]["seconds"] = end - steps[-1]["seconds"]
        return steps


def summary(seconds: float, steps: list[dict]) -> dict:
    kinds = ("cached", "run", "meta", "no-layer")
    by_kind = {k: [s for s in steps if s["kind"] == k] for k in kinds}
    in_steps = {k: sum(s["seconds"] for s in v) for k, v in by_kind.items()}
    return {
        "seconds": seconds,
        "steps": len(steps),
        "cached": len(by_kind["cached"]),
        "ran": len(by_kind["run"]) + len(by_kind["meta"]),
        "no_layer": len(by_kind["no-layer"]),
        "ran_run_steps": [s["instruction"] for s in by_kind["run"]],
        "ran_meta_steps": [s["instruction"][:100] for s in by_kind["meta"]],
        # where the time went: steps by kind, and the rest (context upload, the
        # engine's start, tagging, the thread pool) outside any step
        "seconds_by_kind": {
            **{k: round(v, 4) for k, v in in_steps.items()},
            "outside steps": round(seconds - sum(in_steps.values()), 4),
        },
    }


def pip_run(package: str) -> str:
    """The `RUN` line add_packages writes for `package` (as the build log shows it)."""
    text = add_packages("FROM scratch\n", pip=[package])
    return next(line for line in text.splitlines() if line.startswith("RUN "))


async def rebuild_times(timeout: int = 300) -> dict:
    run_id = secrets.token_hex(4)
    owner = f"bench-{run_id}"  # the sweep removes images of `bench*` users
    rebuild_ref = image_ref(owner, "rebuild")
    cold_ref = image_ref(owner, "cold")
    builder = ImageBuilder(1, lambda: docker_client(timeout))
    template = with_run_id(TEMPLATE.read_text(), run_id)
    dockerfile_a = add_packages(template, pip=list(PACKAGES))
    dockerfile_b = add_packages(dockerfile_a, pip=[ADDED])
    index_dir = Path(tempfile.mkdtemp(prefix="ds01-bench-index-"))
    versions = dict.fromkeys((*PACKAGES, ADDED), "1.0")
    engine = docker_client(timeout)

    async def build(ref: str, dockerfile: str, url: str, nocache: bool = False) -> dict:
        spec = BuildSpec(  # as the image-update page builds (service/image_manager.py)
            image=ref,
            dockerfile=dockerfile,
            labels={
                **labels.project_labels(owner, ref.split("/")[1].split(":")[0], PROJECT_TYPE),
                labels.DOCKERFILE_SHA256: dockerfile_digest(dockerfile),
            },
            buildargs={"PIP_INDEX_URL": url, "BASE_IMAGE": BASE_IMAGE},
            network_mode="host",
            nocache=nocache,
            allowed_images=(BASE_IMAGE,),
        )
        return await TimedBuild(builder.build(spec)).wait()

    try:
        with PackageIndex(index_dir, versions) as index:
            warmup = await build(rebuild_ref, dockerfile_a, index.url)
            cold = await build(cold_ref, dockerfile_b, index.url, nocache=True)
            # its untagged parents go with it: the rebuild must not find B's new layer there
            await asyncio.to_thread(engine.remove_image, cold_ref)
            unchanged = await build(rebuild_ref, dockerfile_a, index.url)
            rebuild = await build(rebuild_ref, dockerfile_b, index.url)
    finally:
        removed = await asyncio.to_thread(remove_run, engine, f"ds01-{owner}/", run_id)
        engine.close()
        shutil.rmtree(index_dir, ignore_errors=True)
    new_run = pip_run(ADDED)
    return {
        "run_id": run_id,
        "base_image": BASE_IMAGE,
        "template": str(TEMPLATE.relative_to(REPO_ROOT)),
        "packages_a": list(PACKAGES),
        "added": ADDED,
        "cold_s": cold["seconds"],
        "rebuild_s": rebuild["seconds"],
        "ratio": rebuild["seconds"] / cold["seconds"],
        # the point of one RUN per package: adding one runs that one only
        "only_new_run_ran": rebuild["ran_run_steps"] == [new_run]
        and len(cold["ran_run_steps"]) == len(PACKAGES) + 1,
        "builds": {
            "warmup_a": warmup,
            "cold_b": cold,
            "unchanged_a": unchanged,
            "rebuild_b": rebuild,
        },
        "images_removed": removed,
    }


def remove_run(engine: docker.APIClient, repository: str, run_id: str) -> int:
    """Remove this run's tags, then its untagged leftovers (an image a rebuild replaced
    whose `:previous` tag moved on); each takes its untagged parent layers with it."""
    removed = 0
    for image in engine.images():
        for tag in image.get("RepoTags") or []:
            if tag.startswith(repository):
                with contextlib.suppress(docker.errors.APIError):
                    engine.remove_image(tag, force=True)
                    removed += 1
    leftovers = {"dangling": True, "label": f"bench.ds01.run={run_id}"}
    for image in engine.images(filters=leftovers):
        with contextlib.suppress(docker.errors.APIError):
            engine.remove_image(image["Id"], force=True)
            removed += 1
    return removed


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(rebuild_times()), indent=1))
