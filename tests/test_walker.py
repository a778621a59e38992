"""The request walker (``walk_sign_batch``): both implementations against the codec.

Every input goes three ways: the codec's decoder (``wire.bodies.decode_cbor`` + the SIGN_BATCH /
SIGN body check, what ``Connection.decode_frame`` runs), the reference walker and the native
one. They must agree: same accept or refuse, same message and code, and on acceptance the
same items (the view's spans decode to the codec's values; both views are equal).
"""

from __future__ import annotations

import random
import struct

import cbor2
import pytest

from dccsign.native import _walker_py as W
from dccsign.protocol import cborlimits, wire
from dccsign.protocol.codes import ErrorCode
from dccsign.testing.samples import varied_samples
from dccsign.testing.wirepair import open_pair

MAX_BATCH = 8
DCCS = varied_samples(12, seed=14)


def _codec(body: bytes, max_batch: int, single: bool):
    """What the codec says: its items, or (message, code)."""
    try:
        value = wire.bodies.decode_cbor(body, cborlimits.scan, wire.body_item_limit(max_batch))
        if single:
            return (wire.bodies.read_sign(0, value, max_batch).item,)
        return wire.bodies.read_sign_batch(0, value, max_batch).items
    except wire.errors.Invalid as exc:
        return str(exc), exc.code


def _walk(fn, body: bytes, max_batch: int, single: bool):
    try:
        return fn(body, max_batch, single=single)
    except wire.BodyError as exc:
        return str(exc), exc.code


def _same_items(a, b) -> bool:
    # Compare DCCs by their canonical encoding: NaN floats are not equal to themselves.
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if cbor2.dumps(x.dcc) != cbor2.dumps(y.dcc):
            return False
        if (x.account, x.operator, x.kid, x.validity_days, x.idempotency_key) != (
            y.account,
            y.operator,
            y.kid,
            y.validity_days,
            y.idempotency_key,
        ):
            return False
        if type(x.idempotency_key) is not type(y.idempotency_key):
            return False
    return True


def check(impl, body: bytes, max_batch: int = MAX_BATCH, single: bool = False):
    """Assert the three agree on *body*; return the codec's verdict."""
    expected = _codec(body, max_batch, single)
    got = _walk(impl.walk_sign_batch, body, max_batch, single)
    if type(expected) is tuple and type(expected[0]) is str:
        assert got == expected, body.hex()
        return expected
    assert isinstance(got, W.BatchView), (body.hex(), got)
    assert got.count == len(expected)
    assert _same_items(got.sign_items(), expected), body.hex()
    ref = W.walk_sign_batch(body, max_batch, single=single)
    assert got == ref, body.hex()
    for i in range(got.count):  # the DCC span is the client's own encoding of the map
        assert cbor2.loads(got.dcc_bytes(i)) is not None
    return expected


def _item(i: int = 0, **extra):
    m = {"dcc": DCCS[i % len(DCCS)], "account": f"uzi:9000{i}"}
    m.update(extra)
    return m


def _batch(items) -> bytes:
    return cbor2.dumps({"items": items})


VALID = [
    _batch([_item(0)]),
    _batch([_item(i) for i in range(MAX_BATCH)]),
    _batch(
        [
            _item(1, operator="assistent Ölsen", kid=b"12345678", validity_days=365),
            _item(2, idempotency_key="k-ü"),
            _item(3, idempotency_key=b"\x00" * 64, operator=None, kid=None),
            _item(4, validity_days=None, idempotency_key=None, extra_field=[1, 2.5, None]),
        ]
    ),
    cbor2.dumps({"x": 1, "items": [_item(5)], b"items": 3}),
]


def test_valid_batches(impl):
    for body in VALID:
        assert isinstance(check(impl, body), tuple)
    view = impl.walk_sign_batch(VALID[2], MAX_BATCH)
    dcc, account, operator, kid, vd, key = view.values(0)
    assert cbor2.loads(dcc) == DCCS[1] and account == "uzi:90001"
    assert (operator, kid, vd, key) == ("assistent Ölsen", b"12345678", 365, None)
    assert view.values(1)[5] == "k-ü" and view.values(2)[5] == b"\x00" * 64
    assert view.fields(0)[W.FLAGS] & W.FLAG_OPERATOR_NON_ASCII
    assert view.data is VALID[2] or view.data == VALID[2]  # no copy without chunked strings


def test_single(impl):
    body = cbor2.dumps(_item(3, kid=b"abcdefgh"))
    check(impl, body, single=True)
    assert impl.walk_sign_batch(body, 1, single=True).count == 1
    check(impl, cbor2.dumps({"items": [_item(0)]}), single=True)  # no dcc: refused
    check(impl, cbor2.dumps(_item(0, account="")), single=True)


def _indef_text(s: str, cut: int) -> bytes:
    raw = s.encode()
    return (
        b"\x7f"
        + cbor2.dumps(raw[:cut].decode("utf-8", "ignore"))
        + cbor2.dumps(raw[cut:].decode("utf-8", "ignore"))
        + b"\xff"
    )


def _map(pairs: list[tuple[bytes, bytes]], indefinite: bool = False) -> bytes:
    body = b"".join(k + v for k, v in pairs)
    if indefinite:
        return b"\xbf" + body + b"\xff"
    assert len(pairs) < 24
    return bytes([0xA0 + len(pairs)]) + body


def test_indefinite_lengths_and_long_heads(impl):
    dcc = cbor2.dumps(DCCS[0])
    t = cbor2.dumps
    item = _map(
        [
            (t("dcc"), dcc),
            (_indef_text("account", 3), _indef_text("uzi:ü123", 2)),
            (t("operator"), b"\x7f" + t("op") + t("") + t("x") + b"\xff"),
            (t("kid"), b"\x5f" + t(b"1234") + t(b"5678") + b"\xff"),
            (t("validity_days"), b"\x1b" + struct.pack(">Q", 30)),
            (t("idempotency_key"), b"\x5f" + t(b"k") + b"\xff"),
        ],
        indefinite=True,
    )
    body = _map([(t("items"), b"\x9f" + item + item + b"\xff")], indefinite=True)
    check(impl, body)
    view = impl.walk_sign_batch(body, MAX_BATCH)
    assert len(view.data) > len(body) and view.body_size == len(body)
    assert view.values(1)[1:] == ("uzi:ü123", "opx", b"12345678", 30, b"k")


def test_refusals_name_the_field(impl):
    for m, code in [
        ({"account": "a"}, ErrorCode.BAD_REQUEST),
        ({"dcc": [], "account": "a"}, ErrorCode.BAD_REQUEST),
        (_item(0, account="x" * 257), ErrorCode.BAD_REQUEST),
        (_item(0, account="é" * 256), None),
        (_item(0, operator=""), ErrorCode.BAD_REQUEST),
        (_item(0, kid=b"1234567"), ErrorCode.BAD_REQUEST),
        (_item(0, validity_days=0), ErrorCode.BAD_REQUEST),
        (_item(0, validity_days=3651), ErrorCode.BAD_REQUEST),
        (_item(0, validity_days=True), ErrorCode.BAD_REQUEST),
        (_item(0, validity_days=1.0), ErrorCode.BAD_REQUEST),
        (_item(0, idempotency_key="é" * 33), ErrorCode.BAD_REQUEST),
        (_item(0, idempotency_key=""), ErrorCode.BAD_REQUEST),
        (_item(0, idempotency_key=5), ErrorCode.BAD_REQUEST),
        (_item(0, operator=cbor2.undefined), ErrorCode.BAD_REQUEST),
    ]:
        got = check(impl, _batch([_item(1), m]))
        if code is not None:
            assert got[1] == code and got[0].startswith("SIGN_BATCH.items[1]"), got
    assert check(impl, _batch([_item(0)] * (MAX_BATCH + 1)))[1] == ErrorCode.BATCH_TOO_LARGE
    for body in [
        cbor2.dumps({"items": []}),
        cbor2.dumps({"items": {}}),
        cbor2.dumps({}),
        cbor2.dumps([1]),
        cbor2.dumps({b"items": [_item(0)]}),
        cbor2.dumps({"items": [1]}),
        b"",
        b"\xa1",
        VALID[0] + b"\x00",
    ]:
        assert check(impl, body)[1] == ErrorCode.BAD_REQUEST


STRICT_CASES = [
    b"\xc0\x61a",  # a tag
    b"\xf8\x10",  # a two-byte simple value below 32
    b"\xf8\x20",  # ... at 32: fine
    b"\x62\xed\xa0",  # truncated
    b"\x63\xed\xa0\x80",  # a UTF-8 surrogate
    b"\x62\xc0\x80",  # overlong
    b"\x7f\x61\xc3\x61\xa9\xff",  # a code point split over chunks
    b"\xf9\x7e\x00",  # NaN
    b"\xa1\x01\x01",  # an int key
    b"\xa1\x80\x01",  # an array key
    b"\xa2\x61a\x01\x7f\x61a\xff\x02",  # a duplicate through chunks
    b"\xa2\x41a\x01\x61a\x02",  # bytes and text: different keys
    b"\xa1\xf8\x20\x01",  # a simple-value key
    b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff",  # -2**64
]


def test_strict_cbor_inside_items(impl):
    for raw in STRICT_CASES:
        dcc = _map([(cbor2.dumps("x"), raw)])
        item = _map([(cbor2.dumps("dcc"), dcc), (cbor2.dumps("account"), cbor2.dumps("a"))])
        body = _map([(cbor2.dumps("items"), b"\x81" + item)])
        check(impl, body)
        body = _map([(cbor2.dumps("zz"), raw), (cbor2.dumps("items"), cbor2.dumps([_item(0)]))])
        check(impl, body)


def test_many_keys_duplicates(impl):
    # Maps above the small-map size take the sorted duplicate search.
    keys = {f"k{i}": i for i in range(300)}
    dcc = dict(DCCS[0], extra=keys)
    check(impl, _batch([_item(0, dcc=dcc)]), max_batch=4)
    raw = cbor2.dumps({"items": [_item(0, dcc=dcc)]})
    dup = raw.replace(cbor2.dumps("k299"), cbor2.dumps("k298"))
    assert dup != raw
    assert check(impl, dup, max_batch=4)[0].startswith("the body is not valid CBOR")


def _mutations(rng: random.Random, body: bytes):
    b = bytearray(body)
    op = rng.randrange(5)
    if op == 0:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif op == 2:
        del b[rng.randrange(len(b)) :]
    elif op == 3:
        i = rng.randrange(len(b))
        b[i:i] = bytes([rng.choice([0xFF, 0xF6, 0xF7, 0xC0, 0x9F, 0xBF, 0x7F, 0x5F, 0x18, 0x00])])
    else:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randrange(1, 8))
        del b[i:j]
    return bytes(b)


def _field_swaps(rng: random.Random) -> bytes:
    values = [
        None,
        True,
        0,
        1,
        3650,
        3651,
        -1,
        1.0,
        "",
        "a",
        "é" * 200,
        b"",
        b"12345678",
        [],
        {},
        {"a": 1},
        "x" * 300,
        b"k" * 65,
        cbor2.undefined,
    ]
    items = []
    for i in range(rng.randrange(1, MAX_BATCH + 2)):
        m = _item(i)
        for f in ("dcc", "account", "operator", "kid", "validity_days", "idempotency_key"):
            if rng.random() < 0.15:
                m[f] = rng.choice(values)
            elif rng.random() < 0.05:
                m.pop(f, None)
        items.append(m)
    return cbor2.dumps({"items": items})


def test_fuzz_agreement(impl):
    rng = random.Random(1414)
    accepted = refused = 0
    for n in range(6000):
        if n % 3 == 0:
            body = _field_swaps(rng)
        else:
            body = _mutations(rng, rng.choice(VALID))
            if rng.random() < 0.3:
                body = _mutations(rng, body)
        single = rng.random() < 0.1
        verdict = check(impl, body, single=single)
        if type(verdict[0]) is str:
            refused += 1
        else:
            accepted += 1
    assert accepted > 100 and refused > 1000  # both sides of the rules were exercised


def test_arguments(impl):
    with pytest.raises(TypeError):
        impl.walk_sign_batch(bytearray(VALID[0]), 4)
    with pytest.raises(ValueError):
        impl.walk_sign_batch(VALID[0], 0)


def test_connection_decode_walked(impl):
    client, a = open_pair(max_batch=MAX_BATCH)
    _, b = open_pair(max_batch=MAX_BATCH)
    items = [wire.SignItem(d, f"uzi:{i}", kid=b"12345678") for i, d in enumerate(DCCS[:6])]
    frames = [
        client.send(wire.SignBatch(1, tuple(items))),  # compressed (above the threshold)
        client.send(wire.Sign(2, items[0])),
    ]
    assert frames[0][4] == 1
    for raw in frames:
        a.receive_data(raw)
        b.receive_data(raw)
        event = a.decode_frame(a.next_frame())
        view = b.decode_walked(b.next_frame(), impl.walk_sign_batch)
        got = view.sign_items()
        assert _same_items(got, event.items if hasattr(event, "items") else (event.item,))
        assert a.last_request_id == b.last_request_id
    # A refused body: the same RemoteProtocolError (message, code, request id) and state.
    bad = cbor2.dumps({"items": [_item(0, kid=b"short")]})
    frame = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.FrameType.SIGN_BATCH, 0, 3, len(bad))
    errors = []
    for conn, decode in ((a, a.decode_frame), (b, None)):
        conn.receive_data(frame + bad)
        f = conn.next_frame()
        with pytest.raises(wire.RemoteProtocolError) as info:
            decode(f) if decode else conn.decode_walked(f, impl.walk_sign_batch)
        errors.append((str(info.value), info.value.code, info.value.request_id))
        assert conn.state is wire.State.ERROR
    assert errors[0] == errors[1] and errors[0][2] == 3
    _, c = open_pair(max_batch=MAX_BATCH)
    c.receive_data(
        wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.FrameType.PING, 0, 0, 1) + b"\xa0"
    )
    with pytest.raises(wire.LocalProtocolError):
        c.decode_walked(c.next_frame(), impl.walk_sign_batch)


def test_item_count_and_depth_limits(impl):
    # max_batch 1: at most body_item_limit(1) = 320 data items, 16 levels. Each case runs
    # from just under the limit to just over it.
    limit = wire.body_item_limit(1)
    base = cborlimits.scan(_batch([_item(0, dcc=dict(DCCS[0], pad=[]))]), limit, 16)
    verdicts = []
    for extra in range(limit - base - 3, limit - base + 3):
        dcc = dict(DCCS[0], pad=[0] * extra)
        verdicts.append(type(check(impl, _batch([_item(0, dcc=dcc)]), max_batch=1)[0]))
    assert verdicts == [wire.SignItem] * 4 + [str] * 2
    verdicts = []
    for depth in (12, 13):
        nested: object = 1
        for _ in range(depth):
            nested = [nested]
        dcc = dict(DCCS[0], deep=nested)
        verdicts.append(type(check(impl, _batch([_item(0, dcc=dcc)]), max_batch=1)[0]))
    assert verdicts == [wire.SignItem, str]
    # Chunked strings count one item per chunk, as the scan counts them.
    dcc = cbor2.dumps(DCCS[0])
    verdicts = []
    for chunks in range(limit - base - 2, limit - base + 3):
        key = b"\x7f" + cbor2.dumps("k") * chunks + b"\xff"
        inner = _map([(cbor2.dumps("dcc"), dcc), (cbor2.dumps("account"), cbor2.dumps("a")),
                      (key, b"\x01")])  # fmt: skip
        body = _map([(cbor2.dumps("items"), b"\x81" + inner)])
        verdicts.append(type(check(impl, body, max_batch=1)[0]))
    assert str in verdicts and wire.SignItem in verdicts
