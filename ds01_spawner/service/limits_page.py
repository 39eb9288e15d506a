"""'check limits': your limits and what you use of them; admins see everyone's.

The page and its JSON twin (``api/limits``) show the policy as resolved for
the user (each value with where it came from), running projects with their
runtime and idle time left (and a `.keep-alive` or an exemption holding a
limit off), GPUs held and kept, the user's exemptions (in force or expired),
and recent retirements. Admins get every user with a running server, every
exemption, the policy's state (source, last reload, a broken edit's error,
the retirement settings), every GPU and who holds it (on a swarm: every
node's, as the GPU page shows them) and a "reload now" action.

Running servers come from `Retirer.latest`: one survey of the hub, the engine
and NVML shared by the views of a few seconds, times left counted on to now.
"""

from __future__ import annotations

import time
from typing import Any

from tornado import web

from ..exemptions import Exemption
from ..ledger import Holder
from ..limits import Limits, RetirementSettings
from ..nvml import GpuSlot
from ..swarmledger import NodeGpu, gpu_table
from ..units import format_duration, format_remaining
from .base import BaseHandler
from .gpu_page import swarm_view
from .hub_api import user_path
from .retirer import Retirer, ServerView


def _left(seconds: float | None, since: float) -> str | None:
    """Time left as a check saw it `since` seconds ago, counted on to now."""
    return None if seconds is None else format_remaining(max(seconds - since, 0))


def _time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def exemption_text(e: Exemption) -> str:
    """'exempt from idle_timeout until 2027-01-31 (thesis experiments)'"""
    reason = f" ({e.reason})" if e.reason else ""
    return f"exempt from {' and '.join(e.lifts)} until {e.until_text}{reason}"


def server_row(view: ServerView, seen_at: float, now: float) -> dict[str, Any]:
    f, v = view.facts, view.verdict
    kept = (
        v.keep_alive_until if v.keep_alive_until is not None and v.keep_alive_until > now else None
    )
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
        "keep_alive_until": None if kept is None else _time(kept),
        "exemptions": [exemption_text(e) for e in view.exemptions],
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


def gpu_rows(gpus: list[GpuSlot], ledger: list[Holder]) -> list[dict[str, str]]:
    """Every GPU a check saw and who holds it, in the rows of the swarm's table
    (`swarmledger.gpu_table`); no node: one engine's GPUs."""
    found = [NodeGpu("", "", g.uuid, g.index, g.name, g.memory_total, True) for g in gpus]
    return gpu_table(found, ledger)


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
                    "exemptions": [
                        e.describe(now) for e in policy.exemptions if e.applies_to(name, groups)
                    ],
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
            data["exemptions"] = [e.describe(now) for e in policy.exemptions]
            # on a swarm every node's GPUs, a down or drained node's too; else the check's
            swarm = await swarm_view(self.ds01.shared_settings.state_dir)
            data["gpus"] = swarm if swarm is not None else gpu_rows(snapshot.gpus, snapshot.holders)
        self.respond(
            data,
            "limits.html",
            everyone=everyone,
            reloaded=self.get_argument("reloaded", ""),
            format_time=_time,
            **data,
        )

    def policy_state(self) -> dict[str, Any]:
        store = self.retirer.policies
        policy = store.current()
        return {
            "source": policy.source,
            "file": store.path,
            "loaded_at": store.loaded_at,
            "error": store.error,
            "retirement": retirement_state(policy.retirement),
        }


def retirement_state(settings: RetirementSettings) -> dict[str, Any]:
    """The `retirement` section as people write it."""

    def shares(levels: tuple[float, ...]) -> str:
        return ", ".join(f"{100 * level:g}%" for level in levels) or "none"

    return {
        "check_interval": format_duration(settings.check_interval),
        "warn_idle": shares(settings.warn_idle),
        "warn_runtime": shares(settings.warn_runtime),
        "warn_before": format_duration(settings.warn_before),
        "gpu_busy_percent": settings.gpu_busy_percent,
        "idle_cpu_percent": settings.idle_cpu_percent,
        "idle_network_kbps": settings.idle_network_kbps,
        "idle_detection_window": settings.idle_detection_window,
        "keep_alive_max": format_duration(settings.keep_alive_max),
        "high_demand_share": settings.high_demand_share,
        "high_demand_idle_factor": settings.high_demand_idle_factor,
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
