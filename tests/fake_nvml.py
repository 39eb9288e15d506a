"""A fake NVML at the `pynvml` function boundary: the real NvmlInventory code runs on it.

Install with `FakeNvml([...]).install(monkeypatch)`; every pynvml function the
inventory calls is replaced, and errors are real `pynvml.NVMLError`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

GIB = 1024**3


@dataclass
class FakeMig:
    uuid: str
    slices: int
    memory_total: int
    memory_used: int = 0


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_total: int = 80 * GIB
    memory_used: int = 0
    utilization: int = 0
    mig: list[FakeMig | None] | None = None  # None: MIG unsupported; list: MIG on, by position


@dataclass
class FakeNvml:
    gpus: list[FakeGpu]
    init_error: int | None = None  # e.g. pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    calls: list[str] = field(default_factory=list)
    initialised: int = 0

    def install(self, monkeypatch) -> FakeNvml:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    # -- the pynvml API used by ds01_spawner.nvml
    def nvmlInit(self):
        self.calls.append("init")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self.calls.append("shutdown")
        self.initialised -= 1

    def _check(self):
        if self.initialised <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlDeviceGetCount(self):
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        self._check()
        if not 0 <= i < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return ("gpu", i)

    def _obj(self, handle):
        kind, *where = handle
        gpu = self.gpus[where[0]]
        return gpu if kind == "gpu" else gpu.mig[where[1]]

    def nvmlDeviceGetUUID(self, handle):
        return self._obj(handle).uuid

    def nvmlDeviceGetName(self, handle):
        return self._obj(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        o = self._obj(handle)
        return SimpleNamespace(
            total=o.memory_total, used=o.memory_used, free=o.memory_total - o.memory_used
        )

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._obj(handle)
        if gpu.mig is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetMigMode(self, handle):
        gpu = self._obj(handle)
        if gpu.mig is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return (pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, j):
        gpu = self._obj(handle)
        if j >= len(gpu.mig) or gpu.mig[j] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return ("mig", handle[1], j)

    def nvmlDeviceGetAttributes(self, handle):
        return SimpleNamespace(gpuInstanceSliceCount=self._obj(handle).slices)


def a100s(n: int, **kw) -> list[FakeGpu]:
    return [FakeGpu(f"GPU-aaaaaaaa-0000-4000-8000-{i:012d}", **kw) for i in range(n)]
