"""Shared test setup: integration tests need a Docker engine and the base image.

On a laptop without an engine they are skipped. Where DS01_REQUIRE_DOCKER=1 or
CI is set (scripts/test sets it on CI) they fail instead: CI must run them.
"""

from __future__ import annotations

import os

import docker
import pytest

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
