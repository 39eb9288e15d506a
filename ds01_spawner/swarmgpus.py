"""A node's GPUs as Docker Swarm generic resources: what `ds01-gpu-declare` prints or writes.

On a swarm the scheduler hands out GPUs itself, atomically, once every node
declares them in dockerd's `node-generic-resources`: a service that asks for
`NVIDIA-GPU=1` gets one GPU, and its container finds the chosen UUID in
`DOCKER_RESOURCE_NVIDIA-GPU`; the NVIDIA container runtime's `swarm-resource`
setting (a comma-separated list of such variables) turns that into the device.

MIG devices are one kind per size, `NVIDIA-MIG-<n>G=<MIG uuid>` (n of 7
slices): swarm counts each kind on its own and cannot ask for "any MIG device
of at least 3g", so a size is a kind and a policy that wants a size asks for
its kind. A MIG-enabled GPU itself is not declared (its devices are). Kinds are
upper case because the variable swarm sets is the kind upper-cased: the kind
and the `DOCKER_RESOURCE_` name then read the same.

Node labels carry what swarm does not count: model, memory, MIG sizes and the
node's GPU-equivalents (a MIG device is slices/7 of a GPU), so the policy can
count and show them (`node_labels`; the keys are `LABELS`).

Pure functions of `GpuSlot`s, except `write_daemon_json` (one file) and `main`
(NVML through `nvml`, the terminal).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .nvml import MIG_SLICES_PER_GPU, GpuSlot, GpuUnavailable, NvmlInventory, SimulatedInventory

GPU_KIND = "NVIDIA-GPU"
MIG_KIND_PREFIX = "NVIDIA-MIG-"
ENV_PREFIX = "DOCKER_RESOURCE_"  # what swarm puts before the upper-cased kind
RUNTIME_CONFIG = "/etc/nvidia-container-runtime/config.toml"
DAEMON_JSON = "/etc/docker/daemon.json"
GENERIC_RESOURCES_KEY = "node-generic-resources"
NVIDIA_RUNTIME = {"path": "nvidia-container-runtime", "runtimeArgs": []}
MIB = 1024**2

LABEL_PREFIX = "ds01.gpu."
LABELS = {
    "ds01.gpu.count": "whole GPUs declared (kind NVIDIA-GPU)",
    "ds01.gpu.model": "GPU model, MIG-enabled GPUs included (comma-separated if mixed)",
    "ds01.gpu.memory": "MiB of one whole GPU (the smallest if mixed; 0 without whole GPUs)",
    "ds01.gpu.mig.count": "MIG devices declared, all sizes",
    "ds01.gpu.mig": "MIG devices by size, largest first: 3g:1,1g:2 (empty without MIG)",
    "ds01.gpu.mig.memory": "MiB of one MIG device of each size: 3g:40192,1g:9728",
    "ds01.gpu.equivalents": "whole GPUs + MIG slices/7: what the policy counts",
}


class DeclarationError(RuntimeError):
    """The declaration cannot be made or written; the message says what to fix."""


def mig_slices(slot: GpuSlot) -> int:
    """A MIG device's size in compute slices (1..7), from its fraction of a GPU."""
    return max(1, round(slot.fraction * MIG_SLICES_PER_GPU))


def mig_kind(slices: int) -> str:
    return f"{MIG_KIND_PREFIX}{slices}G"


def resource_kind(slot: GpuSlot) -> str:
    """The generic-resource kind a service asks for to get this slot."""
    return mig_kind(mig_slices(slot)) if slot.is_mig else GPU_KIND


def resource_env(kind: str) -> str:
    """The variable swarm sets in a task's container for a resource of this kind."""
    return ENV_PREFIX + kind.upper()


def is_gpu_kind(kind: str) -> bool:
    """Ours to declare (and to replace in a daemon.json): whole GPUs and MIG sizes."""
    return kind == GPU_KIND or kind.startswith(MIG_KIND_PREFIX)


def generic_resources(slots: Iterable[GpuSlot]) -> list[str]:
    """dockerd's `node-generic-resources` entries: `KIND=UUID`, one per slot, in NVML order."""
    return [f"{resource_kind(s)}={s.uuid}" for s in slots]


def swarm_resource(slots: Iterable[GpuSlot]) -> str:
    """The runtime's `swarm-resource` value: every variable a declared kind may set."""
    kinds = {resource_kind(s) for s in slots} | {GPU_KIND}
    ordered = sorted(kinds, key=lambda k: (k != GPU_KIND, k))
    return ",".join(resource_env(k) for k in ordered)


def runtime_config_line(slots: Iterable[GpuSlot]) -> str:
    return f'swarm-resource = "{swarm_resource(slots)}"'


def _model(slot: GpuSlot) -> str:
    # nvml names a MIG device "<parent model> MIG <n>g"
    return slot.name.split(" MIG ")[0] if slot.is_mig else slot.name


def _format_equivalents(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def node_labels(slots: Sequence[GpuSlot]) -> dict[str, str]:
    """Every `LABELS` key, always all of them (so a re-declaration overwrites stale values)."""
    whole = [s for s in slots if not s.is_mig]
    migs = [s for s in slots if s.is_mig]
    models = list(dict.fromkeys(_model(s) for s in slots))
    sizes: dict[int, list[GpuSlot]] = {}
    for s in migs:
        sizes.setdefault(mig_slices(s), []).append(s)
    by_size = sorted(sizes.items(), reverse=True)
    equivalents = len(whole) + sum(mig_slices(s) for s in migs) / MIG_SLICES_PER_GPU
    return {
        "ds01.gpu.count": str(len(whole)),
        "ds01.gpu.model": ",".join(models),
        "ds01.gpu.memory": str(min((s.memory_total // MIB for s in whole), default=0)),
        "ds01.gpu.mig.count": str(len(migs)),
        "ds01.gpu.mig": ",".join(f"{n}g:{len(group)}" for n, group in by_size),
        "ds01.gpu.mig.memory": ",".join(
            f"{n}g:{min(s.memory_total for s in group) // MIB}" for n, group in by_size
        ),
        "ds01.gpu.equivalents": _format_equivalents(equivalents),
    }


def label_command(node: str, labels: dict[str, str]) -> str:
    """One `docker node update` (run on a manager) that sets every label on `node`."""
    words = ["docker", "node", "update"]
    for key, value in labels.items():
        words += ["--label-add", f"{key}={value}"]
    return shlex.join([*words, node])


def merge_daemon_json(
    existing: dict, slots: Sequence[GpuSlot], nvidia_runtime: bool = True
) -> tuple[dict, list[str]]:
    """`existing` daemon.json settings with this declaration merged in, and warnings.

    Replaces only our own kinds in `node-generic-resources` (an admin's other
    generic resources stay); adds the `nvidia` runtime and makes it the default
    where neither is set, since a swarm task cannot choose its runtime, but
    never overrides a runtime the admin set: it warns instead.
    """
    merged = dict(existing)
    warnings: list[str] = []
    others = [
        r
        for r in merged.get(GENERIC_RESOURCES_KEY, [])
        if not is_gpu_kind(str(r).partition("=")[0])
    ]
    merged[GENERIC_RESOURCES_KEY] = others + generic_resources(slots)
    if nvidia_runtime:
        runtimes = dict(merged.get("runtimes") or {})
        runtimes.setdefault("nvidia", dict(NVIDIA_RUNTIME))
        merged["runtimes"] = runtimes
        default = merged.setdefault("default-runtime", "nvidia")
        if default != "nvidia":
            warnings.append(
                f'"default-runtime" is "{default}", kept: swarm tasks get their GPUs only '
                'through the nvidia runtime; set it to "nvidia" on a GPU node'
            )
    return merged, warnings


def read_daemon_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        settings = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise DeclarationError(f"{path} is not valid JSON ({e}); fix it first") from None
    if not isinstance(settings, dict):
        raise DeclarationError(f"{path} must hold a JSON object")
    return settings


def write_daemon_json(
    path: Path,
    slots: Sequence[GpuSlot],
    nvidia_runtime: bool = True,
    settings: dict | None = None,
) -> tuple[dict, list[str]]:
    """Merge the declaration (and other `settings`) into `path`, replacing it atomically.

    Other keys are kept; the file keeps its mode (0644 when new). A reader
    (dockerd starting) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    existing = read_daemon_json(path)
    merged, warnings = merge_daemon_json({**existing, **(settings or {})}, slots, nvidia_runtime)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return merged, warnings


@dataclass(frozen=True)
class Declaration:
    """Everything one node declares, as `--json` prints it."""

    node: str
    slots: tuple[GpuSlot, ...]
    nvidia_runtime: bool = True

    @property
    def generic_resources(self) -> list[str]:
        return generic_resources(self.slots)

    @property
    def labels(self) -> dict[str, str]:
        return node_labels(self.slots)

    def daemon_settings(self) -> dict:
        """The daemon.json keys this declaration manages (merged into an empty file)."""
        return merge_daemon_json({}, self.slots, self.nvidia_runtime)[0]

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "generic_resources": self.generic_resources,
            "daemon_json": self.daemon_settings(),
            "swarm_resource": swarm_resource(self.slots),
            "runtime_config": {"path": RUNTIME_CONFIG, "line": runtime_config_line(self.slots)},
            "labels": self.labels,
            "label_command": label_command(self.node, self.labels),
            "gpus": [
                {
                    "uuid": s.uuid,
                    "index": s.index,
                    "model": _model(s),
                    "kind": resource_kind(s),
                    "memory_mib": s.memory_total // MIB,
                    "equivalents": round(mig_slices(s) / MIG_SLICES_PER_GPU, 4)
                    if s.is_mig
                    else 1.0,
                    "parent_uuid": s.parent_uuid,
                }
                for s in self.slots
            ],
        }


def render(declaration: Declaration, daemon_json: str = DAEMON_JSON) -> str:
    """The declaration as an admin reads it: three steps, each ready to paste."""
    d = declaration
    labels = d.labels
    whole, migs = labels["ds01.gpu.count"], labels["ds01.gpu.mig.count"]
    lines = [
        f"# GPUs of node {d.node}: {whole} whole, {migs} MIG devices "
        f"= {labels['ds01.gpu.equivalents']} GPU-equivalents",
        "",
        f"# 1. {daemon_json}: merge these keys (or run with --write-daemon-json "
        f"{daemon_json}), then restart dockerd",
        json.dumps(d.daemon_settings(), indent=2),
        "",
        f"# 2. {RUNTIME_CONFIG}: at the top level, before any [section]",
        runtime_config_line(d.slots),
        "",
        "# 3. on a swarm manager: the node's labels, for the ds01 policy",
        label_command(d.node, labels),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ds01-gpu-declare",
        description="Print (or write) this node's GPUs as Docker Swarm generic resources, "
        "read from NVML: the daemon.json entries, the NVIDIA runtime's swarm-resource "
        "setting and the ds01 node labels.",
    )
    parser.add_argument("--node", default=socket.gethostname(), help="swarm node name")
    parser.add_argument("--json", action="store_true", help="print the declaration as JSON")
    parser.add_argument(
        "--write-daemon-json",
        metavar="PATH",
        type=Path,
        help=f"merge the declaration into PATH (e.g. {DAEMON_JSON}), keeping its other keys",
    )
    parser.add_argument(
        "--no-nvidia-runtime",
        dest="nvidia_runtime",
        action="store_false",
        help="do not add the nvidia runtime as dockerd's default (nodes without it)",
    )
    parser.add_argument(
        "--simulate",
        type=int,
        metavar="N",
        help="declare N simulated GPUs instead of reading NVML (for trying it out)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        inventory = SimulatedInventory(args.simulate) if args.simulate else NvmlInventory()
        slots = tuple(inventory.read())
    except GpuUnavailable as e:
        print(f"ds01-gpu-declare: {e} (--simulate N to try it without GPUs)", file=sys.stderr)
        return 1
    declaration = Declaration(args.node, slots, args.nvidia_runtime)
    if args.write_daemon_json:
        try:
            _, warnings = write_daemon_json(args.write_daemon_json, slots, args.nvidia_runtime)
        except (DeclarationError, OSError) as e:
            print(f"ds01-gpu-declare: {e}", file=sys.stderr)
            return 1
        for warning in warnings:
            print(f"ds01-gpu-declare: warning: {warning}", file=sys.stderr)
        print(f"ds01-gpu-declare: wrote {args.write_daemon_json}", file=sys.stderr)
    if args.json:
        print(json.dumps(declaration.to_json(), indent=2))
    else:
        print(render(declaration, str(args.write_daemon_json or DAEMON_JSON)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
