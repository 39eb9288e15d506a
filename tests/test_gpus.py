"""GPU choice, the ledger read from container labels, the admin report and the allocator."""

from __future__ import annotations

import asyncio
import time

import pytest

from ds01_spawner import labels
from ds01_spawner.gpus import GpuAllocator, GpuPolicy, GpuRefusal, GpuRequest, choose
from ds01_spawner.ledger import (
    GpuHolds,
    Hold,
    Holder,
    LedgerSeal,
    gpu_labels,
    gpu_report,
    holders_from_containers,
)
from ds01_spawner.nvml import GpuSlot, SimulatedInventory

GIB = 1024**3
EXCLUSIVE = GpuPolicy()


def gpu(i: int, *, used_gib: float = 0, util: int | None = 0, total_gib: int = 80) -> GpuSlot:
    return GpuSlot(
        uuid=f"GPU-{i}",
        index=str(i),
        name="A100",
        memory_total=total_gib * GIB,
        memory_used=int(used_gib * GIB),
        utilization=util,
    )


def mig(parent: int, j: int, slices: int = 1, *, used_gib: float = 0) -> GpuSlot:
    return GpuSlot(
        uuid=f"MIG-{parent}-{j}",
        index=f"{parent}:{j}",
        name=f"A100 MIG {slices}g",
        memory_total=10 * GIB * slices,
        memory_used=int(used_gib * GIB),
        utilization=None,
        fraction=round(slices / 7, 4),
        parent_uuid=f"GPU-{parent}",
    )


def held(
    uuid: str,
    user: str = "bob",
    project: str = "bobs",
    server: str = "bobs",
    fraction: float = 1.0,
) -> Holder:
    return Holder(uuid, user, project, server, "2024-01-01T00:00:00Z", fraction, f"ds01-{user}")


def ask(
    count: int = 1, *, user: str = "ada", server: str = "paper", mig: bool = False
) -> GpuRequest:
    return GpuRequest(user=user, project=server or "default", server=server, count=count, mig=mig)


def uuids(slots: list[GpuSlot]) -> list[str]:
    return [s.uuid for s in slots]


class Untouchable:
    """Fails the test if choose() so much as looks at it."""

    def __iter__(self):
        raise AssertionError("a CPU-only request must not read the GPUs or the ledger")

    def __getattr__(self, name):
        raise AssertionError(f"a CPU-only request must not read {name}")


# ------------------------------------------------------------ choose: the basics


def test_cpu_only_request_gets_no_gpu_without_looking_at_anything():
    assert choose(Untouchable(), Untouchable(), ask(0), Untouchable()) == []


def test_cpu_only_request_is_not_refused_by_a_zero_limit_or_missing_mig():
    policy = GpuPolicy(max_per_user=0, offer_mig=False)
    assert choose([], [], ask(0, mig=True), policy) == []


def test_prefers_the_gpu_with_most_free_memory():
    slots = [gpu(0, used_gib=6), gpu(1, used_gib=2), gpu(2, used_gib=4)]
    assert uuids(choose(slots, [], ask(), EXCLUSIVE)) == ["GPU-1"]


def test_equal_free_memory_prefers_the_lowest_utilization():
    slots = [gpu(0, util=9), gpu(1, util=3), gpu(2, util=5)]
    assert uuids(choose(slots, [], ask(), EXCLUSIVE)) == ["GPU-1"]


def test_free_memory_wins_over_utilization():
    slots = [gpu(0, used_gib=5, util=0), gpu(1, used_gib=1, util=9)]
    assert uuids(choose(slots, [], ask(), EXCLUSIVE)) == ["GPU-1"]


def test_a_full_tie_goes_to_the_lowest_index():
    slots = [gpu(3), gpu(1), gpu(2), gpu(0)]
    assert uuids(choose(slots, [], ask(), EXCLUSIVE)) == ["GPU-0"]


def test_asking_for_two_with_two_free_gives_two_distinct_gpus():
    slots = [gpu(0), gpu(1), gpu(2)]
    policy = GpuPolicy(max_per_user=2)
    chosen = choose(slots, [held("GPU-1")], ask(2), policy)
    assert sorted(uuids(chosen)) == ["GPU-0", "GPU-2"]


def test_asking_for_two_returns_them_least_loaded_first():
    slots = [gpu(0, used_gib=3), gpu(1, used_gib=1), gpu(2, used_gib=2)]
    chosen = choose(slots, [], ask(2), GpuPolicy(max_per_user=4))
    assert uuids(chosen) == ["GPU-1", "GPU-2"]


# ------------------------------------------------------------ exclusive and shared GPUs


def test_exclusive_mode_never_gives_a_held_gpu():
    # GPU-0 is the least loaded, but another user's server holds it
    slots = [gpu(0), gpu(1, used_gib=2)]
    assert uuids(choose(slots, [held("GPU-0")], ask(), EXCLUSIVE)) == ["GPU-1"]


def test_exclusive_mode_refuses_when_every_gpu_is_held():
    slots = [gpu(0), gpu(1)]
    with pytest.raises(GpuRefusal, match=r"2 held by running servers"):
        choose(slots, [held("GPU-0"), held("GPU-1", user="cy")], ask(), EXCLUSIVE)


def test_all_gpus_in_use_says_so():
    slots = [gpu(i) for i in range(4)]
    holders = [held(f"GPU-{i}", user=f"u{i}") for i in range(4)]
    with pytest.raises(GpuRefusal) as refused:
        choose(slots, holders, ask(), EXCLUSIVE)
    assert "all 4 GPUs are in use" in str(refused.value)


def test_fewer_free_than_asked_says_how_many_are_free():
    slots = [gpu(i) for i in range(4)]
    holders = [held(f"GPU-{i}", user=f"u{i}") for i in range(3)]
    with pytest.raises(GpuRefusal) as refused:
        choose(slots, holders, ask(2), GpuPolicy(max_per_user=2))
    message = str(refused.value)
    assert "only 1 of 4 GPUs" in message
    assert "3 held by running servers" in message
    assert "you asked for 2" in message


def test_shared_mode_gives_a_gpu_to_up_to_n_servers():
    policy = GpuPolicy(containers_per_gpu=2)
    assert uuids(choose([gpu(0)], [held("GPU-0")], ask(), policy)) == ["GPU-0"]


def test_shared_mode_refuses_a_gpu_already_shared_n_times():
    policy = GpuPolicy(containers_per_gpu=2)
    holders = [held("GPU-0"), held("GPU-0", user="cy", server="cys")]
    with pytest.raises(GpuRefusal):
        choose([gpu(0)], holders, ask(), policy)


def test_shared_mode_prefers_the_least_shared_gpu_over_the_least_loaded():
    slots = [gpu(0), gpu(1, used_gib=30, util=50)]  # GPU-1 is busier, but nobody holds it
    policy = GpuPolicy(containers_per_gpu=3, busy_memory_fraction=0.9, busy_utilization=90)
    assert uuids(choose(slots, [held("GPU-0")], ask(), policy)) == ["GPU-1"]


def test_shared_mode_a_held_gpu_with_load_is_not_busy_outside():
    # the load is the holder's own work: sharing it is what containers_per_gpu allows
    slots = [gpu(0, used_gib=60, util=95)]
    policy = GpuPolicy(containers_per_gpu=2)
    assert uuids(choose(slots, [held("GPU-0")], ask(), policy)) == ["GPU-0"]


# ------------------------------------------------------------ reserved and busy GPUs


def test_a_gpu_reserved_by_index_is_never_given():
    slots = [gpu(0), gpu(1, used_gib=5)]
    policy = GpuPolicy(reserved=frozenset({"0"}))
    assert uuids(choose(slots, [], ask(), policy)) == ["GPU-1"]


def test_a_gpu_reserved_by_uuid_is_never_given():
    slots = [gpu(0), gpu(1, used_gib=5)]
    policy = GpuPolicy(reserved=frozenset({"GPU-0"}))
    assert uuids(choose(slots, [], ask(), policy)) == ["GPU-1"]


def test_a_mig_device_can_be_reserved_by_its_index():
    slots = [mig(0, 0), mig(0, 1, used_gib=1)]
    policy = GpuPolicy(offer_mig=True, reserved=frozenset({"0:0"}))
    assert uuids(choose(slots, [], ask(mig=True), policy)) == ["MIG-0-1"]


def test_every_gpu_reserved_means_none_to_hand_out():
    policy = GpuPolicy(reserved=frozenset({"0", "GPU-1"}))
    with pytest.raises(GpuRefusal, match="has no GPUs to hand out; start without a GPU"):
        choose([gpu(0), gpu(1)], [], ask(), policy)


def test_an_unheld_gpu_using_memory_is_busy_outside_the_hub():
    slots = [gpu(0, used_gib=20), gpu(1, used_gib=5)]  # 25% and 6% of 80 GiB
    assert uuids(choose(slots, [], ask(), EXCLUSIVE)) == ["GPU-1"]


def test_an_unheld_gpu_with_utilization_is_busy_outside_the_hub():
    slots = [gpu(0, util=11), gpu(1, used_gib=5, util=10)]
    assert uuids(choose(slots, [], ask(), EXCLUSIVE)) == ["GPU-1"]


def test_busy_thresholds_are_configurable():
    policy = GpuPolicy(busy_memory_fraction=0.5, busy_utilization=80)
    slots = [gpu(0, used_gib=30, util=70)]
    assert uuids(choose(slots, [], ask(), policy)) == ["GPU-0"]


def test_a_gpu_without_utilization_reading_is_judged_by_memory_only():
    slots = [gpu(0, used_gib=1, util=None)]
    assert uuids(choose(slots, [], ask(), EXCLUSIVE)) == ["GPU-0"]


def test_refusal_counts_gpus_busy_outside_the_hub():
    slots = [gpu(0, used_gib=40), gpu(1, util=99)]
    with pytest.raises(GpuRefusal) as refused:
        choose(slots, [], ask(), EXCLUSIVE)
    message = str(refused.value)
    assert "2 busy with work outside the hub" in message
    assert "held by running servers" not in message


def test_refusal_counts_held_and_outside_gpus_apart():
    slots = [gpu(0), gpu(1, used_gib=40), gpu(2)]
    holders = [held("GPU-0"), held("GPU-2", user="cy")]
    with pytest.raises(GpuRefusal) as refused:
        choose(slots, holders, ask(), EXCLUSIVE)
    message = str(refused.value)
    assert "2 held by running servers" in message
    assert "1 busy with work outside the hub" in message


# ------------------------------------------------------------ the per-user limit


def test_limit_counts_the_users_other_servers_and_names_their_projects():
    holders = [held("GPU-0", user="ada", project="thesis", server="thesis")]
    with pytest.raises(GpuRefusal) as refused:
        choose([gpu(0), gpu(1)], holders, ask(server="paper"), GpuPolicy(max_per_user=1))
    message = str(refused.value)
    assert "your limit is 1 GPU; 'thesis' holds 1 GPU" in message
    assert "Stop a project holding a GPU" in message


def test_limit_message_names_every_project_holding_gpus():
    holders = [
        held("GPU-0", user="ada", project="alpha", server="alpha"),
        held("GPU-1", user="ada", project="beta", server="beta"),
    ]
    with pytest.raises(GpuRefusal) as refused:
        choose([gpu(i) for i in range(4)], holders, ask(), GpuPolicy(max_per_user=2))
    assert "your limit is 2 GPUs; 'alpha' and 'beta' hold 2 GPUs" in str(refused.value)


def test_limit_refuses_asking_for_more_than_it_at_once():
    with pytest.raises(GpuRefusal, match="your limit is 1 GPU: asking for 2 GPUs more"):
        choose([gpu(0), gpu(1)], [], ask(2), GpuPolicy(max_per_user=1))


def test_limit_ignores_other_users_gpus():
    holders = [held("GPU-0", user="bob"), held("GPU-1", user="cy")]
    chosen = choose([gpu(i) for i in range(3)], holders, ask(), GpuPolicy(max_per_user=1))
    assert uuids(chosen) == ["GPU-2"]


def test_limit_allows_up_to_it_across_servers():
    holders = [held("GPU-0", user="ada", project="thesis", server="thesis")]
    chosen = choose([gpu(0), gpu(1)], holders, ask(server="paper"), GpuPolicy(max_per_user=2))
    assert uuids(chosen) == ["GPU-1"]


def test_limit_zero_refuses_any_gpu():
    with pytest.raises(GpuRefusal, match="your limit is 0 GPUs"):
        choose([gpu(0)], [], ask(), GpuPolicy(max_per_user=0))


def test_fractional_limit_refuses_a_whole_gpu():
    with pytest.raises(GpuRefusal, match=r"your limit is 0\.5 GPUs"):
        choose([gpu(0)], [], ask(), GpuPolicy(max_per_user=0.5))


def test_a_servers_own_old_entries_do_not_block_it():
    # a restart of the same server: its old ledger entry is about to be replaced
    holders = [held("GPU-0", user="ada", project="paper", server="paper")]
    assert uuids(choose([gpu(0)], holders, ask(server="paper"), EXCLUSIVE)) == ["GPU-0"]


def test_a_servers_own_old_entries_do_not_count_against_its_limit():
    holders = [held("GPU-0", user="ada", project="paper", server="paper")]
    chosen = choose([gpu(0), gpu(1)], holders, ask(server="paper"), GpuPolicy(max_per_user=1))
    assert len(chosen) == 1


def test_another_server_of_the_same_user_does_block_its_gpu():
    holders = [held("GPU-0", user="ada", project="thesis", server="thesis")]
    chosen = choose([gpu(0), gpu(1)], holders, ask(server="paper"), GpuPolicy(max_per_user=2))
    assert uuids(chosen) == ["GPU-1"]


def test_a_different_user_with_the_same_server_name_still_blocks():
    holders = [held("GPU-0", user="bob", project="paper", server="paper")]
    with pytest.raises(GpuRefusal):
        choose([gpu(0)], holders, ask(server="paper"), EXCLUSIVE)


# ------------------------------------------------------------ MIG


MIG_POLICY = GpuPolicy(offer_mig=True, max_per_user=1)


def test_mig_request_chooses_only_mig_slots():
    slots = [gpu(0), mig(1, 0), gpu(2)]
    assert uuids(choose(slots, [], ask(mig=True), MIG_POLICY)) == ["MIG-1-0"]


def test_mig_request_prefers_the_slice_with_most_free_memory():
    slots = [mig(1, 0, used_gib=2), mig(1, 1, 2), mig(1, 2)]
    assert uuids(choose(slots, [], ask(mig=True), MIG_POLICY)) == ["MIG-1-1"]


def test_whole_gpu_request_never_gets_a_mig_slot():
    slots = [mig(1, 0), mig(1, 1), gpu(0)]
    chosen = choose(slots, [], ask(), MIG_POLICY)
    assert uuids(chosen) == ["GPU-0"]
    assert not chosen[0].is_mig


def test_whole_gpu_request_with_only_mig_slots_is_refused():
    with pytest.raises(GpuRefusal, match="no GPUs to hand out"):
        choose([mig(1, 0), mig(1, 1)], [], ask(), MIG_POLICY)


def test_mig_request_without_mig_slots_is_refused():
    with pytest.raises(GpuRefusal, match="no MIG slices to hand out"):
        choose([gpu(0)], [], ask(mig=True), MIG_POLICY)


def test_mig_refused_when_the_policy_does_not_offer_it():
    with pytest.raises(GpuRefusal, match="MIG slices are not offered on this server"):
        choose([mig(1, 0)], [], ask(mig=True), GpuPolicy(offer_mig=False))


def test_two_one_slice_migs_count_two_sevenths_against_the_limit():
    slots = [mig(1, j) for j in range(4)]
    mine = [
        held("MIG-1-0", user="ada", project="a", server="a", fraction=mig(1, 0).fraction),
        held("MIG-1-1", user="ada", project="b", server="b", fraction=mig(1, 1).fraction),
    ]
    too_small = GpuPolicy(offer_mig=True, max_per_user=0.4)  # 3/7 = 0.43 > 0.4
    with pytest.raises(GpuRefusal) as refused:
        choose(slots, mine, ask(mig=True), too_small)
    assert "'a' and 'b' hold 0.286 GPUs" in str(refused.value)
    enough = GpuPolicy(offer_mig=True, max_per_user=0.5)
    assert len(choose(slots, mine, ask(mig=True), enough)) == 1


def test_one_mig_slice_fits_under_a_fractional_limit_that_a_whole_gpu_does_not():
    policy = GpuPolicy(offer_mig=True, max_per_user=0.25)
    assert uuids(choose([mig(1, 0)], [], ask(mig=True), policy)) == ["MIG-1-0"]
    with pytest.raises(GpuRefusal, match="your limit"):
        choose([gpu(0)], [], ask(), policy)


def test_a_mig_slice_counts_its_size_not_one():
    big = mig(1, 0, slices=3)  # 3/7 of a GPU
    policy = GpuPolicy(offer_mig=True, max_per_user=0.4)
    with pytest.raises(GpuRefusal, match=r"asking for 0\.429 GPUs"):
        choose([big], [], ask(mig=True), policy)


# ------------------------------------------------------------ the ledger from containers


MANAGED_PROJECT = {labels.MANAGED: "true", labels.ROLE: "project"}


def container(
    gpu_uuids: str,
    *,
    state: str = "running",
    user: str = "ada",
    project: str = "thesis",
    server: str = "thesis",
    equivalents: str | None = None,
    name: str = "/ds01-ada--thesis",
) -> dict:
    lab = {
        labels.MANAGED: "true",
        labels.ROLE: "project",
        labels.USER: user,
        labels.PROJECT: project,
        labels.SERVER_NAME: server,
        labels.GPU_UUIDS: gpu_uuids,
        labels.GPU_ALLOCATED_AT: "2024-05-01T10:00:00Z",
    }
    if equivalents is not None:
        lab[labels.GPU_EQUIVALENTS] = equivalents
    return {"Labels": lab, "State": state, "Names": [name]}


def test_a_running_container_holds_its_gpu():
    [h] = holders_from_containers([container("GPU-0", equivalents="1")])
    assert h == Holder(
        uuid="GPU-0",
        user="ada",
        project="thesis",
        server="thesis",
        since="2024-05-01T10:00:00Z",
        fraction=1.0,
        container="ds01-ada--thesis",
    )


@pytest.mark.parametrize("state", ["created", "running", "restarting", "paused"])
def test_live_containers_hold_gpus(state):
    assert len(holders_from_containers([container("GPU-0", state=state)])) == 1


@pytest.mark.parametrize("state", ["exited", "dead", "removing"])
def test_stopped_containers_hold_nothing(state):
    assert holders_from_containers([container("GPU-0", state=state)]) == []


def test_containers_without_gpu_labels_hold_nothing():
    cpu_only = {"Labels": {labels.MANAGED: "true", labels.USER: "ada"}, "State": "running"}
    empty = container("")
    assert holders_from_containers([cpu_only, empty, {"Labels": None}]) == []


def test_a_container_holding_two_gpus_gives_one_entry_each():
    found = holders_from_containers([container("GPU-0,GPU-1", equivalents="2")])
    assert [(h.uuid, h.fraction) for h in found] == [("GPU-0", 1.0), ("GPU-1", 1.0)]


def test_equivalents_are_split_over_the_uuids():
    found = holders_from_containers([container("MIG-a,MIG-b", equivalents="0.2858")])
    assert [h.fraction for h in found] == pytest.approx([0.1429, 0.1429])


@pytest.mark.parametrize("bad", ["", "lots", "1,5"])
def test_a_malformed_equivalents_label_counts_one_per_gpu(bad):
    found = holders_from_containers([container("GPU-0,GPU-1", equivalents=bad)])
    assert [h.fraction for h in found] == [1.0, 1.0]


def test_a_missing_equivalents_label_counts_one_per_gpu():
    found = holders_from_containers([container("GPU-0,GPU-1")])
    assert sum(h.fraction for h in found) == 2.0


def test_missing_names_and_labels_are_tolerated():
    bare = {"Labels": {**MANAGED_PROJECT, labels.GPU_UUIDS: "GPU-7"}}
    [h] = holders_from_containers([bare])
    assert (h.uuid, h.user, h.project, h.server, h.container) == ("GPU-7", "?", "?", "", "")


def test_gpu_labels_on_a_container_that_is_no_ds01_project_count_for_nothing():
    """A build's RUN container, or anything else, carrying a Dockerfile's LABELs."""
    for lab in (
        {labels.GPU_UUIDS: "GPU-7"},
        {labels.MANAGED: "true", labels.ROLE: "base", labels.GPU_UUIDS: "GPU-7"},
        {labels.ROLE: "project", labels.GPU_UUIDS: "GPU-7"},
    ):
        assert holders_from_containers([{"Labels": lab, "State": "running"}]) == []


@pytest.mark.parametrize("bad", ["nan", "-1", "0", "inf", "-inf", "1e308", "3"])
def test_equivalents_never_make_a_gpu_cheaper_than_the_labels_name(bad):
    found = holders_from_containers([container("GPU-0,GPU-1", equivalents=bad)])
    assert [h.fraction for h in found] == [1.0, 1.0]


def test_only_uuids_of_the_inventory_count_when_it_is_given():
    found = holders_from_containers(
        [container("GPU-0"), container("GPU-9,GPU-0", user="eve", name="/e")],
        inventory={"GPU-0", "GPU-1"},
    )
    assert [(h.user, h.uuid) for h in found] == [("ada", "GPU-0")]


def test_only_containers_the_spawner_sealed_count(tmp_path):
    seal = LedgerSeal(tmp_path)
    good = container("GPU-0", equivalents="1")
    good["Labels"][labels.GPU_SEAL] = seal.seal(good["Names"][0], good["Labels"])
    forged = container("GPU-1", user="eve", name="/ds01-eve--x", equivalents="1")
    forged["Labels"][labels.GPU_SEAL] = "0" * 64
    unsealed = container("GPU-2", user="eve", name="/ds01-eve--y")
    # a sealed label set copied onto another container (an image's labels) is not valid there
    copied = {**good, "Names": ["/hopeful_turing"]}
    tampered = container("GPU-0,GPU-1", equivalents="1")
    tampered["Labels"][labels.GPU_SEAL] = good["Labels"][labels.GPU_SEAL]
    found = holders_from_containers([good, forged, unsealed, copied, tampered], seal=seal)
    assert [(h.user, h.uuid) for h in found] == [("ada", "GPU-0")]
    assert (tmp_path / "ledger.key").stat().st_mode & 0o777 == 0o600
    assert LedgerSeal(tmp_path).valid(good["Names"][0], good["Labels"]), "the key persists"


def test_cpu_only_containers_get_every_ledger_label_empty():
    assert gpu_labels([], "t") == {
        labels.GPU_UUIDS: "",
        labels.GPU_INDICES: "",
        labels.GPU_EQUIVALENTS: "0",
        labels.GPU_ALLOCATED_AT: "",
    }


def test_gpu_labels_round_trip_through_the_ledger():
    slots = [mig(1, 0), mig(1, 1, slices=2)]
    since = "2024-05-01T10:00:00Z"
    lab = {
        **MANAGED_PROJECT,
        labels.USER: "ada",
        labels.PROJECT: "thesis",
        labels.SERVER_NAME: "thesis",
        **gpu_labels(slots, since),
    }
    found = holders_from_containers([{"Labels": lab, "State": "running", "Names": ["/c"]}])
    assert [h.uuid for h in found] == ["MIG-1-0", "MIG-1-1"]
    assert {(h.user, h.project, h.server, h.since) for h in found} == {
        ("ada", "thesis", "thesis", since)
    }
    assert sum(h.fraction for h in found) == pytest.approx(3 / 7, abs=1e-3)
    assert lab[labels.GPU_INDICES] == "1:0,1:1"


def test_a_choice_recorded_in_labels_blocks_the_next_choice():
    slots = [gpu(0), gpu(1)]
    first = choose(slots, [], ask(user="ada"), EXCLUSIVE)
    lab = {
        **MANAGED_PROJECT,
        labels.USER: "ada",
        labels.SERVER_NAME: "paper",
        **gpu_labels(first, "t"),
    }
    ledger = holders_from_containers([{"Labels": lab, "State": "running"}])
    second = choose(slots, ledger, ask(user="bob"), EXCLUSIVE)
    assert uuids(second) != uuids(first)


# ------------------------------------------------------------ the admin report


def test_report_attaches_holders_to_their_gpu_rows():
    slots = [gpu(0), gpu(1, used_gib=3, util=40)]
    rows = gpu_report(slots, [held("GPU-1", user="ada", project="thesis")])
    assert [r["uuid"] for r in rows] == ["GPU-0", "GPU-1"]
    assert rows[0]["holders"] == []
    [holder] = rows[1]["holders"]
    assert (holder["user"], holder["project"]) == ("ada", "thesis")
    assert (rows[1]["memory_used"], rows[1]["utilization"]) == (3 * GIB, 40)


def test_report_lists_every_holder_of_a_shared_gpu():
    rows = gpu_report([gpu(0)], [held("GPU-0", user="ada"), held("GPU-0", user="bob")])
    assert [h["user"] for h in rows[0]["holders"]] == ["ada", "bob"]


def test_report_marks_mig_rows():
    rows = gpu_report([gpu(0), mig(1, 0)], [])
    assert [r["mig"] for r in rows] == [False, True]


def test_report_still_lists_a_held_gpu_missing_from_the_inventory():
    rows = gpu_report([gpu(0)], [held("GPU-gone", user="ada")])
    assert len(rows) == 2
    missing = rows[1]
    assert (missing["uuid"], missing["name"], missing["index"]) == (
        "GPU-gone",
        "not in inventory",
        "?",
    )
    assert [h["user"] for h in missing["holders"]] == ["ada"]


# ------------------------------------------------------------ the allocator


class Engine:
    """What `list_containers` would return: the test adds and removes containers."""

    def __init__(self) -> None:
        self.containers: list[dict] = []

    async def list_containers(self) -> list[dict]:
        await asyncio.sleep(0)  # a real engine call yields to the loop
        return list(self.containers)

    def run(self, request: GpuRequest, slots: list[GpuSlot], since: str) -> None:
        lab = {
            **MANAGED_PROJECT,
            labels.USER: request.user,
            labels.PROJECT: request.project,
            labels.SERVER_NAME: request.server,
            **gpu_labels(slots, since),
        }
        name = f"/ds01-{request.user}--{request.project}"
        self.containers.append({"Labels": lab, "State": "running", "Names": [name]})

    def remove(self, user: str) -> None:
        self.containers = [c for c in self.containers if c["Labels"][labels.USER] != user]


ONE_EACH = GpuPolicy(max_per_user=1)


async def test_twenty_concurrent_spawns_share_four_gpus_without_overlap():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(4), engine.list_containers)
    results = await asyncio.gather(
        *(allocator.allocate(ask(user=f"u{i}"), ONE_EACH, "t") for i in range(20)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, GpuRefusal)]
    assert len(granted) == 4 and len(refused) == 16
    assert all(len(r) == 1 for r in granted)
    assert len({r[0].uuid for r in granted}) == 4
    assert all("all 4 GPUs" in str(e) or "of 4 GPUs" in str(e) for e in refused)


async def test_after_the_storm_gpus_follow_the_containers():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(4), engine.list_containers)
    requests = [ask(user=f"u{i}") for i in range(20)]
    results = await asyncio.gather(
        *(allocator.allocate(r, ONE_EACH, "t") for r in requests), return_exceptions=True
    )
    pairs = zip(requests, results, strict=True)
    winners = [(r, chosen) for r, chosen in pairs if isinstance(chosen, list)]
    assert len(winners) == 4
    for request, chosen in winners:  # their containers start, carrying the labels
        engine.run(request, chosen, "t")
        allocator.settle(request.user, request.server)
    with pytest.raises(GpuRefusal):
        await allocator.allocate(ask(user="late"), ONE_EACH, "t")
    retired, its_gpus = winners[2]
    engine.remove(retired.user)
    again = await allocator.allocate(ask(user="late"), ONE_EACH, "t")
    assert uuids(again) == uuids(its_gpus)


async def test_a_handed_out_gpu_is_held_until_settled():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(1), engine.list_containers)
    await allocator.allocate(ask(user="ada"), ONE_EACH, "t")
    with pytest.raises(GpuRefusal):
        await allocator.allocate(ask(user="bob"), ONE_EACH, "t")


async def test_a_settled_gpu_stays_held_while_its_container_exists():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(1), engine.list_containers)
    request = ask(user="ada")
    chosen = await allocator.allocate(request, ONE_EACH, "t")
    engine.run(request, chosen, "t")
    allocator.settle("ada", request.server)
    with pytest.raises(GpuRefusal):
        await allocator.allocate(ask(user="bob"), ONE_EACH, "t")
    assert [h.user for h in await allocator.ledger()] == ["ada"]


async def test_a_gpu_is_free_again_once_its_container_is_gone():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(1), engine.list_containers)
    request = ask(user="ada")
    chosen = await allocator.allocate(request, ONE_EACH, "t")
    engine.run(request, chosen, "t")
    allocator.settle("ada", request.server)
    engine.remove("ada")
    again = await allocator.allocate(ask(user="bob"), ONE_EACH, "t")
    assert uuids(again) == uuids(chosen)


async def test_settling_a_spawn_whose_container_never_came_frees_its_gpu():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(1), engine.list_containers)
    chosen = await allocator.allocate(ask(user="ada"), ONE_EACH, "t")
    allocator.settle("ada", "paper")
    assert uuids(await allocator.allocate(ask(user="bob"), ONE_EACH, "t")) == uuids(chosen)


async def test_a_pending_entry_replaces_the_same_servers_entry_in_the_engine():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(2), engine.list_containers)
    request = ask(user="ada")
    first = await allocator.allocate(request, ONE_EACH, "t")
    engine.run(request, first, "t")
    allocator.settle("ada", request.server)
    # the same server starts again before its old container is gone: no double count
    await allocator.allocate(request, ONE_EACH, "t2")
    ledger = await allocator.ledger()
    assert [(h.user, h.since) for h in ledger] == [("ada", "t2")]


async def test_a_cpu_only_request_holds_nothing():
    engine = Engine()
    allocator = GpuAllocator(SimulatedInventory(1), engine.list_containers)
    assert await allocator.allocate(ask(0, user="ada"), ONE_EACH, "t") == []
    assert await allocator.ledger() == []


def test_ties_are_broken_by_numeric_index():
    slots = [gpu(i) for i in (10, 2)]
    (chosen,) = choose(slots, [], ask(), EXCLUSIVE)
    assert chosen.index == "2"


def test_limit_refusal_without_holdings_has_no_dangling_advice():
    with pytest.raises(GpuRefusal) as refused:
        choose([gpu(0)], [], ask(), GpuPolicy(max_per_user=0))
    assert str(refused.value).endswith("would exceed it.")


# ---------------------------------------------------------------- policy limits and holds


def test_max_per_project_counts_gpu_equivalents():
    slots = [gpu(i) for i in range(4)]
    policy = GpuPolicy(max_per_user=4, max_per_project=2)
    with pytest.raises(GpuRefusal, match=r"at most 2 GPUs \(max_gpus_per_project\)"):
        choose(slots, [], GpuRequest("a", "p", "p", 3), policy)
    assert len(choose(slots, [], GpuRequest("a", "p", "p", 2), policy)) == 2


def test_mig_only_users_get_no_whole_gpu():
    policy = GpuPolicy(allow_full_gpu=False, offer_mig=True)
    with pytest.raises(GpuRefusal, match=r"MIG slices only.*ask for a MIG slice"):
        choose([gpu(0)], [], GpuRequest("a", "p", "p", 1), policy)


def test_a_kept_gpu_is_not_free_for_others_and_first_for_its_owner():
    slots = [gpu(0), gpu(1)]
    hold = [Hold(slots[1].uuid, "alice", "thesis", until=2e9)]
    (bobs,) = choose(slots, [], GpuRequest("bob", "x", "x", 1), GpuPolicy(), hold)
    assert bobs.uuid == slots[0].uuid
    (alices,) = choose(slots, [], GpuRequest("alice", "thesis", "t", 1), GpuPolicy(), hold)
    assert alices.uuid == slots[1].uuid
    taken = [Holder(slots[0].uuid, "carol", "c", "c", "")]
    with pytest.raises(GpuRefusal, match="1 kept for a stopped project's quick restart"):
        choose(slots, taken, GpuRequest("bob", "x", "x", 1), GpuPolicy(), hold)


def test_holds_expire_and_are_released(tmp_path):
    holds = GpuHolds(str(tmp_path))
    holds.keep("alice", "thesis", ["G1", "G2"], seconds=60)
    holds.keep("bob", "x", ["G3"], seconds=60)
    assert {h.uuid for h in holds.active()} == {"G1", "G2", "G3"}
    assert holds.active(now=time.time() + 120) == []
    holds.release("alice", "thesis")
    assert {h.uuid for h in holds.active()} == {"G3"}
    holds.release("bob", uuids=["G3"])
    assert holds.active() == []
