"""Ready the moment the server answers: a fast probe for the end of `start()`.

JupyterHub polls a new server with exponential backoff (0.2 s doubling to
5 s), so a server that answers just after a poll waits seconds for the next
one. `wait_until_answers` asks every `interval` instead, with the hub's own
HTTP client and rule (any answer below 500 counts), so the hub's first poll
after `start()` returns finds the server up.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import aiohttp
from jupyterhub.httpclient import fetch


async def answers(url: str, timeout: float, ssl_context: ssl.SSLContext | None = None) -> bool:
    """Does `url` answer now, with a status JupyterHub takes as up (< 500)?"""
    kwargs = {"allow_redirects": False, "timeout": aiohttp.ClientTimeout(total=timeout)}
    if ssl_context is not None:
        kwargs["ssl"] = ssl_context
    try:
        response = await fetch(url, raise_for_status=False, **kwargs)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False
    response.release()
    return response.status < 500


def server_url(ip: str, port: int, base_url: str) -> str:
    """Where the hub will look for a server that start() placed at (ip, port)."""
    host = f"[{ip}]" if ":" in ip else ip  # IPv6
    return f"http://{host}:{port}{base_url}"


async def wait_until_answers(
    url: str,
    *,
    timeout: float,
    interval: float = 0.05,
    ssl_context: ssl.SSLContext | None = None,
) -> float | None:
    """Seconds until `url` answered, or None if it did not within `timeout`.

    None is no error here: the hub's own wait (`http_timeout`) follows and
    reports a server that never answers, as it does for DockerSpawner.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if await answers(url, min(1.0, left), ssl_context):
            return time.monotonic() - started
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
