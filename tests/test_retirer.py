"""The retirement loop with the hub, the engine and the clock faked: each warning reaches
the workspace's `.ds01-alerts` and the audit trail once, a restarted service carries on,
`.keep-alive` and exemptions hold idleness off, a stuck reading never stalls a check."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import pytest
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ds01_spawner import labels
from ds01_spawner.activity import Counters
from ds01_spawner.alerts import ALERTS, KEEP_ALIVE
from ds01_spawner.audit import AuditLog, read_events
from ds01_spawner.limits import PolicyStore, RetirementSettings
from ds01_spawner.retirement import (
    Notices,
    RetirementLog,
)
from ds01_spawner.service import limits_page
from ds01_spawner.service import retirer as retirer_module
from ds01_spawner.service.hub_api import HubClient
from ds01_spawner.service.limits_page import server_row
from ds01_spawner.service.retirer import Container, Retirer

M = 60.0
T0 = 1_800_000_000.0
KEY = ("alice", "thesis")
POLICY = "defaults:\n  idle_timeout: 100m\nretirement:\n  idle_detection_window: 2\n"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


class World:
    """alice runs `thesis`, idle since T0; the hub, the engine and the clock, faked."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.now = T0
        self.started = T0  # the hub's `started` and `last_activity` of alice's server
        self.running = True
        self.cpu_ns = 0  # alice's container's CPU time so far
        self.deleted: list[str] = []
        self.workspace = tmp_path / "workspaces" / "alice" / "thesis"
        self.workspace.mkdir(parents=True)
        os.chown(self.workspace, 4242, 4242)
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(POLICY)

    def retirer(self) -> Retirer:
        r = Retirer(
            HubClient("http://127.0.0.1:1/hub/api", "t"),
            PolicyStore(str(self.policy)),
            None,
            str(self.tmp_path / "state"),
            clock=lambda: self.now,
            audit=AuditLog(self.tmp_path / "state", "service"),
            workspace_for=lambda user, project: self.tmp_path / "workspaces" / user / project,
        )

        async def hub_users() -> list[dict[str, Any]]:
            server = {
                "ready": True,
                "started": iso(self.started),
                "last_activity": iso(self.started),
            }
            return [
                {
                    "name": "alice",
                    "groups": [],
                    "servers": {"thesis": server} if self.running else {},
                }
            ]

        async def containers() -> dict:
            return {KEY: Container("c1", {labels.PROJECT: "thesis"})} if self.running else {}

        async def gpu_facts() -> tuple:
            return [], 0.0, {}

        async def use_counters(found: dict) -> dict:
            return {k: Counters("c1", self.now, self.cpu_ns, 0) for k in found}

        async def call(method: str, path: str, **kw: Any) -> None:
            self.deleted.append(path)
            self.running = False

        for fake in (hub_users, containers, gpu_facts, use_counters):
            setattr(r, fake.__name__, fake)
        r.hub.call = call
        return r

    async def checks(self, r: Retirer, until: float, every: float = M) -> None:
        while self.now + every <= until:
            self.now += every
            await r.check()

    def alerts(self) -> list[tuple[str, str]]:
        try:
            text = (self.workspace / ALERTS).read_text()
        except FileNotFoundError:
            return []
        return [tuple(line.split(" ", 2)[1:]) for line in text.splitlines()]


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    monkeypatch.setattr(docker, "APIClient", lambda **kwargs: None)
    return World(tmp_path)


async def test_each_threshold_reaches_the_workspace_once_then_the_retirement(world):
    r = world.retirer()
    await world.checks(r, T0 + 79 * M)
    assert world.alerts() == []
    await world.checks(r, T0 + 99 * M)
    levels = [level for level, _ in world.alerts()]
    assert levels == ["warning", "warning"], "80 % and 95 %, each once over 20 checks"
    first, second = (message for _, message in world.alerts())
    assert first.startswith("Project thesis: will be retired at") and "(in 20m)" in first
    assert "(in 5m)" in second
    assert Notices(str(world.tmp_path / "state")).warnings("alice")[0]["reason"] == "idle_timeout"

    await world.checks(r, T0 + 101 * M)
    assert world.deleted == ["users/alice/servers/thesis"]
    level, message = world.alerts()[-1]
    assert level == "retired" and message.startswith("Project thesis was retired by policy")
    assert "(idle_timeout)" in message and "workspace and image are kept" in message
    warns = list(read_events(world.tmp_path / "state", kinds=["policy"]))
    assert [(e["action"], e["reason"], e["level"]) for e in warns] == [
        ("warn", "idle_timeout", 0.8),
        ("warn", "idle_timeout", 0.95),
    ]
    assert warns[0]["user"] == "alice" and warns[0]["project"] == "thesis"
    (retired,) = RetirementLog(str(world.tmp_path / "state")).recent()
    assert "CPU under 10% and network under 10 kB/s" in retired.message


async def test_a_restarted_service_does_not_warn_again(world):
    await world.checks(world.retirer(), T0 + 85 * M)
    assert len(world.alerts()) == 1
    again = world.retirer()  # the same state directory: what the first one remembered
    await world.checks(again, T0 + 94 * M)
    assert len(world.alerts()) == 1
    await world.checks(again, T0 + 96 * M)
    assert [level for level, _ in world.alerts()] == ["warning", "warning"]


async def test_a_server_started_again_is_warned_again(world):
    r = world.retirer()
    await world.checks(r, T0 + 81 * M)
    world.started = T0 + 90 * M  # stopped and started again by its user
    await world.checks(r, T0 + 169 * M)
    assert len(world.alerts()) == 1
    await world.checks(r, T0 + 170 * M)
    assert len(world.alerts()) == 2, "80 % of the new run: it starts over"


async def test_a_busy_cpu_restarts_the_idle_clock(world):
    r = world.retirer()
    await world.checks(r, T0 + 78 * M)
    world.cpu_ns += int(30e9)  # half a CPU over the last minute: training, no notebook
    await world.checks(r, T0 + 79 * M)
    assert r.memory.servers[KEY].busy_at == T0 + 79 * M
    await world.checks(r, T0 + 150 * M)
    assert world.alerts() == [] and not world.deleted, "idle for 71m since then, of 100m"
    await world.checks(r, T0 + 160 * M)
    assert len(world.alerts()) == 1


async def test_a_keep_alive_holds_off_idleness_and_the_limits_page_says_until_when(world):
    touched = T0 + 60 * M
    (world.workspace / KEEP_ALIVE).touch()
    os.utime(world.workspace / KEEP_ALIVE, (touched, touched))
    r = world.retirer()
    await world.checks(r, T0 + 200 * M)
    assert world.alerts() == [] and not world.deleted
    (view,) = (await r.latest()).servers
    assert view.verdict.keep_alive_until == touched + 24 * 3600
    row = server_row(view, world.now, world.now)
    assert row["keep_alive_until"] == time.strftime(
        "%Y-%m-%d %H:%M", time.localtime(touched + 24 * 3600)
    )


async def test_an_exemption_lifts_idleness_for_its_user_only(world):
    world.policy.write_text(
        POLICY + "exemptions:\n  - {user: alice, lifts: [idle_timeout], until: 2099-12-31,"
        " reason: thesis runs}\n  - {user: bob, lifts: [max_runtime], until: 2099-12-31}\n"
    )
    r = world.retirer()
    await world.checks(r, T0 + 200 * M)
    assert world.alerts() == [] and not world.deleted
    (view,) = (await r.latest()).servers
    assert view.limits.idle_timeout is None
    assert server_row(view, world.now, world.now)["exemptions"] == [
        "exempt from idle_timeout until 2099-12-31 (thesis runs)"
    ]


async def test_a_workspace_that_cannot_take_the_alerts_never_stops_a_retirement(world, caplog):
    (world.workspace / ALERTS).mkdir()
    r = world.retirer()
    with caplog.at_level(logging.WARNING, logger="ds01.retirer"):
        await world.checks(r, T0 + 101 * M)
    assert world.deleted == ["users/alice/servers/thesis"]
    assert sum(f"Could not write {ALERTS}" in m for m in caplog.messages) == 3


async def test_a_stuck_stats_call_is_given_up_and_the_check_goes_on(world, monkeypatch):
    monkeypatch.setattr(retirer_module, "STATS_TIMEOUT", 0.1)
    r = world.retirer()
    del r.use_counters  # the real one, over a stuck engine
    r._stats_client = SimpleNamespace(stats=lambda *a, **kw: time.sleep(1))
    started = time.monotonic()
    found = await r.use_counters({KEY: Container("c1", {})})
    assert found == {KEY: None} and time.monotonic() - started < 0.8


async def test_stats_are_read_a_few_at_once_in_one_shot(world, monkeypatch):
    r = world.retirer()
    del r.use_counters
    calls, in_flight, most = [], [0], [0]

    def stats(container: str, **kw: Any) -> dict:
        calls.append((container, kw))
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)
        in_flight[0] -= 1
        return {"cpu_stats": {"cpu_usage": {"total_usage": 7}}}

    r._stats_client = SimpleNamespace(stats=stats)
    found = await r.use_counters({("u", str(i)): Container(f"c{i}", {}) for i in range(20)})
    assert all(c.cpu_ns == 7 for c in found.values()) and len(found) == 20
    assert calls[0][1] == {"stream": False, "one_shot": True}
    assert 1 < most[0] <= retirer_module.AT_ONCE


async def test_the_limits_page_shows_keep_alive_and_exemptions_in_force_and_expired(world):
    world.policy.write_text(
        POLICY + "exemptions:\n  - {user: alice, lifts: [idle_timeout], until: 2099-12-31,"
        " reason: thesis runs}\n  - {group: phd, lifts: [max_runtime], until: 2001-01-01}\n"
    )
    (world.workspace / KEEP_ALIVE).touch()
    os.utime(world.workspace / KEEP_ALIVE, (T0, T0))
    r = world.retirer()
    snapshot = await r.latest()
    policy = r.policy()
    now = world.now
    exemptions = [e.describe(now) for e in policy.exemptions]
    person = {
        "user": "alice",
        "group": None,
        "exemptions": exemptions,
        "limits": policy.resolve("alice").describe(),
        "usage": {"running_projects": 1, "max_running_projects": None, "gpus": 0, "max_gpus": 1},
        "servers": [server_row(v, snapshot.at, now) for v in snapshot.servers],
    }
    templates = Environment(
        loader=FileSystemLoader(Path(limits_page.__file__).parent / "templates"),
        autoescape=select_autoescape(),
    )
    for everyone in (False, True):
        page = templates.get_template("limits.html").render(
            user={"name": "alice"},
            prefix="/p/",
            hub_base_url="/",
            xsrf_form_html="",
            everyone=everyone,
            users=[person],
            exemptions=exemptions,
            retirements=[],
            gpu_share=0.0,
            policy={"source": "x", "retirement": limits_page.retirement_state(policy.retirement)},
            format_time=limits_page._time,
        )
        assert "exempt from idle_timeout until 2099-12-31 (thesis runs)" in page
        assert "kept alive (<code>.keep-alive</code>) until" in page
        assert ("expired" if everyone else "Expired: exempt from max_runtime") in page
    assert "warnings at 80%, 95% of the idle timeout" in " ".join(page.split())


def test_the_admin_limits_page_lists_every_gpu_and_its_holder_node_by_node():
    from ds01_spawner.ledger import Holder
    from ds01_spawner.nvml import GpuSlot
    from ds01_spawner.service.limits_page import gpu_rows

    slots = [GpuSlot("GPU-a", "0", "A100", 1, 0, 0), GpuSlot("GPU-b", "1", "A100", 1, 0, 0)]
    rows = gpu_rows(slots, [Holder("GPU-b", "bob", "thesis", "", "", 1.0, "ds01-bob--thesis")])
    assert [(r["gpu"], r["state"], r["user"], r["node"]) for r in rows] == [
        ("GPU-a", "free", "", ""),
        ("GPU-b", "held", "bob", ""),
    ]
    templates = Environment(
        loader=FileSystemLoader(Path(limits_page.__file__).parent / "templates"),
        autoescape=select_autoescape(),
    )
    swarm = [
        {**rows[1], "node": "n2", "index": "n2/0"},
        {**rows[0], "node": "n3", "index": "n3/0", "state": "unavailable"},
    ]
    for gpus, nodes in ((rows, False), (swarm, True)):
        page = templates.get_template("limits.html").render(
            user={"name": "admin"},
            prefix="/p/",
            everyone=True,
            users=[],
            exemptions=[],
            retirements=[],
            gpus=gpus,
            gpu_share=0.0,
            policy={
                "source": "x",
                "retirement": limits_page.retirement_state(RetirementSettings()),
            },
            format_time=limits_page._time,
        )
        section = page[page.index('<section id="gpus">') : page.index('<section id="exemptions">')]
        assert "<strong>bob</strong> / thesis" in section
        assert ("<th>Node</th>" in section) is nodes
        assert ("<strong>n2</strong>" in section) is nodes
        assert ("node unavailable" in section) is nodes


async def test_a_server_the_engine_cannot_see_is_judged_on_jupyter_activity_alone(world):
    r = world.retirer()

    async def elsewhere() -> dict:
        return {}  # on another swarm node: the manager lists no container of it

    r.containers = elsewhere
    await world.checks(r, T0 + 101 * M)
    assert world.deleted == ["users/alice/servers/thesis"], "no CPU reading holds it off"
    (retired,) = RetirementLog(str(world.tmp_path / "state")).recent()
    assert "no Jupyter activity" in retired.message and "CPU under" not in retired.message
