"""GPU-hours from the audit trail: pairing grants and releases, months, efficiency, CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import docker
import pytest
from jinja2 import Environment, FileSystemLoader, select_autoescape
from tornado import httpserver, web
from tornado.httpclient import AsyncHTTPClient
from tornado.testing import bind_unused_port

from ds01_spawner.audit import AuditLog, read_events
from ds01_spawner.gpu_samples import GpuSamples, Sample, add_samples
from ds01_spawner.ledger import Holder
from ds01_spawner.limits import PolicyStore
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.service import usage_page
from ds01_spawner.service.hub_api import HubClient
from ds01_spawner.service.retirer import Retirer
from ds01_spawner.service.usage_page import UsageHandler, bar_chart, usage_report
from ds01_spawner.usage import (
    CSV_HEADER,
    Amount,
    RowKey,
    csv_cell,
    holds_from_events,
    split_by_month,
    this_and_last_month,
    usage_csv,
    usage_from_trail,
    usage_rows,
)

UTC = timezone.utc
T0 = datetime(2025, 5, 10, 12, 0, tzinfo=UTC)
NOW = datetime(2025, 5, 20, 12, 0, tzinfo=UTC)
MONTHS = ("2025-05", "2025-04")


def event(action: str, at: datetime, **data: Any) -> dict[str, Any]:
    """A gpu event as `read_events` gives it."""
    base = {
        "kind": "gpu",
        "user": "alice",
        "server": "train",
        "project": "train",
        "group": "students",
        "uuids": ["GPU-1"],
        "equivalents": 1.0,
    }
    return {**base, **data, "action": action, "at": at}


def hours(holds) -> list[float]:
    return [round((h.end - h.start).total_seconds() / 3600, 6) for h in holds]


def gpu_hours(rows: dict[RowKey, Amount], **match: str) -> float:
    return sum(
        a.gpu_hours
        for k, a in rows.items()
        if all(getattr(k, field) == value for field, value in match.items())
    )


# ---------------------------------------------------------------- pairing


def test_a_grant_and_its_release_are_one_hold():
    (hold,) = holds_from_events(
        [event("grant", T0), event("release", T0 + timedelta(hours=2))], NOW
    )
    assert hours([hold]) == [2.0] and not hold.open
    assert (hold.user, hold.project, hold.group, hold.uuids) == (
        "alice",
        "train",
        "students",
        ("GPU-1",),
    )


def test_events_are_paired_in_time_order_whatever_order_they_come_in():
    events = [event("release", T0 + timedelta(hours=1)), event("grant", T0)]
    assert hours(holds_from_events(events, NOW)) == [1.0]


def test_a_grant_never_released_is_held_until_now():
    (hold,) = holds_from_events([event("grant", NOW - timedelta(hours=3))], NOW)
    assert hold.open and hold.end == NOW and hours([hold]) == [3.0]


def test_a_release_without_its_grant_counts_from_its_since():
    """The trail began while the GPU was held."""
    since = (T0 - timedelta(hours=4)).isoformat().replace("+00:00", "Z")
    (hold,) = holds_from_events([event("release", T0, since=since)], NOW)
    assert hours([hold]) == [4.0]


def test_a_release_without_grant_or_since_counts_nothing():
    assert holds_from_events([event("release", T0)], NOW) == []


def test_a_grant_announced_again_after_a_hub_restart_is_one_hold():
    events = [
        event("grant", T0),
        event("grant", T0 + timedelta(hours=1)),  # the restarted hub finds the container
        event("release", T0 + timedelta(hours=3)),
    ]
    assert hours(holds_from_events(events, NOW)) == [3.0]


def test_a_release_repeated_does_not_count_the_time_twice():
    since = T0.isoformat()
    events = [
        event("grant", T0),
        event("release", T0 + timedelta(hours=2), since=since),
        event("release", T0 + timedelta(hours=2, minutes=1), since=since),
    ]
    assert hours(holds_from_events(events, NOW)) == [2.0, round(1 / 60, 6)]


def test_a_grant_of_other_gpus_closes_the_hold_whose_release_was_lost():
    events = [
        event("grant", T0),  # the hub died with this container; no release
        event("grant", T0 + timedelta(hours=5), uuids=["GPU-2"]),
        event("release", T0 + timedelta(hours=6), uuids=["GPU-2"]),
    ]
    first, second = holds_from_events(events, NOW)
    assert (first.uuids, hours([first])) == (("GPU-1",), [5.0])
    assert (second.uuids, hours([second])) == (("GPU-2",), [1.0])


def test_servers_are_paired_separately():
    events = [
        event("grant", T0),
        event("grant", T0, user="bob", uuids=["GPU-2"]),
        event("release", T0 + timedelta(hours=1)),
        event("release", T0 + timedelta(hours=2), user="bob", uuids=["GPU-2"]),
    ]
    holds = holds_from_events(events, NOW)
    assert sorted((h.user, hours([h])[0]) for h in holds) == [("alice", 1.0), ("bob", 2.0)]


def test_other_kinds_of_event_are_ignored():
    other = {**event("grant", T0), "kind": "server", "action": "start"}
    assert holds_from_events([other], NOW) == []


# ---------------------------------------------------------------- months


def test_a_hold_is_split_at_the_month_boundary_in_utc():
    start = datetime(2025, 4, 30, 22, 0, tzinfo=UTC)
    end = datetime(2025, 5, 1, 3, 0, tzinfo=UTC)
    assert split_by_month(start, end) == [("2025-04", 2.0), ("2025-05", 3.0)]


def test_a_local_time_is_split_by_its_utc_month():
    cest = timezone(timedelta(hours=2))
    start = datetime(2025, 5, 1, 1, 0, tzinfo=cest)  # 23:00 UTC on 30 April
    assert split_by_month(start, start + timedelta(hours=2)) == [
        ("2025-04", 1.0),
        ("2025-05", 1.0),
    ]


def test_last_month_of_january_is_last_years_december():
    assert this_and_last_month(datetime(2026, 1, 1, 0, 5, tzinfo=UTC)) == ("2026-01", "2025-12")


def test_gpu_hours_across_months_land_in_each_month():
    start = datetime(2025, 4, 30, 18, 0, tzinfo=UTC)
    holds = holds_from_events([event("grant", start, equivalents=2.0)], NOW)
    rows = usage_rows(holds, [], MONTHS)
    assert gpu_hours(rows, month="2025-04") == pytest.approx(12.0)  # 6 h x 2 GPUs
    assert gpu_hours(rows, month="2025-05") == pytest.approx(2 * (19 * 24 + 12))


def test_months_before_last_are_left_out():
    holds = holds_from_events(
        [event("grant", datetime(2025, 3, 1, tzinfo=UTC)), event("release", T0)], NOW
    )
    rows = usage_rows(holds, [], MONTHS)
    assert {k.month for k in rows} == set(MONTHS)


def test_a_mig_slice_counts_its_seventh_of_a_gpu():
    events = [
        event("grant", T0, uuids=["MIG-1"], equivalents=1 / 7),
        event("release", T0 + timedelta(hours=7), uuids=["MIG-1"]),
    ]
    rows = usage_rows(holds_from_events(events, NOW), [], MONTHS)
    assert gpu_hours(rows) == pytest.approx(1.0)


def test_a_grant_without_equivalents_counts_each_gpu_whole():
    grant = {k: v for k, v in event("grant", T0, uuids=["GPU-1", "GPU-2"]).items()}
    del grant["equivalents"]
    rows = usage_rows(
        holds_from_events([grant, event("release", T0 + timedelta(hours=1))], NOW), [], MONTHS
    )
    assert gpu_hours(rows) == pytest.approx(2.0)


def test_rows_are_per_user_group_and_project():
    events = [
        event("grant", T0, server="a", project="thesis"),
        event("release", T0 + timedelta(hours=1), server="a"),
        event("grant", T0, server="b", project="paper", uuids=["GPU-2"]),
        event("release", T0 + timedelta(hours=3), server="b", uuids=["GPU-2"]),
        event("grant", T0, user="bob", group="staff", uuids=["GPU-3"]),
        event("release", T0 + timedelta(hours=2), user="bob", uuids=["GPU-3"]),
    ]
    rows = usage_rows(holds_from_events(events, NOW), [], MONTHS)
    assert {k: round(a.gpu_hours, 6) for k, a in rows.items()} == {
        RowKey("2025-05", "alice", "students", "thesis"): 1.0,
        RowKey("2025-05", "alice", "students", "paper"): 3.0,
        RowKey("2025-05", "bob", "staff", "train"): 2.0,
    }


# ---------------------------------------------------------------- efficiency


def sample(util_seconds: list[tuple[float, float]], server="train", uuid="GPU-1", at=T0):
    """A hold's samples: (utilization %, seconds) pairs, all in May."""
    first = (at + timedelta(minutes=1)).timestamp()
    return Sample(
        "alice",
        server,
        "train",
        uuid,
        at.isoformat(),
        first,
        first + 600,
        {"2025-05": [sum(u * s for u, s in util_seconds), sum(s for _, s in util_seconds)]},
    )


def test_efficiency_is_the_time_weighted_mean_over_the_projects_holds():
    events = [
        event("grant", T0, server="a"),
        event("release", T0 + timedelta(hours=1), server="a"),
        event("grant", T0, server="b", uuids=["GPU-2"]),
        event("release", T0 + timedelta(hours=1), server="b", uuids=["GPU-2"]),
    ]
    samples = [sample([(100, 600)], server="a"), sample([(0, 1800)], server="b", uuid="GPU-2")]
    (amount,) = usage_rows(holds_from_events(events, NOW), samples, MONTHS).values()
    assert amount.efficiency == pytest.approx(25.0)


def test_efficiency_is_unknown_without_samples():
    events = [event("grant", T0, uuids=["MIG-1"], equivalents=1 / 7)]
    (amount,) = usage_rows(holds_from_events(events, NOW), [], MONTHS).values()
    assert amount.efficiency is None and amount.as_json()["efficiency"] is None


def test_a_sample_goes_to_the_hold_it_was_taken_during():
    events = [
        event("grant", T0, project="old"),
        event("release", T0 + timedelta(hours=1)),
        event("grant", T0 + timedelta(days=2), project="new"),
    ]
    during_new = sample([(80, 600)], at=T0 + timedelta(days=2))
    rows = usage_rows(holds_from_events(events, NOW), [during_new], MONTHS)
    by_project = {k.project: a.efficiency for k, a in rows.items()}
    assert by_project == {"old": None, "new": pytest.approx(80.0)}


def test_a_sample_of_a_gpu_the_trail_never_granted_is_not_counted():
    rows = usage_rows([], [sample([(50, 600)])], MONTHS)
    assert rows == {}


def holder(uuid="GPU-1", since="2025-05-10T12:00:00Z") -> Holder:
    return Holder(uuid, "alice", "train", "train", since)


def test_a_first_sample_stands_for_the_time_since_the_allocation_at_most_max_gap():
    now = T0.timestamp()
    (s,) = add_samples({}, [holder()], {"GPU-1": 40}, now + 120, max_gap=600).values()
    assert s.months == {"2025-05": [40 * 120, 120]}
    (s,) = add_samples({}, [holder()], {"GPU-1": 40}, now + 3600, max_gap=600).values()
    assert s.months == {"2025-05": [40 * 600, 600]}


def test_each_further_sample_stands_for_the_time_since_the_one_before():
    now = T0.timestamp()
    samples = add_samples({}, [holder()], {"GPU-1": 100}, now + 60)
    samples = add_samples(samples, [holder()], {"GPU-1": 0}, now + 60 + 180)
    (s,) = samples.values()
    assert s.months == {"2025-05": [100 * 60, 60 + 180]}
    assert (s.first, s.last) == (now + 60, now + 240)


def test_a_mig_device_without_utilization_gets_no_sample():
    assert add_samples({}, [holder("MIG-1")], {"MIG-1": None}, T0.timestamp()) == {}


def test_a_new_allocation_of_the_same_gpu_is_a_new_hold():
    now = T0.timestamp() + 60
    samples = add_samples({}, [holder()], {"GPU-1": 10}, now)
    samples = add_samples(samples, [holder(since="2025-05-10T12:05:00Z")], {"GPU-1": 90}, now + 600)
    assert len(samples) == 2


def test_the_store_keeps_samples_across_processes(tmp_path):
    slot = GpuSlot("GPU-1", "0", "A100", 80, 0, utilization=30)
    now = T0.timestamp()
    GpuSamples(tmp_path).record([holder()], [slot], now + 60)
    GpuSamples(tmp_path).record([holder()], [slot], now + 120)
    (s,) = GpuSamples(tmp_path).read()
    assert s.months == {"2025-05": [30 * 120, 120]}


def test_the_store_forgets_holds_older_than_last_month(tmp_path):
    slot = GpuSlot("GPU-1", "0", "A100", 80, 0, utilization=30)
    store = GpuSamples(tmp_path)
    store.record(
        [holder(since="2025-02-01T00:00:00Z")],
        [slot],
        datetime(2025, 2, 1, 1, tzinfo=UTC).timestamp(),
    )
    store.record([holder()], [slot], NOW.timestamp())
    assert [s.since for s in store.read()] == ["2025-05-10T12:00:00Z"]


def test_a_sample_that_cannot_be_written_never_stops_the_check(tmp_path):
    (tmp_path / "state").write_text("a file where the directory should be")
    slot = GpuSlot("GPU-1", "0", "A100", 80, 0, utilization=30)
    GpuSamples(tmp_path / "state").record([holder()], [slot], NOW.timestamp())


def test_a_damaged_store_starts_afresh(tmp_path):
    (tmp_path / "gpu_samples.json").write_text("{not json")
    assert GpuSamples(tmp_path).read() == []
    (tmp_path / "gpu_samples.json").write_text(json.dumps([{"user": "x"}, 3]))
    assert GpuSamples(tmp_path).read() == []


# ---------------------------------------------------------------- from the trail


def test_usage_from_the_trail_is_right_across_a_hub_restart(tmp_path):
    """Events written by two hub processes, the second announcing the grant again."""
    first = AuditLog(tmp_path, "hub")
    grant = {"user": "alice", "server": "train", "project": "train", "uuids": ["GPU-1"]}
    first.emit("gpu", action="grant", equivalents=1.0, group="students", **grant)
    first.close()  # the hub dies
    second = AuditLog(tmp_path, "hub")
    second.emit("gpu", action="grant", equivalents=1.0, group="students", **grant)
    second.emit("gpu", action="release", equivalents=1.0, **grant)
    second.close()
    events = list(read_events(tmp_path, kinds=["gpu"]))
    assert len(events) == 3
    now = events[-1]["at"] + timedelta(hours=1)
    rows, _, _ = usage_from_trail(tmp_path, now)
    held = (events[-1]["at"] - events[0]["at"]).total_seconds() / 3600
    assert gpu_hours(rows, user="alice", project="train") == pytest.approx(held)
    assert {k.group for k in rows} == {"students"}


def test_usage_from_an_empty_state_dir_is_nothing(tmp_path):
    rows, this, last = usage_from_trail(tmp_path, NOW)
    assert (rows, this, last) == ({}, "2025-05", "2025-04")


# ---------------------------------------------------------------- CSV


@pytest.mark.parametrize("value", ["=HYPERLINK(1)", "+1", "-1", "@SUM(A1)", "\tx", "\rx"])
def test_a_cell_a_spreadsheet_would_run_is_quoted(value):
    assert csv_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["alice", "my-thesis", "", 1.5])
def test_a_plain_cell_is_left_alone(value):
    assert csv_cell(value) == value


def test_the_csv_has_a_header_and_one_line_per_month_user_group_project():
    rows = {
        RowKey("2025-05", "alice", "students", "thesis"): Amount(1.5, 50 * 60, 60),
        RowKey("2025-04", "=cmd", "", "-x"): Amount(0.25),
    }
    lines = list(csv.reader(io.StringIO(usage_csv(rows))))
    assert lines == [
        list(CSV_HEADER),
        ["2025-04", "'=cmd", "", "'-x", "0.2500", ""],
        ["2025-05", "alice", "students", "thesis", "1.5000", "50.0"],
    ]


# ---------------------------------------------------------------- the page


def rows_for_page() -> dict[RowKey, Amount]:
    return {
        RowKey("2025-05", "alice", "students", "thesis"): Amount(2.0, 60 * 100, 100),
        RowKey("2025-04", "alice", "students", "thesis"): Amount(1.0),
        RowKey("2025-05", "alice", "students", "paper"): Amount(0.5),
        RowKey("2025-05", "bob", "", "train"): Amount(4.0),
    }


def test_a_researchers_report_is_per_project():
    mine = {k: v for k, v in rows_for_page().items() if k.user == "alice"}
    data = usage_report(mine, "2025-05", "2025-04", everyone=False)
    assert data["total"] == {
        "this_month": {"gpu_hours": 2.5, "efficiency": 60.0},
        "last_month": {"gpu_hours": 1.0, "efficiency": None},
    }
    assert [(p["project"], p["this_month"]["gpu_hours"]) for p in data["projects"]] == [
        ("paper", 0.5),
        ("thesis", 2.0),
    ]
    assert "users" not in data


def test_an_admins_report_is_per_user_and_per_group():
    data = usage_report(rows_for_page(), "2025-05", "2025-04", everyone=True)
    assert [(u["user"], u["groups"], u["this_month"]["gpu_hours"]) for u in data["users"]] == [
        ("alice", ["students"], 2.5),
        ("bob", [""], 4.0),
    ]
    assert [(g["group"], g["this_month"]["gpu_hours"]) for g in data["groups"]] == [
        ("", 4.0),
        ("students", 2.5),
    ]


def test_the_chart_scales_the_longest_bar_to_full_width():
    data = usage_report(rows_for_page(), "2025-05", "2025-04", everyone=True)
    bars = bar_chart(data["users"], "user")
    assert [(b["label"], b["this_width"], b["last_width"]) for b in bars] == [
        ("alice", usage_page.CHART_BAR_WIDTH * 2.5 / 4, usage_page.CHART_BAR_WIDTH / 4),
        ("bob", usage_page.CHART_BAR_WIDTH, 0),
    ]


def test_a_chart_of_nothing_has_no_bars_of_width():
    assert bar_chart([], "project") == []


class SignedIn(UsageHandler):
    def get_current_user(self) -> dict[str, Any]:
        name = self.get_argument("as", "alice")
        scopes = ["custom:ds01:admin"] if name == "admin" else []
        return {"name": name, "scopes": scopes}


async def fetch_usage(state_dir, path: str):
    templates = Environment(
        loader=FileSystemLoader(usage_page.__file__.rsplit("/", 1)[0] + "/templates"),
        autoescape=select_autoescape(),
    )
    ds01 = SimpleNamespace(
        prefix="/p/",
        admin_scope="custom:ds01:admin",
        shared_settings=SimpleNamespace(state_dir=str(state_dir)),
    )
    app = web.Application(
        [(r"/p/(?:api/)?usage(?P<csv>\.csv)?", SignedIn)],
        ds01=ds01,
        templates=templates,
        hub_base_url="/",
        cookie_secret="test",
    )
    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    try:
        return await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", raise_error=False)
    finally:
        server.stop()


@pytest.fixture
def trail(tmp_path):
    log = AuditLog(tmp_path, "hub")
    for user, project in (("alice", "thesis"), ("=evil", "+sum")):
        log.emit(
            "gpu",
            action="grant",
            user=user,
            server="",
            project=project,
            uuids=["G"],
            equivalents=1.0,
        )
    log.close()
    return tmp_path


async def test_the_page_shows_a_researcher_her_projects_only(trail):
    r = await fetch_usage(trail, "/p/usage")
    assert r.code == 200
    body = r.body.decode()
    assert 'data-project="thesis"' in body and "+sum" not in body and "<svg" in body


async def test_the_json_twin_is_the_same_report(trail):
    r = await fetch_usage(trail, "/p/api/usage")
    data = json.loads(r.body)
    assert [p["project"] for p in data["projects"]] == ["thesis"]
    assert data["projects"][0]["this_month"]["gpu_hours"] >= 0


async def test_everyones_usage_is_for_admins_only(trail):
    assert (await fetch_usage(trail, "/p/api/usage?all=1")).code == 403
    r = await fetch_usage(trail, "/p/usage?all=1&as=admin")
    assert r.code == 200 and 'data-user="alice"' in r.body.decode()
    assert 'data-user="=evil"' in r.body.decode()


async def test_the_csv_downloads_with_a_header_and_escaped_cells(trail):
    r = await fetch_usage(trail, "/p/usage.csv?all=1&as=admin")
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert r.headers["Content-Disposition"].startswith('attachment; filename="ds01-usage-all-')
    lines = list(csv.reader(io.StringIO(r.body.decode())))
    assert lines[0] == list(CSV_HEADER)
    assert sorted((line[1], line[3]) for line in lines[1:]) == [
        ("'=evil", "'+sum"),
        ("alice", "thesis"),
    ]
    same = await fetch_usage(trail, "/p/usage?format=csv")
    assert same.body.decode().splitlines()[1].split(",")[1] == "alice"


# ---------------------------------------------------------------- sampled by the retirement check


@pytest.fixture
def retirer(tmp_path, monkeypatch) -> Retirer:
    monkeypatch.setattr(docker, "APIClient", lambda **kwargs: None)
    retirer = Retirer(
        HubClient("http://127.0.0.1:1/hub/api", ""), PolicyStore(""), None, str(tmp_path)
    )

    async def hub_users() -> list[dict[str, Any]]:
        return [
            {"name": "alice", "servers": {"": {"ready": True, "started": "2025-05-10T12:00:00Z"}}}
        ]

    async def containers() -> dict:
        return {}

    async def gpu_facts() -> tuple:
        slot = GpuSlot("GPU-1", "0", "A100", 80, 40, utilization=70)
        return (
            [slot],
            1.0,
            {("alice", ""): [Holder("GPU-1", "alice", "p", "", "2025-05-10T12:00:00Z")]},
        )

    for fake in (hub_users, containers, gpu_facts):
        monkeypatch.setattr(retirer, fake.__name__, fake)
    retirer.clock = lambda: T0.timestamp() + 60
    return retirer


async def test_each_retirement_check_samples_the_held_gpus_utilization(retirer):
    await retirer.check()
    (s,) = retirer.gpu_samples.read()
    assert (s.user, s.uuid, s.months) == ("alice", "GPU-1", {"2025-05": [70 * 60, 60]})


async def test_a_limits_page_survey_takes_no_sample(retirer):
    await retirer.latest()
    assert retirer.gpu_samples.read() == []


async def test_a_burst_of_page_views_reads_the_trail_once(tmp_path, monkeypatch):
    from ds01_spawner.service import usage_page

    reads = []

    def counting(state_dir, now):
        reads.append(now)
        return {}, "2026-12", "2026-11"

    monkeypatch.setattr(usage_page, "usage_from_trail", counting)
    cache = usage_page.UsageCache(str(tmp_path))
    answers = await asyncio.gather(*(cache.rows() for _ in range(20)))
    assert len(reads) == 1 and all(a == ({}, "2026-12", "2026-11") for a in answers)
    monkeypatch.setattr(usage_page, "USAGE_MAX_AGE", 0.0)
    await cache.rows()
    assert len(reads) == 2, "older than USAGE_MAX_AGE: read again"
