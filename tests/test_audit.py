"""The audit trail: its files, what it refuses, how the files read back, who writes it."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import docker
import pytest

from ds01_spawner.audit import AuditLog, month_of, read_events, schema_id
from ds01_spawner.builds import ImageBuilder
from ds01_spawner.dockerfile import ManagedPackages, package_changes, render_managed
from ds01_spawner.errors import Refusal
from ds01_spawner.ledger import gpu_audit_fields, gpu_labels
from ds01_spawner.limits import PolicyStore
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.projects import Project
from ds01_spawner.service.hub_api import HubClient
from ds01_spawner.service.image_manager import ImageManager
from ds01_spawner.service.retirer import Retirer
from ds01_spawner.settings import HUB_ONLY, SETTINGS_ENV, SHARED_SETTINGS, DS01Settings

from .test_builds import FakeEngine, spec


def trail_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "audit").glob("*.jsonl"))


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def line(kind: str, stamp: str, **data: object) -> str:
    """A trail line as jupyter_events writes it."""
    event = {"__timestamp__": stamp, "__schema__": schema_id(kind), "__schema_version__": "1"}
    return json.dumps({**event, "__metadata_version__": 1, **data}) + "\n"


# ---------------------------------------------------------------- writing


def test_an_event_is_one_json_line_in_the_process_file_of_its_month(tmp_path):
    audit = AuditLog(tmp_path, "hub")
    audit.emit("server", action="start", user="alice", server="", container="ds01-alice--p")
    (path,) = trail_files(tmp_path)
    assert path.name == f"{month_of(datetime.now(timezone.utc))}.hub.jsonl"
    (event,) = lines_of(path)
    assert event["__schema__"] == schema_id("server") and event["__schema_version__"] == "1"
    assert (event["action"], event["user"], event["container"]) == (
        "start",
        "alice",
        "ds01-alice--p",
    )


def test_an_event_is_on_disk_as_soon_as_emit_returns(tmp_path):
    audit = AuditLog(tmp_path, "hub")
    audit.emit("gpu", action="grant", user="alice", server="", uuids=["GPU-1"], equivalents=1)
    # read by another file object while the writer's stays open: nothing waits in a buffer
    (event,) = read_events(tmp_path)
    assert event["kind"] == "gpu" and event["uuids"] == ["GPU-1"]


def test_fields_left_unknown_are_left_out(tmp_path):
    AuditLog(tmp_path, "hub").emit("server", action="stop", user="a", server="", seconds=None)
    (event,) = read_events(tmp_path)
    assert "seconds" not in event


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("server", {"action": "explode", "user": "a", "server": ""}),
        ("server", {"action": "start"}),  # no user
        ("gpu", {"action": "grant", "user": "a", "server": "", "uuids": "GPU-1"}),
        ("nonsense", {"user": "a"}),
    ],
    ids=["unknown action", "missing field", "wrong type", "unknown kind"],
)
def test_an_invalid_event_is_refused_without_raising_and_nothing_is_written(tmp_path, kind, data):
    assert AuditLog(tmp_path, "hub").emit(kind, **data) is None
    assert list(read_events(tmp_path)) == []
    assert all(p.stat().st_size == 0 for p in trail_files(tmp_path))


def test_a_very_long_text_is_cut_so_the_line_stays_readable(tmp_path):
    AuditLog(tmp_path, "hub").emit(
        "refusal", user="a", reason="build", status=500, message="x" * 10**5
    )
    (event,) = read_events(tmp_path)
    assert 1000 < len(event["message"]) < 10**4


def test_a_failing_extra_handler_neither_raises_nor_stops_the_file(tmp_path):
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("the log collector is down")

    audit = AuditLog(tmp_path, "hub", handlers=[Broken()])
    audit.emit("policy", action="reload", source="policy.yaml")
    audit.emit("policy", action="reload", source="policy.yaml")
    assert [e["action"] for e in read_events(tmp_path)] == ["reload", "reload"]


def test_an_extra_handler_gets_every_event(tmp_path):
    got: list[str] = []

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(self.format(record))

    AuditLog(tmp_path, "hub", handlers=[Collector()]).emit("policy", action="load")
    assert json.loads(got[0])["action"] == "load"


def test_an_unwritable_state_directory_never_raises(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    AuditLog(blocked, "hub").emit("policy", action="load")  # logged by logging, not raised


# ---------------------------------------------------------------- reading


def test_read_events_merges_the_processes_in_time_order(tmp_path):
    hub, service = AuditLog(tmp_path, "hub"), AuditLog(tmp_path, "service")
    hub.emit("server", action="start", user="a", server="")
    service.emit("build", action="start", image="ds01-a/p:latest")
    hub.emit("server", action="ready", user="a", server="")
    service.emit("build", action="end", image="ds01-a/p:latest", result="succeeded")
    assert len(trail_files(tmp_path)) == 2
    events = list(read_events(tmp_path))
    assert [(e["kind"], e["action"]) for e in events] == [
        ("server", "start"),
        ("build", "start"),
        ("server", "ready"),
        ("build", "end"),
    ]
    assert [e["action"] for e in read_events(tmp_path, kinds=["build"])] == ["start", "end"]


def test_a_line_cut_short_by_a_kill_and_garbage_are_skipped(tmp_path):
    audit = tmp_path / "audit"
    audit.mkdir()
    good = line("server", "2026-01-10T10:00:00.000001+00:00Z", action="start", user="a", server="")
    (audit / "2026-01.hub.jsonl").write_text(
        "not json at all\n"
        + good
        + "[1, 2]\n"
        + line("server", "2026-01-10T10:00:01+00:00Z", action="stop", user="a", server="")[:40]
    )
    (audit / "2026-01.service.jsonl").write_bytes(b"\xff\xfe\n" + b"x" * 70_000 + b"\n")
    (event,) = read_events(tmp_path)
    assert event["action"] == "start" and event["at"].microsecond == 1


def test_since_and_until_select_across_a_month_boundary(tmp_path):
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "2026-01.hub.jsonl").write_text(
        line("server", "2026-01-31T23:59:59.900000+00:00Z", action="start", user="jan", server="")
    )
    (audit / "2026-02.service.jsonl").write_text(
        line("server", "2026-02-01T00:00:00.100000+00:00Z", action="retire", user="feb", server="")
    )
    (audit / "2026-03.hub.jsonl").write_text(
        line("server", "2026-03-01T08:00:00+00:00Z", action="stop", user="mar", server="")
    )
    boundary = datetime(2026, 2, 1, tzinfo=timezone.utc)
    march = datetime(2026, 3, 1, tzinfo=timezone.utc)

    def users(**window):
        return [e["user"] for e in read_events(tmp_path, **window)]

    assert users() == ["jan", "feb", "mar"]
    assert users(until=boundary) == ["jan"]
    assert users(since=boundary) == ["feb", "mar"]
    assert users(since=boundary, until=march) == ["feb"]


def test_no_trail_yet_reads_as_nothing(tmp_path):
    assert list(read_events(tmp_path)) == []


# ---------------------------------------------------------------- what the events say


def test_a_gpu_event_says_what_the_ledger_labels_say():
    slots = [
        GpuSlot("GPU-a", "0", "A100", 80, 0, 0),
        GpuSlot("MIG-b", "1:0", "A100 1g.10gb", 10, 0, None, fraction=1 / 7),
    ]
    fields = gpu_audit_fields(gpu_labels(slots, "2026-01-10T10:00:00Z"))
    assert fields == {
        "uuids": ["GPU-a", "MIG-b"],
        "equivalents": float(f"{1 + 1 / 7:g}"),
        "since": "2026-01-10T10:00:00Z",
    }
    assert gpu_audit_fields(gpu_labels([], "")) is None, "a CPU-only container grants nothing"
    assert gpu_audit_fields({}) is None


def test_package_changes_name_what_was_added_and_removed():
    before = ManagedPackages(apt=("curl",), pip=("numpy==1.26", "pandas"))
    after = ManagedPackages(apt=("curl", "git"), pip=("numpy==2.0", "pandas"))
    assert package_changes(before, after) == (["numpy==2.0", "apt:git"], ["numpy==1.26"])
    assert package_changes(after, after) == ([], [])


# ---------------------------------------------------------------- who writes it


def test_the_hub_and_the_service_each_write_their_own_file(tmp_path):
    hub = DS01Settings(state_dir=str(tmp_path))
    environ = {SETTINGS_ENV: json.dumps({"state_dir": str(tmp_path)})}
    service = DS01Settings.from_environ(environ)
    assert hub.audit is DS01Settings(state_dir=str(tmp_path)).audit, "one per process"
    assert service.audit is not hub.audit
    hub.audit.emit("policy", action="load")
    service.audit.emit("policy", action="reload")
    assert sorted(p.name.split(".")[1] for p in trail_files(tmp_path)) == ["hub", "service"]


def test_extra_handlers_are_the_hubs_alone():
    assert "audit_handlers" in HUB_ONLY and "audit_handlers" not in SHARED_SETTINGS
    assert "audit_handlers" in DS01Settings.class_trait_names(config=True)


async def test_a_build_records_its_start_and_its_end(tmp_path):
    engine = FakeEngine()
    builder = ImageBuilder(1, engine.client, audit=AuditLog(tmp_path, "hub"))
    built = builder.build(spec("ada", "p"))
    engine.release("ds01-ada/p:latest")
    await built.wait()
    broken = builder.build(spec("eve", "p", "FROM ds01/singleuser\nLABEL ds01.user=ada\n"))
    with pytest.raises(Exception, match="not allowed"):
        await broken.wait()
    events = [(e["user"], e["action"], e.get("result")) for e in read_events(tmp_path)]
    assert events == [
        ("ada", "start", None),
        ("ada", "end", "succeeded"),
        ("eve", "start", None),
        ("eve", "end", "failed"),
    ]
    end = list(read_events(tmp_path))[-1]
    assert end["seconds"] >= 0 and "not allowed" in end["error"]


async def test_a_package_edit_records_what_changed_and_who_changed_it(tmp_path, monkeypatch):
    monkeypatch.setattr(docker, "APIClient", lambda **kwargs: None)
    settings = DS01Settings(
        workspace_root=str(tmp_path / "workspaces"), state_dir=str(tmp_path / "state")
    )
    manager = ImageManager(settings, HubClient("http://127.0.0.1:1/hub/api", ""))
    project = Project("alice", "thesis", "base", 0.0)
    workspace = manager._workspace(project)
    workspace.mkdir(parents=True)
    start = render_managed("FROM scratch\n", ManagedPackages(pip=("pandas",)))
    (workspace / "Dockerfile").write_text(start)
    if os.geteuid() == 0:  # the service refuses a workspace owned by root
        os.chown(workspace, 1000, 1000)
    await manager.act(
        project,
        "packages",
        {"add_pip": ["numpy"], "remove_pip": ["pandas"]},
        by_admin=False,
        by="alice",
    )
    await manager.update_packages(project, add_pip=["numpy"])  # no change: no event
    (event,) = read_events(tmp_path / "state", kinds=["packages"])
    assert (event["user"], event["project"], event["by"]) == ("alice", "thesis", "alice")
    assert (event["added"], event["removed"]) == (["numpy"], ["pandas"])


def test_a_policy_reload_and_a_refused_one_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(docker, "APIClient", lambda **kwargs: None)
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults:\n  max_gpus: 1\n")
    audit = AuditLog(tmp_path, "service")
    retirer = Retirer(
        HubClient("http://127.0.0.1:1/hub/api", ""),
        PolicyStore(str(policy)),
        None,
        str(tmp_path),
        audit=audit,
    )
    retirer.reload_policy(by="admin")
    policy.write_text("defaults:\n  max_gpus: lots\n")
    with pytest.raises(Refusal):
        retirer.reload_policy(by="admin")
    reload, refused = read_events(tmp_path, kinds=["policy"])
    assert (reload["action"], reload["by"], reload["source"]) == ("reload", "admin", str(policy))
    assert refused["action"] == "refused" and "max_gpus" in refused["error"]
