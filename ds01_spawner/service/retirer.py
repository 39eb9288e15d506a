"""The retirement loop: every `check_interval`, judge each running server by the policy.

Facts come from the hub API (started, last activity, groups), the engine
(which project each container runs; its CPU and network counters, one
`stats` call per container, a few at once, each with a timeout), NVML (GPU
utilization) and the workspace (`.keep-alive`); the decision is
`retirement.judge`, over the user's limits less the exemptions in force. On a
swarm (`ds01-swarm`) the engine is a manager: a server on another node has no
counters here, and its idleness is judged on Jupyter activity (and its GPUs,
where utilization is known) alone, never held off for want of a reading.

Each warning threshold a server crosses goes out once per run of the server:
a line in its workspace's `.ds01-alerts` (`alerts`), a `policy` `warn`
event in the audit trail and a line in the service's log; the hub's banner
(`Notices`) carries the most urgent one at every check while it holds. A
retirement is logged (service log and `RetirementLog`) before the server is
stopped through the hub API, the same way a user's stop goes, so the spawner
retires the container as usual; then `.ds01-alerts` gets a last line. A
workspace file that cannot be written is logged, and nothing else changes.

What the loop remembers of each server between checks (its quiet streak, when
it was last in use, which warnings went out) is `CheckMemory`, in the state
directory, so a restarted service carries on where it was.

Scopes the service needs for this: configure.SERVICE_SCOPES (servers,
list:users, read:users:activity, read:users:groups).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker.errors

from .. import labels
from ..activity import Counters, measures_use, read_counters
from ..alerts import ALERTS, append_alerts, keep_alive_mtime
from ..audit import AuditLog
from ..checkmemory import CheckMemory, Remembered, is_new, keep_alive_time, observe, sent
from ..engine import docker_client
from ..errors import Refusal
from ..exemptions import Exemption, exemptions_for
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
    exempted,
    gpu_share,
    judge,
)
from .hub_api import HubClient, server_path

log = logging.getLogger("ds01.retirer")

RECENTLY_RETIRED = 3600  # the hub's pages mention a retirement this long
STATS_TIMEOUT = 10.0  # seconds one container's stats may take: a stuck one is skipped
WORKSPACE_TIMEOUT = 10.0  # seconds a workspace file may take (a workspace on a hung NFS)
AT_ONCE = 8  # engine stats calls, or workspace reads, in flight at once

Key = tuple[str, str]  # (user, server name)
T = TypeVar("T")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class Container:
    """A running project container, as the engine lists it."""

    id: str
    labels: dict[str, str]


@dataclass
class ServerView:
    """One running server with its user's limits and today's verdict: the limits page's row."""

    facts: ServerFacts
    limits: Limits  # as judged: what the exemptions in force lift is none
    verdict: Verdict
    gpu_equivalents: float = 0.0
    exemptions: list[Exemption] = field(default_factory=list)  # in force for its user


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
        workspace_for: Callable[[str, str], Path] | None = None,
    ) -> None:
        self.hub = hub
        self.policies = policies
        self.allocator = allocator
        self.retirements = RetirementLog(state_dir)
        self.notices = Notices(state_dir)
        self.gpu_samples = GpuSamples(state_dir)  # utilization while held, for the usage page
        self.memory = CheckMemory(state_dir)  # each server's use and warnings, across checks
        self.clock = clock
        self.audit = audit  # retirements, warnings and policy reloads go to the audit trail
        self.workspace_for = workspace_for  # (user, project) -> its workspace on the host
        self.last: Snapshot | None = None
        self._page_snapshot: Snapshot | None = None  # the limits page's own, see latest()
        self._client = docker_client()
        self._stats_client = docker_client(STATS_TIMEOUT)
        self._task: asyncio.Task | None = None

    @property
    def gpu_busy_at(self) -> dict[Key, float]:
        """When a check last saw each server's GPUs in use."""
        return {k: r.gpu_busy_at for k, r in self.memory.servers.items() if r.gpu_busy_at}

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

    async def containers(self) -> dict[Key, Container]:
        found = await asyncio.to_thread(self._client.containers, filters=labels.managed_filter())
        return {
            (c["Labels"].get(labels.USER, ""), c["Labels"].get(labels.SERVER_NAME, "")): Container(
                c["Id"], c["Labels"]
            )
            for c in found
            if c["Labels"].get(labels.ROLE) == "project"
        }

    async def gpu_facts(self) -> tuple[list[GpuSlot], float, dict[Key, list[Holder]]]:
        """GPUs, the share allocated, and who holds what: the sealed ledger, never the
        labels a user's image may have set."""
        ledger = await self.allocator.ledger()
        held: dict[Key, list[Holder]] = {}
        for h in ledger:
            held.setdefault((h.user, h.server), []).append(h)
        try:
            slots = await self.allocator.slots()
        except GpuUnavailable:
            return [], 0.0, held
        return slots, gpu_share(slots, ledger), held

    async def use_counters(self, containers: dict[Key, Container]) -> dict[Key, Counters | None]:
        """Each container's CPU and network counters now (None: no reading in time)."""

        def stats(container: str) -> dict[str, Any]:
            try:  # one sample, without the engine's second one a second later
                return self._stats_client.stats(container, stream=False, one_shot=True)
            except docker.errors.InvalidVersion:  # an engine older than API 1.41
                return self._stats_client.stats(container, stream=False)

        async def one(key: Key, c: Container) -> Counters | None:
            what = f"the CPU and network use of {key[0]}/{key[1]}"
            answer = await _bounded(asyncio.to_thread(stats, c.id), STATS_TIMEOUT, what)
            return None if answer is None else read_counters(answer, c.id, self.clock())

        return await self._each(containers, one)

    async def keep_alives(self, projects: dict[Key, str]) -> dict[Key, float | None]:
        """When each server's workspace `.keep-alive` was touched (None: there is none)."""
        if self.workspace_for is None:
            return {}
        where = self.workspace_for

        async def one(key: Key, project: str) -> float | None:
            reading = asyncio.to_thread(lambda: keep_alive_mtime(where(key[0], project)))
            return await _bounded(reading, WORKSPACE_TIMEOUT, f"{key[0]}/{project}'s .keep-alive")

        return await self._each(projects, one)

    async def _each(
        self, items: dict[Key, T], call: Callable[[Key, T], Awaitable[Any]]
    ) -> dict[Key, Any]:
        """`call` for every item, `AT_ONCE` at a time."""
        slots = asyncio.Semaphore(AT_ONCE)

        async def one(key: Key, item: T) -> Any:
            async with slots:
                return await call(key, item)

        keys = list(items)
        answers = await asyncio.gather(*(one(k, items[k]) for k in keys))
        return dict(zip(keys, answers, strict=True))

    # ------------------------------------------------------------ one check

    async def survey(self, measure: bool = False) -> Snapshot:
        """Every running server with its user's limits and verdict; nothing acted on.

        `measure` (the loop's check): read each container's CPU and network use
        and remember it. Without it (the limits page) nothing is recorded: what
        the loop last measured is used.
        """
        policy = self.policies.current()
        settings = policy.retirement
        now = self.clock()
        users = await self.hub_users()
        containers = await self.containers()
        slots, share, held = await self.gpu_facts()
        busy = {
            s.uuid
            for s in slots
            if s.utilization is not None and s.utilization >= settings.gpu_busy_percent
        }
        snapshot = Snapshot(at=now, share=share, gpus=slots)
        snapshot.holders = [h for holders in held.values() for h in holders]
        running: dict[Key, tuple[dict[str, Any], dict[str, Any]]] = {}
        for user in users:
            snapshot.users[user["name"]] = list(user.get("groups") or [])
            for name, server in (user.get("servers") or {}).items():
                if not server.get("ready") or server.get("pending"):
                    continue  # starting or stopping: not ours to judge now
                running[(user["name"], name)] = (user, server)
        projects = {
            key: _project(containers.get(key), server, key[1])
            for key, (_, server) in running.items()
        }
        counters: dict[Key, Counters | None] = {}
        if measure and measures_use(settings):
            counters = await self.use_counters(
                {k: containers[k] for k in running if k in containers}
            )
        touched = await self.keep_alives(projects) if settings.keep_alive_max is not None else {}
        for key, (user, server) in running.items():
            started = parse_time(server.get("started")) or now
            holders = held.get(key, [])
            gpu_busy = bool(busy.intersection(h.uuid for h in holders))
            remembered = self.memory.get(key, started)
            if measure:
                remembered = observe(
                    remembered or Remembered(started), counters.get(key), gpu_busy, settings, now
                )
            keep_alive_at, seen = keep_alive_time(remembered, touched.get(key), now)
            if measure:
                self.memory.servers[key] = replace(remembered, keep_alive_seen=seen)
            known = remembered or Remembered(started)  # a page view before any check: nothing
            facts = ServerFacts(
                user=key[0],
                server=key[1],
                project=projects[key],
                started=started,
                last_activity=parse_time(server.get("last_activity")),
                gpus=tuple(h.uuid for h in holders),
                gpu_busy_at=now if gpu_busy else known.gpu_busy_at,
                busy_at=known.busy_at,
                # CPU and network count where the engine shows the container; a server
                # it cannot see (on another swarm node) is judged without them
                quiet_checks=(
                    known.quiet_checks if measures_use(settings) and key in containers else None
                ),
                keep_alive_at=keep_alive_at,
            )
            snapshot.servers.append(self._view(policy, user, facts, holders, share, now))
        if measure:
            self.memory.keep_only(running)
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
        snapshot = await self.survey(measure=True)
        now = snapshot.at
        self.gpu_samples.record(snapshot.holders, snapshot.gpus, now)  # for efficiency
        notices: dict[str, list[dict[str, Any]]] = {}
        running = {(v.facts.user, v.facts.server) for v in snapshot.servers}
        for view in snapshot.servers:
            verdict = view.verdict
            if verdict.action == "warn":
                await self.warn(view)
                notices.setdefault(view.facts.user, []).append(
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
                running.discard((view.facts.user, view.facts.server))
        self.memory.keep_only(running)
        try:
            self.memory.save()
        except OSError as e:
            log.error("Could not save what the retirement check remembers: %s", e)
        self._add_recent_retirements(notices, running, now)
        self.notices.write(notices)
        self.last = snapshot
        return snapshot

    def _view(
        self,
        policy: Policy,
        user: dict[str, Any],
        facts: ServerFacts,
        holders: list[Holder],
        share: float,
        now: float,
    ) -> ServerView:
        groups = list(user.get("groups") or [])
        exemptions = exemptions_for(policy.exemptions, facts.user, groups, now)
        limits = exempted(policy.resolve(facts.user, groups), exemptions)
        verdict = judge(limits, policy.retirement, facts, share, now)
        return ServerView(facts, limits, verdict, sum(h.fraction for h in holders), exemptions)

    async def warn(self, view: ServerView) -> None:
        """Send the warnings of this verdict not sent before in this run of the server."""
        f = view.facts
        key = (f.user, f.server)
        remembered = self.memory.servers.get(key) or Remembered(f.started)
        new = [w for w in view.verdict.warnings if is_new(remembered, w)]
        for w in new:
            remembered = sent(remembered, w)
            log.warning("%s/%s %s", f.user, f.project, w.message)
            self._audit(
                "policy",
                action="warn",
                user=f.user,
                server=f.server,
                project=f.project,
                reason=w.reason,
                level=w.level,
                message=w.message,
            )
        self.memory.servers[key] = remembered
        await self.alert(view, [("warning", f"Project {f.project}: {w.message}") for w in new])

    async def alert(self, view: ServerView, alerts: list[tuple[str, str]]) -> None:
        """Append (level, message) lines to the server's workspace `.ds01-alerts`; a file
        that cannot be written is logged, never more (the workspace is the user's)."""
        if not alerts or self.workspace_for is None:
            return
        f, at = view.facts, self.clock()
        where = self.workspace_for

        def write() -> None:
            append_alerts(where(f.user, f.project), alerts, at)

        try:
            await asyncio.wait_for(asyncio.to_thread(write), WORKSPACE_TIMEOUT)
        except Exception as e:
            log.warning("Could not write %s in %s/%s's workspace: %s", ALERTS, f.user, f.project, e)

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
        await self.alert(
            view,
            [
                (
                    "retired",
                    f"Project {facts.project} was retired by policy ({entry.reason}): "
                    f"{entry.message}. Its workspace and image are kept; start it again "
                    "when you need it.",
                )
            ],
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


def _project(container: Container | None, server: dict[str, Any], name: str) -> str:
    """The project a server runs: its container's label, else what it was started with."""
    options = server.get("user_options") or {}
    found = container.labels.get(labels.PROJECT) if container is not None else None
    return found or options.get("project") or name or "default"


async def _bounded(work: Awaitable[T], timeout: float, what: str) -> T | None:
    """`work`'s answer; None (logged) when it fails or takes longer than `timeout`: one
    stuck container or workspace must not stall the check."""
    try:
        return await asyncio.wait_for(work, timeout)
    except asyncio.TimeoutError:
        log.warning("No reading of %s within %ss this check", what, timeout)
    except Exception as e:
        log.warning("No reading of %s this check: %s", what, e)
    return None
