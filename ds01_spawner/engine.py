"""The one place a Docker engine client is made.

Every caller gets a client of its own (a build, a wait for a removal, the
ledger's reads), so none queues behind another's connection or DockerSpawner's
shared executor; where the engine is (``DOCKER_HOST`` and its TLS settings)
is read from the environment here only.
"""

from __future__ import annotations

import docker
import docker.errors
import requests.exceptions


def docker_client(timeout: float | None = None) -> docker.APIClient:
    """A low-level client for the engine the environment names, its API version negotiated.

    `timeout`: seconds a request may take; None keeps docker-py's default.
    """
    kwargs = docker.utils.kwargs_from_env()
    if timeout is not None:
        kwargs["timeout"] = timeout
    return docker.APIClient(version="auto", **kwargs)


def wait_removed(container: str, timeout: float) -> bool:
    """Block until the engine has removed `container` (False: not within `timeout`).

    The engine's own wait, not a poll (which costs a poll interval on every
    stop); blocking, so callers run it on a thread of their own.
    """
    client = docker_client(timeout)
    try:
        client.wait(container, condition="removed")
        return True
    except docker.errors.NotFound:
        return True  # already gone
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return False
    finally:
        client.close()
