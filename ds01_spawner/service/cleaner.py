"""The image cleaner: every `clean_interval`, remove the images the policy says may go.

Facts come from the engine (images, containers, the disk under its data
root) and the project records; the decision is `cleanup.plan`. Each removal
is an ``image`` event in the audit trail; a project's ``:latest`` that went
leaves a record (`cleanup.CleanedRecords`) so its next start says why it
rebuilds. The first pass runs one interval after the service starts: a hub
restarted on a full disk is not also a burst of removals.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable

import docker
import docker.errors

from .. import labels
from ..audit import AuditLog
from ..builds import BuildRecords
from ..cleanup import (
    PROJECT_TAG,
    CleanedRecords,
    DiskUsage,
    Facts,
    ImageFacts,
    Known,
    Removal,
    plan,
    project_images,
)
from ..engine import docker_client
from ..limits import ImageSettings, PolicyStore
from ..policyfile import PolicyError
from ..projects import Project, ProjectStore
from ..settings import DS01Settings

log = logging.getLogger("ds01.cleaner")

OFF_RECHECK = 3600.0  # with no policy, or the cleaner off, look at the policy again this often

DiskReader = Callable[[docker.APIClient], "DiskUsage | None"]


def engine_disk_usage(client: docker.APIClient) -> DiskUsage | None:
    """The file system of the engine's data root (`docker info`'s DockerRootDir), as this
    host sees it; None for an engine on another machine (no path here to measure)."""
    root = client.info().get("DockerRootDir")
    try:
        usage = shutil.disk_usage(root) if root else None
    except OSError:
        usage = None
    return DiskUsage(usage.total - usage.free, usage.total) if usage else None


def image_facts(summary: dict) -> ImageFacts:
    """An entry of the engine's image list (``GET /images/json``)."""
    tags = tuple(t for t in summary.get("RepoTags") or () if t != "<none>:<none>")
    return ImageFacts(
        id=summary["Id"],
        tags=tags,
        created=float(summary.get("Created") or 0),
        size=int(summary.get("Size") or 0),
        labels=summary.get("Labels") or {},
    )


class Cleaner:
    """One pass (`clean_once`, blocking: run it on a thread) and the loop around it."""

    def __init__(
        self,
        state_dir: str,
        policies: PolicyStore,
        audit: AuditLog,
        *,
        dangling_grace: float = 7200.0,
        disk_usage: DiskReader = engine_disk_usage,
        clock: Callable[[], float] = time.time,
        client: docker.APIClient | None = None,
        image_filters: dict[str, list[str]] | None = None,
        swarm: bool = False,
    ) -> None:
        """`image_filters`: the engine's image list narrowed (a test on a shared engine
        passes its own label); the default is every image, as a lab wants. `swarm`: the
        engine is the manager of a `ds01-swarm` hub, whose projects run as services on
        any node: a project with a service is running too (its image is kept)."""
        self.policies = policies
        self.audit = audit
        self.store = ProjectStore(state_dir)
        self.builds = BuildRecords(state_dir)
        self.cleaned = CleanedRecords(state_dir)
        self.dangling_grace = dangling_grace
        self.disk_usage = disk_usage
        self.clock = clock
        self.client = client or docker_client()
        self.image_filters = image_filters
        self.swarm = swarm
        self._task: asyncio.Task | None = None

    @classmethod
    def for_service(cls, settings: DS01Settings) -> Cleaner:
        """The service's cleaner, over the hub's settings: an untagged layer younger than
        the longest build (`build_time_limit`; a day without one) may be a build's own."""
        return cls(
            settings.state_dir,
            settings.policy_store,
            settings.audit,
            dangling_grace=settings.build_time_limit or 86400.0,
            swarm=bool(settings.swarm_gpu_kind),
        )

    # ------------------------------------------------------------ facts

    def facts(self) -> Facts:
        images = tuple(image_facts(s) for s in self.client.images(filters=self.image_filters))
        containers = self.client.containers(all=True)
        running = {
            (c["Labels"].get(labels.USER, ""), c["Labels"].get(labels.PROJECT, ""))
            for c in containers
            if c.get("State") == "running" and c.get("Labels", {}).get(labels.MANAGED) == "true"
        }
        if self.swarm:
            for service in self.client.services(filters={"label": f"{labels.MANAGED}=true"}):
                lab = (service.get("Spec") or {}).get("Labels") or {}
                running.add((lab.get(labels.USER, ""), lab.get(labels.PROJECT, "")))
        projects, building = {}, set()
        for repo, tags in project_images(images).items():
            entry = next(iter(tags.values()))
            record = self._record(entry.slug, entry.project)
            if record is not None:
                projects[repo] = Known(record.owner, max(record.last_used, record.created))
            status = (self.builds.read(f"{repo}:latest") or {}).get("status")
            if status == "running":
                building.add(repo)
        return Facts(
            images=images,
            used_ids=frozenset(c.get("ImageID", "") for c in containers),
            running=frozenset(running),
            projects=projects,
            building=frozenset(building),
            disk=self.disk_usage(self.client),
            now=self.clock(),
        )

    def _record(self, slug: str, project: str) -> Project | None:
        try:
            return self.store.get(slug, project)
        except ValueError:
            return None

    # ------------------------------------------------------------ one pass

    def settings(self) -> ImageSettings:
        return self.policies.current().images

    def clean_once(self, settings: ImageSettings | None = None) -> list[Removal]:
        """Remove what `cleanup.plan` decides; returns what was removed (and recorded)."""
        settings = settings or self.settings()
        facts = self.facts()
        done = []
        for removal in plan(facts, settings, dangling_grace=self.dangling_grace):
            if removal.tag == "latest" and self._used_since(removal, facts.now):
                continue
            try:
                self.client.remove_image(removal.ref)
            except docker.errors.ImageNotFound:
                continue  # gone meanwhile
            except docker.errors.APIError as e:  # a container or a child image took it
                log.info("Not removing %s: %s", removal.ref, e.explanation or e)
                continue
            done.append(removal)
            self._record_removal(removal)
        if facts.disk is not None:
            log.info(
                "Image disk %.0f%% full; removed %d image(s), %s bytes",
                facts.disk.share * 100,
                len(done),
                sum(r.bytes for r in done),
            )
        return done

    def _used_since(self, removal: Removal, since: float) -> bool:
        """A start since the facts were read: the spawner touches the record first."""
        record = self._record(removal.slug, removal.project)
        return record is not None and record.last_used >= since

    def _record_removal(self, removal: Removal) -> None:
        log.warning(
            "Removed image %s (%s of %s/%s), %s: %d bytes",
            removal.ref,
            removal.image_id[:19],
            removal.user or "?",
            removal.project or "?",
            removal.reason,
            removal.bytes,
        )
        self.audit.emit(
            "image",
            action="remove",
            image=removal.ref,
            user=removal.user or None,
            project=removal.project or None,
            reason=removal.reason,
            bytes=removal.bytes,
            by="cleaner",
        )
        if removal.tag == "latest" and PROJECT_TAG.match(removal.ref):
            self.cleaned.record(removal.slug, removal.project, removal.reason, self.clock())

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                interval = self.settings().clean_interval
            except PolicyError as e:
                log.error("No policy in force, no images cleaned: %s", e)
                interval = None
            await asyncio.sleep(interval or OFF_RECHECK)
            try:
                settings = self.settings()
                if settings.clean_interval is not None:  # `none` turns the cleaner off
                    await asyncio.to_thread(self.clean_once, settings)
            except PolicyError as e:
                log.error("No policy in force, no images cleaned: %s", e)
            except Exception:  # one failed pass must not end the loop
                log.exception("Image cleaning failed; trying again in %ss", interval)
