"""'check limits': your limits and what you use of them; admins see everyone's.

The page and its JSON twin (``api/limits``) show the policy as resolved for
the user (each value with where it came from), running projects with their
runtime and idle time left, GPUs held and kept, and recent retirements.
Admins get every user with a running server, the policy's state (source,
last reload, a broken edit's error) and a "reload now" action.

Running servers come from `Retirer.latest`: one survey of the hub, the engine
and NVML shared by the views of a few seconds, times left counted on to now.
"""

from __future__ import annotations

import time
from typing import Any

from tornado import web

from ..limits import Limits
from ..units import format_duration, format_remaining
from .base import BaseHandler
from .hub_api import user_path
from .retirer import Retirer, ServerView


def _left(seconds: float | None, since: float) -> str | None:
    """Time left as a check saw it `since` seconds ago, counted on to now."""
    return None if seconds is None else format_remaining(max(seconds - since, 0))


def server_row(view: ServerView, seen_at: float, now: float) -> dict[str, Any]:
    f, v = view.facts, view.verdict
    return {
        "server": f.server,
        "project": f.project,
        "started": f.started,
        "runtime": format_remaining(now - f.started),
        "runtime_left": _left(v.runtime_left, now - seen_at),
        "idle_left": _left(v.idle_left, now - seen_at),
        "idle_limit": None if v.idle_limit is None else format_duration(v.idle_limit),
        "gpus": list(f.gpus),
        "gpu_equivalents": view.gpu_equivalents,
        "status": v.action,
        "message": v.message,
    }


def usage(user: str, limits: Limits, views: list[ServerView], holds: list) -> dict[str, Any]:
    mine = [v for v in views if v.facts.user == user]
    return {
        "running_projects": len(mine),
        "max_running_projects": limits.max_running_projects,
        "gpus": round(sum(v.gpu_equivalents for v in mine), 4),
        "max_gpus": limits.max_gpus,
        "kept_gpus": [
            {"uuid": h.uuid, "project": h.project, "until": h.until}
            for h in holds
            if h.user == user
        ],
    }


class LimitsHandler(BaseHandler):
    @property
    def retirer(self) -> Retirer:
        return self.settings["retirer"]

    async def user_groups(self, name: str) -> list[str]:
        if name == self.current_user["name"] and "groups" in self.current_user:
            return list(self.current_user["groups"])
        model = await self.retirer.hub.call("GET", user_path(name))
        return list(model.get("groups") or [])

    @web.authenticated
    async def get(self) -> None:
        everyone = self.get_argument("all", "") == "1"
        if everyone:
            self.require_admin()
        policy = self.retirer.policy()
        snapshot = await self.retirer.latest()
        now = time.time()
        holds = self.settings["gpu_holds"].active()
        log = self.retirer.retirements
        names = sorted({v.facts.user for v in snapshot.servers}) if everyone else []
        me = self.current_user["name"]
        people = []
        for name in names or [me]:
            groups = snapshot.users.get(name) or await self.user_groups(name)
            limits = policy.resolve(name, groups)
            people.append(
                {
                    "user": name,
                    "group": policy.group_for(groups),
                    "limits": limits.describe(),
                    "usage": usage(name, limits, snapshot.servers, holds),
                    "servers": [
                        server_row(v, snapshot.at, now)
                        for v in snapshot.servers
                        if v.facts.user == name
                    ],
                }
            )
        data: dict[str, Any] = {
            "users": people,
            "gpu_share": round(snapshot.share, 4),
            "retirements": [
                vars(e) for e in log.recent(100 if everyone else 20, user=None if everyone else me)
            ],
        }
        if everyone:
            data["policy"] = self.policy_state()
        self.respond(
            data,
            "limits.html",
            everyone=everyone,
            reloaded=self.get_argument("reloaded", ""),
            format_time=lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)),
            **data,
        )

    def policy_state(self) -> dict[str, Any]:
        store = self.retirer.policies
        policy = store.current()
        settings = policy.retirement
        return {
            "source": policy.source,
            "file": store.path,
            "loaded_at": store.loaded_at,
            "error": store.error,
            "retirement": {
                "check_interval": format_duration(settings.check_interval),
                "warn_before": format_duration(settings.warn_before),
                "gpu_busy_percent": settings.gpu_busy_percent,
                "high_demand_share": settings.high_demand_share,
                "high_demand_idle_factor": settings.high_demand_idle_factor,
            },
        }


class PolicyReloadHandler(BaseHandler):
    """Admins: re-read the policy file now; a broken file is refused, the old policy stays."""

    @web.authenticated
    async def post(self) -> None:
        self.require_admin()
        policy = self.settings["retirer"].reload_policy(by=self.current_user["name"])
        if self.is_api:
            self.write_json({"source": policy.source, "reloaded": True})
        else:
            self.redirect(f"{self.ds01.prefix}limits?all=1&reloaded=1")
