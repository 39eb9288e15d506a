"""Faults on the real engine: what the hub does, what the user sees, what is lost (nothing).

A container killed behind the hub's back, the Docker engine restarting under
running servers, a workspace root that cannot be written, a workspace that
belongs to someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ds01_spawner import labels
from ds01_spawner.identity import user_slug

from .conftest import REPO, exec_in


async def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def servers(h, user: str) -> dict:
    from jupyterhub.tests.utils import api_request

    return (await api_request(h.app, "users", user)).json()["servers"]


async def stopped(h, user: str, server: str) -> bool:
    return server not in await servers(h, user)


def workspace(dirs: dict, user: str, project: str) -> Path:
    return Path(dirs["workspace_root"]) / user_slug(user) / project


async def test_container_killed_behind_the_hubs_back_is_noticed_on_poll(hub, dirs):
    h = await hub(simulated_gpus=1, poll_interval=1)
    alice, bob = h.new_user(), h.new_user()
    await h.start(alice, "train", {"gpus": 1})
    exec_in(h.container(alice, "train"), "echo kept > /workspace/result.txt")
    h.container(alice, "train").kill()  # the OOM killer, or an admin's docker kill

    await wait_for(lambda: stopped(h, alice, "train"), "the hub to notice on its poll", 30)
    assert h.containers(alice) == [], "the dead container is removed at retire"
    assert (workspace(dirs, alice, "train") / "result.txt").read_text() == "kept\n"
    await h.start(bob, "train", {"gpus": 1})  # the GPU was released
    await h.start(alice, "train", {"gpus": 0})  # and alice can start again, on the CPU


async def test_workspace_owned_by_someone_else_is_refused_and_not_chowned(hub, dirs):
    h = await hub()
    user = h.new_user()
    ws = workspace(dirs, user, "shared")
    ws.mkdir(parents=True)
    (ws / "data.csv").write_text("1,2\n")
    os.chown(ws, 4242, 4242)  # another account's directory

    r = await h.request_start(user, "shared")
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert "owned by uid 4242, not by you" in message and "ask an admin" in message
    assert (ws.stat().st_uid, ws.stat().st_gid) == (4242, 4242), "nothing chowned"
    assert sorted(p.name for p in ws.iterdir()) == ["data.csv"], "no Dockerfile written"
    assert h.containers(user) == [] and h.images(user) == []
    assert await stopped(h, user, "shared")


@pytest.fixture
def read_only_root(tmp_path):
    """A workspace root on a read-only filesystem (a full or failed disk looks the same)."""
    root = tmp_path / "ro-workspaces"
    root.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(root)], capture_output=True
    )
    if done.returncode != 0:
        if os.environ.get("DS01_REQUIRE_DOCKER") == "1":
            pytest.fail(f"cannot mount a read-only tmpfs: {done.stderr.decode()}")
        pytest.skip("needs root to mount a read-only filesystem")
    yield root
    subprocess.run(["umount", str(root)], check=True)


async def test_unwritable_workspace_root_refuses_the_spawn_with_a_message(hub, read_only_root):
    h = await hub(workspace_root=str(read_only_root))
    user = h.new_user()
    r = await h.request_start(user, "thesis")
    assert r.status_code == 500, r.text
    message = r.json()["message"]
    assert "Read-only file system" in message
    assert f"workspace root {read_only_root} is writable" in message
    assert list(read_only_root.iterdir()) == []
    assert h.containers(user) == [] and h.images(user) == []
    assert await stopped(h, user, "thesis")


# --------------------------------------------------------------- engine restart
def engine_is_ours() -> bool:
    """True where this project's scripts run the engine (no systemd: CI, these machines).

    Restarting a laptop's systemd-managed engine from a test would be rude.
    """
    return not Path("/run/systemd/system").exists() and shutil.which("dockerd") is not None


def restart_engine() -> None:
    """SIGTERM dockerd (it stops every container), then start it the way scripts/bootstrap does."""
    pid = int(Path("/var/run/docker.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("dockerd did not stop in 90 s")
    ensure_engine()


def ensure_engine() -> None:
    """Start the engine if it is not running (`ds01_ensure_engine` of scripts/lib.sh)."""
    subprocess.run(
        ["bash", "-c", f"source {REPO}/scripts/lib.sh && ds01_ensure_engine"],
        check=True,
        capture_output=True,
        timeout=120,
    )


async def test_engine_restart_stops_servers_frees_gpus_and_start_works_again(hub, dirs, engine):
    if not engine_is_ours():
        if os.environ.get("CI"):
            pytest.fail("CI must run the engine-restart test: no systemd-managed engine there")
        pytest.skip("restarts the Docker engine; runs where scripts/bootstrap runs the engine")
    h = await hub(simulated_gpus=1, poll_interval=1)
    alice, bob = h.new_user(), h.new_user()
    await h.start(alice, "train", {"gpus": 1})
    await h.start(bob, "notes")
    exec_in(h.container(alice, "train"), "echo kept > /workspace/result.txt")
    r = await h.request_start(bob, "wait", {"gpus": 1})
    assert r.status_code == 409, "the only GPU is alice's"

    try:
        await asyncio.to_thread(restart_engine)
    finally:
        with contextlib.suppress(Exception):  # whatever happened, leave an engine running
            await asyncio.to_thread(ensure_engine)

    for user, server in ((alice, "train"), (bob, "notes")):
        await wait_for(lambda u=user, s=server: stopped(h, u, s), f"{user}/{server} stopped", 60)
    running = engine.containers.list(filters={"label": [f"{labels.USER}={alice}"]})
    assert running == [], "nothing of alice's runs after the restart"
    assert (workspace(dirs, alice, "train") / "result.txt").read_text() == "kept\n"

    await h.start(bob, "wait", {"gpus": 1})  # the GPU was freed
    assert h.container(bob, "wait").labels[labels.GPU_UUIDS]
    await h.start(alice, "train", {"gpus": 0})  # again, on the CPU: bob has the GPU now
    code, out = exec_in(h.container(alice, "train"), "cat /workspace/result.txt")
    assert (code, out) == (0, "kept")
