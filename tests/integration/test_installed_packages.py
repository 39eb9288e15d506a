"""Packages pip-installed inside a container are found at retire and offered back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ds01_spawner.identity import user_slug
from ds01_spawner.installed import InstalledRecords
from tests.pkgindex import make_wheel

from .conftest import exec_in


async def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_installed_package_is_recorded_at_retire_and_announced_at_start(hub, dirs):
    h = await hub(save_packages_timeout=5.0)
    user = h.new_user()
    records = InstalledRecords(dirs["state_dir"])
    await h.start(user, "work")
    c = h.container(user, "work")

    name, data = make_wheel("ds01probe", "1.0")
    (Path(dirs["workspace_root"]) / user_slug(user) / "work" / name).write_bytes(data)
    code, out = exec_in(c, f"pip install --no-index -q /workspace/{name}")
    assert code == 0, out

    await h.stop(user, "work")
    record = records.last_session(user_slug(user), "work")
    assert record["packages"] == ["ds01probe==1.0"]

    _, events = await h.start_watching(user, "work")
    await h.wait_ready(user, "work")
    notice = [e["message"] for e in events if "Last session you installed" in e["message"]]
    assert notice and "ds01probe==1.0" in notice[0]
    c2 = h.container(user, "work")
    assert exec_in(c2, "echo $DS01_UNSAVED_PACKAGES") == (0, "ds01probe==1.0")
    code, terminal = exec_in(c2, "bash -ic true")  # what a JupyterLab terminal prints first
    assert "last session you pip-installed" in terminal and "ds01probe==1.0" in terminal
    assert exec_in(c2, "python -c 'import ds01probe'")[0] != 0, "gone, as DS01 says"


def hub_rss() -> int:
    """The hub's resident memory in bytes: MockHub runs in this test process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# Earlier on PATH than the real pip (/opt/ds01/venv/bin): a `pip` that prints without
# end and a `timeout` that does not time out. Nothing in the hub may run either.
ENDLESS_PIP = r"""ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN mkdir -p /usr/local/evil \
 && printf '#!/bin/sh\nwhile :; do echo aaaaaaaa==1.0; done\n' > /usr/local/evil/pip \
 && printf '#!/bin/sh\nshift 3\nexec "$@"\n' > /usr/local/evil/timeout \
 && chmod 755 /usr/local/evil/pip /usr/local/evil/timeout
ENV PATH=/usr/local/evil:$PATH
"""


async def test_an_image_whose_pip_prints_without_end_costs_the_hub_nothing(hub, dirs):
    h = await hub(save_packages_timeout=10.0)
    user = h.new_user()
    workspace, _ = h.seed_workspace(user, "noisy", ENDLESS_PIP)
    await h.start(user, "noisy")
    c = h.container(user, "noisy")
    assert exec_in(c, "command -v pip") == (0, "/usr/local/evil/pip")
    name, data = make_wheel("ds01probe", "1.0")
    (workspace / name).write_bytes(data)
    code, out = exec_in(c, f"python -m pip install --no-index -q /workspace/{name}")
    assert code == 0, out

    rss = hub_rss()
    t0 = time.monotonic()
    await h.stop(user, "noisy")
    took = time.monotonic() - t0
    await asyncio.sleep(1)  # a reader left behind would still be growing
    grew = hub_rss() - rss
    assert h.containers(user) == []
    assert took < 10.0, f"stop took {took:.1f}s"
    assert grew < 20 * 1024 * 1024, f"the hub grew by {grew / 2**20:.0f} MiB"
    record = InstalledRecords(dirs["state_dir"]).last_session(user_slug(user), "noisy")
    assert record["packages"] == ["ds01probe==1.0"], "the real install, not the fake pip's"


async def test_a_container_that_hangs_is_retired_within_the_bound(hub, dirs):
    h = await hub(save_packages_timeout=3.0)
    user = h.new_user()
    await h.start(user, "stuck")
    c = h.container(user, "stuck")
    # the user's pip now hangs (the venv is theirs to break inside the container)
    code, out = exec_in(c, "printf '#!/bin/sh\\nsleep 600\\n' > $(which pip)")
    assert code == 0, out
    t0 = time.monotonic()
    await h.stop(user, "stuck")
    took = time.monotonic() - t0
    assert h.containers(user) == []
    assert took < 3.0 + 8.0, f"stop took {took:.1f}s"
    assert InstalledRecords(dirs["state_dir"]).last_session(user_slug(user), "stuck") is None
