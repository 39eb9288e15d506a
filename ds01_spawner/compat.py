"""DockerSpawner settings ds01 cannot honour, refused with a reason an admin can act on.

A lab moving from DockerSpawner keeps its config; where a setting would
break the ds01 model, it is refused, never silently ignored: when the hub
reads its config (`config_problems`, used by configure(c): the hub does not
start) and when a spawner is made (DS01Spawner's trait validators). The rest
of DockerSpawner's settings work as they do there (see docs/configuration.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .projects import OPTION_KEYS

# user_options keys an admin may not claim: ds01's own, and DockerSpawner's image choice
RESERVED_OPTIONS = OPTION_KEYS | {"image"}


def remove_problem(remove: Any) -> str | None:
    """`remove=False` (DockerSpawner's old default): why ds01 refuses it."""
    if remove:
        return None
    return (
        "remove=False cannot apply: DS01Spawner retires a server's container when it "
        "stops (removes it; the workspace and the image stay). A kept container would "
        "restart on its old image and still look like it holds its GPU. Drop "
        "remove=False from your config (c.DockerSpawner.remove / c.DS01Spawner.remove); "
        "files to keep belong in the workspace."
    )


def allowed_options_problem(keys: Iterable[str]) -> str | None:
    """`allowed_user_options` naming a key ds01 sets itself."""
    claimed = sorted(RESERVED_OPTIONS & set(keys))
    if not claimed:
        return None
    return (
        f"allowed_user_options may not name {', '.join(claimed)}: ds01 sets those itself "
        "(a project's image is its own, never chosen by an option)"
    )


def config_problems(c: Any) -> list[str]:
    """What in a hub config (``c``) DS01Spawner would refuse, in words."""
    problems = []
    for section in ("DockerSpawner", "DS01Spawner"):
        values = c.get(section) or {}
        if "remove" in values:
            problems.append(remove_problem(values["remove"]))
        if "allowed_user_options" in values:
            problems.append(allowed_options_problem(values["allowed_user_options"]))
    return [p for p in problems if p]
