"""Workspaces: a project's files on the host, the only files that persist.

Made before the container starts (Docker would make a missing bind-mount
source as root), owned by the user, never followed through a link or read
without a bound: the user controls everything in a workspace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import Refusal
from .identity import UserIds
from .projects import DOCKERFILE, validate_project_name


class WorkspaceError(Refusal):
    """A workspace that cannot be used safely; nothing was changed.

    A 400 for the workspace itself (outside the root, not a plain directory,
    another uid's); a 409 for a file in it that cannot be read (the user's
    Dockerfile gone, a link, too large): the same status from a spawn and from
    the image page.
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message, status=status, reason="workspace")


def workspace_path(template: str, *, root: str, user: str, project: str) -> Path:
    """The host directory of a project's workspace, guaranteed to lie under `root`."""
    validate_project_name(project)
    path = Path(os.path.abspath(template.format(workspace_root=root, user=user, project=project)))
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real_root == real or real_root not in real.parents:
        raise WorkspaceError(f"workspace {path} is outside the workspace root {root}")
    return path


def prepare_workspace(path: Path, ids: UserIds, *, root: str) -> bool:
    """Make sure `path` exists and belongs to `ids`; return True if it was created.

    Created before the container starts, because Docker would create a missing
    bind-mount source owned by root. An existing workspace owned by someone
    else is refused, never chowned.
    """
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise WorkspaceError(f"workspace {path} is not a plain directory")
        if st.st_uid != ids.uid:
            raise WorkspaceError(
                f"workspace {path} is owned by uid {st.st_uid}, not by you (uid {ids.uid}); "
                "ask an admin to fix its ownership"
            )
        return False
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o755)
    if os.path.islink(parent):
        raise WorkspaceError(f"workspace parent {parent} is a symbolic link")
    path.mkdir(mode=0o750)
    os.chown(path, ids.uid, ids.gid)
    return True


ARCHIVE = ".archive"  # under the root; no slug or project name starts with a dot


def archive_workspace(path: Path, *, root: str, slug: str, project: str, stamp: str) -> Path | None:
    """Move a deleted project's workspace to ``{root}/.archive/{slug}/{project}-{stamp}``,
    never deleting anything; None when there was no workspace to move.

    A rename within the root: the files keep their owner, and a link in the
    workspace's place is moved as a link, never followed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise WorkspaceError(f"workspace {path} is not a plain directory; nothing was moved")
    shelf = Path(root) / ARCHIVE / slug
    shelf.mkdir(parents=True, exist_ok=True, mode=0o700)
    if any(p.is_symlink() for p in (shelf.parent, shelf)):
        raise WorkspaceError(f"the archive {shelf} is a symbolic link; nothing was moved")
    target = shelf / f"{validate_project_name(project)}-{stamp}"
    n = 1
    while os.path.lexists(target):
        n += 1
        target = shelf / f"{project}-{stamp}-{n}"
    os.rename(path, target)
    return target


def write_new_file(path: Path, text: str, ids: UserIds) -> None:
    """Create `path` (never following or replacing anything there) owned by `ids`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fchown(fd, ids.uid, ids.gid)
    finally:
        os.close(fd)


def read_workspace_file(path: Path, max_bytes: int) -> str:
    """Read a file the user controls without following links or reading unbounded data."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise WorkspaceError(
            f"{path.name} is missing from the workspace {path.parent}", status=409
        ) from None
    except OSError as e:
        raise WorkspaceError(
            f"cannot read {path.name} in the workspace: {e.strerror}", status=409
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WorkspaceError(f"{path.name} in the workspace is not a regular file", status=409)
        data = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise WorkspaceError(f"{path.name} is larger than {max_bytes} bytes", status=409)
    return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- files the service keeps there
# The workspace is writable from the user's container: everything below works
# through a descriptor of the workspace directory itself (opened without
# following a link), never follows a link inside it, opens nothing but a
# regular file, reads a bounded tail, and replaces a file by renaming a new
# one over it (a link, FIFO or file there is replaced, never written through).


def open_workspace_dir(path: Path) -> int:
    """A descriptor of the workspace directory; OSError if it is missing or a link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def regular_file_mtime(dir_fd: int, name: str) -> float | None:
    """The mtime of `name` in the directory if it is a regular file (a link is not
    followed); None if it is missing or anything else."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return st.st_mtime if stat.S_ISREG(st.st_mode) else None


def read_tail(dir_fd: int, name: str, max_bytes: int, *, owner: int) -> bytes:
    """At most the last `max_bytes` of `name` in the directory: b"" unless it is a regular
    file of `owner`'s with one link (never a link, a FIFO, a device, another's hard link)."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode):
            return b""
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return b""
    try:
        st = os.fstat(fd)
        same = (st.st_dev, st.st_ino) == (before.st_dev, before.st_ino)
        if not (same and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == owner):
            return b""
        start = max(0, st.st_size - max_bytes)
        return os.pread(fd, max_bytes, start)
    except OSError:
        return b""
    finally:
        os.close(fd)


def replace_file(dir_fd: int, name: str, data: bytes, *, uid: int, gid: int) -> None:
    """Replace `name` in the directory with a new file of `data`, owned by uid:gid, mode
    0644: written under a temporary name there and renamed over whatever `name` was
    (readers see the old file or the new one). OSError if it cannot be; a directory
    at `name` stays."""
    tmp = f".{name}.ds01-{secrets.token_hex(6)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)


def init_workspace(
    workspace: Path, ids: UserIds, *, root: str, dockerfile_template: Callable[[], str]
) -> None:
    """`project init` on the host: the workspace, owned by `ids`, with a Dockerfile.

    The Dockerfile comes from the project type's template when the workspace is
    new or has none (a user who deleted theirs gets the template back).
    """
    created = prepare_workspace(workspace, ids, root=root)
    if created or not (workspace / DOCKERFILE).exists():
        write_new_file(workspace / DOCKERFILE, dockerfile_template(), ids)
