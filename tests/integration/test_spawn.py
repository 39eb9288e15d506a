"""The DS01 lifecycle through a real hub, proxy and engine: launch, work, retire."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path

from jupyterhub.tests.utils import api_request

from ds01_spawner import labels
from ds01_spawner.identity import user_slug

from .conftest import exec_in


async def test_first_spawn_builds_the_project_image_with_progress(hub):
    h = await hub()
    user = h.new_user()
    r, events = await h.start_watching(user, options={"project": "thesis", "type": "base"})
    assert r.status_code in (201, 202), r.text
    await h.wait_ready(user)

    messages = [e["message"] for e in events]
    percents = [e["progress"] for e in events if "progress" in e]
    assert any("Building image ds01-" in m for m in messages), messages
    assert any(m.startswith("Step 1/") for m in messages), messages
    assert any(m.startswith("Successfully") for m in messages), "build log lines reach the page"
    assert any("Starting container" in m for m in messages)
    assert percents == sorted(percents), "progress only moves forward"
    assert len(set(percents)) >= 4, "real percentages, not one spinner"
    assert events[-1].get("ready") is True

    image = h.engine.images.get(f"ds01-{user_slug(user)}/thesis:latest")
    assert image.labels[labels.USER] == user
    assert image.labels[labels.PROJECT] == "thesis"
    assert image.labels[labels.TYPE] == "base"
    assert image.labels[labels.MANAGED] == "true"

    r = await h.get_server_api(user, "")
    assert r.status_code == 200, r.text  # JupyterLab's server answers through the proxy


async def test_container_runs_as_the_user_never_root(hub, dirs):
    h = await hub()
    user = h.new_user()
    await h.start(user, options={"project": "secure"})
    c = h.container(user, "secure")
    c.reload()
    uid, gid = (int(x) for x in c.attrs["Config"]["User"].split(":"))
    assert uid >= 20000 and gid == uid
    assert "no-new-privileges" in c.attrs["HostConfig"]["SecurityOpt"]
    assert c.attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert not c.attrs["HostConfig"]["Privileged"]
    assert c.labels[labels.PROJECT] == "secure" and c.labels[labels.USER] == user
    assert c.labels[labels.UID] == str(uid)

    code, out = exec_in(c, "id -u; id -g; grep -E '^(NoNewPrivs|CapEff)' /proc/1/status; pwd")
    assert code == 0, out
    lines = out.split("\n")
    assert lines[0] == str(uid) and lines[1] == str(gid)
    assert "NoNewPrivs:\t1" in out and "CapEff:\t0000000000000000" in out
    assert lines[-1] == "/workspace"

    workspace = Path(dirs["workspace_root"]) / user_slug(user) / "secure"
    st = workspace.stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    dockerfile = workspace / "Dockerfile"
    assert dockerfile.stat().st_uid == uid and "FROM ${BASE_IMAGE}" in dockerfile.read_text()


def _wheel(name: str, version: str = "1.0") -> bytes:
    """A minimal pure-Python wheel, made here: no index needed."""
    buf = io.BytesIO()
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{dist}/RECORD", "")
    return buf.getvalue()


async def test_retire_keeps_workspace_and_image_drops_everything_else(hub, dirs):
    h = await hub()
    user = h.new_user()
    await h.start(user, options={"project": "work"})
    c = h.container(user, "work")
    image_id = c.image.id
    wheel = "/workspace/ds01probe-1.0-py3-none-any.whl"
    with open(
        Path(dirs["workspace_root"]) / user_slug(user) / "work" / Path(wheel).name, "wb"
    ) as f:
        f.write(_wheel("ds01probe"))
    code, out = exec_in(
        c,
        "echo kept > /workspace/notes.txt && echo lost > $HOME/scratch.txt && "
        f"pip install --no-index -q {wheel} && "
        "python -c 'import ds01probe; print(ds01probe.VALUE)'",
    )
    assert code == 0 and out.endswith("42"), out

    await h.stop(user)
    assert h.containers(user) == [], "retire removes the container"
    assert h.engine.images.get(f"ds01-{user_slug(user)}/work:latest").id == image_id

    await h.start(user, options={"project": "work"})
    c2 = h.container(user, "work")
    assert c2.id != c.id
    assert exec_in(c2, "cat /workspace/notes.txt") == (0, "kept")
    assert exec_in(c2, "test -e $HOME/scratch.txt")[0] != 0
    code, out = exec_in(c2, "python -c 'import ds01probe'")
    assert code != 0 and "ModuleNotFoundError" in out, "pip-installed package is gone after retire"
    assert exec_in(c2, f"test -f {wheel}")[0] == 0


async def test_two_projects_run_at_once_as_named_servers(hub):
    h = await hub()
    user = h.new_user()
    await asyncio.gather(
        h.start(user, "alpha", options={"type": "base"}),
        h.start(user, "beta", options={"project": "beta", "type": "base"}),
    )
    a, b = h.container(user, "alpha"), h.container(user, "beta")
    assert a.id != b.id and a.status == b.status == "running"
    assert a.image.tags == [f"ds01-{user_slug(user)}/alpha:latest"]
    assert b.image.tags == [f"ds01-{user_slug(user)}/beta:latest"]
    assert a.labels[labels.SERVER_NAME] == "alpha"
    for server in ("alpha", "beta"):
        assert (await h.get_server_api(user, server)).status_code == 200

    model = (await api_request(h.app, "users", user)).json()
    assert model["servers"]["alpha"]["user_options"]["profile"] == "alpha"
    assert model["servers"]["beta"]["user_options"]["project"] == "beta"

    # the same project cannot also open in the default server
    r = await h.request_start(user, options={"project": "alpha"})
    assert r.status_code == 409, r.text
    assert "already running" in r.json()["message"]


async def test_admin_stop_retires_a_users_server(hub):
    h = await hub()
    user = h.new_user()
    await h.start(user, "thesis")
    assert len(h.containers(user)) == 1
    r = await api_request(h.app, "users", user, "servers", "thesis", method="delete")
    assert r.status_code in (202, 204)
    for _ in range(100):
        if not h.containers(user):
            break
        await asyncio.sleep(0.2)
    assert h.containers(user) == []


async def test_bad_requests_get_400_and_change_nothing(hub, dirs):
    h = await hub()
    user, other = h.new_user(), h.new_user()
    await h.start(other, "private")
    before = {c.id for c in h.engine.containers.list(all=True)}
    images_before = {i.id for i in h.engine.images.list()}

    bad = [
        ("", {"project": "../" + other + "/private"}, "invalid project name"),
        ("", {"project": f"{other}/private"}, "invalid project name"),
        ("", {"project": "Bad Name"}, "invalid project name"),
        ("", {"project": "x" * 5000}, "too large"),
        ("", {"project": "ok", "type": "quantum"}, "unknown project type"),
        ("", {"project": "ok", "image": "ubuntu:latest"}, "unknown option"),
        ("", {"project": ["ok"]}, "must be a string"),
        ("", {"project": "ok", "user": other}, "unknown option"),
        ("thesis", {"project": "other"}, "named server"),
    ]
    for server, options, message in bad:
        r = await h.request_start(user, server, options)
        assert r.status_code == 400, (options, r.status_code, r.text)
        assert message in r.json()["message"], (options, r.json())

    assert not (Path(dirs["workspace_root"]) / user_slug(user)).exists()
    assert not (Path(dirs["state_dir"]) / "projects" / user_slug(user)).exists()
    assert {c.id for c in h.engine.containers.list(all=True)} == before
    assert {i.id for i in h.engine.images.list()} == images_before
    model = (await api_request(h.app, "users", user)).json()
    assert model["servers"] == {}
    # the hub stored the rejected options as defaults; the spawner forgot them
    assert h.app.users[user].spawners[""].orm_spawner.user_options is None
    # and the other user's project is untouched and still running
    assert h.container(other, "private").status == "running"


async def test_failed_first_build_shows_log_and_keeps_workspace(hub, dirs):
    h = await hub()
    user = h.new_user()
    workspace, _ = h.seed_workspace(
        user, "broken", "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo about to fail && exit 3\n"
    )
    (workspace / "data.csv").write_text("1,2,3\n")

    r, events = await h.start_watching(user, "broken")
    assert r.status_code == 500, r.text
    assert "image build failed" in r.json()["message"]
    failed = events[-1]
    assert failed.get("failed") is True
    assert "image build failed at step 3/" in failed["message"]
    assert "about to fail" in failed.get("html_message", ""), "failing log lines are shown"
    assert h.images(user) == []
    assert h.containers(user) == []
    assert (workspace / "data.csv").read_text() == "1,2,3\n"
    assert "exit 3" in (workspace / "Dockerfile").read_text()
