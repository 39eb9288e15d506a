"""The image cleaner's decisions (`cleanup.plan`), its records, and the spawn page's line."""

from __future__ import annotations

from dataclasses import replace

from ds01_spawner import labels
from ds01_spawner.cleanup import (
    CleanedRecords,
    DiskUsage,
    Facts,
    ImageFacts,
    Known,
    plan,
    rebuild_message,
    rebuild_notice,
)
from ds01_spawner.limits import ImageSettings

DAY = 86400.0
NOW = 1_000 * DAY
GB = 1024**3
SETTINGS = ImageSettings()  # previous 7d, latest 30d, 80 % / 60 %


def image(
    id: str,
    *tags: str,
    age: float = 0.0,
    size: int = GB,
    user: str = "alice",
    project: str | None = None,
    labelled: bool = True,
) -> ImageFacts:
    """A project image `ds01-<user>/<project>:<tag>` (the project from the first tag)."""
    if project is None and tags and "/" in tags[0]:
        project = tags[0].split("/")[1].split(":")[0]
    image_labels = labels.project_labels(user, project or "", "base") if labelled else {}
    return ImageFacts(id, tuple(tags), NOW - age, size, image_labels)


def facts(
    *images: ImageFacts,
    used: set[str] = frozenset(),
    running: set[tuple[str, str]] = frozenset(),
    last_used: dict[str, float] | None = None,
    building: set[str] = frozenset(),
    disk: DiskUsage | None = None,
) -> Facts:
    """Every project whose images are listed is known, last used `last_used` days ago
    (default: 100 days), owned by the image's ds01.user."""
    known = {}
    for i in images:
        for tag in i.tags if labels.USER in i.labels else ():
            repo = tag.rpartition(":")[0]
            days = (last_used or {}).get(repo, 100)
            known[repo] = Known(i.labels.get(labels.USER, ""), NOW - days * DAY)
    return Facts(
        images=images,
        used_ids=frozenset(used),
        running=frozenset(running),
        projects=known,
        building=frozenset(building),
        disk=disk,
        now=NOW,
    )


def refs(removals) -> list[tuple[str, str]]:
    return [(r.ref, r.reason) for r in removals]


def full(percent: float, total: int = 100 * GB) -> DiskUsage:
    return DiskUsage(int(total * percent / 100), total)


# ---------------------------------------------------------------- superseded :previous


def test_a_previous_replaced_longer_ago_than_keep_previous_for_goes():
    f = facts(
        image("new", "ds01-alice/x:latest", age=8 * DAY),
        image("old", "ds01-alice/x:previous", age=20 * DAY),
    )
    assert refs(plan(f, SETTINGS)) == [("ds01-alice/x:previous", "superseded")]


def test_a_previous_replaced_recently_stays_however_old_it_is():
    f = facts(
        image("new", "ds01-alice/x:latest", age=2 * DAY),
        image("old", "ds01-alice/x:previous", age=200 * DAY),
    )
    assert plan(f, SETTINGS) == []


def test_after_a_rollback_the_newer_image_dates_the_replacement():
    f = facts(
        image("older", "ds01-alice/x:latest", age=30 * DAY),
        image("newer", "ds01-alice/x:previous", age=3 * DAY),
    )
    assert plan(f, SETTINGS) == []


def test_keep_previous_for_none_keeps_every_previous():
    f = facts(
        image("new", "ds01-alice/x:latest", age=100 * DAY),
        image("old", "ds01-alice/x:previous", age=200 * DAY),
    )
    assert plan(f, replace(SETTINGS, keep_previous_for=None)) == []


def test_a_previous_a_container_uses_stays():
    f = facts(
        image("new", "ds01-alice/x:latest", age=8 * DAY),
        image("old", "ds01-alice/x:previous", age=20 * DAY),
        used={"old"},
    )
    assert plan(f, SETTINGS) == []


def test_a_previous_of_a_project_being_built_stays():
    f = facts(
        image("new", "ds01-alice/x:latest", age=8 * DAY),
        image("old", "ds01-alice/x:previous", age=20 * DAY),
        building={"ds01-alice/x"},
    )
    assert plan(f, SETTINGS) == []


def test_removing_a_previous_that_is_also_latest_frees_nothing():
    f = facts(image("same", "ds01-alice/x:latest", "ds01-alice/x:previous", age=20 * DAY))
    (removal,) = plan(f, SETTINGS)
    assert removal.ref == "ds01-alice/x:previous" and removal.bytes == 0


def test_a_removal_names_its_owner_project_slug_and_size():
    f = facts(
        image("new", "ds01-alice-2/x:latest", age=8 * DAY, user="Alice"),
        image("old", "ds01-alice-2/x:previous", age=20 * DAY, size=3 * GB, user="Alice"),
    )
    (removal,) = plan(f, SETTINGS)
    assert (removal.user, removal.project, removal.slug, removal.tag) == (
        "Alice",
        "x",
        "alice-2",
        "previous",
    )
    assert removal.bytes == 3 * GB and removal.image_id == "old"


# ---------------------------------------------------------------- whose images


def test_images_of_projects_without_a_record_are_never_touched():
    f = facts(
        image("new", "ds01-alice/x:latest", age=8 * DAY),
        image("old", "ds01-alice/x:previous", age=20 * DAY),
        disk=full(95),
    )
    assert plan(replace(f, projects={}), SETTINGS) == []


def test_a_record_of_another_owner_does_not_make_the_image_ours():
    f = facts(
        image("new", "ds01-alice/x:latest", age=8 * DAY),
        image("old", "ds01-alice/x:previous", age=20 * DAY),
    )
    f = replace(f, projects={"ds01-alice/x": Known("mallory", 0.0)})
    assert plan(f, SETTINGS) == []


def test_an_image_without_ds01_project_labels_is_not_a_project_image():
    f = facts(
        image("new", "ds01-alice/x:latest", age=40 * DAY),
        image("old", "ds01-alice/x:previous", age=50 * DAY, labelled=False),
        disk=full(95),
    )
    assert [r.ref for r in plan(f, SETTINGS)] == ["ds01-alice/x:latest"]


def test_a_label_naming_another_project_than_the_tag_is_not_trusted():
    f = facts(
        image("new", "ds01-alice/x:latest", age=8 * DAY),
        image("old", "ds01-alice/x:previous", age=20 * DAY, project="y"),
    )
    assert plan(f, SETTINGS) == []


def test_other_images_are_never_touched():
    f = facts(
        image("base", "ds01/singleuser:latest", age=400 * DAY, labelled=False),
        image("py", "python:3.11-slim", age=400 * DAY, labelled=False),
        disk=full(99),
    )
    assert plan(f, SETTINGS) == []


# ---------------------------------------------------------------- dangling


def test_an_untagged_ds01_image_is_dangling():
    f = facts(image("orphan", age=3 * DAY, project="x"))
    assert refs(plan(f, SETTINGS)) == [("orphan", "dangling")]


def test_a_build_leftover_with_only_the_base_images_labels_is_dangling():
    leftover = ImageFacts("layer", (), NOW - DAY, 10, {labels.ROLE: "base"})
    (removal,) = plan(facts(leftover), SETTINGS)
    assert (removal.ref, removal.reason, removal.bytes) == ("layer", "dangling", 10)


def test_an_untagged_image_without_ds01_labels_is_not_ours():
    stranger = ImageFacts("theirs", (), NOW - 100 * DAY, GB, {"maintainer": "x"})
    assert plan(facts(stranger), SETTINGS) == []


def test_a_dangling_image_younger_than_a_build_may_run_stays():
    f = facts(image("layer", age=600, project="x"))
    assert plan(f, SETTINGS, dangling_grace=7200) == []
    assert len(plan(f, SETTINGS, dangling_grace=300)) == 1


def test_a_dangling_image_a_container_uses_stays():
    f = facts(image("orphan", age=3 * DAY, project="x"), used={"orphan"})
    assert plan(f, SETTINGS) == []


# ---------------------------------------------------------------- the disk watermark


def stopped_projects() -> tuple[ImageFacts, ...]:
    return (
        image("a", "ds01-alice/a:latest", age=200 * DAY, size=10 * GB),
        image("b", "ds01-alice/b:latest", age=200 * DAY, size=10 * GB),
        image("c", "ds01-alice/c:latest", age=200 * DAY, size=10 * GB),
    )


USED = {"ds01-alice/a": 90, "ds01-alice/b": 300, "ds01-alice/c": 60}  # days ago


def test_under_the_high_watermark_no_latest_goes():
    f = facts(*stopped_projects(), last_used=USED, disk=full(80))
    assert plan(f, SETTINGS) == []


def test_over_the_high_watermark_the_least_recently_used_go_until_under_the_low():
    f = facts(*stopped_projects(), last_used=USED, disk=full(85))
    # 85 % of 100 G: b (300 days) -> 75 %, a (90 days) -> 65 %, c (60 days) -> 55 %
    assert refs(plan(f, SETTINGS)) == [
        ("ds01-alice/b:latest", "disk_watermark"),
        ("ds01-alice/a:latest", "disk_watermark"),
        ("ds01-alice/c:latest", "disk_watermark"),
    ]


def test_it_stops_as_soon_as_the_projection_is_under_the_low_watermark():
    f = facts(*stopped_projects(), last_used=USED, disk=full(81))
    settings = replace(SETTINGS, disk_low_watermark=0.65)  # b -> 71 %, a -> 61 %: done
    assert [r.ref for r in plan(f, settings)] == ["ds01-alice/b:latest", "ds01-alice/a:latest"]


def test_what_earlier_rules_freed_counts_towards_the_low_watermark():
    f = facts(
        *stopped_projects(),
        image("layer", age=3 * DAY, size=15 * GB, project="x"),
        last_used=USED,
        disk=full(82),
    )
    # 82 % - 15 G dangling = 67 %, then b -> 57 %
    assert refs(plan(f, SETTINGS)) == [
        ("layer", "dangling"),
        ("ds01-alice/b:latest", "disk_watermark"),
    ]


def test_a_latest_used_within_keep_latest_for_stays_even_on_a_full_disk():
    f = facts(*stopped_projects(), last_used={**USED, "ds01-alice/b": 10}, disk=full(99))
    assert [r.ref for r in plan(f, SETTINGS)] == ["ds01-alice/a:latest", "ds01-alice/c:latest"]


def test_a_latest_built_within_keep_latest_for_counts_as_used():
    images = (*stopped_projects()[:2], image("c", "ds01-alice/c:latest", age=DAY, size=10 * GB))
    f = facts(*images, last_used=USED, disk=full(99))
    assert "ds01-alice/c:latest" not in [r.ref for r in plan(f, SETTINGS)]


def test_keep_latest_for_none_never_removes_a_latest():
    f = facts(*stopped_projects(), last_used=USED, disk=full(99))
    assert plan(f, replace(SETTINGS, keep_latest_for=None)) == []


def test_a_running_projects_images_stay():
    f = facts(*stopped_projects(), last_used=USED, running={("alice", "b")}, disk=full(85))
    assert "ds01-alice/b:latest" not in [r.ref for r in plan(f, SETTINGS)]


def test_an_image_a_stopped_container_still_uses_stays():
    f = facts(*stopped_projects(), last_used=USED, used={"b"}, disk=full(85))
    assert "ds01-alice/b:latest" not in [r.ref for r in plan(f, SETTINGS)]


def test_a_project_being_built_keeps_its_latest():
    f = facts(*stopped_projects(), last_used=USED, building={"ds01-alice/b"}, disk=full(85))
    assert "ds01-alice/b:latest" not in [r.ref for r in plan(f, SETTINGS)]


def test_under_pressure_a_projects_previous_goes_before_its_latest():
    f = facts(
        image("b", "ds01-alice/b:latest", age=200 * DAY, size=10 * GB),
        image("b0", "ds01-alice/b:previous", age=201 * DAY, size=10 * GB),
        last_used={"ds01-alice/b": 300},
        disk=full(85),
    )
    settings = replace(SETTINGS, keep_previous_for=None)
    assert refs(plan(f, settings)) == [
        ("ds01-alice/b:previous", "disk_watermark"),
        ("ds01-alice/b:latest", "disk_watermark"),
    ]


def test_a_previous_already_superseded_is_not_removed_twice():
    f = facts(
        image("b", "ds01-alice/b:latest", age=200 * DAY, size=10 * GB),
        image("b0", "ds01-alice/b:previous", age=201 * DAY, size=10 * GB),
        last_used={"ds01-alice/b": 300},
        disk=full(85),
    )
    assert refs(plan(f, SETTINGS)) == [
        ("ds01-alice/b:previous", "superseded"),
        ("ds01-alice/b:latest", "disk_watermark"),
    ]


def test_an_unknown_disk_reading_means_no_watermark_pass():
    f = facts(*stopped_projects(), last_used=USED, disk=None)
    assert plan(f, SETTINGS) == []


def test_lower_watermarks_from_the_policy_apply():
    f = facts(*stopped_projects(), last_used=USED, disk=full(40))
    low = replace(SETTINGS, disk_high_watermark=0.3, disk_low_watermark=0.25)
    assert [r.ref for r in plan(f, low)] == ["ds01-alice/b:latest", "ds01-alice/a:latest"]


def test_projects_used_at_the_same_time_go_in_name_order():
    same = {"ds01-alice/a": 90, "ds01-alice/b": 90, "ds01-alice/c": 90}
    f = facts(*stopped_projects(), last_used=same, disk=full(85))
    assert [r.ref for r in plan(f, SETTINGS)][:1] == ["ds01-alice/a:latest"]


# ---------------------------------------------------------------- why a start rebuilds


def test_a_cleaned_record_is_read_once(tmp_path):
    records = CleanedRecords(tmp_path)
    records.record("alice", "x", "disk_watermark", at=NOW)
    assert records.read("alice", "x") == {"removed_at": NOW, "reason": "disk_watermark"}
    assert records.take("alice", "x")["reason"] == "disk_watermark"
    assert records.take("alice", "x") is None


def test_a_cleaned_record_path_cannot_leave_its_directory(tmp_path):
    records = CleanedRecords(tmp_path)
    assert records.read("../etc", "x") is None
    assert rebuild_notice(tmp_path, "alice", "../../x") is None


def test_the_rebuild_message_names_image_day_and_reason():
    message = rebuild_message("ds01-alice/x", {"removed_at": NOW, "reason": "disk_watermark"})
    assert message.startswith("Image ds01-alice/x was removed by the image cleaner on ")
    assert "(disk_watermark: the image disk was nearly full" in message
    assert message.endswith("): rebuilding it")


def test_a_damaged_record_still_gives_a_message():
    assert "on an earlier day (odd)" in rebuild_message(
        "ds01-a/x", {"removed_at": "?", "reason": "odd"}
    )


def test_the_notice_is_given_once_and_only_after_a_removal(tmp_path):
    assert rebuild_notice(tmp_path, "alice", "x") is None
    CleanedRecords(tmp_path).record("alice", "x", "disk_watermark")
    assert "ds01-alice/x" in rebuild_notice(tmp_path, "alice", "x")
    assert rebuild_notice(tmp_path, "alice", "x") is None


# ---------------------------------------------------------------- the service's pass


class FakeClient:
    """The engine calls `Cleaner` makes: images, containers, info, remove_image."""

    def __init__(self, images: list[dict], refuse: set[str] = frozenset()) -> None:
        self._images = images
        self.refuse = refuse
        self.removed: list[str] = []

    def images(self, filters=None) -> list[dict]:
        return self._images

    def containers(self, all=False) -> list[dict]:
        return []

    def info(self) -> dict:
        return {"DockerRootDir": "/nonexistent/docker"}

    def remove_image(self, ref: str) -> None:
        import docker.errors

        if ref in self.refuse:
            raise docker.errors.APIError("conflict", explanation="image is being used")
        self.removed.append(ref)


def engine_image(id: str, tag: str, user: str, project: str, created: float) -> dict:
    return {
        "Id": id,
        "RepoTags": [tag],
        "Created": created,
        "Size": GB,
        "Labels": labels.project_labels(user, project, "base"),
    }


def cleaner_for(tmp_path, client: FakeClient, percent: float = 85):
    from ds01_spawner.audit import AuditLog
    from ds01_spawner.limits import PolicyStore
    from ds01_spawner.projects import Project, ProjectStore
    from ds01_spawner.service.cleaner import Cleaner

    store = ProjectStore(tmp_path)
    for name in ("a", "b"):
        store.save(store.slug("alice"), Project("alice", name, "base", 0.0, NOW - 100 * DAY))
    return Cleaner(
        str(tmp_path),
        PolicyStore(None),
        AuditLog(tmp_path, "service"),
        disk_usage=lambda client: full(percent, total=10 * GB),
        clock=lambda: NOW,
        client=client,
    )


def test_a_removal_the_engine_refuses_is_neither_counted_nor_recorded(tmp_path):
    from ds01_spawner.audit import read_events

    client = FakeClient(
        [
            engine_image("a", "ds01-alice/a:latest", "alice", "a", NOW - 90 * DAY),
            engine_image("b", "ds01-alice/b:latest", "alice", "b", NOW - 80 * DAY),
        ],
        refuse={"ds01-alice/a:latest"},
    )
    done = cleaner_for(tmp_path, client).clean_once()
    assert [r.ref for r in done] == client.removed == ["ds01-alice/b:latest"]
    assert [e["image"] for e in read_events(tmp_path, kinds=["image"])] == client.removed
    assert CleanedRecords(tmp_path).read("alice", "a") is None
    assert CleanedRecords(tmp_path).read("alice", "b")["reason"] == "disk_watermark"


def test_a_project_started_during_the_pass_keeps_its_latest(tmp_path):
    from ds01_spawner.projects import ProjectStore

    client = FakeClient([engine_image("a", "ds01-alice/a:latest", "alice", "a", 0.0)])
    cleaner = cleaner_for(tmp_path, client)
    facts = cleaner.facts

    def facts_then_a_start():
        seen = facts()
        store = ProjectStore(tmp_path)
        project = store.get("alice", "a")
        project.last_used = NOW + 1  # the spawner touches the record before the image
        store.save("alice", project)
        return seen

    cleaner.facts = facts_then_a_start
    assert cleaner.clean_once() == [] and client.removed == []


def test_a_disk_this_host_cannot_see_is_no_reading():
    from ds01_spawner.service.cleaner import engine_disk_usage

    assert engine_disk_usage(FakeClient([])) is None
