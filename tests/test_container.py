"""The container request, pinned without a hub or an engine (as KubeSpawner's make_pod)."""

import pytest

from ds01_spawner import labels
from ds01_spawner.container import ContainerPlan, container_env, harden_request, limit_settings
from ds01_spawner.identity import UserIds
from ds01_spawner.limits import Limits
from ds01_spawner.nvml import GpuSlot

GIB = 1024**3
SLOT = GpuSlot("GPU-aaaa", "0", "A100", 80 * GIB, 0, 0)


def seal(name: str, lab: dict[str, str]) -> str:
    return f"sealed:{name}:{lab[labels.GPU_UUIDS]}"


def plan(**overrides) -> ContainerPlan:
    base = dict(
        owner="ada",
        server="thesis",
        project="thesis",
        project_type="cv",
        image="ds01-ada/thesis:latest",
        ids=UserIds(20001, 20001, "allocated"),
    )
    return ContainerPlan(**{**base, **overrides})


def request(kwargs=None, **overrides) -> dict:
    return harden_request(
        kwargs or {"name": "ds01-ada--thesis"},
        plan(**overrides),
        seal=seal,
        started_at="2026-12-02T00:00:00Z",
    )


def test_the_container_runs_as_the_user_in_the_workspace():
    out = request()
    assert out["user"] == "20001:20001" and out["working_dir"] == "/workspace"


def test_an_admins_extra_host_config_cannot_undo_the_hardening():
    kwargs = {
        "name": "c",
        "host_config": {
            "Privileged": True,
            "CapAdd": ["SYS_ADMIN"],
            "SecurityOpt": ["seccomp=unconfined"],
            "DeviceRequests": [{"Count": -1}],
        },
    }
    host = request(kwargs)["host_config"]
    assert host["Privileged"] is False and host["CapDrop"] == ["ALL"] and "CapAdd" not in host
    assert host["SecurityOpt"] == ["no-new-privileges", "seccomp=unconfined"]
    assert "DeviceRequests" not in host, "GPUs come from the ledger only"
    assert host["Init"] is True
    assert kwargs["host_config"]["Privileged"] is True, "the input is not changed"


def test_labels_of_the_request_override_any_the_config_or_image_set():
    out = request(
        {"name": "c", "labels": {labels.USER: "eve", labels.GPU_UUIDS: "GPU-x", "x": "1"}}
    )
    lab = out["labels"]
    assert (lab[labels.USER], lab[labels.PROJECT], lab[labels.TYPE]) == ("ada", "thesis", "cv")
    assert (lab[labels.MANAGED], lab[labels.ROLE], lab[labels.SERVER_NAME]) == (
        "true",
        "project",
        "thesis",
    )
    assert lab[labels.UID] == "20001" and lab["x"] == "1"


def test_a_cpu_only_container_gets_every_gpu_label_empty_and_sealed():
    lab = request()["labels"]
    assert lab[labels.GPU_UUIDS] == lab[labels.GPU_INDICES] == lab[labels.GPU_ALLOCATED_AT] == ""
    assert lab[labels.GPU_EQUIVALENTS] == "0"
    assert lab[labels.GPU_SEAL] == "sealed:ds01-ada--thesis:"


@pytest.mark.parametrize(
    "passing, fields",
    [("device_requests", {"DeviceRequests"}), ("nvidia_runtime", {"Runtime"}), ("env", set())],
)
def test_gpus_reach_the_container_as_gpu_passing_says(passing, fields):
    out = request(gpus=(SLOT,), gpus_since="t", gpu_passing=passing)
    host = out["host_config"]
    assert {"DeviceRequests", "Runtime"} & set(host) == fields
    if passing == "device_requests":
        (req,) = host["DeviceRequests"]
        assert req["DeviceIDs"] == ["GPU-aaaa"] and req["Capabilities"] == [["gpu"]]
    assert out["labels"][labels.GPU_UUIDS] == "GPU-aaaa"
    assert out["labels"][labels.GPU_SEAL] == "sealed:ds01-ada--thesis:GPU-aaaa"


def test_simulated_gpus_are_passed_as_variables_only():
    out = request(gpus=(SLOT,), simulated_gpus=True)
    assert "DeviceRequests" not in out["host_config"]


def test_the_policys_limits_win_over_the_config():
    limits = Limits(memory=2 * GIB, max_cpus=1.5, shm_size=GIB, pids_limit=300)
    host = request(
        {"name": "c", "host_config": {"NanoCpus": 4 * 10**9, "Memory": 1}}, limits=limits
    )["host_config"]
    assert (host["Memory"], host["MemorySwap"]) == (2 * GIB, 2 * GIB)
    assert (host["CpuPeriod"], host["CpuQuota"]) == (100_000, 150_000) and "NanoCpus" not in host
    assert (host["ShmSize"], host["PidsLimit"]) == (GIB, 300)
    assert limit_settings(None) == {} and limit_settings(Limits()) == {}


def test_the_environment_names_the_project_and_its_gpus():
    env = container_env(plan(gpus=(SLOT,)), ["peft==0.13.2"])
    assert env["DS01_PROJECT"] == "thesis" and env["DS01_IMAGE"] == "ds01-ada/thesis:latest"
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert env["DS01_UNSAVED_PACKAGES"] == "peft==0.13.2"
    assert container_env(plan())["NVIDIA_VISIBLE_DEVICES"] == "void"
