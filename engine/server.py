"""The engine's trio server: portal backends connect over TLS (client certificates) or a Unix
socket, and send frames of the wire protocol (protocol/SPEC.md).

Per connection: one reader (the sans-IO codec turns bytes into events), one task per request,
one writer that coalesces every frame ready into one socket write. Bounded everywhere:

* requests in progress per connection (``max_in_flight``) and items in progress in the whole
  engine (``max_pending_items``): beyond either, the request gets BUSY at once, with a
  retry-after hint, instead of a queue that grows;
* the age of the oldest request in progress (``queue_target``): when it is older than that,
  the engine is behind, and new requests get BUSY unless little is in progress
  (``queue_floor`` items). Counts alone cannot bound latency (the same count is 10 ms of work
  for one mix and 200 ms for another); the age of the oldest request measures it directly,
  so under overload the accepted requests keep their latency and the excess is refused;
* the outbound queue per connection: when a client does not read its replies, the queue fills,
  the request tasks wait on it, and the reader stops reading -- TCP flow control pushes back
  on the client instead of the engine buffering without bound;
* a deadline per request (DEADLINE_EXCEEDED).

Identity: the TLS client certificate's subject common name, or, on the Unix socket, the peer's
uid mapped to a client name by the policy file. A malformed frame closes only its connection,
after an ERROR frame where the codec can produce one. :meth:`Server.drain` (SIGTERM) stops
accepting, sends GOAWAY, finishes what is in progress and returns.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .dispatch import Dispatcher
from .metrics import Metrics
from .protocol import wire
from .protocol.codes import ErrorCode

__all__ = ["Limits", "Server"]

LOGGER = logging.getLogger("dccsign.serve")


@dataclass(frozen=True)
class Limits:
    """Server limits (the WELCOME frame announces the per-connection ones)."""

    max_frame: int = 16 * 1024 * 1024
    max_batch: int = 1000
    max_in_flight: int = 32  # requests in progress per connection
    max_pending_items: int = 20_000  # items in progress in the whole engine
    deadline: float = 10.0  # seconds per request
    queue_target: float = 0.02  # seconds the oldest request may be in progress (0: off)
    queue_floor: int = 256  # items in progress below which queue_target does not refuse
    busy_retry_ms: int = 100
    outbound_frames: int = 64  # reply frames queued per connection


class Server:
    """Serves the wire protocol with *dispatcher* (see the module docstring)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        resolve_uid: Callable[[int], str | None] | None = None,
        agent: str = "dccsign",
    ) -> None:
        self.dispatcher = dispatcher
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.resolve_uid = resolve_uid or (lambda uid: dispatcher.policy.current().resolve_uid(uid))
        self.agent = agent
        self.pending_items = 0
        # Start times of the requests in progress, oldest first (dicts keep insertion order).
        self._started: dict[object, float] = {}
        self.draining = trio.Event()
        self._listener_scopes: list[trio.CancelScope] = []
        self._connections = 0
        self._idle = trio.Event()
        self._idle.set()

    # -- listeners ----------------------------------------------------------------------

    async def serve_unix(
        self, path: str | os.PathLike[str], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on a Unix socket (mode 0600, created fresh); identity from the peer's uid."""
        path = os.fspath(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(128)
        listener = trio.SocketListener(sock)

        async def handler(stream: trio.SocketStream) -> None:
            raw = stream.socket.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            _pid, uid, _gid = struct.unpack("3i", raw)
            await self._connection(stream, self.resolve_uid(uid), f"uid {uid}")

        await self._serve([listener], handler, task_status)

    async def serve_tcp(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on TCP with TLS; *ssl_context* must require client certificates. Reports
        the bound port through ``task_status`` (port 0 picks a free one)."""
        listeners = await trio.open_tcp_listeners(port, host=host)

        async def handler(stream: trio.SocketStream) -> None:
            tls = trio.SSLStream(stream, ssl_context, server_side=True)
            try:
                with trio.fail_after(10):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.metrics.connections_refused.labels("tls").inc()
                LOGGER.info("TLS handshake failed: %s", exc)
                await trio.aclose_forcefully(tls)
                return
            cert = tls.getpeercert()
            name = _common_name(cert) if cert else None
            await self._connection(tls, name, "tls")

        await self._serve(listeners, handler, task_status)

    async def _serve(
        self,
        listeners: list[trio.abc.Listener[Any]],
        handler: Callable[[Any], Awaitable[None]],
        task_status: Any,
    ) -> None:
        scope = trio.CancelScope()
        self._listener_scopes.append(scope)
        if self.draining.is_set():
            scope.cancel()
        async with trio.open_nursery() as nursery:
            with scope:
                task_status.started(
                    listeners[0].socket.getsockname()
                    if hasattr(listeners[0], "socket")
                    else None
                )
                await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
            for listener in listeners:
                await listener.aclose()

    async def drain(self) -> None:
        """Stop accepting, tell every connection GOAWAY, wait until in-flight work is done."""
        self.draining.set()
        for scope in self._listener_scopes:
            scope.cancel()
        await self._idle.wait()

    # -- one connection -----------------------------------------------------------------

    async def _connection(self, stream: Any, client: str | None, how: str) -> None:
        self._connections += 1
        self._idle = trio.Event() if self._connections == 1 else self._idle
        self.metrics.connections.inc()
        try:
            await self._converse(stream, client, how)
        finally:
            self.metrics.connections.dec()
            self._connections -= 1
            if self._connections == 0:
                self._idle.set()
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: Any, client: str | None, how: str) -> None:
        limits = self.limits
        codec = wire.Connection(wire.SERVER, max_frame=limits.max_frame)
        out_send, out_recv = trio.open_memory_channel[bytes](limits.outbound_frames)
        async with trio.open_nursery() as outer:
            outer.start_soon(self._writer, stream, out_recv)
            reader = trio.CancelScope()
            watcher = trio.CancelScope()

            async def goaway_on_drain() -> None:
                with watcher:
                    await self.draining.wait()
                    reader.cancel()

            outer.start_soon(goaway_on_drain)
            async with out_send:
                # Request tasks live in this nursery: leaving it waits for all of them.
                async with trio.open_nursery() as nursery:
                    await self._read(stream, codec, client, how, out_send, nursery, reader)
                watcher.cancel()
                if self.draining.is_set() and codec.state is wire.State.OPEN:
                    # Requests up to the last id received were accepted and have been answered.
                    await out_send.send(
                        codec.send(
                            wire.GoAway(
                                last_request_id=codec.last_request_id,
                                reason="the engine is shutting down",
                            )
                        )
                    )

    async def _read(
        self,
        stream: Any,
        codec: Any,
        client: str | None,
        how: str,
        out_send: trio.MemorySendChannel[bytes],
        nursery: trio.Nursery,
        reader: trio.CancelScope,
    ) -> None:
        """Read frames until EOF, a protocol error or drain."""
        in_flight = 0
        with reader:
            while True:
                try:
                    data = await stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                try:
                    codec.receive_data(data)
                    while True:
                        event = codec.next_event()
                        if event is wire.NEED_DATA:
                            break
                        if isinstance(event, wire.Hello):
                            if client is None:
                                # Refused in the handshake (an ERROR instead of WELCOME): the
                                # client learns why before it sends anything else.
                                self.metrics.connections_refused.labels("identity").inc()
                                refusal = wire.Error(
                                    request_id=0,
                                    code=ErrorCode.UNAUTHENTICATED,
                                    message=f"no client is configured for {how}",
                                    fatal=True,
                                )
                                await out_send.send(codec.send(refusal))
                                return
                            welcome = codec.make_welcome(
                                max_batch=self.limits.max_batch,
                                max_in_flight=self.limits.max_in_flight,
                                server=self.agent,
                            )
                            await out_send.send(codec.send(welcome))
                            continue
                        if isinstance(event, wire.Ping):
                            pong = wire.Pong(request_id=event.request_id, data=event.data)
                            await out_send.send(codec.send(pong))
                        elif isinstance(event, wire.Pong):
                            pass  # SPEC.md §6.3: either side may ping; ours need no answer
                        elif isinstance(event, wire.Error):
                            # The codec lets a client send only a connection-level ERROR (id
                            # 0): it is leaving. Requests in progress still finish (audited),
                            # their replies have nowhere to go.
                            LOGGER.info(
                                "client %s ended the connection: %s %s",
                                client, getattr(event.code, "name", event.code), event.message,
                            )
                            return
                        elif isinstance(event, wire.ListKeys):
                            await out_send.send(codec.send(self._keys(event)))
                        elif isinstance(event, wire.Sign | wire.SignBatch):
                            items = (
                                [event.item] if isinstance(event, wire.Sign) else list(event.items)
                            )
                            busy = self._busy(in_flight, len(items))
                            if busy:
                                self.metrics.busy.labels(client).inc()
                                await out_send.send(codec.send(self._busy_reply(event, busy)))
                                continue
                            in_flight += 1
                            now = trio.current_time()
                            self.pending_items += len(items)
                            self.metrics.pending.set(self.pending_items)

                            async def request(
                                ev: Any = event, its: list[Any] = items, read: float = now
                            ) -> None:
                                nonlocal in_flight
                                counted = True
                                self.metrics.observe_stage("start", trio.current_time() - read)
                                try:
                                    reply = await self._sign(client, ev, its, nursery)
                                    # The slot frees before the reply is queued: a client may
                                    # send its next request the moment it reads this one.
                                    in_flight -= 1
                                    counted = False
                                    await out_send.send(codec.send(reply))
                                except (
                                    trio.BrokenResourceError,
                                    trio.ClosedResourceError,
                                    wire.LocalProtocolError,  # the connection has failed
                                ):
                                    pass
                                finally:
                                    if counted:
                                        in_flight -= 1

                            nursery.start_soon(request)
                        else:
                            raise wire.RemoteProtocolError(
                                f"a client may not send {type(event).__name__} frames",
                                code=ErrorCode.PROTOCOL,
                            )
                except wire.WireProtocolError as exc:
                    LOGGER.info("closing a connection (%s): %s", how, exc)
                    self.metrics.protocol_errors.inc()
                    frame = codec.error_frame(exc)
                    if frame:
                        await out_send.send(frame)
                    break

    async def _writer(self, stream: Any, frames: trio.MemoryReceiveChannel[bytes]) -> None:
        async with frames:
            async for frame in frames:
                batch = [frame]
                while True:
                    try:
                        batch.append(frames.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await stream.send_all(b"".join(batch))  # coalesced: one write
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

    # -- replies ------------------------------------------------------------------------

    def _keys(self, event: wire.ListKeys) -> wire.Keys:
        return wire.Keys(
            request_id=event.request_id,
            keys=tuple(
                wire.KeyInfo(
                    kid=k.dsc.kid,
                    alg=k.dsc.alg,
                    types="".join(t for t in "vtr" if k.dsc.allows(t)),
                    state=k.state,
                    dsc=k.dsc.der,
                    not_before=int(k.dsc.not_before.timestamp()),
                    not_after=int(k.dsc.not_after.timestamp()),
                )
                for k in self.dispatcher.keys
            ),
        )

    def _busy(self, in_flight: int, items: int) -> str | None:
        if self.draining.is_set():
            return "the engine is shutting down"
        if items > self.limits.max_batch:
            return None  # the codec refuses oversized batches; not a load question
        if in_flight >= self.limits.max_in_flight:
            return f"more than {self.limits.max_in_flight} requests in progress on this connection"
        if self.pending_items + items > self.limits.max_pending_items:
            return "the engine is at capacity"
        target = self.limits.queue_target
        if target and self._started and self.pending_items + items > self.limits.queue_floor:
            age = trio.current_time() - next(iter(self._started.values()))
            if age > target:
                return f"the engine is behind (oldest request in progress for {age * 1000:.0f} ms)"
        return None

    def _busy_reply(self, event: Any, why: str) -> wire.Error:
        code = ErrorCode.SHUTTING_DOWN if self.draining.is_set() else ErrorCode.BUSY
        return wire.Error(
            request_id=event.request_id,
            code=code,
            message=why,
            retry_after_ms=self.limits.busy_retry_ms,
        )

    async def _sign(self, client: str, event: Any, items: list[Any], nursery: trio.Nursery) -> Any:
        """The reply to a sign request: its results, or DEADLINE_EXCEEDED for every item when
        they take longer than the deadline.

        The work itself is not cancelled at the deadline: items already handed to keyd may be
        signed and audited, and cancelling would lose those results (and leave quota units
        and idempotency entries half done). It runs on in *nursery*, still counted in
        ``pending_items``; its results land in the idempotency cache, so a retry with the
        same key gets the first signature, never a second one.
        """
        start = trio.current_time()
        box: list[list[Any]] = []
        finished = trio.Event()
        types = [""] * len(items)
        token = object()
        self._started[token] = start

        async def work() -> None:
            try:
                box.append(await self.dispatcher.sign(client, items, types))
            finally:
                del self._started[token]
                self.pending_items -= len(items)
                self.metrics.pending.set(self.pending_items)
                finished.set()

        nursery.start_soon(work)
        with trio.move_on_after(self.limits.deadline):
            await finished.wait()
        if box:
            results = box[0]
        else:
            results = [
                wire.ItemResult(
                    error=ErrorCode.DEADLINE_EXCEEDED,
                    message=f"not done within {self.limits.deadline} s",
                    retry_after_ms=self.limits.busy_retry_ms,
                )
            ] * len(items)
        self.metrics.observe(client, results, types, trio.current_time() - start)
        if isinstance(event, wire.Sign):
            return wire.SignResult(request_id=event.request_id, result=results[0])
        return wire.SignBatchResult(request_id=event.request_id, results=tuple(results))


def _common_name(cert: dict[str, Any]) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
