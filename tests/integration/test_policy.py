"""The lab policy on a real hub and the real engine: limits refused before anything
exists, container limits visible inside, retirement by runtime and idleness (GPU
utilization faked at the pynvml boundary; CPU and network from the engine), warnings
in the workspace's `.ds01-alerts`, a `.keep-alive` holding idleness off, reload
without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path

from jupyterhub.tests.utils import api_request, get_page
from jupyterhub.utils import url_path_join
from traitlets.config import Config

from ds01_spawner import labels
from ds01_spawner import settings as ds01_settings
from ds01_spawner.alerts import ALERTS
from ds01_spawner.configure import SERVICE_SCOPES, retirement_notices
from ds01_spawner.ledger import GpuHolds
from ds01_spawner.limits import PolicyStore
from ds01_spawner.retirement import RetirementLog
from ds01_spawner.service.hub_api import HubClient
from ds01_spawner.service.retirer import Retirer
from ds01_spawner.settings import DS01Settings
from tests.fake_nvml import FakeNvml, a100s

from .conftest import exec_in


def policy_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    os.utime(path, ns=(1, time.time_ns() + secrets.randbelow(10**9)))  # a fresh stamp
    return str(path)


def service_hub_config(dirs: dict[str, str]) -> tuple[str, dict]:
    """The ds01 service's token and roles, and the hub's announcement, as configure() sets."""
    token = secrets.token_hex(16)
    return token, {
        "services": [{"name": "ds01", "api_token": token}],
        "load_roles": [{"name": "ds01-service", "scopes": SERVICE_SCOPES, "services": ["ds01"]}],
        "template_vars": {"announcement": retirement_notices(dirs["state_dir"])},
    }


def retirer_for(h, token: str, dirs: dict[str, str], policy: str, simulated: int = 0) -> Retirer:
    """The service's retirer, sharing this process's GPU allocator with the hub's spawners."""
    api = url_path_join(h.app.hub.url, "api")
    settings = DS01Settings(config=Config({"DS01Settings": {"simulated_gpus": simulated, **dirs}}))
    return Retirer(
        HubClient(api, token),
        PolicyStore(policy),
        settings.gpu_allocator,
        dirs["state_dir"],
        workspace_for=settings.workspace_for,
    )


async def server_model(h, user: str, server: str) -> dict | None:
    return (await api_request(h.app, "users", user)).json()["servers"].get(server)


async def wait_gone(h, user: str, server: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await server_model(h, user, server):
        assert time.monotonic() < deadline, f"{user}/{server} still running"
        await asyncio.sleep(0.3)


def cgroup_value(container, v2: str, v1: str) -> str:
    code, out = exec_in(
        container, f"cat /sys/fs/cgroup/{v2} 2>/dev/null || cat /sys/fs/cgroup/{v1}"
    )
    assert code == 0, out
    return out


# ---------------------------------------------------------------- limits at spawn


async def test_spawn_over_max_running_projects_is_refused_and_creates_nothing(hub, tmp_path):
    h = await hub(policy_file=policy_file(tmp_path, "defaults:\n  max_running_projects: 2\n"))
    user = h.new_user()
    await h.start(user, "thesis")
    await h.start(user, "paper")
    r = await h.request_start(user, "third")
    assert r.status_code == 409
    message = r.json()["message"]
    assert "you run 2 projects, your limit is 2 (max_running_projects)" in message
    assert "stop one of paper, thesis first" in message
    assert h.containers(user, project="third") == []
    await h.stop(user, "paper")
    await h.start(user, "third")  # one stopped: room again


async def test_project_type_outside_allowed_types_is_refused(hub, tmp_path):
    text = "groups:\n  students:\n    allowed_types: [cv]\n"
    h = await hub(policy_file=policy_file(tmp_path, text))
    user = h.new_user()
    from jupyterhub import orm

    group = orm.Group(name="students")
    h.app.db.add(group)
    group.users.append(h.app.users[user].orm_user)
    h.app.db.commit()
    r = await h.request_start(user, "p", {"project": "p", "type": "base"})
    assert r.status_code == 403
    assert "project type 'base' is not allowed for you (allowed_types: cv)" in r.json()["message"]
    assert h.containers(user) == [] and h.images(user) == []


async def test_container_limits_are_applied_and_visible_inside(hub, tmp_path):
    text = "defaults:\n  max_cpus: 1.5\n  memory: 768M\n  shm_size: 256M\n  pids_limit: 300\n"
    h = await hub(policy_file=policy_file(tmp_path, text))
    user = h.new_user()
    _, events = await h.start_watching(user, "limited")
    await h.wait_ready(user, "limited")
    assert any(
        "Limits: CPUs 1.5, memory 768M, /dev/shm 256M, processes 300" in e["message"]
        for e in events
    )
    c = h.container(user, "limited")
    memory = cgroup_value(c, "memory.max", "memory/memory.limit_in_bytes")
    assert int(memory) == 768 * 1024**2
    cpu = cgroup_value(c, "cpu.max", "cpu/cpu.cfs_quota_us")
    assert cpu.split()[0] == "150000"
    assert cgroup_value(c, "pids.max", "pids/pids.max") == "300"
    _, shm = exec_in(c, "df -k /dev/shm | tail -1")
    assert int(shm.split()[1]) == 256 * 1024
    _, env = exec_in(c, "echo $MEM_LIMIT $CPU_LIMIT")
    assert env == f"{768 * 1024**2} 1.5"
    code, _ = exec_in(c, "python -c \"open('/dev/null')\"")
    assert code == 0, "the server still works under its limits"


async def test_policy_file_edits_apply_without_restart_and_broken_edits_are_refused(
    hub, tmp_path, caplog
):
    path = policy_file(tmp_path, "defaults:\n  max_running_projects: 1\n")
    h = await hub(policy_file=path)
    user = h.new_user()
    await h.start(user, "one")
    assert (await h.request_start(user, "two")).status_code == 409

    policy_file(tmp_path, "defaults:\n  max_running_projects: 2\n")
    await h.start(user, "two")  # the same hub, the new limit

    policy_file(tmp_path, "defaults:\n  max_running_projects: lots\n")
    r = await h.request_start(user, "three")
    assert r.status_code == 409 and "your limit is 2" in r.json()["message"], "old policy kept"
    assert any(
        "previous one stays in force" in m and "line 2, key defaults.max_running_projects" in m
        for m in caplog.messages
    )


async def test_a_stopped_projects_gpu_is_kept_for_its_owner(hub, tmp_path):
    h = await hub(
        simulated_gpus=1,
        policy_file=policy_file(tmp_path, "defaults:\n  gpu_hold_after_stop: 10m\n"),
    )
    alice, bob = h.new_user(), h.new_user()
    await h.start(alice, "train", {"gpus": 1})
    uuid = h.container(alice, "train").labels[labels.GPU_UUIDS]
    await h.stop(alice, "train")
    r = await h.request_start(bob, "grab", {"gpus": 1})
    assert r.status_code == 409 and "kept for a stopped project's quick restart" in r.text
    await h.start(alice, "train", {"gpus": 1})
    assert h.container(alice, "train").labels[labels.GPU_UUIDS] == uuid
    state_dir = h.app.config.DS01Spawner.state_dir
    assert GpuHolds(state_dir).active() == [], "the restart took the GPU back"


# ---------------------------------------------------------------- retirement


async def test_idle_gpu_server_is_retired_and_a_busy_one_kept(hub, dirs, tmp_path, monkeypatch):
    fakes = a100s(2)
    FakeNvml(fakes).install(monkeypatch)
    monkeypatch.setattr(ds01_settings, "_shared", {})  # a fresh GPU allocator
    text = (
        "defaults:\n  max_gpus: 1\n  idle_timeout: 12s\n  gpu_hold_after_stop: 10m\n"
        "retirement:\n  warn_before: 5s\n  gpu_busy_percent: 20\n  idle_detection_window: 1\n"
    )
    path = policy_file(tmp_path, text)
    token, extra = service_hub_config(dirs)
    h = await hub(gpu_passing="env", policy_file=path, _jupyterhub=extra)
    idle, busy = h.new_user("idle"), h.new_user("busy")
    await h.start(idle, "nap", {"gpus": 1})
    await h.start(busy, "train", {"gpus": 1})
    busy_uuid = h.container(busy, "train").labels[labels.GPU_UUIDS]
    next(g for g in fakes if g.uuid == busy_uuid).utilization = 93  # training, no notebook use
    retirer = retirer_for(h, token, dirs, path)
    await retirer.check()  # the first CPU and network reading: the next one is compared to it

    await asyncio.sleep(13)
    snapshot = await retirer.check()
    assert {v.facts.user for v in snapshot.servers} >= {idle, busy}
    await wait_gone(h, idle, "nap")
    assert h.containers(idle) == [], "retired: the container is gone"
    assert (await server_model(h, busy, "train"))["ready"], "GPU in use: kept"

    (entry,) = RetirementLog(dirs["state_dir"]).recent(user=idle)
    assert (entry.project, entry.reason) == ("nap", "idle_timeout")
    assert "no Jupyter activity, no GPU use, CPU under 10% and network under" in entry.message
    assert GpuHolds(dirs["state_dir"]).active() == [], (
        "a GPU freed by an idle retirement is not kept for its owner"
    )
    await retirer.check()  # the idle user's notice of the retirement is written
    cookies = await h.app.login_user(idle)
    page = await get_page("home", h.app, cookies=cookies)
    assert "Project nap was retired at" in page.text and "workspace and image are kept" in page.text


async def test_max_runtime_warns_then_retires(hub, dirs, tmp_path):
    text = "defaults:\n  max_runtime: 15s\nretirement:\n  warn_before: 14s\n"
    path = policy_file(tmp_path, text)
    token, extra = service_hub_config(dirs)
    h = await hub(policy_file=path, _jupyterhub=extra)
    user = h.new_user()
    await h.start(user, "long")
    retirer = retirer_for(h, token, dirs, path)

    (view,) = [v for v in (await retirer.check()).servers if v.facts.user == user]
    assert view.verdict.action == "warn" and view.verdict.reason == "max_runtime"
    cookies = await h.app.login_user(user)
    page = await get_page("home", h.app, cookies=cookies)
    assert "Project long: will be retired at" in page.text and "max_runtime" in page.text

    await asyncio.sleep(max(0.0, view.verdict.retire_at - time.time()) + 0.5)
    await retirer.check()
    await wait_gone(h, user, "long")
    (entry,) = RetirementLog(dirs["state_dir"]).recent(user=user)
    assert entry.reason == "max_runtime" and "the limit (max_runtime) is 15s" in entry.message


async def test_limits_json_shows_use_and_time_left(hub, dirs, tmp_path):
    text = "defaults:\n  max_runtime: 2h\n  idle_timeout: 1h\n  max_running_projects: 3\n"
    path = policy_file(tmp_path, text)
    token, extra = service_hub_config(dirs)
    h = await hub(policy_file=path, _jupyterhub=extra)
    user = h.new_user()
    await h.start(user, "p")
    snapshot = await retirer_for(h, token, dirs, path).survey()
    (view,) = [v for v in snapshot.servers if v.facts.user == user]
    assert 7000 < view.verdict.runtime_left <= 7200 and 3500 < view.verdict.idle_left <= 3600
    assert json.dumps(view.limits.describe())  # what the page serialises


ALERT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (warning|retired|info) (.+)")


async def test_warnings_reach_the_workspace_once_each_and_a_keep_alive_holds_off_idleness(
    hub, dirs, tmp_path
):
    text = (
        "defaults:\n  idle_timeout: 20s\n"
        "retirement:\n  warn_idle: [40%, 70%]\n  idle_detection_window: 1\n"
        "  keep_alive_max: 1h\n"
    )
    path = policy_file(tmp_path, text)
    token, extra = service_hub_config(dirs)
    h = await hub(policy_file=path, _jupyterhub=extra)
    user = h.new_user()
    await h.start(user, "kept")
    code, out = exec_in(h.container(user, "kept"), "touch /workspace/.keep-alive")
    assert code == 0, out
    await h.start(user, "nap")
    retirer = retirer_for(h, token, dirs, path)
    settings = DS01Settings(config=Config({"DS01Settings": dirs}))

    deadline = time.monotonic() + 90
    while await server_model(h, user, "nap"):
        assert time.monotonic() < deadline, "nap not retired for idleness"
        await retirer.check()
        await asyncio.sleep(0.5)

    nap = settings.workspace_for(user, "nap")
    lines = (nap / ALERTS).read_text().splitlines()
    found = [ALERT_LINE.fullmatch(line) for line in lines]
    assert all(found), lines
    assert [m.group(1) for m in found] == ["warning", "warning", "retired"], (
        "40 % and 70 %, each once over every check, then the retirement"
    )
    assert found[0].group(2).startswith("Project nap: will be retired at")
    assert "if it stays idle" in found[0].group(2) and ".keep-alive" in found[0].group(2)
    assert found[2].group(2).startswith("Project nap was retired by policy (idle_timeout)")
    st, owner = os.lstat(nap / ALERTS), os.stat(nap)
    assert (st.st_uid, st.st_gid) == (owner.st_uid, owner.st_gid) and owner.st_uid != 0
    assert stat.S_IMODE(st.st_mode) == 0o644

    for _ in range(3):  # idle far past 20s, yet kept
        await retirer.check()
    assert (await server_model(h, user, "kept"))["ready"], "the keep-alive holds it"
    assert not (settings.workspace_for(user, "kept") / ALERTS).exists(), "and nothing to warn of"
    (view,) = [v for v in (await retirer.survey()).servers if v.facts.user == user]
    assert view.facts.project == "kept" and view.verdict.keep_alive_until > time.time() + 3000
