"""The engine <-> keyd codec: golden bytes, round trips, limits and fuzzing."""

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dccsign.protocol import keyd

KID = bytes(range(8))


def roundtrip(msg, max_frame=1 << 20):
    wire = keyd.Connection(max_frame).send(msg)
    conn = keyd.Connection(max_frame)
    conn.receive_data(wire)
    assert conn.next_event() == msg
    assert conn.next_event() is keyd.NEED_DATA
    return wire


def test_golden_describe():
    # 4B magic, version 1, type 0x10, flags 0, request id 7, length 1, body a0 (empty map)
    assert roundtrip(keyd.Describe(7)) == bytes.fromhex(
        "4b01100000000007 00000001 a0".replace(" ", "")
    )


def test_golden_error():
    wire = roundtrip(keyd.Failure(1, "stopping", True))
    assert wire[:12] == bytes.fromhex("4b017f00000000010000001d")
    assert wire[12:] == bytes.fromhex("a2676d6573736167656873746f7070696e6769726574727961626c65f5")


def test_golden_sign():
    wire = roundtrip(keyd.SignPayloads(2, KID, "portal-a", "uzi:123", (b"\xa0",), None))
    assert wire[2] == 0x20 and wire[4:8] == b"\x00\x00\x00\x02"
    assert wire.endswith(bytes.fromhex("68 7061796c6f616473 81 41 a0".replace(" ", "")))


@given(
    st.integers(0, 2**32 - 1),
    st.binary(min_size=8, max_size=8),
    st.text(max_size=40),
    st.text(max_size=40),
    st.lists(st.binary(max_size=300), max_size=20),
    st.none() | st.text(max_size=20),
)
def test_sign_round_trip(rid, kid, client, account, payloads, operator):
    roundtrip(keyd.SignPayloads(rid, kid, client, account, tuple(payloads), operator))


def test_golden_sign_many():
    msg = keyd.SignMany(
        3, KID, (keyd.SignPart("p", "a", (b"\xa0",)), keyd.SignPart("q", "b", (), "op"))
    )
    wire = roundtrip(msg)
    # type 0x22, request id 3; body {"kid": h'0001..07', "parts": [{client, account, payloads},
    # {client, account, payloads, operator}]}
    assert wire[:8] == bytes.fromhex("4b01220000000003")
    body = bytes.fromhex(
        "a2 636b6964 48 0001020304050607 65 7061727473 82"
        " a3 66636c69656e74 6170 676163636f756e74 6161 687061796c6f616473 81 41a0"
        " a4 66636c69656e74 6171 676163636f756e74 6162 687061796c6f616473 80"
        " 686f70657261746f72 626f70".replace(" ", "")
    )
    assert wire[8:12] == len(body).to_bytes(4, "big") and wire[12:] == body


part = st.builds(
    keyd.SignPart,
    st.text(max_size=20),
    st.text(max_size=20),
    st.lists(st.binary(max_size=100), max_size=5).map(tuple),
    st.none() | st.text(max_size=10),
)


@given(st.integers(0, 2**32 - 1), st.lists(part, max_size=6))
def test_sign_many_round_trip(rid, parts):
    roundtrip(keyd.SignMany(rid, KID, tuple(parts)))


def test_sign_many_field_checks():
    import cbor2

    def frame(body):
        raw = cbor2.dumps(body)
        return bytes([0x4B, 1, 0x22, 0, 0, 0, 0, 1]) + len(raw).to_bytes(4, "big") + raw

    good_part = {"client": "c", "account": "a", "payloads": [b"x"]}
    for bad in (
        {"kid": KID},
        {"kid": KID, "parts": {}},
        {"kid": KID, "parts": [1]},
        {"kid": KID[:7], "parts": [good_part]},
        {"kid": KID, "parts": [{**good_part, "payloads": [1]}]},
        {"kid": KID, "parts": [{**good_part, "operator": 1}]},
        {"kid": KID, "parts": [{"client": "c", "payloads": []}]},
    ):
        conn = keyd.Connection()
        conn.receive_data(frame(bad))
        with pytest.raises(keyd.KeydProtocolError):
            conn.next_event()


@given(
    st.lists(
        st.binary(min_size=64, max_size=64)
        | st.tuples(st.sampled_from(list(keyd.ItemError)), st.text(max_size=30)),
        max_size=30,
    )
)
def test_sign_result_round_trip(results):
    roundtrip(keyd.Signatures(9, tuple(results)))


def test_describe_result_round_trip():
    roundtrip(
        keyd.DescribeResult(
            3,
            (
                keyd.KeyFacts(KID, -7, ("v",), "active", b"\x30\x00"),
                keyd.KeyFacts(KID[::-1], -37, ("v", "t", "r"), "retired", b"\x30"),
                keyd.KeyFacts(
                    KID, -7, ("t",), "active", b"\x30", keyd.PoolStatus(65536, 17, 90000, 80, 2)
                ),
            ),
        )
    )


def test_describe_pool_is_counts_only_and_checked():
    """A key's pool travels as five counts (never an entry); anything else is refused."""
    info = keyd.KeyFacts(KID, -7, ("v",), "active", b"\x30", keyd.PoolStatus(8, 7, 6, 5, 4))
    frame = keyd.Connection().send(keyd.DescribeResult(1, (info,)))
    body = cbor2.loads(frame[12:])
    assert body["keys"][0]["pool"] == {
        "capacity": 8,
        "level": 7,
        "refilled": 6,
        "spent": 5,
        "misses": 4,
    }
    for bad, message in (
        ([1, 2], "pool must be a map"),
        ({"capacity": 8, "level": 7, "refilled": 6, "spent": 5}, "misses"),
        ({"capacity": 8, "level": -1, "refilled": 6, "spent": 5, "misses": 4}, "negative"),
        ({"capacity": 8, "level": True, "refilled": 6, "spent": 5, "misses": 4}, "level"),
    ):
        body["keys"][0]["pool"] = bad
        raw = cbor2.dumps(body)
        conn = keyd.Connection()
        conn.receive_data(frame[:8] + len(raw).to_bytes(4, "big") + raw)
        with pytest.raises(keyd.KeydProtocolError, match=message):
            conn.next_event()


def test_split_and_coalesced_feeds():
    msgs = [
        keyd.Describe(1),
        keyd.SignPayloads(2, KID, "c", "a", (b"x" * 1000,)),
        keyd.Failure(3, "x", False),
    ]
    wire = b"".join(keyd.Connection().send(m) for m in msgs)
    for step in (1, 5, 13, len(wire)):
        conn, got = keyd.Connection(), []
        for i in range(0, len(wire), step):
            conn.receive_data(wire[i : i + step])
            while (ev := conn.next_event()) is not keyd.NEED_DATA:
                got.append(ev)
        assert got == msgs


def test_oversized_frame_refused_before_its_body():
    conn = keyd.Connection(max_frame=100)
    header = bytes.fromhex("4b0120000000000100000065")  # announces 101 bytes
    conn.receive_data(header)  # no body yet: refused on the header alone
    with pytest.raises(keyd.KeydProtocolError, match="exceeds the limit"):
        conn.next_event()
    with pytest.raises(keyd.KeydProtocolError, match="exceeds the limit"):
        keyd.Connection(max_frame=10).send(keyd.SignPayloads(1, KID, "c", "a", (b"x" * 20,)))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (bytes.fromhex("4c0110000000000100000001a0"), "bad magic"),
        (bytes.fromhex("4b0210000000000100000001a0"), "version"),
        (bytes.fromhex("4b0110010000000100000001a0"), "flags"),
        (bytes.fromhex("4b0155000000000100000001a0"), "unknown message type"),
        (bytes.fromhex("4b011000000000010000000180"), "not a CBOR map"),
        (bytes.fromhex("4b0110000000000100000002a000"), "trailing bytes"),
        (bytes.fromhex("4b0110000000000100000001ff"), "not valid CBOR"),
        (bytes.fromhex("4b0120000000000100000001a0"), "SIGN: field"),
    ],
)
def test_malformed_frames(wire, message):
    conn = keyd.Connection()
    conn.receive_data(wire)
    with pytest.raises(keyd.KeydProtocolError, match=message):
        conn.next_event()


def test_end_of_stream():
    conn = keyd.Connection()
    conn.receive_data(b"")
    assert conn.next_event() is None
    conn = keyd.Connection()
    conn.receive_data(keyd.Connection().send(keyd.Describe(1))[:-1])
    conn.receive_data(b"")
    with pytest.raises(keyd.KeydProtocolError, match="ended inside"):
        conn.next_event()


def test_sign_field_checks():
    import cbor2

    def frame(body):
        raw = cbor2.dumps(body)
        return bytes([0x4B, 1, 0x20, 0, 0, 0, 0, 1]) + len(raw).to_bytes(4, "big") + raw

    good = {"kid": KID, "client": "c", "account": "a", "payloads": [b"x"]}
    for bad in (
        {**good, "kid": KID[:7]},
        {**good, "payloads": ["x"]},
        {**good, "client": 1},
        {**good, "operator": 5},
        {**good, "account": True},
    ):
        conn = keyd.Connection()
        conn.receive_data(frame(bad))
        with pytest.raises(keyd.KeydProtocolError):
            conn.next_event()


@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    conn = keyd.Connection(max_frame=4096)
    conn.receive_data(data)  # b"" is end-of-stream: next_event then returns None
    try:
        while conn.next_event() not in (keyd.NEED_DATA, None):
            pass
    except keyd.KeydProtocolError:
        pass


@given(st.data())
def test_fuzz_mutated_frames(data):
    wire = bytearray(
        keyd.Connection().send(
            keyd.SignPayloads(5, KID, "client", "account", (b"\xa1\x01\x02",) * 3)
        )
    )
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    conn = keyd.Connection()
    conn.receive_data(bytes(wire))
    try:
        while conn.next_event() not in (keyd.NEED_DATA, None):
            pass
    except keyd.KeydProtocolError:
        pass
