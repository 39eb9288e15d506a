"""The NVML inventory, run against a fake pynvml (the real code path, fake library)."""

import pynvml
import pytest

from ds01_spawner.nvml import GpuUnavailable, NvmlInventory, SimulatedInventory
from tests.fake_nvml import GIB, FakeGpu, FakeMig, FakeNvml, a100s


def test_reads_every_gpu_with_memory_and_utilization(monkeypatch):
    gpus = a100s(2)
    gpus[1].memory_used, gpus[1].utilization = 10 * GIB, 73
    FakeNvml(gpus).install(monkeypatch)
    slots = NvmlInventory().read()
    assert [(s.index, s.uuid) for s in slots] == [("0", gpus[0].uuid), ("1", gpus[1].uuid)]
    assert slots[1].memory_used == 10 * GIB and slots[1].utilization == 73
    assert slots[1].memory_free == 70 * GIB
    assert all(s.fraction == 1.0 and not s.is_mig for s in slots)


def test_initialises_once_and_rereads_what_changes(monkeypatch):
    gpus = a100s(1)
    fake = FakeNvml(gpus).install(monkeypatch)
    inventory = NvmlInventory()
    assert inventory.read()[0].utilization == 0
    gpus[0].utilization, gpus[0].memory_used = 95, 40 * GIB
    again = inventory.read()[0]
    assert (again.utilization, again.memory_used) == (95, 40 * GIB)
    assert fake.calls.count("init") == 1
    inventory.close()
    assert fake.calls[-1] == "shutdown" and fake.initialised == 0


def test_mig_enabled_gpu_lists_its_mig_devices(monkeypatch):
    mig_gpu = FakeGpu(
        "GPU-mig-parent",
        mig=[FakeMig("MIG-a", 3, 40 * GIB), None, FakeMig("MIG-b", 1, 10 * GIB, 2 * GIB)],
    )
    FakeNvml([*a100s(1), mig_gpu]).install(monkeypatch)
    slots = NvmlInventory().read()
    whole, a, b = slots
    assert not whole.is_mig
    assert (a.uuid, a.index, a.parent_uuid, a.fraction) == (
        "MIG-a",
        "1:0",
        "GPU-mig-parent",
        0.4286,
    )
    assert (b.uuid, b.index, b.fraction, b.memory_used) == ("MIG-b", "1:2", 0.1429, 2 * GIB)
    assert a.utilization is None and "MIG 3g" in a.name


@pytest.mark.parametrize(
    "code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED]
)
def test_no_driver_is_a_clear_error_not_a_traceback(monkeypatch, code):
    FakeNvml([], init_error=code).install(monkeypatch)
    with pytest.raises(GpuUnavailable, match="NVML is not available"):
        NvmlInventory().read()


def test_errors_while_reading_become_gpu_unavailable(monkeypatch):
    fake = FakeNvml(a100s(1)).install(monkeypatch)

    def lost(i):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lost)
    with pytest.raises(GpuUnavailable, match="could not list"):
        NvmlInventory().read()
    assert fake.calls == ["init"]


def test_simulated_gpus_look_like_real_ones():
    sim = SimulatedInventory(4)
    slots = sim.read()
    assert [s.index for s in slots] == ["0", "1", "2", "3"]
    assert len({s.uuid for s in slots}) == 4 and all(s.uuid.startswith("GPU-") for s in slots)
    sim.set_load("2", 8 * GIB, 90)
    assert sim.read()[2].utilization == 90 and sim.read()[0].utilization == 0
