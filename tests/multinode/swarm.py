"""A real multi-node Docker Swarm on this one machine: what `scripts/swarm` runs.

Each node is a dockerd in its own network namespace (`ds01-n1`, ... at
198.18.0.11, ...) on the bridge `ds01br` (198.18.0.1), with its own data root,
exec root, socket and pidfile, its own hostname (a UTS namespace: swarm names
the node after it), simulated GPUs declared as generic resources through
`ds01_spawner.swarmgpus` (the command a real node runs, here on simulated
slots: `NVIDIA-GPU=GPU-n1-0000`, ...) and the ds01 node labels. n1 is the
manager, the others join as workers. Debian's `docker-registry` serves
198.18.0.1:5000, which every node trusts over plain HTTP; the base image is
copied into it from the machine's engine, and every node pulls it.

Where things live (`Layout`; DS01_SWARM_STATE and DS01_SWARM_RUN move them):

    /var/lib/ds01-swarm/registry/       registry storage: KEPT by `down` (the cache:
                                        an unchanged base image is not copied again)
    /var/lib/ds01-swarm/registry.yml    its config
    /var/lib/ds01-swarm/logs/           dockerd-n1.log, ..., registry.log (kept, for
                                        a post-mortem; `up` starts them afresh)
    /var/lib/ds01-swarm/nodes/n1/       a node's data root. `down` first empties it
    /var/lib/ds01-swarm/nodes/n1.clean  (leaves the swarm, removes containers, volumes
                                        and images but the base image) and marks it
                                        clean: the next `up` reuses it, and so does not
                                        pull the base image again. A node that does not
                                        answer (a crash) is not marked: its data root is
                                        removed. Every `up` is a fresh swarm either way.
    /run/ds01-swarm/                    sockets, pidfiles, exec roots, daemon.json
                                        files and up.json (what is up): removed by `down`

`down` then ends every process of ours by pid: those whose command line names
these directories (dockerd, its containerd and shims, the registry), their
descendants (containers, docker-proxy) and whatever is in the nodes' cgroups
(`/ds01-swarm/<node>`); then mounts, namespaces, links, the bridge, the
forwarding rule and cgroups. It works from any half-made or crashed state,
and twice in a row; `down --purge` also removes the caches.

The machine's own engine is only read (`docker save` of the base image), under
the lock the single-engine integration tests share: `registry.py`. Processes,
pids and daemons: `procs.py`. Standard library and the `docker`, `ip`,
`iptables`, `nsenter` and `unshare` commands only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .procs import (
    SwarmError,
    alive,
    ancestors,
    children_of,
    cmdline,
    log,
    parallel,
    read_pid,
    reap,
    run,
    spawn_daemon,
    wait_for,
)
from .registry import (
    BASE_REPO,
    HOST_IP,
    REGISTRY,
    push_base_image,
    registry_answers,
)

if TYPE_CHECKING:
    from ds01_spawner.nvml import GpuSlot

BRIDGE = "ds01br"
SUBNET_BITS = 24
RULE_COMMENT = "ds01-swarm"
SIMULATED_GPU_MEMORY = 16 * 1024**3
MAX_NODES = 9


def _swarmgpus():
    # imported when first needed: importing ds01_spawner takes seconds (jupyterhub,
    # jsonschema), which `down`, `status` and `env` need not pay
    from ds01_spawner import swarmgpus

    return swarmgpus


# -- where things are


@dataclass(frozen=True)
class Node:
    index: int
    layout: Layout

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def ip(self) -> str:
        return f"198.18.0.{10 + self.index}"

    @property
    def netns(self) -> str:
        return f"ds01-{self.name}"

    @property
    def veth(self) -> str:  # the host's end; the node's end is eth0
        return f"ds01-{self.name}"

    @property
    def run_dir(self) -> Path:
        return self.layout.run / self.name

    @property
    def data_root(self) -> Path:
        return self.layout.state / "nodes" / self.name

    @property
    def clean_marker(self) -> Path:
        """There when `down` left the data root clean (no swarm, no container): the next
        `up` reuses it, and so its pulled base image."""
        return self.layout.state / "nodes" / f"{self.name}.clean"

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:  # dockerd's own
        return self.run_dir / "dockerd.pid"

    @property
    def launch_pidfile(self) -> Path:  # written by the launcher: there before dockerd's
        return self.run_dir / "launch.pid"

    @property
    def daemon_json(self) -> Path:
        return self.run_dir / "daemon.json"

    @property
    def log(self) -> Path:
        return self.layout.logs / f"dockerd-{self.name}.log"

    @property
    def cgroup_parent(self) -> str:
        return f"/ds01-swarm/{self.name}"

    def gpus(self, count: int) -> list[GpuSlot]:
        """Simulated GPUs with UUIDs that name their node: GPU-n1-0000, ..."""
        from ds01_spawner.nvml import GpuSlot

        return [
            GpuSlot(f"GPU-{self.name}-{k:04d}", str(k), "Simulated GPU", SIMULATED_GPU_MEMORY, 0, 0)
            for k in range(count)
        ]


@dataclass(frozen=True)
class Layout:
    state: Path = Path(os.environ.get("DS01_SWARM_STATE", "/var/lib/ds01-swarm"))
    run: Path = Path(os.environ.get("DS01_SWARM_RUN", "/run/ds01-swarm"))

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def registry_storage(self) -> Path:
        return self.state / "registry"

    @property
    def registry_config(self) -> Path:
        return self.state / "registry.yml"

    @property
    def registry_pidfile(self) -> Path:
        return self.run / "registry.pid"

    @property
    def trash(self) -> Path:  # data roots on their way out (removing one takes 10-20 s)
        return self.state / "trash"

    @property
    def up_file(self) -> Path:
        return self.run / "up.json"

    def nodes(self, count: int) -> list[Node]:
        return [Node(i, self) for i in range(1, count + 1)]

    def known_nodes(self) -> list[Node]:
        """Every node any trace of is left: run dirs, data roots, namespaces, links."""
        indexes = set()
        for parent in (self.run, self.state / "nodes"):
            if parent.is_dir():
                indexes |= {
                    int(m[1]) for p in parent.iterdir() if (m := re.fullmatch(r"n(\d+)", p.name))
                }
        for name in _netns_names() + _link_names():
            if m := re.fullmatch(r"ds01-n(\d+)", name):
                indexes.add(int(m[1]))
        return [Node(i, self) for i in sorted(indexes)]


# -- small helpers


def docker(node: Node, *args: str, check: bool = True, timeout: float = 120) -> str:
    return run("docker", "-H", node.url, *args, check=check, timeout=timeout)


def _netns_names() -> list[str]:
    return [
        line.split()[0] for line in run("ip", "netns", "list", check=False).splitlines() if line
    ]


def _link_names() -> list[str]:
    out = run("ip", "-o", "link", "show", check=False)
    return [m[1] for m in re.finditer(r"^\d+: ([^:@]+)[@:]", out, re.M)]


def _iptables_rule() -> list[str]:
    return ["-i", BRIDGE, "-o", BRIDGE, "-m", "comment", "--comment", RULE_COMMENT, "-j", "ACCEPT"]


def _has_chain(chain: str) -> bool:
    return (
        subprocess.run(["iptables", "-w", "-n", "-L", chain], capture_output=True).returncode == 0
    )


def _rule_chain() -> str | None:
    """The chain our forwarding rule is in, if it is."""
    for chain in ("DOCKER-USER", "FORWARD"):
        if not _has_chain(chain):
            continue
        check = ["iptables", "-w", "-C", chain, *_iptables_rule()]
        if subprocess.run(check, capture_output=True).returncode == 0:
            return chain
    return None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 5) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def engine_get(node: Node, path: str, timeout: float = 5):
    """GET from a node's engine API; the decoded JSON (or text), None if it does not answer."""
    conn = _UnixHTTPConnection(str(node.socket), timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# -- processes


def _cgroup_tops() -> list[Path]:
    """The nodes' cgroup parent, /ds01-swarm, in each hierarchy (v1) or the one (v2)."""
    root = Path("/sys/fs/cgroup")
    tops = [*root.glob("*/ds01-swarm"), root / "ds01-swarm"]
    return [t for t in tops if t.is_dir() and not t.is_symlink()]


def _cgroup_pids() -> set[int]:
    pids = set()
    for top in _cgroup_tops():
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(p) for p in procs.read_text().split()}
    return pids


# what the swarm runs itself (the launcher's stages only for milliseconds); anything
# else that names our directories (a `tail -f` of a log) is not ours to end
PROGRAMS = {
    "dockerd",
    "containerd",
    "containerd-shim",
    "containerd-shim-runc-v2",
    "docker-registry",
    "setsid",
    "sh",
    "nsenter",
    "unshare",
}


def our_processes(layout: Layout) -> dict[int, str]:
    """Every live process the swarm started: pid -> command line.

    Our programs naming our directories (dockerd, containerd, shims, the
    registry), whatever they started (containers, docker-proxy) and whatever
    runs in the nodes' cgroups; never ourselves or our ancestors.
    """
    marks = (str(layout.state) + "/", str(layout.run) + "/", "-namespace ds01-n")
    mine = ancestors()
    roots = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (pid := int(entry.name)) in mine:
            continue
        cmd = cmdline(pid)
        if cmd and Path(cmd.split()[0]).name in PROGRAMS and any(m in cmd for m in marks):
            roots.add(pid)
    roots |= _cgroup_pids() - mine
    children = children_of()
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return {pid: cmdline(pid) for pid in sorted(found) if alive(pid)}


def end_processes(layout: Layout, timeout: float = 15) -> list[str]:
    """SIGKILL every process of ours until none is left; what was ended."""
    ended: list[str] = []
    deadline = time.monotonic() + timeout
    while procs := our_processes(layout):
        if time.monotonic() > deadline:
            raise SwarmError(f"processes still running after {timeout:.0f}s: {procs}")
        for pid, cmd in procs.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                ended.append(f"{pid} {cmd[:100]}")
            reap(pid)
        time.sleep(0.1)
    return ended


# -- the network


def make_network(nodes: list[Node]) -> None:
    if BRIDGE not in _link_names():
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{HOST_IP}/{SUBNET_BITS}", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    if _rule_chain() is None:
        # the machine's engine sets FORWARD DROP and sends bridged traffic through
        # iptables: let the nodes talk to each other across ds01br
        chain = "DOCKER-USER" if _has_chain("DOCKER-USER") else "FORWARD"
        run("iptables", "-w", "-I", chain, *_iptables_rule())
    for node in nodes:
        ns = node.netns
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "link", "set", node.veth, "master", BRIDGE)
        run("ip", "link", "set", node.veth, "up")
        batch = (
            f"addr add {node.ip}/{SUBNET_BITS} dev eth0\n"
            "link set eth0 up\nlink set lo up\n"
            f"route add default via {HOST_IP}\n"
        )
        run("ip", "-n", ns, "-batch", "-", input=batch)


def remove_network(nodes: list[Node]) -> None:
    names = set(_netns_names())
    for node in nodes:
        if node.netns in names:
            run("ip", "netns", "delete", node.netns, check=False)
    links = set(_link_names())
    for node in nodes:
        if node.veth in links:
            run("ip", "link", "delete", node.veth, check=False)
    if BRIDGE in links:
        run("ip", "link", "delete", BRIDGE, check=False)
    while chain := _rule_chain():
        run("iptables", "-w", "-D", chain, *_iptables_rule())


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), path)


def unmount_under(*dirs: Path) -> int:
    """Lazily unmount everything mounted below these directories, deepest first."""
    prefixes = tuple(str(d) + "/" for d in dirs)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape_mount(line.split()[4])
        if point.startswith(prefixes):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    return len(points)


def remove_cgroups() -> None:
    for top in _cgroup_tops():
        for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


# -- the registry


def start_registry(layout: Layout) -> int:
    config = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(layout.registry_storage)},
            "delete": {"enabled": True},
        },
        "http": {"addr": REGISTRY},
    }
    layout.registry_storage.mkdir(parents=True, exist_ok=True)
    layout.registry_config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    pid = spawn_daemon(
        ["docker-registry", "serve", str(layout.registry_config)],
        layout.logs / "registry.log",
        layout.registry_pidfile,
    )
    wait_for(registry_answers, f"the registry on {REGISTRY}", 20)
    return pid


# -- the nodes


def start_node(node: Node, gpus: int) -> int:
    node.run_dir.mkdir(parents=True, exist_ok=True)
    if node.clean_marker.exists():
        node.clean_marker.unlink()  # consumed: a crash from here on wipes the data root
    elif node.data_root.exists():
        _remove_tree(node.data_root)
    node.data_root.mkdir(parents=True, exist_ok=True)
    _swarmgpus().write_daemon_json(
        node.daemon_json,
        node.gpus(gpus),
        nvidia_runtime=False,  # no NVIDIA runtime here: the GPUs are simulated
        settings={
            "data-root": str(node.data_root),
            "exec-root": str(node.run_dir / "exec"),
            "hosts": [node.url],
            "pidfile": str(node.pidfile),
            "insecure-registries": [REGISTRY],
            "cgroup-parent": node.cgroup_parent,
            "containerd-namespace": f"ds01-{node.name}",
            "containerd-plugins-namespace": f"ds01-{node.name}-plugins",
            "shutdown-timeout": 2,
        },
    )
    # nsenter, not `ip netns exec` (which remounts /sys: "Devices cgroup isn't
    # mounted"); unshare --uts: a hostname of its own, the swarm's node name
    argv = [
        "nsenter",
        f"--net=/run/netns/{node.netns}",
        "unshare",
        "--uts",
        "sh",
        "-c",
        'hostname "$0" && exec "$@"',
        node.name,
        "dockerd",
        "--config-file",
        str(node.daemon_json),
    ]
    return spawn_daemon(argv, node.log, node.launch_pidfile)


def wait_for_engine(node: Node, pid: int, timeout: float = 60) -> None:
    def answers() -> bool:
        if not alive(pid):
            tail = "".join(node.log.read_text().splitlines(keepends=True)[-10:])
            raise SwarmError(f"dockerd of {node.name} died; {node.log}:\n{tail}")
        return engine_get(node, "/_ping", timeout=1) == "OK"

    wait_for(answers, f"dockerd of {node.name} on {node.socket}", timeout)


def form_swarm(nodes: list[Node]) -> None:
    manager, workers = nodes[0], nodes[1:]
    docker(
        manager,
        "swarm",
        "init",
        "--advertise-addr",
        manager.ip,
        "--listen-addr",
        f"{manager.ip}:2377",
    )
    token = docker(manager, "swarm", "join-token", "-q", "worker").strip()

    def join(node: Node) -> None:
        docker(
            node,
            "swarm",
            "join",
            "--token",
            token,
            "--advertise-addr",
            node.ip,
            f"{manager.ip}:2377",
        )

    parallel(join, workers)


def swarm_nodes(manager: Node) -> list[dict]:
    return engine_get(manager, "/nodes") or []


def _ready_names(manager: Node) -> set[str]:
    return {
        n["Description"]["Hostname"]
        for n in swarm_nodes(manager)
        if n["Status"]["State"] == "ready" and n["Spec"].get("Availability") == "active"
    }


def label_nodes(nodes: list[Node], gpus: int) -> None:
    manager = nodes[0]
    names = {n.name for n in nodes}
    wait_for(lambda: _ready_names(manager) >= names, "every node Ready", 30)

    def label(node: Node) -> None:
        labels = {**_swarmgpus().node_labels(node.gpus(gpus)), "ds01.node": node.name}
        args = [w for k, v in labels.items() for w in ("--label-add", f"{k}={v}")]
        docker(manager, "node", "update", *args, node.name)

    parallel(label, nodes)


# -- up, down, status


def read_up(layout: Layout) -> dict | None:
    try:
        return json.loads(layout.up_file.read_text())
    except (OSError, ValueError):
        return None


def problems(layout: Layout, up: dict | None = None) -> list[str]:
    """What is wrong with the swarm `up.json` describes; [] when it is whole and answering."""
    up = up if up is not None else read_up(layout)
    if up is None:
        return [f"not up ({layout.up_file} missing)"]
    found = []
    if not alive(up["registry_pid"]) or not registry_answers():
        found.append(f"registry (pid {up['registry_pid']}) does not answer on {REGISTRY}")
    nodes = layout.nodes(up["nodes"])
    for node, pid in zip(nodes, up["pids"], strict=True):
        if not alive(pid) or engine_get(node, "/_ping", timeout=2) != "OK":
            found.append(f"dockerd of {node.name} (pid {pid}) does not answer on {node.socket}")
    if not found:
        missing = {n.name for n in nodes} - _ready_names(nodes[0])
        if missing:
            found.append(f"nodes not Ready and active: {sorted(missing)}")
    if _rule_chain() is None:
        found.append(f"the forwarding rule for {BRIDGE} is missing")
    return found


def leftovers(layout: Layout) -> list[str]:
    """Any trace of a swarm: processes, namespaces, links, the rule, state; [] when clean."""
    found = [f"process {pid}: {cmd[:120]}" for pid, cmd in our_processes(layout).items()]
    found += [f"netns {n}" for n in _netns_names() if n.startswith("ds01-n")]
    found += [f"link {n}" for n in _link_names() if n == BRIDGE or n.startswith("ds01-n")]
    if _rule_chain():
        found.append("iptables rule")
    if layout.run.exists():
        found.append(f"directory {layout.run}")
    nodes = layout.state / "nodes"
    for path in sorted(nodes.iterdir()) if nodes.is_dir() else []:
        if path.is_dir() and not (nodes / f"{path.name}.clean").exists():
            found.append(f"data root {path} (not left clean)")
    return found


def up(
    layout: Layout | None = None,
    nodes: int = 2,
    gpus: int = 2,
    pull: bool = True,
    fresh_base: bool = False,
) -> dict:
    """Bring the swarm up (or find it up, with these sizes); up.json's content."""
    layout = layout or Layout()
    if not 1 <= nodes <= MAX_NODES:
        raise SwarmError(f"--nodes must be 1..{MAX_NODES}")
    current = read_up(layout)
    sizes_match = current and (current["nodes"], current["gpus_per_node"]) == (nodes, gpus)
    if sizes_match and not problems(layout, current):
        log(f"already up: {nodes} nodes x {gpus} GPUs (`down` first for a fresh one)")
        return current
    if leftovers(layout):
        log("clearing what a previous swarm left")
        down(layout, quiet=True, keep_trash=True)
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(phase: str) -> None:
        timings[phase] = round(time.monotonic() - started, 2)
        log(f"{phase} ({timings[phase]:.1f}s)")

    members = layout.nodes(nodes)
    layout.run.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    try:
        make_network(members)
        registry_pid = start_registry(layout)
        with ThreadPoolExecutor(max_workers=2) as pool:
            # the copy of the base image needs only the registry, and a crashed
            # swarm's data roots are removed: both while the engines start and pull
            pushing = pool.submit(push_base_image, wait=fresh_base)
            clearing = pool.submit(empty_trash, layout)
            pids = [start_node(node, gpus) for node in members]
            mark("network, registry; engines starting")
            parallel(lambda np: wait_for_engine(*np), list(zip(members, pids, strict=True)))
            mark("engines answering")
            form_swarm(members)
            label_nodes(members, gpus)
            mark("swarm formed, nodes labelled")
            base = pushing.result()
            mark(f"base image in the registry: {base}")
            if pull:
                parallel(lambda node: docker(node, "pull", "-q", base, timeout=600), members)
                mark("base image pulled on every node")
            clearing.result()
    except BaseException:
        log(f"up failed: logs in {layout.logs}; run scripts/swarm down")
        raise
    state = {
        "nodes": nodes,
        "gpus_per_node": gpus,
        "manager": members[0].url,
        "sockets": {n.name: n.url for n in members},
        "ips": {n.name: n.ip for n in members},
        "pids": pids,
        "registry": REGISTRY,
        "registry_pid": registry_pid,
        "base_image": base,
        "timings": timings,
    }
    layout.up_file.write_text(json.dumps(state, indent=2) + "\n")
    log(f"up in {time.monotonic() - started:.1f}s")
    return state


def _remove_tree(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _discard(layout: Layout, path: Path) -> None:
    """Move `path` into the trash at once (a rename); `empty_trash` removes it."""
    layout.trash.mkdir(parents=True, exist_ok=True)
    path.rename(layout.trash / f"{path.name}.{time.time_ns()}")


def empty_trash(layout: Layout) -> None:
    if layout.trash.is_dir():
        parallel(_remove_tree, list(layout.trash.iterdir()))
        with contextlib.suppress(OSError):
            layout.trash.rmdir()


def _answering(node: Node) -> bool:
    return alive(read_pid(node.pidfile)) and engine_get(node, "/_ping", timeout=2) == "OK"


def retire_nodes(nodes: list[Node]) -> None:
    """Leave every answering node's data root clean for the next `up`, and stop them.

    In the order that keeps it quick (seen: 7 to 11 s otherwise): the manager
    removes every service, every node kills its containers at once (a task
    stops gracefully for up to 10 s, and the manager's `leave` waits for it),
    the workers leave while the manager still answers (a worker whose manager
    has gone waits 5 s for it), then the manager leaves.
    """
    live = [n for n in nodes if _answering(n)]
    manager = next((n for n in live if n.index == 1), None)
    if manager and (services := docker(manager, "service", "ls", "-q", check=False).split()):
        docker(manager, "service", "rm", *services, check=False)
    parallel(_remove_containers, live)
    workers = [n for n in live if n is not manager]
    parallel(lambda n: docker(n, "swarm", "leave", "--force", check=False, timeout=30), workers)
    parallel(retire_node, live)


def _remove_containers(node: Node) -> None:
    if containers := docker(node, "ps", "-aq").split():
        docker(node, "rm", "-f", "-v", *containers, check=False, timeout=60)


def retire_node(node: Node) -> bool:
    """Leave a node's data root clean for the next `up` and stop its dockerd; whether it could.

    Clean: out of the swarm, no container, no volume, no image but the base
    image's. A node that does not answer (crashed, half-started) is not
    retired: `down` then removes its data root, and the next `up` pulls again.
    """
    pid = read_pid(node.pidfile)
    if not _answering(node):
        return False
    started = time.monotonic()
    try:
        docker(node, "swarm", "leave", "--force", check=False, timeout=30)
        left = time.monotonic()
        _remove_containers(node)
        listed = docker(node, "images", "--no-trunc", "--format", "{{.ID}} {{.Repository}}")
        rows = [line.split() for line in listed.splitlines() if line.strip()]
        keep = {i for i, repo in rows if repo == f"{REGISTRY}/{BASE_REPO}"}
        if drop := sorted({i for i, _ in rows} - keep):
            docker(node, "rmi", "-f", *drop, check=False, timeout=60)
        docker(node, "volume", "prune", "-f", timeout=60)
        emptied = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), f"dockerd of {node.name} to stop", 15)
    except (SwarmError, OSError) as e:
        log(f"{node.name}: not retired cleanly ({e}); its data root goes")
        return False
    node.clean_marker.write_text(f"retired {time.ctime()}\n")
    log(
        f"{node.name}: left clean in {time.monotonic() - started:.1f}s (swarm leave "
        f"{left - started:.1f}s, emptying {emptied - left:.1f}s, dockerd stop "
        f"{time.monotonic() - emptied:.1f}s)"
    )
    return True


def down(
    layout: Layout | None = None,
    purge: bool = False,
    quiet: bool = False,
    keep_trash: bool = False,
) -> None:
    """End every process of the swarm and remove all it made; the registry storage (and
    nodes' data roots left clean, with the base image) stay unless `purge`. Safe to
    run at any time, any number of times. `keep_trash`: leave the removal of data roots
    that were not left clean to the caller (`up` does it while its engines start)."""
    layout = layout or Layout()
    started = time.monotonic()
    nodes = layout.known_nodes()
    layout.up_file.unlink(missing_ok=True)  # not up any more, whatever happens next
    if not purge:
        retire_nodes(nodes)
    ended = end_processes(layout)
    for pidfile in [layout.registry_pidfile, *(n.pidfile for n in nodes)]:
        if (pid := read_pid(pidfile)) and alive(pid) and pid not in ancestors():
            # a pidfile whose process names none of our directories: a stale
            # file, and that pid belongs to someone else now. Leave it.
            log(f"{pidfile}: pid {pid} is not ours, left alone")
    unmount_under(layout.run, layout.state / "nodes")
    remove_network(nodes)
    remove_cgroups()
    for node in nodes:
        if not node.clean_marker.exists() and node.data_root.exists():
            _discard(layout, node.data_root)
    if not keep_trash:
        empty_trash(layout)
    for path in (layout.run, *([layout.state] if purge else [])):
        if path.exists():
            _remove_tree(path)
    left = leftovers(layout)
    if left:
        raise SwarmError("down left: " + "; ".join(left))
    if not quiet or ended:
        log(f"down in {time.monotonic() - started:.1f}s ({len(ended)} processes ended)")


def status(layout: Layout | None = None) -> tuple[int, str]:
    """(exit code, text): 0 up and whole, 1 down and clean, 2 anything in between."""
    layout = layout or Layout()
    up_state = read_up(layout)
    if up_state is None:
        left = leftovers(layout)
        if not left:
            return 1, "down (nothing left)"
        return 2, "not up, but left behind:\n  " + "\n  ".join(left)
    lines = [
        f"up: {up_state['nodes']} nodes x {up_state['gpus_per_node']} GPUs, "
        f"registry {REGISTRY} (pid {up_state['registry_pid']})",
        f"base image: {up_state['base_image']}",
    ]
    manager = layout.nodes(up_state["nodes"])[0]
    by_name = {n["Description"]["Hostname"]: n for n in swarm_nodes(manager)}
    for node, pid in zip(layout.nodes(up_state["nodes"]), up_state["pids"], strict=True):
        info = by_name.get(node.name, {})
        resources = info.get("Description", {}).get("Resources", {}).get("GenericResources", [])
        gpus = [r["NamedResourceSpec"]["Value"] for r in resources if "NamedResourceSpec" in r]
        lines.append(
            f"  {node.name} {node.ip} pid {pid} {'alive' if alive(pid) else 'DEAD'} "
            f"{info.get('Spec', {}).get('Role', '?')} "
            f"{info.get('Status', {}).get('State', '?')}/"
            f"{info.get('Spec', {}).get('Availability', '?')} gpus {','.join(gpus)}"
        )
    found = problems(layout, up_state)
    lines += [f"PROBLEM: {p}" for p in found]
    return (2 if found else 0), "\n".join(lines)


def env_lines(layout: Layout | None = None) -> list[str]:
    up_state = read_up(layout or Layout())
    if up_state is None:
        raise SwarmError("the swarm is not up: scripts/swarm up")
    nodes = " ".join(f"{name}={url}" for name, url in up_state["sockets"].items())
    return [
        f"export DS01_SWARM_MANAGER={up_state['manager']}",
        f"export DS01_SWARM_NODES='{nodes}'",
        f"export DS01_SWARM_REGISTRY={up_state['registry']}",
        f"export DS01_SWARM_BASE_IMAGE={up_state['base_image']}",
        "# e.g. docker -H $DS01_SWARM_MANAGER node ls",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/swarm",
        description="A multi-node Docker Swarm on this machine, for tests (docs/swarm.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="bring the swarm up (idempotent)")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--gpus-per-node", type=int, default=2)
    p_up.add_argument("--no-pull", action="store_true", help="do not pre-pull the base image")
    p_up.add_argument(
        "--fresh-base",
        action="store_true",
        help="wait for the integration lock rather than use the registry's copy of the base image",
    )
    p_down = sub.add_parser("down", help="end it all, by pid (idempotent, works after a crash)")
    p_down.add_argument("--purge", action="store_true", help="also the registry's storage, logs")
    sub.add_parser("status", help="what is up; exit 0 up, 1 down, 2 half")
    sub.add_parser("env", help="shell exports of the swarm's addresses (eval them)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/swarm: needs root (namespaces, iptables, dockerd)", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            up(
                nodes=args.nodes,
                gpus=args.gpus_per_node,
                pull=not args.no_pull,
                fresh_base=args.fresh_base,
            )
        elif args.command == "down":
            down(purge=args.purge)
        elif args.command == "status":
            code, text = status()
            print(text)
            return code
        elif args.command == "env":
            print("\n".join(env_lines()))
    except SwarmError as e:
        print(f"scripts/swarm: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
