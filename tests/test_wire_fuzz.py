"""Fuzzing the portal <-> engine codec: whatever the bytes, only WireProtocolError comes out."""

from __future__ import annotations

import struct

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccsign.protocol import wire
from dccsign.protocol.codes import ErrorCode
from dccsign.testing.samples import varied_samples

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KID = bytes(range(8))


def _pair():
    client = wire.Connection("client", max_frame=1 << 20)
    server = wire.Connection("server")
    server.receive_data(client.send(client.make_hello("fuzz")))
    server.next_event()
    return client, server


def _opened():
    client, server = _pair()
    client.receive_data(server.send(server.make_welcome(max_batch=50, max_in_flight=8, server="s")))
    client.next_event()
    return client, server


def _client_frames():
    client, _ = _opened()
    items = tuple(
        wire.SignItem(d, "uzi:900012345", operator="uzi:1", kid=KID, validity_days=30,
                 idempotency_key=f"key-{i}")
        for i, d in enumerate(varied_samples(20))
    )  # fmt: skip
    return [
        client.send(wire.Sign(1, items[0])),
        client.send(wire.SignBatch(2, items)),  # compressed
        client.send(wire.SignBatch(3, items[:2])),
        client.send(wire.ListKeys(4)),
        client.send(wire.Ping(9, b"ping")),
        client.send(wire.Pong(9, b"pong")),
        client.send(wire.Error(0, ErrorCode.PROTOCOL, "bye", fatal=True)),
    ]


def _server_frames():
    client, server = _opened()
    for rid in (1, 2, 3):
        server.receive_data(client.send(wire.ListKeys(rid)))
        server.next_event()
    ok = wire.ItemResult(hc1="HC1:" + "6BFOXN" * 80, kid=KID)
    bad = wire.ItemResult(error=ErrorCode.INVALID_DCC, message="dob: not a date", retry_after_ms=5)
    key = wire.KeyInfo(
        KID, -7, "vtr", "active", b"\x30\x82" + bytes(300), 1_700_000_000, 1_800_000_000
    )
    return [
        server.send(wire.SignResult(1, ok)),
        server.send(wire.SignBatchResult(2, (ok, bad) * 10)),  # compressed
        server.send(wire.Keys(3, (key,))),
        server.send(wire.Error(2, ErrorCode.BUSY, "later", retry_after_ms=100)),
        server.send(wire.Ping(0, b"")),
        server.send(wire.GoAway(3, "restart")),
    ]


CLIENT_FRAMES = _client_frames()
SERVER_FRAMES = _server_frames()


def _drain(conn, data):
    """Feed *data* then the end of the stream; only RemoteProtocolError may escape."""
    try:
        if data:
            conn.receive_data(data)
        while conn.next_event() not in (wire.NEED_DATA, None):
            pass
        conn.receive_data(b"")
        while conn.next_event() is not None:
            pass
    except wire.RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert conn.state is wire.State.ERROR
        return exc
    return None


def _receiver(server_side, opened):
    client, server = _opened() if opened else _pair()
    if server_side or not opened:
        return server if server_side else client
    for rid in (1, 2, 3):  # so that replies to 1..3 are expected
        client.send(wire.ListKeys(rid))
    return client


@FUZZ
@given(data=st.binary(max_size=400), opened=st.booleans())
def test_random_bytes(data, opened):
    _drain(_receiver(True, opened), data)


@FUZZ
@given(
    ftype=st.sampled_from([1, 2, 3, 4, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x30, 0x7F, 0x42]),
    flags=st.sampled_from([0, 0, 1]),
    rid=st.sampled_from([0, 1, 2, 5, 2**32 - 1]),
    body=st.binary(max_size=300),
    server_side=st.booleans(),
)
def test_random_bodies_behind_valid_headers(ftype, flags, rid, body, server_side):
    header = struct.pack(">2sBBBBHII", b"DC", 1, ftype, flags, 0, 0, rid, len(body))
    _drain(_receiver(server_side, True), header + body)


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.sampled_from(["HC1:x", "vtr", "zstd", KID]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            ["dcc", "account", "items", "results", "hc1", "kid", "error", "message", "keys",
             "types", "code", "data", "versions", "max_frame", "compression", "x"]
        ),
        inner,
        max_size=5,
    ),
    max_leaves=12,
)  # fmt: skip


@FUZZ
@given(
    ftype=st.sampled_from([1, 3, 4, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x30, 0x7F]),
    body=_cbor_values,
    server_side=st.booleans(),
    opened=st.booleans(),
)
def test_well_formed_cbor_of_the_wrong_shape(ftype, body, server_side, opened):
    raw = cbor2.dumps(body)
    rid = 0 if ftype in (1, 0x30, 0x7F) else 2
    header = struct.pack(">2sBBBBHII", b"DC", 1, ftype, 0, 0, 0, rid, len(raw))
    _drain(_receiver(server_side, opened), header + raw)


@st.composite
def _mutated(draw, frames):
    data = bytearray(draw(st.sampled_from(frames)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutated(CLIENT_FRAMES), opened=st.booleans())
def test_mutated_client_frames(data, opened):
    _drain(_receiver(True, opened), data)


@FUZZ
@given(data=_mutated(SERVER_FRAMES))
def test_mutated_server_frames(data):
    _drain(_receiver(False, True), data)


@FUZZ
@given(frames=st.lists(st.sampled_from(CLIENT_FRAMES[:6]), min_size=1, max_size=5))
def test_valid_frames_stay_valid_in_any_order_of_ids(frames):
    # Replaying frames out of id order is an error the codec reports, never a crash.
    _drain(_receiver(True, True), b"".join(frames))
