"""What the image-update page does, without the web: list, edit packages, rebuild, roll back.

Plain async methods over the project records, the workspace Dockerfiles, the
engine and the hub API, and every rule of the page (who may delete, one build
per image at a time, what a package edit may hold); the tornado handlers in
`image_page` only translate requests. Every error a user can cause is a
`Refusal` carrying its HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
from tornado.httpclient import HTTPClientError

from .. import labels
from ..builds import Build
from ..cleanup import CleanedRecords
from ..dockerfile import (
    DockerfileError,
    ManagedPackages,
    add_packages,
    check_package_count,
    package_changes,
    read_managed,
)
from ..dockerfile import remove_packages as drop_packages
from ..engine import docker_client
from ..errors import Refusal
from ..identity import UserIds
from ..images import (
    dockerfile_digest,
    image_ref,
    image_repository,
    project_build_spec,
)
from ..installed import InstalledRecords
from ..packages import (
    PackageError,
    parse_requirements_text,
    validate_apt_package,
    validate_pip_spec,
)
from ..policyfile import PolicyError
from ..projects import (
    DOCKERFILE,
    InvalidRequest,
    Project,
    validate_project_name,
)
from ..settings import DS01Settings
from ..workspaces import (
    WorkspaceError,
    archive_workspace,
    read_workspace_file,
    workspace_path,
    write_new_file,
)
from .hub_api import HubClient, server_path, user_path

# The page's actions and the fields each takes (a form posts the same names).
ACTION_FIELDS: dict[str, frozenset[str]] = {
    "packages": frozenset(
        {"add_pip", "add_apt", "requirements", "remove_pip", "remove_apt", "rebuild"}
    ),
    "rebuild": frozenset({"nocache"}),
    "rollback": frozenset(),
    "restart": frozenset(),
    "delete": frozenset({"confirm"}),
}


def is_set(value: Any) -> bool:
    """A form's checkbox ("on", "1") or a JSON true."""
    return value in (True, "1", "on", "true")


def package_lines(value: Any) -> list[str]:
    """A list from JSON, or the lines of a form textarea."""
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    raise Refusal("package lists must be lists of strings")


def package_edit(args: Mapping[str, Any]) -> dict[str, Any]:
    """A package edit as a form or a JSON body gives it, as `update_packages` takes it."""
    requirements = args.get("requirements") or ""
    if not isinstance(requirements, str):
        raise Refusal("requirements must be text")
    return {
        "add_pip": package_lines(args.get("add_pip")),
        "add_apt": package_lines(args.get("add_apt")),
        "requirements": requirements,
        "remove_pip": package_lines(args.get("remove_pip")),
        "remove_apt": package_lines(args.get("remove_apt")),
    }


def disk_use(described: Sequence[Mapping[str, Any]]) -> int:
    """The bytes the images of `describe`d projects take (:latest and :previous; layers
    shared between images are counted in each)."""
    return sum((p.get("size") or 0) + (p.get("previous_size") or 0) for p in described)


class ImageManager:
    """The image page's work for every user, over the hub's settings (`DS01Settings`):
    its workspaces, state directory, build settings and build pool."""

    def __init__(
        self, settings: DS01Settings, hub: HubClient, *, allow_url_packages: bool = False
    ) -> None:
        self.settings = settings
        self.allow_url_packages = allow_url_packages
        self.builder = settings.builder
        self.hub = hub
        self.store = settings.store
        self.installed = InstalledRecords(settings.state_dir)
        self.cleaned = CleanedRecords(settings.state_dir)
        self.client = docker_client()
        self._edit_locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def _docker(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.client, method), *args, **kwargs)

    # ---------------------------------------------------------------- reading

    def project(self, owner: str, name: str) -> Project:
        try:
            validate_project_name(name)
        except InvalidRequest as e:
            raise Refusal(str(e), status=404) from None
        project = self.store.get(self.store.slug(owner), name)
        if project is None or project.owner != owner:
            raise Refusal(f"{owner} has no project {name!r}", status=404)
        return project

    def owners(self) -> list[str]:
        owners = set()
        for directory in sorted(self.store.root.glob("*")):
            for project in self.store.list(directory.name):
                owners.add(project.owner)
        return sorted(owners)

    def _workspace(self, project: Project) -> Path:
        try:
            return workspace_path(
                self.settings.workspace_template,
                root=self.settings.workspace_root,
                user=self.store.slug(project.owner),
                project=project.name,
            )
        except WorkspaceError as e:
            raise Refusal(str(e), status=409) from None  # a record the config no longer fits

    def dockerfile(self, project: Project) -> str:
        """The project's Dockerfile (a WorkspaceError, 409, if it cannot be read safely)."""
        return read_workspace_file(
            self._workspace(project) / DOCKERFILE, self.settings.max_dockerfile_bytes
        )

    async def describe(self, project: Project) -> dict[str, Any]:
        """Everything the page shows about one project's image."""
        slug = self.store.slug(project.owner)
        latest = await self._inspect(image_ref(slug, project.name))
        previous = await self._inspect(image_ref(slug, project.name, "previous"))
        try:
            dockerfile = self.dockerfile(project)
            packages: ManagedPackages | None = read_managed(dockerfile)
            problem = None
        except (Refusal, DockerfileError) as e:
            dockerfile, packages, problem = None, None, str(e)
        built_from = (latest or {}).get("Config", {}).get("Labels", {}) or {}
        running = await self.running(project, latest)
        return {
            "owner": project.owner,
            "project": project.name,
            "type": project.type,
            "image": image_ref(slug, project.name),
            "built": bool(latest),
            "built_at": (latest or {}).get("Created", "")[:19].replace("T", " "),
            "size": (latest or {}).get("Size"),
            # the rollback image takes space too, unless it is the same image
            "previous_size": (previous or {}).get("Size")
            if previous and previous["Id"] != (latest or {}).get("Id")
            else None,
            "image_id": (latest or {}).get("Id"),
            "previous_id": (previous or {}).get("Id"),
            "dockerfile_changed": bool(latest)
            and dockerfile is not None
            and built_from.get(labels.DOCKERFILE_SHA256) != dockerfile_digest(dockerfile),
            "packages": {"pip": list(packages.pip), "apt": list(packages.apt)}
            if packages
            else None,
            "problem": problem,
            "running": running,
            "build": self.build_status(project),
            # pip-installed in the last container and lost at its retire
            "installed_last_session": self.installed.last_session(slug, project.name),
            # the image cleaner removed :latest (the next start rebuilds it)
            "cleaned": None if latest else self.cleaned.read(slug, project.name),
        }

    async def running(self, project: Project, latest: dict | None) -> list[dict[str, Any]]:
        """The project's running servers, each `outdated` if not on the `latest` image.

        One engine: its containers. A swarm (`ds01-swarm`): its services, on any
        node, which run a build pushed to the registry by digest: outdated unless
        that digest is the latest image's.
        """
        wanted = {"label": [f"{labels.USER}={project.owner}", f"{labels.PROJECT}={project.name}"]}
        if self.settings.swarm_gpu_kind:
            pushed = set((latest or {}).get("RepoDigests") or [])
            return [
                {
                    "server": spec["Labels"].get(labels.SERVER_NAME, ""),
                    "container": spec["Name"],
                    "outdated": bool(latest)
                    and spec["TaskTemplate"]["ContainerSpec"]["Image"] not in pushed,
                }
                for spec in (s["Spec"] for s in await self._docker("services", filters=wanted))
                if spec.get("Labels", {}).get(labels.ROLE) == "project"
            ]
        return [
            {
                "server": c["Labels"].get(labels.SERVER_NAME, ""),
                "container": c["Names"][0].lstrip("/"),
                "outdated": bool(latest) and c["ImageID"] != latest["Id"],
            }
            for c in await self._docker("containers", filters=wanted)
        ]

    async def _inspect(self, ref: str) -> dict | None:
        try:
            return await self._docker("inspect_image", ref)
        except docker.errors.ImageNotFound:
            return None

    def build_status(self, project: Project) -> dict | None:
        ref = image_ref(self.store.slug(project.owner), project.name)
        running = self.current_build(project)
        if running is not None and not running.done.is_set():
            return {"status": "running", "image": ref}
        return self.builder.records.read(ref) if self.builder.records else None

    # ---------------------------------------------------------------- changing

    async def act(
        self,
        project: Project,
        action: str,
        args: Mapping[str, Any],
        *,
        by_admin: bool,
        by: str = "",
    ) -> dict[str, Any]:
        """One of the page's actions (`ACTION_FIELDS`), its arguments as a form or a JSON
        body gave them; the result's "message" is what the page says it did. `by`: who
        asks (the hub user), for the audit trail."""
        if action == "packages":
            packages = await self.update_packages(project, **package_edit(args), by=by)
            result = {
                "message": "Packages updated: rebuild to use them.",
                "packages": {"pip": list(packages.pip), "apt": list(packages.apt)},
            }
            if is_set(args.get("rebuild")):
                self.rebuild_unless_building(project)
                result["message"] = "Packages added; the image is being rebuilt."
            return result
        if action == "rebuild":
            build, started = self.rebuild_unless_building(
                project, nocache=is_set(args.get("nocache"))
            )
            message = "Rebuild started." if started else "A build of this image is already running."
            return {"message": message, "image": build.spec.image}
        if action == "rollback":
            ids = await self.rollback(project)
            return {"message": "Rolled back: the previous image is :latest again.", **ids}
        if action == "restart":
            servers = await self.restart(project)
            return {"message": "Restarting on the new image.", "servers": servers}
        if action == "delete":
            return await self.delete(project, by_admin=by_admin, by=by, confirm=args.get("confirm"))
        raise Refusal(f"unknown action {action!r}", status=404)

    async def update_packages(
        self,
        project: Project,
        *,
        add_pip: Sequence[str] = (),
        add_apt: Sequence[str] = (),
        requirements: str = "",
        remove_pip: Sequence[str] = (),
        remove_apt: Sequence[str] = (),
        by: str = "",
    ) -> ManagedPackages:
        """Validate every input first, then rewrite the Dockerfile's managed sections once.

        Parsing a request body of up to 256 KB is CPU work on user input, so it
        runs on a thread, never on the event loop every page shares. One lock
        per project keeps two edits of one Dockerfile from interleaving.
        """
        lock = self._edit_locks.setdefault((project.owner, project.name), asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(
                self._update_packages,
                project,
                add_pip=add_pip,
                add_apt=add_apt,
                requirements=requirements,
                remove_pip=remove_pip,
                remove_apt=remove_apt,
                by=by,
            )

    def _update_packages(
        self,
        project: Project,
        *,
        add_pip: Sequence[str],
        add_apt: Sequence[str],
        requirements: str,
        remove_pip: Sequence[str],
        remove_apt: Sequence[str],
        by: str = "",
    ) -> ManagedPackages:
        allow = self.allow_url_packages
        try:
            check_package_count(len(add_pip) + len(add_apt), "packages named")
            pip = [validate_pip_spec(s, allow_urls=allow) for s in add_pip if s.strip()]
            pip += parse_requirements_text(requirements, allow_urls=allow) if requirements else []
            apt = [validate_apt_package(s) for s in add_apt if s.strip()]
            text = self.dockerfile(project)
            edited = text
            if remove_pip or remove_apt:
                edited = drop_packages(edited, pip=remove_pip, apt=remove_apt)
            if pip or apt:
                edited = add_packages(edited, pip=pip, apt=apt, allow_urls=allow)
        except (PackageError, DockerfileError) as e:
            raise Refusal(str(e), status=400) from None
        if edited != text:
            self._write_dockerfile(project, edited)
            added, removed = package_changes(read_managed(text), read_managed(edited))
            self.settings.audit.emit(
                "packages",
                user=project.owner,
                project=project.name,
                added=added,
                removed=removed,
                by=by or None,
            )
        if pip:  # what is in the image now need not be offered again
            self.installed.forget(self.store.slug(project.owner), project.name, pip)
        return read_managed(edited)

    def _write_dockerfile(self, project: Project, text: str) -> None:
        """Replace the workspace Dockerfile without following links, owned by the workspace owner.

        The workspace is writable from the user's container, so the hub-side
        process never opens an existing path for writing: it writes a new file
        and renames it over the old name (a link there is replaced, not followed).
        """
        workspace = self._workspace(project)
        st = os.lstat(workspace)
        if not stat.S_ISDIR(st.st_mode):
            raise Refusal(f"workspace {workspace} is not a directory", status=409)
        try:
            owner = UserIds(st.st_uid, st.st_gid, "workspace owner")
        except ValueError:
            raise Refusal(f"workspace {workspace} is owned by root", status=409) from None
        tmp = workspace / f".{DOCKERFILE}.ds01-{secrets.token_hex(6)}"
        write_new_file(tmp, text, owner)
        os.replace(tmp, workspace / DOCKERFILE)

    def rebuild_unless_building(
        self, project: Project, *, nocache: bool = False
    ) -> tuple[Build, bool]:
        """The build of the project's image already running, else a new one (True).

        One build of an image at a time: a second request follows the first
        build's log, and its Dockerfile is not read again meanwhile.
        """
        build = self.current_build(project)
        if build is not None and not build.done.is_set():
            return build, False
        spec = project_build_spec(
            self.settings.build_settings,  # the hub's builds, the same way
            owner=project.owner,
            slug=self.store.slug(project.owner),
            project=project.name,
            project_type=project.type,
            dockerfile=self.dockerfile(project),
            nocache=nocache,
        )
        return self.builder.build(spec), True

    def current_build(self, project: Project) -> Build | None:
        """The project's build this service holds, running or just done; None if none."""
        ref = image_ref(self.store.slug(project.owner), project.name)
        return next((b for b in self.builder.running() if b.spec.image == ref), None)

    async def rollback(self, project: Project) -> dict[str, str]:
        """Swap :latest and :previous (a second rollback undoes the first)."""
        slug = self.store.slug(project.owner)
        repo = image_repository(slug, project.name)
        latest = await self._inspect(f"{repo}:latest")
        previous = await self._inspect(f"{repo}:previous")
        if previous is None:
            raise Refusal("there is no previous image to roll back to", status=409)
        await self._docker("tag", previous["Id"], repo, "latest")
        if latest is not None:
            await self._docker("tag", latest["Id"], repo, "previous")
        return {"latest": previous["Id"], "previous": (latest or {}).get("Id", "")}

    async def delete(
        self, project: Project, *, by_admin: bool, by: str = "", confirm: Any = None
    ) -> dict[str, Any]:
        """Delete a project, for its owner or an admin, never while a server runs it or its
        image builds: its images and its record go; its workspace is kept, or archived
        (moved under ``{workspace_root}/.archive/``) by the policy's `workspace_on_delete`,
        never deleted. `confirm` must be the project's name. `by`: who asks."""
        if not by_admin and by != project.owner:
            raise Refusal("only the project's owner or an admin deletes a project", status=403)
        await self._check_stopped(project)
        if confirm != project.name:
            raise Refusal(
                f"type the project's name ({project.name}) to confirm deleting it", status=400
            )
        keep = self.workspace_on_delete() == "keep"
        slug = self.store.slug(project.owner)
        repo = image_repository(slug, project.name)
        removed = []
        for tag in ("latest", "previous"):
            ref = f"{repo}:{tag}"
            info = await self._inspect(ref)
            try:
                if info is not None:
                    await self._docker("remove_image", ref)
            except docker.errors.ImageNotFound:
                continue
            except docker.errors.APIError as e:
                raise Refusal(
                    f"the image {ref} cannot be removed ({e.explanation or e}); nothing else "
                    "was changed, try again when it is free",
                    status=409,
                ) from None
            if info is not None:
                removed.append(ref)
                self.settings.audit.emit(
                    "image",
                    action="remove",
                    user=project.owner,
                    project=project.name,
                    image=ref,
                    reason="project_deleted",
                    bytes=info.get("Size"),
                    by=by or None,
                )
        workspace = self._workspace(project)
        if not keep:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            workspace = archive_workspace(
                workspace,
                root=self.settings.workspace_root,
                slug=slug,
                project=project.name,
                stamp=stamp,
            )
        self.store.remove(slug, project.name)
        self.cleaned.forget(slug, project.name)
        await self._forget_server(project)
        kept = "kept" if keep else "archived"
        return {
            "deleted": project.name,
            "images": removed,
            "workspace": kept if workspace else "none",
            "workspace_path": str(workspace or ""),
            "message": f"Project {project.name} deleted: its images are gone"
            + (f"; its workspace is {kept}." if workspace else "."),
        }

    def workspace_on_delete(self) -> str:
        """What deleting a project does with its workspace: the policy's "keep" or "archive"
        (with no policy in force: keep)."""
        try:
            return self.settings.policy_store.current().images.workspace_on_delete
        except PolicyError:
            return "keep"

    async def _check_stopped(self, project: Project) -> None:
        """409 while the project runs or starts (the hub's view), or its image builds."""
        try:
            model = await self.hub.call("GET", user_path(project.owner))
        except HTTPClientError as e:
            if e.code != 404:  # 404: a user the hub no longer has runs nothing
                raise Refusal(f"the hub did not say whether it runs: {e}", status=502) from None
            model = {}
        for name, server in ((model or {}).get("servers") or {}).items():
            options = server.get("user_options") or {}
            if project.name in (name, options.get("project")) and (
                server.get("ready") or server.get("pending")
            ):
                raise Refusal("stop the project's server before deleting the project", status=409)
        if (await self.describe(project))["running"]:
            raise Refusal("stop the project's server before deleting the project", status=409)
        if (self.build_status(project) or {}).get("status") == "running":
            raise Refusal("the project's image is being built; delete it afterwards", status=409)

    async def _forget_server(self, project: Project) -> None:
        """The hub's stopped named server of the project goes too (best effort)."""
        # no such named server (a project of the default server), or no hub: nothing to do
        with contextlib.suppress(HTTPClientError, Refusal):
            await self.hub.call(
                "DELETE", server_path(project.owner, project.name), {"remove": True}
            )

    async def restart(self, project: Project) -> list[str]:
        """Retire the project's running server(s) and start them again on the new image."""
        info = await self.describe(project)
        if not info["running"]:
            raise Refusal("no server of this project is running", status=409)
        user = project.owner
        model = await self.hub.call("GET", user_path(user))
        restarted = []
        for entry in info["running"]:
            server = entry["server"]
            options = (model["servers"].get(server) or {}).get("user_options") or {}
            try:
                await self.hub.stop_server(user, server)
                await self.hub.call("POST", server_path(user, server), {"user_options": options})
            except HTTPClientError as e:
                raise Refusal(
                    f"the hub refused to restart {server or 'default'}: {e}", status=502
                ) from None
            restarted.append(server)
        return restarted
