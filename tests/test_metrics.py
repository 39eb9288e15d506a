"""The ds01 service's Prometheus metrics: counters from the audit trail, gauges from the
GPUs and the images, who may scrape them, and the Grafana dashboard built on them."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado import httpserver, web
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import bind_unused_port

from ds01_spawner.audit import AuditLog, read_events
from ds01_spawner.configure import METRICS_ROLE, with_metrics_role
from ds01_spawner.gpuqueue import QueueFile, Waiter, with_positions
from ds01_spawner.ledger import Hold, Holder, gpu_report
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.service.gpu_page import queue_rows
from ds01_spawner.service.metrics import (
    ImageDisk,
    ImageUsage,
    Metrics,
    MetricsHandler,
    TrailFollower,
    history_layers,
    image_usage,
)

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
NO_GPUS = {"gpus": [], "error": None}
NO_IMAGES = ImageUsage({}, {}, 0)


def slot(i: int, *, used_gib: int = 0, util: int | None = 0) -> GpuSlot:
    return GpuSlot(f"GPU-{i}", str(i), "A100", 80 * GIB, used_gib * GIB, util)


def holder(uuid: str, user: str, project: str) -> Holder:
    return Holder(uuid, user, project, project, "2025-01-01T00:00:00Z", 1.0, f"ds01-{user}")


def metrics_for(
    state_dir: Path,
    gpus: dict[str, Any] = NO_GPUS,
    images: ImageUsage = NO_IMAGES,
    now: float = 0.0,
) -> Metrics:
    async def gpu_view() -> dict[str, Any]:
        return gpus

    return Metrics(TrailFollower(state_dir), gpu_view, lambda: images, clock=lambda: now)


async def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, parsed back from the text format Prometheus reads."""
    text = (await metrics.render()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


@pytest.fixture
def trail(tmp_path):
    log = AuditLog(tmp_path, "test")
    yield log
    log.close()


def gpu_events(state_dir: Path) -> list[dict[str, Any]]:
    return list(read_events(state_dir, kinds=["gpu"]))


# ---------------------------------------------------------------- counters from the trail


async def test_builds_are_counted_by_result_with_zeros_for_results_not_seen(tmp_path, trail):
    for result in ("succeeded", "succeeded", "failed"):
        trail.emit("build", action="start", image="ds01-alice/a")
        trail.emit("build", action="end", image="ds01-alice/a", result=result, seconds=42.0)

    samples = await scrape(metrics_for(tmp_path))

    assert sample(samples, "ds01_builds_total", result="succeeded") == 2
    assert sample(samples, "ds01_builds_total", result="failed") == 1
    assert sample(samples, "ds01_builds_total", result="interrupted") == 0


async def test_build_durations_fill_the_histogram_by_result(tmp_path, trail):
    for seconds in (5.0, 45.0, 4000.0):
        trail.emit("build", action="end", image="x", result="succeeded", seconds=seconds)
    trail.emit("build", action="end", image="x", result="failed", seconds=3.0)

    samples = await scrape(metrics_for(tmp_path))

    ok = {"result": "succeeded"}
    assert sample(samples, "ds01_build_duration_seconds_bucket", le="10.0", **ok) == 1
    assert sample(samples, "ds01_build_duration_seconds_bucket", le="60.0", **ok) == 2
    assert sample(samples, "ds01_build_duration_seconds_bucket", le="3600.0", **ok) == 2
    assert sample(samples, "ds01_build_duration_seconds_bucket", le="+Inf", **ok) == 3
    assert sample(samples, "ds01_build_duration_seconds_count", **ok) == 3
    assert sample(samples, "ds01_build_duration_seconds_sum", **ok) == 4050.0
    assert sample(samples, "ds01_build_duration_seconds_count", result="failed") == 1


async def test_retirements_and_refusals_are_counted_by_reason(tmp_path, trail):
    for reason in ("idle_timeout", "idle_timeout", "max_runtime"):
        trail.emit("server", action="retire", user="alice", server="a", reason=reason)
    trail.emit("server", action="stop", user="alice", server="a")  # not a retirement
    trail.emit("refusal", user="bob", reason="gpu", status=409)
    trail.emit("refusal", user="bob", reason="limits", status=403)
    trail.emit("refusal", user="carol", reason="gpu", status=409)

    samples = await scrape(metrics_for(tmp_path))

    assert sample(samples, "ds01_retirements_total", reason="idle_timeout") == 2
    assert sample(samples, "ds01_retirements_total", reason="max_runtime") == 1
    assert sample(samples, "ds01_refusals_total", reason="gpu") == 2
    assert sample(samples, "ds01_refusals_total", reason="limits") == 1


async def test_gpu_seconds_add_a_released_hold_and_an_open_one_up_to_now(tmp_path, trail):
    gpu = {"user": "alice", "group": "students", "equivalents": 2.0}
    trail.emit("gpu", action="grant", server="a", uuids=["GPU-0", "GPU-1"], **gpu)
    trail.emit("gpu", action="release", server="a", uuids=["GPU-0", "GPU-1"], **gpu)
    trail.emit("gpu", action="grant", server="b", uuids=["GPU-0"], user="alice", group="students")
    granted, released, still_open = gpu_events(tmp_path)
    now = still_open["at"].timestamp() + 100

    samples = await scrape(metrics_for(tmp_path, now=now))

    held = 2.0 * (released["at"] - granted["at"]).total_seconds() + 1.0 * 100
    value = sample(samples, "ds01_gpu_seconds_total", user="alice", group="students")
    assert value == pytest.approx(held)


async def test_a_release_whose_grant_came_before_the_trail_counts_from_its_since(tmp_path, trail):
    since = datetime.now(timezone.utc) - timedelta(hours=1)
    trail.emit(
        "gpu", action="release", server="a", uuids=["GPU-0"], user="bob", since=since.isoformat()
    )
    (release,) = gpu_events(tmp_path)

    samples = await scrape(metrics_for(tmp_path, now=release["at"].timestamp()))

    held = (release["at"] - since).total_seconds()
    assert sample(samples, "ds01_gpu_seconds_total", user="bob", group="") == pytest.approx(held)


async def test_gpu_seconds_never_go_down_even_if_the_clock_does(tmp_path, trail):
    trail.emit("gpu", action="grant", server="a", uuids=["GPU-0"], user="alice")
    (grant,) = gpu_events(tmp_path)
    follower = TrailFollower(tmp_path)
    start = grant["at"].timestamp()

    later = follower.update(start + 100).gpu_seconds[("alice", "")]
    earlier = follower.update(start + 50).gpu_seconds[("alice", "")]

    assert later == pytest.approx(100) and earlier == later


async def test_each_process_file_counts_once_and_a_new_follower_counts_the_same(tmp_path):
    hub, service = AuditLog(tmp_path, "hub"), AuditLog(tmp_path, "service")
    follower = TrailFollower(tmp_path)
    hub.emit("refusal", user="bob", reason="gpu", status=409)
    service.emit("server", action="retire", user="alice", server="a", reason="max_runtime")
    follower.update(0)
    hub.emit("refusal", user="bob", reason="gpu", status=409)

    counts = follower.update(0)
    restarted = TrailFollower(tmp_path).update(0)  # a service restart reads every file again
    hub.close()
    service.close()

    assert counts.refusals == {"gpu": 2} and counts.retirements == {"max_runtime": 1}
    assert restarted == counts


def test_a_line_still_being_written_is_read_whole_on_the_next_scrape(tmp_path):
    log = AuditLog(tmp_path, "hub")
    log.emit("refusal", user="bob", reason="gpu", status=409)
    log.close()
    (path,) = (tmp_path / "audit").glob("*.jsonl")
    line = path.read_bytes()
    follower = TrailFollower(tmp_path)
    assert follower.update(0).refusals == {"gpu": 1}

    with open(path, "ab") as f:
        f.write(line[:20])
        f.flush()
        assert follower.update(0).refusals == {"gpu": 1}
        f.write(line[20:])
    assert follower.update(0).refusals == {"gpu": 2}


def test_a_trail_file_replaced_behind_our_back_is_counted_afresh(tmp_path):
    log = AuditLog(tmp_path, "hub")
    for _ in range(3):
        log.emit("refusal", user="bob", reason="gpu", status=409)
    log.close()
    (path,) = (tmp_path / "audit").glob("*.jsonl")
    follower = TrailFollower(tmp_path)
    assert follower.update(0).refusals == {"gpu": 3}

    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])

    assert follower.update(0).refusals == {"gpu": 1}


# ---------------------------------------------------------------- gauges: GPUs


def gpu_page_view() -> dict[str, Any]:
    """Four GPUs: alice holds 0, 1 is kept for bob, 2 is busy outside ds01, 3 is free;
    carol holds a GPU that left the inventory."""
    slots = [slot(0, used_gib=20, util=87), slot(1), slot(2, used_gib=5, util=30), slot(3)]
    holders = [holder("GPU-0", "alice", "thesis"), holder("GPU-9", "carol", "old")]
    kept = [Hold("GPU-1", "bob", "paper", until=4_000_000_000.0)]
    return {"gpus": gpu_report(slots, holders, kept), "error": None}


async def test_each_gpu_says_who_holds_it_and_a_free_one_holds_zero(tmp_path):
    samples = await scrape(metrics_for(tmp_path, gpus=gpu_page_view()))

    gpu0 = {"gpu": "GPU-0", "index": "0", "name": "A100"}
    assert sample(samples, "ds01_gpu_allocated", **gpu0, user="alice", project="thesis") == 1
    gpu3 = {"gpu": "GPU-3", "index": "3", "name": "A100"}
    assert sample(samples, "ds01_gpu_allocated", **gpu3, user="", project="") == 0
    gone = {"gpu": "GPU-9", "index": "?", "name": "not in inventory"}
    assert sample(samples, "ds01_gpu_allocated", **gone, user="carol", project="old") == 1


async def test_gpus_are_counted_by_state(tmp_path):
    samples = await scrape(metrics_for(tmp_path, gpus=gpu_page_view()))

    states = {s: sample(samples, "ds01_gpus", state=s) for s in ("allocated", "kept", "free")}
    assert states == {"allocated": 1, "kept": 1, "free": 2}  # GPU-9 is not in the inventory


async def test_the_gpu_queue_is_counted_by_kind_and_state(tmp_path):
    now = time.time()
    waits = [
        Waiter("dan", "a", "a", 1, enqueued_at=now - 5, deadline=now + 60, seq=1),
        Waiter("eve", "b", "b", 2, enqueued_at=now - 4, deadline=now + 60, seq=2),
        Waiter("fay", "c", "c", 1, mig=True, enqueued_at=now - 3, deadline=now + 60, seq=3),
    ]
    queue = QueueFile(str(tmp_path))
    queue.write("hub", [*with_positions(waits), replace(waits[0], user="gus", state="interrupted")])
    view = {**gpu_page_view(), "queue": queue_rows(queue)}
    samples = await scrape(metrics_for(tmp_path, gpus=view))

    length = {
        (k, s): sample(samples, "ds01_gpu_queue_length", kind=k, state=s)
        for k in ("gpu", "mig")
        for s in ("waiting", "interrupted")
    }
    assert length == {
        ("gpu", "waiting"): 2,
        ("gpu", "interrupted"): 1,
        ("mig", "waiting"): 1,
        ("mig", "interrupted"): 0,
    }
    assert [(r["user"], r["place"]) for r in view["queue"]] == [
        ("dan", "1st"), ("fay", "1st"), ("eve", "2nd"), ("gus", ""),
    ]  # fmt: skip


async def test_gpu_memory_and_utilization_come_from_nvml(tmp_path):
    samples = await scrape(metrics_for(tmp_path, gpus=gpu_page_view()))

    gpu0 = {"gpu": "GPU-0", "index": "0", "name": "A100"}
    assert sample(samples, "ds01_gpu_memory_used_bytes", **gpu0) == 20 * GIB
    assert sample(samples, "ds01_gpu_memory_total_bytes", **gpu0) == 80 * GIB
    assert sample(samples, "ds01_gpu_utilization_percent", **gpu0) == 87
    assert sample(samples, "ds01_gpu_inventory_up") == 1


async def test_a_mig_device_has_no_utilization_sample(tmp_path):
    mig = GpuSlot("MIG-0", "0:1", "A100 MIG 1g", 10 * GIB, 0, None, 1 / 7, "GPU-0")
    samples = await scrape(
        metrics_for(tmp_path, gpus={"gpus": gpu_report([mig], []), "error": None})
    )

    names = {name for name, labels in samples if dict(labels).get("gpu") == "MIG-0"}
    assert "ds01_gpu_utilization_percent" not in names and "ds01_gpu_allocated" in names


async def test_an_unreadable_inventory_says_so_and_counts_no_gpus(tmp_path):
    view = {"gpus": [], "error": "NVML: driver not loaded"}
    samples = await scrape(metrics_for(tmp_path, gpus=view))

    assert sample(samples, "ds01_gpu_inventory_up") == 0
    assert sample(samples, "ds01_gpus", state="free") == 0


# ---------------------------------------------------------------- gauges: images


def history(*steps: tuple[str, int]) -> list[dict[str, Any]]:
    """An engine history, newest first, from (command, size) steps oldest first."""
    return [
        {"Id": "<missing>", "Created": 1700000000 + i, "CreatedBy": cmd, "Size": size}
        for i, (cmd, size) in reversed(list(enumerate(steps)))
    ]


BASE = [("FROM debian", 100), ("RUN pip install jupyterhub", 400)]


def test_images_on_one_base_count_its_layers_once():
    images = [
        {"Id": "sha256:a", "Labels": {"ds01.user": "alice"}},
        {"Id": "sha256:b", "Labels": {"ds01.user": "alice"}},
        {"Id": "sha256:c", "Labels": {"ds01.user": "bob"}},
    ]
    layers = {
        "sha256:a": history_layers(history(*BASE, ("RUN pip install torch", 2000))),
        "sha256:b": history_layers(history(*BASE, ("RUN pip install numpy", 50))),
        "sha256:c": history_layers(history(*BASE)),
    }

    usage = image_usage(images, layers)

    assert usage.images == {"alice": 2, "bob": 1}
    assert usage.user_bytes == {"alice": 500 + 2000 + 50, "bob": 500}
    assert usage.total_bytes == 500 + 2000 + 50


def test_a_layer_the_engine_names_is_known_by_its_id():
    named = [{"Id": "sha256:step", "Created": 1, "CreatedBy": "x", "Size": 7}]
    assert history_layers(named) == [("sha256:step", 7)]


class FakeEngine:
    def __init__(self) -> None:
        self.history_calls: list[str] = []

    def images(self, filters: dict) -> list[dict[str, Any]]:
        assert filters == {"label": ["ds01.managed=true"]}
        return [
            {"Id": "sha256:a", "Labels": {"ds01.user": "alice"}},
            {"Id": "sha256:gone", "Labels": {"ds01.user": "bob"}},
        ]

    def history(self, image: str) -> list[dict[str, Any]]:
        self.history_calls.append(image)
        if image == "sha256:gone":
            raise docker.errors.NotFound("removed since the list")
        return history(*BASE)


def test_each_images_history_is_read_once_and_a_removed_image_is_skipped():
    engine = FakeEngine()
    disk = ImageDisk(lambda: engine, max_age=0)

    first, second = disk.read(), disk.read()

    assert first == second == ImageUsage({"alice": 1}, {"alice": 500}, 500)
    assert engine.history_calls == ["sha256:a", "sha256:gone", "sha256:gone"]


def test_the_images_are_listed_again_only_after_max_age():
    engine, now = FakeEngine(), [0.0]
    disk = ImageDisk(lambda: engine, max_age=30, clock=lambda: now[0])

    disk.read()
    now[0] = 29.0
    disk.read()
    assert len(engine.history_calls) == 2  # one list: a, gone
    now[0] = 30.0
    disk.read()
    assert len(engine.history_calls) == 3


async def test_image_gauges_per_user_and_in_all(tmp_path):
    usage = ImageUsage({"alice": 2, "bob": 1}, {"alice": 2550, "bob": 500}, 2550)
    samples = await scrape(metrics_for(tmp_path, images=usage))

    assert sample(samples, "ds01_images", user="alice") == 2
    assert sample(samples, "ds01_image_bytes", user="bob") == 500
    assert sample(samples, "ds01_image_disk_bytes") == 2550


async def test_an_engine_that_cannot_be_read_leaves_the_image_metrics_out(tmp_path):
    def unreachable() -> ImageUsage:
        raise docker.errors.DockerException("no engine")

    metrics = Metrics(TrailFollower(tmp_path), lambda: _async(NO_GPUS), unreachable)
    samples = await scrape(metrics)

    assert not {name for name, _ in samples if name.startswith("ds01_image")}
    assert sample(samples, "ds01_builds_total", result="failed") == 0


async def _async(value: Any) -> Any:
    return value


# ---------------------------------------------------------------- who may scrape


HUB_USERS = {  # what the hub says of each token; it does not know "token unknown"
    "token with": {"name": "prometheus", "kind": "service", "scopes": ["read:metrics"]},
    "token without": {"name": "alice", "kind": "user", "scopes": ["self"]},
}


class SignedIn(MetricsHandler):
    """The metrics handler, with the hub's answer for a token stubbed."""

    def get_current_user(self) -> dict[str, Any] | None:
        return HUB_USERS.get(self.request.headers.get("Authorization", ""))


async def fetch_metrics(tmp_path: Path, token: str):
    app = web.Application(
        [(r"/p/metrics", SignedIn)],
        ds01=SimpleNamespace(prefix="/p/"),
        metrics=metrics_for(tmp_path),
    )
    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    try:
        return await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/p/metrics",
            headers={"Authorization": token},
            raise_error=False,
        )
    finally:
        server.stop()


async def test_a_token_with_read_metrics_gets_the_exposition(tmp_path):
    r = await fetch_metrics(tmp_path, "token with")
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
    assert b"ds01_builds_total" in r.body


@pytest.mark.parametrize("token", ["token without", "token unknown"])
async def test_a_token_without_read_metrics_is_a_403(tmp_path, token):
    r = await fetch_metrics(tmp_path, token)
    assert r.code == 403 and b"read:metrics" in r.body


def test_ds01_admins_and_the_metrics_role_may_scrape(tmp_path):
    from traitlets.config import Config

    from ds01_spawner.configure import configure

    c = Config()
    c.DS01Spawner.state_dir = str(tmp_path)
    c.JupyterHub.hub_ip = c.JupyterHub.hub_connect_ip = "127.0.0.1"
    configure(c, admin_users=["ada"])

    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert "read:metrics" in roles["ds01-admin"]["scopes"]
    assert roles["ds01-metrics"]["scopes"] == ["read:metrics", "access:services!service=ds01"]


def test_the_admins_own_metrics_role_gets_the_scopes_and_keeps_its_members():
    roles = with_metrics_role([{"name": "ds01-metrics", "services": ["prometheus"]}])

    assert roles == [{**METRICS_ROLE, "services": ["prometheus"]}]


# ---------------------------------------------------------------- the Grafana dashboard


DASHBOARD = REPO / "dashboards" / "grafana-ds01.json"


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


async def test_the_dashboards_queries_name_only_metrics_we_serve(tmp_path, trail):
    trail.emit("build", action="end", image="x", result="failed", seconds=3.0)
    trail.emit("server", action="retire", user="alice", server="a", reason="idle_timeout")
    trail.emit("refusal", user="bob", reason="gpu", status=409)
    trail.emit("gpu", action="grant", server="a", uuids=["GPU-0"], user="alice")
    usage = ImageUsage({"alice": 1}, {"alice": 1}, 1)
    served = {name for name, _ in await scrape(metrics_for(tmp_path, gpu_page_view(), usage))}

    exprs = dashboard_exprs()
    named = {m for expr in exprs for m in re.findall(r"\bds01_\w+", expr)}

    assert exprs and named and named <= served, sorted(named - served)


def test_the_dashboard_is_an_importable_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())

    (source,) = dashboard["__inputs"]
    assert source["name"] == "DS_PROMETHEUS" and source["pluginId"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    assert all(p["targets"] and "gridPos" in p for p in panels)
