"""Sockets for tests and benchmarks that start dccsign processes: a free loopback port, and
whether a server accepts connections yet."""

from __future__ import annotations

import os
import random
import socket

__all__ = ["accepts_tcp", "accepts_unix", "free_port", "free_port_with_bus"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_with_bus(offset: int = 10000) -> int:
    """A free loopback port *p* such that *p* + *offset* is free too and below 65536.

    A Redis Cluster node also listens on its port + 10000 (the cluster bus) and refuses to
    start on a port above 55535, so an ephemeral port from :func:`free_port` (often above
    32768 and up to 60999) will not do.

    Raises:
        RuntimeError: no such pair was found in 200 tries.
    """
    for _ in range(200):
        port = random.randint(20000, 65535 - offset)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port pair {offset} apart on 127.0.0.1")


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
