"""The service application: settings, routes, and the tornado server."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

from jinja2 import Environment, FileSystemLoader, select_autoescape
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from jupyterhub.utils import url_path_join
from tornado import httpserver, ioloop, web
from traitlets import Bool, Integer, Unicode, default
from traitlets.config import Application

from .. import labels
from ..configure import ADMIN_SCOPE
from ..gpuqueue import QueueFile
from ..settings import DS01Settings
from .base import MAX_BODY_BYTES
from .cleaner import Cleaner
from .gpu_page import GpuHandler
from .home_page import HomeDataHandler, HomeSignInHandler
from .hub_api import HubClient
from .image_manager import ACTION_FIELDS, ImageManager
from .image_page import (
    BuildEventsHandler,
    ProjectActionHandler,
    ProjectHandler,
    ProjectListHandler,
)
from .limits_page import LimitsHandler, PolicyReloadHandler
from .metrics import Metrics, MetricsHandler
from .overview import Overview
from .retirer import Retirer
from .server_page import ServerActionHandler, ServerProgressHandler
from .servers import SERVER_ACTION_FIELDS, ServerManager
from .usage_page import UsageCache, UsageHandler

BIND_RETRY_SECONDS = 10  # how long a port held by an exiting service is waited for


class DS01Service(Application):
    """The ds01 service: its own settings here, the shared ones from the hub (`DS01Settings`).

    It ends within a second or two of SIGTERM/SIGINT, or of its hub's death
    (JupyterHub starts it in a session of its own, so a SIGKILLed hub would
    leave it holding the port with a token the next hub does not know).
    """

    name = "ds01-service"

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

    retire_by_policy = Bool(
        True,
        help="Run the retirement loop (max_runtime, idle_timeout). Off: limits page only.",
    ).tag(config=True)
    allow_url_packages = Bool(
        False, help="Accept `name @ https://...` pip specs (direct references) on the page."
    ).tag(config=True)

    aliases = {"url": "DS01Service.url"}

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        self.shared_settings = DS01Settings.from_environ(os.environ)
        self.hub = HubClient.from_environ(os.environ)
        self.builder = self.shared_settings.builder
        self.server: httpserver.HTTPServer | None = None
        self._parent = os.getppid()

    def make_app(self) -> web.Application:
        """The routes, and the objects every handler shares: one hub client, one image
        manager, one retirer, over the hub's settings."""
        prefix = self.prefix
        hub = self.hub
        shared = self.shared_settings
        hub_auth = HubOAuth(api_url=hub.api_url, api_token=hub.token, cache_max_age=60)
        project = r"(?P<owner>[^/]+)/(?P<name>[a-z][a-z0-9-]{0,29})"
        actions = "|".join(ACTION_FIELDS)
        servers = "|".join(SERVER_ACTION_FIELDS)
        templates = Environment(
            loader=FileSystemLoader(Path(__file__).parent / "templates"),
            autoescape=select_autoescape(),
        )
        self.retirer = Retirer(
            hub,
            shared.policy_store,
            shared.gpu_allocator,
            shared.state_dir,
            audit=shared.audit,
            workspace_for=shared.workspace_for,  # .keep-alive read, .ds01-alerts written there
        )
        manager = ImageManager(shared, hub, allow_url_packages=self.allow_url_packages)
        hub_base_url = os.environ.get("JUPYTERHUB_BASE_URL", "/")
        settings = {
            "manager": manager,
            "servers": ServerManager(hub, manager, hub_base_url),
            "usage": UsageCache(shared.state_dir),
            "overview": Overview(manager, hub, shared, shared.gpu_allocator, prefix=prefix),
            "retirer": self.retirer,
            "gpu_holds": shared.gpu_holds,
            "gpu_queue": QueueFile(shared.state_dir),  # the hub's queue, as it writes it
            "hub_auth": hub_auth,
            "cookie_secret": os.urandom(32),
            "xsrf_cookies": True,
            "ds01": self,
            "templates": templates,
            "allocator": shared.gpu_allocator,
            "metrics": Metrics.for_service(shared),
            "hub_base_url": hub_base_url,
        }
        return web.Application(
            [
                (prefix, ProjectListHandler),
                (url_path_join(prefix, "api/images"), ProjectListHandler),
                (url_path_join(prefix, f"(?:api/)?images/{project}"), ProjectHandler),
                (
                    url_path_join(prefix, f"(?:api/)?images/{project}/(?P<action>{actions})"),
                    ProjectActionHandler,
                ),
                (url_path_join(prefix, f"(?:api/)?images/{project}/events"), BuildEventsHandler),
                (
                    url_path_join(prefix, f"(?:api/)?projects/{project}/(?P<action>{servers})"),
                    ServerActionHandler,
                ),
                (url_path_join(prefix, f"api/projects/{project}/progress"), ServerProgressHandler),
                (url_path_join(prefix, "api/home(?:/(?P<owner>[^/]+))?"), HomeDataHandler),
                (url_path_join(prefix, "home"), HomeSignInHandler),
                (url_path_join(prefix, "(?:api/)?gpus"), GpuHandler),
                (url_path_join(prefix, "(?:api/)?limits"), LimitsHandler),
                (url_path_join(prefix, "metrics"), MetricsHandler),
                (url_path_join(prefix, r"(?:api/)?usage(?P<csv>\.csv)?"), UsageHandler),
                (url_path_join(prefix, "(?:api/)?policy/reload"), PolicyReloadHandler),
                (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            ],
            **settings,
        )

    def start(self) -> None:
        """Serve until a signal or the hub's death stops the loop (see `stop`)."""
        self.server = self.listen(self.make_app())
        self.log.info("ds01 service at %s%s", self.url, self.prefix)
        loop = asyncio.get_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        ioloop.PeriodicCallback(self.stop_without_hub, 1000).start()
        if self.retire_by_policy and self.hub.token:
            ioloop.IOLoop.current().add_callback(self.retirer.start)
            self.log.info(
                "Retiring servers by the policy of %s",
                self.shared_settings.policy_file or "config",
            )
        ioloop.IOLoop.current().add_callback(Cleaner.for_service(self.shared_settings).start)
        ioloop.IOLoop.current().start()

    def listen(self, app: web.Application) -> httpserver.HTTPServer:
        """Bind, waiting a few seconds for a port that the service of a dead hub still holds.

        That one notices its hub is gone within a second and exits; binding
        beside it (SO_REUSEPORT) would split the requests between the two.
        """
        where = urlparse(self.url)
        deadline = time.monotonic() + BIND_RETRY_SECONDS
        while True:
            try:
                return app.listen(
                    where.port or 80,
                    where.hostname or "127.0.0.1",
                    max_body_size=4 * MAX_BODY_BYTES,  # larger: refused before it is read
                )
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                self.log.warning("%s is in use (an earlier service exiting?); waiting", self.url)
                time.sleep(0.2)

    def stop_without_hub(self) -> None:
        """Stop once the hub that started us is gone (we were reparented)."""
        if os.getppid() != self._parent:
            self.stop("the hub is gone")

    def stop(self, reason: str) -> None:
        """Stop serving, cancel the retirer, record running builds as interrupted, end the loop.

        The build threads are not waited for: main() exits the process, which
        closes their connections, and the engine cancels a build whose client
        went away; nothing half-built is tagged.
        """
        self.log.warning("ds01 service stopping: %s", reason)
        if self.server is not None:
            self.server.stop()
        for task in asyncio.all_tasks():  # the retirement loop, requests in flight
            task.cancel()
        for image in self.interrupt_builds():
            self.log.warning("Build of %s interrupted", image)
        ioloop.IOLoop.current().add_callback(ioloop.IOLoop.current().stop)

    def interrupt_builds(self) -> list[str]:
        """Record the builds this service is running as interrupted; returns their images."""
        records = self.builder.records
        interrupted = []
        for build in self.builder.running():
            if not build.started.is_set() or build.done.is_set():
                continue
            record = records.read(build.spec.image) or {}
            if record.get("status") != "running":
                continue  # its thread has not begun; a record it writes reads as interrupted
            records.write(
                build.spec.image,
                status="interrupted",
                finished=labels.now_iso(),
                error="the ds01 service stopped during the build; nothing was tagged",
            )
            interrupted.append(build.spec.image)
        return interrupted


def main(argv: list[str] | None = None) -> None:
    app = DS01Service()
    app.initialize(argv)
    app.start()
    # stopped: exit now rather than wait for build threads blocked on the engine
    logging.shutdown()
    os._exit(0)
