"""DS01SwarmSpawner: ds01 on a Docker Swarm (``spawner_class = "ds01-swarm"``).

`DS01Spawner` with dockerspawner's `SwarmSpawner` under it (the MRO puts
SwarmSpawner before DockerSpawner): projects, workspaces, images, policy,
retirement, audit and the service are DS01Spawner's, unchanged. What differs
is where a server runs, and it is glue over pure functions:

    the image  -> built on the engine the hub talks to (a manager), pushed to
                  `registry`, named by digest (every node runs the same build)
    GPUs       -> the policy and the fair GPU queue decide whether and when, on
                  the swarm ledger (swarmallocator.py); the swarm assigns which,
                  atomically (generic resources); a task it cannot place is
                  removed and refused (409) within seconds
    the server -> one service (swarmservice.service_request), its port
                  published in host mode on its node; polled through its task
                  and its node, so a dead or drained node is a stopped server
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import docker.errors
from dockerspawner import SwarmSpawner
from traitlets import Float, Unicode

from . import labels
from .engine import docker_client
from .errors import Refusal
from .gpus import GpuRequest
from .ledger import LedgerSeal
from .limits import Limits
from .nvml import GpuSlot
from .projects import Project
from .spawner import _CONTAINER, DS01Spawner
from .statefiles import write_json
from .swarmservice import (
    GPU_KIND,
    assigned_gpus,
    fewest_cpus,
    node_name,
    pull_failed,
    service_request,
    task_endpoint,
    task_failure,
    task_stopped,
    unplaceable,
)


class PushFailed(Exception):
    """The registry did not take the image."""


def push_image(client: Any, local: str, registry: str) -> str:
    """Tag `local` (repo:tag) into `registry`, push it; its `repo@sha256:...` there.

    Blocking (docker-py); the digest is the registry's manifest digest, which
    every node pulls the same build by.
    """
    repository, _, tag = local.rpartition(":")
    remote = f"{registry.rstrip('/')}/{repository}"
    client.tag(local, remote, tag=tag)
    digest = ""
    try:
        for line in client.push(remote, tag=tag, stream=True, decode=True):
            if "error" in line:
                raise PushFailed(line.get("error") or str(line))
            digest = (line.get("aux") or {}).get("Digest", digest)
    except docker.errors.DockerException as e:
        raise PushFailed(str(e)) from None
    if not digest:
        raise PushFailed("the registry reported no digest")
    return f"{remote}@{digest}"


class PushedImages:
    """The last digest pushed for each project image (state_dir/pushed_images.json): what
    a start runs when a later push fails (the previous build, not nothing)."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "pushed_images.json"

    def get(self, local: str) -> str:
        try:
            return json.loads(self.path.read_text()).get(local, "")
        except (OSError, ValueError, AttributeError):
            return ""

    def put(self, local: str, pushed: str) -> None:
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            known = {}
        known[local] = pushed
        write_json(self.path, known)


class DS01SwarmSpawner(DS01Spawner, SwarmSpawner):
    """Spawn each project as a one-task service on a Docker Swarm, GPUs assigned by the swarm."""

    registry = Unicode(
        "",
        help="""The lab's registry every swarm node pulls project images from
        (host:port, e.g. registry.lab.example:5000), for `ds01-swarm` only.

        A project image is built once, on the engine the hub talks to (a swarm
        manager), pushed here, and its service names it by digest, so every
        node runs the same build. A push that fails leaves the previous push of
        that image in use (the spawn page says so); with none before, the start
        is refused. Empty: images are not pushed, and run only on nodes that
        have them (a one-node swarm).
        """,
    ).tag(config=True)

    swarm_gpu_kind = Unicode(
        GPU_KIND,
        help="""The generic resource kind a node declares its whole GPUs as
        (`ds01-gpu-declare`: NVIDIA-GPU), for `ds01-swarm` only.""",
    ).tag(config=True)

    placement_timeout = Float(
        3.0,
        min=0,
        help="""Seconds a new server's task may stay pending on "insufficient
        resources" before the start is refused (409) and its service removed, for
        `ds01-swarm` only. A start that asked to wait for a GPU waits up to the
        policy's queue_timeout instead, in the swarm's own queue.
        """,
    ).tag(config=True)

    swarm_stop_timeout = Float(
        20.0,
        min=0,
        help="""Seconds a stop waits for the server's task to be gone from its node
        (its GPU free for the next start), for `ds01-swarm` only.""",
    ).tag(config=True)

    _gpus_asked = 0
    _placement_wait = 0.0
    node = ""  # where the server runs (its node's hostname)

    # ------------------------------------------------------------ state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        swarm = state.get("ds01-swarm") or {}
        self.node = swarm.get("node", "")
        if self.plan is not None and swarm.get("gpus"):
            slots = tuple(GpuSlot(u, f"{self.node}/?", "GPU", 0, 0, None) for u in swarm["gpus"])
            self.plan = dataclasses.replace(
                self.plan, gpus=slots, gpus_since=swarm.get("since", "")
            )

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.object_id and self.plan is not None:
            state["ds01-swarm"] = {
                "node": self.node,
                "gpus": [s.uuid for s in self.plan.gpus],
                "since": self.plan.gpus_since,
            }
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.node = ""

    # ------------------------------------------------------------ GPUs
    # `gpu_allocator` is swarmallocator.SwarmGpus here: admission and the GPU queue read
    # every node's GPUs and the swarm ledger, as the service's pages and checks do

    async def _assign_gpus(
        self, request: GpuRequest, limits: Limits, *, wait: bool = False
    ) -> tuple[list[GpuSlot], str]:
        """The policy and the fair GPU queue decide whether and when (DS01Spawner's, on the
        swarm ledger); the service then asks the swarm for that many, and the swarm
        assigns which, atomically (`start_object` says which it gave)."""
        if request.mig:
            raise Refusal(
                "MIG devices are not offered on the swarm yet; ask for whole GPUs",
                status=400,
                reason="gpu",
            )
        chosen, since = await super()._assign_gpus(request, limits, wait=wait)
        self._gpus_asked = len(chosen)
        # the ledger saw them free; a GPU busy outside ds01 may still keep the task pending
        self._placement_wait = (limits.queue_timeout or 0.0) if wait else 0.0
        return chosen, since

    def _announce_gpus(self, chosen: list[GpuSlot]) -> None:
        if chosen:
            count = f"{len(chosen)} GPU{'s' if len(chosen) > 1 else ''}"
            self._emit(_CONTAINER, f"{count} free on the swarm: asking it for {count}")

    # ------------------------------------------------------------ the image

    async def _ensure_image(self, project: Project, workspace: Path) -> str:
        local = await super()._ensure_image(project, workspace)
        if not self.registry:
            return local
        records = PushedImages(self.state_dir)
        self._emit(86, f"Pushing {local} to {self.registry}")
        client = docker_client(self.build_timeout)
        try:
            pushed = await asyncio.to_thread(push_image, client, local, self.registry)
        except PushFailed as e:
            previous = records.get(local)
            if not previous:
                raise Refusal(
                    f"the image {local} could not be pushed to the lab's registry "
                    f"{self.registry} ({e}), and no earlier build of it is there: "
                    "try again later, or tell the hub's admin",
                    status=502,
                    reason="registry",
                ) from None
            self._emit(87, f"Push failed ({e}); running the previous build {previous}")
            return previous
        finally:
            client.close()
        records.put(local, pushed)
        self._emit(87, f"Image {pushed}")
        return pushed

    async def pull_image(self, image: str) -> None:
        """Nodes pull by digest themselves; the hub's engine pulls nothing."""

    # ------------------------------------------------------------ the service

    async def start(self) -> tuple[str, int]:
        self._gpus_asked, self._placement_wait, self.node = 0, 0.0, ""
        return await super().start()

    async def create_object(self) -> dict[str, Any]:
        if self.plan is None:
            raise Refusal("no project resolved for this server", status=500)
        name = self.object_name
        request = service_request(
            self.plan,
            name=name,
            hub_env=self.get_env(),
            args=await self.get_command(),
            port=self.port,
            seal=LedgerSeal(self.state_dir).seal,
            started_at=labels.now_iso(),
            gpus=self._gpus_asked,
            kind=self.swarm_gpu_kind,
            constraints=(self.extra_placement_spec or {}).get("constraints") or (),
            node_cpus=fewest_cpus(await self.docker("nodes")),
        )
        return await self.docker("create_service", **request)

    async def _task(self) -> dict[str, Any] | None:
        tasks = await self.docker("tasks", filters={"service": self.object_name})
        if not tasks:
            return None
        return max(tasks, key=lambda t: t.get("CreatedAt", ""))

    async def start_object(self) -> None:
        """Wait until the task runs; refuse at once what the swarm cannot place or run."""
        began = time.monotonic()
        pending_since = None
        interval = 0.1
        said = ""
        while True:
            task = await self._task()
            state = ((task or {}).get("Status") or {}).get("State", "")
            if state == "running":
                break
            if task is not None and (failure := task_failure(task)):
                await self._remove_quietly()
                if pull_failed(task):
                    node = await self.docker("inspect_node", task["NodeID"])
                    raise Refusal(
                        f"node {node_name(node)} could not pull your image from the lab's "
                        f"registry ({failure}); your image and workspace are unchanged: "
                        "try again, or tell the hub's admin",
                        status=502,
                        reason="registry",
                    )
                raise Refusal(f"the swarm could not start your server: {failure}", status=500)
            why = unplaceable(task) if task else ""
            if why:
                pending_since = pending_since or time.monotonic()
                waited = time.monotonic() - pending_since
                if waited >= max(self.placement_timeout, self._placement_wait):
                    await self._remove_quietly()
                    if self._gpus_asked:
                        raise Refusal(
                            "no GPU for you right now: every GPU on the swarm's nodes is "
                            f"taken ({why}). Try again later, or start without a GPU.",
                            status=409,
                            reason="gpu",
                        )
                    raise Refusal(f"no node can run your server now ({why})", status=409)
                if self._placement_wait and why != said:
                    self._emit(88, "Waiting for a GPU to be free on the swarm")
                    said = why
            else:
                pending_since = None
            if time.monotonic() - began > self.start_timeout:
                await self._remove_quietly()
                raise Refusal(f"the server's task is still {state or 'missing'}", status=500)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 1.0)
        node = await self.docker("inspect_node", task["NodeID"])
        self.node = node_name(node)
        gpus = assigned_gpus(task, self.swarm_gpu_kind)
        if gpus and self.plan is not None:
            slots = tuple(GpuSlot(u, f"{self.node}/?", "GPU", 0, 0, None) for u in gpus)
            self.plan = dataclasses.replace(self.plan, gpus=slots)
            for uuid in gpus:
                self._emit(_CONTAINER, f"Assigned GPU {uuid} on node {self.node}")
        self._emit(_CONTAINER, f"Running on node {self.node}")

    async def _remove_quietly(self) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await self.docker("remove_service", self.object_name)
        self.object_id = ""

    async def get_ip_and_port(self) -> tuple[str, int]:
        deadline = time.monotonic() + 10
        while True:
            task = await self._task()
            if task and task.get("NodeID"):
                node = await self.docker("inspect_node", task["NodeID"])
                try:
                    return task_endpoint(task, node, self.port)
                except LookupError:
                    if time.monotonic() > deadline:
                        raise
            await asyncio.sleep(0.2)

    async def poll(self) -> int | None:
        """None while the task runs on a live node; 1 once it (or its node) has gone, after
        the service is removed."""
        if not self.object_id:
            return 0
        try:
            await self.docker("inspect_service", self.object_id)
        except docker.errors.NotFound:
            return 0
        task = await self._task()
        node = None
        if task and task.get("NodeID"):
            with contextlib.suppress(docker.errors.NotFound):
                node = await self.docker("inspect_node", task["NodeID"])
        if task is not None and not task.get("NodeID") and not task_failure(task):
            return None  # still being placed
        why = task_stopped(task, node)
        if why:
            # the hub does not call stop() for a server that stopped by itself: retire it
            # here, so its service goes and the swarm frees its GPU
            self.log.warning("Server %s has stopped: %s; retiring it", self.object_name, why)
            await self.stop(now=True)
            return 1
        return None

    async def stop(self, now: bool = False) -> None:
        tasks = []
        if self.object_id:
            with contextlib.suppress(docker.errors.APIError):
                found = await self.docker("tasks", filters={"service": self.object_id})
                tasks = [t["ID"] for t in found]
        await super().stop(now=now)
        await self._until_tasks_gone(tasks)

    async def _until_tasks_gone(self, tasks: list[str]) -> None:
        """The removed service's tasks gone from the swarm: their GPUs are free for the
        next start (the swarm drops a task once its node reports its container
        stopped, or when its node is down)."""
        deadline = time.monotonic() + self.swarm_stop_timeout
        left = list(tasks)
        while left and time.monotonic() < deadline:
            for task in list(left):
                try:
                    await self.docker("inspect_task", task)
                except docker.errors.NotFound:
                    left.remove(task)
            if left:
                await asyncio.sleep(0.2)
        if left:
            self.log.warning(
                "Tasks %s still there %ss after removal", left, self.swarm_stop_timeout
            )
