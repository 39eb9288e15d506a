"""A server's swarm service, and what its task says, as pure functions.

The swarm counterpart of container.py's `harden_request`: `service_request`
turns a `ContainerPlan` into the whole `create_service` request (the service
runs one task, never restarted or moved: a task that ends or loses its node
is a stopped server, which the hub notices and the user starts again). The
GPU is not in the plan: the swarm assigns it atomically from the nodes'
generic resources (`NVIDIA-GPU=<uuid>`, docs/swarm.md), and the task says
which (`assigned_gpus`). The other functions read a task: could the swarm
place it, where does it answer, has it stopped. Tested alone, no swarm needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import docker.types

from . import labels
from .container import ContainerPlan, container_env
from .ledger import gpu_labels

Seal = Callable[[str, dict[str, str]], str]  # (service name, labels) -> seal

GPU_KIND = "NVIDIA-GPU"

# a task in one of these states holds its node's resources, or is about to
LIVE_TASK_STATES = frozenset(
    {"new", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running"}
)
ENDED_TASK_STATES = frozenset({"complete", "shutdown", "failed", "rejected", "remove", "orphaned"})


def resource_variable(kind: str) -> str:
    """The variable the swarm sets in a task given a resource of `kind`."""
    return f"DOCKER_RESOURCE_{kind.upper()}"


def service_labels(plan: ContainerPlan, *, name: str, seal: Seal, started_at: str) -> dict:
    """The ds01 labels of a server's service (and its container), sealed like a container's.

    No GPU is named: the swarm has not assigned it yet (`assigned_gpus` reads it
    from the task); the ledger (swarmledger.py) counts a service only if sealed.
    """
    lab = {
        **labels.project_labels(plan.owner, plan.project, plan.project_type),
        labels.SERVER_NAME: plan.server,
        labels.IMAGE: plan.image,
        labels.UID: str(plan.ids.uid),
        labels.STARTED_AT: started_at,
        labels.MAX_RUNTIME: (
            str(int(plan.limits.max_runtime))
            if plan.limits is not None and plan.limits.max_runtime is not None
            else ""
        ),
        **gpu_labels([], ""),
    }
    lab[labels.GPU_SEAL] = seal(name, lab)
    return lab


def service_env(
    plan: ContainerPlan, hub_env: Mapping[str, str], *, gpus: int, kind: str = GPU_KIND
) -> dict[str, str]:
    """The task's environment: the hub's (API URL, token, ...), then ds01's.

    A server without a GPU gets the swarm variable empty, so an image that sets
    it names no GPU; one with a GPU must not set it (the swarm's value would
    come second). NVIDIA_VISIBLE_DEVICES stays "void": with swarm-resource set,
    the NVIDIA runtime gives the task the device its swarm variable names, and
    nothing else. CUDA_VISIBLE_DEVICES is not set: the task sees only its own.
    """
    env = {**hub_env, **container_env(plan)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["NVIDIA_VISIBLE_DEVICES"] = "void"
    variable = resource_variable(kind)
    if gpus:
        env.pop(variable, None)
    else:
        env[variable] = ""
    return env


def service_request(
    plan: ContainerPlan,
    *,
    name: str,
    hub_env: Mapping[str, str],
    args: Sequence[str],
    port: int,
    seal: Seal,
    started_at: str,
    gpus: int = 0,
    kind: str = GPU_KIND,
    constraints: Sequence[str] = (),
    node_cpus: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of docker-py's `APIClient.create_service` for this plan.

    ds01's rules as for a container, where the swarm has them: the user's uid,
    no capabilities, an init, the policy's memory, CPU and process limits, the
    workspace (the same host path on every node: shared storage) and nothing
    else at its mount point. The engine's `no-new-privileges` has no service
    field on API 1.41 (Docker 20.10); the uid and the dropped capabilities stay.
    The port is published in host mode on the task's node, the engine choosing
    the number (`task_endpoint` reads it): the routing mesh is not needed.
    `node_cpus`: the fewest CPUs (nano) a node has, see `cpu_limit`.
    """
    lab = service_labels(plan, name=name, seal=seal, started_at=started_at)
    mounts = []
    if plan.workspace:
        mounts.append(
            docker.types.Mount(target=plan.workspace_mount, source=plan.workspace, type="bind")
        )
    spec = docker.types.ContainerSpec(
        image=plan.image,
        args=list(args),
        env=service_env(plan, hub_env, gpus=gpus, kind=kind),
        workdir=plan.workspace_mount,
        user=plan.ids.docker_user,
        labels=dict(lab),
        mounts=mounts,
        init=True,
        cap_drop=["ALL"],
        stop_grace_period=10_000_000_000,
    )
    limits = plan.limits
    resources = docker.types.Resources(
        mem_limit=limits.memory if limits is not None else None,
        cpu_limit=cpu_limit(limits.max_cpus if limits is not None else None, node_cpus),
        generic_resources={kind: gpus} if gpus else None,
    )
    if limits is not None and limits.pids_limit is not None:
        resources.setdefault("Limits", {})["Pids"] = limits.pids_limit
    task = docker.types.TaskTemplate(
        container_spec=spec,
        resources=resources,
        # one task, never replaced: a task that ends, or whose node dies, is a stopped server
        restart_policy=docker.types.RestartPolicy(condition="none"),
        placement=docker.types.Placement(constraints=list(constraints) or None),
    )
    endpoint = docker.types.EndpointSpec(
        ports=[{"Protocol": "tcp", "TargetPort": port, "PublishMode": "host"}]
    )
    return {"name": name, "task_template": task, "endpoint_spec": endpoint, "labels": lab}


def cpu_limit(max_cpus: float | None, node_cpus: int | None) -> int | None:
    """The task's CPU limit in nano-CPUs: the policy's, at most `node_cpus`.

    A node refuses a task limited to more CPUs than it has (unlike one engine's
    CPU quota, which allows it), and the limit is set before the swarm picks the
    node: so it is capped at the fewest CPUs of any node (`node_cpus`, nano).
    """
    if not max_cpus:
        return None
    wanted = int(max_cpus * 1e9)
    return min(wanted, node_cpus) if node_cpus else wanted


def fewest_cpus(nodes: Sequence[Mapping[str, Any]]) -> int | None:
    """The fewest nano-CPUs of the ready nodes (None: none says)."""
    found = [
        int(((n.get("Description") or {}).get("Resources") or {}).get("NanoCPUs") or 0)
        for n in nodes
        if (n.get("Status") or {}).get("State") == "ready"
    ]
    return min((f for f in found if f > 0), default=None)


def assigned_gpus(task: Mapping[str, Any], kind: str = GPU_KIND) -> list[str]:
    """The GPU ids the swarm gave this task (its `DOCKER_RESOURCE_*` variable)."""
    found = task.get("AssignedGenericResources") or task.get("GenericResources") or []
    return [
        r["NamedResourceSpec"]["Value"]
        for r in found
        if r.get("NamedResourceSpec", {}).get("Kind") == kind
    ]


def unplaceable(task: Mapping[str, Any]) -> str:
    """Why the swarm cannot place this task now ("" when it can, or did)."""
    status = task.get("Status") or {}
    err = status.get("Err") or ""
    if status.get("State") == "pending" and (
        "insufficient resources" in err or "no suitable" in err
    ):
        return err
    return ""


def task_failure(task: Mapping[str, Any]) -> str:
    """Why a task that was never running ended ("" while it starts or runs)."""
    status = task.get("Status") or {}
    state = status.get("State", "")
    if state in ENDED_TASK_STATES:
        return f"{state}: {status.get('Err') or status.get('Message') or 'no reason given'}"
    return ""


def pull_failed(task: Mapping[str, Any]) -> bool:
    """Did the task's node fail to get its image (the registry out of its reach)?"""
    status = task.get("Status") or {}
    err = (status.get("Err") or "").lower()
    return status.get("State") in ("rejected", "failed") and (
        "no such image" in err or "pull access denied" in err or "manifest unknown" in err
    )


def task_stopped(task: Mapping[str, Any] | None, node: Mapping[str, Any] | None) -> str:
    """Why the server this task runs has stopped ("" while it lives).

    A task's own status is written by its node: a node that died or was
    drained cannot report, so its state (down, unknown, drained) decides too,
    as does the swarm giving up on the task (its desired state no longer running).
    """
    if task is None:
        return "its service is gone"
    if task.get("DesiredState", "running") not in ("running", "ready", "accepted"):
        return f"the swarm shut its task down ({task.get('DesiredState')})"
    if failure := task_failure(task):
        return failure
    if node is not None:
        state = (node.get("Status") or {}).get("State", "ready")
        if state != "ready":
            return f"its node {node_name(node)} is {state}"
        availability = (node.get("Spec") or {}).get("Availability", "active")
        if availability == "drain":
            return f"its node {node_name(node)} is drained"
    return ""


def node_name(node: Mapping[str, Any]) -> str:
    return ((node.get("Description") or {}).get("Hostname")) or node.get("ID", "?")[:12]


def task_endpoint(task: Mapping[str, Any], node: Mapping[str, Any], port: int) -> tuple[str, int]:
    """Where the hub reaches the task: its node's address and the port published there."""
    address = (node.get("Status") or {}).get("Addr", "")
    ports = ((task.get("Status") or {}).get("PortStatus") or {}).get("Ports") or []
    for p in ports:
        if p.get("TargetPort") == port and p.get("PublishedPort"):
            if not address or address == "0.0.0.0":
                break
            return address, int(p["PublishedPort"])
    raise LookupError(f"the task publishes no port {port} on its node ({address or '?'})")
