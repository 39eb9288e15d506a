"""`project launch`, before the container: the project's workspace and image.

The steps of a start that are not JupyterHub's, as functions of plain inputs
(the spawner gathers them and passes an `emit` for its progress events).
Every failure is a `Refusal` that says what the user can do; none leaves
anything half made: a failed build tags nothing, and the previous image and
the workspace stay as they were.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from pathlib import Path

from .builds import ImageBuilder
from .errors import Refusal
from .identity import UserIds
from .images import BuildError, BuildSpec
from .workspaces import (
    init_workspace,
    workspace_path,
)

Emit = Callable[[int, str], None]  # (percent of the build, message)


def open_workspace(
    *,
    template: str,
    root: str,
    slug: str,
    project: str,
    ids: UserIds,
    dockerfile: Callable[[], str],
) -> Path:
    """The project's workspace on the host, made (with its Dockerfile) on first use.

    Refused with a `WorkspaceError` (400) where it is not safe to use, with a
    500 naming the root where the host will not let the hub make it.
    """
    try:
        workspace = workspace_path(template, root=root, user=slug, project=project)
        init_workspace(workspace, ids, root=root, dockerfile_template=dockerfile)
    except (OSError, KeyError) as e:  # a WorkspaceError is a Refusal already
        detail = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) else str(e)
        raise Refusal(
            f"cannot prepare the workspace of {project!r}: {detail}. Ask an admin to check "
            f"that the workspace root {root} is writable by the hub.",
            status=500,
            reason="workspace",
        ) from None
    return workspace


async def build_image(
    builder: ImageBuilder, spec: BuildSpec, emit: Emit, *, mount: str, log: logging.Logger
) -> None:
    """Build `spec` on `builder`, its steps and log sent to `emit` as they come.

    `mount` is where the user finds the Dockerfile to fix; `log` the hub's log.
    """
    last = builder.records.read(spec.image) if builder.records else None
    if last is not None and last.get("status") == "interrupted":
        log.warning(
            "The last build of %s (started %s) was interrupted; building it again",
            spec.image,
            last.get("started", "?"),
        )
        emit(
            0,
            f"The last build of {spec.image} was interrupted (the hub or the image page "
            "stopped during it); nothing was tagged, building it again",
        )
    emit(0, f"Building image {spec.image} (first start of this project)")
    build = builder.build(spec)
    async for event in build.follow():
        if event.phase != "building":  # "building" was said above, with more context
            emit(event.progress or 0, event.message)
    try:
        await build.wait()
    except BuildError as e:
        tail = "\n".join(e.log_tail)
        raise Refusal(
            f"{e}. The previous image and the workspace are unchanged; "
            f"fix the Dockerfile in {mount} and start again.",
            status=500,
            reason="build",
            html=(
                f"<p>{html.escape(str(e))}</p><pre>{html.escape(tail)}</pre>"
                "<p>The previous image and the workspace are unchanged.</p>"
            ),
        ) from None
