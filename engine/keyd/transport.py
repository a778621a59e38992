"""keyd on a Unix socket: who may connect (SO_PEERCRED against an allow list), one thread
per connection (signing releases the GIL, so connections sign in parallel), and the keyd
protocol's codec between the socket and :meth:`Keyd.handle <dccsign.keyd.service.Keyd.handle>`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from .. import native
from ..process import name_this_thread
from ..protocol.keyd import (
    NEED_DATA,
    Connection,
    Failure,
    KeydProtocolError,
    SignColumns,
    SignKids,
    SignMany,
    SignPayloads,
)

if TYPE_CHECKING:
    from .service import Keyd

__all__ = ["MAX_CONNECTIONS", "serve_unix"]

LOGGER = logging.getLogger("dccsign.keyd")
#: Connections keyd serves at once (a thread each); the engine uses --keyd-connections (2).
MAX_CONNECTIONS = 64


def _serve_counted(keyd: Keyd, sock: socket.socket, slots: threading.Semaphore) -> None:
    name_this_thread("keyd-conn")
    try:
        _serve_connection(keyd, sock)
    finally:
        slots.release()


def _serve_connection(keyd: Keyd, sock: socket.socket) -> None:
    codec = Connection(scan=native.cbor_scan)
    with sock:
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError:
                return
            out: list[bytes] = []
            try:
                codec.receive_data(data)
                while True:
                    event = codec.next_event()
                    if event is NEED_DATA or event is None:
                        break
                    out.append(codec.send(keyd.handle(event)))
                    # A signing reply goes out at once: the engine pipelines micro-batches, and
                    # holding finished signatures until every message of the read is handled
                    # would delay them by the others' signing. Small replies share one write.
                    signing = isinstance(event, SignPayloads | SignMany | SignColumns | SignKids)
                    if signing and not _send(sock, out):
                        return
            except KeydProtocolError as exc:
                LOGGER.warning("closing a keyd connection: %s", exc)
                out.append(codec.send(Failure(0, f"protocol error: {exc}", False)))
                _send(sock, out)
                return
            if not _send(sock, out) or not data:
                return


def _send(sock: socket.socket, out: list[bytes]) -> bool:
    """Write and clear *out* (one write); False when the peer is gone."""
    if not out:
        return True
    try:
        sock.sendall(b"".join(out))
    except OSError:
        return False
    out.clear()
    return True


def serve_unix(
    keyd: Keyd,
    path: str | os.PathLike[str],
    *,
    ready: threading.Event | None = None,
    on_listening: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
    mode: int = 0o600,
    group: int | None = None,
    allow_uids: Collection[int] | None = None,
) -> None:
    """Serve *keyd* on a Unix socket until *stop* is set.

    The socket is created with mode 0600, then given to *group* (a gid) if set, then gets
    *mode*. Every connection's peer uid (SO_PEERCRED) must be in *allow_uids* (default: keyd's
    own uid only; root is no exception): other connections are closed at once, unserved, and
    logged. Each accepted connection gets a thread; signing releases the GIL, so connections
    sign in parallel. Once the socket listens, *on_listening* runs (keyd's "serving" log
    line: whoever reads it may connect at once) and *ready* is set.
    """
    import struct

    allowed = frozenset({os.getuid()} if allow_uids is None else allow_uids)
    path = Path(path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket exists with mode 0600 from its first instant
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    try:
        if group is not None:
            os.chown(path, -1, group)  # before the mode opens it to the group
        os.chmod(path, mode)
    except OSError as exc:
        listener.close()
        path.unlink(missing_ok=True)
        what = f"group {group} and mode {mode:04o}" if group is not None else f"mode {mode:04o}"
        raise OSError(exc.errno, f"cannot give the socket {path} {what}: {exc.strerror}") from None
    listener.listen(64)
    listener.settimeout(0.2)
    if on_listening is not None:
        on_listening()
    if ready is not None:
        ready.set()
    refused = _RefusalLog()
    open_connections = threading.Semaphore(MAX_CONNECTIONS)
    try:
        while stop is None or not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", raw)
            if uid not in allowed:
                conn.close()
                refused.note(pid, uid, allowed)
                continue
            if not open_connections.acquire(blocking=False):
                conn.close()  # an engine needs a few; thousands would be thousands of threads
                LOGGER.warning(
                    "closing a keyd connection: %d are open (the limit)", MAX_CONNECTIONS
                )
                continue
            conn.settimeout(None)
            threading.Thread(
                target=_serve_counted, args=(keyd, conn, open_connections), daemon=True
            ).start()
    finally:
        listener.close()
        path.unlink(missing_ok=True)


class _RefusalLog:
    """Logs refused connections: each one, but at most one line a second per uid (with a
    count of those not logged), so that a process connecting in a loop cannot flood keyd's
    log."""

    def __init__(self) -> None:
        self._uids: dict[int, tuple[float, int]] = {}  # uid: (next line at, refused since)

    def note(self, pid: int, uid: int, allowed: frozenset[int]) -> None:
        now = time.monotonic()
        due, quiet = self._uids.get(uid, (0.0, 0))
        if now < due:
            self._uids[uid] = (due, quiet + 1)
            return
        more = f" (and {quiet} more from it since the last line)" if quiet else ""
        LOGGER.warning(
            "refused a connection from uid %d (pid %d): only uid %s may connect (--allow-uid)%s",
            uid,
            pid,
            ", ".join(map(str, sorted(allowed))),
            more,
        )
        self._uids[uid] = (now + 1.0, 0)
