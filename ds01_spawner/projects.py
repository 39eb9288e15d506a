"""Projects: names, types, their records, and the requests that name them.

A project is what a researcher works on: a name, a type (which Dockerfile
template it started from), a workspace directory on the host (the only files
that persist; `workspaces.py`) and an image built from the Dockerfile in that
workspace. `DS01Spawner` maps each project to a JupyterHub server.

Everything here is plain Python with plain inputs; the request validator
`parse_user_options` is the one gate every entry point (form, REST) passes.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import Refusal
from .identity import SlugRegistry
from .statefiles import write_json

# JupyterHub's own rules for named servers, so a project name is a server name.
PROJECT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,29}$")
OPTION_KEYS = frozenset({"project", "type", "profile", "gpus", "wait"})
MAX_GPUS_ASKED = 64
MAX_OPTIONS_BYTES = 4096
DOCKERFILE = "Dockerfile"


class InvalidRequest(ValueError):
    """A request a user can fix; the message says how."""


def validate_project_name(name: object) -> str:
    """Return `name` if it is a valid project name, else raise InvalidRequest."""
    if not isinstance(name, str):
        raise InvalidRequest("project name must be a string")
    shown = name if len(name) <= 40 else name[:40] + "..."
    if not PROJECT_NAME.fullmatch(name) or "--" in name or name.endswith("-"):
        raise InvalidRequest(
            f"invalid project name {shown!r}: use 1-30 characters a-z, 0-9 and '-', "
            "starting with a letter, without '--' and not ending in '-'"
        )
    return name


def suggest_project_name(name: str) -> str:
    """A valid project name close to `name` (for servers named before ds01's rules)."""
    folded = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not folded or not folded[0].isalpha():
        folded = f"p-{folded}".rstrip("-")
    return folded[:30].rstrip("-")


def check_server_name(server_name: str) -> None:
    """A named server's name is its project's: refuse (with a valid name) one that cannot be.

    JupyterHub 6 still accepts capitals, '_' or '@' in names of servers made
    before ds01; the message names the server to start instead.
    """
    try:
        validate_project_name(server_name)
    except InvalidRequest as e:
        raise InvalidRequest(
            f"server {server_name[:40]!r} cannot start: a ds01 server's name is its project's "
            f"name, and {str(e).removeprefix('invalid ')}. Start a server named "
            f"{suggest_project_name(server_name)!r} instead (and delete this one); "
            "nothing was created"
        ) from None


# ---------------------------------------------------------------- project types


@dataclass(frozen=True)
class ProjectType:
    """A Dockerfile template a new project starts from (``images/types/<name>``)."""

    name: str
    dockerfile: Path
    description: str

    def template(self) -> str:
        return self.dockerfile.read_text()


def discover_types(
    directory: str | os.PathLike[str], only: list[str] | None = None
) -> dict[str, ProjectType]:
    """Project types under `directory`: every ``<name>/Dockerfile``.

    The first comment line of the Dockerfile is the type's description.
    `only`, when given, keeps those types in that order (the admin's list).
    """
    root = Path(directory)
    found: dict[str, ProjectType] = {}
    if root.is_dir():
        for dockerfile in sorted(root.glob(f"*/{DOCKERFILE}")):
            name = dockerfile.parent.name
            if not PROJECT_NAME.fullmatch(name):
                continue
            description = ""
            for line in dockerfile.read_text().splitlines():
                if line.startswith("#") and not line.startswith("#!"):
                    description = line.lstrip("# ").strip()
                    break
            found[name] = ProjectType(name, dockerfile, description)
    if only:
        missing = [t for t in only if t not in found]
        if missing:
            raise ValueError(f"project types {missing} have no Dockerfile under {root}")
        return {t: found[t] for t in only}
    return found


# ---------------------------------------------------------------- project records


@dataclass
class Project:
    """The hub's record of a project (the workspace holds the files)."""

    owner: str
    name: str
    type: str
    created: float
    last_used: float = 0.0


class ProjectStore:
    """Project records on the hub side, one small JSON file per project.

    Kept outside the workspaces on purpose: a workspace is writable from inside
    the user's container, so nothing the hub relies on lives there. Records lie
    under their owner's slug, but a listing shown to a user is always filtered
    by owner (`list_owned`): a record under your slug that names someone else
    is not yours.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "projects"
        self.slugs = SlugRegistry(Path(state_dir) / "slugs.json", legacy_owners=self.owners_under)

    def slug(self, owner: str) -> str:
        """`owner`'s slug: it names their records, workspaces, images and containers."""
        return self.slugs.slug_for(owner)

    def _dir(self, slug: str) -> Path:
        return self.root / slug

    def list(self, slug: str) -> list[Project]:
        """Every record under `slug`, whoever it names, most recently used first."""
        projects = []
        for path in sorted(self._dir(slug).glob("*.json")):
            try:
                projects.append(Project(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(projects, key=lambda p: (-p.last_used, p.name))

    def list_owned(self, owner: str) -> list[Project]:
        """`owner`'s projects (by hub name), most recently used first."""
        return [p for p in self.list(self.slug(owner)) if p.owner == owner]

    def owners_under(self, slug: str) -> set[str]:
        """Who has records under `slug` (how the slug registry sees existing objects)."""
        return {p.owner for p in self.list(slug)}

    def get(self, slug: str, name: str) -> Project | None:
        path = self._dir(slug) / f"{validate_project_name(name)}.json"
        try:
            return Project(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def get_own(self, owner: str, name: str) -> Project | None:
        """`owner`'s record of project `name`, or None if they have none.

        A record under their slug that names another owner (two users once
        shared a slug, or a forged record) is not theirs: not opened, and not
        created over, since its workspace and image are the other's (409).
        """
        slug = self.slug(owner)
        project = self.get(slug, name)
        if project is not None and project.owner != owner:
            raise Refusal(
                f"project {name!r} cannot be created: under your slug {slug!r} there is "
                "already another user's project of that name (two users share the slug). "
                "Nothing was changed; choose another name, and ask an admin to give the "
                "two users separate slugs.",
                status=409,
                reason="project_clash",
            )
        return project

    def save(self, slug: str, project: Project) -> None:
        directory = self._dir(slug)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / f"{validate_project_name(project.name)}.json"
        write_json(path, asdict(project), indent=1)

    def touch(self, slug: str, project: Project) -> None:
        project.last_used = time.time()
        self.save(slug, project)

    def remove(self, slug: str, name: str) -> bool:
        """Forget project `name` under `slug` (a deleted project); False if there was none."""
        try:
            (self._dir(slug) / f"{validate_project_name(name)}.json").unlink()
        except FileNotFoundError:
            return False
        return True


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class ProjectRequest:
    """A validated ask: start project `name` (of `type`; `new` if it must be created)."""

    name: str
    type: str
    new: bool
    gpus: int = 0
    mig: bool = False  # MIG slices instead of whole GPUs
    wait: bool = False  # no free GPU: wait in the GPU queue instead of being refused

    def user_options(self) -> dict[str, str | int]:
        """The canonical user_options; ``profile`` feeds the admin panel's Profile column."""
        options: dict[str, str | int] = {
            "project": self.name,
            "type": self.type,
            "profile": self.name,
        }
        if self.gpus:
            options["gpus"] = "mig" if self.mig else self.gpus
            if self.wait:
                options["wait"] = True
        return options


_YES, _NO = frozenset({"true", "1", "on", "yes"}), frozenset({"false", "0", "off", "no", ""})


def parse_wait(value: object) -> bool:
    """``wait``: true to queue for a GPU when none is free (JSON true/false, or a form's text)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _YES | _NO:
        return value.strip().lower() in _YES
    raise InvalidRequest("option 'wait' must be true or false")


_GPU_COUNT = re.compile(r"[0-9]{1,3}")  # ASCII only: "²".isdigit() is True, int("²") fails


def parse_gpus(value: object) -> tuple[int, bool]:
    """``gpus``: a whole number of GPUs (0 = CPU only), or ``"mig"`` for one MIG slice.

    A string must be ASCII digits, an int a real one (not a bool, not 2.0), so
    that every refusal is an InvalidRequest and no odd value reaches int().
    """
    if value is None or value == "":
        return 0, False
    if value == "mig":
        return 1, True
    if isinstance(value, str) and _GPU_COUNT.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        got = repr(value[:20]) if isinstance(value, str) else type(value).__name__
    elif not 0 <= value <= MAX_GPUS_ASKED:
        got = "a number out of range"  # not repr(): a 5000-digit int cannot be printed
    else:
        return value, False
    raise InvalidRequest(
        f"gpus must be a whole number from 0 to {MAX_GPUS_ASKED}, or 'mig' (got {got})"
    )


def parse_user_options(
    options: object,
    *,
    server_name: str,
    types: Mapping[str, ProjectType],
    existing: Mapping[str, Project],
    default_type: str,
    fallback_project: str,
    extra_keys: frozenset[str] = frozenset(),
) -> ProjectRequest:
    """Validate user_options (from the form or the REST API) into a ProjectRequest.

    The project comes from ``project`` (or ``profile``, as stored by an earlier
    spawn), else the server name, else `fallback_project`. On a named server
    the project must be the server's name. `extra_keys` are the admin's own
    options (`allowed_user_options`): let through as they are, for their hooks.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidRequest("user_options must be a JSON object")
    try:
        size = len(json.dumps(options))
    except (TypeError, ValueError, RecursionError):
        raise InvalidRequest("user_options must be plain JSON") from None
    if size > MAX_OPTIONS_BYTES:
        raise InvalidRequest(f"user_options too large ({size} bytes, limit {MAX_OPTIONS_BYTES})")
    unknown = sorted(set(options) - OPTION_KEYS - extra_keys)
    if unknown:
        raise InvalidRequest(
            f"unknown option(s) {', '.join(map(repr, unknown))[:200]}; "
            f"allowed: {', '.join(sorted(OPTION_KEYS | extra_keys))[:400]} (an admin adds "
            "their own with c.DS01Spawner.allowed_user_options)"
        )
    if server_name:
        check_server_name(server_name)
    gpus, mig = parse_gpus(options.get("gpus"))
    wait = parse_wait(options.get("wait")) and gpus > 0
    for key in (OPTION_KEYS - {"gpus", "wait"}) & set(options):
        if not isinstance(options[key], str):
            raise InvalidRequest(f"option {key!r} must be a string")

    name = options.get("project") or options.get("profile") or server_name or fallback_project
    name = validate_project_name(name)
    if server_name and name != server_name:
        raise InvalidRequest(
            f"server {server_name!r} runs project {server_name!r}, not {name!r}: "
            "a named server's name is its project"
        )
    profile = options.get("profile")
    if profile and profile != name:
        raise InvalidRequest(f"profile {profile!r} does not match project {name!r}")

    asked_type = options.get("type") or ""
    project = existing.get(name)
    if project is not None:
        if asked_type and asked_type != project.type:
            raise InvalidRequest(
                f"project {name!r} already exists with type {project.type!r}; "
                f"create a new project to use type {asked_type!r}"
            )
        return ProjectRequest(name, project.type, new=False, gpus=gpus, mig=mig, wait=wait)
    project_type = asked_type or default_type
    if project_type not in types:
        raise InvalidRequest(
            f"unknown project type {project_type[:40]!r}; choose one of: {', '.join(types)}"
        )
    return ProjectRequest(name, project_type, new=True, gpus=gpus, mig=mig, wait=wait)


def options_from_form(
    formdata: Mapping[str, list[str]], extra_keys: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Turn the project picker's form into user_options (validated later, once).

    Fields named in `extra_keys` (the admin's own form fields) pass as they are.
    """

    def field(key: str) -> str:
        values = formdata.get(key) or [""]
        return values[0].strip()

    options = {}
    if field("gpus") not in ("", "0"):
        options["gpus"] = field("gpus")
        if field("wait"):
            options["wait"] = field("wait")
    choice = field("project")
    if choice == "__new__" or not choice:
        choice = field("new_project")
        if field("type"):
            options["type"] = field("type")
    if choice:
        options["project"] = choice
    for key in sorted(extra_keys & set(formdata)):
        options[key] = field(key)
    return options
