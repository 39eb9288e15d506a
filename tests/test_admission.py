"""Admission: may a request start? Pinned on plain facts, with no hub and no engine."""

from __future__ import annotations

import pytest

from ds01_spawner.admission import Facts, GpuFacts, admit, gpu_refusal
from ds01_spawner.errors import Refusal
from ds01_spawner.gpus import GpuPolicy, GpuRefusal
from ds01_spawner.ledger import Hold, Holder
from ds01_spawner.limits import Limits
from ds01_spawner.nvml import GpuSlot, GpuUnavailable
from ds01_spawner.projects import ProjectRequest

GIB = 1024**3
GPUS = [GpuSlot(f"GPU-{i}", str(i), "A100", 80 * GIB, 0, 0) for i in range(2)]


def facts(limits: Limits | None = None, running=None, gpus=None, server: str = "") -> Facts:
    return Facts("ada", server, limits or Limits(), running or {}, gpus)


def ask(name: str = "thesis", type_: str = "base", gpus: int = 0) -> ProjectRequest:
    return ProjectRequest(name, type_, new=False, gpus=gpus)


def refused(request: ProjectRequest, given: Facts) -> Refusal:
    with pytest.raises(Refusal) as e:
        admit(request, given)
    return e.value


def held_by(user: str, uuid: str, project: str = "other") -> Holder:
    return Holder(uuid, user, project, project, "2026-12-02T00:00:00Z")


def test_a_request_within_every_limit_is_admitted():
    admit(ask(gpus=1), facts(gpus=GpuFacts(GPUS, [], GpuPolicy())))


def test_a_project_running_in_another_server_is_a_409_naming_it():
    e = refused(ask(), facts(running={"thesis": "lab"}))
    assert (e.status, e.reason) == (409, "project_in_use") and "server 'lab'" in str(e)
    e = refused(ask(), facts(running={"thesis": ""}))
    assert "your default server" in str(e)


def test_a_type_the_policy_does_not_allow_is_a_403_listing_the_allowed():
    e = refused(ask(type_="cv"), facts(Limits(allowed_types=("base", "nlp"))))
    assert e.status == 403 and "allowed_types: base, nlp" in str(e)


def test_the_running_projects_limit_counts_the_others_and_names_them():
    limits = Limits(max_running_projects=2)
    admit(ask(), facts(limits, running={"a": "a"}))
    e = refused(ask(), facts(limits, running={"b": "b", "a": "a"}))
    assert e.status == 409 and "you run 2 projects, your limit is 2" in str(e)
    assert "stop one of a, b first" in str(e)
    e = refused(ask(), facts(Limits(max_running_projects=0)))
    assert "ask the hub's admin for more" in str(e)


def test_gpus_are_judged_only_when_asked_for_and_their_facts_given():
    nothing_free = GpuFacts(GPUS, [held_by("bo", "GPU-0"), held_by("cy", "GPU-1")], GpuPolicy())
    admit(ask(gpus=0), facts(gpus=nothing_free))
    admit(ask(gpus=1), facts(gpus=None))  # checked later, at start
    e = refused(ask(gpus=1), facts(gpus=nothing_free))
    assert (e.status, e.reason) == (409, "gpu") and "all 2 GPUs are in use" in str(e)


def test_a_gpu_kept_for_another_users_quick_restart_is_not_free():
    holds = [Hold("GPU-0", "bo", "x", 1e12), Hold("GPU-1", "bo", "y", 1e12)]
    e = refused(ask(gpus=1), facts(gpus=GpuFacts(GPUS, [], GpuPolicy(), holds)))
    assert "kept for a stopped project" in str(e)


def test_the_users_gpu_limit_applies_across_their_projects():
    mine = [held_by("ada", "GPU-0", "paper")]
    e = refused(ask(gpus=1), facts(gpus=GpuFacts(GPUS, mine, GpuPolicy(max_per_user=1))))
    assert "your limit is 1 GPU" in str(e) and "'paper'" in str(e)


def test_no_usable_gpus_is_a_503_and_a_taken_one_a_409():
    e = refused(ask(gpus=1), facts(gpus=GpuFacts(None, [], GpuPolicy())))
    assert e.status == 503 and "start without a GPU" in str(e)
    assert gpu_refusal(GpuUnavailable("x")).status == 503
    assert gpu_refusal(GpuRefusal("x")).status == 409


def test_the_in_use_check_comes_before_the_limits():
    e = refused(ask(type_="cv"), facts(Limits(allowed_types=("base",)), running={"thesis": "t"}))
    assert e.reason == "project_in_use"


def test_no_free_gpu_is_no_refusal_for_a_start_that_waits_in_the_queue():
    taken = GpuFacts(GPUS, [held_by("bob", "GPU-0"), held_by("eve", "GPU-1")], GpuPolicy())
    e = refused(ask(gpus=1), facts(gpus=taken))
    assert e.status == 409 and "Wait for a GPU" in str(e) and "wait: true" in str(e)
    waiting = ProjectRequest("thesis", "base", new=False, gpus=1, wait=True)
    admit(waiting, facts(gpus=taken))  # it will wait instead
    over = GpuFacts(GPUS, [held_by("ada", "GPU-0")], GpuPolicy(max_per_user=1))
    e = refused(waiting, facts(gpus=over))  # its own limit: waiting would not help
    assert "your limit is 1 GPU" in str(e)
