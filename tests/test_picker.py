"""What the project picker offers, from the limits and the GPUs as they are."""

from __future__ import annotations

from ds01_spawner import labels
from ds01_spawner.ledger import Holder
from ds01_spawner.limits import Limits
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.picker import built_projects, gpu_choices, render_picker

GIB = 1024**3
GPUS = [GpuSlot(f"GPU-{i}", str(i), "A100", 80 * GIB, 0, 0) for i in range(3)]
MIG = GpuSlot("MIG-0", "0:1", "A100 1g", 10 * GIB, 0, None, fraction=1 / 7, parent_uuid="GPU-0")


def holder(uuid: str) -> Holder:
    return Holder(uuid, "bo", "x", "x", "t")


def test_the_offer_is_the_smaller_of_the_limits_and_the_gpus_and_says_how_many_are_free():
    offer = gpu_choices(Limits(max_gpus=2), GPUS, [holder("GPU-1")])
    assert offer == {
        "max": 2,
        "mig": False,
        "note": "2 of 3 GPUs free right now; your limit is 2.",
    }
    assert gpu_choices(Limits(max_gpus=4, max_gpus_per_project=1), GPUS, [])["max"] == 1


def test_no_gpu_limit_offers_nothing_and_says_nothing():
    assert gpu_choices(Limits(max_gpus=0), GPUS, []) == {"max": 0, "mig": False, "note": ""}


def test_reserved_gpus_are_neither_offered_nor_counted():
    offer = gpu_choices(Limits(max_gpus=8), GPUS, [], reserved=["GPU-2"])
    assert offer["max"] == 2 and offer["note"].startswith("2 of 2 GPUs free")


def test_mig_only_users_are_offered_slices_where_there_are_any():
    limits = Limits(max_gpus=1, allow_full_gpu=False)
    assert gpu_choices(limits, [*GPUS, MIG], [], offer_mig=True)["mig"] is True
    assert gpu_choices(limits, [*GPUS, MIG], [], offer_mig=True)["max"] == 0
    assert gpu_choices(limits, GPUS, [], offer_mig=True)["mig"] is False


def test_a_server_without_usable_gpus_says_so():
    assert gpu_choices(Limits(), None, [])["note"] == "This server has no usable GPUs."


def test_built_projects_are_those_with_a_latest_tag():
    images = [
        {"Labels": {labels.PROJECT: "a"}, "RepoTags": ["ds01-ada/a:latest"], "Created": 0},
        {"Labels": {labels.PROJECT: "b"}, "RepoTags": ["ds01-ada/b:previous"], "Created": 0},
        {"Labels": None, "RepoTags": None, "Created": 0},
    ]
    assert list(built_projects(images)) == ["a"]


def test_the_form_escapes_what_users_named():
    html = render_picker(
        projects=[],
        built={},
        types={},
        default_type="base",
        server_name="<b>x</b>",
        fixed_project=True,
        selected="__new__",
        gpus={"max": 0, "mig": False, "note": ""},
    )
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


def picker_with(**gpus) -> str:
    return render_picker(
        projects=[],
        built={},
        types={},
        default_type="base",
        server_name="paper",
        fixed_project=True,
        selected="__new__",
        gpus={"max": 1, "mig": False, "note": "0 of 2 GPUs free right now", **gpus},
    )


def test_the_form_offers_to_wait_for_a_gpu_and_says_how_many_wait():
    html = picker_with(queue=True, waiting=3, interrupted="")
    assert 'name="wait"' in html and "(3 waiting now)" in html
    assert "checked" not in html.split('name="wait"')[1].split(">")[0]
    assert 'name="wait"' not in picker_with(queue=False, waiting=0, interrupted="")


def test_the_form_says_a_restart_ended_the_wait_and_ticks_wait_again():
    html = picker_with(queue=True, waiting=0, interrupted="Your wait ended <when> the hub")
    assert "Your wait ended &lt;when&gt; the hub" in html
    assert "checked" in html.split('name="wait"')[1].split(">")[0]
