"""A blocking client of the engine for portal backends (thread-safe, pipelining).

Many threads may call :meth:`Client.sign` / :meth:`Client.sign_batch` at once: their requests
share one connection, each with its own request id, and a reader thread hands every reply to
the thread that waits for it. Requests refused with BUSY (or another retryable code) are
retried after the server's retry-after hint, with the same idempotency keys -- each item gets a
random one when the caller gives none -- so a retry never produces a second signature.

Addresses: ``unix:/path/to/socket`` or ``HOST:PORT`` (TLS; a client certificate is required
by the engine).
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .codes import RETRYABLE, ErrorCode
from .wire import (
    CLIENT,
    NEED_DATA,
    Connection,
    Error,
    GoAway,
    ItemResult,
    KeyInfo,
    Keys,
    ListKeys,
    Ping,
    Pong,
    SignBatch,
    SignBatchResult,
    SignItem,
    Welcome,
)

__all__ = ["Client", "ClientError"]


class ClientError(Exception):
    """The engine could not be reached, closed the connection, or refused the request.

    Attributes:
        code: the engine's :class:`ErrorCode`, when it sent one.
    """

    def __init__(self, message: str, code: ErrorCode | int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Any = None


class Client:
    """One connection to the engine (see the module docstring).

    Args:
        address: ``unix:PATH`` or ``HOST:PORT``.
        cert, key: the client certificate and key (PEM) for TLS.
        ca: the CA that issued the engine's certificate (PEM); default: the system's.
        retries: how many times a retryable refusal is retried before it is returned.

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
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self._sock = _connect(address, cert, key, ca, timeout)
        self._codec = Connection(CLIENT)
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closed: str | None = None
        self._welcome = threading.Event()
        self.welcome: Welcome | None = None
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read, name="dccsign-client", daemon=True)
        self._reader.start()
        try:
            self._send(self._codec.make_hello(agent))
            if not self._welcome.wait(timeout) or self.welcome is None:
                raise ClientError(f"no WELCOME from {address}: {self._closed or 'timed out'}")
        except BaseException:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------------------

    def _send(self, event: Any) -> None:
        with self._send_lock:
            if self._closed:
                raise ClientError(f"connection closed: {self._closed}")
            try:
                self._sock.sendall(self._codec.send(event))
            except OSError as exc:
                self._fail(f"send failed: {exc}")
                raise ClientError(f"connection closed: {exc}") from None

    def _read(self) -> None:
        try:
            while True:
                event = self._codec.next_event()
                if event is NEED_DATA:
                    data = self._sock.recv(1 << 16)
                    self._codec.receive_data(data)
                    continue
                if event is None:
                    self._fail("the engine closed the connection")
                    return
                if isinstance(event, Welcome):
                    self.welcome = event
                    self._welcome.set()
                    continue
                if isinstance(event, GoAway):
                    continue  # requests above last_request_id fail when the socket closes
                waiter = self._pending.pop(event.request_id, None)
                if isinstance(event, Error) and event.request_id == 0:
                    self._fail(f"{ErrorCode(event.code).name}: {event.message}", event.code)
                    return
                if waiter is not None:
                    waiter.reply = event
                    waiter.done.set()
        except Exception as exc:  # the stream is unusable: fail everyone waiting
            self._fail(f"connection failed: {exc}")

    def _fail(self, why: str, code: Any = None) -> None:
        if self._closed is None:
            self._closed = why
        for waiter in list(self._pending.values()):
            waiter.reply = ClientError(why, code)
            waiter.done.set()
        self._pending.clear()
        self._welcome.set()

    def _call(self, make: Any) -> Any:
        rid = next(self._ids)
        waiter = _Pending()
        self._pending[rid] = waiter
        try:
            self._send(make(rid))
        except ClientError:
            self._pending.pop(rid, None)
            raise
        if not waiter.done.wait(self.timeout):
            self._pending.pop(rid, None)
            raise ClientError(f"no reply within {self.timeout} s")
        if isinstance(waiter.reply, ClientError):
            raise waiter.reply
        return waiter.reply

    # -- API ----------------------------------------------------------------------------

    def ping(self, data: bytes = b"") -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        reply = self._call(lambda rid: Ping(rid, data))
        if not isinstance(reply, Pong) or reply.data != data:
            raise ClientError("bad PONG")
        return time.perf_counter() - start

    def list_keys(self) -> list[KeyInfo]:
        reply = self._call(lambda rid: ListKeys(rid))
        if isinstance(reply, Error):
            raise ClientError(reply.message, reply.code)
        if not isinstance(reply, Keys):
            raise ClientError(f"unexpected {type(reply).__name__}")
        return list(reply.keys)

    def sign(
        self,
        dcc: dict[str, Any],
        *,
        account: str,
        operator: str | None = None,
        kid: bytes | None = None,
        validity_days: int | None = None,
        idempotency_key: bytes | str | None = None,
    ) -> ItemResult:
        """Sign one DCC; the result holds ``hc1`` or the engine's error for it."""
        item = SignItem(dcc, account, operator, kid, validity_days, idempotency_key)
        return self.sign_batch([item])[0]

    def sign_batch(self, items: Sequence[SignItem]) -> list[ItemResult]:
        """Sign many DCCs in SIGN_BATCH frames of the engine's ``max_batch``; results in order.

        Retryable refusals (BUSY, DEADLINE_EXCEEDED, KEYD_UNAVAILABLE, ...) are retried up to
        ``retries`` times after the hinted delay, with the same idempotency keys.
        """
        keyed = [
            i if i.idempotency_key is not None else replace(i, idempotency_key=os.urandom(16))
            for i in items
        ]
        results: list[ItemResult | None] = [None] * len(keyed)
        todo = list(range(len(keyed)))
        assert self.welcome is not None
        size = self.welcome.max_batch
        for attempt in range(self.retries + 1):
            delay = 0.0
            retry: list[int] = []
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                reply = self._call(lambda rid, c=chunk: SignBatch(rid, tuple(keyed[i] for i in c)))
                if isinstance(reply, Error):
                    outcome = [
                        ItemResult(
                            error=reply.code,
                            message=reply.message,
                            retry_after_ms=reply.retry_after_ms,
                        )
                    ] * len(chunk)
                elif isinstance(reply, SignBatchResult):
                    outcome = list(reply.results)
                else:
                    raise ClientError(f"unexpected {type(reply).__name__}")
                for i, result in zip(chunk, outcome, strict=True):
                    results[i] = result
                    if result.error in RETRYABLE and attempt < self.retries:
                        retry.append(i)
                        delay = max(delay, (result.retry_after_ms or 50) / 1000)
            if not retry:
                break
            time.sleep(min(delay, 5.0))
            todo = retry
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._fail("client closed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
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
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ClientError(f"address must be unix:PATH or HOST:PORT, not {address!r}")
        ctx = ssl.create_default_context(cafile=os.fspath(ca) if ca else None)
        if cert is not None:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname=host.strip("[]"))
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot connect to {address}: {exc}") from None
