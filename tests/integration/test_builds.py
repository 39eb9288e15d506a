"""Image builds on the real engine: their own pool, a limit, one per image, no damage on failure."""

from __future__ import annotations

import asyncio
import time
import uuid

import docker
import pytest

from ds01_spawner.identity import user_slug
from ds01_spawner.images import BuildError, BuildSpec, ImageBuilder, default_client
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
        f"{repo}:{tag}", dockerfile, {"ds01.managed": "true"}, {"BASE_IMAGE": BASE_IMAGE}
    )


async def test_failed_rebuild_keeps_latest_and_success_keeps_previous(engine, repo):
    builder = ImageBuilder(2, lambda: default_client(600))
    first = await builder.build(spec(repo, "RUN echo one > /v")).wait()

    with pytest.raises(BuildError) as info:
        await builder.build(spec(repo, "RUN echo two > /v && false")).wait()
    assert "non-zero code" in str(info.value)
    assert engine.images.get(f"{repo}:latest").id == first, "old image stays :latest"

    second = await builder.build(spec(repo, "RUN echo three > /v")).wait()
    assert second != first
    assert engine.images.get(f"{repo}:latest").id == second
    assert engine.images.get(f"{repo}:previous").id == first, "replaced image kept for rollback"


async def test_one_build_per_image_and_a_limit_overall(engine, repo):
    builder = ImageBuilder(1, lambda: default_client(600))
    slow = builder.build(spec(repo, "RUN sleep 3"))
    assert builder.build(spec(repo, "RUN sleep 3")) is slow, "second ask follows the running build"
    queued = builder.build(spec(repo, "RUN echo queued", tag="other"))
    assert queued.events[0].phase == "waiting"
    await asyncio.gather(slow.wait(), queued.wait())
    assert engine.images.get(f"{repo}:other").id == queued.image_id


async def test_a_long_build_does_not_hold_up_another_users_spawn_and_stop(hub, engine):
    h = await hub(max_concurrent_builds=2)
    fast, slow = h.new_user(), h.new_user()
    await h.start(fast, "ready")  # image built now
    await h.stop(fast, "ready")

    # the slow user's first spawn builds an image that takes >= 20 s

    # (the user name in the RUN line defeats the layer cache of earlier runs)
    dockerfile = f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {slow} && sleep 20\n"
    _, ids = h.seed_workspace(slow, "heavy", dockerfile)
    slow_start = asyncio.ensure_future(h.start(slow, "heavy", timeout=120))
    await asyncio.sleep(2)  # the build is running now

    t0 = time.monotonic()
    await h.start(fast, "ready")
    await h.stop(fast, "ready")
    spawn_and_stop = time.monotonic() - t0
    # had the spawn waited behind the build, the build would be over by now
    assert not slow_start.done(), f"spawn+stop took {spawn_and_stop:.1f}s, after the build"
    assert spawn_and_stop < 15
    await slow_start
    c = h.container(slow, "heavy")
    assert exec_in(c, "id -u")[1] == str(ids.uid)
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get("ds01-" + user_slug(fast) + "--ready")
