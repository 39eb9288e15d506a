"""The service application: settings, routes, and the tornado server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

from jinja2 import Environment, FileSystemLoader, select_autoescape
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from jupyterhub.utils import url_path_join
from tornado import ioloop, web
from traitlets import Bool, Dict, Integer, Unicode, default
from traitlets.config import Application, Config

from ..configure import ADMIN_SCOPE
from ..gpus import gpu_allocator
from ..images import BuildRecords, ImageBuilder, default_client
from ..limits import PolicyStore
from .base import MAX_BODY_BYTES
from .gpus import GpuHandler
from .limits import LimitsHandler, PolicyReloadHandler
from .manager import HubClient, ImageManager, Settings
from .projects import BuildEventsHandler, ProjectActionHandler, ProjectHandler, ProjectListHandler
from .retirer import Retirer


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

    # the spawner's settings the service shares (configure(c) passes them)
    workspace_root = Unicode("/srv/ds01/workspaces", help="As DS01Spawner.workspace_root.").tag(
        config=True
    )
    workspace_template = Unicode(
        "{workspace_root}/{user}/{project}", help="As DS01Spawner.workspace_template."
    ).tag(config=True)
    state_dir = Unicode("/srv/ds01/state", help="As DS01Spawner.state_dir.").tag(config=True)
    base_image = Unicode("ds01/singleuser:latest", help="As DS01Spawner.base_image.").tag(
        config=True
    )
    build_network_mode = Unicode(
        None, allow_none=True, help="As DS01Spawner.build_network_mode."
    ).tag(config=True)
    build_cpu_shares = Integer(256, help="As DS01Spawner.build_cpu_shares.").tag(config=True)
    max_concurrent_builds = Integer(2, help="Builds the page runs at once.").tag(config=True)
    build_timeout = Integer(3600, help="As DS01Spawner.build_timeout.").tag(config=True)
    build_args = Dict(Unicode(), help="As DS01Spawner.build_args.").tag(config=True)
    policy_file = Unicode("", help="As DS01Spawner.policy_file.").tag(config=True)
    policy = Dict(help="As DS01Spawner.policy.").tag(config=True)
    retire_by_policy = Bool(
        True,
        help="Run the retirement loop (max_runtime, idle_timeout). Off: limits page only.",
    ).tag(config=True)
    allow_url_packages = Bool(
        False, help="Accept `name @ https://...` pip specs (direct references) on the page."
    ).tag(config=True)

    aliases = {"simulated-gpus": "DS01Service.simulated_gpus", "url": "DS01Service.url"}

    def make_app(self) -> web.Application:
        prefix = self.prefix
        hub_auth = HubOAuth(api_token=os.environ.get("JUPYTERHUB_API_TOKEN", ""), cache_max_age=60)
        project = r"(?P<owner>[^/]+)/(?P<name>[a-z][a-z0-9-]{0,29})"
        templates = Environment(
            loader=FileSystemLoader(Path(__file__).parent / "templates"),
            autoescape=select_autoescape(),
        )
        timeout = self.build_timeout
        builder = ImageBuilder(
            self.max_concurrent_builds,
            lambda: default_client(timeout),
            BuildRecords(self.state_dir),
        )
        token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
        hub = HubClient(os.environ["JUPYTERHUB_API_URL"], token) if token else None
        manager = ImageManager(
            Settings(
                workspace_root=self.workspace_root,
                workspace_template=self.workspace_template,
                state_dir=self.state_dir,
                base_image=self.base_image,
                build_args=self.build_args,
                build_network_mode=self.build_network_mode,
                build_cpu_shares=self.build_cpu_shares,
                allow_url_packages=self.allow_url_packages,
            ),
            builder,
            hub,
        )
        allocator = gpu_allocator(self.simulated_gpus)
        self.retirer = Retirer(
            hub or HubClient(os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081"), ""),
            PolicyStore(self.policy_file, self.policy),
            allocator,
            self.state_dir,
        )
        settings = {
            "manager": manager,
            "retirer": self.retirer,
            "state_dir": self.state_dir,
            "hub_auth": hub_auth,
            "cookie_secret": os.urandom(32),
            "xsrf_cookies": True,
            "ds01": self,
            "templates": templates,
            "allocator": allocator,
            "hub_base_url": os.environ.get("JUPYTERHUB_BASE_URL", "/"),
        }
        return web.Application(
            [
                (prefix, ProjectListHandler),
                (url_path_join(prefix, "api/images"), ProjectListHandler),
                (url_path_join(prefix, f"(?:api/)?images/{project}"), ProjectHandler),
                (
                    url_path_join(
                        prefix,
                        f"(?:api/)?images/{project}/(?P<action>packages|rebuild|rollback|restart|delete)",
                    ),
                    ProjectActionHandler,
                ),
                (url_path_join(prefix, f"(?:api/)?images/{project}/events"), BuildEventsHandler),
                (url_path_join(prefix, "(?:api/)?gpus"), GpuHandler),
                (url_path_join(prefix, "(?:api/)?limits"), LimitsHandler),
                (url_path_join(prefix, "(?:api/)?policy/reload"), PolicyReloadHandler),
                (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            ],
            **settings,
        )

    def start(self) -> None:
        where = urlparse(self.url)
        self.make_app().listen(
            where.port or 80,
            where.hostname or "127.0.0.1",
            max_body_size=4 * MAX_BODY_BYTES,  # larger: refused before it is read
        )
        self.log.info("ds01 service at %s%s", self.url, self.prefix)
        if self.retire_by_policy and self.retirer.hub.token:
            ioloop.IOLoop.current().add_callback(self.retirer.start)
            self.log.info("Retiring servers by the policy of %s", self.policy_file or "config")
        ioloop.IOLoop.current().start()


def main(argv: list[str] | None = None) -> None:
    app = DS01Service()
    # the hub passes the spawner's shared settings (see configure.configure)
    shared = json.loads(os.environ.get("DS01_SERVICE_SETTINGS") or "{}")
    app.update_config(Config({"DS01Service": shared}))
    app.initialize(argv)
    app.start()
