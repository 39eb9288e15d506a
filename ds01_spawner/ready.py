"""Ready the moment the server answers: a fast probe for the end of `start()`.

JupyterHub polls a new server with exponential backoff (0.2 s doubling to
5 s), so a server that answers just after a poll waits seconds for the next
one. `wait_until_answers` asks every `interval` instead (twice that after the
first seconds of a slow boot), so the hub's first poll after `start()`
returns finds the server up. Each try is a bare TCP connect first, which a
booting server refuses at once, and an HTTP request, with the hub's own
client and rule (any answer below 500 counts), only once the port accepts:
many servers booting at once cost the hub little.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

import aiohttp
from jupyterhub.httpclient import fetch

SLOW_BOOT_S = 3.0  # a server still booting after this is probed half as often


async def listening(url: str, timeout: float) -> bool:
    """Does the server at `url` accept a TCP connection now?"""
    where = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(where.hostname, where.port or 80), timeout
        )
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def answers(url: str, timeout: float, ssl_context: ssl.SSLContext | None = None) -> bool:
    """Does `url` answer now, with a status JupyterHub takes as up (< 500)?"""
    if not await listening(url, timeout):
        return False
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
        now = time.monotonic()
        if now >= deadline:
            return None
        if await answers(url, min(1.0, deadline - now), ssl_context):
            return time.monotonic() - started
        pause = interval if time.monotonic() - started < SLOW_BOOT_S else 2 * interval
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
