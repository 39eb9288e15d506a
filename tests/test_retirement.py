"""Retirement decisions as pure functions of (limits, settings, server facts, GPU share, now)."""

from __future__ import annotations

from ds01_spawner.ledger import Holder
from ds01_spawner.limits import Limits, RetirementSettings
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.retirement import (
    Notices,
    Retirement,
    RetirementLog,
    ServerFacts,
    gpu_share,
    idle_limit,
    judge,
)

H, M = 3600.0, 60.0
SETTINGS = RetirementSettings(
    warn_before=10 * M, high_demand_share=0.5, high_demand_idle_factor=0.5
)
T0 = 1_800_000_000.0


def server(**kw) -> ServerFacts:
    return ServerFacts(**{"user": "alice", "server": "p", "project": "p", "started": T0, **kw})


def test_no_limits_keeps_forever():
    v = judge(Limits(), SETTINGS, server(), 0.0, T0 + 100 * H)
    assert v.action == "keep" and v.retire_at is None


def test_max_runtime_keep_warn_retire():
    limits = Limits(max_runtime=2 * H)
    assert judge(limits, SETTINGS, server(), 0, T0 + H).action == "keep"
    warn = judge(limits, SETTINGS, server(), 0, T0 + 2 * H - 5 * M)
    assert warn.action == "warn" and warn.reason == "max_runtime"
    assert "in 5m" in warn.message and "Save your work" in warn.message
    retire = judge(limits, SETTINGS, server(last_activity=T0 + 2 * H), 0, T0 + 2 * H)
    assert retire.action == "retire" and retire.reason == "max_runtime"
    assert "the limit (max_runtime) is 2h" in retire.message


def test_idle_counts_from_the_last_jupyter_activity():
    limits = Limits(idle_timeout=30 * M)
    active = server(last_activity=T0 + H)
    assert judge(limits, SETTINGS, active, 0, T0 + H + 29 * M).action == "warn"
    v = judge(limits, SETTINGS, active, 0, T0 + H + 31 * M)
    assert v.action == "retire" and v.reason == "idle_timeout"
    assert "idle (no Jupyter activity) for 31m" in v.message


def test_a_busy_gpu_is_activity():
    limits = Limits(idle_timeout=30 * M)
    facts = server(last_activity=T0, gpus=("GPU-1",), gpu_busy_at=T0 + 2 * H)
    assert judge(limits, SETTINGS, facts, 0, T0 + 2 * H + 20 * M).action != "retire"
    no_gpu_use = server(last_activity=T0, gpus=("GPU-1",), gpu_busy_at=None)
    v = judge(limits, SETTINGS, no_gpu_use, 0, T0 + 2 * H + 20 * M)
    assert v.action == "retire" and "and no GPU use" in v.message


def test_high_demand_shrinks_only_gpu_servers_idle_timeout():
    limits = Limits(idle_timeout=H)
    assert idle_limit(limits, SETTINGS, has_gpus=True, share=0.75) == 30 * M
    assert idle_limit(limits, SETTINGS, has_gpus=True, share=0.5) == H  # not *more* than
    assert idle_limit(limits, SETTINGS, has_gpus=False, share=1.0) == H
    gpu = server(gpus=("GPU-1",))
    v = judge(limits, SETTINGS, gpu, 0.9, T0 + 35 * M)
    assert v.action == "retire" and "shortened while more than 50% of GPUs" in v.message
    assert judge(limits, SETTINGS, gpu, 0.1, T0 + 35 * M).action == "keep"


def test_the_earliest_limit_decides():
    limits = Limits(max_runtime=10 * H, idle_timeout=H)
    v = judge(limits, SETTINGS, server(last_activity=T0 + 9.5 * H), 0, T0 + 10 * H)
    assert v.reason == "max_runtime" and v.action == "retire"
    assert v.runtime_left == 0 and v.idle_left == 30 * M


def test_gpu_share_counts_mig_slices_by_size():
    slots = [
        GpuSlot("G0", "0", "A100", 1, 0, 0),
        GpuSlot("M1", "1:0", "MIG", 1, 0, None, 3 / 7, "G1"),
        GpuSlot("M2", "1:1", "MIG", 1, 0, None, 4 / 7, "G1"),
    ]
    holders = [Holder("M2", "a", "p", "s", ""), Holder("M2", "b", "q", "t", "")]
    assert round(gpu_share(slots, holders), 4) == round((4 / 7) / 2, 4)
    assert gpu_share([], holders) == 0.0


def test_retirement_log_is_newest_first_and_per_user(tmp_path):
    log = RetirementLog(str(tmp_path))
    log.add(Retirement("a", "s1", "p1", "idle_timeout", "idle", 1.0))
    log.add(Retirement("b", "s2", "p2", "max_runtime", "long", 2.0))
    assert [e.user for e in log.recent()] == ["b", "a"]
    assert [e.project for e in log.recent(user="a")] == ["p1"]
    assert not log.retired_lately("a", "s1"), "long ago"


def test_notices_per_user(tmp_path):
    notices = Notices(str(tmp_path))
    assert notices.warnings("a") == []
    notices.write({"a": [{"message": "soon"}]})
    assert notices.warnings("a") == [{"message": "soon"}] and notices.warnings("b") == []
