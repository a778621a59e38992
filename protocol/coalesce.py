"""What both clients share, without I/O: coalescing single requests into batch frames, and
turning replies into per-item results for the retry loop.

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

import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar

from .codes import RETRYABLE, ErrorCode
from .wire import Error, ItemResult, KeyInfo, Keys, Pong, SignBatchResult, SignItem

__all__ = [
    "DEFAULT_WINDOW",
    "ClientError",
    "Coalescer",
    "Single",
    "Waiter",
    "check_pong",
    "connection_error",
    "keys_of",
    "outcomes_for",
    "results_for",
    "retry_delay",
    "retryable",
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
