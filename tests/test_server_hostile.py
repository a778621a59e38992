"""The engine's server against hostile clients, in process: a real Unix socket (or a memory
stream) in front of the real Server and Dispatcher, with keyd replaced by tests/fakes.py.

Each test is a failure found when the engine was attacked on loopback: nothing a client does
may end the server, hold memory without bound, or keep it from serving everyone else.
"""

import dataclasses
import gc
import os
import socket
import ssl
import struct
import threading
import tracemalloc

import cbor2
import pytest
import trio
import trio.testing
import zstandard

from dccsign import native
from dccsign.protocol import wire
from dccsign.protocol.codes import ErrorCode
from dccsign.server.server import Peer
from dccsign.testing.samples import sample, varied_samples
from server_harness import QUOTA, Engine, Raw

UID = os.getuid()


@pytest.fixture
async def start(tmp_path, nursery):
    """start(policy=None, **limits): an Engine serving on a Unix socket for this test."""
    made = []

    async def start(policy=None, **kw):
        engine = Engine(tmp_path, policy, **kw)
        await engine.start(nursery)
        made.append(engine)
        return engine

    yield start
    for engine in made:
        for stream in engine.streams:
            await trio.aclose_forcefully(stream)


def items(n, account="uzi:1"):
    return [wire.SignItem(d, account) for d in varied_samples(n)]


async def served_within(engine, seconds=1.0):
    """A legitimate client connects and gets a certificate signed within *seconds*."""
    with trio.fail_after(seconds):
        client = await Raw.connect(engine)
        await client.hello()
        # BUSY is a legitimate answer while work of the same client (the tests' attackers
        # share its uid) is still in progress: retry as a client does.
        while isinstance(reply := await client.sign(items(1)), wire.Error):
            assert reply.code == ErrorCode.BUSY, reply
            await trio.sleep(reply.retry_after_ms / 1000)
        await client.close()
    assert isinstance(reply, wire.SignBatchResult) and reply.results[0].ok, reply


async def settled(engine):
    """Every connection closed and every ticket released (no leaked counts)."""
    with trio.fail_after(10):
        while engine.server._open or engine.server.pending_items:  # noqa: ASYNC110 (polling)
            await trio.sleep(0.01)


def linger0(stream):
    """Make close() send a reset, as a client that crashes would."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ----------------------------------------------------------------------------- failure 1


@pytest.mark.parametrize("what", ["list_keys", "sign_batch", "ping"])
async def test_pipelining_without_reading_then_closing_ends_only_that_connection(start, what):
    """Frames pipelined until the engine's queue toward the client is full, then a reset:
    that connection ends, the server goes on (it used to exit on the broken channel)."""
    engine = await start(max_in_flight=4, outbound_bytes=64 * 1024)
    client = await Raw.connect(engine)
    await client.hello()
    batch = tuple(items(100))
    sent = 0
    with trio.move_on_after(2):  # until the engine stops reading us
        while True:
            if what == "list_keys":
                frame = client.codec.send(wire.ListKeys(request_id=client.rid()))
            elif what == "ping":
                frame = client.codec.send(wire.Ping(request_id=client.rid(), data=b"x" * 64))
            else:
                frame = client.codec.send(wire.SignBatch(request_id=client.rid(), items=batch))
            await client.stream.send_all(frame)
            sent += 1
    assert sent > 10
    linger0(client.stream)
    await client.close()
    await served_within(engine)
    await settled(engine)


# ----------------------------------------------------------------------------- failure 2


async def test_a_client_that_never_reads_is_stopped_being_read(start):
    """A client sends batches and reads nothing: the engine admits only what the per-
    connection limits allow (counting replies not yet written), then stops reading it; the
    client's writes block. It used to read on and sign everything (3.5 GiB for one client)."""
    engine = await start(max_in_flight=4, max_connection_items=400)
    client = await Raw.connect(engine, compression=())
    await client.hello()
    batch = tuple(items(100))
    frames = [
        client.codec.send(wire.SignBatch(request_id=client.rid(), items=batch)) for _ in range(300)
    ]
    sent = 0
    with trio.move_on_after(3):
        for frame in frames:
            await client.stream.send_all(frame)
            sent += 1
    assert sent < len(frames), "the engine read everything from a client that reads nothing"
    # It has stopped: what it signed is what the limits allow plus the replies that the
    # kernel's socket buffers took, and no more comes.
    signed = engine.batcher.signed
    await trio.sleep(0.5)
    assert engine.batcher.signed == signed
    assert engine.server.pending_items <= 400
    # The client reads now: every request it sent is answered, signed or BUSY.
    replies = {}
    for _ in range(sent):
        reply = await client.event()
        replies[reply.request_id] = reply
    assert sorted(replies) == list(range(2, 2 + sent))
    for reply in replies.values():
        if isinstance(reply, wire.Error):
            assert reply.code == ErrorCode.BUSY and reply.retry_after_ms
        else:
            assert all(r.ok for r in reply.results)
    await client.close()
    await settled(engine)


async def test_a_client_that_reads_nothing_for_the_idle_timeout_is_dropped(start):
    engine = await start(idle_timeout=0.5)
    client = await Raw.connect(engine)
    client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await client.hello()
    batch = tuple(items(200))
    with trio.move_on_after(5):
        try:
            while True:
                await client.stream.send_all(
                    client.codec.send(wire.SignBatch(request_id=client.rid(), items=batch))
                )
        except trio.BrokenResourceError:
            pass  # the engine closed the connection
    await settled(engine)  # dropped: its tickets released, the connection closed
    assert engine.metric("dccsign_connections_closed_total", reason="stalled") == 1
    await served_within(engine)


async def test_one_client_cannot_take_the_whole_engine(start):
    """Work in progress is bounded per client over all its connections: another client
    is still served."""
    engine = await start(
        {
            "clients": {"portal": {}, "uid:4242": {}},
            "unix_uids": {str(UID): "portal"},
        },
        max_client_items=300,
        max_connection_items=200,
        max_pending_items=1000,
        queue_target=0,
    )
    engine.batcher.gate = trio.Event()  # nothing finishes until the gate opens
    first, second = await Raw.connect(engine), await Raw.connect(engine)
    for c in (first, second):
        await c.hello()
    for c, n in ((first, 100), (first, 100), (second, 100)):
        await c.send(wire.SignBatch(request_id=c.rid(), items=tuple(items(n))))
    await c.send(wire.SignBatch(request_id=c.rid(), items=tuple(items(1))))
    busy = await second.event()
    assert busy.code == ErrorCode.BUSY and "of this client" in busy.message
    assert engine.server.pending_items == 300
    # Another client gets in (its own share), through the memory-stream door.
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(engine.server.serve_stream, server_side, Peer("unix", uid=4242))
        other = Raw(client_side)
        await other.hello()
        await other.send(wire.SignBatch(request_id=other.rid(), items=tuple(items(2))))
        with trio.fail_after(1):
            while engine.server.pending_items < 302:  # noqa: ASYNC110 (polling)
                await trio.sleep(0.01)
        engine.batcher.gate.set()
        assert all(r.ok for r in (await other.event()).results)
        n.cancel_scope.cancel()


# ----------------------------------------------------------------------------- failure 3


def _bomb(size):
    """A SIGN_BATCH body of *size* bytes: {"items": [{}, {}, ...]} -- one object per byte."""
    n = size - 11
    return b"\xa1\x65items\x9a" + n.to_bytes(4, "big") + b"\xa0" * n


def _frame(ftype, rid, body, compressed=False):
    flags = int(compressed) << 24
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, ftype, flags, rid, len(body)) + body


async def test_a_compressed_cbor_bomb_is_refused_without_decoding_it(start):
    """A few hundred bytes of zstd that expand to millions of empty maps: refused with
    BAD_REQUEST after a count, never built (it used to take 1.2 GiB and block the loop for
    seconds)."""
    engine = await start()
    body = zstandard.ZstdCompressor(level=19).compress(_bomb(wire.DEFAULT_MAX_FRAME // 2 - 64))
    assert len(body) < 1024
    client = await Raw.connect(engine)
    await client.hello()
    tracemalloc.start()
    try:
        await client.stream.send_all(_frame(wire.FrameType.SIGN_BATCH, 2, body, compressed=True))
        error = await client.event()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(error, wire.Error) and error.code == ErrorCode.BAD_REQUEST
    assert "CBOR data items" in error.message
    assert peak < 16 * 1024 * 1024, f"{peak} bytes traced"  # the 4 MiB decompressed body
    assert await client.event() is None
    await served_within(engine)


async def test_large_bodies_are_decoded_in_a_worker_thread(start):
    threads = []

    def scan(data, max_items, max_depth):
        threads.append(threading.current_thread() is threading.main_thread())
        return native.cbor_scan(data, max_items, max_depth)

    def walk(body, max_batch, *, single=False):
        threads.append(threading.current_thread() is threading.main_thread())
        return native.walk_sign_batch(body, max_batch, single=single)

    engine = await start(scan=scan, walk=walk)
    client = await Raw.connect(engine, compression=())
    await client.hello()
    small = await client.sign(items(2))
    large = await client.sign(items(500))
    assert all(r.ok for r in small.results + large.results)
    # HELLO and the small batch on the event loop's thread, the large batch off it
    assert threads == [True, True, False]


async def test_partial_large_frames_wait_for_a_slot_and_time_out(start):
    """Connections in the middle of a large frame need one of a few slots to be read on;
    a frame that does not arrive whole in time ends its connection (a slow-loris of big
    frames cannot pin max_frame bytes on every connection)."""
    engine = await start(large_frame=64 * 1024, large_frame_slots=1, frame_timeout=3.0)
    header = _frame(wire.FrameType.SIGN_BATCH, 2, b"")[: wire.HEADER_SIZE - 4]
    header += (1024 * 1024).to_bytes(4, "big")
    clients = []
    for _ in range(2):
        c = await Raw.connect(engine)
        await c.hello()
        await c.stream.send_all(header + b"\xa1" * (180 * 1024))
        clients.append(c)
    conns = [s.conn for s in engine.server._slots]
    with trio.fail_after(10):
        while not any(c._waiting_for_slot for c in conns):  # noqa: ASYNC110 (polling)
            await trio.sleep(0.01)
    waiting = next(c for c in conns if c._waiting_for_slot)
    reading = next(c for c in conns if c is not waiting)
    assert waiting.codec.buffered <= 64 * 1024 + (1 << 16) < reading.codec.buffered
    first = await clients[0].event(within=10)
    assert isinstance(first, wire.Error) and "did not arrive whole" in first.message
    second = await clients[1].event(within=10)  # it got the slot, then timed out in turn
    assert isinstance(second, wire.Error) and "did not arrive whole" in second.message
    await served_within(engine)
    await settled(engine)


# ----------------------------------------------------------------------------- identity


async def _hello_reply(engine, peer):
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(engine.server.serve_stream, server_side, peer)
        client = Raw(client_side)
        await client.send(client.codec.make_hello())
        reply = await client.event()
        n.cancel_scope.cancel()
    return reply


async def test_unknown_and_disabled_clients_are_refused_at_hello(tmp_path):
    engine = Engine(
        tmp_path,
        {
            "clients": {"local": {}, "off": {"disabled": True}, "cn:portal.example": {}},
            "unix_uids": {"1001": "local", "1002": "off"},
        },
    )
    welcome = await _hello_reply(engine, Peer("unix", uid=1001))
    assert isinstance(welcome, wire.Welcome)
    tls = await _hello_reply(engine, Peer("tls", common_name="portal.example"))
    assert isinstance(tls, wire.Welcome)
    for peer, code in [
        (Peer("unix", uid=1002), ErrorCode.CLIENT_DISABLED),
        (Peer("unix", uid=1003), ErrorCode.UNAUTHENTICATED),
        (Peer("tls", common_name="other.example"), ErrorCode.UNAUTHENTICATED),
        (Peer("tls", common_name=None), ErrorCode.UNAUTHENTICATED),
        # A certificate whose CN is a local client's name is not that client.
        (Peer("tls", common_name="local"), ErrorCode.UNAUTHENTICATED),
    ]:
        reply = await _hello_reply(engine, peer)
        assert isinstance(reply, wire.Error) and reply.code == code and reply.fatal, (peer, reply)
    reply = await _hello_reply(engine, Peer("tls", common_name="local"))
    assert "TLS clients are named 'cn:<common name>'" in reply.message
    assert engine.metric("dccsign_connections_refused_total", reason="identity") == 6


async def test_a_uid_client_needs_no_mapping(tmp_path):
    engine = Engine(tmp_path, {"clients": {"uid:1001": {}}})
    assert isinstance(await _hello_reply(engine, Peer("unix", uid=1001)), wire.Welcome)
    reply = await _hello_reply(engine, Peer("tls", common_name="uid:1001"))
    assert reply.code == ErrorCode.UNAUTHENTICATED


async def test_list_keys_lists_only_what_the_client_may_use(start):
    engine = await start()
    allowed = engine.keys[1]
    engine.write_policy(
        {
            "clients": {"portal": {"kids": [allowed.kid.hex()], "types": ["t", "r"]}},
            "unix_uids": {str(UID): "portal"},
        }
    )
    client = await Raw.connect(engine)
    await client.hello()
    await client.send(wire.ListKeys(request_id=client.rid()))
    keys = await client.event()
    assert [(k.kid, k.types) for k in keys.keys] == [(allowed.kid, "tr")]


# ----------------------------------------------------------------------------- framing, time


async def test_a_frame_cut_short_by_eof_gets_an_error_frame(start):
    """SPEC.md §12.2: a connection-level ERROR before the close, even when the client has
    shut down its side in the middle of a frame."""
    engine = await start()
    client = await Raw.connect(engine)
    await client.hello()
    ping = client.codec.send(wire.Ping(request_id=7, data=b"half of me"))
    await client.stream.send_all(ping[:-4])
    await client.stream.send_eof()
    error = await client.event()
    assert isinstance(error, wire.Error) and error.code == ErrorCode.PROTOCOL and error.fatal
    assert "ended inside a frame body" in error.message
    assert await client.event() is None


async def test_no_hello_in_time_closes_the_connection(start):
    engine = await start(hello_timeout=0.3)
    client = await Raw.connect(engine)
    error = await client.event(within=5)
    assert isinstance(error, wire.Error) and "no HELLO within" in error.message
    assert await client.event() is None
    assert engine.metric("dccsign_connections_closed_total", reason="hello_timeout") == 1


async def test_an_idle_connection_gets_goaway_and_a_pinging_one_stays(start):
    engine = await start(idle_timeout=0.6)
    idle, pinging = await Raw.connect(engine), await Raw.connect(engine)
    await idle.hello()
    await pinging.hello()
    for _ in range(6):
        await trio.sleep(0.2)
        await pinging.send(wire.Ping(request_id=1, data=b""))
        assert isinstance(await pinging.event(), wire.Pong)
    goaway = await idle.event(within=5)
    assert isinstance(goaway, wire.GoAway) and "idle" in goaway.reason
    assert await idle.event() is None
    assert (await pinging.sign(items(1))).results[0].ok


async def test_at_the_connection_limit_silent_sockets_make_room(start):
    """2,000 sockets that say nothing used to stay open until the fd limit. At the limit, a
    new connection takes the place of the oldest one that has not said HELLO."""
    engine = await start(max_connections=16)
    for _ in range(40):
        await engine.open()
    await served_within(engine)
    assert len(engine.server._slots) <= 16
    assert engine.metric("dccsign_connections_closed_total", reason="evicted") >= 25


async def test_tls_handshakes_that_never_come_make_room_too(tmp_path, nursery):
    """Sockets that connect to the TLS port and never start the handshake hold a slot until
    a new connection needs it; the TLS client that then connects is served, and none of the
    evicted handshakes counts as an engine fault."""
    from dccsign.server.devtls import DEV_CLIENT_NAME, ensure_dev_tls
    from dccsign.server.engine import tls_server_context

    tls = ensure_dev_tls(tmp_path / "tls")
    engine = Engine(
        tmp_path,
        {"clients": {f"cn:{DEV_CLIENT_NAME}": {}}, "default_account_quota": QUOTA},
        max_connections=4,
    )
    context = tls_server_context(tls["server_cert"], tls["server_key"], tls["ca"])
    host, port = await nursery.start(engine.server.serve_tcp, "127.0.0.1", 0, context)
    silent = [await trio.open_tcp_stream(host, port) for _ in range(6)]
    engine.streams += silent
    client_ctx = ssl.create_default_context(cafile=str(tls["ca"]))
    client_ctx.load_cert_chain(tls["client_cert"], tls["client_key"])
    with trio.fail_after(5):
        raw = await trio.open_tcp_stream(host, port)
        stream = trio.SSLStream(raw, client_ctx, server_hostname="localhost")
        engine.streams.append(stream)
        client = Raw(stream)
        await client.hello()
        reply = await client.sign(items(1))
    for s in engine.streams:
        await trio.aclose_forcefully(s)
    assert reply.results[0].ok
    assert engine.metric("dccsign_connections_closed_total", reason="evicted") >= 3
    assert engine.metric("dccsign_connections_closed_total", reason="failure") == 0


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("keyed", [False, True], ids=["no task", "task"])
async def test_work_in_progress_is_answered_after_the_client_half_closes_or_a_drain(start, keyed):
    """Requests in progress when reading stops -- the client sent EOF, or the engine
    drains -- are still answered, before GOAWAY, whether they run in a task (idempotency
    keys) or without one (a plain frame)."""
    engine = await start()
    engine.batcher.gate = trio.Event()  # keyd "works" until the test opens the gate
    sent = items(3)
    if keyed:
        sent = [dataclasses.replace(item, idempotency_key=f"h{i}") for i, item in enumerate(sent)]
    half, drained = await Raw.connect(engine), await Raw.connect(engine)
    for c in (half, drained):
        await c.hello()
        await c.send(wire.SignBatch(request_id=c.rid(), items=tuple(sent)))
    await half.stream.send_eof()
    with trio.fail_after(5):
        while engine.server.pending_items < 6:  # noqa: ASYNC110 (polling)
            await trio.sleep(0.01)
    async with trio.open_nursery() as n:
        n.start_soon(engine.server.drain)
        await trio.testing.wait_all_tasks_blocked()
        engine.batcher.gate.set()
        for c in (half, drained):
            reply = await c.event()
            assert isinstance(reply, wire.SignBatchResult), reply
            assert [r.ok for r in reply.results] == [True] * 3
        goaway = await drained.event()
        assert isinstance(goaway, wire.GoAway) and goaway.last_request_id == drained.next_id
        assert await drained.event() is None
    await settled(engine)


def _boom(view):
    return view.values(0)[1] == "uzi:boom"


def _fault_in_sign_view(dispatcher):
    # The task path: a frame with idempotency keys goes through Dispatcher.sign_view.
    sign = dispatcher.sign_view

    async def wrapped(client, view, types=None, **kw):
        if _boom(view):
            raise RuntimeError("a bug in the dispatcher")
        return await sign(client, view, types, **kw)

    dispatcher.sign_view = wrapped


def _raise_for_boom(dispatcher, name, view_of=lambda view: view):
    """Replace the dispatcher's method *name* by one that raises a bug for a frame of
    "uzi:boom" (its view: *view_of* the method's second argument) and else calls the real one."""
    real = getattr(dispatcher, name)

    def wrapped(client, subject, *args):
        if _boom(view_of(subject)):
            raise RuntimeError("a bug in the dispatcher")
        return real(client, subject, *args)

    setattr(dispatcher, name, wrapped)


def _fault_in_prepare(dispatcher):
    # The path without a task (Dispatcher.sign_frame_soon), failing before keyd.
    _raise_for_boom(dispatcher, "_check_frame")


def _fault_in_keyd_answer(dispatcher):
    # The path without a task, failing in the callback that takes keyd's answer (after the
    # quota was charged and keyd signed: the reply is still INTERNAL, never lost).
    _raise_for_boom(dispatcher, "_keyd_answered", lambda frame: frame.view)


def _fault_escaping_the_dispatcher(dispatcher):
    # The path without a task, a bug raised out of Dispatcher.sign_frame_soon itself.
    _raise_for_boom(dispatcher, "sign_frame_soon")


@pytest.mark.parametrize(
    ("fault", "keyed"),
    [(_fault_in_sign_view, True), (_fault_in_prepare, False), (_fault_in_keyd_answer, False),
     (_fault_escaping_the_dispatcher, False)],
    ids=["task path", "no task, before keyd", "no task, keyd's answer",
         "no task, escaping the dispatcher"],
)  # fmt: skip
async def test_a_fault_in_signing_is_answered_internal_and_the_engine_goes_on(start, fault, keyed):
    engine = await start()
    fault(engine.dispatcher)
    victim = await Raw.connect(engine)
    await victim.hello()
    sent = items(3, "uzi:boom")
    if keyed:
        sent = [dataclasses.replace(item, idempotency_key=f"k{i}") for i, item in enumerate(sent)]
    reply = await victim.sign(sent)
    assert {r.error for r in reply.results} == {ErrorCode.INTERNAL}
    assert all(r.retry_after_ms for r in reply.results)
    assert (await victim.sign(items(2))).results[1].ok  # the same connection goes on
    assert engine.metric("dccsign_internal_errors_total") == 1
    await served_within(engine)
    await victim.close()
    await settled(engine)  # no ticket, count or connection left behind


async def test_a_fault_in_handling_a_connection_ends_only_that_connection(start):
    engine = await start()

    def broken(client, request_id):
        raise RuntimeError("a bug in LIST_KEYS")

    engine.server.keys_for = broken
    victim = await Raw.connect(engine)
    await victim.hello()
    await victim.send(wire.ListKeys(request_id=victim.rid()))
    assert await victim.event() is None  # closed
    await served_within(engine)
    await settled(engine)
    assert engine.metric("dccsign_connections_closed_total", reason="failure") == 1


# ----------------------------------------------------------------------------- the codec


def test_a_refused_batch_is_not_kept_alive_by_the_codec():
    """A SIGN_BATCH whose last item is bad is refused; nothing of the decoded batch may stay
    reachable from the codec (the stored error used to hold it through its traceback)."""
    server = wire.Connection(wire.SERVER, max_frame=8 * 1024 * 1024)
    client = wire.Connection(wire.CLIENT, max_frame=8 * 1024 * 1024, compression=())
    server.receive_data(client.send(client.make_hello()))
    assert isinstance(server.next_event(), wire.Hello)
    welcome = server.make_welcome(max_batch=2000, max_in_flight=1, server="t")
    client.receive_data(server.send(welcome))
    assert isinstance(client.next_event(), wire.Welcome)
    good = {"dcc": sample("v"), "account": "uzi:1"}
    body = cbor2.dumps({"items": [good] * 1999 + [{"dcc": {}, "account": 7}]})
    gc.collect()
    gc.disable()
    try:
        tracemalloc.start()
        server.receive_data(_frame(wire.FrameType.SIGN_BATCH, 1, body))
        del body
        with pytest.raises(wire.RemoteProtocolError, match=r"items\[1999\]"):
            server.next_event()
        with pytest.raises(wire.RemoteProtocolError):  # and again, from the stored error
            server.next_event()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        gc.enable()
    assert peak > 1024 * 1024  # the batch was decoded...
    assert current < 64 * 1024, f"{current} bytes still held"  # ...and let go


def test_bodies_are_counted_before_they_are_decoded(impl):
    """Every body goes through the scan first: the limit follows max_batch (SPEC.md §13)."""
    codec = wire.Connection(wire.SERVER, scan=impl.cbor_scan)
    hello = wire.Connection(wire.CLIENT)
    codec.receive_data(hello.send(hello.make_hello()))
    codec.next_event()
    codec.send(codec.make_welcome(max_batch=10, max_in_flight=1, server="t"))
    limit = wire.body_item_limit(10)
    body = b"\xa1\x65items\x99" + (limit).to_bytes(2, "big") + b"\xa0" * limit
    codec.receive_data(_frame(wire.FrameType.SIGN_BATCH, 1, body))
    with pytest.raises(wire.RemoteProtocolError, match=f"more than {limit} CBOR data items") as e:
        codec.next_event()
    assert e.value.code == ErrorCode.BAD_REQUEST


# ----------------------------------------------------------------- overload (issue 14)


async def test_a_request_refused_busy_is_refused_from_its_header(start):
    """Under overload a sign request is refused before its body is decompressed or decoded:
    a body that is not even zstd gets BUSY (not a protocol error) while the connection is
    full, and the connection goes on; once there is room, the same body is a violation."""
    engine = await start(max_in_flight=1)
    engine.batcher.gate = trio.Event()
    client = await Raw.connect(engine)
    await client.hello()
    await client.send(wire.SignBatch(request_id=client.rid(), items=tuple(items(1))))
    junk = b"\x28\xb5\x2f\xfd not a zstd frame at all"
    rid = client.rid()
    await client.stream.send_all(_frame(wire.FrameType.SIGN_BATCH, rid, junk, compressed=True))
    client.codec.note_sent(rid)
    busy = await client.event()
    assert isinstance(busy, wire.Error) and busy.code == ErrorCode.BUSY, busy
    assert busy.request_id == rid and not busy.fatal
    assert engine.metric("dccsign_busy_from_header_total") == 1
    engine.batcher.gate.set()
    assert (await client.event()).results[0].ok  # the first request, still answered
    rid = client.rid()
    await client.stream.send_all(_frame(wire.FrameType.SIGN_BATCH, rid, junk, compressed=True))
    client.codec.note_sent(rid)
    error = await client.event()
    assert isinstance(error, wire.Error) and error.code == ErrorCode.PROTOCOL, error
    await served_within(engine)


def _two_clients(weight_b=1):
    other = {} if weight_b == 1 else {"weight": weight_b}
    return {"clients": {"portal": {}, "uid:4242": other}, "unix_uids": {str(UID): "portal"}}


#: Limits under which the share rules alone decide (no latency rule): 3/4 of 400 for a
#: portal alone, the hard limit 400 for all.
SHARE_LIMITS = {
    "max_pending_items": 400,
    "max_client_items": 1000,
    "max_connection_items": 1000,
    "queue_target": 0,
}


async def _gated_with_portal_a(start, weight_b=1, **limits):
    """``(engine, a)``: an engine with *limits* for the two clients of :func:`_two_clients`
    whose keyd work waits for ``engine.batcher.gate``, and portal A connected to it."""
    engine = await start(_two_clients(weight_b), **limits)
    engine.batcher.gate = trio.Event()
    a = await Raw.connect(engine)
    await a.hello()
    return engine, a


async def _other_client(engine, nursery):
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(engine.server.serve_stream, server_side, Peer("unix", uid=4242))
    other = Raw(client_side)
    await other.hello()
    return other


async def _admitted(engine, client, batches, size=50):
    """Send *batches* requests of *size* items (nothing finishes: the gate is shut); the
    number admitted (each admitted one shows in pending_items), and the BUSY replies."""
    refusals = []
    for _ in range(batches):
        before = engine.server.pending_items
        await client.send(wire.SignBatch(request_id=client.rid(), items=tuple(items(size))))
        with trio.fail_after(5):
            while engine.server.pending_items == before:
                if client.codec.next_event() is not wire.NEED_DATA or await _busy(client):
                    refusals.append(True)
                    break
                await trio.sleep(0.005)
    return batches - len(refusals), refusals


async def _busy(client):
    """Whether a reply (a BUSY) is waiting on *client*'s socket right now."""
    with trio.move_on_after(0.005):
        data = await client.stream.receive_some(1 << 16)
        client.codec.receive_data(data)
        event = client.codec.next_event()
        assert isinstance(event, wire.Error) and event.code == ErrorCode.BUSY, event
        return True
    return False


async def test_a_lone_burst_leaves_room_for_a_client_arriving_later(start):
    """Alone, a portal may fill 3/4 of the engine's capacity; the rest is kept for clients
    under their share, so a portal arriving during the burst is served at once."""
    engine, a = await _gated_with_portal_a(start, **SHARE_LIMITS)
    admitted, _ = await _admitted(engine, a, 8)
    assert admitted == 6 and engine.server.pending_items == 300
    async with trio.open_nursery() as nursery:
        b = await _other_client(engine, nursery)
        assert (await _admitted(engine, b, 3))[0] == 2  # up to the hard limit, 400
        engine.batcher.gate.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("weight_b", [1, 3])
async def test_near_capacity_the_client_over_its_share_is_refused_first(start, weight_b):
    """Portal A bursts; portal B, arriving later, gets its weighted share of the engine near
    capacity, and A is the one refused."""
    engine, a = await _gated_with_portal_a(start, weight_b, **SHARE_LIMITS)
    assert (await _admitted(engine, a, 4))[0] == 4
    async with trio.open_nursery() as nursery:
        b = await _other_client(engine, nursery)
        # Above 300 (3/4 of 400) each gets 300 * w / (1 + w): 150 for B, or 225 with weight 3
        # (then the hard limit, 400, stops B at 200).
        admitted_b, _ = await _admitted(engine, b, 6)
        assert admitted_b == (3 if weight_b == 1 else 4)
        admitted_a, refusals = await _admitted(engine, a, 1)
        assert admitted_a == 0 and refusals  # A, with 200 in progress, is over its share
        engine.batcher.gate.set()
        nursery.cancel_scope.cancel()


async def test_when_behind_the_client_under_its_share_is_still_served(start):
    """The latency rule (queue_target) sheds the backlog from the client that makes it: a
    portal with little in progress is admitted while the flooding one is refused."""
    engine, a = await _gated_with_portal_a(
        start, max_pending_items=10_000, queue_target=0.3, queue_floor=0
    )
    assert (await _admitted(engine, a, 4))[0] == 4
    await trio.sleep(0.35)  # A's oldest request is now older than the target
    async with trio.open_nursery() as nursery:
        b = await _other_client(engine, nursery)
        assert (await _admitted(engine, b, 1))[0] == 1  # B has 50 of 250 in progress
        await trio.sleep(0.35)  # B's oldest is behind too, but B is under its share
        assert (await _admitted(engine, b, 1))[0] == 1
        admitted_a, refusals = await _admitted(engine, a, 1)
        assert admitted_a == 0 and refusals
        assert "behind" in engine.server.busy(a_conn(engine, "portal"), 1)
        engine.batcher.gate.set()
        nursery.cancel_scope.cancel()


def a_conn(engine, client):
    """The server's connection object of *client* (one connection)."""
    return next(s.conn for s in engine.server._slots if s.conn and s.conn.client == client)


async def test_the_deadline_answers_while_the_work_goes_on_and_its_result_is_dropped(start):
    """A request whose work outlives its deadline is answered DEADLINE_EXCEEDED by the
    connection's watchdog; the work is not cancelled, its late result is not sent as a
    second reply, and its hold on the limits ends only when the work ends."""
    engine = await start(deadline=0.3)
    engine.batcher.gate = trio.Event()  # keyd "takes" until the test opens the gate
    client = await Raw.connect(engine)
    await client.hello()
    started = trio.current_time()
    reply = await client.sign(items(3))
    waited = trio.current_time() - started
    assert isinstance(reply, wire.SignBatchResult), reply
    assert {r.error for r in reply.results} == {ErrorCode.DEADLINE_EXCEEDED}
    assert all(r.retry_after_ms for r in reply.results)
    assert 0.25 <= waited < 3, waited
    # The work is still in progress: its certificates still count against the limits.
    assert engine.server.pending_items == 3
    assert engine.metric(
        "dccsign_items_total", client="portal", kid="", type="", result="DEADLINE_EXCEEDED"
    ) == 3  # fmt: skip
    engine.batcher.gate.set()
    with trio.fail_after(5):
        while engine.server.pending_items:  # noqa: ASYNC110 (polling)
            await trio.sleep(0.01)
    # Nothing more came for that request: the next frame is the answer to a PING.
    await client.send(wire.Ping(request_id=client.rid(), data=b"after"))
    pong = await client.event()
    assert isinstance(pong, wire.Pong) and pong.data == b"after"
    # A request that ends in time is answered with its results, not at its deadline.
    engine.batcher.gate = None
    ok = await client.sign(items(2))
    assert all(r.ok for r in ok.results), ok
    with trio.move_on_after(0.5):  # past that request's deadline: no second answer
        extra = await client.event(within=1)
        raise AssertionError(f"a second answer came: {extra}")
    # Counted once each: the late results of the first request are not counted as well.
    assert engine.metric("dccsign_requests_total", client="portal") == 2
    await client.close()
    await settled(engine)


async def test_over_tls_replies_that_fill_the_socket_arrive_whole_and_in_order(
    tmp_path, nursery, monkeypatch
):
    """Over TLS a reply goes out at once when the socket takes it (no writer task); one the
    socket does not take whole is owed and finished by the writer before anything else. A
    client that pipelines many batches with a small receive buffer and reads only later
    gets every reply once, whole and decodable, each answering its own request."""
    from dccsign.protocol.clients.tls_stream import TLSStream, open_tls_over_tcp
    from dccsign.server.devtls import DEV_CLIENT_NAME, ensure_dev_tls
    from dccsign.server.engine import tls_server_context

    outcomes = []
    send_nowait = TLSStream.send_nowait

    def recorded(self, data):
        outcomes.append(send_nowait(self, data))
        return outcomes[-1]

    monkeypatch.setattr(TLSStream, "send_nowait", recorded)
    tls = ensure_dev_tls(tmp_path / "tls")
    engine = Engine(
        tmp_path,
        {"clients": {f"cn:{DEV_CLIENT_NAME}": {"quota": QUOTA}}, "default_account_quota": QUOTA},
        max_in_flight=8,
    )
    context = tls_server_context(tls["server_cert"], tls["server_key"], tls["ca"])
    host, port = await nursery.start(engine.server.serve_tcp, "127.0.0.1", 0, context)
    client_ctx = ssl.create_default_context(cafile=str(tls["ca"]))
    client_ctx.load_cert_chain(tls["client_cert"], tls["client_key"])
    stream = await open_tls_over_tcp(host, port, client_ctx, server_hostname="localhost")
    stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    engine.streams.append(stream)
    client = Raw(stream, compression=())  # uncompressed: each reply is ~30 KB
    await client.hello()
    sent = {}
    batches = 24

    async def send_all_batches():
        for _ in range(batches):
            rid = client.rid()
            batch = tuple(items(50, f"uzi:{rid}"))
            sent[rid] = [it.dcc for it in batch]
            await client.send(wire.SignBatch(request_id=rid, items=batch))

    nursery.start_soon(send_all_batches)  # it blocks once the engine stops reading us
    await trio.sleep(1)  # the engine signs what it admits; its replies fill the socket
    answered = {}
    while len(answered) < batches:
        reply = await client.event()
        assert reply is not None and reply.request_id not in answered
        answered[reply.request_id] = reply
    signed = 0
    for rid, reply in answered.items():
        if isinstance(reply, wire.Error):
            assert reply.code == ErrorCode.BUSY, reply
            continue
        assert len(reply.results) == 50 and all(r.ok for r in reply.results)
        for result, dcc in zip(reply.results, sent[rid], strict=True):
            payload = native.sign1_decode(
                native.zlib_decompress(native.b45decode(result.hc1[4:]))
            ).payload
            assert cbor2.loads(payload)[-260][1] == dcc
        signed += 1
    assert signed >= 2  # (the rest BUSY: the connection had max_in_flight in progress)
    # Both ways were taken: replies sent at once, and replies owed to the writer.
    assert True in outcomes and False in outcomes
    await trio.aclose_forcefully(stream)
    await settled(engine)
