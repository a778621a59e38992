"""A trio client of keyd: pipelined requests over a few Unix-socket connections.

The engine talks to keyd from its trio event loop. Each connection carries many requests at
once (keyd answers them in order; replies are matched by request id), so one slow batch does
not hold the loop, and two connections let keyd sign on two cores.

Contract shared with :class:`~dccsign.keyd.client.KeydClient`: a broken connection fails every
request in flight on it with a retryable :class:`KeydError`; nothing was handed out for those
requests, so a retry cannot produce a certificate the audit log lacks.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence

import trio

from .. import native
from ..protocol.keyd import (
    NEED_DATA,
    ColumnsResult,
    Connection,
    Describe,
    ItemError,
    KeydColumns,
    KeydProtocolError,
    KidsResult,
    SignColumns,
    SignKids,
    SignMany,
    SignPart,
    SignPayloads,
)
from .client import KeydError, KeyList, check_reply, keys_of, results_of

__all__ = ["TrioKeydClient"]

LOGGER = logging.getLogger("dccsign.serve")


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: object = None


class _Link:
    """One pipelined connection: a send lock, and a reader task that resolves waiters."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.codec = Connection(scan=native.cbor_scan)
        self.send_lock = trio.Lock()
        # Per request id: a task waiting for the reply (_Waiter), or a function the reader
        # calls with it (TrioKeydClient.submit_kids).
        self.waiting: dict[int, _Waiter | Callable[[object], None]] = {}
        self.broken: str | None = None

    async def reader(self) -> None:
        try:
            while True:
                event = self.codec.next_event()
                if event is NEED_DATA:
                    data = await self.stream.receive_some(1 << 16)
                    if not data:
                        raise KeydError("keyd closed the connection")
                    self.codec.receive_data(data)
                    continue
                if event is None:
                    raise KeydError("keyd closed the connection")
                waiter = self.waiting.pop(getattr(event, "request_id", 0), None)
                if waiter is None:
                    raise KeydError("keyd answered a request nobody asked", retryable=False)
                _resolve(waiter, event)
        except (KeydError, KeydProtocolError, trio.BrokenResourceError, OSError) as exc:
            self.fail(f"keyd connection failed: {exc}")
        except trio.ClosedResourceError:
            self.fail("keyd connection closed")

    def fail(self, why: str) -> None:
        self.broken = why
        waiting = list(self.waiting.values())
        self.waiting.clear()
        for waiter in waiting:
            _resolve(waiter, KeydError(why))


def _resolve(waiter: _Waiter | Callable[[object], None], reply: object) -> None:
    """Hand *reply* (an event, or a KeydError) to whoever waits for it. A callback that
    raises is a bug of its own: logged, and the connection goes on serving the others."""
    if type(waiter) is _Waiter:
        waiter.reply = reply
        waiter.done.set()
        return
    try:
        waiter(reply)  # type: ignore[operator]
    except Exception:
        LOGGER.exception("handling a keyd reply failed")


class TrioKeydClient:
    """Connections to keyd at *path*, used round-robin; open with :meth:`connect` inside a
    nursery that runs their readers.

    Raises (from every request):
        KeydError: keyd unreachable, the connection broke (retryable), or keyd answered with
            an error frame.
    """

    def __init__(self, path: str | os.PathLike[str], connections: int = 2) -> None:
        self.path = os.fspath(path)
        self.size = connections
        self._links: list[_Link] = []
        self._ids = itertools.count(1)
        self._next = itertools.count()
        self._nursery: trio.Nursery | None = None

    async def connect(self, nursery: trio.Nursery) -> None:
        """Open the connections; their reader tasks run in *nursery*."""
        self._nursery = nursery
        self._links = [await self._open() for _ in range(self.size)]

    async def _open(self) -> _Link:
        assert self._nursery is not None
        try:
            stream = await trio.open_unix_socket(self.path)
        except OSError as exc:
            raise KeydError(f"cannot reach keyd at {self.path}: {exc.strerror or exc}") from None
        link = _Link(stream)
        self._nursery.start_soon(link.reader)
        return link

    @property
    def broken(self) -> bool:
        """Every connection is broken (keyd died or went away)."""
        return all(link.broken is not None for link in self._links)

    async def reconnect(self) -> None:
        """Replace broken connections (after keyd was restarted)."""
        for i, link in enumerate(self._links):
            if link.broken is not None:
                self._links[i] = await self._open()

    async def aclose(self) -> None:
        for link in self._links:
            link.fail("client closed")
            await link.stream.aclose()

    async def _send(
        self,
        msg: Describe | SignPayloads | SignMany | SignColumns | SignKids,
        waiter: _Waiter | Callable[[object], None],
    ) -> None:
        """Send *msg* on the next usable connection; its reply (or the KeydError of a
        connection that breaks first) goes to *waiter*.

        Raises:
            KeydError: no connection to keyd (then *waiter* is not called).
        """
        links = [link for link in self._links if link.broken is None]
        if not links:
            raise KeydError("no connection to keyd")
        link = links[next(self._next) % len(links)]
        link.waiting[msg.request_id] = waiter
        try:
            async with link.send_lock:
                await link.stream.send_all(link.codec.send(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            link.fail(f"keyd connection failed: {exc}")

    async def _call(
        self, msg: Describe | SignPayloads | SignMany | SignColumns | SignKids
    ) -> object:
        waiter = _Waiter()
        await self._send(msg, waiter)
        await waiter.done.wait()
        reply = waiter.reply
        if isinstance(reply, KeydError):
            raise reply
        check_reply(reply)
        return reply

    async def describe(self) -> KeyList:
        """keyd's keys, and its audit state in ``.audit`` (:class:`KeyList`)."""
        return keys_of(await self._call(Describe(next(self._ids))))

    async def sign(
        self,
        kid: bytes,
        payloads: Sequence[bytes],
        *,
        client: str,
        account: str,
        operator: str | None = None,
    ) -> list[bytes | tuple[ItemError, str]]:
        """Signatures (or per-item refusals) for *payloads*, in order."""
        msg = SignPayloads(next(self._ids), kid, client, account, tuple(payloads), operator)
        return results_of(await self._call(msg), len(payloads))

    async def sign_many(
        self, kid: bytes, parts: Sequence[SignPart]
    ) -> list[bytes | tuple[ItemError, str]]:
        """One SIGN_MANY for *parts*: results over the parts' payloads, in order."""
        msg = SignMany(next(self._ids), kid, tuple(parts))
        return results_of(await self._call(msg), sum(len(p.payloads) for p in parts))

    async def sign_columns(self, kid: bytes, columns: KeydColumns) -> ColumnsResult:
        """One SIGN_COLUMNS for *columns*: per item, in order, its signature or refusal, as
        columns (:class:`~dccsign.protocol.keyd.ColumnsResult`)."""
        reply = await self._call(SignColumns(next(self._ids), kid, columns))
        if not isinstance(reply, ColumnsResult) or len(reply) != len(columns):
            raise KeydError("malformed reply from keyd", retryable=False)
        return reply

    async def sign_kids(self, batches: Sequence[tuple[bytes, KeydColumns]]) -> list[ColumnsResult]:
        """One SIGN_KIDS for several kids' batches (``(kid, columns)``, kids distinct): per
        batch, keyd's answer as :meth:`sign_columns` gives it, in order; keyd commits their
        audit records at once."""
        msg = SignKids(next(self._ids), tuple(SignColumns(0, k, c) for k, c in batches))
        return _kids_results(await self._call(msg), batches)

    async def submit_kids(
        self,
        batches: Sequence[tuple[bytes, KeydColumns]],
        deliver: Callable[[list[ColumnsResult] | KeydError], None],
    ) -> None:
        """:meth:`sign_kids` without a task waiting for the answer: returns once the
        message is sent, and *deliver* is called later -- from the connection's reader task,
        so it must not block -- with what :meth:`sign_kids` would return, or the
        :class:`KeydError` it would raise (a connection that breaks first included). A
        *deliver* that raises is logged; the connection goes on.

        Raises:
            KeydError: no connection to keyd (*deliver* is not called).
        """
        msg = SignKids(next(self._ids), tuple(SignColumns(0, k, c) for k, c in batches))

        def on_reply(reply: object) -> None:
            if isinstance(reply, KeydError):
                deliver(reply)
                return
            try:
                check_reply(reply)
                results = _kids_results(reply, batches)
            except KeydError as exc:
                deliver(exc)
                return
            deliver(results)

        await self._send(msg, on_reply)

    @property
    def connections(self) -> int:
        """How many connections are usable now."""
        return sum(link.broken is None for link in self._links)


def _kids_results(
    reply: object, batches: Sequence[tuple[bytes, KeydColumns]]
) -> list[ColumnsResult]:
    """keyd's answer to a SIGN_KIDS of *batches*, one ColumnsResult per batch.

    Raises:
        KeydError: the answer does not fit the request.
    """
    if (
        not isinstance(reply, KidsResult)
        or len(reply.results) != len(batches)
        or any(len(r) != len(c) for r, (_k, c) in zip(reply.results, batches, strict=True))
    ):
        raise KeydError("malformed reply from keyd", retryable=False)
    return list(reply.results)
