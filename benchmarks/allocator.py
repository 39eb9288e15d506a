"""Benchmark 3: one GPU decision on a big, busy server (the pure functions, no I/O).

64 physical GPUs: 56 whole ones and 8 in MIG mode with seven 1g slices each
(112 slots), shared by up to 16 servers each, 1,000 ledger entries of 400
users. Every spawn that asks for a GPU pays for one `holders_from_containers`
over the engine's containers and one `choose` (twice: the early check and the
locked decision).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from statistics import median, quantiles
from time import perf_counter_ns

from ds01_spawner import labels
from ds01_spawner.gpus import GpuPolicy, GpuRequest, choose
from ds01_spawner.ledger import Holder, gpu_labels, holders_from_containers
from ds01_spawner.nvml import GpuSlot

GIB = 1024**3
WHOLE, MIG_GPUS, SLICES = 56, 8, 7
POLICY = GpuPolicy(max_per_user=2, containers_per_gpu=16, offer_mig=True)


def big_server(rng: random.Random) -> list[GpuSlot]:
    slots = [
        GpuSlot(
            f"GPU-{i:04d}",
            str(i),
            "NVIDIA H100 80GB",
            80 * GIB,
            rng.randrange(0, 6) * GIB,
            rng.randrange(0, 10),
        )
        for i in range(WHOLE)
    ]
    for g in range(WHOLE, WHOLE + MIG_GPUS):
        slots += [
            GpuSlot(
                f"MIG-{g:04d}-{j}",
                f"{g}:{j}",
                "NVIDIA H100 80GB MIG 1g",
                10 * GIB,
                rng.randrange(0, 2) * GIB // 2,
                None,
                round(1 / SLICES, 4),
                f"GPU-{g:04d}",
            )
            for j in range(SLICES)
        ]
    return slots


def busy_ledger(slots: list[GpuSlot], rng: random.Random, entries: int = 1000) -> list[Holder]:
    per_slot: Counter[str] = Counter()
    holders = []
    while len(holders) < entries:
        slot = rng.choice(slots)
        if per_slot[slot.uuid] >= POLICY.containers_per_gpu - 1:  # leave room to choose from
            continue
        per_slot[slot.uuid] += 1
        n = len(holders)
        user = f"user{rng.randrange(400):03d}"
        holders.append(
            Holder(slot.uuid, user, f"p{n}", f"p{n}", "2024-01-01T00:00:00Z", slot.fraction)
        )
    return holders


def as_containers(holders: list[Holder], slots: list[GpuSlot]) -> list[dict]:
    """The docker API's container list that records this ledger."""
    by_uuid = {s.uuid: s for s in slots}
    return [
        {
            "Names": [f"/ds01-{h.user}--{h.project}"],
            "State": "running",
            "Labels": {
                **labels.project_labels(h.user, h.project, "base"),  # managed, role=project
                labels.SERVER_NAME: h.server,
                **gpu_labels([by_uuid[h.uuid]], h.since),
            },
        }
        for h in holders
    ]


def timed(fn: Callable[[], object], calls: int, warmup: int = 20) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        t0 = perf_counter_ns()
        fn()
        samples.append((perf_counter_ns() - t0) / 1000)
    p95 = quantiles(samples, n=20, method="inclusive")[18]
    return {"calls": calls, "median_us": round(median(samples), 1), "p95_us": round(p95, 1)}


def allocator_times(calls: int = 200) -> dict:
    rng = random.Random(1)
    slots = big_server(rng)
    holders = busy_ledger(slots, rng)
    containers = as_containers(holders, slots)
    assert len(holders_from_containers(containers)) == len(holders)
    whole = GpuRequest("newcomer", "thesis", "thesis", 1)
    mig = GpuRequest("newcomer", "thesis", "thesis", 1, mig=True)
    assert len(choose(slots, holders, whole, POLICY)) == 1
    assert choose(slots, holders, mig, POLICY)[0].is_mig

    def full_decision() -> None:
        choose(slots, holders_from_containers(containers), whole, POLICY)

    return {
        "gpus": WHOLE + MIG_GPUS,
        "slots": len(slots),
        "holders": len(holders),
        "choose_whole_gpu": timed(lambda: choose(slots, holders, whole, POLICY), calls),
        "choose_mig_slice": timed(lambda: choose(slots, holders, mig, POLICY), calls),
        "holders_from_1000_containers": timed(
            lambda: holders_from_containers(containers), calls // 4
        ),
        "ledger_plus_choose": timed(full_decision, calls // 4),
    }
