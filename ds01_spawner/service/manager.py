"""What the image-update page does, without the web: list, edit packages, rebuild, roll back.

Plain async methods over the project records, the workspace Dockerfiles, the
engine and the hub API; the tornado handlers only translate requests. Every
error a user can cause is a `ProjectError` with an HTTP status and a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker
import docker.errors
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .. import labels
from ..dockerfile import (
    DockerfileError,
    ManagedPackages,
    add_packages,
    check_package_count,
    read_managed,
)
from ..dockerfile import remove_packages as drop_packages
from ..identity import UserIds
from ..images import (
    Build,
    BuildSettings,
    ImageBuilder,
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
from ..projects import (
    DOCKERFILE,
    InvalidRequest,
    Project,
    ProjectStore,
    WorkspaceError,
    read_workspace_file,
    validate_project_name,
    workspace_path,
    write_new_file,
)


class ProjectError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Settings:
    """What the image page needs: the hub's DS01Spawner settings (service/app.py builds it
    from `spawner_settings`), and the service's own allow_url_packages."""

    workspace_root: str
    workspace_template: str
    state_dir: str
    build: BuildSettings = field(default_factory=BuildSettings)
    max_dockerfile_bytes: int = 256 * 1024
    allow_url_packages: bool = False


def user_path(user: str) -> str:
    """The hub API path of `user`, the name quoted whole.

    A username may hold '#', '?' or '/' (``bob#x``): unquoted, the hub would
    read a shorter path, or another resource's.
    """
    return f"users/{quote(user, safe='')}"


def server_path(user: str, server: str) -> str:
    """The hub API path of one of `user`'s servers; ``""`` is the default server.

    Apart from `user_path` so that no missing server name can turn a DELETE of
    a server into a DELETE of the user.
    """
    if not server:
        return f"{user_path(user)}/server"
    return f"{user_path(user)}/servers/{quote(server, safe='')}"


class HubClient:
    """The hub API calls the service makes, with its own token (see configure.py's roles)."""

    def __init__(self, api_url: str, token: str) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        request = HTTPRequest(
            f"{self.api_url}/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}", **(headers or {})},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            request_timeout=60,
        )
        response = await AsyncHTTPClient().fetch(request)
        return json.loads(response.body) if response.body else None


class ImageManager:
    def __init__(self, settings: Settings, builder: ImageBuilder, hub: HubClient | None) -> None:
        self.settings = settings
        self.builder = builder
        self.hub = hub
        self.store = ProjectStore(settings.state_dir)
        self.installed = InstalledRecords(settings.state_dir)
        self.client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
        self._edit_locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def _docker(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.client, method), *args, **kwargs)

    # ---------------------------------------------------------------- reading

    def project(self, owner: str, name: str) -> Project:
        try:
            validate_project_name(name)
        except InvalidRequest as e:
            raise ProjectError(404, str(e)) from None
        project = self.store.get(self.store.slug(owner), name)
        if project is None or project.owner != owner:
            raise ProjectError(404, f"{owner} has no project {name!r}")
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
            raise ProjectError(409, str(e)) from None

    def dockerfile(self, project: Project) -> str:
        try:
            return read_workspace_file(
                self._workspace(project) / DOCKERFILE, self.settings.max_dockerfile_bytes
            )
        except WorkspaceError as e:
            raise ProjectError(409, str(e)) from None

    async def describe(self, project: Project) -> dict[str, Any]:
        """Everything the page shows about one project's image."""
        slug = self.store.slug(project.owner)
        latest = await self._inspect(image_ref(slug, project.name))
        previous = await self._inspect(image_ref(slug, project.name, "previous"))
        try:
            dockerfile = self.dockerfile(project)
            packages: ManagedPackages | None = read_managed(dockerfile)
            problem = None
        except (ProjectError, DockerfileError) as e:
            dockerfile, packages, problem = None, None, str(e)
        built_from = (latest or {}).get("Config", {}).get("Labels", {}) or {}
        running = []
        for c in await self._docker(
            "containers",
            filters={
                "label": [f"{labels.USER}={project.owner}", f"{labels.PROJECT}={project.name}"]
            },
        ):
            running.append(
                {
                    "server": c["Labels"].get(labels.SERVER_NAME, ""),
                    "container": c["Names"][0].lstrip("/"),
                    "outdated": bool(latest) and c["ImageID"] != latest["Id"],
                }
            )
        return {
            "owner": project.owner,
            "project": project.name,
            "type": project.type,
            "image": image_ref(slug, project.name),
            "built": bool(latest),
            "built_at": (latest or {}).get("Created", "")[:19].replace("T", " "),
            "size": (latest or {}).get("Size"),
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
        }

    async def _inspect(self, ref: str) -> dict | None:
        try:
            return await self._docker("inspect_image", ref)
        except docker.errors.ImageNotFound:
            return None

    def build_status(self, project: Project) -> dict | None:
        ref = image_ref(self.store.slug(project.owner), project.name)
        running = next((b for b in self.builder.running() if b.spec.image == ref), None)
        if running is not None and not running.done.is_set():
            return {"status": "running", "image": ref}
        return self.builder.records.read(ref) if self.builder.records else None

    # ---------------------------------------------------------------- changing

    async def update_packages(
        self,
        project: Project,
        *,
        add_pip: Sequence[str] = (),
        add_apt: Sequence[str] = (),
        requirements: str = "",
        remove_pip: Sequence[str] = (),
        remove_apt: Sequence[str] = (),
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
    ) -> ManagedPackages:
        allow = self.settings.allow_url_packages
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
            raise ProjectError(400, str(e)) from None
        if edited != text:
            self._write_dockerfile(project, edited)
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
            raise ProjectError(409, f"workspace {workspace} is not a directory")
        try:
            owner = UserIds(st.st_uid, st.st_gid, "workspace owner")
        except ValueError:
            raise ProjectError(409, f"workspace {workspace} is owned by root") from None
        tmp = workspace / f".{DOCKERFILE}.ds01-{secrets.token_hex(6)}"
        write_new_file(tmp, text, owner)
        os.replace(tmp, workspace / DOCKERFILE)

    def rebuild(self, project: Project, *, nocache: bool = False) -> Build:
        return self.builder.build(
            project_build_spec(
                self.settings.build,
                owner=project.owner,
                slug=self.store.slug(project.owner),
                project=project.name,
                project_type=project.type,
                dockerfile=self.dockerfile(project),
                nocache=nocache,
            )
        )

    def current_build(self, project: Project) -> Build | None:
        ref = image_ref(self.store.slug(project.owner), project.name)
        return next((b for b in self.builder.running() if b.spec.image == ref), None)

    async def rollback(self, project: Project) -> dict[str, str]:
        """Swap :latest and :previous (a second rollback undoes the first)."""
        slug = self.store.slug(project.owner)
        repo = image_repository(slug, project.name)
        latest = await self._inspect(f"{repo}:latest")
        previous = await self._inspect(f"{repo}:previous")
        if previous is None:
            raise ProjectError(409, "there is no previous image to roll back to")
        await self._docker("tag", previous["Id"], repo, "latest")
        if latest is not None:
            await self._docker("tag", latest["Id"], repo, "previous")
        return {"latest": previous["Id"], "previous": (latest or {}).get("Id", "")}

    async def delete(self, project: Project) -> None:
        """Remove the project's images (not its workspace); refused while a server runs it."""
        if any(r for r in (await self.describe(project))["running"]):
            raise ProjectError(409, "stop the project's server before deleting its image")
        repo = image_repository(self.store.slug(project.owner), project.name)
        for tag in ("latest", "previous"):
            with contextlib.suppress(docker.errors.ImageNotFound):
                await self._docker("remove_image", f"{repo}:{tag}")

    async def restart(self, project: Project) -> list[str]:
        """Retire the project's running server(s) and start them again on the new image."""
        if self.hub is None:
            raise ProjectError(503, "the service has no hub API token")
        info = await self.describe(project)
        if not info["running"]:
            raise ProjectError(409, "no server of this project is running")
        user = project.owner
        model = await self.hub.call("GET", user_path(user))
        restarted = []
        for entry in info["running"]:
            server = entry["server"]
            path = server_path(user, server)
            options = (model["servers"].get(server) or {}).get("user_options") or {}
            try:
                await self.hub.call("DELETE", path)
                for _ in range(120):
                    model = await self.hub.call("GET", user_path(user))
                    if server not in model["servers"]:
                        break
                    await asyncio.sleep(0.5)
                await self.hub.call("POST", path, {"user_options": options})
            except HTTPClientError as e:
                raise ProjectError(
                    502, f"the hub refused to restart {server or 'default'}: {e}"
                ) from None
            restarted.append(server)
        return restarted
