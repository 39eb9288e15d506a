"""The service application: settings, routes, and the tornado server."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from jinja2 import Environment, FileSystemLoader, select_autoescape
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from jupyterhub.utils import url_path_join
from tornado import ioloop, web
from traitlets import Integer, Unicode, default
from traitlets.config import Application

from ..configure import ADMIN_SCOPE
from ..gpus import gpu_allocator
from .handlers import GpuApiHandler, GpuPageHandler, HomeHandler


class DS01Service(Application):
    """The ds01 service; settings come from the command line or the hub's environment."""

    name = "ds01-service"

    simulated_gpus = Integer(
        help="Simulated GPUs (as DS01Spawner.simulated_gpus); from $DS01_SIMULATED_GPUS."
    ).tag(config=True)

    @default("simulated_gpus")
    def _default_simulated(self) -> int:
        return int(os.environ.get("DS01_SIMULATED_GPUS", "0"))

    admin_scope = Unicode(ADMIN_SCOPE, help="Scope that unlocks the admin views.").tag(config=True)

    url = Unicode(help="Where to listen; from $JUPYTERHUB_SERVICE_URL.").tag(config=True)

    @default("url")
    def _default_url(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101")

    prefix = Unicode(help="URL prefix; from $JUPYTERHUB_SERVICE_PREFIX.").tag(config=True)

    @default("prefix")
    def _default_prefix(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/ds01/")

    refresh_seconds = Integer(10, help="How often the GPU page reloads itself.").tag(config=True)

    aliases = {"simulated-gpus": "DS01Service.simulated_gpus", "url": "DS01Service.url"}

    def make_app(self) -> web.Application:
        prefix = self.prefix
        hub_auth = HubOAuth(api_token=os.environ.get("JUPYTERHUB_API_TOKEN", ""), cache_max_age=60)
        templates = Environment(
            loader=FileSystemLoader(Path(__file__).parent / "templates"),
            autoescape=select_autoescape(),
        )
        settings = {
            "hub_auth": hub_auth,
            "cookie_secret": os.urandom(32),
            "xsrf_cookies": True,
            "ds01": self,
            "templates": templates,
            "allocator": gpu_allocator(self.simulated_gpus),
            "hub_base_url": os.environ.get("JUPYTERHUB_BASE_URL", "/"),
        }
        return web.Application(
            [
                (prefix, HomeHandler),
                (url_path_join(prefix, "gpus"), GpuPageHandler),
                (url_path_join(prefix, "api/gpus"), GpuApiHandler),
                (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            ],
            **settings,
        )

    def start(self) -> None:
        where = urlparse(self.url)
        self.make_app().listen(where.port or 80, where.hostname or "127.0.0.1")
        self.log.info("ds01 service at %s%s", self.url, self.prefix)
        ioloop.IOLoop.current().start()


def main(argv: list[str] | None = None) -> None:
    app = DS01Service()
    app.initialize(argv)
    app.start()
