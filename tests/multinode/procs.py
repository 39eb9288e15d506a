"""Processes for the test swarm (`swarm.py`): commands, pids, daemons that outlive us.

Standard library only; nothing here knows about swarms or registries.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class SwarmError(RuntimeError):
    """The swarm could not be brought up (or down); the message says what to look at."""


def log(message: str) -> None:
    print(f"swarm: {message}", file=sys.stderr, flush=True)


def run(*argv: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and result.returncode != 0:
        raise SwarmError(f"{' '.join(argv)}: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def alive(pid: int | None) -> bool:
    stat = proc_stat(pid) if pid else None
    return stat is not None and stat[1] not in "ZX"


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_for(predicate: Callable[[], object], what: str, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        if value := predicate():
            return value
        if time.monotonic() > deadline:
            raise SwarmError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def parallel(fn: Callable, items: list) -> list:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


def ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and (stat := proc_stat(pid)):
        pids.add(pid)
        pid = stat[0]
    return pids


def children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            children.setdefault(stat[0], []).append(int(entry.name))
    return children


def daemon_env() -> dict[str, str]:
    """A daemon's environment: no proxy (the registry is on the bridge), no DOCKER_HOST;
    the DS01_* variables pass (a test session's mark among them)."""
    keep = {k: v for k, v in os.environ.items() if k.startswith("DS01_")}
    path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return {"PATH": path, "LANG": "C.UTF-8", **keep}


def spawn_daemon(argv: list[str], log_path: Path, pidfile: Path) -> int:
    """Start `argv` in a session of its own that outlives us; its pid (from `pidfile`).

    `setsid -f` forks it away from us (nothing to reap, no signal from our
    process group reaches it); subprocess closes every descriptor but 0-2 in
    it, so it holds no lock of ours or of our caller's.
    """
    pidfile.unlink(missing_ok=True)
    launcher = ["setsid", "-f", "sh", "-c", 'echo $$ >"$0"; exec "$@"', str(pidfile), *argv]
    with open(log_path, "w") as out:
        subprocess.run(
            launcher,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=daemon_env(),
            check=True,
        )
    return wait_for(lambda: read_pid(pidfile), f"{argv[0]} to start", 10)
