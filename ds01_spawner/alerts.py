"""What the retirer tells the researcher where they work, and what they tell it back.

`.ds01-alerts` at the top of the workspace (`/workspace/.ds01-alerts` in the
container): the warnings before a retirement by policy, and a last line when
it came. The terminal and JupyterLab in the image read it, so its format is
fixed: UTF-8 text, one alert per line, newest last, at most `MAX_LINES`::

    2026-05-10T13:58:02Z warning Project thesis: will be retired at 14:05 (in 7m) ...
    2026-05-10T14:05:40Z retired Project thesis was retired by policy (idle_timeout): ...

each line ``YYYY-MM-DDTHH:MM:SSZ LEVEL message`` (UTC; LEVEL one of `LEVELS`).

`.keep-alive` at the top of the workspace: a regular file touched within
`keep_alive_max` holds off idle retirement (`retirement.keep_alive_end`).

The workspace is the user's: both files are reached through `workspaces`'
descriptor-based helpers, which never follow a link or open anything but a
regular file, and `.ds01-alerts` is replaced whole, owned by the workspace's
owner. The line format and the trimming are pure (`alert_line`, `merged`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from .workspaces import open_workspace_dir, read_tail, regular_file_mtime, replace_file

ALERTS = ".ds01-alerts"
KEEP_ALIVE = ".keep-alive"
LEVELS = ("warning", "retired", "info")
MAX_LINES = 50
MAX_MESSAGE = 1000  # characters of one alert's message
MAX_READ = 64 * 1024  # bytes of the old file read back: more than MAX_LINES lines of ours
_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (?:warning|retired|info) [^\r\n]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def alert_line(level: str, message: str, at: float) -> str:
    """One line of the alerts file (no newline): UTC time, level, the message on one line."""
    if level not in LEVELS:
        raise ValueError(f"no alert level {level!r}; levels: {', '.join(LEVELS)}")
    text = _CONTROL.sub(" ", message).strip()
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(at))} {level} {text}"


def merged(old: str, new: Iterable[str]) -> str:
    """The file after appending `new` lines to `old` text: only well-formed lines of the
    old kept (whatever else was written there goes), the last `MAX_LINES` of all."""
    kept = [line for line in old.splitlines() if _LINE.fullmatch(line)]
    lines = [*kept, *new][-MAX_LINES:]
    return "".join(line + "\n" for line in lines)


def append_alerts(workspace: Path, alerts: Iterable[tuple[str, str]], at: float) -> None:
    """Add (level, message) alerts to the workspace's `.ds01-alerts`, replacing the file
    whole, owned by the workspace's owner, mode 0644. OSError if it cannot be done safely
    (no workspace, a link in its place, a directory named `.ds01-alerts`, ...)."""
    new = [alert_line(level, message, at) for level, message in alerts]
    if not new:
        return
    dir_fd = open_workspace_dir(workspace)
    try:
        owner = os.fstat(dir_fd)
        old = read_tail(dir_fd, ALERTS, MAX_READ, owner=owner.st_uid)  # a cut line: not kept
        text = merged(old.decode("utf-8", errors="replace"), new)
        replace_file(dir_fd, ALERTS, text.encode("utf-8"), uid=owner.st_uid, gid=owner.st_gid)
    finally:
        os.close(dir_fd)


def keep_alive_mtime(workspace: Path) -> float | None:
    """When the workspace's `.keep-alive` was last touched; None if there is no regular
    file of that name (a link to one does not count) or no workspace to look in."""
    try:
        dir_fd = open_workspace_dir(workspace)
    except OSError:
        return None
    try:
        return regular_file_mtime(dir_fd, KEEP_ALIVE)
    finally:
        os.close(dir_fd)
