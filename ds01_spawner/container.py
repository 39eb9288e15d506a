"""A server's start plan and its container request, as pure functions.

`ContainerPlan` is everything ds01 decided for one server (project, image,
uid, workspace, GPUs, limits): made once per start, frozen, and saved in the
hub's state (`to_state` / `from_state` mirror each other).

DockerSpawner assembles `create_container` arguments from its settings (and an
admin's `extra_create_kwargs` / `extra_host_config`); `harden_request` builds
the rest of the request from the plan and applies ds01's rules last, over all
of that: never root, no privilege gain, no capabilities, every ``ds01.*``
label written (and sealed), GPUs only from the ledger, the policy's limits,
the workspace mount and the environment the server sees (`container_env`).
Tested alone, like KubeSpawner's `make_pod`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker.types

from . import labels
from .identity import UserIds
from .ledger import gpu_labels
from .limits import Limits
from .nvml import GpuSlot
from .units import format_size

Seal = Callable[[str, dict[str, str]], str]  # (container name, labels) -> seal


@dataclass(frozen=True)
class ContainerPlan:
    """Everything ds01 decides about one server's container."""

    owner: str  # the hub user
    server: str  # the named server ("" for the default one)
    project: str
    project_type: str
    image: str
    ids: UserIds
    workspace_mount: str = "/workspace"
    gpus: tuple[GpuSlot, ...] = ()
    gpus_since: str = ""
    gpu_passing: str = "device_requests"  # | "nvidia_runtime" | "env"
    simulated_gpus: bool = False  # simulated GPUs reach the container as variables only
    limits: Limits | None = None
    workspace: str = ""  # the workspace's path on the host
    unsaved_packages: tuple[str, ...] = ()  # pip-installed last session, lost at retire
    service_url: str = ""  # the ds01 service, as the terminal commands reach it

    def to_state(self) -> dict[str, Any]:
        """What the hub keeps of the plan across its restarts (`from_state` reads it back)."""
        return {
            "project": self.project,
            "type": self.project_type,
            "workspace": self.workspace,
            "image": self.image,
            "uid": self.ids.uid,
            "gid": self.ids.gid,
            "ids_source": self.ids.source,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, owner: str, server: str) -> ContainerPlan | None:
        """The plan of a server the hub ran before it restarted (None: nothing usable)."""
        if not state.get("project") or state.get("uid") is None:
            return None
        return cls(
            owner=owner,
            server=server,
            project=state["project"],
            project_type=state.get("type", ""),
            image=state.get("image", ""),
            ids=UserIds(state["uid"], state["gid"], state.get("ids_source", "state")),
            workspace=state.get("workspace", ""),
        )


def _seconds(value: float | None) -> str:
    return "" if value is None else str(int(value))


def harden_request(
    kwargs: dict[str, Any], plan: ContainerPlan, *, seal: Seal, started_at: str
) -> dict[str, Any]:
    """`kwargs` for docker's create_container with ds01's rules applied over them.

    The input is not changed. `seal` signs the ledger labels with the hub's key
    (ledger.LedgerSeal.seal), so no label an image carries can pass for ours.
    """
    out = copy.deepcopy(kwargs)
    out["user"] = plan.ids.docker_user
    out["working_dir"] = plan.workspace_mount
    out["environment"] = {**_as_dict(out.get("environment")), **container_env(plan)}
    lab = {
        **(out.get("labels") or {}),
        **labels.project_labels(plan.owner, plan.project, plan.project_type),
        labels.SERVER_NAME: plan.server,
        labels.IMAGE: plan.image,
        labels.UID: str(plan.ids.uid),
        labels.STARTED_AT: started_at,
        labels.MAX_RUNTIME: _seconds(plan.limits.max_runtime if plan.limits else None),
        # GPU labels empty where none apply: a label the user's image set never shows
        **gpu_labels(list(plan.gpus), plan.gpus_since),
    }
    lab[labels.GPU_SEAL] = seal(out.get("name", ""), lab)
    out["labels"] = lab

    host = out.setdefault("host_config", {})
    if plan.workspace:
        # the workspace, and nothing else, at the mount point
        mount = plan.workspace_mount
        binds = [b for b in host.get("Binds") or [] if b.split(":")[1:2] != [mount]]
        host["Binds"] = [*binds, f"{plan.workspace}:{mount}:rw"]
        out["volumes"] = sorted({*(out.get("volumes") or []), mount})
    host.pop("DeviceRequests", None)  # GPUs come from the ledger, never from config
    if plan.gpus and not plan.simulated_gpus:
        uuids = [s.uuid for s in plan.gpus]
        if plan.gpu_passing == "device_requests":
            host["DeviceRequests"] = [
                docker.types.DeviceRequest(device_ids=uuids, capabilities=[["gpu"]])
            ]
        elif plan.gpu_passing == "nvidia_runtime":
            host["Runtime"] = "nvidia"
    host.update(limit_settings(plan.limits))
    if plan.limits is not None and plan.limits.max_cpus is not None:
        host.pop("NanoCpus", None)
    host["SecurityOpt"] = sorted({*(host.get("SecurityOpt") or []), "no-new-privileges"})
    host["CapDrop"] = ["ALL"]
    host.pop("CapAdd", None)
    host["Privileged"] = False
    host.setdefault("Init", True)  # reap the zombies terminals and kernels leave behind
    return out


def limit_settings(limits: Limits | None) -> dict[str, int]:
    """The policy's container limits as docker host-config fields."""
    if limits is None:
        return {}
    host: dict[str, int] = {}
    if limits.memory is not None:
        host["Memory"] = limits.memory
        host["MemorySwap"] = limits.memory  # no swap on top of the limit
    if limits.max_cpus is not None:
        host["CpuPeriod"] = 100_000
        host["CpuQuota"] = int(limits.max_cpus * 100_000)
    if limits.shm_size is not None:
        host["ShmSize"] = limits.shm_size
    if limits.pids_limit is not None:
        host["PidsLimit"] = limits.pids_limit
    return host


def _as_dict(environment: Any) -> dict[str, str]:
    """docker's `environment`, given as a dict or as a list of NAME=value."""
    if isinstance(environment, dict):
        return dict(environment)
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment or [])


def describe_limits(limits: Limits | None) -> str:
    """The policy's container limits in words, for the spawn page ("" if none)."""
    if limits is None:
        return ""
    shown = [
        f"{name} {value}"
        for name, value in (
            ("CPUs", limits.max_cpus),
            ("memory", format_size(limits.memory) if limits.memory else None),
            ("/dev/shm", format_size(limits.shm_size) if limits.shm_size else None),
            ("processes", limits.pids_limit),
        )
        if value is not None
    ]
    return f"Limits: {', '.join(shown)}" if shown else ""


def service_url(template: str, hub_base_url: str) -> str:
    """`service_url` with ``{base_url}`` made the hub's base URL (its ``/hub/`` path less
    ``hub/``), so one setting serves a hub at / and one under a prefix."""
    base = hub_base_url[: -len("hub/")] if hub_base_url.endswith("/hub/") else "/"
    return template.replace("{base_url}", base)


def container_env(plan: ContainerPlan) -> dict[str, str]:
    """The variables ds01 sets in the server's environment (over any the config set)."""
    uuids = ",".join(s.uuid for s in plan.gpus)
    limits = plan.limits or Limits()
    # as DockerSpawner sets them from mem_limit / cpu_limit, but from the policy
    sizes = {"MEM_LIMIT": str(limits.memory)} if limits.memory is not None else {}
    if limits.max_cpus is not None:
        sizes["CPU_LIMIT"] = str(float(limits.max_cpus))
    return {
        **sizes,
        "DS01_PROJECT": plan.project,
        "DS01_PROJECT_TYPE": plan.project_type,
        "DS01_IMAGE": plan.image,
        "DS01_WORKSPACE": plan.workspace_mount,
        # "void": a CPU-only container sees no GPU even under a default nvidia runtime
        "NVIDIA_VISIBLE_DEVICES": uuids or "void",
        "CUDA_VISIBLE_DEVICES": uuids,
        "DS01_GPU_UUIDS": uuids,
        "DS01_GPU_INDICES": ",".join(s.index for s in plan.gpus),
        "DS01_GPU_NAMES": ",".join(s.name for s in plan.gpus),
        # what the last session pip-installed and lost: JupyterLab terminals show it
        "DS01_UNSAVED_PACKAGES": " ".join(plan.unsaved_packages),
        # where the terminal commands (image-update, project, ...) reach the ds01 service
        **({"DS01_SERVICE_URL": plan.service_url} if plan.service_url else {}),
    }
