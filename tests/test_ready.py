"""The fast readiness probe, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

from tornado import web

from ds01_spawner.ready import answers, server_url, wait_until_answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Status(web.RequestHandler):
    def get(self) -> None:
        self.application.settings["seen"].append(self.request.path)
        self.set_status(self.application.settings["status"])
        self.finish("ok")


async def serve_after(port: int, delay: float, status: int = 302, seen: list | None = None):
    await asyncio.sleep(delay)
    app = web.Application([(r"/.*", Status)], status=status, seen=[] if seen is None else seen)
    return app.listen(port, "127.0.0.1")


async def test_start_returns_within_a_probe_interval_of_the_server_answering():
    port = free_port()
    server = asyncio.create_task(serve_after(port, 0.4))
    waited = await wait_until_answers(f"http://127.0.0.1:{port}/user/ada/", timeout=5)
    (await server).stop()
    assert waited is not None and 0.4 <= waited < 0.4 + 0.25


async def test_a_booting_server_costs_bare_connects_and_one_request():
    port, seen = free_port(), []
    server = asyncio.create_task(serve_after(port, 0.5, seen=seen))
    assert await wait_until_answers(f"http://127.0.0.1:{port}/user/ada/", timeout=5)
    (await server).stop()
    assert seen == ["/user/ada/"], "no HTTP request before the port accepted"


async def test_a_server_answering_with_an_error_is_not_ready_and_the_wait_ends_at_its_limit():
    port = free_port()
    server = await serve_after(port, 0, status=503)
    url = f"http://127.0.0.1:{port}/"
    try:
        assert await answers(url, 1) is False
        assert await wait_until_answers(url, timeout=0.3) is None
    finally:
        server.stop()


async def test_nobody_listening_is_no_answer():
    assert await answers(f"http://127.0.0.1:{free_port()}/", 1) is False


def test_the_url_is_where_the_hub_will_look():
    assert server_url("172.17.0.5", 8888, "/user/ada/") == "http://172.17.0.5:8888/user/ada/"
    assert server_url("fd00::5", 8888, "/user/ada/") == "http://[fd00::5]:8888/user/ada/"
