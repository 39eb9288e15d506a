"""The swarm's GPUs and who holds them, read from the swarm itself: the swarm ledger.

On one engine the ledger is the containers' sealed labels (ledger.py); on a
swarm it is the ds01 services' sealed labels (who: user, project, server)
joined to their live tasks' assigned generic resources (which GPU, on which
node). The inventory is the ready, active nodes' declared generic resources
and the labels `ds01-gpu-declare` gave them (swarmgpus.py). Nothing is kept
by the hub: a restarted hub reads the same answer, and a service that is
gone, or a task whose node died, holds nothing. Pure functions over what the
swarm API returns, so the policy (`gpus.choose`) runs on it unchanged
(swarmallocator.py reads them from a manager).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import labels
from .ledger import Holder, LedgerSeal, labelled_holder
from .nvml import GpuSlot
from .swarmservice import GPU_KIND, LIVE_TASK_STATES, assigned_gpus, node_name


@dataclass(frozen=True)
class NodeGpu:
    """One GPU a node declares to the swarm."""

    node: str  # the node's hostname (n1, gpu-server-2, ...)
    address: str
    uuid: str
    index: str  # "n1/0": its place on its node, for people
    model: str
    memory: int  # bytes, from the node's ds01.gpu.memory label (MiB); 0 if unknown
    usable: bool  # the node is ready and active


def node_gpus(nodes: Iterable[Mapping[str, Any]], kind: str = GPU_KIND) -> list[NodeGpu]:
    """Every GPU of `kind` each node declares, usable or not (a down node's too)."""
    found = []
    for node in nodes:
        described = node.get("Description") or {}
        resources = (described.get("Resources") or {}).get("GenericResources") or []
        spec_labels = (node.get("Spec") or {}).get("Labels") or {}
        try:
            memory = int(spec_labels.get("ds01.gpu.memory", "0")) * 1024 * 1024
        except ValueError:
            memory = 0
        usable = (node.get("Status") or {}).get("State") == "ready" and (
            (node.get("Spec") or {}).get("Availability", "active") == "active"
        )
        uuids = sorted(
            r["NamedResourceSpec"]["Value"]
            for r in resources
            if r.get("NamedResourceSpec", {}).get("Kind") == kind
        )
        name = node_name(node)
        for i, uuid in enumerate(uuids):
            found.append(
                NodeGpu(
                    node=name,
                    address=(node.get("Status") or {}).get("Addr", ""),
                    uuid=uuid,
                    index=f"{name}/{i}",
                    model=spec_labels.get("ds01.gpu.model", "") or "GPU",
                    memory=memory,
                    usable=usable,
                )
            )
    return found


def gpu_slots(gpus: Iterable[NodeGpu]) -> list[GpuSlot]:
    """The usable GPUs as the policy sees them (no utilization: the swarm does not say)."""
    return [GpuSlot(g.uuid, g.index, g.model, g.memory, 0, None) for g in gpus if g.usable]


def holders(
    services: Iterable[Mapping[str, Any]],
    tasks: Iterable[Mapping[str, Any]],
    *,
    seal: LedgerSeal | None = None,
    kind: str = GPU_KIND,
) -> list[Holder]:
    """Who holds which GPU: sealed ds01 services' live tasks and what the swarm gave them.

    `container` is the service's name: what an admin removes to free it.
    """
    ours = {}
    for service in services:
        spec = service.get("Spec") or {}
        lab = spec.get("Labels") or {}
        if lab.get(labels.MANAGED) != "true" or lab.get(labels.ROLE) != "project":
            continue
        if seal is not None and not seal.valid(spec.get("Name", ""), lab):
            continue
        ours[service.get("ID")] = (spec.get("Name", ""), lab)
    found = []
    for task in tasks:
        if task.get("ServiceID") not in ours:
            continue
        if task.get("DesiredState") != "running":
            continue
        if (task.get("Status") or {}).get("State") not in LIVE_TASK_STATES:
            continue
        name, lab = ours[task["ServiceID"]]
        since = task.get("CreatedAt", "")[:19] + "Z" if task.get("CreatedAt") else ""
        found += [labelled_holder(u, lab, since, name) for u in assigned_gpus(task, kind)]
    return found


def gpu_table(gpus: Iterable[NodeGpu], ledger: Iterable[Holder]) -> list[dict[str, str]]:
    """One row per declared GPU: node, GPU, state, holder (the admin pages' view)."""
    by_uuid = {h.uuid: h for h in ledger}
    rows = []
    for g in gpus:
        holder = by_uuid.get(g.uuid)
        rows.append(
            {
                "node": g.node,
                "gpu": g.uuid,
                "index": g.index,
                "model": g.model,
                "state": "held" if holder else ("free" if g.usable else "unavailable"),
                "user": holder.user if holder else "",
                "project": holder.project if holder else "",
                "service": holder.container if holder else "",
            }
        )
    return rows
