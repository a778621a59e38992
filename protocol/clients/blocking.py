"""A blocking client of the engine for portal backends (thread-safe, pipelining).

Many threads may call :meth:`Client.sign` / :meth:`Client.sign_batch` at once: their requests
share one connection, each with its own request id, and a reader thread hands every reply to
the thread that waits for it. Concurrent :meth:`Client.sign` calls are coalesced into
SIGN_BATCH frames (``coalesce.Coalescer``: no wait while no coalesced frame is outstanding,
at most ``coalesce_window`` otherwise). Requests refused with BUSY (or another retryable code)
are retried after the server's retry-after hint, with the same idempotency keys -- each item
gets a random one when the caller gives none -- so a retry never produces a second signature.

Addresses: ``unix:/path/to/socket`` or ``HOST:PORT`` (TLS; a client certificate is required
by the engine).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from .. import wire
from . import coalesce
from .coalesce import DEFAULT_WINDOW, ClientError, Coalescer, Single, Waiter
from .duplex import DuplexSocket

__all__ = ["Client", "ClientError"]


class _Coalesced(Waiter):
    """A SIGN_BATCH frame of coalesced singles: the reply is split among them (on the
    reader thread)."""

    __slots__ = ("client", "singles")

    def __init__(self, client: Client, singles: list[Single]) -> None:
        super().__init__(threading.Event())
        self.client = client
        self.singles = singles

    def resolve(self, reply: Any) -> None:
        outcomes = coalesce.outcomes_for(reply, len(self.singles))
        for single, result in zip(self.singles, outcomes, strict=True):
            single.resolve(result)
        self.client._answered()


class Client:
    """One connection to the engine (see the module docstring).

    Args:
        address: ``unix:PATH`` or ``HOST:PORT``.
        cert, key: the client certificate and key (PEM) for TLS.
        ca: the CA that issued the engine's certificate (PEM); default: the system's.
        retries: how many times a retryable refusal is retried before it is returned.
        coalesce_window: the longest a :meth:`sign` waits to share a frame with concurrent
            ones (seconds); ``None``: every :meth:`sign` is a frame of its own.

    Raises:
        ClientError: on connect, and from calls when the connection is gone.
    """

    def __init__(
        self,
        address: str,
        *,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        ca: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
        retries: int = 8,
        agent: str = "dccsign-client",
        coalesce_window: float | None = DEFAULT_WINDOW,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.coalesce_window = coalesce_window
        self._coalescer: Coalescer[Single] | None = None
        self._flush_cond = threading.Condition()
        self._flusher: threading.Thread | None = None
        # A reader thread and the senders share the socket: never two inside OpenSSL at once.
        self._sock = DuplexSocket(_connect(address, cert, key, ca, timeout))
        self._codec = wire.Connection(wire.CLIENT)
        self._send_lock = threading.Lock()
        self._requests = coalesce.Requests()
        self._welcome = threading.Event()
        self.welcome: wire.Welcome | None = None
        self._reader = threading.Thread(target=self._read, name="dccsign-client", daemon=True)
        self._reader.start()
        try:
            self._send(self._codec.make_hello(agent))
            if not self._welcome.wait(timeout) or self.welcome is None:
                raise self._requests.no_welcome(address)
        except BaseException:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------------------

    def _send(self, event: Any) -> None:
        with self._send_lock:
            self._send_locked(event)

    def _send_locked(self, event: Any) -> None:
        self._requests.check_open()
        try:
            self._sock.sendall(coalesce.request_bytes(self._codec, event))
        except OSError as exc:
            self._fail(f"send failed: {exc}")
            raise ClientError(f"connection closed: {exc}") from None

    def _read(self) -> None:
        need_data = wire.NEED_DATA
        try:
            while True:
                outcome = coalesce.next_outcome(self._codec, self._requests.pending)
                if outcome is need_data:
                    self._codec.receive_data(self._sock.recv())
                    continue
                if isinstance(outcome, ClientError):
                    self._fail(str(outcome), outcome.code)
                    return
                self.welcome = outcome
                self._welcome.set()
        except Exception as exc:  # the stream is unusable: fail everyone waiting
            self._fail(f"connection failed: {exc}")

    def _fail(self, why: str, code: Any = None) -> None:
        self._requests.fail(why, code)
        self._welcome.set()
        with self._flush_cond:
            self._flush_cond.notify_all()

    def _submit(self, make: Any, waiter: Waiter) -> int:
        """Send ``make(request_id)``; *waiter* gets the reply. Returns the request id."""
        with self._send_lock:
            # Request ids must rise on the wire: take the next one only when it is our turn.
            rid = self._requests.add(waiter)
            try:
                self._send_locked(make(rid))
            except ClientError:
                self._requests.forget(rid)
                raise
        return rid

    def _call(self, make: Any) -> Any:
        waiter = Waiter(threading.Event())
        rid = self._submit(make, waiter)
        if not waiter.done.wait(self.timeout):
            self._requests.forget(rid)
            raise ClientError(f"no reply within {self.timeout} s")
        return waiter.outcome()

    # -- API ----------------------------------------------------------------------------

    def ping(self, data: bytes = b"") -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        coalesce.check_pong(self._call(lambda rid: wire.Ping(rid, data)), data)
        return time.perf_counter() - start

    def list_keys(self) -> list[wire.KeyInfo]:
        return coalesce.keys_of(self._call(lambda rid: wire.ListKeys(rid)))

    def sign(
        self,
        dcc: dict[str, Any],
        *,
        account: str,
        operator: str | None = None,
        kid: bytes | None = None,
        validity_days: int | None = None,
        idempotency_key: bytes | str | None = None,
    ) -> wire.ItemResult:
        """Sign one DCC; the result holds ``hc1`` or the engine's error for it.

        Concurrent calls share SIGN_BATCH frames (see the module docstring); retryable
        refusals are retried as in :meth:`sign_batch`.

        Raises:
            ClientError: the connection is gone or no reply came within ``timeout``.
        """
        (item,) = coalesce.with_idempotency_keys(
            [wire.SignItem(dcc, account, operator, kid, validity_days, idempotency_key)]
        )
        if self.coalesce_window is None:
            return self.sign_batch([item])[0]
        for attempt in range(self.retries + 1):
            single = Single(threading.Event(), item)
            self._enqueue(single)
            if not single.done.wait(self.timeout):
                raise ClientError(f"no reply within {self.timeout} s")
            result = single.outcome()
            delay = coalesce.retry_single(result, attempt, self.retries)
            if delay is None:
                break
            time.sleep(delay)
        return result

    def sign_batch(self, items: Sequence[wire.SignItem]) -> list[wire.ItemResult]:
        """Sign many DCCs in SIGN_BATCH frames of the engine's ``max_batch``; results in order.

        Retryable refusals (BUSY, DEADLINE_EXCEEDED, KEYD_UNAVAILABLE, ...) are retried up to
        ``retries`` times after the hinted delay, with the same idempotency keys.

        Raises:
            ClientError: the connection is gone or no reply came within ``timeout``.
        """
        assert self.welcome is not None
        plan = coalesce.BatchRetry(items, self.welcome.max_batch, self.retries)
        while True:
            for chunk in plan.frames():
                plan.record(
                    chunk, self._call(lambda rid, c=chunk: wire.SignBatch(rid, plan.frame(c)))
                )
            delay = plan.next_attempt()
            if delay is None:
                return plan.results  # type: ignore[return-value]
            time.sleep(delay)

    # -- coalescing ---------------------------------------------------------------------

    def _enqueue(self, single: Single) -> None:
        with self._flush_cond:
            self._requests.check_open()
            if self._coalescer is None:
                assert self.welcome is not None and self.coalesce_window is not None
                self._coalescer = Coalescer(self.coalesce_window, self.welcome.max_batch)
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="dccsign-client-coalesce", daemon=True
                )
                self._flusher.start()
            self._coalescer.add(single, time.monotonic())
            self._flush_cond.notify()

    def _answered(self) -> None:
        with self._flush_cond:
            assert self._coalescer is not None
            self._coalescer.answered()
            self._flush_cond.notify()

    def _flush_loop(self) -> None:
        coalescer = self._coalescer
        assert coalescer is not None
        while True:
            with self._flush_cond:
                while True:
                    if self._requests.closed:
                        gone = self._requests.closed_error()
                        for single in coalescer.take():
                            single.resolve(gone)
                        if not len(coalescer):
                            return
                        continue
                    now = time.monotonic()
                    due = coalescer.due(now)
                    if due is not None and due <= now:
                        singles = coalescer.take()
                        break
                    self._flush_cond.wait(None if due is None else due - now)
            frame = _Coalesced(self, singles)
            items = tuple(s.item for s in singles)
            try:
                self._submit(lambda rid, items=items: wire.SignBatch(rid, items), frame)
            except ClientError as exc:
                frame.resolve(exc)

    def close(self) -> None:
        self._fail("client closed")
        try:
            self._sock.shutdown()
        except OSError:
            pass
        # The reader must be out of recv() before the descriptor is closed: otherwise the
        # number can be reused at once (by the caller's next open()), and the reader's next
        # read -- OpenSSL keeps the bare number -- consumes that file's bytes. shutdown()
        # ends its recv with EOF, so the join is short.
        if self._reader is not threading.current_thread():
            self._reader.join(self.timeout)
        with self._send_lock:  # no send is under way on it either (the requests are closed)
            self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(
    address: str,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    ca: str | os.PathLike[str] | None,
    timeout: float,
) -> socket.socket:
    try:
        if address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address[5:])
            return sock
        host, port = coalesce.tcp_target(address)
        ctx = coalesce.tls_context(cert, key, ca)
        raw = socket.create_connection((host, port), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname=host)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot connect to {address}: {exc}") from None
