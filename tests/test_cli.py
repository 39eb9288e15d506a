"""The terminal commands (image-update, image-list, project, container retire,
check-limits) against a recording stand-in for the ds01 service on 127.0.0.1:
their requests, what they print and how they exit. No hub, no Docker engine."""

from __future__ import annotations

import ast
import functools
import http.server
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ds01_spawner.cli import commands, display
from ds01_spawner.cli.api import MAX_EVENT_BYTES, Service, ServiceError, parse_events
from ds01_spawner.cli.interactive import image_update_menu

CLI = Path(commands.__file__).parent
PREFIX = "/services/ds01/"
THESIS = "api/images/alice/thesis"


@dataclass
class Answer:
    """What the stand-in sends back for one request."""

    status: int
    body: bytes
    content_type: str = "application/json"


def refused(status: int, message: str) -> Answer:
    """A refusal as the service words it: {"status", "message"}."""
    return Answer(status, json.dumps({"status": status, "message": message}).encode())


def stream(*events: dict[str, Any]) -> Answer:
    """An event stream of `events`, a keep-alive comment before each."""
    body = b"".join(b": keepalive\n\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return Answer(200, body, "text/event-stream")


class FakeService:
    """The ds01 service as the commands see it: `answers["POST api/..."]`, JSON or an Answer;
    every request recorded in `calls` as (method, path, JSON body) and its headers."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Handler, self)
        )
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{PREFIX}"

    def answer(self, method: str, path: str) -> Answer:
        answer = self.answers.get(f"{method} {path}")
        if answer is None:
            return refused(500, f"the stand-in has no answer for {method} {path}")
        if isinstance(answer, Answer):
            return answer
        return Answer(200, json.dumps(answer).encode())

    def __enter__(self) -> FakeService:
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, fake: FakeService, *args: Any) -> None:
        self.fake = fake
        super().__init__(*args)

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        path = self.path.removeprefix(PREFIX)
        self.fake.calls.append((self.command, path, body))
        self.fake.headers.append(dict(self.headers))
        answer = self.fake.answer(self.command, path)
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = _reply

    def log_message(self, format: str, *args: object) -> None:
        pass


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scripted(*answers: str):
    """A Terminal's `ask` that types `answers` in turn, and fails the test past them."""
    typed = iter(answers)

    def ask(prompt: str) -> str:
        answer = next(typed, None)
        assert answer is not None, f"asked {prompt!r} past the script"
        return answer

    return ask


@pytest.fixture
def fake(monkeypatch) -> Iterator[FakeService]:
    """The stand-in service, and the environment of alice's server `thesis` pointing at it."""
    with FakeService() as service:
        monkeypatch.setenv("DS01_SERVICE_URL", service.url)
        monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "T")
        monkeypatch.setenv("JUPYTERHUB_USER", "alice")
        monkeypatch.setenv("DS01_PROJECT", "thesis")
        monkeypatch.setenv("JUPYTERHUB_SERVER_NAME", "thesis")
        for name in ("JUPYTERHUB_PUBLIC_HUB_URL", "JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_BASE_URL"):
            monkeypatch.delenv(name, raising=False)
        yield service


@pytest.fixture
def cli(capsys, monkeypatch):
    """`cli(program, *argv)` -> exit code, output in capsys. Terminal's out/err defaults are
    the sys.stdout/stderr of import time, not capsys's, so they are passed (as the test
    runs); and no terminal is interactive (no menu, no question)."""
    terminal = commands.Terminal

    def run(program: str, *argv: str) -> int:
        here = functools.partial(terminal, out=sys.stdout, err=sys.stderr, interactive=False)
        monkeypatch.setattr(commands, "Terminal", here)
        return commands.main(list(argv), program)

    return run


# ---------------------------------------------------------------- standard library only


def test_the_package_imports_the_standard_library_and_itself_only():
    for source in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in sys.stdlib_module_names, f"{source.name} imports {top}"


def test_the_package_runs_renamed_without_ds01_spawner(tmp_path):
    """As images/build installs it: a copy named ds01_cli, Python in isolated mode."""
    shutil.copytree(CLI, tmp_path / "ds01_cli", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
        "import ds01_cli.commands, ds01_cli.interactive; "
        "assert not [m for m in sys.modules if m.startswith('ds01_spawner')], 'ds01_spawner'; "
        "print(ds01_cli.commands.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "ds01_cli" / "commands.py")


# ---------------------------------------------------------------- server-sent events


def test_an_events_data_lines_are_joined_into_one_object():
    lines = [b'data: {"phase": "step",\n', b'data: "progress": 40}\n', b"\n"]
    assert list(parse_events(lines)) == [{"phase": "step", "progress": 40}]


def test_keepalives_and_other_fields_are_skipped():
    lines = [b": keepalive\n", b"\n", b"event: build\n", b"id: 7\n", b'data:{"a": 1}\n', b"\n"]
    assert list(parse_events(lines)) == [{"a": 1}]


def test_events_that_are_not_json_objects_are_skipped():
    lines = [b"data: not json\n", b"\n", b"data: [1, 2]\n", b"\n", b"data: 3\n", b"\n"]
    lines += [b'data: {"ok": true}\n', b"\n"]
    assert list(parse_events(lines)) == [{"ok": True}]


def test_an_over_long_line_drops_its_event_and_not_the_next():
    lines = [b'data: {"lost": 1}\n', b"data: " + b"x" * MAX_EVENT_BYTES + b"\n", b"\n"]
    lines += [b'data: {"next": 2}\n', b"\n"]
    assert list(parse_events(lines)) == [{"next": 2}]


def test_the_lines_after_an_over_long_one_do_not_make_an_event_of_their_own():
    long = b"data: " + b"x" * MAX_EVENT_BYTES  # as readline(limit) hands it: in pieces
    lines = [b'data: {"a":\n', long, b"xx\n", b'data: {"tail": 1}\n', b"\n"]
    lines += [b'data: {"next": 2}\n', b"\n"]
    assert list(parse_events(lines)) == [{"next": 2}]


def test_crlf_line_endings_are_read_like_lf():
    lines = [b": keepalive\r\n", b"\r\n", b'data: {"a": 1}\r\n', b"\r\n"]
    assert list(parse_events(lines)) == [{"a": 1}]


# ---------------------------------------------------------------- the service over HTTP


def test_requests_carry_the_servers_token(fake):
    fake.answers["GET api/images"] = {"projects": []}
    assert Service(fake.url, "T", "alice").get("api/images") == {"projects": []}
    assert fake.headers[0]["Authorization"] == "token T"


def test_a_refusal_carries_the_services_status_and_message(fake):
    fake.answers["GET api/images/alice/bobs"] = refused(403, "this is another user's project")
    with pytest.raises(ServiceError) as caught:
        Service(fake.url, "T", "alice").get("api/images/alice/bobs")
    assert (caught.value.status, caught.value.message) == (403, "this is another user's project")


def test_an_error_page_that_is_not_json_gives_its_http_status(fake):
    fake.answers["GET api/nowhere"] = Answer(404, b"<html>Not Found</html>", "text/html")
    with pytest.raises(ServiceError) as caught:
        Service(fake.url, "T", "alice").get("api/nowhere")
    assert caught.value.status == 404
    assert "404" in caught.value.message and "<html>" not in caught.value.message


def test_a_service_out_of_reach_is_status_0():
    with pytest.raises(ServiceError) as caught:
        Service(f"http://127.0.0.1:{unused_port()}/", "T", "alice").get("api/images")
    assert caught.value.status == 0
    assert "did not answer" in caught.value.message


@pytest.mark.parametrize("user, quoted", [("a b", "a%20b"), ("x/y", "x%2Fy")])
def test_project_paths_quote_the_user(user, quoted):
    path = Service("http://service/", "T", user).project_path("images", "thesis", "events")
    assert path == f"api/images/{quoted}/thesis/events"


def test_events_streams_an_event_stream(fake):
    fake.answers[f"GET {THESIS}/events"] = stream({"phase": "step"}, {"phase": "built"})
    events = Service(fake.url, "T", "alice").events(f"{THESIS}/events")
    assert [e["phase"] for e in events] == ["step", "built"]


@pytest.mark.parametrize("missing", ["DS01_SERVICE_URL", "JUPYTERHUB_API_TOKEN", "JUPYTERHUB_USER"])
def test_a_server_without_the_service_in_its_environment_is_status_0(missing):
    environ = {"DS01_SERVICE_URL": "http://s/", "JUPYTERHUB_API_TOKEN": "T", "JUPYTERHUB_USER": "a"}
    del environ[missing]
    with pytest.raises(ServiceError) as caught:
        Service.from_environ(environ)
    assert caught.value.status == 0
    assert missing in caught.value.message


# ---------------------------------------------------------------- what is printed


def test_tables_pad_each_column_to_its_widest_cell_and_leave_the_last_ragged():
    text = display.table([("a", "bb", "c"), ("ccc", "d", "eeeee")], ("X", "Y", "Z"))
    assert text.splitlines() == ["X    Y   Z", "a    bb  c", "ccc  d   eeeee"]


@pytest.mark.parametrize(
    "project, state",
    [
        ({"built": True, "build": {"status": "running"}}, "building"),
        ({"built": False}, "not built (built at first start)"),
        ({"built": True, "dockerfile_changed": True}, "outdated: Dockerfile changed, rebuild"),
        (
            {"built": True, "build": {"status": "failed"}},
            "last rebuild failed (previous image in use)",
        ),
        ({"built": True, "build": {"status": "done"}}, "up to date"),
    ],
)
def test_image_state_says_what_the_image_page_says(project, state):
    assert display.image_state(project) == state


def test_running_names_the_servers_and_an_older_image():
    assert display.running({"running": []}) == "stopped"
    assert display.running({"running": [{"server": "thesis"}]}) == "running (thesis)"
    servers = [{"server": "thesis"}, {"server": "", "outdated": True}]
    assert display.running({"running": servers}) == "running (thesis, default), on an older image"


def test_limits_show_each_value_with_its_source_and_each_servers_time_left():
    person = {
        "user": "alice",
        "group": "phd",
        "limits": {
            "max_gpus": {"value": 2, "source": "group phd"},
            "max_runtime": {"value": None, "source": "default"},
        },
        "usage": {"running_projects": 1, "max_running_projects": 3, "gpus": 1, "max_gpus": 2},
        "servers": [{"project": "thesis", "runtime": "2h", "runtime_left": "6d 22h"}],
    }
    lines = display.limits({"users": [person]}).splitlines()
    assert lines[:3] == [
        "Limits for alice (group phd):",
        "  max gpus: 2 (group phd)",
        "  max runtime: none (default)",
    ]
    assert "In use: 1 running project(s) of 3, 1 GPU(s) of 2" in lines
    header, row = lines[-2:]
    assert row.startswith("thesis") and "no limit" in row, "no idle limit"
    assert header.index("RUNTIME LEFT") == row.index("6d 22h"), "columns line up"


def test_limits_say_a_keep_alive_and_the_exemptions_in_force_or_expired():
    person = {
        "user": "alice",
        "exemptions": [
            {"who": "user", "name": "alice", "lifts": ["idle_timeout"], "until": "2027-01-31",
             "reason": "long runs", "in_force": True},
            {"who": "group", "name": "phd", "lifts": ["max_runtime"], "until": "2026-01-01",
             "reason": "", "in_force": False},
        ],
        "servers": [
            {"project": "thesis", "keep_alive_until": "Thu 03 Dec 16:00",
             "exemptions": ["exempt from idle_timeout until 2027-01-31 (long runs)"]},
        ],
    }  # fmt: skip
    text = display.limits({"users": [person]})
    assert "thesis: kept alive by /workspace/.keep-alive until Thu 03 Dec 16:00" in text
    assert "thesis: exempt from idle_timeout until 2027-01-31 (long runs)" in text
    assert "Exemption for user alice: idle_timeout lifted until 2027-01-31 (long runs)\n" in text
    assert "Exemption for group phd: max_runtime lifted until 2026-01-01 [expired]" in text


@pytest.mark.parametrize(
    "event, line",
    [
        ({"phase": "step", "progress": 40, "message": "Step 2/5"}, "[ 40%] Step 2/5"),
        ({"phase": "log", "message": "Collecting torch\n"}, "       Collecting torch"),
        ({"phase": "log", "message": ""}, None),
        ({"phase": "step", "progress": 40}, None),
    ],
)
def test_build_events_show_progress_for_steps_and_indent_the_log(event, line):
    assert display.build_event(event) == line


# ---------------------------------------------------------------- commands, end to end


def test_image_list_lists_the_projects_and_exits_0(fake, cli, capsys):
    fake.answers["GET api/images"] = {
        "projects": [{"project": "thesis", "type": "pytorch", "built": True, "size": 2_500_000}]
    }
    assert cli("image-list") == commands.EXIT_OK
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["PROJECT", "TYPE", "BUILT", "SIZE", "IMAGE"]
    assert row.split() == ["thesis", "pytorch", "-", "2", "MB", "up", "to", "date"]


@pytest.mark.parametrize("status", [403, 500])
def test_a_refusal_exits_1_with_the_message_on_stderr(fake, cli, capsys, status):
    fake.answers["GET api/images"] = refused(status, "not today")
    assert cli("image-list") == commands.EXIT_REFUSED
    output = capsys.readouterr()
    assert output.err == "image-list: not today\n"
    assert output.out == ""


def test_a_refusal_with_json_prints_it_as_json_too(fake, cli, capsys):
    fake.answers["GET api/limits"] = refused(403, "not today")
    assert cli("check-limits", "--json") == commands.EXIT_REFUSED
    assert json.loads(capsys.readouterr().out) == {"status": 403, "message": "not today"}


def test_a_service_out_of_reach_exits_3(fake, cli, capsys, monkeypatch):
    monkeypatch.setenv("DS01_SERVICE_URL", f"http://127.0.0.1:{unused_port()}/")
    assert cli("image-list") == commands.EXIT_UNREACHABLE
    assert capsys.readouterr().err.startswith("image-list: the ds01 service at ")


def test_outside_a_ds01_server_exits_3(fake, cli, capsys, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN")
    assert cli("check-limits") == commands.EXIT_UNREACHABLE
    assert "this is not a ds01 server" in capsys.readouterr().err
    assert fake.calls == []


@pytest.mark.parametrize(
    "program, argv",
    [
        ("image-list", ["--bogus"]),
        ("project", ["init"]),
        ("project", ["launch", "thesis", "--gpu", "9"]),
        ("container", []),
    ],
)
def test_usage_errors_exit_2_before_any_call(fake, cli, program, argv):
    with pytest.raises(SystemExit) as caught:
        cli(program, *argv)
    assert caught.value.code == commands.EXIT_USAGE
    assert fake.calls == []


def test_an_unknown_command_name_exits_2(cli, capsys):
    assert cli("image-delete") == commands.EXIT_USAGE
    assert "image-update" in capsys.readouterr().err, "it lists the commands there are"


def image_update_answers(fake: FakeService, last_event: dict[str, Any]) -> None:
    """A rebuild of thesis ending in `last_event`, thesis running in another server."""
    fake.answers[f"POST {THESIS}/packages"] = {"message": "Added X: rebuild to use them"}
    fake.answers[f"POST {THESIS}/rebuild"] = {"message": "Rebuilding thesis"}
    fake.answers[f"GET {THESIS}/events"] = stream(
        {"phase": "step", "progress": 40, "message": "Step 2/5"}, last_event
    )
    fake.answers[f"GET {THESIS}"] = {"running": [{"server": "thesis-gpu"}]}
    fake.answers[f"POST {THESIS}/restart"] = {"message": "Restarting thesis"}


def test_image_update_adds_rebuilds_follows_the_build_and_restarts(fake, cli, capsys):
    image_update_answers(fake, {"phase": "built", "progress": 100, "message": "Built"})
    assert cli("image-update", "--add", "X", "--rebuild", "--yes") == commands.EXIT_OK
    assert fake.calls == [
        ("POST", f"{THESIS}/packages", {"add_pip": ["X"]}),
        ("POST", f"{THESIS}/rebuild", {"nocache": False}),
        ("GET", f"{THESIS}/events", None),
        ("GET", THESIS, None),
        ("POST", f"{THESIS}/restart", {}),
    ]
    out = capsys.readouterr().out
    assert "[ 40%] Step 2/5" in out and out.endswith("Restarting thesis\n")
    assert "this terminal closes" not in out, "the restarted server is another one"


def test_a_failed_build_exits_4_and_restarts_nothing(fake, cli, capsys):
    image_update_answers(fake, {"phase": "failed", "message": "pip could not install X"})
    assert cli("image-update", "--add", "X", "--rebuild", "--yes") == commands.EXIT_FAILED
    assert fake.calls[-1] == ("GET", f"{THESIS}/events", None), "nothing after the build"
    assert "The build failed" in capsys.readouterr().out


def test_container_retire_save_packages_keeps_them_and_rebuilds(fake, cli, capsys):
    fake.answers[f"GET {THESIS}"] = {"running": [{"server": "thesis"}]}
    fake.answers["POST api/projects/alice/thesis/retire"] = {
        "message": "Retiring thesis",
        "rebuilding": True,
    }
    assert cli("container", "retire", "--save-packages") == commands.EXIT_OK
    assert fake.calls[-1] == (
        "POST",
        "api/projects/alice/thesis/retire",
        {"save_packages": True, "rebuild": True},
    )
    assert "added to the image as it stops" in capsys.readouterr().out


def test_project_init_creates_the_project_and_does_not_wait(fake, cli, capsys):
    fake.answers["POST api/projects/alice/draft/launch"] = {
        "status": "starting",
        "url": "/user/alice/draft/",
        "message": "Starting draft",
    }
    assert cli("project", "init", "draft", "--type", "cv", "--gpu", "mig", "--no-wait") == 0
    assert fake.calls == [
        ("POST", "api/projects/alice/draft/launch", {"create": True, "type": "cv", "gpus": "mig"})
    ]
    assert capsys.readouterr().out == "Starting draft. Open it at /user/alice/draft/\n"


@pytest.mark.parametrize(
    "last_event, code",
    [
        ({"progress": 100, "message": "Server ready", "ready": True}, commands.EXIT_OK),
        ({"failed": True, "message": "no GPU is free"}, commands.EXIT_FAILED),
    ],
)
def test_project_launch_follows_the_start_to_its_end(fake, cli, capsys, last_event, code):
    fake.answers[f"GET {THESIS}"] = {"build": {"status": "done"}}
    fake.answers["POST api/projects/alice/thesis/launch"] = {
        "status": "starting",
        "url": "/user/alice/thesis/",
        "message": "Starting thesis",
    }
    fake.answers["GET api/projects/alice/thesis/progress"] = stream(
        {"progress": 50, "message": "Pulling"}, last_event
    )
    assert cli("project", "launch", "thesis") == code
    assert ("POST", "api/projects/alice/thesis/launch", {}) in fake.calls
    assert fake.calls[-1] == ("GET", "api/projects/alice/thesis/progress", None)
    out = capsys.readouterr().out
    assert "[ 50%] Pulling" in out
    assert ("thesis did not start: no GPU is free" in out) == (code == commands.EXIT_FAILED)


def test_project_launch_queue_asks_to_wait_and_follows_the_wait(fake, cli, capsys):
    fake.answers[f"GET {THESIS}"] = {"build": {"status": "done"}}
    fake.answers["POST api/projects/alice/thesis/launch"] = {
        "status": "waiting",
        "position": 2,
        "url": "/user/alice/thesis/",
        "message": "thesis waits for a GPU, 2nd in line",
    }
    fake.answers["GET api/projects/alice/thesis/progress"] = stream(
        {"progress": 88, "message": "Waiting for a GPU, 1st in line: you are next; 2 GPUs held"},
        {"progress": 100, "message": "Server ready", "ready": True},
    )
    assert cli("project", "launch", "thesis", "--gpu", "1", "--queue") == commands.EXIT_OK
    assert ("POST", "api/projects/alice/thesis/launch", {"gpus": 1, "wait": True}) in fake.calls
    out = capsys.readouterr().out
    assert "thesis waits for a GPU, 2nd in line" in out
    assert "[ 88%] Waiting for a GPU, 1st in line" in out


# ---------------------------------------------------------------- the image-update menu


def menu_terminal(fake: FakeService, *typed: str) -> commands.Terminal:
    fake.answers[f"GET {THESIS}"] = {"project": "thesis", "built": True, "packages": {}}
    service = Service(fake.url, "T", "alice")
    return commands.Terminal(
        service, {}, out=io.StringIO(), err=io.StringIO(), ask=scripted(*typed), interactive=True
    )


def test_the_menu_adds_the_pip_packages_typed(fake):
    fake.answers[f"POST {THESIS}/packages"] = {"message": "Added a==1, b: rebuild to use them"}
    t = menu_terminal(fake, "1", "a==1 b", "q")
    assert image_update_menu(t, "thesis") == commands.EXIT_OK
    posts = [call for call in fake.calls if call[0] == "POST"]
    assert posts == [("POST", f"{THESIS}/packages", {"add_pip": ["a==1", "b"]})]


def test_a_refused_choice_is_printed_and_the_menu_goes_on(fake):
    fake.answers[f"POST {THESIS}/packages"] = refused(400, "'b!' is not a package spec")
    t = menu_terminal(fake, "1", "b!", "q")
    assert image_update_menu(t, "thesis") == commands.EXIT_OK
    assert "Refused: 'b!' is not a package spec (nothing changed)" in t.out.getvalue()
    assert fake.calls.count(("GET", THESIS, None)) == 2, "the menu was shown again"
