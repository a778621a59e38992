"""The reply body (``encode_sign_batch_result``) against today's encoder: ``hc1_encode`` ->
``ItemResult`` -> ``wire.Connection.send``. Same body bytes, same frame (compression
included) through ``send_encoded_result``, decodable by the codec, same refusals."""

from __future__ import annotations

import array
import os
import random

import cbor2
import pytest

from dccsign.native import _reply_py as R
from dccsign.protocol import wire
from dccsign.protocol.codes import ErrorCode
from dccsign.testing.wirepair import open_pair

KIDS = [b"kid-one!", b"kid-two!"]


def _protected(impl):
    return [impl.protected_header(-7, KIDS[0]), impl.protected_header(-7, KIDS[1])]


def _frame(rng: random.Random, n: int, refused_share: float = 0.3, payload_size=(200, 600)):
    """Columns of one frame and the same results as ItemResult parts."""
    prot_of, refusals = array.array("I"), {}
    payloads, signatures = bytearray(), bytearray()
    pay_off, sig_off = array.array("I", [0]), array.array("I", [0])
    for i in range(n):
        if rng.random() < refused_share:
            prot_of.append(R.NO_RESULT)
            code = rng.choice([ErrorCode.INVALID_DCC, ErrorCode.QUOTA_ACCOUNT, 77])
            retry = rng.choice([None, 0, 1500, 2**32 - 1])
            refusals[i] = (code, rng.choice(["", "r[0].ci: uvci-checksum", "é" * 1024]), retry)
        else:
            prot_of.append(rng.randrange(2))
            # Half text-like (compressible), half random: the HC1 lengths vary.
            size = rng.randrange(*payload_size)
            payloads += os.urandom(size) if rng.random() < 0.5 else b"ab" * (size // 2)
            signatures += rng.randbytes(64)
        pay_off.append(len(payloads))
        sig_off.append(len(signatures))
    return prot_of, bytes(payloads), pay_off, bytes(signatures), sig_off, refusals


def _today(impl, protected, cols, level=9):
    prot_of, payloads, pay_off, signatures, sig_off, refusals = cols
    results = []
    for i, p in enumerate(prot_of):
        if p == R.NO_RESULT:
            code, message, retry = refusals[i]
            results.append(wire.ItemResult(error=code, message=message, retry_after_ms=retry))
            continue
        pay = payloads[pay_off[i] : pay_off[i + 1]]
        sig = signatures[sig_off[i] : sig_off[i + 1]]
        hc1 = impl.hc1_encode(protected[p], [pay], [sig], level)[0]
        results.append(wire.ItemResult(hc1=hc1, kid=KIDS[p]))
    return results


def _body(frame: bytes) -> bytes:
    import zstandard

    body = frame[wire.HEADER_SIZE :]
    if frame[4] & 1:
        body = zstandard.ZstdDecompressor().decompress(body)
    return body


def test_same_bytes_as_today(impl):
    rng = random.Random(5)
    protected = _protected(impl)
    for n in (1, 2, 7, 50):
        for level in (9, 1):
            cols = _frame(rng, n, refused_share=0.3 if n > 1 else 0.0)
            results = _today(impl, protected, cols, level)
            client, a = open_pair()
            _, b = open_pair()
            request = client.send(wire.SignBatch(1, (wire.SignItem({}, "x"),)))
            for conn in (a, b):  # a request to answer
                conn.receive_data(request)
                conn.next_event()
            frame = a.send(wire.SignBatchResult(1, tuple(results)))
            body = impl.encode_sign_batch_result(protected, KIDS, *cols, level)
            assert body == _body(frame)
            assert b.send_encoded_result(1, body, n) == frame
            client.receive_data(frame)
            assert client.next_event().results == tuple(results)


def test_single(impl):
    rng = random.Random(6)
    protected = _protected(impl)
    for share in (0.0, 1.0):
        cols = _frame(rng, 1, refused_share=share)
        (result,) = _today(impl, protected, cols)
        client, a = open_pair()
        a.receive_data(client.send(wire.Sign(1, wire.SignItem({}, "x"))))
        a.next_event()
        frame = a.send(wire.SignResult(1, result))
        body = impl.encode_sign_batch_result(protected, KIDS, *cols, single=True)
        assert body == _body(frame)
        _, b = open_pair()
        b.receive_data(client.send(wire.Sign(2, wire.SignItem({}, "x"))))
        b.next_event()
        assert b.send_encoded_result(2, body, 1, single=True)[wire.HEADER_SIZE :] == body


def test_native_and_reference_agree(impl):
    from dccsign.native import _reference

    rng = random.Random(8)
    cols = _frame(rng, 30)
    prot_n, prot_r = _protected(impl), _protected(_reference)
    got = impl.encode_sign_batch_result(prot_n, KIDS, *cols, 6)
    ref = _reference.encode_sign_batch_result(prot_r, KIDS, *cols, 6)
    # Deflate output may differ between zlib implementations; what is inside may not.
    decoded = [
        wire.bodies.read_sign_batch_result(1, cbor2.loads(b), 64).results for b in (got, ref)
    ]
    assert len(decoded[0]) == len(decoded[1]) == 30
    for x, y in zip(*decoded, strict=True):
        if x.ok:
            assert impl.sign1_decode(impl.zlib_decompress(impl.b45decode(x.hc1[4:]))) == (
                impl.sign1_decode(impl.zlib_decompress(impl.b45decode(y.hc1[4:])))
            )
        else:
            assert x == y


def _refused_by_send_as_by_the_encoder(impl, protected, cols) -> str:
    """Check that ``encode_sign_batch_result`` refuses *cols* with the message that
    ``Connection.send`` gives today's results; return that message."""
    results = _today(impl, protected, cols)
    client, a = open_pair()
    a.receive_data(client.send(wire.SignBatch(1, (wire.SignItem({}, "x"),))))
    a.next_event()
    with pytest.raises(wire.LocalProtocolError) as want:
        a.send(wire.SignBatchResult(1, tuple(results)))
    with pytest.raises(wire.BodyError) as got:
        impl.encode_sign_batch_result(protected, KIDS, *cols)
    assert str(got.value) == str(want.value)
    return str(want.value)


@pytest.mark.parametrize(
    "refusal",
    [
        (0, "m", None),
        (ErrorCode.BUSY, "x" * 1025, None),
        (4, "m", -1),
        (4, "m", 2**32),
        (4, 5, None),
    ],
)
def test_refusals_send_would_refuse(impl, refusal):
    rng = random.Random(9)
    protected = _protected(impl)
    cols = list(_frame(rng, 6, refused_share=0.0))
    cols[0][3] = R.NO_RESULT
    cols[5][3] = refusal
    _refused_by_send_as_by_the_encoder(impl, protected, cols)


def test_hc1_too_long(impl):
    rng = random.Random(10)
    protected = _protected(impl)
    cols = list(_frame(rng, 5, refused_share=0.0))
    # Item 2 incompressible and large: its HC1 passes 8192 characters.
    big = os.urandom(6000)
    prot_of, payloads, pay_off = cols[0], cols[1], cols[2]
    parts = [payloads[pay_off[i] : pay_off[i + 1]] for i in range(5)]
    parts[2] = big
    new_off = array.array("I", [0])
    for p in parts:
        new_off.append(new_off[-1] + len(p))
    cols[1], cols[2] = b"".join(parts), new_off
    want = _refused_by_send_as_by_the_encoder(impl, protected, cols)
    # A bad refusal after it: the long HC1 comes first, as in send.
    cols[0] = array.array("I", [*prot_of[:4], R.NO_RESULT])
    cols[5] = {4: (0, "", None)}
    with pytest.raises(wire.BodyError) as got:
        impl.encode_sign_batch_result(protected, KIDS, *cols)
    assert str(got.value) == want


def test_connection_rules():
    client, server = open_pair(max_batch=2)
    body = b"\xa1\x67results\x81\xa2\x65error\x01\x67message\x60"
    with pytest.raises(wire.LocalProtocolError):  # no such request yet
        server.send_encoded_result(1, body, 1)
    server.receive_data(client.send(wire.SignBatch(1, (wire.SignItem({}, "x"),))))
    server.next_event()
    with pytest.raises(wire.LocalProtocolError) as info:
        server.send_encoded_result(1, body, 3)
    assert "1..2 results" in str(info.value)
    frame = server.send_encoded_result(1, body, 1)
    client.receive_data(frame)
    assert client.next_event().results[0].error == ErrorCode.PROTOCOL


def test_arguments(impl):
    protected = _protected(impl)
    cols = list(_frame(random.Random(1), 3, refused_share=0.0))
    with pytest.raises(ValueError):
        impl.encode_sign_batch_result(protected, KIDS[:1], *cols)
    bad = list(cols)
    bad[0] = array.array("I", [R.NO_RESULT, 0, 0])
    with pytest.raises(ValueError):  # neither signed nor refused
        impl.encode_sign_batch_result(protected, KIDS, *bad)
    bad[5] = {1: (4, "m", None)}
    with pytest.raises(ValueError):  # both
        impl.encode_sign_batch_result(protected, KIDS, *bad)
    bad = list(cols)
    bad[2] = array.array("I", [0, 5, 3, 9])
    with pytest.raises(ValueError):
        impl.encode_sign_batch_result(protected, KIDS, *bad)
