"""The exporter's files in the data folder, opened safely: never through a symbolic link, never a folder or a pipe
where a regular file belongs, and written durably (fsynced, and renamed into place whole)."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path

from errors import ExportError


class NotOwnFile(ExportError):
    """A link or a special file where the exporter keeps a file of its own: bad input for the user to remove (exit 2
    when found before any request; found while saving a window, it fails that window)."""


def open_own_file(path: Path, flags: int, mode: str):
    """Open one of the exporter's own files (lock, manifest, journal) in the data folder, never through a link.

    A symbolic link planted there would make a run write, truncate or upload a file outside the folder; a FIFO
    would hang it. Both are refused before a byte is read or written.
    """
    try:
        return open_regular(path, flags, mode)
    except NotRegular:
        raise NotOwnFile(f"{path} is not a regular file; remove it") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotOwnFile(f"{path} is a symbolic link; remove it: the exporter does not follow links there") from None
        raise


class NotRegular(OSError):
    """A folder, a pipe or a device where a regular file was expected."""


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: str = "rb"):
    """A regular file opened without following a link (a link raises ELOOP) and without blocking on a pipe.

    For a data file, checked by type and size just before, this also means that one swapped meanwhile for a link to
    /dev/zero, which never ends, or for a pipe is not read.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, "not a regular file", str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)


def not_regular(path: Path) -> str | None:
    """What stands at `path` when it is not a regular file (a link, a folder, a device, a pipe); None when it is one
    or nothing is there. A file written by renaming over it must be checked: the rename replaces a link, and (as
    root) a device such as /dev/full, instead of writing to it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a folder" if stat.S_ISDIR(mode) else "a device, a pipe or a socket"


def ensure_replaceable(path: Path) -> None:
    """NotRegular unless `path` is a regular file or nothing: what a rename into place may replace."""
    kind = not_regular(path)
    if kind:
        raise NotRegular(errno.EINVAL, f"it is {kind}, not a regular file", str(path))


def write_durably(path: Path, content: bytes) -> None:
    with open_own_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())


def write_atomically(path: Path, content: bytes) -> None:
    """Write beside `path`, fsync, rename over it: a reader sees the old file or the new one, never half of one."""
    ensure_replaceable(path)
    temp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_durably(temp, content)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# Some file systems cannot sync a folder at all (SMB shares such as Azure Files, some FUSE mounts): they answer with
# one of these, as PostgreSQL and SQLite also find, and a rename there is as durable as they make it.
FOLDER_SYNC_UNSUPPORTED = (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP)


def fsync_folder(path: Path) -> None:
    """Make the folder's new names durable, where the file system can."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in FOLDER_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)
