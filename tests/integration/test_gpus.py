"""GPU assignment through a real hub on the real engine, with simulated or faked GPUs."""

from __future__ import annotations

import asyncio

import pynvml
import pytest

from ds01_spawner import labels
from ds01_spawner import settings as ds01_settings
from tests.fake_nvml import GIB, FakeNvml, a100s

from .conftest import exec_in


def gpu_of(container) -> str:
    container.reload()
    return container.labels[labels.GPU_UUIDS]


async def test_gpu_is_assigned_labelled_passed_and_released(hub):
    h = await hub(simulated_gpus=2, policy={"defaults": {"max_gpus": 2}})
    alice, bob = h.new_user(), h.new_user()
    _, events = await h.start_watching(alice, "train", {"gpus": 1})
    await h.wait_ready(alice, "train")
    c = h.container(alice, "train")
    uuid = gpu_of(c)
    assert uuid.startswith("GPU-") and "," not in uuid
    assert c.labels[labels.GPU_ALLOCATED_AT] and c.labels[labels.GPU_EQUIVALENTS] == "1"
    assert any(f"Assigned GPU {c.labels[labels.GPU_INDICES]}" in e["message"] for e in events)
    _, out = exec_in(c, "echo $NVIDIA_VISIBLE_DEVICES $CUDA_VISIBLE_DEVICES $DS01_GPU_UUIDS")
    assert out == f"{uuid} {uuid} {uuid}"

    await h.start(bob, "other", {"gpus": 1})
    assert gpu_of(h.container(bob, "other")) != uuid, "never the same GPU twice"
    await h.stop(bob, "other")

    await h.stop(alice, "train")
    await h.start(bob, "again", {"gpus": 2})  # both free again after the retire
    assert set(gpu_of(h.container(bob, "again")).split(",")) >= {uuid}


async def test_cpu_only_container_sees_no_gpu(hub):
    h = await hub(simulated_gpus=2)
    user = h.new_user()
    await h.start(user, "cpu")
    c = h.container(user, "cpu")
    assert c.labels[labels.GPU_UUIDS] == "" and c.labels[labels.GPU_SEAL], "every label, sealed"
    assert exec_in(c, "echo $NVIDIA_VISIBLE_DEVICES")[1] == "void"


async def test_concurrent_spawns_never_share_a_gpu(hub):
    h = await hub(simulated_gpus=2)
    users = [h.new_user() for _ in range(8)]
    responses = await asyncio.gather(*(h.request_start(u, "storm", {"gpus": 1}) for u in users))
    codes = sorted(r.status_code for r in responses)
    refused = [r for r in responses if r.status_code == 409]
    assert len(refused) == 6, codes
    assert all("all 2 GPUs are in use" in r.json()["message"] for r in refused)
    winners = [u for u, r in zip(users, responses, strict=True) if r.status_code in (201, 202)]
    for u in winners:
        await h.wait_ready(u, "storm")
    held = [gpu_of(h.container(u, "storm")) for u in winners]
    assert len(held) == 2 and len(set(held)) == 2
    for u in users:
        if u not in winners:
            assert h.containers(u) == [], "a refused spawn creates nothing"


async def test_gpu_freed_when_container_is_removed_behind_the_hubs_back(hub, dirs):
    h = await hub(simulated_gpus=1)
    alice, bob = h.new_user(), h.new_user()
    await h.start(alice, "train", {"gpus": 1})
    r = await h.request_start(bob, "wait", {"gpus": 1})
    assert r.status_code == 409
    exec_in(h.container(alice, "train"), "echo kept > /workspace/result.txt")
    h.container(alice, "train").remove(force=True)  # crash / admin docker rm

    await h.start(bob, "wait", {"gpus": 1})  # free at once, before the hub even polls
    assert gpu_of(h.container(bob, "wait"))
    from pathlib import Path

    from ds01_spawner.identity import user_slug

    ws = Path(dirs["workspace_root"]) / user_slug(alice) / "train" / "result.txt"
    assert ws.read_text() == "kept\n", "the workspace survives the crash"


async def test_limit_counts_every_project_of_the_user(hub):
    h = await hub(simulated_gpus=4, policy={"defaults": {"max_gpus": 1}})
    user = h.new_user()
    await h.start(user, "thesis", {"gpus": 1})
    r = await h.request_start(user, "paper", {"gpus": 1})
    assert r.status_code == 409
    message = r.json()["message"]
    assert "your limit is 1 GPU" in message and "'thesis' holds 1 GPU" in message
    assert h.containers(user, project="paper") == []
    await h.start(user, "paper")  # without a GPU it starts


async def test_per_user_and_group_overrides(hub):
    h = await hub(
        simulated_gpus=4,
        policy={"defaults": {"max_gpus": 0}, "groups": {"faculty": {"max_gpus": 2}}},
    )
    student, prof = h.new_user(), h.new_user()
    from jupyterhub import orm

    group = orm.Group(name="faculty")
    h.app.db.add(group)
    group.users.append(h.app.users[prof].orm_user)
    h.app.db.commit()

    r = await h.request_start(student, "x", {"gpus": 1})
    assert r.status_code == 409 and "your limit is 0 GPUs" in r.json()["message"]
    await h.start(prof, "x", {"gpus": 2})
    assert len(gpu_of(h.container(prof, "x")).split(",")) == 2


async def test_no_nvml_cpu_projects_spawn_gpu_requests_refused(hub, monkeypatch):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    monkeypatch.setattr(ds01_settings, "_shared", {})  # a fresh GPU allocator
    h = await hub()
    user = h.new_user()
    r = await h.request_start(user, "gpu", {"gpus": 1})
    assert r.status_code == 503
    assert "no usable GPUs" in r.json()["message"] and "NVML" in r.json()["message"]
    await h.start(user, "cpu")


async def test_real_nvml_path_skips_a_gpu_busy_outside_the_hub(hub, monkeypatch):
    fakes = a100s(2)
    fakes[0].memory_used, fakes[0].utilization = 30 * GIB, 88  # someone's job outside the hub
    FakeNvml(fakes).install(monkeypatch)
    monkeypatch.setattr(ds01_settings, "_shared", {})  # a fresh GPU allocator
    h = await hub(gpu_passing="env")
    alice, bob = h.new_user(), h.new_user()
    await h.start(alice, "train", {"gpus": 1})
    assert gpu_of(h.container(alice, "train")) == fakes[1].uuid
    r = await h.request_start(bob, "train", {"gpus": 1})
    assert r.status_code == 409
    assert "1 busy with work outside the hub" in r.json()["message"]


@pytest.mark.parametrize(
    "passing, expect",
    [
        ("device_requests", {"DeviceRequests"}),
        ("nvidia_runtime", {"Runtime"}),
        ("env", set()),
    ],
)
async def test_gpu_passing_builds_the_right_container_request(hub, monkeypatch, passing, expect):
    FakeNvml(a100s(1)).install(monkeypatch)
    h = await hub(gpu_passing=passing)
    user = h.new_user()
    spawner = h.app.users[user].spawners[""]
    from ds01_spawner.identity import UserIds
    from ds01_spawner.nvml import NvmlInventory
    from ds01_spawner.projects import Project

    (slot,) = NvmlInventory().read()
    spawner.plan = spawner.start_plan(
        Project(user, "p", "base", 0), "img", UserIds(30001, 30001, "test"), "", gpus=[slot]
    )
    kwargs = spawner.container_request({"host_config": {"DeviceRequests": ["from config"]}})
    host = kwargs["host_config"]
    assert {"DeviceRequests", "Runtime"} & set(host) == expect
    if passing == "device_requests":
        (req,) = host["DeviceRequests"]
        assert req["DeviceIDs"] == [slot.uuid] and req["Capabilities"] == [["gpu"]]
    if passing == "nvidia_runtime":
        assert host["Runtime"] == "nvidia"
    assert kwargs["labels"][labels.GPU_UUIDS] == slot.uuid
