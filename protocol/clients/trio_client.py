"""A trio client of the engine for portal backends (pipelining, coalescing, retrying).

    async with open_client("unix:var/dccsign.sock") as client:
        result = await client.sign(dcc, account="uzi:123")

The same contract as the blocking :class:`~dccsign.protocol.clients.blocking.Client`: many tasks may
call :meth:`TrioClient.sign` / :meth:`TrioClient.sign_batch` at once over one connection
(replies are matched by request id); concurrent :meth:`~TrioClient.sign` calls are coalesced
into SIGN_BATCH frames (``coalesce.Coalescer``); retryable refusals such as BUSY are retried
after the engine's retry-after hint with the same idempotency keys, so a retry never produces a
second signature.

Addresses: ``unix:/path/to/socket`` or ``HOST:PORT`` (TLS with a client certificate).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import wire
from . import coalesce
from .coalesce import DEFAULT_WINDOW, ClientError, Coalescer, Single, Waiter
from .tls_stream import open_tls_over_tcp

__all__ = ["TrioClient", "open_client"]


class TrioClient:
    """One connection to the engine; create it with :func:`open_client`.

    Raises (from every call):
        ClientError: the connection is gone, the engine refused the whole request, or no
            reply came within ``timeout``.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        timeout: float,
        retries: int,
        coalesce_window: float | None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.coalesce_window = coalesce_window
        self.welcome: wire.Welcome | None = None
        self._stream = stream
        self._codec = wire.Connection(wire.CLIENT)
        self._send_lock = trio.Lock()
        self._requests = coalesce.Requests()
        self._welcomed = trio.Event()
        self._coalescer: Coalescer[Single] | None = None
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None  # runs the reader, flusher and frames

    # -- plumbing -----------------------------------------------------------------------

    async def _send(self, event: Any) -> None:
        async with self._send_lock:
            await self._send_locked(event)

    async def _send_locked(self, event: Any) -> None:
        self._requests.check_open()
        try:
            await self._stream.send_all(coalesce.request_bytes(self._codec, event))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"send failed: {exc}")
            raise ClientError(f"connection closed: {exc}") from None

    async def _reader(self) -> None:
        need_data = wire.NEED_DATA
        try:
            while True:
                outcome = coalesce.next_outcome(self._codec, self._requests.pending)
                if outcome is need_data:
                    self._codec.receive_data(await self._stream.receive_some(1 << 16))
                    continue
                if isinstance(outcome, ClientError):
                    self._fail(str(outcome), outcome.code)
                    return
                self.welcome = outcome
                self._welcomed.set()
        except trio.Cancelled:
            raise
        except Exception as exc:  # the stream is unusable: fail everyone waiting
            self._fail(f"connection failed: {exc}")

    def _fail(self, why: str, code: Any = None) -> None:
        self._requests.fail(why, code)
        self._welcomed.set()
        self._wake.set()

    async def _submit(self, make: Any, waiter: Waiter) -> int:
        async with self._send_lock:
            # Request ids must rise on the wire: take the next one only when it is our turn.
            rid = self._requests.add(waiter)
            try:
                await self._send_locked(make(rid))
            except ClientError:
                self._requests.forget(rid)
                raise
        return rid

    async def _call(self, make: Any) -> Any:
        waiter = Waiter(trio.Event())
        rid = await self._submit(make, waiter)
        with trio.move_on_after(self.timeout):
            await waiter.done.wait()
        if not waiter.done.is_set():
            self._requests.forget(rid)
            raise ClientError(f"no reply within {self.timeout} s")
        return waiter.outcome()

    # -- API ----------------------------------------------------------------------------

    async def ping(self, data: bytes = b"") -> float:
        """Round-trip time in seconds."""
        start = trio.current_time()
        coalesce.check_pong(await self._call(lambda rid: wire.Ping(rid, data)), data)
        return trio.current_time() - start

    async def list_keys(self) -> list[wire.KeyInfo]:
        return coalesce.keys_of(await self._call(lambda rid: wire.ListKeys(rid)))

    async def sign(
        self,
        dcc: dict[str, Any],
        *,
        account: str,
        operator: str | None = None,
        kid: bytes | None = None,
        validity_days: int | None = None,
        idempotency_key: bytes | str | None = None,
    ) -> wire.ItemResult:
        """Sign one DCC; concurrent calls share frames; retryable refusals are retried."""
        (item,) = coalesce.with_idempotency_keys(
            [wire.SignItem(dcc, account, operator, kid, validity_days, idempotency_key)]
        )
        if self.coalesce_window is None:
            return (await self.sign_batch([item]))[0]
        for attempt in range(self.retries + 1):
            single = Single(trio.Event(), item)
            self._enqueue(single)
            with trio.move_on_after(self.timeout):
                await single.done.wait()
            if not single.done.is_set():
                raise ClientError(f"no reply within {self.timeout} s")
            result = single.outcome()
            delay = coalesce.retry_single(result, attempt, self.retries)
            if delay is None:
                break
            await trio.sleep(delay)
        return result

    async def sign_batch(self, items: Sequence[wire.SignItem]) -> list[wire.ItemResult]:
        """Sign many DCCs in SIGN_BATCH frames of the engine's ``max_batch`` (sent pipelined);
        results in order; retryable refusals retried with the same idempotency keys."""
        assert self.welcome is not None
        plan = coalesce.BatchRetry(items, self.welcome.max_batch, self.retries)

        async def one(chunk: list[int]) -> None:
            plan.record(chunk, await self._call(lambda rid: wire.SignBatch(rid, plan.frame(chunk))))

        while True:
            chunks = plan.frames()
            if len(chunks) == 1:
                await one(chunks[0])
            else:
                try:
                    async with trio.open_nursery() as nursery:
                        for chunk in chunks:
                            nursery.start_soon(one, chunk)
                except BaseExceptionGroup as group:
                    # One connection: if one frame failed they all did; report the first.
                    first = group.exceptions[0]
                    raise first if isinstance(first, ClientError) else group from None
            delay = plan.next_attempt()
            if delay is None:
                return plan.results  # type: ignore[return-value]
            await trio.sleep(delay)

    async def aclose(self) -> None:
        self._fail("client closed")
        await self._stream.aclose()

    # -- coalescing ---------------------------------------------------------------------

    def _enqueue(self, single: Single) -> None:
        self._requests.check_open()
        assert self._coalescer is not None
        self._coalescer.add(single, trio.current_time())
        self._wake.set()

    async def _flusher(self) -> None:
        coalescer = self._coalescer
        assert coalescer is not None
        while True:
            if self._requests.closed:
                gone = self._requests.closed_error()
                while len(coalescer):
                    for single in coalescer.take():
                        single.resolve(gone)
                return
            # One checkpoint first: callers that are already runnable join this frame.
            await trio.lowlevel.checkpoint()
            now = trio.current_time()
            due = coalescer.due(now)
            if due is None or due > now:
                self._wake = trio.Event()
                with trio.move_on_at(due if due is not None else float("inf")):
                    await self._wake.wait()
                continue
            singles = coalescer.take()
            assert self._nursery is not None
            self._nursery.start_soon(self._send_coalesced, singles)

    async def _send_coalesced(self, singles: list[Single]) -> None:
        assert self._coalescer is not None
        frame = Waiter(trio.Event())
        items = tuple(s.item for s in singles)
        try:
            try:
                rid = await self._submit(lambda rid: wire.SignBatch(rid, items), frame)
            except ClientError as exc:
                frame.resolve(exc)
            else:
                with trio.move_on_after(self.timeout):
                    await frame.done.wait()
                if not frame.done.is_set():
                    self._requests.forget(rid)
                    frame.resolve(ClientError(f"no reply within {self.timeout} s"))
            for single, result in zip(
                singles, coalesce.outcomes_for(frame.reply, len(singles)), strict=True
            ):
                single.resolve(result)
        finally:
            self._coalescer.answered()
            self._wake.set()


@asynccontextmanager
async def open_client(
    address: str,
    *,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    request_timeout: float = 60.0,
    retries: int = 8,
    agent: str = "dccsign-trio-client",
    coalesce_window: float | None = DEFAULT_WINDOW,
) -> AsyncIterator[TrioClient]:
    """Connect, say HELLO, and yield the client once the engine answered WELCOME; the
    connection closes when the block ends. *request_timeout* bounds the handshake and each
    request's wait for its reply (seconds).

    Raises:
        ClientError: cannot connect, or the engine refused the connection.
    """
    stream = await _connect(address, cert, key, ca)
    client = TrioClient(
        stream, timeout=request_timeout, retries=retries, coalesce_window=coalesce_window
    )
    async with trio.open_nursery() as nursery:
        client._nursery = nursery
        nursery.start_soon(client._reader)
        try:
            await client._send(client._codec.make_hello(agent))
            with trio.move_on_after(request_timeout):
                await client._welcomed.wait()
            if client.welcome is None:
                raise client._requests.no_welcome(address)
            if coalesce_window is not None:
                client._coalescer = Coalescer(coalesce_window, client.welcome.max_batch)
                nursery.start_soon(client._flusher)
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


async def _connect(
    address: str,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    ca: str | os.PathLike[str] | None,
) -> trio.abc.Stream:
    try:
        if address.startswith("unix:"):
            return await trio.open_unix_socket(address[5:])
        host, port = coalesce.tcp_target(address)
        ctx = coalesce.tls_context(cert, key, ca)
        return await open_tls_over_tcp(host, port, ctx)
    except (OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
        raise ClientError(f"cannot connect to {address}: {exc}") from None
