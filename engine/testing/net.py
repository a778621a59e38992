"""Sockets for tests and benchmarks that start dccsign processes: a free loopback port, and
whether a server accepts connections yet."""

from __future__ import annotations

import os
import socket

__all__ = ["accepts_tcp", "accepts_unix", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts_unix(path: str | os.PathLike[str]) -> bool:
    """Whether a connection to the Unix socket *path* succeeds.

    A killed server leaves its socket file behind, so readiness is a successful connect, not
    the file's existence.
    """
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
        return True


def accepts_tcp(port: int) -> bool:
    """Whether a connection to 127.0.0.1:*port* succeeds within a second."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
