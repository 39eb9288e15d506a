"""The container request, pinned without a hub or an engine (as KubeSpawner's make_pod)."""

import pytest

from ds01_spawner import labels
from ds01_spawner.container import (
    ContainerPlan,
    container_env,
    describe_limits,
    harden_request,
    limit_settings,
    service_url,
)
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
    env = container_env(plan(gpus=(SLOT,), unsaved_packages=("peft==0.13.2",)))
    assert env["DS01_PROJECT"] == "thesis" and env["DS01_IMAGE"] == "ds01-ada/thesis:latest"
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert env["DS01_UNSAVED_PACKAGES"] == "peft==0.13.2"
    assert container_env(plan())["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_the_workspace_and_nothing_else_is_mounted_at_the_mount_point():
    kwargs = {
        "name": "c",
        "volumes": ["/data"],
        "host_config": {"Binds": ["/srv/other:/workspace:rw", "/srv/data:/data:ro"]},
    }
    out = request(kwargs, workspace="/srv/ds01/workspaces/ada/thesis")
    assert out["host_config"]["Binds"] == [
        "/srv/data:/data:ro",
        "/srv/ds01/workspaces/ada/thesis:/workspace:rw",
    ]
    assert out["volumes"] == ["/data", "/workspace"]


def test_ds01s_variables_win_over_the_configs_and_the_policy_sets_the_limit_variables():
    limits = Limits(memory=2 * GIB, max_cpus=1.5)
    kwargs = {"name": "c", "environment": {"NVIDIA_VISIBLE_DEVICES": "all", "LANG": "C.UTF-8"}}
    env = request(kwargs, limits=limits)["environment"]
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and env["LANG"] == "C.UTF-8"
    assert (env["MEM_LIMIT"], env["CPU_LIMIT"]) == (str(2 * GIB), "1.5")
    listed = request({"name": "c", "environment": ["A=1", "DS01_PROJECT=forged"]})["environment"]
    assert listed["A"] == "1" and listed["DS01_PROJECT"] == "thesis"
    assert "MEM_LIMIT" not in container_env(plan()), "no policy: DockerSpawner's own settings"


def test_the_saved_state_reads_back_as_the_same_plan():
    saved = plan(workspace="/w/ada/thesis", gpus=(SLOT,), limits=Limits(memory=GIB))
    again = ContainerPlan.from_state(saved.to_state(), owner="ada", server="thesis")
    kept = ("owner", "server", "project", "project_type", "image", "ids", "workspace")
    assert {k: getattr(again, k) for k in kept} == {k: getattr(saved, k) for k in kept}
    assert again.to_state() == saved.to_state()
    assert ContainerPlan.from_state({}, owner="ada", server="") is None


def test_a_state_written_before_the_start_plan_still_reads():
    old = {
        "project": "thesis",
        "type": "cv",
        "workspace": "/w",
        "image": "i",
        "uid": 20001,
        "gid": 20001,
    }
    again = ContainerPlan.from_state(old, owner="ada", server="thesis")
    assert again.ids == UserIds(20001, 20001, "state") and again.project_type == "cv"


def test_the_limits_are_described_for_the_spawn_page():
    assert describe_limits(Limits(max_cpus=2, memory=GIB)) == "Limits: CPUs 2, memory 1G"
    assert describe_limits(None) == describe_limits(Limits()) == ""


@pytest.mark.parametrize(
    ("hub_base_url", "url"),
    [
        ("/hub/", "http://h:1/services/ds01/"),
        ("/jh/hub/", "http://h:1/jh/services/ds01/"),
        ("", "http://h:1/services/ds01/"),  # no hub at hand
    ],
)
def test_the_service_url_follows_the_hubs_base_url(hub_base_url, url):
    assert service_url("http://h:1{base_url}services/ds01/", hub_base_url) == url


def test_a_service_url_without_the_placeholder_is_kept_as_it_is():
    assert service_url("http://ds01.lab/", "/jh/hub/") == "http://ds01.lab/"


def test_the_terminal_commands_are_told_where_the_service_is():
    env = container_env(plan(service_url="http://172.17.0.1:10101/services/ds01/"))
    assert env["DS01_SERVICE_URL"] == "http://172.17.0.1:10101/services/ds01/"
    assert "DS01_SERVICE_URL" not in container_env(plan())
