"""The retirement loop: every `check_interval`, judge each running server by the policy.

Facts come from the hub API (started, last activity, groups), the engine
(which project and GPUs each container holds) and NVML (GPU utilization);
the decision is `retirement.judge`. A retirement is logged (service log and
`RetirementLog`) before the server is stopped through the hub API, the same
way a user's stop goes, so the spawner retires the container as usual.

Scopes the service needs for this: configure.SERVICE_SCOPES (servers,
list:users, read:users:activity, read:users:groups).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import labels
from ..audit import AuditLog
from ..engine import docker_client
from ..errors import Refusal
from ..gpu_samples import GpuSamples
from ..gpus import GpuAllocator
from ..ledger import Holder
from ..limits import Limits, Policy, PolicyStore
from ..nvml import GpuSlot, GpuUnavailable
from ..policyfile import PolicyError
from ..retirement import (
    Notices,
    Retirement,
    RetirementLog,
    ServerFacts,
    Verdict,
    gpu_share,
    judge,
)
from .hub_api import HubClient, server_path

log = logging.getLogger("ds01.retirer")

RECENTLY_RETIRED = 3600  # the hub's pages mention a retirement this long


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass
class ServerView:
    """One running server with its user's limits and today's verdict: the limits page's row."""

    facts: ServerFacts
    limits: Limits
    verdict: Verdict
    gpu_equivalents: float = 0.0


@dataclass
class Snapshot:
    """Everything one check saw; the limits page renders the latest (`Retirer.latest`)."""

    at: float
    servers: list[ServerView] = field(default_factory=list)
    users: dict[str, list[str]] = field(default_factory=dict)  # user -> groups
    share: float = 0.0
    gpus: list[GpuSlot] = field(default_factory=list)  # with their utilization
    holders: list[Holder] = field(default_factory=list)  # the ledger


class Retirer:
    def __init__(
        self,
        hub: HubClient,
        policies: PolicyStore,
        allocator: GpuAllocator,
        state_dir: str,
        clock: Callable[[], float] = time.time,
        audit: AuditLog | None = None,
    ) -> None:
        self.hub = hub
        self.policies = policies
        self.allocator = allocator
        self.retirements = RetirementLog(state_dir)
        self.notices = Notices(state_dir)
        self.gpu_samples = GpuSamples(state_dir)  # utilization while held, for the usage page
        self.clock = clock
        self.audit = audit  # retirements and policy reloads go to the audit trail
        self.gpu_busy_at: dict[tuple[str, str], float] = {}
        self._warned: set[tuple[tuple[str, str], str]] = set()
        self.last: Snapshot | None = None
        self._page_snapshot: Snapshot | None = None  # the limits page's own, see latest()
        self._client = docker_client()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------ the policy

    def policy(self) -> Policy:
        """The lab policy in force; a 503 while there is none: nothing can be judged."""
        try:
            return self.policies.current()
        except PolicyError as e:
            raise Refusal(f"no lab policy in force: {e}", status=503) from None

    def reload_policy(self, by: str = "") -> Policy:
        """Re-read the policy file now; a broken file is refused and the old policy stays."""
        source = self.policies.path or "config"
        try:
            policy = self.policies.reload()
        except PolicyError as e:
            self._audit("policy", action="refused", source=source, by=by or None, error=str(e))
            raise Refusal(f"policy not reloaded, the previous one stays: {e}") from None
        self._audit("policy", action="reload", source=policy.source, by=by or None)
        return policy

    def _audit(self, kind: str, **data: Any) -> None:
        if self.audit is not None:
            self.audit.emit(kind, **data)

    # ------------------------------------------------------------ facts

    async def hub_users(self) -> list[dict[str, Any]]:
        """Users with running servers, every page of them."""
        users, offset = [], 0
        while True:
            page = await self.hub.call(
                "GET",
                f"users?state=active&offset={offset}&limit=200",
                headers={"Accept": "application/jupyterhub-pagination+json"},
            )
            if not isinstance(page, dict):  # a hub without pagination: everything at once
                return users + list(page)
            items = page["items"]
            users.extend(items)
            following = (page.get("_pagination") or {}).get("next")
            if not following or not items:
                return users
            offset = following["offset"]

    async def containers(self) -> dict[tuple[str, str], dict[str, str]]:
        found = await asyncio.to_thread(self._client.containers, filters=labels.managed_filter())
        return {
            (c["Labels"].get(labels.USER, ""), c["Labels"].get(labels.SERVER_NAME, "")): c["Labels"]
            for c in found
            if c["Labels"].get(labels.ROLE) == "project"
        }

    async def gpu_facts(self) -> tuple[list[GpuSlot], float, dict[tuple[str, str], list[Holder]]]:
        """GPUs, the share allocated, and who holds what: the sealed ledger, never the
        labels a user's image may have set."""
        ledger = await self.allocator.ledger()
        held: dict[tuple[str, str], list[Holder]] = {}
        for h in ledger:
            held.setdefault((h.user, h.server), []).append(h)
        try:
            slots = await self.allocator.slots()
        except GpuUnavailable:
            return [], 0.0, held
        return slots, gpu_share(slots, ledger), held

    # ------------------------------------------------------------ one check

    async def survey(self) -> Snapshot:
        """Every running server with its user's limits and verdict; nothing is acted on,
        nothing recorded (`check` does both)."""
        policy = self.policies.current()
        now = self.clock()
        users = await self.hub_users()
        containers = await self.containers()
        slots, share, held = await self.gpu_facts()
        busy = {
            s.uuid
            for s in slots
            if s.utilization is not None and s.utilization >= policy.retirement.gpu_busy_percent
        }
        snapshot = Snapshot(at=now, share=share, gpus=slots)
        snapshot.holders = [h for holders in held.values() for h in holders]
        for user in users:
            snapshot.users[user["name"]] = list(user.get("groups") or [])
            for name, server in (user.get("servers") or {}).items():
                if not server.get("ready") or server.get("pending"):
                    continue  # starting or stopping: not ours to judge now
                key = (user["name"], name)
                snapshot.servers.append(
                    self._view(
                        policy,
                        user,
                        name,
                        server,
                        containers.get(key, {}),
                        held.get(key, []),
                        busy,
                        share,
                        now,
                    )
                )
        return snapshot

    async def latest(self, max_age: float = 2.0) -> Snapshot:
        """A survey for the limits page, at most `max_age` seconds old: a burst of page
        views costs one survey, and nothing the retirement loop keeps is touched."""
        cached = self._page_snapshot
        if cached is None or self.clock() - cached.at > max_age:
            self._page_snapshot = cached = await self.survey()
        return cached

    async def check(self) -> Snapshot:
        """Judge every running server once; warn and retire as the policy says."""
        snapshot = await self.survey()
        now = snapshot.at
        self.gpu_samples.record(snapshot.holders, snapshot.gpus, now)  # for efficiency
        warnings: dict[str, list[dict[str, Any]]] = {}
        running = {(v.facts.user, v.facts.server) for v in snapshot.servers}
        for view in snapshot.servers:
            key = (view.facts.user, view.facts.server)
            if view.facts.gpu_busy_at is not None:
                self.gpu_busy_at[key] = view.facts.gpu_busy_at
            verdict = view.verdict
            if verdict.action == "warn":
                if (key, verdict.reason) not in self._warned:  # log once, show every check
                    self._warned.add((key, verdict.reason))
                    log.warning("%s/%s %s", view.facts.user, view.facts.project, verdict.message)
                warnings.setdefault(view.facts.user, []).append(
                    {
                        "server": view.facts.server,
                        "project": view.facts.project,
                        "reason": verdict.reason,
                        "at": verdict.retire_at,
                        "message": f"Project {view.facts.project}: {verdict.message}",
                    }
                )
            elif verdict.action == "retire":
                await self.retire(view)
                running.discard(key)
        self._warned = {w for w in self._warned if w[0] in running}
        for gone in set(self.gpu_busy_at) - running:
            del self.gpu_busy_at[gone]
        self._add_recent_retirements(warnings, running, now)
        self.notices.write(warnings)
        self.last = snapshot
        return snapshot

    def _view(
        self,
        policy: Policy,
        user: dict[str, Any],
        name: str,
        server: dict[str, Any],
        container: dict[str, str],
        holders: list[Holder],
        busy: set[str],
        share: float,
        now: float,
    ) -> ServerView:
        gpus = tuple(h.uuid for h in holders)
        gpu_busy_at = now if busy.intersection(gpus) else self.gpu_busy_at.get((user["name"], name))
        options = server.get("user_options") or {}
        facts = ServerFacts(
            user=user["name"],
            server=name,
            project=container.get(labels.PROJECT) or options.get("project") or name or "default",
            started=parse_time(server.get("started")) or now,
            last_activity=parse_time(server.get("last_activity")),
            gpus=gpus,
            gpu_busy_at=gpu_busy_at,
        )
        limits = policy.resolve(user["name"], user.get("groups") or [])
        verdict = judge(limits, policy.retirement, facts, share, now)
        return ServerView(facts, limits, verdict, sum(h.fraction for h in holders))

    def _add_recent_retirements(
        self, notices: dict[str, list[dict[str, Any]]], running: set[tuple[str, str]], now: float
    ) -> None:
        for entry in self.retirements.recent(500):
            if now - entry.at > RECENTLY_RETIRED:
                break
            if (entry.user, entry.server) in running:
                continue  # started again since: old news
            when = time.strftime("%H:%M", time.localtime(entry.at))
            notices.setdefault(entry.user, []).append(
                {
                    "server": entry.server,
                    "project": entry.project,
                    "reason": entry.reason,
                    "at": entry.at,
                    "message": (
                        f"Project {entry.project} was retired at {when}: {entry.message}. "
                        "Its workspace and image are kept; start it again when you need it."
                    ),
                }
            )

    async def retire(self, view: ServerView) -> None:
        facts = view.facts
        entry = Retirement(
            facts.user,
            facts.server,
            facts.project,
            view.verdict.reason,
            view.verdict.message,
            self.clock(),
        )
        log.warning(
            "Retiring %s/%s (server %r) by policy, %s: %s",
            facts.user,
            facts.project,
            facts.server,
            entry.reason,
            entry.message,
        )
        self.retirements.add(entry)  # first: the spawner reads it to not keep the GPU
        try:
            await self.hub.call("DELETE", server_path(facts.user, facts.server))
        except Exception as e:  # the next check tries again
            log.error("Could not retire %s/%s: %s", facts.user, facts.project, e)
            return
        self._audit(
            "server",
            action="retire",
            user=facts.user,
            server=facts.server,
            project=facts.project,
            reason=entry.reason,
            message=entry.message,
        )

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            interval = 60.0
            try:
                interval = self.policies.current().retirement.check_interval
                await self.check()
            except PolicyError as e:
                log.error("No policy in force, nothing retired: %s", e)
            except Exception:  # one failed check must not end the loop
                log.exception("Retirement check failed; trying again in %ss", interval)
            await asyncio.sleep(interval)
