"""The portal <-> engine codec: golden bytes, round trips, the handshake, limits and the spec."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import cbor2
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccsign.protocol import wire
from dccsign.protocol.codes import RETRYABLE, ErrorCode

SPEC = Path(__file__).resolve().parents[1] / "protocol" / "SPEC.md"
KID = bytes.fromhex("0102030405060708")
MIB = 1 << 20
HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers


class ConnectionPair:
    """A client and a server Connection wired to each other (in memory)."""

    def __init__(self, *, client_compression=("zstd",), server_compression=("zstd",)):
        self.client = wire.Connection(wire.CLIENT, max_frame=MIB, compression=client_compression)
        self.server = wire.Connection(
            wire.SERVER, max_frame=4 * MIB, compression=server_compression
        )
        self.next_id = 1

    def c2s(self, event):
        """Send *event* from the client; the server must parse it back to an equal event."""
        return self._pass(self.client, self.server, event)

    def s2c(self, event):
        return self._pass(self.server, self.client, event)

    @staticmethod
    def _pass(sender, receiver, event):
        data = sender.send(event)
        receiver.receive_data(data)
        got = receiver.next_event()
        assert got == event
        assert type(got) is type(event)
        assert receiver.next_event() is wire.NEED_DATA
        return data

    def handshake(self, max_batch=100, max_in_flight=16):
        self.c2s(self.client.make_hello(agent="tests"))
        welcome = self.server.make_welcome(
            max_batch=max_batch, max_in_flight=max_in_flight, server="dccsign-tests"
        )
        self.s2c(welcome)
        assert self.client.state is wire.State.OPEN and self.server.state is wire.State.OPEN
        return self

    def rid(self):
        """A fresh request id (ids must increase)."""
        self.next_id += 1
        return self.next_id

    def request(self, rid=None):
        """Make *rid* (or a fresh id) a request the server has seen, so replies may use it."""
        rid = self.rid() if rid is None else rid
        self.c2s(wire.ListKeys(rid))
        return rid


def frame(ftype, rid, body, *, flags=0, version=1, magic=b"DC", reserved=0, length=None):
    """Raw frame bytes; *body* is a CBOR-encodable value or raw bytes."""
    raw = body if isinstance(body, bytes) else cbor2.dumps(body)
    n = len(raw) if length is None else length
    fields = (magic, version, ftype, flags, reserved >> 16, reserved & 0xFFFF, rid, n)
    return struct.pack(">2sBBBBHII", *fields) + raw


def opened_server(max_batch=100):
    pair = ConnectionPair().handshake(max_batch=max_batch)
    return pair.server


def refused(conn, data, code=None, match=None):
    """Feed *data*; the next event must be a RemoteProtocolError (returned)."""
    conn.receive_data(data)
    with pytest.raises(wire.RemoteProtocolError, match=match) as info:
        conn.next_event()
    if code is not None:
        assert info.value.code is code
    assert conn.state is wire.State.ERROR
    with pytest.raises(wire.RemoteProtocolError):  # and again on every later call
        conn.next_event()
    return info.value


ITEM = wire.SignItem(
    {"ver": "1.3.0"}, "uzi:1", operator="uzi:2", kid=KID, validity_days=30, idempotency_key=b"k1"
)
OK = wire.ItemResult(hc1="HC1:6BF", kid=KID)


# ----------------------------------------------------------------------------- golden bytes
#
# Each frame: header (16 bytes) | body. The CBOR of each body is spelled out in diagnostic
# notation beside it so the bytes can be checked by hand against RFC 8949.

GOLDEN = [
    (
        "client",
        wire.Hello(max_frame=MIB, compression=("zstd",), versions=(1,), agent="portal/2.1"),
        "4443 01 01 00 000000 00000000 0000003e",
        # {"versions": [1], "max_frame": 1048576, "compression": ["zstd"], "agent": "portal/2.1"}
        "a4 68 76657273696f6e73 8101 69 6d61785f6672616d65 1a00100000"
        " 6b 636f6d7072657373696f6e 81 64 7a737464 65 6167656e74 6a 706f7274616c2f322e31",
    ),
    (
        "server",
        wire.Welcome(
            max_frame=MIB, max_batch=500, max_in_flight=32, server="dccsign/0.1", compression="zstd"
        ),
        "4443 01 02 00 000000 00000000 0000005a",
        # {"version": 1, "max_frame": 1048576, "max_batch": 500, "max_in_flight": 32,
        #  "compression": "zstd", "server": "dccsign/0.1"}
        "a6 67 76657273696f6e 01 69 6d61785f6672616d65 1a00100000 69 6d61785f6261746368 1901f4"
        " 6d 6d61785f696e5f666c69676874 1820 6b 636f6d7072657373696f6e 64 7a737464"
        " 66 736572766572 6b 6463637369676e2f302e31",
    ),
    (
        "client",
        wire.Ping(7, b"\x01\x02"),
        "4443 01 03 00 000000 00000007 00000009",
        "a1 64 64617461 42 0102",
    ),
    (
        "server",
        wire.Pong(7, b"\x01\x02"),
        "4443 01 04 00 000000 00000007 00000009",
        "a1 64 64617461 42 0102",
    ),
    (
        "client",
        wire.Sign(1, ITEM),
        "4443 01 10 00 000000 00000001 0000005d",
        # {"dcc": {"ver": "1.3.0"}, "account": "uzi:1", "operator": "uzi:2", "kid": h'0102..08',
        #  "validity_days": 30, "idempotency_key": h'6b31'}
        "a6 63 646363 a1 63 766572 65 312e332e30 67 6163636f756e74 65 757a693a31"
        " 68 6f70657261746f72 65 757a693a32 63 6b6964 48 0102030405060708"
        " 6d 76616c69646974795f64617973 181e 6f 6964656d706f74656e63795f6b6579 42 6b31",
    ),
    (
        "client",
        wire.SignBatch(
            2,
            (
                wire.SignItem({"ver": "1.3.0"}, "uzi:1"),
                wire.SignItem({"dob": "1990"}, "uzi:1", idempotency_key="x"),
            ),
        ),
        "4443 01 11 00 000000 00000002 00000055",
        # {"items": [{"dcc": {"ver": "1.3.0"}, "account": "uzi:1"},
        #            {"dcc": {"dob": "1990"}, "account": "uzi:1", "idempotency_key": "x"}]}
        "a1 65 6974656d73 82 a2 63 646363 a1 63 766572 65 312e332e30 67 6163636f756e74"
        " 65 757a693a31 a3 63 646363 a1 63 646f62 64 31393930 67 6163636f756e74 65 757a693a31"
        " 6f 6964656d706f74656e63795f6b6579 61 78",
    ),
    (
        "server",
        wire.SignResult(1, OK),
        "4443 01 12 00 000000 00000001 0000001a",
        # {"hc1": "HC1:6BF", "kid": h'0102030405060708'}
        "a2 63 686331 67 4843313a364246 63 6b6964 48 0102030405060708",
    ),
    (
        "server",
        wire.SignResult(
            1, wire.ItemResult(error=ErrorCode.INVALID_DCC, message="dob: in the future")
        ),
        "4443 01 12 00 000000 00000001 00000024",
        # {"error": 30, "message": "dob: in the future"}
        "a2 65 6572726f72 181e 67 6d657373616765 72 646f623a20696e2074686520667574757265",
    ),
    (
        "server",
        wire.SignBatchResult(
            2,
            (
                OK,
                wire.ItemResult(
                    error=ErrorCode.KEYD_UNAVAILABLE, message="retry", retry_after_ms=500
                ),
            ),
        ),
        "4443 01 13 00 000000 00000002 0000004d",
        # {"results": [{"hc1": "HC1:6BF", "kid": h'01..08'},
        #              {"error": 42, "message": "retry", "retry_after_ms": 500}]}
        "a1 67 726573756c7473 82 a2 63 686331 67 4843313a364246 63 6b6964 48 0102030405060708"
        " a3 65 6572726f72 182a 67 6d657373616765 65 7265747279"
        " 6e 72657472795f61667465725f6d73 1901f4",
    ),
    ("client", wire.ListKeys(3), "4443 01 20 00 000000 00000003 00000001", "a0"),  # {}
    (
        "server",
        wire.Keys(
            3, (wire.KeyInfo(KID, -7, "vtr", "active", b"\x30\x00", 1700000000, 1800000000),)
        ),
        "4443 01 21 00 000000 00000003 00000057",
        # {"keys": [{"kid": h'01..08', "alg": -7, "types": "vtr", "state": "active",
        #            "dsc": h'3000', "not_before": 1700000000, "not_after": 1800000000}]}
        "a1 64 6b657973 81 a7 63 6b6964 48 0102030405060708 63 616c67 26 65 7479706573"
        " 63 767472 65 7374617465 66 616374697665 63 647363 42 3000"
        " 6a 6e6f745f6265666f7265 1a6553f100 69 6e6f745f6166746572 1a6b49d200",
    ),
    (
        "server",
        wire.GoAway(3, "restart"),
        "4443 01 30 00 000000 00000000 00000021",
        # {"last_request_id": 3, "reason": "restart"}
        "a2 6f 6c6173745f726571756573745f6964 03 66 726561736f6e 67 72657374617274",
    ),
    (
        "server",
        wire.Error(2, ErrorCode.BUSY, "queue full", retry_after_ms=250),
        "4443 01 7f 00 000000 00000002 0000002c",
        # {"code": 40, "message": "queue full", "retry_after_ms": 250}
        "a3 64 636f6465 1828 67 6d657373616765 6a 71756575652066756c6c"
        " 6e 72657472795f61667465725f6d73 18fa",
    ),
    (
        "server",
        wire.Error(0, ErrorCode.BAD_REQUEST, "bad", fatal=True),
        "4443 01 7f 00 000000 00000000 0000001a",
        # {"code": 4, "message": "bad", "fatal": true}
        "a3 64 636f6465 04 67 6d657373616765 63 626164 65 666174616c f5",
    ),
]


def _golden_id(case):
    return f"{type(case[1]).__name__}-{case[1].request_id}"


def _pair_ready_for(event):
    """A pair in the state where *event* may be sent."""
    pair = ConnectionPair()
    if isinstance(event, wire.Hello):
        return pair
    if isinstance(event, wire.Welcome):
        pair.c2s(wire.Hello(max_frame=MIB, compression=("zstd",)))
        return pair
    pair.handshake()
    if (
        isinstance(event, wire.SignResult | wire.SignBatchResult | wire.Keys | wire.Error)
        and event.request_id
    ):
        pair.request(event.request_id)
    if isinstance(event, wire.GoAway):
        pair.request(event.last_request_id)
    return pair


def test_golden_table_covers_every_frame_type():
    assert {case[1].TYPE for case in GOLDEN} == set(wire.FrameType)


def _golden_ends(case):
    """A golden case's event, its frame bytes, and the sender and receiver of a pair ready
    for it."""
    side, event, header, body = case
    data = bytes.fromhex(header.replace(" ", "") + body.replace(" ", ""))
    pair = _pair_ready_for(event)
    if side == "client":
        return event, data, pair.client, pair.server
    return event, data, pair.server, pair.client


@pytest.mark.parametrize("case", GOLDEN, ids=_golden_id)
def test_golden_send(case):
    event, expected, sender, _ = _golden_ends(case)
    assert sender.send(event) == expected


@pytest.mark.parametrize("case", GOLDEN, ids=_golden_id)
def test_golden_receive(case):
    event, data, _, receiver = _golden_ends(case)
    receiver.receive_data(data)
    assert receiver.next_event() == event
    assert receiver.next_event() is wire.NEED_DATA


def test_golden_bodies_are_plain_cbor():
    # An independent decoder sees the maps the spec describes (no codec involved).
    hello = cbor2.loads(bytes.fromhex(GOLDEN[0][3].replace(" ", "")))
    assert hello == {
        "versions": [1],
        "max_frame": MIB,
        "compression": ["zstd"],
        "agent": "portal/2.1",
    }
    sign = cbor2.loads(bytes.fromhex(GOLDEN[4][3].replace(" ", "")))
    assert sign == {
        "dcc": {"ver": "1.3.0"},
        "account": "uzi:1",
        "operator": "uzi:2",
        "kid": KID,
        "validity_days": 30,
        "idempotency_key": b"k1",
    }


# ----------------------------------------------------------------------------- round trips

_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)


def _json(depth):
    if depth <= 1:
        return _scalar
    inner = _json(depth - 1)
    return (
        _scalar
        | st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    )


dccs = st.dictionaries(st.text(max_size=8), _json(4), max_size=6)
texts = st.text(min_size=1, max_size=wire.MAX_TEXT)
kids = st.binary(min_size=8, max_size=8)
uint32 = st.integers(0, 2**32 - 1)
codes = st.sampled_from(list(ErrorCode)) | st.integers(1, 2**32 - 1)
messages = st.text(max_size=wire.MAX_MESSAGE)

items = st.builds(
    wire.SignItem,
    dcc=dccs,
    account=texts,
    operator=st.none() | texts,
    kid=st.none() | kids,
    validity_days=st.none() | st.integers(1, 3650),
    idempotency_key=st.none()
    | st.binary(min_size=1, max_size=64)
    | st.text(min_size=1, max_size=16),
)
results = st.builds(
    wire.ItemResult, hc1=st.text(max_size=200).map(lambda s: "HC1:" + s + "X"), kid=kids
) | st.builds(wire.ItemResult, error=codes, message=messages, retry_after_ms=st.none() | uint32)
keyinfos = st.builds(
    wire.KeyInfo,
    kid=kids,
    alg=st.integers(-(2**63), 2**63 - 1),
    types=st.sampled_from(["", "v", "t", "r", "vt", "rv", "vtr", "trv"]),
    state=st.text(min_size=1, max_size=32),
    dsc=st.binary(min_size=1, max_size=2000),
    not_before=st.integers(-(2**63), 2**63 - 1),
    not_after=st.integers(-(2**63), 2**63 - 1),
)


@HYPO
@given(
    max_frame=st.integers(wire.MIN_MAX_FRAME, 2**32 - 1),
    compression=st.sampled_from([(), ("zstd",)]),
    agent=st.none() | st.text(max_size=256),
    server_max=st.integers(wire.MIN_MAX_FRAME, 2**32 - 1),
    max_batch=st.integers(1, 2**32 - 1),
    max_in_flight=st.integers(1, 2**32 - 1),
    server=st.text(max_size=256),
)
def test_handshake_round_trip(
    max_frame, compression, agent, server_max, max_batch, max_in_flight, server
):
    client = wire.Connection("client", max_frame=max_frame, compression=compression)
    srv = wire.Connection("server", max_frame=server_max)
    hello = client.make_hello(agent)
    srv.receive_data(client.send(hello))
    assert srv.next_event() == hello
    welcome = srv.make_welcome(max_batch=max_batch, max_in_flight=max_in_flight, server=server)
    client.receive_data(srv.send(welcome))
    assert client.next_event() == welcome
    for conn in (client, srv):
        assert conn.state is wire.State.OPEN
        assert conn.max_frame == min(max_frame, server_max)
        assert conn.compression == (compression[0] if compression else None)
        assert conn.max_batch == max_batch and conn.max_in_flight == max_in_flight


#: (what to draw, how to send it over a fresh pair): each must come out as it went in.
ROUND_TRIPS = [
    pytest.param(items, lambda pair, item: pair.c2s(wire.Sign(pair.rid(), item)), id="sign"),
    pytest.param(
        st.lists(items, min_size=1, max_size=12),
        lambda pair, batch: pair.c2s(wire.SignBatch(pair.rid(), tuple(batch))),
        id="sign_batch",
    ),
    pytest.param(
        results,
        lambda pair, result: pair.s2c(wire.SignResult(pair.request(), result)),
        id="sign_result",
    ),
    pytest.param(
        st.lists(results, min_size=1, max_size=30),
        lambda pair, batch: pair.s2c(wire.SignBatchResult(pair.request(), tuple(batch))),
        id="sign_batch_result",
    ),
    pytest.param(
        st.lists(keyinfos, max_size=5),
        lambda pair, keys: pair.s2c(wire.Keys(pair.request(), tuple(keys))),
        id="keys",
    ),
]


@pytest.mark.parametrize(("values", "send"), ROUND_TRIPS)
@HYPO
@given(data=st.data())
def test_round_trip(values, send, data):
    pair = ConnectionPair().handshake()
    send(pair, data.draw(values))


@HYPO
@given(rid=uint32, data=st.binary(max_size=64), client_pings=st.booleans())
def test_ping_pong_round_trip(rid, data, client_pings):
    pair = ConnectionPair().handshake()
    if client_pings:
        pair.c2s(wire.Ping(rid, data))
        pair.s2c(wire.Pong(rid, data))
    else:
        pair.s2c(wire.Ping(rid, data))
        pair.c2s(wire.Pong(rid, data))


@HYPO
@given(
    code=codes,
    message=messages,
    retry=st.none() | uint32,
    fatal=st.booleans(),
    connection_level=st.booleans(),
)
def test_error_round_trip(code, message, retry, fatal, connection_level):
    pair = ConnectionPair().handshake()
    rid = 0 if connection_level else pair.request()
    pair.s2c(wire.Error(rid, code, message, retry, fatal))


@HYPO
@given(rid=st.integers(1, 2**32 - 1), reason=messages)
def test_goaway_and_list_keys_round_trip(rid, reason):
    pair = ConnectionPair().handshake()
    pair.c2s(wire.ListKeys(rid))
    pair.s2c(wire.GoAway(rid, reason))


def test_client_connection_level_error():
    pair = ConnectionPair().handshake()
    pair.c2s(wire.Error(0, ErrorCode.PROTOCOL, "your WELCOME was odd", fatal=True))


# ----------------------------------------------------------------------------- streams


def _conversation():
    """The bytes each way of one conversation, and the events each side sent."""
    pair = ConnectionPair()
    to_server, to_client, sent_c, sent_s = [], [], [], []

    def c(ev):
        to_server.append(pair.c2s(ev))
        sent_c.append(ev)

    def s(ev):
        to_client.append(pair.s2c(ev))
        sent_s.append(ev)

    c(pair.client.make_hello("stream"))
    s(pair.server.make_welcome(max_batch=100, max_in_flight=4, server="x"))
    big = tuple(
        wire.SignItem({"ver": "1.3.0", "n": i, "pad": "p" * 40}, "uzi:7") for i in range(30)
    )
    c(wire.Sign(1, ITEM))
    c(wire.SignBatch(2, big))
    c(wire.Ping(0, b"hi"))
    s(wire.Pong(0, b"hi"))
    s(wire.SignBatchResult(2, (OK,) * 80))
    s(wire.SignResult(1, OK))
    c(wire.ListKeys(3))
    s(wire.Keys(3, ()))
    s(wire.GoAway(3, "bye"))
    assert to_server[2][4] == to_client[2][4] == wire.FLAG_ZSTD  # compressed ones included
    return b"".join(to_server), b"".join(to_client), sent_c, sent_s


@pytest.mark.parametrize("step", [1, 7, 16, 17, 1000, 1 << 20])
def test_split_and_coalesced_feeds(step):
    to_server, to_client, sent_c, sent_s = _conversation()
    server = wire.Connection("server", max_frame=4 * MIB)
    client = wire.Connection("client", max_frame=MIB)
    client.send(sent_c[0])
    got_s, got_c = [], []
    for data, conn, got in ((to_server, server, got_s), (to_client, client, got_c)):
        for i in range(0, len(data), step):
            conn.receive_data(data[i : i + step])
            while (ev := conn.next_event()) is not wire.NEED_DATA:
                got.append(ev)
                if isinstance(ev, wire.Hello):  # the server answers before reading on
                    conn.send(sent_s[0])
                if isinstance(ev, wire.Welcome):  # the client's requests, for the replies to match
                    for request in sent_c[1:]:
                        conn.send(request)
    assert got_s == sent_c
    assert got_c == sent_s


def test_clean_end_and_cut_frames():
    pair = ConnectionPair().handshake()
    pair.server.receive_data(b"")
    assert pair.server.next_event() is None
    assert pair.server.state is wire.State.CLOSED
    assert pair.server.next_event() is None
    pair.server.send(wire.Ping(1, b""))  # we may still send after the peer finished sending
    with pytest.raises(wire.LocalProtocolError):
        pair.server.receive_data(b"more")

    for cut in (5, 20):
        pair = ConnectionPair().handshake()
        data = pair.client.send(wire.Sign(pair.rid(), ITEM))
        pair.server.receive_data(data[:cut])
        assert pair.server.next_event() is wire.NEED_DATA
        pair.server.receive_data(b"")
        with pytest.raises(wire.RemoteProtocolError, match="stream ended inside"):
            pair.server.next_event()


# ----------------------------------------------------------------------------- framing errors


def test_oversized_frame_refused_on_its_header_alone():
    server = opened_server()
    header = frame(0x10, 9, b"", length=MIB + 1)  # the negotiated max_frame is 1 MiB
    assert len(header) == 16
    refused(server, header, ErrorCode.FRAME_TOO_LARGE, "exceeds max_frame")
    # Before the handshake the limit is MIN_MAX_FRAME, whatever either side will offer.
    fresh = wire.Connection("server")
    refused(fresh, frame(0x01, 0, b"", length=wire.MIN_MAX_FRAME + 1), ErrorCode.FRAME_TOO_LARGE)
    # A frame of exactly max_frame is fine as far as the header goes.
    ok = opened_server()
    ok.receive_data(frame(0x10, 9, b"", length=MIB))
    assert ok.next_event() is wire.NEED_DATA


@pytest.mark.parametrize(
    ("data", "code", "match"),
    [
        (frame(0x10, 9, b"\xa0", magic=b"DX"), ErrorCode.PROTOCOL, "bad magic"),
        (frame(0x10, 9, b"\xa0", version=2), ErrorCode.UNSUPPORTED_VERSION, "version"),
        (frame(0x10, 9, b"\xa0", reserved=1), ErrorCode.PROTOCOL, "reserved"),
        (frame(0x10, 9, b"\xa0", reserved=0x800000), ErrorCode.PROTOCOL, "reserved"),
        (frame(0x10, 9, b"\xa0", flags=0x02), ErrorCode.PROTOCOL, "flag"),
        (frame(0x10, 9, b"\xa0", flags=0x80), ErrorCode.PROTOCOL, "flag"),
        (frame(0x55, 9, b"\xa0"), ErrorCode.PROTOCOL, "unknown frame type 0x55"),
        (frame(0x00, 9, b"\xa0"), ErrorCode.PROTOCOL, "unknown frame type"),
        (frame(0x20, 9, b"\x80"), ErrorCode.BAD_REQUEST, "not a CBOR map"),
        (frame(0x20, 9, b"\xa0\x00"), ErrorCode.BAD_REQUEST, "trailing bytes"),
        (frame(0x20, 9, b"\xff"), ErrorCode.BAD_REQUEST, "not valid CBOR"),
        (frame(0x20, 9, b""), ErrorCode.BAD_REQUEST, "not valid CBOR"),
        (frame(0x20, 9, bytes.fromhex("a2616101616102")), ErrorCode.BAD_REQUEST, "Duplicate"),
        (frame(0x20, 9, bytes.fromhex("a1010a")), ErrorCode.BAD_REQUEST, "key"),
        (frame(0x20, 9, bytes.fromhex("62ff41")), ErrorCode.BAD_REQUEST, "not valid CBOR"),
        # tags anywhere: a date (1), a bignum (2), self-described CBOR (55799), an unknown one
        (frame(0x20, 9, bytes.fromhex("a16178c11a00000001")), ErrorCode.BAD_REQUEST, "tag"),
        (frame(0x20, 9, bytes.fromhex("a16178c2420101")), ErrorCode.BAD_REQUEST, "tag"),
        (frame(0x20, 9, bytes.fromhex("d9d9f7a0")), ErrorCode.BAD_REQUEST, "tag"),
        (frame(0x20, 9, bytes.fromhex("a16178d9ffff00")), ErrorCode.BAD_REQUEST, "tag"),
        (frame(0x20, 9, bytes.fromhex("81" * 17 + "a0")), ErrorCode.BAD_REQUEST, "not valid"),
    ],
)
def test_malformed_frames(data, code, match):
    refused(opened_server(), data, code, match)


def test_nesting_limit_allows_real_bodies():
    # 16 containers deep (the body map counts) is the most a body may nest.
    body = {"x": [[[[[[[[[[[[[[{}]]]]]]]]]]]]]]}  # map, 14 arrays, map: 16
    server = opened_server()
    server.receive_data(frame(0x20, 9, body))
    assert server.next_event() == wire.ListKeys(9)
    refused(opened_server(), frame(0x20, 9, {"x": [body]}), ErrorCode.BAD_REQUEST)


@pytest.mark.parametrize(
    ("receiver", "ftype", "rid", "match"),
    [
        ("server", 0x12, 1, "client may not send SIGN_RESULT"),
        ("server", 0x13, 1, "client may not send SIGN_BATCH_RESULT"),
        ("server", 0x21, 1, "client may not send KEYS"),
        ("server", 0x30, 0, "client may not send GOAWAY"),
        ("server", 0x02, 0, "client may not send WELCOME"),
        ("server", 0x01, 0, "HELLO may be sent only once"),
        ("client", 0x10, 5, "server may not send SIGN"),
        ("client", 0x11, 5, "server may not send SIGN_BATCH"),
        ("client", 0x20, 5, "server may not send LIST_KEYS"),
        ("client", 0x01, 0, "server may not send HELLO"),
        ("client", 0x02, 0, "WELCOME must answer the HELLO, once"),
    ],
)
def test_wrong_direction(receiver, ftype, rid, match):
    pair = ConnectionPair().handshake()
    pair.request(1)  # request 1 is in flight: what is refused is the direction, not the id
    refused(getattr(pair, receiver), frame(ftype, rid, {}), ErrorCode.PROTOCOL, match)


def test_frames_before_the_handshake():
    # The server wants HELLO first.
    for ftype, rid in ((0x10, 1), (0x20, 1), (0x03, 0), (0x7F, 1)):
        refused(wire.Connection("server"), frame(ftype, rid, {}), ErrorCode.PROTOCOL)
    # ... and nothing after HELLO until it has sent WELCOME (no pipelining past the handshake).
    server = wire.Connection("server")
    client = wire.Connection("client")
    server.receive_data(client.send(client.make_hello()))
    assert isinstance(server.next_event(), wire.Hello)
    assert server.state is wire.State.SEND_WELCOME
    refused(server, frame(0x20, 1, {}), ErrorCode.PROTOCOL, "before the handshake")
    # The client wants WELCOME (or a connection-level ERROR) first.
    client = wire.Connection("client")
    refused(client, frame(0x02, 0, {}), ErrorCode.PROTOCOL, "WELCOME must answer")
    client = wire.Connection("client")
    client.send(client.make_hello())
    assert client.state is wire.State.AWAIT_WELCOME
    refused(client, frame(0x12, 1, {"hc1": "HC1:x", "kid": KID}), ErrorCode.PROTOCOL)
    # Local side: nothing but HELLO (client) / WELCOME (server) first.
    with pytest.raises(wire.LocalProtocolError, match="before the handshake"):
        wire.Connection("client").send(wire.Sign(1, ITEM))
    with pytest.raises(wire.LocalProtocolError, match="WELCOME must answer"):
        wire.Connection("server").send(wire.Welcome(MIB, 1, 1, "x"))
    with pytest.raises(wire.LocalProtocolError, match="make_welcome"):
        wire.Connection("server").make_welcome(max_batch=1, max_in_flight=1, server="x")


def test_connection_level_error_before_welcome():
    # A server may refuse a client straight away (e.g. UNAUTHENTICATED) instead of WELCOME.
    client = wire.Connection("client")
    server = wire.Connection("server")
    server.receive_data(client.send(client.make_hello()))
    server.next_event()
    data = server.send(wire.Error(0, ErrorCode.UNAUTHENTICATED, "unknown client", fatal=True))
    client.receive_data(data)
    assert client.next_event() == wire.Error(
        0, ErrorCode.UNAUTHENTICATED, "unknown client", None, True
    )
    with pytest.raises(wire.LocalProtocolError, match="nothing more"):
        server.send(wire.Ping(1))
    # After a fatal ERROR the sender must not send anything else.
    refused(client, frame(0x02, 0, {}), ErrorCode.PROTOCOL, "after a fatal ERROR")


def test_unsupported_version():
    server = wire.Connection("server")
    hello = {"versions": [2, 3], "max_frame": MIB, "compression": []}
    exc = refused(server, frame(0x01, 0, hello), ErrorCode.UNSUPPORTED_VERSION, "no common")
    out = server.error_frame(exc)
    assert out[3] == 0x7F and out[8:12] == b"\0\0\0\0"
    assert cbor2.loads(out[16:]) == {"code": 2, "message": str(exc), "fatal": True}
    assert server.error_frame(exc) is None  # only one last word


@pytest.mark.parametrize(
    ("welcome", "match"),
    [
        ({"version": 2}, "version 2 was not offered"),
        ({"max_frame": 2 * MIB}, "above the offered"),
        ({"compression": "zstd"}, "was not offered"),
        ({"compression": "brotli"}, "was not offered"),
        ({"max_batch": 0}, "WELCOME.max_batch"),
        ({"max_in_flight": -1}, "WELCOME.max_in_flight"),
        ({"server": 5}, "WELCOME.server"),
    ],
)
def test_bad_welcome(welcome, match):
    client = wire.Connection("client", max_frame=MIB, compression=())
    client.send(client.make_hello())
    body = {
        "version": 1,
        "max_frame": MIB,
        "max_batch": 1,
        "max_in_flight": 1,
        "compression": None,
        "server": "x",
    } | welcome
    refused(client, frame(0x02, 0, body), match=match)


def test_request_id_rules():
    pair = ConnectionPair().handshake()
    with pytest.raises(wire.LocalProtocolError, match="not above") as info:
        pair.client.send(wire.Sign(0, ITEM))
    assert info.value.code is ErrorCode.PROTOCOL
    pair.c2s(wire.Sign(10, ITEM))
    pair.c2s(wire.SignBatch(12, (ITEM,)))  # gaps are fine
    with pytest.raises(wire.LocalProtocolError, match="not above"):
        pair.client.send(wire.ListKeys(12))
    with pytest.raises(wire.LocalProtocolError, match="32 bits"):
        pair.client.send(wire.ListKeys(2**32))
    with pytest.raises(wire.LocalProtocolError, match="never sent"):
        pair.server.send(wire.SignResult(13, OK))
    with pytest.raises(wire.LocalProtocolError, match="never sent"):
        pair.server.send(wire.SignResult(0, OK))
    pair.s2c(wire.SignResult(10, OK))  # replies may come in any order
    # The server refuses a request id that does not increase.
    refused(pair.server, frame(0x20, 12, {}), ErrorCode.PROTOCOL, "not above")
    # The client refuses replies to requests it never sent, and id-0 connection frames.
    pair = ConnectionPair().handshake()
    pair.request(5)
    refused(pair.client, frame(0x12, 6, {"hc1": "HC1:x", "kid": KID}), match="never sent")
    pair = ConnectionPair().handshake()
    pair.request(5)
    refused(pair.client, frame(0x30, 1, {"last_request_id": 1, "reason": ""}), match="id 0")
    pair = ConnectionPair().handshake()
    refused(pair.server, frame(0x7F, 3, {"code": 1, "message": ""}), match="request id 0")


def test_goaway_rules():
    pair = ConnectionPair().handshake()
    pair.request(4)
    with pytest.raises(wire.LocalProtocolError, match="above the highest"):
        pair.server.send(wire.GoAway(5))
    pair.s2c(wire.GoAway(4, "draining"))
    assert pair.client.goaway_last_id == 4
    with pytest.raises(wire.LocalProtocolError, match="draining") as info:
        pair.client.send(wire.ListKeys(5))
    assert info.value.code is ErrorCode.SHUTTING_DOWN
    pair.c2s(wire.Ping(1))  # pings are still fine
    pair.s2c(wire.SignBatchResult(4, (OK,)))  # and the server answers what it took
    pair.s2c(wire.GoAway(3))  # a second GOAWAY may lower the mark
    with pytest.raises(wire.LocalProtocolError, match="may not increase"):
        pair.server.send(wire.GoAway(4))


# ----------------------------------------------------------------------------- compression


def test_compression_is_used_for_large_batches_only():
    pair = ConnectionPair().handshake()
    assert pair.client.compression == "zstd"
    small = pair.c2s(wire.SignBatch(pair.rid(), (ITEM,)))
    assert small[4] == 0
    big_items = tuple(wire.SignItem({"ver": "1.3.0", "i": i}, "uzi:1") for i in range(100))
    big = pair.c2s(wire.SignBatch(pair.rid(), big_items))
    assert big[4] == wire.FLAG_ZSTD
    plain = cbor2.dumps({"items": [{"dcc": it.dcc, "account": it.account} for it in big_items]})
    assert len(big) - 16 < len(plain) // 3
    assert zstandard.ZstdDecompressor().decompress(big[16:]) == plain
    # SIGN is never compressed, however large.
    one = pair.c2s(wire.Sign(pair.rid(), wire.SignItem({"x": "y" * 5000}, "uzi:1")))
    assert one[4] == 0
    results = pair.s2c(wire.SignBatchResult(pair.rid() - 1, (OK,) * 100))
    assert results[4] == wire.FLAG_ZSTD


@pytest.mark.parametrize(("offer", "allow"), [((), ("zstd",)), (("zstd",), ())])
def test_compression_not_negotiated(offer, allow):
    pair = ConnectionPair(client_compression=offer, server_compression=allow).handshake()
    assert pair.client.compression is None and pair.server.compression is None
    big_items = tuple(wire.SignItem({"ver": "1.3.0", "i": i}, "uzi:1") for i in range(100))
    assert pair.c2s(wire.SignBatch(pair.rid(), big_items))[4] == 0
    packed = zstandard.ZstdCompressor().compress(cbor2.dumps({}))
    refused(
        pair.server,
        frame(0x20, pair.rid(), packed, flags=1),
        ErrorCode.PROTOCOL,
        "no compression was negotiated",
    )


def test_compressed_hello_is_refused():
    packed = zstandard.ZstdCompressor().compress(cbor2.dumps({"versions": [1]}))
    refused(
        wire.Connection("server"),
        frame(0x01, 0, packed, flags=1),
        ErrorCode.PROTOCOL,
        "no compression",
    )


def test_zstd_bomb_is_refused_without_inflating():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * MIB))
    assert len(bomb) < 10_000
    refused(
        opened_server(),
        frame(0x11, 5, bomb, flags=1),
        ErrorCode.FRAME_TOO_LARGE,
        "decompressed body of 67108864 bytes exceeds",
    )
    # The same bomb lying about its size (declaring 100 bytes) fails inside zstd, bounded.
    lying = bytearray(bomb)
    descriptor = lying[4]
    assert descriptor >> 6 == 2  # a 4-byte content size field
    offset = 5 + (0 if descriptor & 0x20 else 1)
    lying[offset : offset + 4] = (100).to_bytes(4, "little")
    refused(opened_server(), frame(0x11, 5, bytes(lying), flags=1), ErrorCode.PROTOCOL, "zstd")
    # A frame that does not say how large it is, is refused too.
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(cbor2.dumps({}))
    refused(opened_server(), frame(0x11, 5, streamed, flags=1), ErrorCode.PROTOCOL, "content size")


@pytest.mark.parametrize(
    ("packed", "match"),
    [
        (b"not zstd at all", "not a zstd frame"),
        (zstandard.ZstdCompressor().compress(b"\xa0") + b"x", "exactly one zstd frame"),
        (zstandard.ZstdCompressor().compress(b"\xa0") * 2, "exactly one zstd frame"),
        (zstandard.ZstdCompressor().compress(b"\xa0" * 100)[:-3], "zstd"),
    ],
)
def test_bad_compressed_bodies(packed, match):
    refused(opened_server(), frame(0x20, 5, packed, flags=1), ErrorCode.PROTOCOL, match)


def test_compressed_frames_of_any_type_are_accepted():
    # The sender chooses what to compress; a receiver takes it on any frame after WELCOME.
    server = opened_server()
    server.receive_data(frame(0x20, 5, zstandard.ZstdCompressor().compress(b"\xa0"), flags=1))
    assert server.next_event() == wire.ListKeys(5)
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(b"\xa0")
    server.receive_data(frame(0x20, 6, checked, flags=1))
    assert server.next_event() == wire.ListKeys(6)
    corrupt = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(b"\xa0" * 50))
    corrupt[-1] ^= 0xFF  # the checksum no longer matches
    refused(server, frame(0x20, 7, bytes(corrupt), flags=1), ErrorCode.PROTOCOL, "zstd")


# ----------------------------------------------------------------------------- body fields


def _sign_body(**changes):
    body = {"dcc": {"ver": "1.3.0"}, "account": "uzi:1"}
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dcc": _DROP}, r"SIGN\.dcc: must be a map"),
        ({"dcc": [1]}, r"SIGN\.dcc"),
        ({"dcc": "{}"}, r"SIGN\.dcc"),
        ({"account": _DROP}, r"SIGN\.account"),
        ({"account": ""}, r"SIGN\.account: must be text of 1\.\.256"),
        ({"account": "a" * 257}, r"SIGN\.account"),
        ({"account": b"uzi"}, r"SIGN\.account"),
        ({"operator": ""}, r"SIGN\.operator"),
        ({"operator": 7}, r"SIGN\.operator"),
        ({"kid": b"1234567"}, r"SIGN\.kid: must be a byte string of 8 bytes"),
        ({"kid": "12345678"}, r"SIGN\.kid"),
        ({"validity_days": 0}, r"SIGN\.validity_days"),
        ({"validity_days": 3651}, r"SIGN\.validity_days"),
        ({"validity_days": True}, r"SIGN\.validity_days"),
        ({"validity_days": 1.0}, r"SIGN\.validity_days"),
        ({"idempotency_key": b""}, r"SIGN\.idempotency_key"),
        ({"idempotency_key": b"k" * 65}, r"SIGN\.idempotency_key"),
        ({"idempotency_key": "é" * 33}, r"SIGN\.idempotency_key"),  # 66 UTF-8 bytes
        ({"idempotency_key": 5}, r"SIGN\.idempotency_key"),
    ],
)
def test_bad_sign_fields(changes, match):
    exc = refused(
        opened_server(), frame(0x10, 5, _sign_body(**changes)), ErrorCode.BAD_REQUEST, match
    )
    assert exc.request_id == 5


def test_lenient_body_reading():
    # Optional fields may be null; unknown fields are ignored; indefinite lengths are fine;
    # the DCC's content is the engine's to judge (INVALID_DCC), not the framing's.
    server = opened_server()
    body = _sign_body(
        operator=None, kid=None, validity_days=None, idempotency_key=None, future_field={"x": 1}
    )
    body["dcc"] = {"ver": None, "x": b"bytes", "y": [True, 1.5]}
    server.receive_data(frame(0x10, 5, body))
    assert server.next_event() == wire.Sign(5, wire.SignItem(body["dcc"], "uzi:1"))
    server.receive_data(frame(0x20, 6, bytes.fromhex("bf6178f6ff")))  # {_ "x": null}
    assert server.next_event() == wire.ListKeys(6)
    ok = opened_server()
    ok.receive_data(frame(0x10, 5, _sign_body(idempotency_key="é" * 32)))  # 64 UTF-8 bytes
    assert ok.next_event().item.idempotency_key == "é" * 32


@pytest.mark.parametrize(
    ("body", "code", "match"),
    [
        ({}, ErrorCode.BAD_REQUEST, r"SIGN_BATCH\.items"),
        ({"items": []}, ErrorCode.BAD_REQUEST, r"SIGN_BATCH\.items"),
        ({"items": [_sign_body()] * 4}, ErrorCode.BATCH_TOO_LARGE, "max_batch is 3"),
        ({"items": [_sign_body(), 5]}, ErrorCode.BAD_REQUEST, r"items\[1\] is not a map"),
        (
            {"items": [_sign_body(), _sign_body(account="")]},
            ErrorCode.BAD_REQUEST,
            r"SIGN_BATCH\.items\[1\]\.account",
        ),
    ],
)
def test_bad_sign_batch(body, code, match):
    refused(opened_server(max_batch=3), frame(0x11, 5, body), code, match)


@pytest.mark.parametrize(
    ("result", "match"),
    [
        ({}, "neither hc1 nor error"),
        ({"hc1": "HC1:x"}, r"\.kid"),
        ({"hc1": "HC2:x", "kid": KID}, r"\.hc1"),
        ({"hc1": "HC1:", "kid": KID}, r"\.hc1"),
        ({"hc1": "HC1:" + "x" * 8189, "kid": KID}, r"\.hc1"),
        ({"hc1": "HC1:x", "kid": KID, "error": 30}, "both hc1 and error"),
        ({"error": 0, "message": ""}, r"\.error"),
        ({"error": 30}, r"\.message"),
        ({"error": 30, "message": "m" * 1025}, r"\.message"),
        ({"error": 30, "message": "", "retry_after_ms": -1}, r"\.retry_after_ms"),
        ([], "is not a map"),
    ],
)
def test_bad_results(result, match):
    pair = ConnectionPair().handshake()
    pair.request(5)
    refused(
        pair.client,
        frame(0x13, 5, {"results": [OK_BODY, result]}),
        ErrorCode.BAD_REQUEST,
        r"SIGN_BATCH_RESULT\.results\[1\]",
    )
    if isinstance(result, dict):
        pair = ConnectionPair().handshake()
        pair.request(5)
        refused(pair.client, frame(0x12, 5, result), ErrorCode.BAD_REQUEST, match)


OK_BODY = {"hc1": "HC1:6BF", "kid": KID}


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ({"kid": b"1"}, r"KEYS\.keys\[0\]\.kid"),
        ({"alg": "ES256"}, r"\.alg"),
        ({"alg": 2**63}, r"\.alg"),
        ({"types": "vv"}, r"\.types"),
        ({"types": "x"}, r"\.types"),
        ({"types": "vtrv"}, r"\.types"),
        ({"state": ""}, r"\.state"),
        ({"dsc": b""}, r"\.dsc"),
        ({"not_before": 1.5}, r"\.not_before"),
        ({"not_after": None}, r"\.not_after"),
    ],
)
def test_bad_keys(key, match):
    good = {
        "kid": KID,
        "alg": -7,
        "types": "v",
        "state": "active",
        "dsc": b"0",
        "not_before": 0,
        "not_after": 1,
    }
    pair = ConnectionPair().handshake()
    pair.request(5)
    refused(pair.client, frame(0x21, 5, {"keys": [good | key]}), ErrorCode.BAD_REQUEST, match)


def test_keys_entries_must_be_maps():
    pair = ConnectionPair().handshake()
    pair.request(5)
    refused(pair.client, frame(0x21, 5, {"keys": [5]}), ErrorCode.BAD_REQUEST, r"keys\[0\]")


@pytest.mark.parametrize(
    ("ftype", "body", "match"),
    [
        (0x01, {"versions": [], "max_frame": MIB, "compression": []}, r"HELLO\.versions"),
        (0x01, {"versions": [0], "max_frame": MIB, "compression": []}, r"HELLO\.versions"),
        (0x01, {"versions": [1], "max_frame": 1024, "compression": []}, r"HELLO\.max_frame"),
        (0x01, {"versions": [1], "max_frame": MIB}, r"HELLO\.compression"),
        (0x01, {"versions": [1], "max_frame": MIB, "compression": [""]}, "compression"),
        (0x01, {"versions": [1], "max_frame": MIB, "compression": [], "agent": 1}, "agent"),
    ],
)
def test_bad_hello(ftype, body, match):
    refused(wire.Connection("server"), frame(ftype, 0, body), ErrorCode.BAD_REQUEST, match)


def test_bad_ping_goaway_error_bodies():
    pair = ConnectionPair().handshake()
    refused(pair.server, frame(0x03, 1, {"data": b"x" * 65}), ErrorCode.BAD_REQUEST, "PING.data")
    pair = ConnectionPair().handshake()
    refused(pair.client, frame(0x04, 1, {}), ErrorCode.BAD_REQUEST, "PONG.data")
    pair = ConnectionPair().handshake()
    refused(pair.client, frame(0x30, 0, {"last_request_id": 0}), ErrorCode.BAD_REQUEST, "reason")
    pair = ConnectionPair().handshake()
    refused(
        pair.client,
        frame(0x7F, 0, {"code": 1, "message": "", "fatal": 1}),
        ErrorCode.BAD_REQUEST,
        "ERROR.fatal",
    )
    pair = ConnectionPair().handshake()
    refused(
        pair.client,
        frame(0x7F, 0, {"code": "x", "message": ""}),
        ErrorCode.BAD_REQUEST,
        "ERROR.code",
    )


def test_unknown_error_codes_are_kept():
    pair = ConnectionPair().handshake()
    rid = pair.request()
    pair.client.receive_data(frame(0x7F, rid, {"code": 47, "message": "new"}))
    err = pair.client.next_event()
    assert err == wire.Error(rid, 47, "new") and type(err.code) is int and err.retryable
    known = wire.Error(rid, ErrorCode.INVALID_DCC, "x")
    assert not known.retryable and wire.Error(rid, ErrorCode.BUSY, "x").retryable
    assert not wire.Error(rid, 37, "x").retryable


# ----------------------------------------------------------------------------- sending


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (wire.Sign(5, wire.SignItem({"ver": "1.3.0"}, "")), r"SIGN\.account"),
        (wire.Sign(5, wire.SignItem({"ver": "1.3.0"}, "uzi:1", kid=b"short")), r"SIGN\.kid"),
        (wire.Sign(5, wire.SignItem(["not a map"], "uzi:1")), r"SIGN\.dcc"),
        (wire.Sign(5, {"dcc": {}, "account": "a"}), "not a SignItem"),
        (wire.SignBatch(5, ()), r"SIGN_BATCH\.items"),
        (
            wire.SignBatch(5, (ITEM, wire.SignItem({}, "uzi:1", validity_days=0))),
            r"SIGN_BATCH\.items\[1\]\.validity_days",
        ),
        (wire.SignBatch(5, (ITEM,) * 101), "max_batch is 100"),
        (wire.SignBatch(5, (ITEM, "not an item")), r"SIGN_BATCH\.items\[1\] is a str"),
        (
            wire.Sign(5, wire.SignItem({"x": {"y": {"z": [[[[[[[[[[{}]]]]]]]]]]}}}, "uzi:1")),
            "nests deeper",
        ),
        (wire.Sign(5, wire.SignItem({"ver": "1.3.0"}, "uzi:\udc80")), "cannot encode"),
        (wire.Ping(5, b"x" * 65), "PING.data"),
        (wire.Error(0, ErrorCode.PROTOCOL, "x"), None),  # fine: a client's connection-level error
        (wire.Error(5, ErrorCode.PROTOCOL, "x"), "client's ERROR must have request id 0"),
        (wire.Keys(5, ()), "client may not send KEYS"),
        ("not an event", "not a wire event"),
    ],
)
def test_client_send_refusals(event, match):
    pair = ConnectionPair().handshake()
    if match is None:
        pair.client.send(event)
        return
    with pytest.raises(wire.LocalProtocolError, match=match):
        pair.client.send(event)
    assert pair.client.state is wire.State.OPEN  # nothing happened
    pair.c2s(wire.Sign(5, ITEM))


@pytest.mark.parametrize(
    "dcc",
    [
        {"dt": __import__("datetime").date(2021, 1, 1)},
        {"x": float("nan")},
        {"x": {1: "int key"}},
        {"x": 2**64},
        {"x": b"bytes"},
        {"x": {"y": {1, 2}}},
        {"x": [[[[[[[[[[[[["deep"]]]]]]]]]]]]]},
    ],
    ids=["date", "nan", "int-key", "bignum", "bytes", "set", "too-deep"],
)
def test_client_refuses_non_json_dccs(dcc):
    pair = ConnectionPair().handshake()
    with pytest.raises(wire.LocalProtocolError, match=r"SIGN\.dcc"):
        pair.client.send(wire.Sign(5, wire.SignItem(dcc, "uzi:1")))


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (wire.SignResult(5, wire.ItemResult(hc1="HC1:x")), r"SIGN_RESULT\.kid"),
        (
            wire.SignResult(5, wire.ItemResult(hc1="HC1:x", kid=KID, message="m")),
            "carries no message",
        ),
        (
            wire.SignResult(5, wire.ItemResult(error=ErrorCode.NO_KEY, message="m", kid=KID)),
            "carries no",
        ),
        (wire.SignResult(5, wire.ItemResult(error=ErrorCode.NO_KEY)), r"SIGN_RESULT\.message"),
        (wire.SignResult(5, wire.ItemResult(error="NO_KEY", message="")), r"SIGN_RESULT\.error"),
        (wire.SignBatchResult(5, (OK, "x")), r"results\[1\] is a str"),
        (wire.SignBatchResult(5, (OK,) * 101), r"1\.\.100 results"),
        (
            wire.Keys(5, (wire.KeyInfo(KID, -7, "q", "active", b"0", 0, 1),)),
            r"KEYS\.keys\[0\]\.types",
        ),
        (
            wire.Keys(5, (wire.KeyInfo(KID, -7, "v", "active", b"0", 0, 1), KID)),
            r"KEYS\.keys\[1\] is a",
        ),
        (wire.Error(5, ErrorCode.BUSY, "m" * 1025), "ERROR.message"),
        (wire.Error(5, True, "m"), "ERROR.code"),
        (wire.Welcome(MIB, 1, 1, "x"), "WELCOME must answer"),
        (wire.Sign(6, ITEM), "server may not send SIGN"),
    ],
)
def test_server_send_refusals(event, match):
    pair = ConnectionPair().handshake()
    pair.request(5)
    with pytest.raises(wire.LocalProtocolError, match=match):
        pair.server.send(event)
    pair.s2c(wire.SignResult(5, OK))


def test_send_refuses_frames_above_max_frame():
    pair = ConnectionPair().handshake()
    huge = wire.SignItem({"x": "y" * MIB}, "uzi:1")
    with pytest.raises(wire.LocalProtocolError, match="exceeds max_frame") as info:
        pair.client.send(wire.Sign(5, huge))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    pair.c2s(wire.Sign(5, ITEM))  # the refused id was not used up


def test_bad_hello_and_welcome_from_our_side():
    client = wire.Connection("client", max_frame=MIB, compression=())
    with pytest.raises(wire.LocalProtocolError, match="not enabled"):
        client.send(wire.Hello(MIB, ("zstd",)))
    with pytest.raises(wire.LocalProtocolError, match="version 2"):
        client.send(wire.Hello(MIB, (), (1, 2)))
    with pytest.raises(wire.LocalProtocolError, match="above this connection's limit"):
        client.send(wire.Hello(2 * MIB, ()))
    with pytest.raises(wire.LocalProtocolError, match=r"HELLO\.max_frame"):
        client.send(wire.Hello(1000, ()))
    server = wire.Connection("server", max_frame=wire.MIN_MAX_FRAME, compression=())
    server.receive_data(client.send(client.make_hello()))
    server.next_event()
    with pytest.raises(wire.LocalProtocolError, match="above this server's"):
        server.send(wire.Welcome(MIB, 1, 1, "x"))
    with pytest.raises(wire.LocalProtocolError, match="not offered"):
        server.send(wire.Welcome(wire.MIN_MAX_FRAME, 1, 1, "x", compression="zstd"))
    welcome = server.make_welcome(max_batch=1, max_in_flight=1, server="x")
    assert welcome.max_frame == wire.MIN_MAX_FRAME and welcome.compression is None
    server.send(welcome)
    with pytest.raises(ValueError, match="max_frame"):
        wire.Connection("client", max_frame=100)
    with pytest.raises(ValueError, match="unsupported compression"):
        wire.Connection("client", compression=("gzip",))
    with pytest.raises(ValueError):
        wire.Connection("proxy")
    with pytest.raises(wire.LocalProtocolError, match="only a client"):
        wire.Connection("server").make_hello()


def test_error_frame():
    pair = ConnectionPair().handshake()
    exc = refused(pair.server, frame(0x10, 9, _sign_body(account="")), ErrorCode.BAD_REQUEST)
    out = pair.server.error_frame(exc)
    body = cbor2.loads(out[16:])
    assert body["code"] == 4 and body["fatal"] is True
    assert body["message"].startswith("request 9: SIGN.account")
    pair.client.receive_data(out)
    err = pair.client.next_event()
    assert err.request_id == 0 and err.fatal and err.code is ErrorCode.BAD_REQUEST
    # Any other exception is reported as INTERNAL, without its text.
    other = ConnectionPair().handshake()
    out = other.server.error_frame(KeyError("secret detail"))
    assert cbor2.loads(out[16:]) == {"code": 50, "message": "internal error", "fatal": True}
    assert other.server.state is wire.State.ERROR
    with pytest.raises(wire.LocalProtocolError):
        other.server.send(wire.Ping(1))
    assert other.server.error_frame(KeyError()) is None


def test_events_keep_health_data_out_of_repr():
    text = repr(wire.Sign(1, wire.SignItem({"nam": {"fn": "Secret"}}, "uzi:1")))
    assert "Secret" not in text and "uzi:1" in text
    assert "HC1:" not in repr(wire.ItemResult(hc1="HC1:SECRET", kid=KID))
    assert wire.ItemResult(hc1="HC1:x", kid=KID).ok and not wire.ItemResult(error=1, message="").ok


# ----------------------------------------------------------------------------- SPEC.md


def _spec_error_table():
    text = SPEC.read_text(encoding="utf-8")
    start = text.index("<!-- error-table -->")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        if not cells[0].isdigit():
            continue
        rows[int(cells[0])] = (cells[1], cells[2])
    return rows


def test_spec_error_table_matches_error_codes():
    rows = _spec_error_table()
    expected = {int(c): (c.name, "yes" if c in RETRYABLE else "no") for c in ErrorCode}
    assert rows == expected


def test_codes_module_comments_every_code():
    source = (SPEC.parent / "codes.py").read_text(encoding="utf-8")
    for code in ErrorCode:
        assert re.search(rf"^    {code.name} = {int(code)}  # \S", source, re.M), code.name


def _spec_example(name):
    text = SPEC.read_text(encoding="utf-8")
    marker = f"<!-- example: {name} -->"
    block = text[text.index(marker) :].split("```", 2)[1]
    lines = block.splitlines()[1:]  # after the ```text line
    return bytes.fromhex("".join(line.split("#")[0] for line in lines).replace(" ", ""))


def test_spec_examples_decode():
    hello = _spec_example("hello")
    one_string = re.search(r"As one string: `([0-9a-f]+)`", SPEC.read_text(encoding="utf-8"))
    assert bytes.fromhex(one_string.group(1)) == hello
    server = wire.Connection("server")
    server.receive_data(hello)
    assert server.next_event() == wire.Hello(MIB, ("zstd",), (1,), "portal-backend/2.4")
    server.send(server.make_welcome(max_batch=100, max_in_flight=16, server="dccsign/0.1"))
    sign = _spec_example("sign")
    server.receive_data(sign)
    event = server.next_event()
    assert event == wire.Sign(
        1,
        wire.SignItem(
            SPEC_DCC, "uzi:900012345", operator="uzi:900099999", idempotency_key="7f3c9e2a-0001"
        ),
    )
    assert server.next_event() is wire.NEED_DATA


SPEC_DCC = {
    "ver": "1.3.0",
    "nam": {"fn": "Jansen", "fnt": "JANSEN", "gn": "Eva", "gnt": "EVA"},
    "dob": "1990-01-31",
    "r": [
        {
            "tg": "840539006",
            "fr": "2021-05-02",
            "co": "NL",
            "is": "Ministry of Health Welfare and Sport",
            "df": "2021-05-13",
            "du": "2021-10-29",
            "ci": "URN:UVCI:01:NL:REC/42GQ61D7MPA3#F",
        }
    ],
}


def test_all_errors_are_wire_protocol_errors():
    assert issubclass(wire.LocalProtocolError, wire.WireProtocolError)
    assert issubclass(wire.RemoteProtocolError, wire.WireProtocolError)
    assert not issubclass(wire.LocalProtocolError, wire.RemoteProtocolError)


def test_note_sent_records_pre_encoded_requests():
    client, server = wire.Connection(wire.CLIENT), wire.Connection(wire.SERVER)
    with pytest.raises(wire.LocalProtocolError):
        client.note_sent(1)  # not open yet
    server.receive_data(client.send(client.make_hello()))
    server.next_event()
    client.receive_data(server.send(server.make_welcome(max_batch=5, max_in_flight=4, server="s")))
    assert isinstance(client.next_event(), wire.Welcome)
    client.note_sent(3)
    assert client.last_request_id == 3
    with pytest.raises(wire.LocalProtocolError, match="not above"):
        client.note_sent(3)
    # A reply to an id noted as sent is accepted; the server's codec is told the same way.
    server.last_request_id = 3
    client.receive_data(server.send(wire.Pong(request_id=3, data=b"")))
    assert client.next_event() == wire.Pong(request_id=3, data=b"")
    client.receive_data(server.send(wire.GoAway(last_request_id=3, reason="bye")))
    client.next_event()
    with pytest.raises(wire.LocalProtocolError, match="draining"):
        client.note_sent(4)
    with pytest.raises(wire.LocalProtocolError):
        server.note_sent(9)


def test_a_protocol_error_says_who_broke_the_protocol():
    with pytest.raises(TypeError, match="LocalProtocolError or RemoteProtocolError"):
        wire.WireProtocolError("bare")
    for kind in (wire.LocalProtocolError, wire.RemoteProtocolError):
        exc = kind("why", ErrorCode.BAD_REQUEST, 7)
        assert isinstance(exc, wire.WireProtocolError)
        assert (str(exc), exc.code, exc.request_id) == ("why", ErrorCode.BAD_REQUEST, 7)
