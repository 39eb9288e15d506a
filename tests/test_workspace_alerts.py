"""alerts.py, the service's side: the workspace's `.ds01-alerts` (the fixed line format,
written safely) and `.keep-alive`, with files the user controls met safely (links,
FIFOs, directories, huge or foreign files). The image's readers: test_image_alerts.py."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest

from ds01_spawner.alerts import (
    ALERTS,
    KEEP_ALIVE,
    MAX_LINES,
    alert_line,
    append_alerts,
    keep_alive_mtime,
    merged,
)

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (warning|retired|info) .+")
OWNER = (4242, 4343)  # the uid and gid the user's container runs as


@pytest.fixture
def workspace(tmp_path) -> Path:
    path = tmp_path / "alice" / "thesis"
    path.mkdir(parents=True)
    os.chown(path, *OWNER)
    return path


def alerts_of(workspace: Path) -> list[str]:
    return (workspace / ALERTS).read_text().splitlines()


# ---------------------------------------------------------------- the format


def test_a_line_is_utc_time_level_and_the_message_on_one_line():
    line = alert_line("warning", "Project p: soon", T0)
    assert line == "2027-01-15T08:00:00Z warning Project p: soon"
    assert alert_line("info", "two\nlines\r\x1b[31m", T0).endswith(" info two lines [31m")
    assert len(alert_line("retired", "x" * 5000, T0)) < 1100
    with pytest.raises(ValueError):
        alert_line("error", "no such level", T0)


def test_the_file_keeps_its_well_formed_lines_and_the_last_fifty():
    old = "".join(alert_line("warning", f"old {i}", T0) + "\n" for i in range(60))
    text = merged("garbage the user wrote\n" + old, [alert_line("retired", "gone", T0 + 1)])
    lines = text.splitlines()
    assert len(lines) == MAX_LINES and lines[-1].endswith("retired gone")
    assert lines[0].endswith("warning old 11") and text.endswith("\n")
    assert all(LINE.fullmatch(line) for line in lines)


# ---------------------------------------------------------------- writing it


def test_alerts_are_appended_newest_last_owned_by_the_workspace_owner(workspace):
    append_alerts(workspace, [("warning", "Project thesis: 80%")], T0)
    append_alerts(workspace, [("warning", "Project thesis: 95%"), ("retired", "bye")], T0 + 60)
    lines = alerts_of(workspace)
    assert [line.split(" ", 2)[1:] for line in lines] == [
        ["warning", "Project thesis: 80%"],
        ["warning", "Project thesis: 95%"],
        ["retired", "bye"],
    ]
    st = os.lstat(workspace / ALERTS)
    assert (st.st_uid, st.st_gid) == OWNER and stat.S_IMODE(st.st_mode) == 0o644
    assert sorted(os.listdir(workspace)) == [ALERTS], "no temporary file left behind"


def test_a_link_in_its_place_is_replaced_never_followed(workspace, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (workspace / ALERTS).symlink_to(secret)
    append_alerts(workspace, [("warning", "hello")], T0)
    assert secret.read_text() == "root:x:0:0:root:/root:/bin/bash\n", "the target is untouched"
    assert not (workspace / ALERTS).is_symlink()
    assert [line.split(" ", 1)[1] for line in alerts_of(workspace)] == ["warning hello"]


def test_a_link_to_another_users_alerts_leaves_theirs_alone(workspace, tmp_path):
    bob = tmp_path / "bob" / "p"
    bob.mkdir(parents=True)
    append_alerts(bob, [("warning", "bob's own")], T0)
    before = (bob / ALERTS).read_text()
    (workspace / ALERTS).symlink_to(bob / ALERTS)
    append_alerts(workspace, [("warning", "alice's")], T0)
    assert (bob / ALERTS).read_text() == before
    assert "bob's own" not in (workspace / ALERTS).read_text(), "nothing of bob's copied over"


def test_a_fifo_in_its_place_neither_blocks_nor_stays(workspace):
    os.mkfifo(workspace / ALERTS)
    started = time.monotonic()
    append_alerts(workspace, [("warning", "hello")], T0)
    assert time.monotonic() - started < 2
    assert stat.S_ISREG(os.lstat(workspace / ALERTS).st_mode)


def test_a_directory_in_its_place_is_an_error_and_stays(workspace):
    (workspace / ALERTS).mkdir()
    (workspace / ALERTS / "keep").write_text("mine")
    with pytest.raises(OSError):
        append_alerts(workspace, [("warning", "hello")], T0)
    assert (workspace / ALERTS / "keep").read_text() == "mine"
    assert sorted(os.listdir(workspace)) == [ALERTS], "no temporary file left behind"


def test_a_huge_file_is_read_only_at_its_end(workspace):
    with open(workspace / ALERTS, "wb") as f:
        f.seek(8 * 1024**3)  # sparse: 8 GB of zeros, unread
        f.write(("\n" + alert_line("warning", "last old one", T0) + "\n").encode())
    os.chown(workspace / ALERTS, *OWNER)
    started = time.monotonic()
    append_alerts(workspace, [("retired", "new")], T0 + 1)
    assert time.monotonic() - started < 2
    lines = alerts_of(workspace)
    assert [line.split(" ", 2)[2] for line in lines] == ["last old one", "new"]
    assert (workspace / ALERTS).stat().st_size < 1000


def test_a_hard_link_to_a_file_not_the_users_is_not_read(workspace, tmp_path):
    shadow = tmp_path / "alice" / "shadow"  # on the same file system, root's
    shadow.write_text(alert_line("info", "root:$6$secret-hash", T0) + "\n")
    os.link(shadow, workspace / ALERTS)
    append_alerts(workspace, [("warning", "hello")], T0)
    assert "secret" not in (workspace / ALERTS).read_text()
    assert "secret" in shadow.read_text(), "and it is left as it was"


def test_a_workspace_that_is_a_link_or_missing_is_an_error(workspace, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "alice" / "linked"
    link.symlink_to(elsewhere)
    with pytest.raises(OSError):
        append_alerts(link, [("warning", "hello")], T0)
    assert os.listdir(elsewhere) == []
    with pytest.raises(OSError):
        append_alerts(tmp_path / "alice" / "gone", [("warning", "hello")], T0)


# ---------------------------------------------------------------- .keep-alive


def test_keep_alive_is_the_mtime_of_a_regular_file(workspace):
    assert keep_alive_mtime(workspace) is None
    (workspace / KEEP_ALIVE).touch()
    os.utime(workspace / KEEP_ALIVE, (T0, T0 + 5))
    assert keep_alive_mtime(workspace) == T0 + 5


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_keep_alive_that_is_not_a_regular_file_does_not_count(workspace, tmp_path, kind):
    target = tmp_path / "fresh"
    target.touch()
    path = workspace / KEEP_ALIVE
    make = {
        "symlink": lambda: path.symlink_to(target),
        "fifo": lambda: os.mkfifo(path),
        "directory": path.mkdir,
    }
    make[kind]()
    assert keep_alive_mtime(workspace) is None


def test_keep_alive_of_a_missing_or_linked_workspace_is_none(tmp_path):
    assert keep_alive_mtime(tmp_path / "nope") is None
    real = tmp_path / "real"
    real.mkdir()
    (real / KEEP_ALIVE).touch()
    (tmp_path / "link").symlink_to(real)
    assert keep_alive_mtime(tmp_path / "link") is None
