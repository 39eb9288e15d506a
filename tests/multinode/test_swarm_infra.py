"""The test swarm itself, on the real thing: what the ds01-swarm spawner will stand on.

Two nodes of two simulated GPUs each (generic resources `NVIDIA-GPU=GPU-n1-0000`,
...), a registry on 198.18.0.1:5000, host-mode ports reachable from this machine.
"""

from __future__ import annotations

import io
import tarfile
import urllib.error
import urllib.request
import uuid

import docker
import pytest

from ds01_spawner import swarmgpus

from . import registry
from .conftest import GPU, GPU_ENV, GPUS_PER_NODE, NODES, eventually, gpu_resources


def test_every_node_is_ready_with_its_gpus_and_labels(swarm):
    nodes = {n.attrs["Description"]["Hostname"]: n.attrs for n in swarm.manager.nodes.list()}
    assert sorted(nodes) == [f"n{i}" for i in range(1, NODES + 1)]
    for name, node in nodes.items():
        assert (node["Status"]["State"], node["Spec"]["Availability"]) == ("ready", "active")
        assert node["Status"]["Addr"] == swarm.ips[name]
        declared = [
            r["NamedResourceSpec"] for r in node["Description"]["Resources"]["GenericResources"]
        ]
        assert sorted((r["Kind"], r["Value"]) for r in declared) == [
            (GPU, f"GPU-{name}-{k:04d}") for k in range(GPUS_PER_NODE)
        ]
        labels = node["Spec"]["Labels"]
        assert labels["ds01.node"] == name
        assert labels["ds01.gpu.count"] == str(GPUS_PER_NODE)
        assert labels["ds01.gpu.equivalents"] == str(GPUS_PER_NODE)
        assert set(swarmgpus.LABELS) <= set(labels)
    assert nodes["n1"]["Spec"]["Role"] == "manager"
    assert nodes["n1"]["ManagerStatus"]["Leader"] is True
    assert all(nodes[f"n{i}"]["Spec"]["Role"] == "worker" for i in range(2, NODES + 1))


def test_each_gpu_service_gets_its_own_node_and_gpu_and_one_too_many_waits(swarm, services):
    gpu_services = [services(resources=gpu_resources()) for _ in range(NODES * GPUS_PER_NODE)]
    pairs = []
    for service in gpu_services:
        (task,) = swarm.running(service)
        node = swarm.node_name(task["NodeID"])
        gpu = swarm.container_env(task)[GPU_ENV]
        assigned = task["GenericResources"]  # the API's name for what was assigned
        assert assigned == [{"NamedResourceSpec": {"Kind": GPU, "Value": gpu}}]
        assert gpu.startswith(f"GPU-{node}-"), "the swarm gave a GPU of another node"
        pairs.append((node, gpu))
    assert len(set(pairs)) == NODES * GPUS_PER_NODE, pairs

    one_too_many = services(resources=gpu_resources())
    (waiting,) = eventually(
        lambda: [
            t
            for t in swarm.tasks(one_too_many, "pending")
            if "insufficient resources" in t["Status"].get("Err", "")
        ],
        "the fifth GPU service pending on insufficient resources",
        timeout=30,
    )
    assert swarm.tasks(one_too_many, "running") == []
    assert "NodeID" not in waiting


def _web_image_context(base: str, token: str) -> io.BytesIO:
    dockerfile = (
        f"FROM {base}\n"
        "COPY index.html /srv/index.html\n"
        "WORKDIR /srv\n"
        'CMD ["python3", "-m", "http.server", "8000"]\n'
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in (("Dockerfile", dockerfile), ("index.html", token)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _push(client: docker.DockerClient, repo: str, tag: str) -> str:
    """Push repo:tag from a node's engine; the manifest digest the registry gave it."""
    digest = None
    for line in client.images.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
        digest = line.get("aux", {}).get("Digest", digest)
    assert digest, "the push reported no digest"
    return digest


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the node, not a proxy


def _get(url: str) -> str | None:
    try:
        with _DIRECT.open(url, timeout=2) as r:
            return r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_an_image_pushed_from_one_node_runs_by_digest_on_another_and_answers(swarm, services):
    token = uuid.uuid4().hex
    repo = f"{swarm.registry}/ds01-test/web"
    builder, runner = swarm.nodes["n1"], swarm.nodes["n2"]
    builder.images.build(
        fileobj=_web_image_context(swarm.base_image, token),
        custom_context=True,
        tag=f"{repo}:{token}",
        rm=True,
    )
    digest = _push(builder, repo, token)
    by_digest = f"{repo}@{digest}"
    with pytest.raises(docker.errors.ImageNotFound):
        runner.images.get(by_digest)
    try:
        web = services(
            image=by_digest,
            command=None,
            constraints=["node.hostname==n2"],
            endpoint_spec=docker.types.EndpointSpec(ports={18890: (8000, "tcp", "host")}),
        )
        (task,) = swarm.running(web, timeout=120)
        assert swarm.node_name(task["NodeID"]) == "n2"
        assert task["Spec"]["ContainerSpec"]["Image"] == by_digest
        assert digest in " ".join(runner.images.get(by_digest).attrs["RepoDigests"])
        page = eventually(
            lambda: _get(f"http://{swarm.ips['n2']}:18890/index.html"), "the page on n2", 30
        )
        assert page == token
        assert _get(f"http://{swarm.ips['n1']}:18890/index.html") is None  # host mode: n2 only
    finally:
        registry.registry_request("DELETE", f"/v2/ds01-test/web/manifests/{digest}")


def test_draining_a_node_moves_its_gpu_tasks_to_the_other_node(swarm, services):
    service = services(
        resources=gpu_resources(),
        mode=docker.types.ServiceMode("replicated", replicas=2),
        preferences=[("spread", "node.labels.ds01.node")],  # one replica per node
    )
    before = swarm.running(service, count=2)
    assert sorted(swarm.node_name(t["NodeID"]) for t in before) == ["n1", "n2"]
    moved_away = next(t for t in before if swarm.node_name(t["NodeID"]) == "n2")

    n2 = swarm.node("n2")
    spec = n2.attrs["Spec"]
    n2.update({**spec, "Availability": "drain"})
    try:
        after = eventually(
            lambda: (
                (r := swarm.tasks(service, "running"))
                and len(r) == 2
                and all(swarm.node_name(t["NodeID"]) == "n1" for t in r)
                and r
            ),
            "both replicas running on n1",
            timeout=60,
        )
        gpus = sorted(swarm.container_env(t)[GPU_ENV] for t in after)
        assert gpus == ["GPU-n1-0000", "GPU-n1-0001"]
        old = next(t for t in swarm.tasks(service) if t["ID"] == moved_away["ID"])
        assert old["DesiredState"] == "shutdown"
        eventually(
            lambda: not swarm.nodes["n2"].containers.list(), "n2's task container stopped", 30
        )
    finally:
        n2.reload()
        n2.update({**n2.attrs["Spec"], "Availability": "active"})
        eventually(lambda: swarm.node("n2").attrs["Spec"]["Availability"] == "active", "n2 back")


def test_registry_holds_the_base_image_by_the_digest_the_nodes_run(swarm):
    digest = swarm.base_image.rpartition("@")[2]
    held = registry.registry_manifest(registry.BASE_REPO, "latest")
    assert held is not None and held[0] == digest
    for client in swarm.nodes.values():
        image = client.images.get(swarm.base_image)
        assert image.id == held[1]["config"]["digest"]  # the same build as the machine's engine
