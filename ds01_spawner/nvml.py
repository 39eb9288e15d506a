"""What GPUs this host has, read through NVML (`pynvml`), or simulated.

The only module that talks to NVML. NVML is initialised once, on first use,
and shut down at exit; static facts (UUID, name, MIG layout) are read then,
while what changes (memory in use, utilization) is re-read on every
`GpuInventory.read()`, i.e. whenever a GPU is about to be chosen.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from dataclasses import dataclass, replace
from typing import Protocol

import pynvml

MIG_SLICES_PER_GPU = 7  # compute slices of a full A100/H100: a slice is 1/7 of a GPU


class GpuUnavailable(RuntimeError):
    """No usable NVML here (no driver, no library, CPU-only host)."""


@dataclass(frozen=True)
class GpuSlot:
    """Something a container can be given: a whole GPU, or one MIG device of one.

    `fraction` is its size in GPU-equivalents (1.0, or slices/7 for MIG);
    `utilization` is in percent, None where NVML cannot tell (MIG devices).
    """

    uuid: str
    index: str  # "2" for a GPU, "2:1" for MIG device 1 of GPU 2
    name: str
    memory_total: int
    memory_used: int
    utilization: int | None
    fraction: float = 1.0
    parent_uuid: str | None = None

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None

    @property
    def memory_free(self) -> int:
        return max(self.memory_total - self.memory_used, 0)


class GpuInventory(Protocol):
    def read(self) -> list[GpuSlot]: ...


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlInventory:
    """GPUs (and, on MIG-enabled GPUs, their MIG devices) as NVML reports them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False

    def _init(self) -> None:
        if self._ready:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise GpuUnavailable(f"NVML is not available on this host: {e}") from None
        self._ready = True
        atexit.register(self.close)

    def close(self) -> None:
        with self._lock:
            if self._ready:
                self._ready = False
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()

    def read(self) -> list[GpuSlot]:
        with self._lock:
            self._init()
            try:
                return self._read()
            except pynvml.NVMLError as e:
                raise GpuUnavailable(f"NVML could not list the GPUs: {e}") from None

    def _read(self) -> list[GpuSlot]:
        slots: list[GpuSlot] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            name = _text(pynvml.nvmlDeviceGetName(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None  # e.g. not supported while MIG is on
            if self._mig_enabled(handle):
                slots.extend(self._mig_slots(handle, i, uuid, name))
                continue
            slots.append(
                GpuSlot(uuid, str(i), name, int(memory.total), int(memory.used), utilization)
            )
        return slots

    @staticmethod
    def _mig_enabled(handle: object) -> bool:
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
        except pynvml.NVMLError:
            return False  # GPUs without MIG support answer NotSupported
        return current == pynvml.NVML_DEVICE_MIG_ENABLE

    @staticmethod
    def _mig_slots(handle: object, gpu: int, parent: str, name: str) -> list[GpuSlot]:
        slots = []
        for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
            except pynvml.NVMLError_NotFound:
                continue  # no MIG device configured at this position
            memory = pynvml.nvmlDeviceGetMemoryInfo(mig)
            slices = int(pynvml.nvmlDeviceGetAttributes(mig).gpuInstanceSliceCount)
            slots.append(
                GpuSlot(
                    uuid=_text(pynvml.nvmlDeviceGetUUID(mig)),
                    index=f"{gpu}:{j}",
                    name=f"{name} MIG {slices}g",
                    memory_total=int(memory.total),
                    memory_used=int(memory.used),
                    utilization=None,
                    fraction=round(slices / MIG_SLICES_PER_GPU, 4),
                    parent_uuid=parent,
                )
            )
        return slots


class SimulatedInventory:
    """N pretend GPUs for laptops and tests: same interface, nothing touches NVML.

    Their UUIDs look like real ones (``GPU-00000000-0000-4000-8000-00000000000N``)
    and they are passed to containers as environment variables only.
    """

    def __init__(self, count: int, memory_gib: int = 16) -> None:
        total = memory_gib * 1024**3
        self._slots = [
            GpuSlot(f"GPU-00000000-0000-4000-8000-{i:012d}", str(i), "Simulated GPU", total, 0, 0)
            for i in range(count)
        ]

    def read(self) -> list[GpuSlot]:
        return list(self._slots)

    def set_load(self, index: str, memory_used: int, utilization: int) -> None:
        """Pretend a process outside the hub uses GPU `index` (for trying policies)."""
        self._slots = [
            replace(s, memory_used=memory_used, utilization=utilization) if s.index == index else s
            for s in self._slots
        ]
