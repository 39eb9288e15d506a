"""Retirement decisions as pure functions of (limits, settings, server facts, GPU share, now):
limits, warnings at thresholds (each sent once), .keep-alive, exemptions, CPU and network."""

from __future__ import annotations

from ds01_spawner.activity import Counters, Rates, is_quiet, measures_use, rates, read_counters
from ds01_spawner.checkmemory import CheckMemory, Remembered, is_new, keep_alive_time, observe, sent
from ds01_spawner.exemptions import Exemption, exemptions_for
from ds01_spawner.ledger import Holder
from ds01_spawner.limits import Limits, RetirementSettings
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.retirement import (
    Notices,
    Retirement,
    RetirementLog,
    ServerFacts,
    exempted,
    gpu_share,
    idle_limit,
    judge,
    keep_alive_end,
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


# ---------------------------------------------------------------- warnings at thresholds

DEFAULTS = RetirementSettings()  # idle: 80 % and 95 %; runtime: 75 % and 90 %; no warn_before


def checks(limits, facts, start: float, stop: float, settings=DEFAULTS, every: float = M):
    """Judge every `every` seconds like the loop; the warnings sent, once each, in order."""
    memory = Remembered(facts.started)
    out = []
    now = start
    while now <= stop:
        verdict = judge(limits, settings, facts, 0, now)
        for w in verdict.warnings:
            if is_new(memory, w):
                memory = sent(memory, w)
                out.append((w.reason, w.level))
        if verdict.action == "retire":
            out.append((verdict.reason, "retire"))
            break
        now += every
    return out


def test_idle_warnings_come_at_80_and_95_percent_then_the_retirement():
    limits = Limits(idle_timeout=100 * M)
    facts = server(last_activity=T0)
    assert judge(limits, DEFAULTS, facts, 0, T0 + 79 * M).action == "keep"
    v = judge(limits, DEFAULTS, facts, 0, T0 + 80 * M)
    assert (v.action, v.reason, v.level) == ("warn", "idle_timeout", 0.8)
    assert "will be retired at" in v.message and "(in 20m) if it stays idle" in v.message
    assert "touch /workspace/.keep-alive" in v.message
    assert judge(limits, DEFAULTS, facts, 0, T0 + 96 * M).level == 0.95


def test_each_threshold_is_sent_once_however_many_checks_see_it():
    sent_ = checks(Limits(idle_timeout=100 * M), server(last_activity=T0), T0, T0 + 200 * M)
    assert sent_ == [("idle_timeout", 0.8), ("idle_timeout", 0.95), ("idle_timeout", "retire")]


def test_runtime_warnings_come_at_75_and_90_percent():
    sent_ = checks(Limits(max_runtime=4 * H), server(last_activity=T0 + 10 * H), T0, T0 + 5 * H)
    assert sent_ == [("max_runtime", 0.75), ("max_runtime", 0.9), ("max_runtime", "retire")]
    v = judge(Limits(max_runtime=4 * H), DEFAULTS, server(), 0, T0 + 3 * H)
    assert v.level == 0.75 and "Save your work" in v.message and "(in 1h)" in v.message


def test_a_check_past_both_thresholds_sends_the_highest_only():
    sent_ = checks(Limits(idle_timeout=10 * M), server(), T0, T0 + 20 * M, every=9.6 * M)
    assert sent_ == [("idle_timeout", 0.95), ("idle_timeout", "retire")]


def test_each_limit_warns_on_its_own():
    limits = Limits(max_runtime=10 * H, idle_timeout=H)
    facts = server(last_activity=T0 + 7.4 * H)
    v = judge(limits, DEFAULTS, facts, 0, T0 + 8.3 * H)  # runtime 83 %, idle 90 %
    assert {(w.reason, w.level) for w in v.warnings} == {
        ("max_runtime", 0.75),
        ("idle_timeout", 0.8),
    }
    assert v.reason == "idle_timeout", "the banner shows the most urgent"


def test_use_restarts_the_idle_clock_and_its_warnings():
    limits = Limits(idle_timeout=100 * M)
    first = judge(limits, DEFAULTS, server(last_activity=T0), 0, T0 + 81 * M).warnings[0]
    memory = sent(Remembered(T0), first)
    again = judge(limits, DEFAULTS, server(last_activity=T0 + 90 * M), 0, T0 + 171 * M)
    assert again.warnings[0].level == 0.8 and is_new(memory, again.warnings[0])


def test_warnings_can_be_turned_off_and_warn_before_still_works():
    quiet = RetirementSettings(warn_idle=(), warn_runtime=())
    limits = Limits(max_runtime=2 * H)
    assert judge(limits, quiet, server(), 0, T0 + 2 * H - 1).action == "keep"
    old = RetirementSettings(warn_idle=(), warn_runtime=(), warn_before=15 * M)
    assert judge(limits, old, server(), 0, T0 + 100 * M).action == "keep"
    v = judge(limits, old, server(), 0, T0 + 106 * M)
    assert v.action == "warn" and v.level == 0.875  # 15m before 2h


def test_check_memory_survives_a_restart_and_forgets_an_earlier_run(tmp_path):
    memory = CheckMemory(str(tmp_path))
    w = judge(Limits(idle_timeout=H), DEFAULTS, server(), 0, T0 + 50 * M).warnings[0]
    memory.servers[("alice", "p")] = sent(
        Remembered(T0, counters=Counters("c1", T0, 5, 7), quiet_checks=2, busy_at=T0 + 1), w
    )
    memory.save()
    again = CheckMemory(str(tmp_path))
    remembered = again.get(("alice", "p"), T0)
    assert remembered == memory.servers[("alice", "p")] and not is_new(remembered, w)
    assert again.get(("alice", "p"), T0 + 5) is None, "started again: a new run"
    (tmp_path / "retirement-memory.json").write_text("{not json")
    assert CheckMemory(str(tmp_path)).servers == {}


# ---------------------------------------------------------------- .keep-alive

DAY = 24 * H


def test_a_fresh_keep_alive_holds_off_idle_retirement_and_its_warnings():
    limits = Limits(idle_timeout=H)
    facts = server(last_activity=T0, keep_alive_at=T0 + 10 * H)
    v = judge(limits, DEFAULTS, facts, 0, T0 + 20 * H)
    assert v.action == "keep" and v.warnings == () and v.keep_alive_until == T0 + 34 * H


def test_a_keep_alive_never_holds_off_max_runtime():
    limits = Limits(idle_timeout=H, max_runtime=12 * H)
    facts = server(keep_alive_at=T0 + 11 * H)
    assert judge(limits, DEFAULTS, facts, 0, T0 + 12 * H).reason == "max_runtime"
    assert judge(limits, DEFAULTS, facts, 0, T0 + 12 * H).action == "retire"


def test_a_stale_keep_alive_is_use_until_it_lapsed_then_the_idle_clock_runs():
    limits = Limits(idle_timeout=H)
    facts = server(last_activity=T0, keep_alive_at=T0 + H)  # lapsed at T0 + 25h
    assert judge(limits, DEFAULTS, facts, 0, T0 + 25 * H + 47 * M).action == "keep"
    v = judge(limits, DEFAULTS, facts, 0, T0 + 25 * H + 49 * M)
    assert v.action == "warn" and v.level == 0.8 and v.keep_alive_until is None
    assert judge(limits, DEFAULTS, facts, 0, T0 + 26 * H).action == "retire"


def test_a_keep_alive_in_the_future_counts_from_when_it_was_first_seen():
    future = T0 + 365 * DAY
    at, seen = keep_alive_time(None, future, T0)
    assert at == T0 and seen == (future, T0)
    remembered = Remembered(T0, keep_alive_seen=seen)
    assert keep_alive_time(remembered, future, T0 + 30 * H) == (T0, seen), "not sliding"
    facts = server(last_activity=T0, keep_alive_at=T0)
    assert judge(Limits(idle_timeout=H), DEFAULTS, facts, 0, T0 + 25 * H).action == "retire"
    assert keep_alive_end(server(keep_alive_at=future), DEFAULTS, T0) == T0 + DAY
    assert keep_alive_time(remembered, T0 - 5, T0) == (T0 - 5, None), "a past mtime as it is"


def test_keep_alive_off_ignores_the_file():
    off = RetirementSettings(keep_alive_max=None)
    facts = server(keep_alive_at=T0 + 50 * M)
    assert judge(Limits(idle_timeout=H), off, facts, 0, T0 + H).action == "retire"


# ---------------------------------------------------------------- exemptions


def exemption(**kw) -> Exemption:
    return Exemption(
        **{
            "who": "user",
            "name": "alice",
            "lifts": ("idle_timeout",),
            "until": T0 + DAY,
            "until_text": "2027-01-31",
            **kw,
        }
    )


def test_an_exemption_lifts_only_what_it_names():
    limits = Limits(idle_timeout=H, max_runtime=2 * H, sources={"idle_timeout": "defaults"})
    lifted = exempted(limits, [exemption(reason="thesis")])
    assert lifted.idle_timeout is None and lifted.max_runtime == 2 * H
    assert lifted.sources["idle_timeout"] == "exemption (user alice) until 2027-01-31"
    assert judge(lifted, DEFAULTS, server(), 0, T0 + 2 * H).reason == "max_runtime"
    assert exempted(limits, []) is limits


def test_exemptions_apply_by_user_or_group_until_they_expire():
    group = exemption(who="group", name="phd")
    both = [exemption(), group, exemption(name="bob")]
    assert exemptions_for(both, "alice", ["phd"], T0) == [exemption(), group]
    assert exemptions_for(both, "carol", ["phd"], T0) == [group]
    assert exemptions_for(both, "alice", [], T0 + DAY) == [], "expired: ignored"
    assert exemption().describe(T0 + DAY)["in_force"] is False


# ---------------------------------------------------------------- CPU and network

STATS = {
    "cpu_stats": {"cpu_usage": {"total_usage": 10_000_000_000}},
    "networks": {"eth0": {"rx_bytes": 1000, "tx_bytes": 500}, "eth1": {"rx_bytes": 1}},
}


def test_counters_from_the_engines_stats():
    assert read_counters(STATS, "c1", T0) == Counters("c1", T0, 10_000_000_000, 1501)
    no_net = read_counters({"cpu_stats": STATS["cpu_stats"]}, "c1", T0)
    assert no_net.net_bytes is None
    assert read_counters({"cpu_stats": {}}, "c1", T0) is None, "a stopped container"


def test_rates_between_two_readings():
    before = Counters("c1", T0, 0, 0)
    use = rates(before, Counters("c1", T0 + 60, 30 * 10**9, 600_000))
    assert use == Rates(50.0, 10.0), "30 CPU-seconds in a minute: half a CPU; 10 kB/s"
    assert rates(None, before) is None, "a first reading tells nothing"
    assert rates(before, Counters("c2", T0 + 60, 1, 1)) is None, "another container"
    assert rates(Counters("c1", T0, 5, 0), Counters("c1", T0 + 60, 1, 0)) is None
    assert rates(Counters("c1", T0, 0, None), Counters("c1", T0 + 1, 0, None)).network_kbps is None


def test_quiet_means_cpu_and_network_under_their_thresholds():
    s = RetirementSettings(idle_cpu_percent=10, idle_network_kbps=10)
    assert is_quiet(Rates(9.9, 9.9), s) is True
    assert is_quiet(Rates(10, 0), s) is False and is_quiet(Rates(0, 10), s) is False
    assert is_quiet(Rates(0, None), s) is True, "no network of its own"
    assert is_quiet(None, s) is None
    assert is_quiet(Rates(500, 0), RetirementSettings(idle_cpu_percent=None)) is True
    assert not measures_use(RetirementSettings(idle_cpu_percent=None, idle_network_kbps=None))


def reading(minute: int, cpu_seconds: float) -> Counters:
    return Counters("c1", T0 + minute * M, int(cpu_seconds * 1e9), 0)


def test_the_quiet_streak_and_when_it_was_last_busy():
    s = RetirementSettings()
    r = Remembered(T0)
    for minute, cpu_seconds in [(1, 0), (2, 1), (3, 40), (4, 41), (5, 42)]:
        r = observe(r, reading(minute, cpu_seconds), False, s, T0 + minute * M)
    assert r.busy_at == T0 + 3 * M and r.quiet_checks == 2
    r = observe(r, None, True, s, T0 + 6 * M)
    assert r.quiet_checks == 0 and r.gpu_busy_at == T0 + 6 * M, "no reading: not quiet"
    assert r.counters == reading(5, 42), "the last reading stays for the next delta"


def test_idle_needs_the_detection_window_of_quiet_checks():
    limits = Limits(idle_timeout=30 * M)
    s = RetirementSettings(idle_detection_window=3)
    unsure = server(last_activity=T0, quiet_checks=2)
    v = judge(limits, s, unsure, 0, T0 + 5 * H)
    assert v.action == "keep" and v.warnings == (), "two quiet checks are not yet idle"
    sure = judge(limits, s, server(last_activity=T0, quiet_checks=3), 0, T0 + 5 * H)
    assert sure.action == "retire"
    assert "CPU under 10% and network under 10 kB/s" in sure.message


def test_a_busy_cpu_in_the_window_restarts_the_idle_clock():
    limits = Limits(idle_timeout=30 * M)
    facts = server(last_activity=T0, busy_at=T0 + 2 * H, quiet_checks=5)
    v = judge(limits, DEFAULTS, facts, 0, T0 + 2 * H + 20 * M)
    assert v.action == "keep" and v.idle_left == 10 * M
    assert judge(limits, DEFAULTS, facts, 0, T0 + 2 * H + 30 * M).action == "retire"
