"""The image cleaner and a project's deletion on the real engine.

The cleaner's pass runs against images built here, labelled as ds01 labels its
own (and with a label of this run, so that nothing else on a shared engine is
looked at), with a clock 40 days ahead and a faked disk reading: 85 % full,
less what was removed. A project's deletion goes through a real hub process
and the ds01 service's JSON API.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import time
import uuid
from pathlib import Path

import docker
import pytest

from ds01_spawner import labels
from ds01_spawner.audit import AuditLog, read_events
from ds01_spawner.cleanup import CleanedRecords, DiskUsage
from ds01_spawner.limits import PolicyStore
from ds01_spawner.projects import Project, ProjectStore
from ds01_spawner.service.cleaner import Cleaner

from .hubprocess import Client, HubProcess, seed_workspace

DAY = 86400.0
TEST_LABEL = "ds01.test-run"
BLOB = 1024 * 1024


@pytest.fixture
def run(engine):
    """This test's label value; every image and container carrying it goes afterwards."""
    value = uuid.uuid4().hex[:10]
    yield value
    wanted = {"label": [f"{TEST_LABEL}={value}"]}
    for c in engine.containers.list(all=True, filters=wanted):
        c.remove(force=True)
    for image in engine.images.list(filters=wanted):
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(image.id, force=True)


def build(engine, run: str, tag: str, owner: str, project: str) -> docker.models.images.Image:
    """A small project image, FROM scratch with 1 MiB of its own, labelled as ds01's."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (
            ("Dockerfile", b"FROM scratch\nCOPY blob /blob\n"),
            ("blob", os.urandom(BLOB)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    image, _ = engine.images.build(
        fileobj=context,
        custom_context=True,
        tag=tag,
        labels={**labels.project_labels(owner, project, "base"), TEST_LABEL: run},
        rm=True,
    )
    return image


def test_the_cleaner_removes_by_policy_and_records_each_removal(engine, run, tmp_path):
    now = time.time()
    fake_now = now + 40 * DAY  # every image here was built 40 days ago
    state = tmp_path / "state"
    store = ProjectStore(state)
    one, two = f"cl{run[:6]}a", f"cl{run[:6]}b"
    s1, s2 = store.slug(one), store.slug(two)

    # roll: rebuilt twice, so a dangling image, a :previous and a :latest; used yesterday
    dangling = build(engine, run, f"ds01-{s1}/roll:latest", one, "roll")
    previous = build(engine, run, f"ds01-{s1}/roll:latest", one, "roll")
    previous.tag(f"ds01-{s1}/roll", "previous")
    build(engine, run, f"ds01-{s1}/roll:latest", one, "roll")
    # used: the least recently used, but a (stopped) container still uses its image
    used = build(engine, run, f"ds01-{s1}/used:latest", one, "used")
    engine.containers.create(used.id, command=["/none"], labels={TEST_LABEL: run})
    # zeta, then alpha: stopped, last used long ago (zeta longer)
    zeta = build(engine, run, f"ds01-{s2}/zeta:latest", two, "zeta")
    alpha = build(engine, run, f"ds01-{s2}/alpha:latest", two, "alpha")
    for slug, owner, name, last_used in (
        (s1, one, "roll", fake_now - DAY),
        (s1, one, "used", now),
        (s2, two, "zeta", now + 3600),
        (s2, two, "alpha", now + 7200),
    ):
        store.save(slug, Project(owner, name, "base", now, last_used))

    size = previous.attrs["Size"]
    total = 10 * size
    removed: list[int] = []

    def disk(client) -> DiskUsage:
        return DiskUsage(int(0.85 * total) - sum(removed), total)

    audit = AuditLog(state, "service")
    cleaner = Cleaner(
        str(state),
        PolicyStore(None),  # the built-in policy: 7d, 30d, 80 %, 60 %
        audit,
        dangling_grace=3600,
        disk_usage=disk,
        clock=lambda: fake_now,
        image_filters={"label": [f"{TEST_LABEL}={run}"]},
    )
    done = cleaner.clean_once()
    removed += [r.bytes for r in done]

    assert [(r.ref, r.reason) for r in done] == [
        (f"ds01-{s1}/roll:previous", "superseded"),
        (dangling.id, "dangling"),
        (f"ds01-{s2}/zeta:latest", "disk_watermark"),
    ]
    assert disk(None).share < 0.6, "under the low watermark: alpha's image stays"
    gone = {i for i in (dangling.id, previous.id, zeta.id)}
    present = {i.id for i in engine.images.list(filters={"label": [f"{TEST_LABEL}={run}"]})}
    assert not gone & present
    assert {used.id, alpha.id} <= present

    events = list(read_events(state, kinds=["image"]))
    assert [(e["image"], e["reason"], e["bytes"], e["by"]) for e in events] == [
        (r.ref, r.reason, r.bytes, "cleaner") for r in done
    ]
    assert events[-1]["user"] == two and events[-1]["project"] == "zeta"
    assert CleanedRecords(state).read(s2, "zeta")["reason"] == "disk_watermark"

    assert cleaner.clean_once() == [], "the next pass finds the disk under the high watermark"


# ---------------------------------------------------------------- deleting a project


@pytest.fixture
def hub(tmp_path, run):
    policy = tmp_path / "policy.yaml"
    policy.write_text("images:\n  workspace_on_delete: keep\n")
    (tmp_path / "data").mkdir()
    hub = HubProcess(tmp_path / "data", tmp_path / "hub.log", DS01_POLICY_FILE=str(policy))
    hub.policy = policy
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


def seed_project(hub: HubProcess, engine, run: str, owner: str, name: str) -> Path:
    state, root = hub.data_dir / "state", hub.data_dir / "workspaces"
    workspace, _ = seed_workspace(state, root, owner, name, "FROM scratch\n")
    store = ProjectStore(state)
    store.save(store.slug(owner), Project(owner, name, "base", time.time()))
    build(engine, run, f"ds01-{store.slug(owner)}/{name}:latest", owner, name)
    return workspace


def test_a_researcher_deletes_a_project_and_its_workspace_is_kept(hub, engine, run):
    owner = f"del{run[:6]}"
    workspace = seed_project(hub, engine, run, owner, "paper")
    me, other = Client(hub, owner), Client(hub, f"oth{run[:6]}")
    assert me.get(f"images/{owner}/paper").json()["built"]

    r = other.post(f"images/{owner}/paper/delete", {"confirm": "paper"})
    assert r.status_code == 403, r.text
    r = me.post(f"images/{owner}/paper/delete", {"confirm": "pape"})
    assert r.status_code == 400 and "type the project's name" in r.json()["message"]
    assert me.get(f"images/{owner}/paper").status_code == 200, "nothing was deleted"

    r = me.post(f"images/{owner}/paper/delete", {"confirm": "paper"})
    assert r.status_code == 200, r.text
    assert r.json()["workspace"] == "kept" and r.json()["images"] == [f"ds01-{owner}/paper:latest"]
    assert (workspace / "Dockerfile").read_text() == "FROM scratch\n"
    assert me.get(f"images/{owner}/paper").status_code == 404
    with pytest.raises(docker.errors.ImageNotFound):
        engine.images.get(f"ds01-{owner}/paper:latest")
    (event,) = read_events(hub.data_dir / "state", kinds=["image"])
    assert (event["image"], event["reason"], event["by"]) == (
        f"ds01-{owner}/paper:latest",
        "project_deleted",
        owner,
    )

    # the policy changed to archive: the next deletion moves the workspace aside
    hub.policy.write_text("images:\n  workspace_on_delete: archive\n")
    draft = seed_project(hub, engine, run, owner, "draft")
    r = me.post(f"images/{owner}/draft/delete", {"confirm": "draft"})
    assert r.status_code == 200, r.text
    archived = Path(r.json()["workspace_path"])
    assert not draft.exists() and (archived / "Dockerfile").exists()
    assert archived.parent == hub.data_dir / "workspaces" / ".archive" / owner
