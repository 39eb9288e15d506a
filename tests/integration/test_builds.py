"""Image builds on the real engine: their own pool, a limit, one per image, no damage on failure."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
import uuid
from dataclasses import replace

import docker
import pytest
from traitlets.config import Config

from ds01_spawner.builds import ImageBuilder
from ds01_spawner.engine import docker_client
from ds01_spawner.identity import user_slug
from ds01_spawner.images import BuildError, BuildSpec
from ds01_spawner.settings import DS01Settings
from tests.conftest import BASE_IMAGE

from .conftest import exec_in


@pytest.fixture
def repo(engine):
    name = f"ds01-test-{uuid.uuid4().hex[:8]}/proj"
    yield name
    for image in engine.images.list(name=name):
        for tag in image.tags:
            engine.images.remove(tag, force=True)


def spec(repo: str, body: str, tag: str = "latest") -> BuildSpec:
    dockerfile = f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\n{body}\n"
    return BuildSpec(
        f"{repo}:{tag}",
        dockerfile,
        {"ds01.managed": "true"},
        {"BASE_IMAGE": BASE_IMAGE},
        allowed_images=(BASE_IMAGE,),
    )


async def test_failed_rebuild_keeps_latest_and_success_keeps_previous(engine, repo):
    builder = ImageBuilder(2, lambda: docker_client(600))
    first = await builder.build(spec(repo, "RUN echo one > /v")).wait()

    with pytest.raises(BuildError) as info:
        await builder.build(spec(repo, "RUN echo two > /v && false")).wait()
    assert "non-zero code" in str(info.value)
    assert engine.images.get(f"{repo}:latest").id == first, "old image stays :latest"

    second = await builder.build(spec(repo, "RUN echo three > /v")).wait()
    assert second != first
    assert engine.images.get(f"{repo}:latest").id == second
    assert engine.images.get(f"{repo}:previous").id == first, "replaced image kept for rollback"


async def test_builds_run_with_a_lower_cpu_weight(engine, repo):
    """build_cpu_shares reaches the build's RUN containers (cgroup v1 shares, or v2 weight)."""
    read = (
        "cat /sys/fs/cgroup/cpu/cpu.shares 2>/dev/null || cat /sys/fs/cgroup/cpu,cpuacct/"
        "cpu.shares 2>/dev/null || cat /sys/fs/cgroup/cpu.weight"
    )
    builder = ImageBuilder(1, lambda: docker_client(600))
    weights = {}
    for shares in (0, 256):
        s = spec(repo, f"RUN echo {shares} {uuid.uuid4().hex} && ({read}) > /weight", str(shares))
        image = await builder.build(replace(s, cpu_shares=shares or None)).wait()
        out = engine.containers.run(image, ["cat", "/weight"], remove=True, user="root")
        weights[shares] = out.decode().strip()
    # Docker's default is 1024 shares (v2 weight 100); 256 shares is v2 weight 10
    assert (weights[0], weights[256]) in (("1024", "256"), ("100", "10")), weights


async def test_one_build_per_image_and_a_limit_overall(engine, repo):
    builder = ImageBuilder(1, lambda: docker_client(600))
    slow = builder.build(spec(repo, "RUN sleep 3"))
    assert builder.build(spec(repo, "RUN sleep 3")) is slow, "second ask follows the running build"
    queued = builder.build(spec(repo, "RUN echo queued", tag="other"))
    assert queued.events[0].phase == "waiting"
    await asyncio.gather(slow.wait(), queued.wait())
    assert engine.images.get(f"{repo}:other").id == queued.image_id


class Gate:
    """An HTTP endpoint on 127.0.0.1 that answers 404 until the test opens it.

    A build (host network) waiting for it runs exactly as long as the test wants:
    no sleeps, no timing assumptions.
    """

    def __init__(self) -> None:
        self.open = threading.Event()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if gate.open.is_set() else 404)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_long_build_does_not_hold_up_another_users_spawn_and_stop(hub, engine):
    h = await hub(max_concurrent_builds=2, build_network_mode="host")
    fast, slow = h.new_user(), h.new_user()
    await h.start(fast, "ready")  # image built now
    await h.stop(fast, "ready")

    # the slow user's first spawn builds an image that waits until the gate opens
    gate = Gate()
    probe = f"import urllib.request as u; u.urlopen('{gate.url}')"
    dockerfile = (  # the user name in the RUN line: no stale layer cache from earlier runs
        f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\n"
        f'RUN echo {slow} && until python -c "{probe}" 2>/dev/null; do sleep 0.2; done\n'
    )
    _, ids = h.seed_workspace(slow, "heavy", dockerfile)
    try:
        slow_start = asyncio.ensure_future(h.start(slow, "heavy", timeout=240))
        # the hub's build pool: one per process and settings, as the spawners share it
        shared = Config({"DS01Settings": h.app.config.DS01Spawner})
        builder = DS01Settings(config=shared).builder
        await wait_until(
            lambda: any(b.spec.image.endswith("/heavy:latest") for b in builder.running())
        )

        await h.start(fast, "ready")
        await h.stop(fast, "ready")
        # the build is still waiting at the gate: the spawn and stop did not queue behind it
        assert not slow_start.done()
        assert any(not b.done.is_set() for b in builder.running())
    finally:
        gate.open.set()
    await slow_start
    gate.close()
    c = h.container(slow, "heavy")
    assert exec_in(c, "id -u")[1] == str(ids.uid)
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get("ds01-" + user_slug(fast) + "--ready")


async def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)
