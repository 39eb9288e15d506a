"""The trust boundary through a real hub on the real engine: a researcher's own image
and Dockerfile cannot claim GPUs, reach another user's images, or escape the build limits."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import docker
import pytest

from ds01_spawner import labels
from ds01_spawner.images import BUILD_NETWORK
from ds01_spawner.nvml import SimulatedInventory
from tests.conftest import BASE_IMAGE

HEAD = "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"
SIM_UUIDS = ",".join(s.uuid for s in SimulatedInventory(2).read())
FORGED = f"LABEL ds01.gpu.uuids={SIM_UUIDS} ds01.gpu.equivalents=0 ds01.gpu.indices=0,1\n"


async def test_a_dockerfile_claiming_every_gpu_is_refused_and_takes_none(hub):
    h = await hub(simulated_gpus=2, policy={"defaults": {"max_gpus": 1}})
    eve, bob = h.new_user("eve"), h.new_user("bob")
    workspace, _ = h.seed_workspace(eve, "heist", HEAD + FORGED)
    r = await h.request_start(eve, "heist")
    if r.status_code in (201, 202):
        with pytest.raises(AssertionError, match=r"LABEL ds01\.gpu\.uuids is not allowed"):
            await h.wait_ready(eve, "heist")
    else:
        assert "LABEL ds01.gpu.uuids is not allowed" in r.text, r.text
    assert h.containers(eve) == [] and h.images(eve) == []
    assert (workspace / "Dockerfile").read_text() == HEAD + FORGED, "the workspace is intact"
    await h.start(bob, "fair", {"gpus": 1})
    assert h.container(bob, "fair").labels[labels.GPU_UUIDS], "bob got a GPU"


async def test_labels_an_image_carries_never_show_through_a_container(hub, engine, tmp_path):
    """An image built outside ds01's rules (an old image, an admin's docker build) with
    forged ledger labels: eve's CPU-only container holds nothing; bob and carol get GPUs."""
    h = await hub(simulated_gpus=2, policy={"defaults": {"max_gpus": 1}})
    eve, bob, carol = h.new_user("eve"), h.new_user("bob"), h.new_user("carol")
    h.seed_workspace(eve, "old", HEAD)
    (tmp_path / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\n{FORGED}LABEL ds01.managed=true ds01.role=project "
        f"ds01.user={eve} ds01.project=old ds01.gpu.seal={'0' * 64}\n"
    )
    engine.images.build(path=str(tmp_path), tag=f"ds01-{eve}/old:latest", rm=True)
    await h.start(eve, "old")
    c = h.container(eve, "old")
    assert c.labels[labels.GPU_UUIDS] == "" and c.labels[labels.GPU_EQUIVALENTS] == "0"
    assert c.labels[labels.GPU_SEAL] != "0" * 64
    await h.start(bob, "a", {"gpus": 1})
    await h.start(carol, "b", {"gpus": 1})
    held = {h.container(u, p).labels[labels.GPU_UUIDS] for u, p in ((bob, "a"), (carol, "b"))}
    assert held == set(SIM_UUIDS.split(",")), "both GPUs went to real requests"


async def test_a_build_cannot_start_from_another_users_image(hub):
    h = await hub()
    alice, eve = h.new_user("alice"), h.new_user("eve")
    await h.start(alice, "secret")
    alice_image = h.images(alice)[0].id
    h.seed_workspace(eve, "steal", f"FROM ds01-{alice}/secret:latest\n")
    h.seed_workspace(eve, "copy", HEAD + f"COPY --from=ds01-{alice}/secret:latest /etc /x\n")
    for project, words in (("steal", "FROM ds01-"), ("copy", "COPY from ds01-")):
        r = await h.request_start(eve, project)
        if r.status_code in (201, 202):
            with pytest.raises(
                AssertionError, match=f"{words}{alice}/secret:latest is not allowed"
            ):
                await h.wait_ready(eve, project)
    assert h.images(eve) == [] and h.images(alice)[0].id == alice_image


async def test_builds_run_on_their_own_network_with_limits_and_no_gpu(hub, engine):
    h = await hub(
        build_network_mode=BUILD_NETWORK,
        build_memory_limit="512M",
        build_pids_limit=64,
    )
    ada = h.new_user("ada")
    h.seed_workspace(
        ada,
        "probe",
        HEAD
        + "RUN echo NVIDIA=$NVIDIA_VISIBLE_DEVICES"
        + " && echo MEM=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
        + " 2>/dev/null || cat /sys/fs/cgroup/memory.max)"
        + " && echo PIDS=$(grep pids /proc/self/cgroup)"
        + " && python3 -c 'import socket as s; print(\"IP=\" + s.gethostbyname(s.gethostname()))'"
        + " && seq 1 6000\n",
    )
    _, events = await h.start_watching(ada, "probe")
    await h.wait_ready(ada, "probe")
    lines = {
        m.split("=", 1)[0]: m.split("=", 1)[1]
        for m in (e["message"] for e in events)
        if m.split("=", 1)[0] in ("NVIDIA", "MEM", "PIDS", "IP")
    }
    # runc hands builds no GPU; under a default nvidia runtime ds01 sets it to void
    hidden = "void" if engine.info().get("DefaultRuntime") == "nvidia" else ""
    assert lines["NVIDIA"] == hidden, "a build never sees the GPUs"
    assert int(lines["MEM"]) == 512 * 1024**2
    assert "/ds01-builds/" in lines["PIDS"]
    cgroup = lines["PIDS"].split(":", 2)[2].rsplit("/", 1)[0]
    assert Path(f"/sys/fs/cgroup/pids{cgroup}/pids.max").read_text().strip() == "64"
    if Path("/sys/fs/cgroup/cpu").is_dir():  # cgroup v1: builds weigh little against the hub
        weight = Path("/sys/fs/cgroup/cpu/ds01-builds/cpu.shares").read_text().strip()
        assert weight == "256", "build_cpu_shares on the parent of every user's builds"
    network = engine.networks.get(BUILD_NETWORK)
    assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    subnet = ipaddress.ip_network(network.attrs["IPAM"]["Config"][0]["Subnet"])
    assert ipaddress.ip_address(lines["IP"]) in subnet, "not the users' shared bridge"
    assert events[-1].get("ready"), "a 6,000-line build log did not stall the spawn page"


async def test_a_build_past_its_time_limit_is_stopped_and_tags_nothing(hub, engine):
    h = await hub(build_time_limit=6)
    ada = h.new_user("ada")
    h.seed_workspace(ada, "slow", HEAD + "RUN sleep 120\n")
    began = time.monotonic()
    r = await h.request_start(ada, "slow")
    if r.status_code in (201, 202):
        with pytest.raises(AssertionError, match="build_time_limit"):
            await h.wait_ready(ada, "slow", timeout=90)
    assert time.monotonic() - began < 40
    assert h.images(ada) == []
    for _ in range(30):  # the engine cancels the build once its client is gone
        running = [
            c
            for c in engine.containers.list()
            if "sleep 120" in " ".join(c.attrs["Config"]["Cmd"] or [])
        ]
        if not running:
            break
        time.sleep(0.5)
    assert not running, "the build's RUN container was stopped"
    with pytest.raises(docker.errors.ImageNotFound):
        engine.images.get(f"ds01-{ada}/slow:latest")
