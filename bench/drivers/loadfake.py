"""A fake engine for testing the load generator and measuring its own ceiling.

It speaks the real wire protocol (the sans-IO codec checks every frame the generator sends)
but signs nothing: every valid item is answered with the same canned ``HC1:`` string at once.
It can *stall*: stop answering for a while and then release every reply held back, which is
what a garbage-collection pause, a keyd restart or a full queue looks like from the client.
That is the test of coordinated omission (tests/test_loadgen.py).

It can also simulate keyd's *nonce pool* (:class:`FakePool`): per kid, a pool that fills at a
fixed rate up to its capacity and that every signed item spends (a miss when empty), exported
on an HTTP endpoint (:meth:`FakeEngine.serve_metrics`, ``GET /metrics``) through the
engine's own exporter (:class:`dccsign.server.metrics.NoncePoolCollector`), for testing
``bench load``'s wait for a full pool and its samples of the pool.

Run it in its own process to measure the generator without the engine's cost::

    python -m dccsign.bench.loadfake --unix /tmp/fake.sock
    dccsign bench load --server unix:/tmp/fake.sock --closed-loop --batch 100 ...

    python -m dccsign.bench.loadfake --unix /tmp/fake.sock --http 127.0.0.1:9465 \
        --pool-capacity 65536 --pool-fill-rate 20000
    dccsign bench load --server unix:/tmp/fake.sock --metrics http://127.0.0.1:9465/metrics \
        --profile burst --batch 100 ...

Not for production use: it answers anyone, and its "signatures" verify against nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ..cli.args import SWITCH, add_options
from ..protocol import wire
from ..protocol.codes import ErrorCode
from ..protocol.keyd import PoolStatus

__all__ = ["CANNED_HC1", "CANNED_KID", "FakeEngine", "FakePool", "main"]

#: What every signed item gets: about the length of a real HC1 of a sample DCC, so that the
#: generator decodes realistic frames. Not a valid certificate.
CANNED_HC1 = "HC1:" + "NCF" * 190
CANNED_KID = b"\xfa\x4e\x00\x00\x00\x00\x00\x01"


class FakePool:
    """A simulated nonce pool of one key: it fills at *fill_rate* entries/s up to *capacity*
    (the refill keyd does in idle time, here continuous), and :meth:`spend` takes one entry
    per signature, or counts a miss when none is left. Its clock starts when it is first
    looked at (a scrape or a signature); the *entries* it starts with count as refilled."""

    def __init__(self, capacity: int, *, entries: int = 0, fill_rate: float = 0.0) -> None:
        if capacity < 1 or not 0 <= entries <= capacity or fill_rate < 0:
            raise ValueError("need capacity >= 1, 0 <= entries <= capacity, fill_rate >= 0")
        self.capacity = capacity
        self.fill_rate = fill_rate
        self._level = float(entries)
        self._at: float | None = None
        self.refilled = float(entries)
        self.spent = 0
        self.misses = 0

    def _advance(self, now: float) -> None:
        if self._at is not None and now > self._at:
            add = min(self.capacity - self._level, self.fill_rate * (now - self._at))
            self._level += add
            self.refilled += add
        self._at = now

    def entries(self, now: float) -> int:
        """Entries ready at *now* (trio clock)."""
        self._advance(now)
        return math.floor(self._level)

    def spend(self, now: float, n: int) -> None:
        """*n* signatures at *now*: each takes an entry, or is a miss."""
        take = min(n, self.entries(now))
        self._level -= take
        self.spent += take
        self.misses += n - take

    def status(self, now: float) -> PoolStatus:
        """The counts keyd would report for this pool at *now* (DESCRIBE)."""
        return PoolStatus(
            self.capacity, self.entries(now), math.floor(self.refilled), self.spent, self.misses
        )


class _PoolExport:
    """The fake's pools through the engine's exporter, read at each scrape."""

    def __init__(self, fake: FakeEngine) -> None:
        from ..server.metrics import NoncePoolCollector

        self.fake = fake
        self.collector = NoncePoolCollector()

    def collect(self):  # the prometheus_client collector protocol; runs in the trio thread
        now = trio.current_time()
        self.fake.scrapes += 1
        self.collector.set_pools({k.hex(): p.status(now) for k, p in self.fake.pools.items()})
        yield from self.collector.collect()


class FakeEngine:
    """Answers SIGN / SIGN_BATCH at once (or after a stall), LIST_KEYS with *keys*, PING.

    Args:
        stall_after: seconds after the first request received when replies stop going out;
            None: never stall.
        stall_for: how long replies are held back; all of them go out when it ends.
        validate: answer items whose DCC fails :func:`dccsign.dcc.validate.validate` with
            INVALID_DCC, as the engine does (costs ~9 us per item); otherwise every item is
            "signed".
        max_in_flight, max_batch: announced in WELCOME; requests beyond max_in_flight get
            BUSY, like the engine.
        keys: what LIST_KEYS returns (default none, so sampled verification fails).
        pools: simulated nonce pools by kid, exported by :meth:`serve_metrics`; signed items
            spend the pool of :data:`CANNED_KID` (the kid of every reply), if there is one.
        fast: after the handshake, skip the codec: decode each distinct request body once
            and answer repeats of it from a cache with pre-encoded replies (the generator
            cycles a fixed pool of frames). Checks nothing; for measuring the generator's
            own ceiling, where the full decoding (~7 us per item) would make the fake the
            bottleneck. No stall, BUSY, validation or pool spending in this mode.
    """

    def __init__(
        self,
        *,
        stall_after: float | None = None,
        stall_for: float = 0.0,
        validate: bool = False,
        max_in_flight: int = 32,
        max_batch: int = 1000,
        keys: Sequence[wire.KeyInfo] = (),
        fast: bool = False,
        pools: Mapping[bytes, FakePool] | None = None,
    ) -> None:
        self.stall_after = stall_after
        self.stall_for = stall_for
        self.validate = validate
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self.keys = tuple(keys)
        self.fast = fast
        self._items_of: dict[bytes, tuple[int, int]] = {}  # fast mode: body -> (type, items)
        self.first_request: float | None = None
        #: Requests and items seen, and replies that were held back by the stall.
        self.requests = 0
        self.items = 0
        self.held = 0
        self.pools = dict(pools or {})
        #: The spent pool's entries when the first SIGN / SIGN_BATCH arrived (None: none yet).
        self.pool_at_first_request: int | None = None
        self.scrapes = 0

    def _release_time(self, now: float) -> float | None:
        """When a reply produced at *now* may go out (None: now)."""
        if self.stall_after is None or self.first_request is None:
            return None
        start = self.first_request + self.stall_after
        end = start + self.stall_for
        return end if start <= now < end else None

    async def serve_unix(self, path: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a Unix socket at *path* (replaced if it exists); reports the path."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        await sock.bind(path)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        task_status.started(path)
        await trio.serve_listeners(self.serve_stream, [listener])

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Converse with one client on *stream* until it closes."""
        codec = wire.Connection(wire.SERVER)
        out_send, out_recv = trio.open_memory_channel[bytes](256)
        in_flight = 0

        async def reply_later(frame: bytes, at: float) -> None:
            nonlocal in_flight
            await trio.sleep_until(at)
            await out_send.send(frame)
            in_flight -= 1

        async with trio.open_nursery() as outer:
            outer.start_soon(self._writer, stream, out_recv)
            async with out_send:
                # Held replies live in this nursery: leaving it waits for them, so they still
                # go out (at the stall's end) before the writer is told to finish.
                async with trio.open_nursery() as held:
                    try:
                        while True:
                            try:
                                data = await stream.receive_some(1 << 18)
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                break
                            codec.receive_data(data)
                            while True:
                                event = codec.next_event()
                                if event is wire.NEED_DATA or event is None:
                                    break
                                reply = self._reply(codec, event, in_flight)
                                if reply is None:
                                    continue
                                frame, at = reply
                                if self.fast and codec.state is wire.State.OPEN:
                                    await out_send.send(frame)
                                    await self._serve_fast(stream, codec, out_send)
                                    return
                                if at is None:
                                    await out_send.send(frame)
                                else:
                                    self.held += 1
                                    in_flight += 1
                                    held.start_soon(reply_later, frame, at)
                            if not data:
                                break
                    except wire.WireProtocolError as exc:
                        frame = codec.error_frame(exc)
                        if frame:
                            await out_send.send(frame)

    def _reply(
        self, codec: wire.Connection, event: Any, in_flight: int
    ) -> tuple[bytes, float | None] | None:
        """The frame answering *event*, and when it may go out (None: now)."""
        if isinstance(event, wire.Hello):
            welcome = codec.make_welcome(
                max_batch=self.max_batch,
                max_in_flight=self.max_in_flight,
                server="dccsign-loadfake",
            )
            return codec.send(welcome), None
        if isinstance(event, wire.Ping):
            return codec.send(wire.Pong(event.request_id, event.data)), None
        if isinstance(event, wire.ListKeys):
            return codec.send(wire.Keys(event.request_id, self.keys)), None
        if isinstance(event, wire.Sign | wire.SignBatch):
            now = trio.current_time()
            if self.first_request is None:
                self.first_request = now
                pool = self.pools.get(CANNED_KID)
                self.pool_at_first_request = pool.entries(now) if pool else None
            self.requests += 1
            if in_flight >= self.max_in_flight:
                busy = wire.Error(event.request_id, ErrorCode.BUSY, "fake: in flight", 100)
                return codec.send(busy), None
            return codec.send(self._answer(event)), self._release_time(now)
        return None

    async def _serve_fast(
        self,
        stream: trio.abc.Stream,
        codec: wire.Connection,
        out_send: trio.MemorySendChannel[bytes],
    ) -> None:
        """Fast mode after WELCOME: frames parsed by hand, replies from templates."""
        import cbor2
        import zstandard

        header = wire.HEADER
        buf = bytearray()  # a client sends nothing between HELLO and WELCOME (SPEC.md §7.1)
        templates: dict[tuple[int, int], tuple[int, int, bytes]] = {}
        unpack = zstandard.ZstdDecompressor()
        while True:
            out = []
            while len(buf) >= wire.HEADER_SIZE:
                _magic, _version, ftype, flags, rid, length = header.unpack_from(buf)
                end = wire.HEADER_SIZE + length
                if len(buf) < end:
                    break
                body = bytes(buf[wire.HEADER_SIZE : end])
                del buf[:end]
                if ftype not in (wire.FrameType.SIGN, wire.FrameType.SIGN_BATCH):
                    out.append(self._other(codec, ftype, rid, flags, body))
                    continue
                known = self._items_of.get(body)
                if known is None:
                    raw = unpack.decompress(body) if flags >> 24 else body
                    items = cbor2.loads(raw).get("items")
                    known = (ftype, len(items) if isinstance(items, list) else 1)
                    self._items_of[body] = known
                template = templates.get(known)
                if template is None:
                    template = templates[known] = self._template(codec, *known)
                rtype, rflags, rbody = template
                out.append(header.pack(wire.MAGIC, wire.VERSION, rtype, rflags, rid, len(rbody)))
                out.append(rbody)
                self.requests += 1
                self.items += known[1]
            if out:
                await out_send.send(b"".join(out))
            try:
                data = await stream.receive_some(1 << 18)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buf += data

    def _template(self, codec: wire.Connection, ftype: int, n: int) -> tuple[int, int, bytes]:
        """(type, flags word, body) of the reply to a request of *ftype* with *n* items,
        encoded (and compressed, if negotiated) by the codec once."""
        ok = wire.ItemResult(hc1=CANNED_HC1, kid=CANNED_KID)
        if ftype == wire.FrameType.SIGN:
            reply: Any = wire.SignResult(1, ok)
        else:
            reply = wire.SignBatchResult(1, (ok,) * n)
        codec.last_request_id = max(codec.last_request_id, 1)  # the codec checks reply ids
        data = codec.send(reply)
        _m, _v, rtype, rflags, _rid, _len = wire.HEADER.unpack_from(data)
        return rtype, rflags, data[wire.HEADER_SIZE :]

    def _other(
        self, codec: wire.Connection, ftype: int, rid: int, flags: int, body: bytes
    ) -> bytes:
        """Fast mode: the reply to a LIST_KEYS or PING (anything else is refused)."""
        if ftype == wire.FrameType.LIST_KEYS:
            codec.last_request_id = max(codec.last_request_id, rid)
            return codec.send(wire.Keys(rid, self.keys))
        if ftype == wire.FrameType.PING and not flags:
            import cbor2

            return codec.send(wire.Pong(rid, cbor2.loads(body).get("data", b"")))
        return codec.send(wire.Error(0, ErrorCode.PROTOCOL, "fake (fast): unexpected frame"))

    def _answer(self, event: wire.Sign | wire.SignBatch) -> Any:
        items = (event.item,) if isinstance(event, wire.Sign) else event.items
        self.items += len(items)
        results = tuple(self._result(item) for item in items)
        pool = self.pools.get(CANNED_KID)
        if pool is not None:
            pool.spend(trio.current_time(), sum(r.error is None for r in results))
        if isinstance(event, wire.Sign):
            return wire.SignResult(event.request_id, results[0])
        return wire.SignBatchResult(event.request_id, results)

    def _result(self, item: wire.SignItem) -> wire.ItemResult:
        if self.validate:
            from ..dcc.validate import DCCValidationError, validate

            try:
                validate(item.dcc)
            except DCCValidationError as exc:
                return wire.ItemResult(error=ErrorCode.INVALID_DCC, message=str(exc)[:200])
        return wire.ItemResult(hc1=CANNED_HC1, kid=CANNED_KID)

    async def serve_metrics(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve ``GET /metrics`` (the pools, as the engine exports them) on *host*:*port*;
        reports the bound (host, port)."""
        from prometheus_client import CollectorRegistry

        from ..server.metrics import serve_http

        registry = CollectorRegistry()
        registry.register(_PoolExport(self))
        await serve_http(registry, lambda: None, host, port, task_status=task_status)

    @staticmethod
    async def _writer(stream: trio.abc.Stream, frames: trio.MemoryReceiveChannel[bytes]) -> None:
        async with frames:
            async for frame in frames:
                batch = [frame]
                while True:
                    try:
                        batch.append(frames.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await stream.send_all(b"".join(batch))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
        await trio.aclose_forcefully(stream)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake engine until SIGTERM or SIGINT; returns the exit code (usage errors
    exit 2 through argparse)."""
    parser = _parser()
    args = parser.parse_args(argv)
    http = None
    if args.http:
        host, _, port = args.http.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--http: expected HOST:PORT, not {args.http!r}")
        http = host.strip("[]"), int(port)
    try:
        pools = {
            CANNED_KID[:7] + bytes([CANNED_KID[7] + i]): FakePool(
                args.pool_capacity, entries=args.pool_start, fill_rate=args.pool_fill_rate
            )
            for i in range(args.pool_kids if args.pool_capacity else 0)
        }
    except ValueError as exc:
        parser.error(f"pool: {exc}")
    fake = FakeEngine(
        stall_after=args.stall_after,
        stall_for=args.stall_for,
        validate=args.validate,
        max_in_flight=args.max_in_flight,
        fast=args.fast,
        pools=pools,
    )
    trio.run(_serve, fake, args.unix, http)
    return 0


async def _serve(fake: FakeEngine, unix: str, http: tuple[str, int] | None) -> None:
    """Serve *fake* on the Unix socket *unix* (and its metrics on *http*) until SIGTERM or
    SIGINT, then say how much it answered."""
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve_unix, unix)
        print(f"loadfake: listening on {unix}", file=sys.stderr, flush=True)
        if http is not None:
            bound = await nursery.start(fake.serve_metrics, *http)
            print(
                f"loadfake: metrics on http://{bound[0]}:{bound[1]}/metrics",
                file=sys.stderr,
                flush=True,
            )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print(f"loadfake: {fake.requests} requests, {fake.items} items", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dccsign.bench.loadfake",
        description="A fake engine for the load generator: answers every item at once with a "
        "canned HC1 (not a valid certificate). For measuring the generator, not the engine.",
    )
    helps = {
        "--unix": "Unix socket to listen on",
        "--stall-after": "stall S s after the first request (default: never)",
        "--stall-for": "hold replies back for S s (default 0)",
        "--validate": "answer invalid DCCs with INVALID_DCC (costs ~9 us per item)",
        "--fast": "decode each distinct request body once and answer repeats from a cache "
        "(checks nothing; for measuring the generator's own ceiling)",
        "--http": "serve GET /metrics (the simulated nonce pools) here; port 0 picks one, printed "
        "on stderr (default: no metrics endpoint)",
        "--pool-capacity": "simulate a nonce pool of N entries for each of --pool-kids kids; the "
        "first kid is the one every reply names, and signed items spend its pool (default 0: none)",
        "--pool-start": "entries at start (default 0)",
        "--pool-fill-rate": "entries/s added while below capacity (default 10000)",
        "--pool-kids": "kids with a pool (default 1)",
        "--max-in-flight": "announced in WELCOME; more gets BUSY (default 32, as the engine)",
    }
    add_options(
        parser,
        (
            ("--unix", {"required": True, "metavar": "PATH"}),
            ("--stall-after", {"type": float, "metavar": "S"}),
            ("--stall-for", {"type": float, "default": 0.0, "metavar": "S"}),
            ("--validate", SWITCH),
            ("--fast", SWITCH),
            ("--http", {"metavar": "HOST:PORT"}),
            ("--pool-capacity", {"type": int, "default": 0, "metavar": "N"}),
            ("--pool-start", {"type": int, "default": 0, "metavar": "N"}),
            ("--pool-fill-rate", {"type": float, "default": 10_000.0, "metavar": "R"}),
            ("--pool-kids", {"type": int, "default": 1, "metavar": "K"}),
            ("--max-in-flight", {"type": int, "default": 32, "metavar": "N"}),
        ),
        helps,
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
