"""TLS byte streams for trio, with OpenSSL reading and writing the socket itself.

``trio.SSLStream`` runs TLS through memory BIOs: every record is copied between the socket
and the BIO in Python, and each turn of its retry loop is Python raising and catching
``SSLWantReadError``. Between the engine and a client that is most of the CPU a frame's
bytes cost: ~255 us per round trip of a 12 KB request and a 30 KB reply (both ends) on this
machine class, against ~117 with this module (``bench/README.md``, "TLS on the socket").

:class:`TLSStream` wraps the connected, non-blocking socket in an ``ssl.SSLSocket``: one C
call moves a whole read or write, and the task waits with trio's low-level
``wait_readable`` / ``wait_writable`` only when OpenSSL asks for the socket. It keeps the
contract of :class:`trio.abc.Stream` that the engine and clients rely on:

- every call is a checkpoint; a second concurrent ``receive_some`` (or ``send_all``) raises
  :class:`trio.BusyResourceError`;
- ``receive_some`` returns ``b""`` at the peer's ``close_notify``; a connection that ends
  without one (a ragged EOF), a reset, or a TLS alert raises
  :class:`trio.BrokenResourceError`, as ``trio.SSLStream`` with ``https_compatible=False``;
- a ``send_all`` cancelled after part of its data went out leaves the stream broken for
  both directions (the peer cannot tell where the data stopped), as does any failure;
- after :meth:`aclose`, every call raises :class:`trio.ClosedResourceError`.

The handshake runs on the first call, or explicitly with :meth:`do_handshake` (servers time
it). Renegotiation is refused (``OP_NO_RENEGOTIATION``): it is the one case in which a
write would wait for a read, which the engine's separate reader and writer tasks cannot
interleave. TLS 1.3 key updates need no such wait.
"""

from __future__ import annotations

import enum
import operator
import socket
import ssl
from typing import Any

import trio

__all__ = ["DEFAULT_RECEIVE_SIZE", "TLSStream", "open_tls_over_tcp"]

#: ``receive_some()`` without a size reads up to this many bytes.
DEFAULT_RECEIVE_SIZE = 1 << 16

# Renegotiation is refused (see the module docstring); 0 where OpenSSL lacks the option.
_NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0)

# A write that OpenSSL says must wait for a read (or a read for a write) while the other
# direction's task is waiting on the socket already: trio allows one waiter per direction,
# so this side polls. Only renegotiation causes it, which is refused; kept for safety.
_CROSS_WAIT_S = 0.001


class _State(enum.Enum):
    OPEN = "open"
    BROKEN = "broken"
    CLOSED = "closed"


class TLSStream(trio.abc.Stream):
    """A TLS connection over a connected TCP socket (see the module docstring).

    Build it with :meth:`wrap` (from a ``trio.SocketStream``) or :func:`open_tls_over_tcp`.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        """*sock*: a non-blocking ``SSLSocket`` made with ``do_handshake_on_connect=False``
        and ``suppress_ragged_eofs=False`` (what :meth:`wrap` makes); the stream owns it."""
        self._sock = sock
        self._state = _State.OPEN
        self._handshook = False
        self._handshake_lock = trio.Lock()
        self._receiving = False
        self._sending = False

    @classmethod
    def wrap(
        cls,
        stream: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> TLSStream:
        """TLS over *stream*'s socket, which from now on belongs to the returned stream
        (*stream* is left without a socket: close the returned stream, not *stream*).
        Sets ``OP_NO_RENEGOTIATION`` on *context* (see the module docstring).

        Raises:
            ssl.SSLError, OSError, ValueError: *context* cannot wrap the socket.
        """
        fd = stream.socket.detach()
        raw = socket.socket(fileno=fd)
        try:
            raw.setblocking(False)
            context.options |= _NO_RENEGOTIATION
            sock = context.wrap_socket(
                raw,
                server_side=server_side,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
            )
        except BaseException:
            raw.close()
            raise
        return cls(sock)

    # -- state -----------------------------------------------------------------------------

    def _check(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")

    def _broken(self, exc: BaseException) -> trio.BrokenResourceError:
        self._state = _State.BROKEN
        return trio.BrokenResourceError(f"TLS connection broken: {exc}")

    def getpeercert(self) -> dict[str, Any] | None:
        """The peer's certificate as ``ssl.SSLSocket.getpeercert()`` gives it (None before
        the handshake or when the peer sent none)."""
        if not self._handshook:
            return None
        return self._sock.getpeercert()  # type: ignore[return-value]

    def version(self) -> str | None:
        """The negotiated protocol version ("TLSv1.3"), None before the handshake."""
        return self._sock.version() if self._handshook else None

    # -- handshake -------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake if it has not run (a checkpoint either way).

        Raises:
            trio.BrokenResourceError: it failed (the peer's certificate was refused, the
                connection was reset, ...); the stream is broken.
            trio.ClosedResourceError: the stream was closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check()
        if self._handshook:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        async with self._handshake_lock:
            if not self._handshook:
                await self._handshake()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _handshake(self) -> None:
        sock = self._sock
        try:
            while True:
                self._check()
                try:
                    sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(sock)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(sock)
        except (ssl.SSLError, OSError) as exc:
            raise self._broken(exc) from exc
        except BaseException:
            # Cancelled half way: the peer is mid-handshake, nothing can resume it.
            if self._state is _State.OPEN:
                self._state = _State.BROKEN
            raise
        self._handshook = True

    # -- receiving -------------------------------------------------------------------------

    async def _ready(self) -> None:
        """A checkpoint, then the checks every receive and send make: the stream is usable,
        and the handshake is done (the first caller does it; the other side waits for it)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check()
        if not self._handshook:
            async with self._handshake_lock:
                if not self._handshook:
                    await self._handshake()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to *max_bytes* (default :data:`DEFAULT_RECEIVE_SIZE`) bytes of what the peer
        sent, at least one; ``b""`` once it has closed with ``close_notify``. Everything
        already decrypted or waiting in the socket is returned by one call, up to the size.

        Raises:
            trio.BrokenResourceError: the connection failed or ended without
                ``close_notify``.
            trio.ClosedResourceError: the stream was closed.
            trio.BusyResourceError: another task is receiving.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else operator.index(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            await self._ready()
            sock = self._sock
            waited = False
            while True:
                try:
                    data = sock.recv(size)
                    break
                except ssl.SSLWantReadError:
                    waited = True
                    await trio.lowlevel.wait_readable(sock)
                except ssl.SSLWantWriteError:
                    waited = True
                    await self._wait_writable_for_read()
                except ssl.SSLZeroReturnError:
                    data = b""  # close_notify (recv returns b"" for it too)
                    break
                except (ssl.SSLError, OSError) as exc:
                    raise self._broken(exc) from exc
                self._check()  # closed by another task while this one waited
            if data and len(data) < size:
                data = self._more(data, size)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def _more(self, first: bytes, size: int) -> bytes:
        """*first* and whatever else can be read without waiting, up to *size* bytes: a
        reply spans several TLS records, and OpenSSL returns one record per read."""
        parts = [first]
        got = len(first)
        sock = self._sock
        while got < size:
            try:
                data = sock.recv(size - got)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError):
                break  # the next call waits, or sees the close
            except (ssl.SSLError, OSError):
                break  # the next call raises it; what was read is returned first
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts) if len(parts) > 1 else first

    async def _wait_writable_for_read(self) -> None:
        if self._sending:
            await trio.sleep(_CROSS_WAIT_S)
        else:
            await trio.lowlevel.wait_writable(self._sock)

    # -- sending ---------------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of *data*.

        Raises:
            trio.BrokenResourceError: the connection failed, or an earlier send was
                cancelled part way.
            trio.ClosedResourceError: the stream was closed.
            trio.BusyResourceError: another task is sending.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await self._ready()
            sock = self._sock
            view = memoryview(data).cast("B")
            waited = False
            try:
                while view:
                    try:
                        view = view[sock.send(view) :]
                    except ssl.SSLWantWriteError:
                        waited = True
                        await trio.lowlevel.wait_writable(sock)
                    except ssl.SSLWantReadError:
                        waited = True
                        if self._receiving:
                            await trio.sleep(_CROSS_WAIT_S)
                        else:
                            await trio.lowlevel.wait_readable(sock)
                    self._check()
            except (ssl.SSLError, OSError) as exc:
                raise self._broken(exc) from exc
            except BaseException:
                # Cancelled with part of the data (or of a record) out: the stream's byte
                # boundaries are lost for the peer.
                if self._state is _State.OPEN and len(view) != len(data):
                    self._state = _State.BROKEN
                elif self._state is _State.OPEN and waited:
                    # A record may be half written inside OpenSSL (SSL_write wants the
                    # same buffer again): nothing else may be written after it.
                    self._state = _State.BROKEN
                raise
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Send all of *data* now if the socket takes it without waiting: ``True`` when it
        all went out. ``False`` when it did not (the socket is full, another task is
        sending, the handshake has not run, the stream failed): then *data* is **owed** --
        the next send on this stream must be ``send_all`` of exactly these bytes, because
        OpenSSL may have written part of it already and holds the rest of a record.

        Not a checkpoint, and never waits: it lets an event loop answer without waking a
        writer task when the socket has room, which it usually has. Errors are not raised
        here; the owed ``send_all`` raises them.
        """
        if self._sending or self._state is not _State.OPEN or not self._handshook:
            return False
        sock = self._sock
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[sock.send(view) :]
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False
        except (ssl.SSLError, OSError) as exc:
            self._broken(exc)
            return False
        return True

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check()
        await trio.lowlevel.wait_writable(self._sock)

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send ``close_notify`` if the connection is healthy and the socket takes it now
        (never waits for the peer), then close the socket. Idempotent."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        healthy = self._state is _State.OPEN and self._handshook
        self._state = _State.CLOSED
        sock = self._sock
        try:
            if healthy:
                try:
                    sock.unwrap()  # SSL_shutdown: our close_notify goes out
                except (ssl.SSLError, OSError, ValueError):
                    pass  # it wants the peer's close_notify, or the peer is gone: fine
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        await trio.lowlevel.checkpoint()


async def open_tls_over_tcp(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
) -> TLSStream:
    """A TCP connection to *host*:*port* with TLS, handshake done. *server_hostname*
    (default *host*) is the name the server's certificate is checked against.

    Raises:
        OSError: the connection failed.
        trio.BrokenResourceError: the handshake failed.
    """
    tcp = await trio.open_tcp_stream(host, port)
    try:
        stream = TLSStream.wrap(
            tcp, context, server_side=False,
            server_hostname=host if server_hostname is None else server_hostname,
        )  # fmt: skip
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream
