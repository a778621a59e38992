"""Durable file primitives: every file the log creates is written completely, fsynced, and
its directory entry fsynced too (the order of the steps: docs/audit-format.md, "Writing")."""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["create_file", "fsync_dir", "write_all"]


def fsync_dir(path: Path) -> None:
    """fsync directory *path*: what makes a file created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of *data* to *fd* (``os.write`` may write less than asked).

    Raises:
        OSError: the write failed, or made no progress.
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # not expected from a regular file; never loop forever
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def create_file(path: Path, data: bytes, mode: int, *, step: int | None = None) -> None:
    """Create *path* (never overwriting), write *data*, fsync the file and its directory.
    With *step*, the data is written and flushed (``fdatasync``) *step* bytes at a time
    first, so that no single flush holds the file system's other fsyncs for long."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        if step is None:
            write_all(fd, data)
        else:
            view = memoryview(data)
            for at in range(0, len(data), step):
                write_all(fd, view[at : at + step])
                os.fdatasync(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    fsync_dir(path.parent)
