"""The real multi-node swarm these tests run on (tests/multinode/swarm.py, docs/swarm.md).

Run them explicitly, as root, with the base image built: `pytest tests/multinode`
(or DS01_MULTINODE=1 in a wider run); a plain `pytest` skips them, since they
bring up engines of their own (about 15 s) and need root.

`swarm` (session): the swarm, brought up once, or found already up with the
same sizes (`scripts/swarm up` beforehand): then it is left up at the end, for
whoever started it; one the fixture started is torn down at the end, and the
session fails if any dockerd, containerd, shim or registry of it is left.
While it reads the machine's engine (the base image), `swarm.up` holds
/tmp/ds01-integration.lock (fcntl.flock), the single-engine tests' lock.

`services` (per test): creates services on the manager; at the end of the
test every service is removed and the fixture waits until no task container is
left on any node, so the next test finds every GPU free.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from . import swarm as swarm_infra

HERE = Path(__file__).resolve().parent
NODES, GPUS_PER_NODE = 2, 2
GPU = "NVIDIA-GPU"
GPU_ENV = "DOCKER_RESOURCE_NVIDIA-GPU"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "multinode: runs on a real multi-node swarm (pytest tests/multinode, as root)"
    )


def _requested(config) -> bool:
    if os.environ.get("DS01_MULTINODE"):
        return True
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    mine = [i for i in items if HERE in Path(i.path).resolve().parents]
    if not mine:
        return
    for item in mine:
        item.add_marker(pytest.mark.multinode)
    if not _requested(config):
        skip = pytest.mark.skip(
            reason="multi-node swarm: run `pytest tests/multinode` as root (or DS01_MULTINODE=1)"
        )
        for item in mine:
            item.add_marker(skip)
    elif os.geteuid() != 0:
        raise pytest.UsageError("tests/multinode need root (namespaces, iptables, dockerd)")


def eventually(predicate: Callable[[], object], what: str, timeout: float = 60):
    """`predicate()`'s first true value, polled until `timeout` (then fails naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        if value := predicate():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what}")
        time.sleep(0.2)


@dataclass
class Swarm:
    """The running swarm, as the tests drive it: docker-py clients of every node."""

    state: dict
    manager: docker.DockerClient
    nodes: dict[str, docker.DockerClient]  # by node name: n1, n2
    ips: dict[str, str]
    base_image: str  # by digest, in the registry, present on every node
    registry: str
    _names: dict[str, str] = field(default_factory=dict)

    def node_name(self, node_id: str) -> str:
        if node_id not in self._names:
            self._names[node_id] = self.manager.nodes.get(node_id).attrs["Description"]["Hostname"]
        return self._names[node_id]

    def node(self, name: str):
        (found,) = self.manager.nodes.list(filters={"name": name})
        return found

    def tasks(self, service, state: str | None = None) -> list[dict]:
        service.reload()
        tasks = service.tasks()
        return [t for t in tasks if state is None or t["Status"]["State"] == state]

    def running(self, service, count: int = 1, timeout: float = 60) -> list[dict]:
        """The service's `count` running tasks, once there are exactly that many."""
        return eventually(
            lambda: (r := self.tasks(service, "running")) and len(r) == count and r,
            f"{count} running task(s) of {service.name}",
            timeout,
        )

    def container_env(self, task: dict) -> dict[str, str]:
        """The environment of a task's container, read from the node it runs on."""
        client = self.nodes[self.node_name(task["NodeID"])]
        container = client.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
        return dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])

    def answering(self) -> list[docker.DockerClient]:
        """The nodes' clients whose engine answers (a test may have killed one)."""
        alive = []
        for client in self.nodes.values():
            with contextlib.suppress(docker.errors.DockerException, OSError):
                client.ping()
                alive.append(client)
        return alive

    def remove_all_services(self, timeout: float = 60) -> None:
        for service in self.manager.services.list():
            service.remove()

        def settled() -> bool:
            if self.manager.services.list():
                return False
            # sparse: no inspect of each one, which races its removal (NotFound)
            return all(not c.containers.list(all=True, sparse=True) for c in self.answering())

        eventually(settled, "every service and task container gone", timeout)


@pytest.fixture(scope="session")
def swarm():
    layout = swarm_infra.Layout()
    found = swarm_infra.read_up(layout)
    reuse = bool(
        found
        and (found["nodes"], found["gpus_per_node"]) == (NODES, GPUS_PER_NODE)
        and not swarm_infra.problems(layout, found)
    )
    state = found if reuse else swarm_infra.up(layout, NODES, GPUS_PER_NODE)
    clients = {
        name: docker.DockerClient(base_url=url, version="auto", timeout=120)
        for name, url in state["sockets"].items()
    }
    handle = Swarm(
        state=state,
        manager=clients["n1"],
        nodes=clients,
        ips=state["ips"],
        base_image=state["base_image"],
        registry=state["registry"],
    )
    try:
        handle.remove_all_services()  # a reused swarm may hold a crashed run's services
        yield handle
    finally:
        for client in clients.values():
            client.close()
        if not reuse:
            swarm_infra.down(layout)
            left = swarm_infra.our_processes(layout)
            if left:
                pytest.fail(f"the swarm left processes running: {left}", pytrace=False)


@pytest.fixture
def services(swarm):
    """`create(**kwargs)`: a service on the swarm (the base image, `sleep infinity`, stopped
    by SIGKILL at once unless told otherwise); every service is removed after the test."""

    def create(**kwargs):
        kwargs.setdefault("name", f"t-{uuid.uuid4().hex[:8]}")
        kwargs.setdefault("command", ["sleep", "infinity"])
        kwargs.setdefault("stop_signal", "SIGKILL")
        image = kwargs.pop("image", swarm.base_image)
        return swarm.manager.services.create(image, **kwargs)

    try:
        yield create
    finally:
        swarm.remove_all_services()


def gpu_resources(count: int = 1) -> docker.types.Resources:
    return docker.types.Resources(generic_resources={GPU: count})


def take_gpus_of(swarm: Swarm, services, node: str, **kwargs):
    """A service holding every GPU of `node`, running: a start lands on another node."""
    filler = services(
        resources=gpu_resources(GPUS_PER_NODE), constraints=[f"node.hostname=={node}"], **kwargs
    )
    swarm.running(filler)
    return filler


# ------------------------------------------------------------ a hub on the swarm

HUB_IP = "198.18.0.1"  # the bridge: the nodes' tasks reach the hub's API here


@pytest.fixture
async def swarm_hub(swarm, hub_app, tmp_path, monkeypatch):
    """Start a real MockHub (real proxy) with the `ds01-swarm` spawner on the test swarm:
    `driver = await swarm_hub(**spawner_config)`. The hub's engine is the manager
    (DOCKER_HOST), its images go to the test registry. At the end every server is
    stopped and every service removed, and no task container is left on any node."""
    from ds01_spawner.swarmspawner import DS01SwarmSpawner
    from tests.integration.conftest import HubDriver, hub_config

    monkeypatch.setenv("DOCKER_HOST", swarm.state["sockets"]["n1"])
    DS01SwarmSpawner._client = None  # DockerSpawner's client is per class: the manager's
    dirs = {"workspace_root": str(tmp_path / "workspaces"), "state_dir": str(tmp_path / "state")}
    drivers = []

    async def start(_jupyterhub: dict | None = None, **spawner):
        spawner.setdefault("base_image", swarm.base_image)
        spawner.setdefault("registry", swarm.registry)
        config = hub_config(dirs, **spawner)
        config["JupyterHub"].update(
            {"spawner_class": DS01SwarmSpawner, "hub_ip": HUB_IP, "hub_connect_ip": HUB_IP}
        )
        config["JupyterHub"].update(_jupyterhub or {})
        config["DS01SwarmSpawner"] = config.pop("DS01Spawner")
        app = await hub_app(config)
        driver = HubDriver(app, swarm.manager)
        drivers.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in drivers:
            await driver.stop_servers()
        DS01SwarmSpawner._client = None
        swarm.remove_all_services()


def service_of(swarm: Swarm, user: str, project: str):
    """The one ds01 service of `user`'s `project` on the swarm."""
    found = swarm.manager.services.list(
        filters={"label": [f"ds01.user={user}", f"ds01.project={project}"]}
    )
    assert len(found) == 1, found
    return found[0]
