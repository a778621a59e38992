"""The engine's trio server: portal backends connect over TLS (client certificates) or a Unix
socket, and send frames of the wire protocol (protocol/SPEC.md).

Per connection (:class:`_Connection`): one reader (the sans-IO codec turns bytes into events),
one writer that coalesces every frame ready into one socket write, and a watchdog for the
connection's clocks (the requests' deadlines among them). A plain sign frame without
idempotency keys -- what portals send all day -- runs without a task of its own: the reader
prepares it and queues it for keyd, keyd's answer and the reply pool carry it on by callback
(:meth:`Server.sign_soon`), and its reply is written at once when the socket takes it. Any
other sign request gets a task. TCP connections
speak TLS through :class:`~dccsign.protocol.clients.tls_stream.TLSStream` (OpenSSL on the socket).

**Every peer is treated as hostile.** Nothing a client sends or fails to do ends the process:
a connection's failure -- a protocol violation, a reset, a client that stops reading, even an
unexpected error in the engine's own code for that connection -- ends that connection only
(logged, counted in ``dccsign_connections_closed``). Memory is bounded per connection and in
total, and the bounds count replies that are not written yet:

* a request holds its slot (``max_in_flight`` per connection) and its items
  (``max_connection_items`` per connection, ``max_client_items`` per client over all its
  connections, ``max_pending_items`` in the whole engine) from the moment it is accepted
  until its work is done *and* its reply has been written to the socket (or dropped with the
  connection). Beyond any of them, a request gets BUSY at once, with a retry-after hint,
  instead of a queue that grows; one client cannot take all of the engine's capacity;
* frames waiting to be written: once more than ``outbound_bytes`` wait, the reader stops
  reading that connection until the client reads -- TCP flow control then pushes back on the
  client. A client that reads nothing of its replies for ``idle_timeout`` is disconnected;
* what a frame may cost before it is decoded: ``max_frame`` bytes (announced in WELCOME), a
  bounded number of CBOR data items (counted first, natively: a small compressed bomb costs
  the count, not gigabytes), bodies over ``inline_decode`` bytes decoded in one of
  ``decode_threads`` worker threads rather than on the event loop, and partial frames over
  ``large_frame`` bytes buffered by at most ``large_frame_slots`` connections at once (the
  others wait, unread) and for at most ``frame_timeout`` seconds each;
* connections: at most ``max_connections``; HELLO must come within ``hello_timeout``; a
  connection with nothing in progress that sends nothing for ``idle_timeout`` gets GOAWAY and
  is closed (SPEC.md §7.3: clients PING every 30 s).

Latency under load: the age of the oldest request in progress (``queue_target``). When a
client's oldest request in progress is older than that, the engine is behind for it, and its
new requests get BUSY unless little is in progress in the engine (``queue_floor`` items):
counts alone cannot bound latency, the age of the oldest request measures it directly, so
accepted requests keep their latency and the excess is refused. It is judged per client, so
that the backlog is shed from the clients that make it: a portal that floods the engine is
refused, one that sends a request now and then is not. Each request also has a deadline: the
connection's watchdog answers DEADLINE_EXCEEDED when it passes, while the work goes on to its
end (its late result is dropped; its certificates count against the limits until then).

Fair share under overload: when the engine must refuse, it refuses first the clients that
hold more than their weighted share (``weight`` in the policy file) of the certificates in
progress: above ``FAIR_SHARE_ABOVE`` of ``max_pending_items`` only clients within their share
are admitted, and a client behind its ``queue_target`` is refused only while it holds at least
its share (docs/policy.md, "Fair share"). Overload is cheap: a sign request that would be
refused even with one certificate is answered BUSY from its frame header, its body never
decompressed or decoded (``dccsign_busy_from_header``).

Identity (:class:`Peer`): the TLS client certificate's subject common name is the policy
client ``cn:<common name>``; a Unix-socket peer is the client its uid maps to in the policy
(``unix_uids``, else ``uid:<uid>``), so a certificate can never pass for a local client. A peer
the policy does not know, or has disabled, gets ERROR UNAUTHENTICATED / CLIENT_DISABLED
instead of WELCOME (SPEC.md §3). :meth:`Server.drain` (SIGTERM) stops accepting, sends GOAWAY,
finishes what is in progress and returns.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import native
from ..protocol import wire
from ..protocol.clients.tls_stream import TLSStream
from ..protocol.codes import ErrorCode
from .dataplane import FrameReply
from .dispatch import Dispatcher
from .metrics import Metrics
from .policy import Policy

__all__ = ["Limits", "Peer", "Server"]

LOGGER = logging.getLogger("dccsign.serve")

#: Bytes asked of the socket per read.
READ_SIZE = 1 << 16

#: Above this share of ``max_pending_items`` in progress, only clients within their weighted
#: share of it are admitted: the rest of the capacity is kept for the clients a burst of
#: another would otherwise starve (the weights are in the policy file).
FAIR_SHARE_ABOVE = 0.75

#: Frame types that are sign requests: refused BUSY from their header when the engine would
#: refuse even a single certificate now.
_SIGN_FRAMES = frozenset({wire.FrameType.SIGN, wire.FrameType.SIGN_BATCH})


@dataclass(frozen=True)
class Limits:
    """Server limits (the WELCOME frame announces max_frame, max_batch and max_in_flight).

    See the module docstring for what each bounds. Sizes are bytes, times seconds.
    """

    max_frame: int = 4 * 1024 * 1024  # a 1,000-item batch of the largest QR-sized DCCs fits
    max_batch: int = 1000
    max_in_flight: int = 32  # requests per connection, until their replies are written
    max_connection_items: int = 5_000  # certificates per connection, likewise
    max_client_items: int = 10_000  # certificates per client (all its connections), likewise
    max_pending_items: int = 20_000  # certificates in the whole engine, likewise
    max_connections: int = 1_000
    deadline: float = 10.0  # per request
    queue_target: float = 0.02  # how old the oldest request in progress may be (0: off)
    queue_floor: int = 256  # items in progress below which queue_target does not refuse
    busy_retry_ms: int = 100
    outbound_bytes: int = 1024 * 1024  # frames waiting to be written before reading stops
    hello_timeout: float = 10.0
    idle_timeout: float = 120.0  # nothing to do; or the client reads nothing of its replies
    frame_timeout: float = 30.0  # one frame, from its first byte to its last
    large_frame: int = 256 * 1024  # a partial frame above this needs one of the slots
    large_frame_slots: int = 16
    inline_decode: int = 64 * 1024  # larger bodies decode in a worker thread
    decode_threads: int = 2


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a connection, as its transport says."""

    transport: str  # "tls" or "unix"
    common_name: str | None = None  # TLS: the client certificate's subject CN
    uid: int | None = None  # Unix socket: the peer's uid (SO_PEERCRED)

    def client_name(self, policy: Policy) -> str | None:
        """The policy client this peer is (it may not be in the policy), or None."""
        if self.transport == "tls":
            return None if self.common_name is None else f"cn:{self.common_name}"
        return None if self.uid is None else policy.unix_client(self.uid)

    def __str__(self) -> str:
        if self.transport == "tls":
            return f"TLS client certificate CN={self.common_name!r}"
        return f"Unix socket peer uid {self.uid}"


class Server:
    """Serves the wire protocol with *dispatcher* (see the module docstring).

    *scan* counts a body's CBOR data items before it is decoded (default: the native one).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        agent: str = "dccsign",
        scan: Callable[[bytes, int, int], int] | None = None,
        walk: Callable[..., Any] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.agent = agent
        self.scan = scan or native.cbor_scan
        #: Walks a sign request's body into item spans (protocol rules included).
        self.walk = walk or native.walk_sign_batch
        #: Certificates accepted and not yet done with (work finished and reply written), in
        #: all and by client.
        self.pending_items = 0
        # Read when scraped: setting a gauge on every request cost a lock each time.
        self.metrics.pending.set_function(lambda: self.pending_items)
        self._client_items: dict[str | None, int] = {}
        # Start times of each client's requests in progress, oldest first (dicts keep
        # insertion order).
        self._started: dict[str, dict[object, float]] = {}
        self.draining = trio.Event()
        self._listener_scopes: list[trio.CancelScope] = []
        # Connections counted against max_connections (an evicted one leaves at once), and
        # connections not yet closed (drain waits for none).
        self._slots: set[_Slot] = set()
        self._unidentified: dict[_Slot, None] = {}  # slots before HELLO, oldest first
        self._open = 0
        self._idle = trio.Event()
        self._idle.set()
        self._decoders = trio.CapacityLimiter(self.limits.decode_threads)
        self._large_frames = trio.Semaphore(self.limits.large_frame_slots)
        self._weights_of: Policy | None = None
        self._weight_cache: dict[str, int] = {}

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
        # As deep as the kernel allows (net.core.somaxconn), as trio does for TCP: a burst of
        # connects must wait in the queue, not fail with EAGAIN, while the engine accepts.
        sock.listen(0xFFFF)
        listener = trio.SocketListener(sock)

        async def opened(stream: trio.SocketStream) -> tuple[Any, Peer] | None:
            raw = stream.socket.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            _pid, uid, _gid = struct.unpack("3i", raw)
            return stream, Peer("unix", uid=uid)

        await self._serve([listener], opened, task_status)

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

        async def opened(stream: trio.SocketStream) -> tuple[Any, Peer] | None:
            try:
                tls = TLSStream.wrap(stream, ssl_context, server_side=True)
            except (ssl.SSLError, OSError) as exc:  # e.g. the peer reset before the wrap
                self.metrics.connections_refused.labels("tls").inc()
                LOGGER.info("TLS setup failed: %s", exc)
                return None
            # From here the socket is *tls*'s: it is closed here unless it is handed on.
            try:
                with trio.fail_after(self.limits.hello_timeout):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                self.metrics.connections_refused.labels("tls").inc()
                LOGGER.info("TLS handshake failed: %s", exc)
                await trio.aclose_forcefully(tls)
                return None
            except BaseException:  # evicted or stopped during the handshake
                await trio.aclose_forcefully(tls)
                raise
            cert = tls.getpeercert()
            return tls, Peer("tls", common_name=_common_name(cert) if cert else None)

        await self._serve(listeners, opened, task_status)

    async def _serve(
        self,
        listeners: list[trio.abc.Listener[Any]],
        opened: Callable[[Any], Awaitable[tuple[Any, Peer] | None]],
        task_status: Any,
    ) -> None:
        scope = trio.CancelScope()
        self._listener_scopes.append(scope)
        if self.draining.is_set():
            scope.cancel()

        async def handler(stream: Any) -> None:
            await self._connection(stream, opened)

        async with trio.open_nursery() as nursery:
            with scope:
                task_status.started(
                    listeners[0].socket.getsockname() if hasattr(listeners[0], "socket") else None
                )
                await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
            for listener in listeners:
                await listener.aclose()

    async def drain(self) -> None:
        """Stop accepting, tell every connection GOAWAY, wait until in-flight work is done."""
        self.draining.set()
        for scope in self._listener_scopes:
            scope.cancel()
        for slot in list(self._slots):
            if slot.conn is not None:
                slot.conn.finish()
        await self._idle.wait()

    async def serve_stream(self, stream: Any, peer: Peer) -> None:
        """Serve one stream that is already open, as *peer* (tests use memory streams;
        :meth:`serve_unix` and :meth:`serve_tcp` come here for every accepted connection)."""

        async def opened(stream: Any) -> tuple[Any, Peer]:
            return stream, peer

        await self._connection(stream, opened)

    async def _connection(
        self, stream: Any, opened: Callable[[Any], Awaitable[tuple[Any, Peer] | None]]
    ) -> None:
        """One accepted stream, from its admission to its close: the boundary that keeps a
        connection's failure from reaching the listener (and ending the process)."""
        if len(self._slots) >= self.limits.max_connections and not self._evict():
            self.metrics.connections_refused.labels("capacity").inc()
            LOGGER.warning(
                "refusing a connection: %d are open, all busy (--max-connections)",
                len(self._slots),
            )
            await trio.aclose_forcefully(stream)
            return
        slot = _Slot(trio.current_time())
        self._slots.add(slot)
        self._unidentified[slot] = None
        self._open += 1
        if self._open == 1:
            self._idle = trio.Event()
        self.metrics.connections.inc()
        try:
            identified = None  # stays None when the handshake is evicted (slot.scope)
            with slot.scope:
                identified = await opened(stream)
            if identified is not None and not slot.scope.cancel_called:
                stream, peer = identified
                slot.conn = _Connection(self, stream, peer, slot)
                await slot.conn.run()
        except* Exception:
            # A fault in the engine's own handling of this connection (a bug): the connection
            # ends, the process and every other connection go on. (except*: what the
            # connection's nurseries raise comes as a group, maybe with a Cancelled of the
            # engine stopping beside it, which goes on up.)
            self.metrics.connections_closed.labels("failure").inc()
            LOGGER.exception("a connection failed unexpectedly; it is closed")
        finally:
            slot.conn = None  # the connection points back at its slot: no cycle left behind
            self.metrics.connections.dec()
            self._slots.discard(slot)
            self._unidentified.pop(slot, None)
            self._open -= 1
            if not self._open:
                self._idle.set()
            await trio.aclose_forcefully(stream)

    def _evict(self) -> bool:
        """At the connection limit, make room for a new connection by closing one that does
        nothing: the oldest that has not said HELLO yet (or is still in its TLS handshake),
        else the one idle longest with nothing in progress. False when every one is busy.

        Without this, sockets that connect and say nothing would lock every client out until
        their HELLO deadline; with it, a flood has to open max_connections sockets faster
        than a client can say HELLO to keep that client out.
        """
        if self._unidentified:
            victim = next(iter(self._unidentified))  # the oldest (dicts keep their order)
        else:
            idle = [s for s in self._slots if s.conn is not None and s.conn.idle()]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.conn.last_heard)  # type: ignore[union-attr]
        # It leaves the count at once (it is closing), so it is never chosen twice.
        self._slots.discard(victim)
        self._unidentified.pop(victim, None)
        if victim.conn is None:
            victim.scope.cancel()  # in its TLS handshake
        else:
            victim.conn.evict()
        self.metrics.connections_closed.labels("evicted").inc()
        return True

    # -- what a request gets ----------------------------------------------------------------

    def busy(self, conn: _Connection, items: int) -> str | None:
        """Why a request of *items* certificates on *conn* is refused with BUSY now, or None.

        Called twice for a sign request: from its frame header with *items* = 1 (the least
        it can hold), so that a frame that is refused anyway is never decompressed or
        decoded, and again with its real count once decoded.
        """
        limits = self.limits
        if self.draining.is_set():
            return "the engine is shutting down"
        if items > limits.max_batch:
            return None  # the codec refuses oversized batches; not a load question
        if conn.requests >= limits.max_in_flight:
            return (
                f"{limits.max_in_flight} requests on this connection are in progress or "
                "have replies the client has not read"
            )
        if conn.items + items > limits.max_connection_items:
            return (
                f"more than {limits.max_connection_items} certificates on this connection "
                "would be in progress or unread"
            )
        mine = self._client_items.get(conn.client, 0) + items
        if mine > limits.max_client_items:
            return (
                f"more than {limits.max_client_items} certificates of this client would be in "
                "progress or unread"
            )
        total = self.pending_items + items
        if total > limits.max_pending_items:
            return "the engine is at capacity"
        soft = limits.max_pending_items * FAIR_SHARE_ABOVE
        target = limits.queue_target
        started = self._started.get(conn.client)  # type: ignore[arg-type]
        behind = 0.0
        if target and started and total > limits.queue_floor:
            behind = trio.current_time() - next(iter(started.values()))
            if behind <= target:
                behind = 0.0
        if total <= soft and not behind:
            return None
        # The engine must refuse someone: first the clients over their weighted share.
        weight, weights = self._weights(conn.client)
        if total > soft:
            fair = soft * weight / weights
            if mine > fair:
                return (
                    f"the engine is near capacity and this client has {mine - items} "
                    f"certificates in progress, over its share ({fair:.0f}, weight {weight} "
                    f"of {weights})"
                )
        if behind:
            fair = total * weight / weights
            if mine >= fair:
                return (
                    "the engine is behind (this client's oldest request in progress for "
                    f"{behind * 1000:.0f} ms, and it has {mine - items} of the "
                    f"{total - items} certificates in progress: share {weight} of {weights})"
                )
        return None

    def _weights(self, client: str | None) -> tuple[int, int]:
        """*client*'s policy weight, and the sum of the weights of the clients with work in
        progress or unread, *client* included (one dict walk per refusal decision, never per
        item; the policy is immutable, so a reload shows up as a new object)."""
        policy = self.dispatcher.policy.current()
        if policy is not self._weights_of:
            self._weights_of = policy
            self._weight_cache = {
                name: cp.weight for name, cp in policy.clients.items() if cp.weight != 1
            }
        cache = self._weight_cache
        weight = cache.get(client, 1)  # type: ignore[arg-type]
        total = weight
        for other in self._client_items:
            if other != client:
                total += cache.get(other, 1)  # type: ignore[arg-type]
        return weight, total

    def busy_reply(self, request_id: int, why: str) -> wire.Error:
        code = ErrorCode.SHUTTING_DOWN if self.draining.is_set() else ErrorCode.BUSY
        return wire.Error(
            request_id=request_id,
            code=code,
            message=why,
            retry_after_ms=self.limits.busy_retry_ms,
        )

    def keys_for(self, client: str, request_id: int) -> wire.Keys:
        """KEYS for *client*: the keys its policy lets it use, each with the DCC types it may
        have that key sign (the DSC's extended key usage and the policy together)."""
        cp = self.dispatcher.policy.current().client(client)
        listed = []
        if cp is not None and not cp.disabled:
            for k in self.dispatcher.keys:
                if cp.kids is not None and k.dsc.kid not in cp.kids:
                    continue
                types = "".join(
                    t for t in "vtr" if k.dsc.allows(t) and (cp.types is None or t in cp.types)
                )
                if not types:
                    continue
                listed.append(
                    wire.KeyInfo(
                        kid=k.dsc.kid,
                        alg=k.dsc.alg,
                        types=types,
                        state=k.state,
                        dsc=k.dsc.der,
                        not_before=int(k.dsc.not_before.timestamp()),
                        not_after=int(k.dsc.not_after.timestamp()),
                    )
                )
        return wire.Keys(request_id=request_id, keys=tuple(listed))

    async def sign(
        self, client: str, event: Any, items: Any
    ) -> tuple[list[Any] | FrameReply, list[str], float]:
        """A sign request's results (a :class:`FrameReply`, or an ``ItemResult`` per item),
        the DCC type of each item ("" where not examined) and when the work started: what
        :meth:`reply` makes the reply of.

        It runs to the end whatever its deadline: items already handed to keyd may be signed
        and audited, and stopping half way would lose those results (and leave quota units
        and idempotency entries half done). The connection answers DEADLINE_EXCEEDED in its
        place at the deadline (:meth:`deadline_reply`, from its watchdog); the late results
        land in the idempotency cache, so a retry with the same key gets the first
        signature, never a second one. Never raises for what an item holds: an unexpected
        failure is answered INTERNAL (retryable) for every item.
        """
        start = trio.current_time()
        # *items*: the decoded items, or the frame's walked view (native.BatchView).
        walked = isinstance(items, native.BatchView)
        count = items.count if walked else len(items)
        types = [""] * count
        token = object()
        started = self._started.setdefault(client, {})
        started[token] = start
        results: Any
        try:
            if walked:
                results = await self.dispatcher.sign_view(
                    client, items, types, single=event.type == wire.FrameType.SIGN
                )
            else:
                results = await self.dispatcher.sign(client, items, types)
        except Exception:
            # The dispatcher never raises for what an item holds: this is a bug. The
            # request is answered INTERNAL (retryable); the connection goes on.
            LOGGER.exception("signing a request of client %s failed unexpectedly", client)
            self.metrics.internal_errors.inc()
            results = [
                wire.ItemResult(
                    error=ErrorCode.INTERNAL, message="internal error",
                    retry_after_ms=self.limits.busy_retry_ms,
                )
            ] * count  # fmt: skip
        finally:
            del started[token]
            if not started:
                del self._started[client]
        return results, types, start

    def sign_soon(self, conn: _Connection, request: _Request, view: Any) -> bool:
        """:meth:`sign` and :meth:`reply` for a plain walked frame without idempotency keys
        (``Dispatcher.sign_frame_soon``), with no task: False (nothing done) for any other
        frame; else True, and ``conn.signed(request, reply)`` runs once the reply is
        encoded -- perhaps inside this call. The same guarantees as :meth:`sign`: the work
        runs to its end whatever the deadline, and an unexpected failure is answered
        INTERNAL (retryable) for every item."""
        client = conn.client
        assert client is not None  # requests are accepted after WELCOME only
        start = request.start
        token = object()
        started = self._started.setdefault(client, {})
        started[token] = start

        def done(result: FrameReply | Exception) -> None:
            if token not in started:
                return  # a second call (a bug in the dispatcher) changes nothing
            del started[token]
            if not started:
                del self._started[client]
            conn.signed(request, lambda: reply_of(result))

        def reply_of(result: FrameReply | Exception) -> Any:
            # Only the reply that is sent is counted (not one after DEADLINE_EXCEEDED).
            if isinstance(result, Exception):
                # The dispatcher never fails for what an item holds: this is a bug. The
                # request is answered INTERNAL (retryable); the connection goes on.
                LOGGER.error(
                    "signing a request of client %s failed unexpectedly", client,
                    exc_info=result,
                )  # fmt: skip
                self.metrics.internal_errors.inc()
                failed = wire.ItemResult(
                    error=ErrorCode.INTERNAL, message="internal error",
                    retry_after_ms=self.limits.busy_retry_ms,
                )  # fmt: skip
                return self.reply(
                    client, request, [failed] * request.count, [""] * request.count, start
                )
            return self.reply(client, request, result, [], start)

        conn.signing_soon += 1
        waited = trio.current_time() - start  # the "start" stage: no task to wait for
        try:
            taken = self.dispatcher.sign_frame_soon(
                client, view, request.type == wire.FrameType.SIGN, done
            )
        except Exception as exc:
            # A bug that escaped the dispatcher's own handling: answered INTERNAL like any
            # other, so that the request's holds on the limits and its clock are released.
            done(exc)
            return True
        if taken:
            self.metrics.observe_stage("start", waited)
            return True
        conn.signing_soon -= 1
        del started[token]
        if not started:
            del self._started[client]
        return False

    def reply(
        self, client: str, event: Any, results: list[Any] | FrameReply, types: list[str],
        start: float,
    ) -> Any:  # fmt: skip
        """The reply to sign request *event* from :meth:`sign`'s result, counted in the
        metrics (only the reply that is sent is counted: not a late one after the
        deadline's)."""
        if isinstance(results, FrameReply):
            self.metrics.observe_counts(client, results.outcomes, trio.current_time() - start)
            return _Encoded(event.request_id, results)
        self.metrics.observe(client, results, types, trio.current_time() - start)
        return self._reply(event, results)

    def deadline_reply(self, client: str, event: Any, count: int, start: float) -> Any:
        """DEADLINE_EXCEEDED for every item of a sign request taken in at *start*."""
        results = [
            wire.ItemResult(
                error=ErrorCode.DEADLINE_EXCEEDED,
                message=f"not done within {self.limits.deadline} s",
                retry_after_ms=self.limits.busy_retry_ms,
            )
        ] * count
        self.metrics.observe(client, results, [""] * count, trio.current_time() - start)
        return self._reply(event, results)

    @staticmethod
    def _reply(event: Any, results: list[Any]) -> Any:
        if event.type == wire.FrameType.SIGN:
            return wire.SignResult(request_id=event.request_id, result=results[0])
        return wire.SignBatchResult(request_id=event.request_id, results=tuple(results))


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A sign request's reply whose body is encoded already (:class:`FrameReply`)."""

    request_id: int
    reply: FrameReply


# eq=False: a request is itself (compared and hashed by identity), not its fields.
@dataclass(slots=True, eq=False)
class _Request:
    """A sign request in progress: what its reply needs of its frame (the frame itself is
    let go), its ticket, and whether it has been answered -- by its work, or with
    DEADLINE_EXCEEDED by the connection's watchdog at ``deadline``."""

    type: int
    request_id: int
    count: int
    ticket: _Ticket
    start: float
    deadline: float
    answered: bool = field(default=False, init=False)


class _Slot:
    """One admitted connection: from its acceptance (``since``) through its TLS handshake
    (``scope`` cancels it) to its close (``conn`` once it is set up)."""

    __slots__ = ("conn", "scope", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.scope = trio.CancelScope()
        self.conn: _Connection | None = None


class _Ticket:
    """An accepted sign request's share of the limits: held until both its work is done and
    its reply has been written (or dropped with the connection), whichever comes last."""

    __slots__ = ("conn", "holds", "items")

    def __init__(self, conn: _Connection, items: int) -> None:
        self.conn = conn
        self.items = items
        self.holds = 2
        server = conn.server
        conn.requests += 1
        conn.items += items
        server.pending_items += items
        server._client_items[conn.client] = server._client_items.get(conn.client, 0) + items

    def release(self) -> None:
        self.holds -= 1
        if self.holds:
            return
        conn, server = self.conn, self.conn.server
        conn.requests -= 1
        conn.items -= self.items
        server.pending_items -= self.items
        left = server._client_items[conn.client] - self.items
        if left:
            server._client_items[conn.client] = left
        else:
            del server._client_items[conn.client]


#: What :meth:`_Connection.handle` tells the reader: stop reading this connection.
_STOP = object()


class _Connection:
    """One client connection (see the module docstring). Closing has three strengths:
    :meth:`finish` (stop reading; what is in progress is answered), :meth:`fail` (a last
    fatal ERROR frame, then stop; later replies are dropped) and :meth:`abort` (the client is
    gone or does not read: drop everything now)."""

    def __init__(self, server: Server, stream: Any, peer: Peer, slot: _Slot) -> None:
        self.server = server
        self.limits = server.limits
        self.metrics = server.metrics
        self.stream = stream
        self.peer = peer
        self.codec = wire.Connection(wire.SERVER, max_frame=self.limits.max_frame, scan=server.scan)
        #: The policy client, once HELLO has been accepted.
        self.client: str | None = None
        #: Sign requests (and their certificates) accepted and not yet done with (_Ticket).
        self.requests = 0
        self.items = 0
        # Frames to write, each with the ticket to release once it is written.
        self._out: deque[tuple[bytes, _Ticket | None]] = deque()
        self._out_bytes = 0
        self._out_wake = trio.Event()
        # A frame goes out at once, without the writer task, when nothing is queued before
        # it and the socket takes it all (TLSStream.send_nowait); one the socket did not
        # take is owed: the writer sends it first, alone and whole.
        self._send_now = getattr(stream, "send_nowait", None)
        self._owed: bytes | None = None
        self._room = trio.Event()
        self._out_closed = False  # no frame will be added any more
        self._dropping = False  # replies are dropped: the client is gone or the link failed
        self._reader = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self._writer_done = trio.Event()
        self._slot = slot
        self._opened = slot.since
        #: When the client last sent anything.
        self.last_heard = slot.since
        self._writing_since: float | None = None
        self._partial_since: float | None = None
        #: Sign requests whose work is in progress, by id, in order of acceptance (and so
        #: of deadline: every request has the same time).
        self._in_progress: dict[int, _Request] = {}
        self._waiting_for_slot = False
        self._holds_slot = False
        self._watch: trio.CancelScope | None = None  # the watchdog's sleep
        self._closing = False  # reading has stopped (finish)
        #: Sign requests whose work runs without a task (Server.sign_soon) and has not
        #: ended; the connection does not end before they have.
        self.signing_soon = 0
        self._signing_ended: trio.Event | None = None

    # -- the tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._writer)
            tasks.start_soon(self._watchdog)
            if self.server.draining.is_set():
                self.finish()  # set up while the engine began to drain (Server.drain)
            try:
                # Request tasks live in this nursery: leaving it waits for all of them.
                async with trio.open_nursery() as requests:
                    with self._reader:
                        await self._read(requests)
                await self._signing_soon_ended()
                if self.server.draining.is_set():
                    # Requests up to the last id received were accepted and have been answered.
                    self.goaway("the engine is shutting down")
            finally:
                self._release_slot()
                self._out_closed = True
                self._out_wake.set()
            await self._writer_done.wait()
            tasks.cancel_scope.cancel()

    async def _read(self, requests: trio.Nursery) -> None:
        """Read and handle frames until EOF, a violation, a refusal, or a stop."""
        codec = self.codec
        while True:
            try:
                while (frame := codec.next_frame()) is not wire.NEED_DATA:
                    if frame is None:
                        return  # the client closed cleanly; what is in progress is answered
                    self._partial(trio.current_time() if codec.buffered else None)
                    if frame.type in _SIGN_FRAMES:
                        if not self._refused_early(frame):
                            await self._walk(frame, requests)
                        del frame
                        await self._wait_for_room()
                        continue
                    if frame.size > self.limits.inline_decode:
                        event = await trio.to_thread.run_sync(
                            codec.decode_frame, frame, limiter=self.server._decoders
                        )
                    else:
                        event = codec.decode_frame(frame)
                    del frame
                    if self.handle(event) is _STOP:
                        return
                    del event
                    await self._wait_for_room()
            except wire.RemoteProtocolError as exc:
                self.fail(exc, "protocol")
                return
            await self._frame_budget()
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.abort("the connection was reset")
                return
            self.last_heard = trio.current_time()
            codec.receive_data(data)  # b"": the client closed its side
            self._partial((self._partial_since or self.last_heard) if codec.buffered else None)

    async def _wait_for_room(self) -> None:
        """Stop reading a client that does not read: while more than outbound_bytes wait to
        be written, or while replies wait and the connection has no room for another request
        (answering BUSY to every frame it pipelines would only make more to write)."""
        limits = self.limits
        while not self._dropping and (
            self._out_bytes > limits.outbound_bytes
            or (
                self._out_bytes
                and (
                    self.requests >= limits.max_in_flight
                    or self.items >= limits.max_connection_items
                )
            )
        ):
            self._room = trio.Event()
            await self._room.wait()

    async def _frame_budget(self) -> None:
        """A connection in the middle of a large frame needs a slot to go on reading."""
        large = self.codec.buffered > self.limits.large_frame
        if large and not self._holds_slot:
            # Our own throttling must not count against the client's frame_timeout.
            self._waiting_for_slot = True
            try:
                await self.server._large_frames.acquire()
            finally:
                self._waiting_for_slot = False
            self._holds_slot = True
            self._partial_since = None  # its clock starts again, now that it is read
            self._partial(trio.current_time())
        elif not large:
            self._release_slot()

    def _release_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self.server._large_frames.release()

    async def _writer(self) -> None:
        """Write every frame ready in one send; release what was written."""
        try:
            with self._writer_scope:
                while True:
                    while not self._out:
                        if self._out_closed:
                            return
                        self._out_wake = trio.Event()
                        await self._out_wake.wait()
                    if self._owed is not None:
                        batch = [self._out.popleft()]  # it is first: nothing was queued
                        self._owed = None
                    else:
                        batch = list(self._out)
                        self._out.clear()
                    data = b"".join(frame for frame, _ in batch)
                    self._writing_since = trio.current_time()
                    self._clock_started(self._writing_since + self.limits.idle_timeout)
                    try:
                        await self.stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.abort("the client is gone")
                        return
                    finally:  # written, or dropped (failed, or cancelled by abort)
                        self._writing_since = None
                        self._release(batch)
        finally:
            self._writer_done.set()

    def _release(self, batch: list[tuple[bytes, _Ticket | None]], *, queued: bool = True) -> None:
        """Frames written or dropped: their tickets released, and their bytes taken off
        ``_out_bytes`` if they were *queued* (counted there)."""
        for frame, ticket in batch:
            if queued:
                self._out_bytes -= len(frame)
            if ticket is not None:
                ticket.release()
        self._room.set()  # the reader looks again

    async def _watchdog(self) -> None:
        """The connection's clocks: HELLO, frames that do not complete, clients that do not
        read, idle connections. It sleeps until the earliest can run out; a clock that starts
        later moves that wake-up closer (:meth:`_clock_started`)."""
        while True:
            with trio.CancelScope(deadline=self._next_deadline()) as self._watch:
                await trio.sleep_forever()
            self._watch = None
            now = trio.current_time()
            self._answer_overdue(now)
            self._check_clocks(now)

    def _next_deadline(self) -> float:
        clocks = self._clocks()
        if self._in_progress:
            return min(clocks, next(iter(self._in_progress.values())).deadline)
        return clocks

    def _clocks(self) -> float:
        limits = self.limits
        if self._closing:  # only a client that reads nothing can hold it open now
            if self._writing_since is None or self._dropping:
                return math.inf
            return self._writing_since + limits.idle_timeout
        now = trio.current_time()
        # An idle connection's clock runs from the last byte heard; a busy one is looked at
        # again an idle_timeout from now.
        deadline = (self.last_heard if self.idle() else now) + limits.idle_timeout
        if self.client is None:
            deadline = min(deadline, self._opened + limits.hello_timeout)
        if self._writing_since is not None:
            deadline = min(deadline, self._writing_since + limits.idle_timeout)
        if self._partial_since is not None and not self._waiting_for_slot:
            deadline = min(deadline, self._partial_since + limits.frame_timeout)
        return deadline

    def _clock_started(self, runs_out: float) -> None:
        if self._watch is not None and runs_out < self._watch.deadline:
            self._watch.deadline = runs_out

    def _check_clocks(self, now: float) -> None:
        """Act on the clocks that have run out."""
        limits = self.limits
        if self._dropping:
            pass  # dropped already (its writer may not have seen the cancellation yet)
        elif self._writing_since is not None and now - self._writing_since >= limits.idle_timeout:
            self.metrics.connections_closed.labels("stalled").inc()
            self.abort(f"the client read none of its replies for {limits.idle_timeout:g} s")
        elif self._closing:
            pass  # stopping already: the other clocks no longer matter
        elif self.client is None and now - self._opened >= limits.hello_timeout:
            self.metrics.connections_closed.labels("hello_timeout").inc()
            self.fail(wire.RemoteProtocolError(f"no HELLO within {limits.hello_timeout:g} s"), None)
        elif (
            self._partial_since is not None
            and not self._waiting_for_slot
            and now - self._partial_since >= limits.frame_timeout
        ):
            self.metrics.connections_closed.labels("frame_timeout").inc()
            self.fail(
                wire.RemoteProtocolError(
                    f"a frame did not arrive whole within {limits.frame_timeout:g} s"
                ),
                None,
            )
        elif self.idle() and now - self.last_heard >= limits.idle_timeout:
            self.metrics.connections_closed.labels("idle").inc()
            self.goaway(f"idle for {limits.idle_timeout:g} s")
            self.finish()

    def _partial(self, since: float | None) -> None:
        """A frame began arriving at *since* (None: no frame is half received)."""
        if since is not None and self._partial_since is None:
            self._clock_started(since + self.limits.frame_timeout)
        self._partial_since = since

    def idle(self) -> bool:
        """Nothing in progress, nothing to write, no frame half received."""
        return self.requests == 0 and not self._out and self._partial_since is None

    def evict(self) -> None:
        """Close this connection to make room for a new one (see :meth:`Server._evict`)."""
        why = "the engine is at its connection limit"
        if self.client is None:
            self.fail(wire.RemoteProtocolError(why, ErrorCode.BUSY), None)
        else:
            self.goaway(f"{why}; this connection was idle")
            self.finish()

    # -- closing --------------------------------------------------------------------------

    def finish(self) -> None:
        """Stop reading; requests in progress are still answered."""
        self._closing = True
        self._reader.cancel()

    def fail(self, exc: wire.WireProtocolError, reason: str | None) -> None:
        """A last fatal ERROR frame reporting *exc* (SPEC.md §12.2), then stop reading."""
        if reason is not None:
            self.metrics.connections_closed.labels(reason).inc()
        LOGGER.info("closing a connection (%s): %s", self.peer, exc)
        frame = self.codec.error_frame(exc)
        if frame is not None:
            self._queue(frame, None)
        self.finish()

    def abort(self, why: str) -> None:
        """Drop everything now: nothing more can reach the client."""
        if self._dropping:
            return
        LOGGER.info("dropping a connection (%s): %s", self.peer, why)
        self._dropping = True
        self._out_closed = True
        batch = list(self._out)
        self._out.clear()
        self._owed = None
        self._release(batch)
        self._room.set()
        self.finish()
        self._writer_scope.cancel()

    def goaway(self, reason: str) -> None:
        if self.codec.state is wire.State.OPEN:
            self.send(wire.GoAway(last_request_id=self.codec.last_request_id, reason=reason))

    # -- frames out -----------------------------------------------------------------------

    def send(self, event: Any, ticket: _Ticket | None = None) -> None:
        """Queue the frame of *event*; dropped (its ticket released) when the connection can
        no longer carry it."""
        try:
            if type(event) is _Encoded:
                r = event.reply
                frame = self.codec.send_encoded_result(
                    event.request_id, r.body, r.count, single=r.single
                )
            else:
                frame = self.codec.send(event)
        except wire.LocalProtocolError as exc:
            frame = self._unsendable(event, exc)
        if frame is None:
            if ticket is not None:
                ticket.release()
            return
        self._queue(frame, ticket)

    def _unsendable(self, event: Any, exc: wire.LocalProtocolError) -> bytes | None:
        """What goes out instead of an event the codec refused: nothing once the connection
        has failed; for a reply the engine got wrong (a bug), INTERNAL for its request, so
        that the client is not left waiting for it."""
        rid = getattr(event, "request_id", 0)
        if self.codec.state is wire.State.ERROR or not rid:
            return None
        LOGGER.error("a %s could not be encoded: %s", type(event).__name__, exc)
        internal = wire.Error(
            request_id=rid,
            code=ErrorCode.INTERNAL,
            message="internal error",
            retry_after_ms=self.limits.busy_retry_ms,
        )
        try:
            return self.codec.send(internal)
        except wire.LocalProtocolError:
            return None

    def _queue(self, frame: bytes, ticket: _Ticket | None) -> None:
        if self._dropping or self._out_closed:
            if ticket is not None:
                ticket.release()
            return
        if self._send_now is not None and not self._out and self._writing_since is None:
            if self._send_now(frame):
                self._release([(frame, ticket)], queued=False)
                return
            self._owed = frame
        self._out.append((frame, ticket))
        self._out_bytes += len(frame)
        self._out_wake.set()

    # -- frames in ------------------------------------------------------------------------

    def handle(self, event: Any) -> object:
        """Act on one event from the client (a frame other than a sign request, which
        :meth:`_walk` takes); :data:`_STOP` to stop reading."""
        handler = _HANDLERS.get(type(event))
        if handler is None:  # the codec lets nothing else through
            raise AssertionError(f"unexpected {type(event).__name__} from a client")
        return handler(self, event)

    def _on_hello(self, event: wire.Hello) -> object:
        return self._hello()

    def _on_ping(self, event: wire.Ping) -> None:
        self.send(wire.Pong(request_id=event.request_id, data=event.data))

    def _on_list_keys(self, event: wire.ListKeys) -> None:
        assert self.client is not None  # the codec admits requests only after WELCOME
        self.send(self.server.keys_for(self.client, event.request_id))

    def _on_pong(self, event: wire.Pong) -> None:
        pass  # SPEC.md §6.3: either side may ping; ours need no answer

    def _on_error(self, event: wire.Error) -> object:
        # The codec lets a client send only a connection-level ERROR (id 0): it is leaving.
        # Requests in progress still finish (audited); their replies have nowhere to go.
        LOGGER.info(
            "client %s ended the connection: %s %s",
            self.client,
            getattr(event.code, "name", event.code),
            event.message,
        )
        return _STOP

    def _hello(self) -> object:
        """WELCOME, or the refusal SPEC.md §3 asks for when the policy does not know the
        peer or has disabled it."""
        policy = self.server.dispatcher.policy.current()
        name = self.peer.client_name(policy)
        cp = None if name is None else policy.client(name)
        if cp is None or cp.disabled:
            code = ErrorCode.UNAUTHENTICATED if cp is None else ErrorCode.CLIENT_DISABLED
            self.metrics.connections_refused.labels("identity").inc()
            self.send(
                wire.Error(
                    request_id=0, code=code, message=_refusal(self.peer, name, policy), fatal=True
                )
            )
            return _STOP
        self.client = name
        self.server._unidentified.pop(self._slot, None)
        self.send(
            self.codec.make_welcome(
                max_batch=self.limits.max_batch,
                max_in_flight=self.limits.max_in_flight,
                server=self.server.agent,
            )
        )
        return None

    async def _walk(self, frame: wire.Frame, requests: trio.Nursery) -> None:
        """A sign request: its body walked into item spans (no object per item), then
        admitted or refused BUSY with its real count."""
        walk = self.server.walk
        if frame.size > self.limits.inline_decode:
            view = await trio.to_thread.run_sync(
                self.codec.decode_walked, frame, walk, limiter=self.server._decoders
            )
        else:
            view = self.codec.decode_walked(frame, walk)
        assert self.client is not None
        busy = self.server.busy(self, view.count)
        if busy:
            self.metrics.busy.labels(self.client).inc()
            self.send(self.server.busy_reply(frame.request_id, busy))
            return
        now = trio.current_time()
        request = _Request(
            frame.type, frame.request_id, view.count, _Ticket(self, view.count), now,
            now + self.limits.deadline,
        )  # fmt: skip
        if not self._in_progress:  # deadlines come in order: only the oldest one is timed
            self._clock_started(request.deadline)
        self._in_progress[request.request_id] = request
        if not self.server.sign_soon(self, request, view):
            requests.start_soon(self._request, request, view)

    def _refused_early(self, frame: wire.Frame) -> bool:
        """Answer a sign request BUSY from its header, before its body is decompressed or
        decoded, when even one certificate would be refused now (SPEC.md §8.2)."""
        assert self.client is not None  # the codec admits requests only after WELCOME
        busy = self.server.busy(self, 1)
        if not busy:
            return False
        self.codec.refuse_frame(frame)
        self.metrics.busy.labels(self.client).inc()
        self.metrics.busy_early.inc()
        self.send(self.server.busy_reply(frame.request_id, busy))
        return True

    async def _request(self, request: _Request, items: Any) -> None:
        """Sign *request* and answer it, unless its deadline answered it first."""
        self.metrics.observe_stage("start", trio.current_time() - request.start)
        assert self.client is not None
        ticket = request.ticket
        try:
            signed = await self.server.sign(self.client, request, items)
        except BaseException:
            self._done(request)
            if not request.answered:
                request.answered = True
                ticket.release()  # the reply's hold: there will be no reply
            raise
        del items
        self._done(request)
        if request.answered:
            return  # DEADLINE_EXCEEDED went out in its place, with the reply's hold
        request.answered = True
        self.send(self.server.reply(self.client, request, *signed), ticket)

    def signed(self, request: _Request, reply: Callable[[], Any]) -> None:
        """*request*'s work, run without a task (:meth:`Server.sign_soon`), has ended:
        ``reply()`` is made and sent, unless its deadline answered it first."""
        self._done(request)
        self.signing_soon -= 1
        if not self.signing_soon and self._signing_ended is not None:
            self._signing_ended.set()
        if request.answered:
            return  # DEADLINE_EXCEEDED went out in its place, with the reply's hold
        request.answered = True
        self.send(reply(), request.ticket)

    async def _signing_soon_ended(self) -> None:
        """Wait until no request runs without a task (:meth:`Server.sign_soon`)."""
        while self.signing_soon:
            self._signing_ended = trio.Event()
            await self._signing_ended.wait()
        self._signing_ended = None

    def _done(self, request: _Request) -> None:
        """*request*'s work has finished: its hold on the limits and its deadline end."""
        request.ticket.release()
        self._in_progress.pop(request.request_id, None)

    def _answer_overdue(self, now: float) -> None:
        """DEADLINE_EXCEEDED for every request in progress past its deadline; their work
        goes on (:meth:`Server.sign`), its results are dropped when it ends."""
        for request in list(self._in_progress.values()):
            if request.deadline > now:
                break  # in order of acceptance: the rest are later
            del self._in_progress[request.request_id]
            if not request.answered:
                request.answered = True
                assert self.client is not None  # requests are accepted after WELCOME only
                self.send(
                    self.server.deadline_reply(self.client, request, request.count, request.start),
                    request.ticket,
                )


#: What a connection does with each event a client may send besides sign requests.
_HANDLERS: dict[type, Callable[[_Connection, Any], object]] = {
    wire.Hello: _Connection._on_hello,
    wire.Ping: _Connection._on_ping,
    wire.ListKeys: _Connection._on_list_keys,
    wire.Pong: _Connection._on_pong,
    wire.Error: _Connection._on_error,
}


def _refusal(peer: Peer, name: str | None, policy: Policy) -> str:
    if name is None:
        return f"no client identity in the {peer}"
    cp = policy.client(name)
    if cp is not None:
        return f"client {name} is disabled"
    message = f"no client {name} in the policy ({peer})"
    if peer.transport == "tls" and peer.common_name and policy.client(peer.common_name):
        message += (
            f"; a client named {peer.common_name!r} exists, but TLS clients are named "
            f"'cn:<common name>' (docs/policy.md)"
        )
    return message


def _common_name(cert: dict[str, Any]) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
