"""One socket read by one thread and written by others, with never two threads inside it.

OpenSSL forbids ``SSL_read`` and ``SSL_write`` on the same ``SSL`` object at the same time,
and Python's ``ssl`` module (before its free-threading locks) releases the GIL inside both:
a reader thread blocked in ``recv`` while another thread sends is exactly that. The race is
rare and silent -- a frame that never arrives (the engine answers "no HELLO within 10 s"),
or corrupted TLS state -- so it is ruled out by construction here: the socket is
non-blocking, every call into it holds one lock, and the waiting for readiness happens
outside the lock, in ``poll`` (no descriptor limit, unlike ``select``).

A plain (Unix) socket does not need this, but takes the same path: one code path, tested
once.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading

__all__ = ["DuplexSocket"]

_RECV_SIZE = 1 << 16


class DuplexSocket:
    """*sock* (connected; a TLS socket with its handshake done) shared by one reader thread
    (:meth:`recv`) and writers that take turns among themselves (:meth:`sendall`).

    Errors are the socket's own (:class:`OSError`, :class:`ssl.SSLError`); ``recv`` returns
    ``b""`` at the end of the stream, as a socket does.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(0.0)
        self._sock = sock
        self._lock = threading.Lock()
        # One poll object per side: the reader's and the (serialized) writers' never meet.
        self._read_poll = select.poll()
        self._write_poll = select.poll()

    def recv(self) -> bytes:
        """The next bytes from the peer (blocks until there are some, or the end)."""
        while True:
            with self._lock:
                try:
                    return self._sock.recv(_RECV_SIZE)
                except (ssl.SSLWantReadError, BlockingIOError):
                    wait = select.POLLIN
                except ssl.SSLWantWriteError:
                    wait = select.POLLOUT
            self._wait(self._read_poll, wait)

    def sendall(self, data: bytes) -> None:
        """Send all of *data* (blocks until it is written). Callers take turns: one
        ``sendall`` at a time (the reader may run beside it)."""
        view = memoryview(data)
        while view:
            with self._lock:
                try:
                    # A TLS write that wanted to wait is retried with the same buffer, as
                    # OpenSSL requires; a plain socket may take part of it.
                    view = view[self._sock.send(view) :]
                    continue
                except (ssl.SSLWantWriteError, BlockingIOError):
                    wait = select.POLLOUT
                except ssl.SSLWantReadError:
                    wait = select.POLLIN
            self._wait(self._write_poll, wait)

    def shutdown(self) -> None:
        """End both directions: a reader waiting in :meth:`recv` gets ``b""``. (Under the
        lock: a TLS socket lets go of its OpenSSL object here.)"""
        with self._lock:
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the descriptor (the reader must be gone: see the client's ``close``)."""
        with self._lock:
            self._sock.close()

    def _wait(self, poll: select.poll, event: int) -> None:
        fd = self._sock.fileno()
        if fd < 0:  # closed under us
            raise OSError("the socket is closed")
        poll.register(fd, event)
        try:
            poll.poll()
        finally:
            poll.unregister(fd)
