"""The hub's home page, served by the hub, filled in from here.

``api/home`` is the page's data: the signed-in user's projects with their
status (`Overview.home`); an admin may ask for anyone's (``api/home/{user}``),
a user for nobody else's. The page's script reads it with the hub's OAuth
cookie for this service, and JupyterHub accepts that cookie on a script's
request only with this service's XSRF token, which no page outside this
service knows. ``home`` hands it over: a navigation (the cookie is accepted,
and a first one signs in through the hub's OAuth) that returns to the hub's
home page with the token in the fragment, which never reaches a server and
which the script drops from the address bar at once.
"""

from __future__ import annotations

from urllib.parse import quote

from tornado import web

from .base import BaseHandler
from .overview import Overview

TOKEN_FRAGMENT = "ds01-xsrf"  # the name the home page's script looks for


class HomeBase(BaseHandler):
    @property
    def overview(self) -> Overview:
        return self.settings["overview"]


class HomeDataHandler(HomeBase):
    """GET ``api/home[/{user}]``: a user's projects and what a start may ask for."""

    @web.authenticated
    async def get(self, owner: str | None = None) -> None:
        owner = owner or self.current_user["name"]
        self.require_owner_or_admin(owner)
        data = await self.overview.home(owner)
        self.set_header("Cache-Control", "no-store")
        self.write_json(data)


class HomeSignInHandler(HomeBase):
    """GET ``home``: back to the hub's home page, carrying this service's XSRF token.

    The destination is fixed (no ``next``): nothing here redirects elsewhere.
    """

    @web.authenticated
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        token = quote(self.xsrf_token.decode("ascii"), safe="")
        self.redirect(f"{self.settings['hub_base_url']}hub/home#{TOKEN_FRAGMENT}={token}")
