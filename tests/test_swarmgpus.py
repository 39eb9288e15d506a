"""A node's swarm GPU declaration, from a fake NVML at the pynvml boundary (the real
inventory code runs), and the daemon.json merge it writes."""

import json
import stat

import pytest

from ds01_spawner import swarmgpus
from ds01_spawner.nvml import NvmlInventory
from tests.fake_nvml import GIB, FakeGpu, FakeMig, FakeNvml, a100s


def read_slots(monkeypatch, gpus):
    FakeNvml(gpus).install(monkeypatch)
    return NvmlInventory().read()


def mig_a100():
    """An A100 split into a 3g (40 GiB) and two 1g (10 GiB) MIG devices."""
    return FakeGpu(
        "GPU-mig-parent",
        mig=[
            FakeMig("MIG-3g", 3, 40 * GIB),
            FakeMig("MIG-1a", 1, 10 * GIB),
            None,  # a free position
            FakeMig("MIG-1b", 1, 10 * GIB),
        ],
    )


def test_each_whole_gpu_is_one_nvidia_gpu_resource_named_by_its_uuid(monkeypatch):
    gpus = a100s(2)
    slots = read_slots(monkeypatch, gpus)
    assert swarmgpus.generic_resources(slots) == [
        f"NVIDIA-GPU={gpus[0].uuid}",
        f"NVIDIA-GPU={gpus[1].uuid}",
    ]


def test_mig_devices_are_one_kind_per_size_and_their_parent_is_not_declared(monkeypatch):
    slots = read_slots(monkeypatch, [*a100s(1), mig_a100()])
    resources = swarmgpus.generic_resources(slots)
    assert resources[1:] == ["NVIDIA-MIG-3G=MIG-3g", "NVIDIA-MIG-1G=MIG-1a", "NVIDIA-MIG-1G=MIG-1b"]
    assert not any("GPU-mig-parent" in r for r in resources)


def test_the_variable_swarm_sets_is_the_kind_upper_cased():
    assert swarmgpus.resource_env("NVIDIA-GPU") == "DOCKER_RESOURCE_NVIDIA-GPU"
    assert swarmgpus.resource_env("NVIDIA-MIG-3G") == "DOCKER_RESOURCE_NVIDIA-MIG-3G"


def test_runtime_setting_names_every_declared_kind_whole_gpus_first(monkeypatch):
    slots = read_slots(monkeypatch, [*a100s(1), mig_a100()])
    assert swarmgpus.runtime_config_line(slots) == (
        'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU,'
        'DOCKER_RESOURCE_NVIDIA-MIG-1G,DOCKER_RESOURCE_NVIDIA-MIG-3G"'
    )


def test_runtime_setting_always_names_whole_gpus_even_on_an_all_mig_node(monkeypatch):
    slots = read_slots(monkeypatch, [mig_a100()])
    assert swarmgpus.swarm_resource(slots).startswith("DOCKER_RESOURCE_NVIDIA-GPU,")


def test_labels_count_whole_gpus_memory_and_model(monkeypatch):
    labels = swarmgpus.node_labels(read_slots(monkeypatch, a100s(4)))
    assert labels["ds01.gpu.count"] == "4"
    assert labels["ds01.gpu.model"] == "NVIDIA A100-SXM4-80GB"
    assert labels["ds01.gpu.memory"] == str(80 * 1024)
    assert labels["ds01.gpu.equivalents"] == "4"
    assert (labels["ds01.gpu.mig.count"], labels["ds01.gpu.mig"]) == ("0", "")


def test_labels_give_mig_sizes_largest_first_and_count_gpu_equivalents(monkeypatch):
    labels = swarmgpus.node_labels(read_slots(monkeypatch, [*a100s(1), mig_a100()]))
    assert labels["ds01.gpu.count"] == "1"
    assert labels["ds01.gpu.mig.count"] == "3"
    assert labels["ds01.gpu.mig"] == "3g:1,1g:2"
    assert labels["ds01.gpu.mig.memory"] == f"3g:{40 * 1024},1g:{10 * 1024}"
    assert labels["ds01.gpu.equivalents"] == "1.7143"  # 1 + (3 + 1 + 1) / 7
    assert labels["ds01.gpu.model"] == "NVIDIA A100-SXM4-80GB"  # the MIG parent's, once


def test_labels_are_always_the_same_keys_so_a_redeclaration_overwrites_them(monkeypatch):
    with_mig = swarmgpus.node_labels(read_slots(monkeypatch, [mig_a100()]))
    without = swarmgpus.node_labels(read_slots(monkeypatch, a100s(1)))
    assert set(with_mig) == set(without) == set(swarmgpus.LABELS)


def test_label_command_quotes_a_model_name_with_spaces():
    command = swarmgpus.label_command("gpu1", {"ds01.gpu.model": "Tesla V100 SXM2"})
    assert command == "docker node update --label-add 'ds01.gpu.model=Tesla V100 SXM2' gpu1"


def test_merge_keeps_other_settings_and_other_generic_resources(monkeypatch):
    existing = {
        "log-driver": "journald",
        "node-generic-resources": ["FPGA=fpga0", "NVIDIA-GPU=GPU-gone", "NVIDIA-MIG-1G=MIG-gone"],
    }
    slots = read_slots(monkeypatch, a100s(1))
    merged, warnings = swarmgpus.merge_daemon_json(existing, slots)
    assert merged["log-driver"] == "journald"
    assert merged["node-generic-resources"] == ["FPGA=fpga0", f"NVIDIA-GPU={slots[0].uuid}"]
    assert merged["default-runtime"] == "nvidia"
    assert merged["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"
    assert warnings == []
    assert existing["node-generic-resources"][1] == "NVIDIA-GPU=GPU-gone"  # not modified


def test_merge_never_overrides_a_runtime_the_admin_set_but_warns(monkeypatch):
    existing = {
        "default-runtime": "runc",
        "runtimes": {"nvidia": {"path": "/opt/nvidia/runtime"}},
    }
    merged, warnings = swarmgpus.merge_daemon_json(existing, read_slots(monkeypatch, a100s(1)))
    assert merged["default-runtime"] == "runc"
    assert merged["runtimes"]["nvidia"] == {"path": "/opt/nvidia/runtime"}
    assert len(warnings) == 1 and '"nvidia"' in warnings[0]


def test_merge_without_the_nvidia_runtime_leaves_runtimes_alone(monkeypatch):
    merged, _ = swarmgpus.merge_daemon_json({}, read_slots(monkeypatch, a100s(1)), False)
    assert set(merged) == {"node-generic-resources"}


def test_write_daemon_json_merges_into_the_file_and_keeps_its_mode(monkeypatch, tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps({"data-root": "/srv/docker"}))
    path.chmod(0o600)
    slots = read_slots(monkeypatch, a100s(2))
    swarmgpus.write_daemon_json(path, slots)
    written = json.loads(path.read_text())
    assert written["data-root"] == "/srv/docker"
    assert len(written["node-generic-resources"]) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]  # no temporary left


def test_write_daemon_json_creates_a_missing_file(monkeypatch, tmp_path):
    path = tmp_path / "docker" / "daemon.json"
    swarmgpus.write_daemon_json(path, read_slots(monkeypatch, a100s(1)), settings={"debug": True})
    written = json.loads(path.read_text())
    assert written["debug"] is True and written["default-runtime"] == "nvidia"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_daemon_json_refuses_a_broken_file_and_leaves_it_as_it_was(monkeypatch, tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"debug": true,')
    with pytest.raises(swarmgpus.DeclarationError, match="not valid JSON"):
        swarmgpus.write_daemon_json(path, read_slots(monkeypatch, a100s(1)))
    assert path.read_text() == '{"debug": true,'


def test_command_prints_the_three_steps(monkeypatch, capsys):
    FakeNvml(a100s(2)).install(monkeypatch)
    assert swarmgpus.main(["--node", "gpu1"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA-GPU=GPU-aaaaaaaa-0000-4000-8000-000000000001" in out
    assert 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"' in out
    assert out.rstrip().endswith("--label-add ds01.gpu.equivalents=2 gpu1")


def test_command_json_has_every_part(monkeypatch, capsys):
    FakeNvml([*a100s(1), mig_a100()]).install(monkeypatch)
    assert swarmgpus.main(["--json", "--node", "gpu1"]) == 0
    declared = json.loads(capsys.readouterr().out)
    assert declared["node"] == "gpu1"
    assert declared["generic_resources"][0].startswith("NVIDIA-GPU=")
    assert declared["daemon_json"]["node-generic-resources"] == declared["generic_resources"]
    assert declared["labels"]["ds01.gpu.mig"] == "3g:1,1g:2"
    assert [g["kind"] for g in declared["gpus"]] == [
        "NVIDIA-GPU",
        "NVIDIA-MIG-3G",
        "NVIDIA-MIG-1G",
        "NVIDIA-MIG-1G",
    ]
    assert declared["gpus"][1]["equivalents"] == 0.4286


def test_command_writes_daemon_json_when_asked(monkeypatch, tmp_path, capsys):
    FakeNvml(a100s(1)).install(monkeypatch)
    path = tmp_path / "daemon.json"
    assert swarmgpus.main(["--write-daemon-json", str(path), "--no-nvidia-runtime"]) == 0
    assert set(json.loads(path.read_text())) == {"node-generic-resources"}
    assert f"wrote {path}" in capsys.readouterr().err


def test_command_without_nvml_says_so_and_fails(monkeypatch, capsys):
    import pynvml

    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    assert swarmgpus.main([]) == 1
    err = capsys.readouterr().err
    assert "NVML is not available" in err and "--simulate" in err


def test_command_can_simulate_gpus(capsys):
    assert swarmgpus.main(["--simulate", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generic_resources"]) == 3
