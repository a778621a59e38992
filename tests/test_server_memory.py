"""The server's connection logic over ``trio.testing.memory_stream_pair``: no socket, no
process -- the handshake, pipelining, BUSY, GOAWAY and malformed frames, as SPEC.md §7-§8
state them (the real Server and Dispatcher; keyd replaced by tests/fakes.py)."""

import cbor2
import trio
import trio.testing

from dccsign.protocol import wire
from dccsign.protocol.codes import ErrorCode
from dccsign.server.server import Peer
from dccsign.testing.samples import varied_samples
from server_harness import Engine, Raw


def _items(n):
    return tuple(wire.SignItem(d, "uzi:1") for d in varied_samples(n))


async def _closed(client: Raw) -> bool:
    """The server ended the stream (EOF) without sending anything more."""
    return await client.event() is None


async def test_handshake_welcome_carries_the_limits(tmp_path, nursery):
    engine = Engine(tmp_path, max_batch=64, max_in_flight=3)
    client = engine.connect_memory(nursery)
    welcome = await client.hello()
    assert (welcome.max_batch, welcome.max_in_flight) == (64, 3)
    assert welcome.compression == "zstd" and welcome.version == wire.VERSION


async def test_an_unknown_peer_is_refused_at_hello(tmp_path, nursery):
    engine = Engine(tmp_path)
    client = engine.connect_memory(nursery, Peer("unix", uid=4242))  # not in the policy
    await client.send(client.codec.make_hello())
    refusal = await client.event()
    assert isinstance(refusal, wire.Error)
    assert (refusal.request_id, refusal.code, refusal.fatal) == (0, ErrorCode.UNAUTHENTICATED, True)
    assert await _closed(client)
    assert engine.batcher.signed == 0


async def test_a_request_before_hello_is_a_protocol_error(tmp_path, nursery):
    engine = Engine(tmp_path)
    client = engine.connect_memory(nursery)
    # The codec will not send a request before WELCOME: write the frame by hand.
    ping = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.FrameType.PING, 0, 1, 1) + b"\xa0"
    await client.stream.send_all(ping)
    error = await _raw_error(client)
    assert (error.request_id, error.code) == (0, ErrorCode.PROTOCOL)


async def test_ping_and_list_keys(tmp_path, nursery):
    engine = Engine(tmp_path)
    client = engine.connect_memory(nursery)
    await client.hello()
    await client.send(wire.Ping(request_id=client.rid(), data=b"are you there"))
    pong = await client.event()
    assert isinstance(pong, wire.Pong) and pong.data == b"are you there"
    rid = client.rid()
    await client.send(wire.ListKeys(request_id=rid))
    keys = await client.event()
    assert isinstance(keys, wire.Keys) and keys.request_id == rid
    assert {k.kid for k in keys.keys} == {dsc.kid for dsc in engine.keys}


async def test_pipelined_requests_are_each_answered_under_their_own_id(tmp_path, nursery):
    engine = Engine(tmp_path)
    client = engine.connect_memory(nursery)
    await client.hello()
    sent = {}
    for n in (3, 1, 5):
        rid = client.rid()
        sent[rid] = n
        await client.send(wire.SignBatch(request_id=rid, items=_items(n)))
    answered = {}
    for _ in sent:
        reply = await client.event()
        assert isinstance(reply, wire.SignBatchResult), reply
        assert all(r.ok for r in reply.results)
        answered[reply.request_id] = len(reply.results)
    assert answered == sent
    assert engine.batcher.signed == 9


async def test_beyond_max_in_flight_is_busy_and_the_connection_stays(tmp_path, nursery):
    engine = Engine(tmp_path, max_in_flight=2)
    engine.batcher.gate = trio.Event()  # requests stay in progress until the gate opens
    client = engine.connect_memory(nursery)
    await client.hello()
    first, second, third = client.rid(), client.rid(), client.rid()
    for rid in (first, second, third):
        await client.send(wire.SignBatch(request_id=rid, items=_items(2)))
    busy = await client.event()
    assert isinstance(busy, wire.Error) and busy.request_id == third
    assert busy.code == ErrorCode.BUSY and not busy.fatal
    engine.batcher.gate.set()
    assert {(await client.event()).request_id for _ in range(2)} == {first, second}
    # The connection goes on: the refused request, sent again, is answered.
    await client.send(wire.SignBatch(request_id=client.rid(), items=_items(1)))
    assert (await client.event()).results[0].ok


async def test_a_drain_answers_what_was_read_then_goaway_and_close(tmp_path, nursery):
    """SPEC.md §7.4: requests up to GOAWAY's last_request_id are answered; later ones were
    not processed (the server stops reading when it drains) and the connection closes."""
    engine = Engine(tmp_path)
    engine.batcher.gate = trio.Event()
    client = engine.connect_memory(nursery)
    await client.hello()
    first = client.rid()
    await client.send(wire.SignBatch(request_id=first, items=_items(2)))
    with trio.fail_after(5):
        while engine.server.pending_items < 2:  # noqa: ASYNC110 (polling)
            await trio.sleep(0.01)
    drained = trio.Event()

    async def drain():
        await engine.server.drain()
        drained.set()

    nursery.start_soon(drain)
    await trio.testing.wait_all_tasks_blocked()
    await client.send(wire.SignBatch(request_id=client.rid(), items=_items(3)))  # too late
    await trio.testing.wait_all_tasks_blocked()
    assert not drained.is_set()  # the request in progress holds the drain
    engine.batcher.gate.set()
    reply = await client.event()
    assert reply.request_id == first and [r.ok for r in reply.results] == [True, True]
    goaway = await client.event()
    assert isinstance(goaway, wire.GoAway) and goaway.last_request_id == first
    assert await _closed(client)
    with trio.fail_after(5):
        await drained.wait()
    assert engine.batcher.signed == 2  # the request after the drain began was not processed


async def test_a_bad_magic_ends_the_connection_with_protocol(tmp_path, nursery):
    engine = Engine(tmp_path)
    client = engine.connect_memory(nursery)
    await client.hello()
    await client.stream.send_all(b"XX" + bytes(14))
    error = await _raw_error(client)
    assert (error.request_id, error.code, error.fatal) == (0, ErrorCode.PROTOCOL, True)


async def test_a_body_that_is_not_cbor_is_a_connection_error(tmp_path, nursery):
    """SPEC.md §4.3, §12.2: BAD_REQUEST at connection level (id 0, fatal), then the close."""
    engine = Engine(tmp_path)
    client = engine.connect_memory(nursery)
    await client.hello()
    junk = b"\xff\xfe not cbor"
    header = wire.HEADER.pack(
        wire.MAGIC, wire.VERSION, wire.FrameType.SIGN_BATCH, 0, client.rid(), len(junk)
    )
    await client.stream.send_all(header + junk)
    error = await _raw_error(client)
    assert (error.request_id, error.code, error.fatal) == (0, ErrorCode.BAD_REQUEST, True)
    assert await client.stream.receive_some(1 << 16) == b""  # closed
    assert engine.batcher.signed == 0


async def _raw_error(client: Raw) -> wire.Error:
    """The next frame from the server, read past the client codec's own checks (after a
    frame the codec would not send, it may refuse what follows): an ERROR frame, decoded."""
    data = b""
    with trio.fail_after(10):
        while True:
            if len(data) >= wire.HEADER.size:
                *_, ftype, _flags, rid, size = wire.HEADER.unpack_from(data)
                if len(data) >= wire.HEADER.size + size:
                    break
            chunk = await client.stream.receive_some(1 << 16)
            assert chunk, f"EOF before a whole frame: {data!r}"
            data += chunk
    assert ftype == wire.FrameType.ERROR, ftype
    body = cbor2.loads(data[wire.HEADER.size : wire.HEADER.size + size])
    return wire.Error(
        request_id=rid,
        code=ErrorCode(body["code"]),
        message=body["message"],
        fatal=bool(body.get("fatal", rid == 0)),
    )
