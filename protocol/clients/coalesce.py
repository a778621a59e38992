"""What both clients share, without sockets: coalescing single requests into batch frames,
turning replies into per-item results for the retry loop, and reading the address and TLS
files they connect with.

Coalescing rule (the same as the engine's micro-batcher toward keyd): queued single requests
go out as one SIGN_BATCH frame

* at once while fewer than ``max_in_flight`` coalesced frames await their reply -- a lone
  caller pays no wait;
* otherwise when the oldest has waited ``window`` seconds -- the bound on the added latency;
* or as soon as ``max_batch`` are queued.

So under concurrency many callers share a frame (one header, one engine round, one batch
through keyd) and at low concurrency nothing waits. The class keeps no clock: callers pass
``now`` (``time.monotonic()`` or ``trio.current_time()``).
"""

from __future__ import annotations

import itertools
import math
import os
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar

from ..codes import RETRYABLE, ErrorCode
from ..wire import (
    NEED_DATA,
    Connection,
    Error,
    GoAway,
    ItemResult,
    KeyInfo,
    Keys,
    LocalProtocolError,
    Pong,
    SignBatchResult,
    SignItem,
    Welcome,
)

__all__ = [
    "DEFAULT_WINDOW",
    "BatchRetry",
    "ClientError",
    "Coalescer",
    "Requests",
    "Single",
    "Waiter",
    "check_pong",
    "connection_error",
    "fail_waiters",
    "keys_of",
    "next_outcome",
    "outcomes_for",
    "read_reply",
    "request_bytes",
    "results_for",
    "retry_delay",
    "retry_single",
    "retryable",
    "tcp_target",
    "tls_context",
    "with_idempotency_keys",
]

#: The longest a single request waits for company (seconds).
DEFAULT_WINDOW = 0.0005

T = TypeVar("T")


class ClientError(Exception):
    """The engine could not be reached, closed the connection, or refused the request.

    Attributes:
        code: the engine's :class:`ErrorCode`, when it sent one.
    """

    def __init__(self, message: str, code: ErrorCode | int | None = None) -> None:
        super().__init__(message)
        self.code = code


def request_bytes(codec: Connection, event: Any) -> bytes:
    """*event*'s frame from *codec*, for a client's send.

    Raises:
        ClientError: the engine has said GOAWAY (code SHUTTING_DOWN: nothing was sent; send
            it on a new connection, to this or another engine).
        LocalProtocolError: any other request this connection cannot send.
    """
    try:
        return codec.send(event)
    except LocalProtocolError:
        if codec.goaway_last_id is None:
            raise
        raise ClientError(
            "the engine is draining (GOAWAY): nothing was sent; use a new connection",
            ErrorCode.SHUTTING_DOWN,
        ) from None


class Coalescer(Generic[T]):
    """A queue of single requests that says when to send, and what (see the module docstring).

    Raises:
        ValueError: from the constructor for a negative or infinite window, or limits < 1.
    """

    def __init__(
        self, window: float = DEFAULT_WINDOW, max_batch: int = 100, max_in_flight: int = 1
    ) -> None:
        if not (window >= 0 and math.isfinite(window)):
            raise ValueError("window must be a finite number of seconds >= 0")
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self.window = window
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._queue: deque[tuple[float, T]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, entry: T, now: float) -> None:
        self._queue.append((now, entry))

    def due(self, now: float) -> float | None:
        """When the next frame should go: a time <= *now* means now; None: nothing queued."""
        if not self._queue:
            return None
        if self.in_flight < self.max_in_flight or len(self._queue) >= self.max_batch:
            return now
        return self._queue[0][0] + self.window

    def take(self) -> list[T]:
        """Up to ``max_batch`` entries, oldest first, for one frame; counts it in flight."""
        out = [self._queue.popleft()[1] for _ in range(min(self.max_batch, len(self._queue)))]
        if out:
            self.in_flight += 1
        return out

    def answered(self) -> None:
        """A frame from :meth:`take` got its reply (or failed)."""
        self.in_flight = max(0, self.in_flight - 1)


class Waiter:
    """A request awaiting its reply, for either client: *done* is a ``threading.Event`` or a
    ``trio.Event``; :meth:`resolve` stores the reply (or the ClientError) and sets it."""

    __slots__ = ("done", "reply")

    def __init__(self, done: Any) -> None:
        self.done = done
        self.reply: Any = None

    def resolve(self, reply: Any) -> None:
        self.reply = reply
        self.done.set()

    def outcome(self) -> Any:
        """The reply, once resolved.

        Raises:
            ClientError: the request failed as a whole (the connection is gone).
        """
        if isinstance(self.reply, ClientError):
            raise self.reply
        return self.reply


class Requests:
    """The requests of one connection that await their reply, for either client (no I/O).

    Request ids rise from 1 in the order :meth:`add` hands them out (the caller sends under
    its send lock, so they rise on the wire too); once the connection is gone (:meth:`fail`),
    every waiting request fails with its reason and so does every later :meth:`check_open`.
    """

    __slots__ = ("_ids", "closed", "pending")

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.pending: dict[int, Waiter] = {}
        self.closed: str | None = None  # why the connection is gone

    def add(self, waiter: Waiter) -> int:
        """The next request id, with *waiter* awaiting its reply."""
        rid = next(self._ids)
        self.pending[rid] = waiter
        return rid

    def forget(self, rid: int) -> None:
        """Stop waiting for the reply to *rid* (it was not sent, or the wait timed out)."""
        self.pending.pop(rid, None)

    def closed_error(self) -> ClientError:
        return ClientError(f"connection closed: {self.closed}")

    def no_welcome(self, address: str) -> ClientError:
        """The error of a handshake that got no WELCOME: why the connection ended, or a timeout."""
        return ClientError(f"no WELCOME from {address}: {self.closed or 'timed out'}")

    def check_open(self) -> None:
        """Raise :meth:`closed_error` once the connection is gone."""
        if self.closed:
            raise self.closed_error()

    def fail(self, why: str, code: Any = None) -> None:
        """The connection is gone (the first *why* is kept): every waiting request fails."""
        if self.closed is None:
            self.closed = why
        fail_waiters(self.pending, why, code)


class Single(Waiter):
    """One coalesced single request: its item, and later its result."""

    __slots__ = ("item",)

    def __init__(self, done: Any, item: SignItem) -> None:
        super().__init__(done)
        self.item = item


def with_idempotency_keys(items: Sequence[SignItem]) -> list[SignItem]:
    """*items*, each with an idempotency key (a random one where the caller gave none), so
    that a retry of the same item can never produce a second signature."""
    return [
        i if i.idempotency_key is not None else replace(i, idempotency_key=os.urandom(16))
        for i in items
    ]


def results_for(reply: object, count: int) -> list[ItemResult]:
    """Per-item results of the reply to a SIGN_BATCH of *count* items: an ERROR frame (e.g.
    BUSY for the whole frame) becomes the same failure for every item.

    Raises:
        ValueError: the reply is neither, or has the wrong number of results.
    """
    if isinstance(reply, Error):
        failure = ItemResult(
            error=reply.code, message=reply.message, retry_after_ms=reply.retry_after_ms
        )
        return [failure] * count
    if isinstance(reply, SignBatchResult) and len(reply.results) == count:
        return list(reply.results)
    raise ValueError(f"unexpected reply to SIGN_BATCH: {type(reply).__name__}")


def outcomes_for(reply: object, count: int) -> list[ItemResult | ClientError]:
    """:func:`results_for`, where *reply* may also be the :class:`ClientError` that ended the
    wait (then every item gets it) and a malformed reply becomes a ClientError per item."""
    if isinstance(reply, ClientError):
        return [reply] * count
    try:
        return list(results_for(reply, count))
    except ValueError as exc:
        return [ClientError(str(exc))] * count


def retry_delay(results: Sequence[ItemResult], default_ms: int = 50, cap: float = 5.0) -> float:
    """Seconds to wait before retrying *results*: the largest retry-after hint among them."""
    hints = [r.retry_after_ms or default_ms for r in results]
    return min(cap, max(hints, default=default_ms) / 1000)


class BatchRetry:
    """A ``sign_batch`` of both clients without the I/O: which items go out in which frame,
    attempt after attempt, and what came back.

    Usage: for each chunk of :meth:`frames`, send ``SignBatch(rid, plan.frame(chunk))`` and
    pass its reply to :meth:`record`; then :meth:`next_attempt` gives the delay before the
    next attempt, or None when :attr:`results` is final. Retryable refusals are retried up to
    *retries* times with the same items -- the same idempotency keys.
    """

    def __init__(self, items: Sequence[SignItem], max_batch: int, retries: int) -> None:
        self.items = with_idempotency_keys(items)
        self.max_batch = max_batch
        self.retries = retries
        self.attempt = 0
        self.results: list[ItemResult | None] = [None] * len(self.items)
        self._todo = list(range(len(self.items)))
        self._retry: list[int] = []

    def frames(self) -> list[list[int]]:
        """This attempt's frames, as lists of item indexes."""
        todo, size = self._todo, self.max_batch
        return [todo[s : s + size] for s in range(0, len(todo), size)]

    def frame(self, chunk: Sequence[int]) -> tuple[SignItem, ...]:
        return tuple(self.items[i] for i in chunk)

    def record(self, chunk: Sequence[int], reply: object) -> None:
        """Store the reply to the frame of *chunk*.

        Raises:
            ClientError: the reply is not an answer to a SIGN_BATCH of that size.
        """
        try:
            outcome = results_for(reply, len(chunk))
        except ValueError as exc:
            raise ClientError(str(exc)) from None
        for i, result in zip(chunk, outcome, strict=True):
            self.results[i] = result
            if self.attempt < self.retries and retryable(result):
                self._retry.append(i)

    def next_attempt(self) -> float | None:
        """Seconds to wait before the next attempt, or None: no item is left to retry."""
        if not self._retry:
            return None
        delay = retry_delay([self.results[i] for i in self._retry])  # type: ignore[misc]
        self._todo, self._retry = sorted(self._retry), []
        self.attempt += 1
        return delay


def retry_single(result: ItemResult, attempt: int, retries: int) -> float | None:
    """For a single request's *result* after *attempt* (0-based): seconds to wait before
    sending it again, or None when it is final."""
    if attempt >= retries or not retryable(result):
        return None
    return retry_delay([result])


def retryable(result: ItemResult) -> bool:
    """A client retries this result by itself (the condition was the engine's, e.g. BUSY)."""
    return result.error in RETRYABLE


# Replies both clients read the same way.


def connection_error(event: object) -> ClientError | None:
    """The :class:`ClientError` for a connection-level ERROR (request id 0: the connection is
    over), else None. Codes this client does not know are shown by number."""
    if not isinstance(event, Error) or event.request_id != 0:
        return None
    name = event.code.name if isinstance(event.code, ErrorCode) else f"error {event.code}"
    return ClientError(f"{name}: {event.message}", event.code)


def read_reply(event: Any, pending: dict[int, Waiter]) -> Welcome | ClientError | None:
    """What a client's reader does with one event from the engine (not NEED_DATA, not None).

    Returns:
        The :class:`Welcome` (the handshake's answer); the :class:`ClientError` of a
        connection-level ERROR (the connection is over: the caller fails every request); else
        None: a GOAWAY is noted only (requests above its last_request_id fail when the
        connection closes), and any other reply is handed to the request waiting for it.
    """
    if isinstance(event, Welcome):
        return event
    if isinstance(event, GoAway):
        return None
    gone = connection_error(event)
    if gone is not None:
        return gone
    waiter = pending.pop(event.request_id, None)
    if waiter is not None:
        waiter.resolve(event)
    return None


def next_outcome(codec: Connection, pending: dict[int, Waiter]) -> Any:
    """Read the events buffered in *codec*, each as :func:`read_reply` does, until one needs
    the client: NEED_DATA (feed the codec more bytes), the :class:`Welcome`, or the
    :class:`ClientError` that ends the connection (a connection-level ERROR, or the engine
    closed it).

    Raises:
        RemoteProtocolError: the engine's bytes break the protocol.
    """
    while True:
        event = codec.next_event()
        if event is NEED_DATA:
            return NEED_DATA
        if event is None:
            return ClientError("the engine closed the connection")
        outcome = read_reply(event, pending)
        if outcome is not None:
            return outcome


def check_pong(reply: object, data: bytes) -> None:
    """Raise :class:`ClientError` unless *reply* is the PONG for a PING of *data*."""
    if not isinstance(reply, Pong) or reply.data != data:
        raise ClientError("bad PONG")


def keys_of(reply: object) -> list[KeyInfo]:
    """The keys of a LIST_KEYS reply; the engine's refusal as :class:`ClientError`."""
    if isinstance(reply, Error):
        raise ClientError(reply.message, reply.code)
    if not isinstance(reply, Keys):
        raise ClientError(f"unexpected {type(reply).__name__}")
    return list(reply.keys)


def fail_waiters(pending: dict[int, Waiter], why: str, code: Any = None) -> None:
    """Resolve every request still waiting for a reply with ``ClientError(why, code)``: the
    connection is gone, so no reply will come."""
    for waiter in list(pending.values()):
        waiter.resolve(ClientError(why, code))
    pending.clear()


def tcp_target(address: str) -> tuple[str, int]:
    """The host and port of a ``HOST:PORT`` address (``[v6]:PORT`` too).

    Raises:
        ClientError: the address is not of that form.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClientError(f"address must be unix:PATH or HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def tls_context(
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    ca: str | os.PathLike[str] | None,
) -> ssl.SSLContext:
    """The client's TLS context: the engine's certificate checked against *ca* (the system's
    roots when None), and a client certificate when *cert* is given (*key*: its private key,
    when not in the same file).

    Raises:
        OSError, ssl.SSLError: a file cannot be read or used.
    """
    ctx = ssl.create_default_context(cafile=os.fspath(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
    return ctx
