"""Shared test setup: integration tests need a Docker engine and the base image.

On a laptop without an engine they are skipped. Where DS01_REQUIRE_DOCKER=1 or
CI is set (scripts/test sets it on CI) they fail instead: CI must run them.

And a session leaves no process of its own running (`no_process_left_behind`).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import docker
import pytest

from tests.integration.hubprocess import alive, cmdline, descendants, end_processes, proc_stat

BASE_IMAGE = os.environ.get("DS01_TEST_BASE_IMAGE", "ds01/singleuser:latest")


def _require_docker() -> bool:
    return bool(os.environ.get("DS01_REQUIRE_DOCKER") or os.environ.get("CI"))


def _engine_problem() -> str | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as e:
        return f"no Docker engine ({e}); run scripts/bootstrap"
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        return f"base image {BASE_IMAGE} missing; run images/build"
    finally:
        client.close()
    return None


def pytest_collection_modifyitems(config, items):
    needs_engine = [i for i in items if i.get_closest_marker("integration")]
    if not needs_engine:
        return
    problem = _engine_problem()
    if problem is None:
        return
    if _require_docker():
        raise pytest.UsageError(
            f"INTEGRATION TESTS WOULD SKIP, but DS01_REQUIRE_DOCKER/CI demands them: {problem}"
        )
    print(f"\n*** skipping {len(needs_engine)} integration tests: {problem} ***")
    skip = pytest.mark.skip(reason=problem)
    for item in needs_engine:
        item.add_marker(skip)


# what a test may start that can outlive it: a hub, its proxy and service, an engine
LONG_LIVED = re.compile(
    r"jupyterhub|configurable-http-proxy|ds01_spawner\.service|dockerd|containerd"
)
SESSION_MARK = "DS01_TEST_SESSION"


def _running() -> dict[int, int]:
    """Every live process: pid -> start time."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and stat[1] not in "ZX":
            found[int(entry.name)] = stat[2]
    return found


def _started_by_session(pid: int, mark: str, basetemp: Path) -> bool:
    """Ours: carrying this session's mark in its environment (a hub and its proxy), or
    working in this session's temp directory (the hub's service, which gets no
    environment of the hub's)."""
    try:
        if f"{SESSION_MARK}={mark}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
            return True
        return Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(basetemp)
    except OSError:  # gone, or not ours to read
        return False


def _machine_engine() -> set[int]:
    """The machine's own engine (the default socket's dockerd and its containerd): a
    test that restarts it (test_faults) leaves it running on purpose, as bootstrap would."""
    engines = {
        pid
        for pid in _running()
        if (words := cmdline(pid).split())
        and Path(words[0]).name == "dockerd"
        and not any(w.startswith(("-H", "--host", "--data-root", "--pidfile")) for w in words)
    }
    return engines.union(*(descendants(pid) for pid in engines))


def _left_behind(before: dict[int, int], mark: str, basetemp: Path) -> dict[int, int]:
    under_pytest = descendants(os.getpid())
    engine = _machine_engine()
    return {
        pid: started
        for pid, started in _running().items()
        if before.get(pid) != started
        and pid not in engine
        and LONG_LIVED.search(cmdline(pid))
        and (pid in under_pytest or _started_by_session(pid, mark, basetemp))
    }


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory):
    """Fail the session if a process it started still runs at its end (then end it).

    The engine bootstrap started before the session, and processes of other
    sessions on this machine, are not ours: only what started during this
    session and is under pytest, has its mark, or works in its temp directory.
    """
    before = _running()
    mark = uuid.uuid4().hex
    os.environ[SESSION_MARK] = mark  # inherited by the hubs tests start, and their proxies
    basetemp = tmp_path_factory.getbasetemp()
    yield
    deadline = time.monotonic() + 3  # a service whose hub just went has a second to notice
    while (left := _left_behind(before, mark, basetemp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: started for pid, started in left.items() if alive(pid, started)}
    if left:
        ended = end_processes(left)
        pytest.fail(
            "the test session left processes running (now ended):\n  " + "\n  ".join(ended),
            pytrace=False,
        )
