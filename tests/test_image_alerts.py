"""The ds01 service's alerts where the researcher works, without a container:
the terminal part (images/singleuser/alerts/alerts.bash, run by a real bash) and
the reading of the file by the server extension (ds01_alerts.py).

The file is the researcher's own: whatever it holds, a terminal never hangs,
never prints a control character and never shows a line twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ALERTS_DIR = Path(__file__).resolve().parent.parent / "images" / "singleuser" / "alerts"
SNIPPET = ALERTS_DIR / "alerts.bash"
sys.path.insert(0, str(ALERTS_DIR))
import ds01_alerts  # noqa: E402


def stamp(ago: timedelta = timedelta(0)) -> str:
    return (datetime.now(timezone.utc) - ago).strftime("%Y-%m-%dT%H:%M:%SZ")


class Terminal:
    """Shells of one container (one hostname, one /tmp) in a workspace."""

    def __init__(self, tmp_path: Path, hostname: str = "c0ffee") -> None:
        self.workspace = tmp_path / "workspace"
        self.workspace.mkdir(exist_ok=True)
        (tmp_path / "tmp").mkdir(exist_ok=True)
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "LANG": "C.UTF-8",
            "DS01_WORKSPACE": str(self.workspace),
            "TMPDIR": str(tmp_path / "tmp"),
            "HOSTNAME": hostname,
        }

    @property
    def file(self) -> Path:
        return self.workspace / ".ds01-alerts"

    def append(self, *lines: str | bytes) -> None:
        with self.file.open("ab") as f:
            for line in lines:
                f.write((line.encode() if isinstance(line, str) else line) + b"\n")

    def run(self, stdin: str = "", env: dict[str, str] | None = None) -> bytes:
        """A new interactive bash that reads the snippet as /etc/bash.bashrc would
        have it read, types `stdin`, and exits: what it printed."""
        done = subprocess.run(
            ["bash", "--noprofile", "--rcfile", str(SNIPPET), "-i"],
            input=stdin.encode(),
            capture_output=True,
            env={**self.env, **(env or {})},
            timeout=10,  # a shell blocked on the file fails the test here
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def open(self) -> list[str]:
        """Alert lines a new terminal prints at its start."""
        return self.run().decode().splitlines()


@pytest.fixture
def term(tmp_path):
    return Terminal(tmp_path)


def test_a_new_terminal_prints_each_alert_once(term):
    now = stamp()
    term.append(f"{now} warning Your server will be retired at 15:34", f"{now} info Hello")
    assert term.open() == ["ds01: Your server will be retired at 15:34", "ds01: Hello"]
    assert term.open() == []
    term.append(f"{now} retired Your server was retired")  # same second: still new
    assert term.open() == ["ds01: Your server was retired"]


def test_another_container_shows_the_alerts_again(term, tmp_path):
    term.append(f"{stamp()} warning Soon")
    assert term.open() == ["ds01: Soon"]
    assert Terminal(tmp_path, hostname="beef01").open() == ["ds01: Soon"]


def test_at_each_prompt_only_the_lines_added_since(term):
    term.append(f"{stamp()} info First")
    typed = f"echo before\necho '{stamp()} warning Second' >> {term.file}\necho after\n"
    out = term.run(typed).decode().splitlines()
    assert out == ["ds01: First", "before", "ds01: Second", "after"]


def test_an_existing_prompt_command_still_runs(term):
    term.append(f"{stamp()} info Hi")
    out = term.run("true\n", env={"PROMPT_COMMAND": "echo mine"}).decode().splitlines()
    assert out[:3] == ["ds01: Hi", "mine", "mine"]


def test_control_characters_never_reach_the_terminal(term):
    term.append(
        f"{stamp()} warning ".encode()
        + b"red \x1b[31mtext\x1b]0;title\x07 bell\r csi \xc2\x9b2J nul \x00 del \x7f end"
    )
    out = term.run()
    assert out == b"ds01: red [31mtext]0;title bell csi 2J nul  del  end\n"
    assert not any(b < 0x20 and b != 0x0A for b in out)


def test_a_c1_control_hidden_by_another_one_is_removed_too(term):
    term.append(f"{stamp()} info ".encode() + b"a\xc2\xc2\x9b\x9b b\xc2\x1b\x9b c")
    assert b"\xc2\x9b" not in term.run()


def test_malformed_and_stale_lines_are_ignored(term):
    term.append(
        "not an alert",
        f"{stamp()} panic unknown level",
        f"{stamp()}  warning two spaces",
        f"{stamp()} warning",
        f"{stamp(timedelta(days=2))} warning From a server long gone",
        f"{stamp()} info Fine",
    )
    assert term.open() == ["ds01: Fine"]


def test_many_new_alerts_show_the_newest_five(term):
    now = stamp()
    term.append(*(f"{now} info n{i}" for i in range(8)))
    out = term.open()
    assert out[0] == f"ds01: 3 earlier alerts: see {term.file}"
    assert out[1:] == [f"ds01: n{i}" for i in range(3, 8)]


def test_only_the_end_of_a_big_file_is_read(term):
    term.append("x" * 100_000, f"{stamp()} info " + "y" * 20_000, f"{stamp()} info Last")
    assert term.open() == ["ds01: Last"]


def test_a_long_message_is_cut(term):
    term.append(f"{stamp()} info " + "z" * 3000)
    (line,) = term.open()
    assert line == "ds01: " + "z" * 2000 + "..."


@pytest.mark.parametrize("kind", ["absent", "directory", "fifo", "dangling link"])
def test_no_regular_file_prints_nothing_and_never_blocks(term, kind):
    if kind == "directory":
        term.file.mkdir()
    elif kind == "fifo":
        os.mkfifo(term.file)
    elif kind == "dangling link":
        term.file.symlink_to(term.workspace / "nowhere")
    assert term.run("echo still here\n") == b"still here\n"


def test_an_unwritable_tmp_still_shows_alerts(term, tmp_path):
    term.append(f"{stamp()} info Shown")
    assert term.run(env={"TMPDIR": str(tmp_path / "missing")}) == b"ds01: Shown\n"


# --- the server extension's reading of the file (GET <base_url>ds01/alerts)


def test_the_server_extension_answers_well_formed_lines_oldest_first():
    text = (
        "2026-12-02T15:04:05Z warning Retired at 15:34 \x1b[31mred\r\n"
        "junk\n"
        "2026-12-02T15:05:00Z bogus level\n"
        "2026-12-02T15:06:00Z retired \u009b\x07\n"  # nothing left once cleaned
        "2026-12-02T15:07:00Z info Bye"
    )
    assert ds01_alerts.parse_alerts(text) == [
        {"time": "2026-12-02T15:04:05Z", "level": "warning", "message": "Retired at 15:34 [31mred"},
        {"time": "2026-12-02T15:07:00Z", "level": "info", "message": "Bye"},
    ]


def test_the_server_extension_keeps_the_newest_fifty_and_cuts_long_messages():
    lines = [f"2026-12-02T15:04:{i:02d}Z info n{i}" for i in range(60)]
    alerts = ds01_alerts.parse_alerts(
        "\n".join([*lines, "2026-12-02T16:00:00Z info " + "m" * 1500])
    )
    assert len(alerts) == 50
    assert alerts[0]["message"] == "n11"
    assert alerts[-1]["message"] == "m" * 1000 + "…"


def test_the_server_extension_reads_only_the_end_of_a_regular_file(tmp_path):
    path = tmp_path / "alerts"
    path.write_bytes(b"2026-12-02T15:04:05Z info " + b"x" * 20_000 + b"\nlast\n")
    assert ds01_alerts.read_tail(str(path)) == "last\n"


@pytest.mark.parametrize("kind", ["absent", "directory", "fifo"])
def test_the_server_extension_reads_nothing_from_what_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "alerts"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # a read would block: never opened
    assert ds01_alerts.read_tail(str(path)) == ""


def test_the_labextension_names_the_script_the_image_renames():
    package = json.loads((ALERTS_DIR / "labextension" / "package.json").read_text())
    assert package["name"] == "ds01-alerts"
    assert package["jupyterlab"]["_build"] == {
        "load": "static/remoteEntry.js",  # the Dockerfile adds the content's hash
        "extension": "./extension",
    }
    assert (ALERTS_DIR / "labextension" / "static" / "remoteEntry.js").is_file()
