"""native.Spans: payloads read in place from one buffer by SigningKey.sign and
validate_cwt_batch, in both implementations -- the same results as the list of bytes they
stand for, and the same errors for spans that do not fit."""

from __future__ import annotations

from array import array
from datetime import date

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_signing import PASS, _pem, _verify

from dccsign.dcc.issuer import claims_prefix
from dccsign.native import Spans
from dccsign.testing.samples import varied_samples


def _buffer(payloads: list[bytes]) -> tuple[bytes, array, array]:
    """*payloads* laid end to end (with a gap of junk between them): data, starts, ends."""
    data, starts, ends = b"", array("I"), array("I")
    for p in payloads:
        data += b"\xff\x00"  # junk that must never be read
        starts.append(len(data))
        data += p
        ends.append(len(data))
    return data, starts, ends


def _payloads() -> list[bytes]:
    prefix = claims_prefix("NL", 1_700_000_000, 1_731_536_000)
    out = [prefix + cbor2.dumps(dcc) for dcc in varied_samples(12, seed=7)]
    broken = dict(varied_samples(1, seed=8)[0])
    broken["dob"] = "not a date"
    out.append(prefix + cbor2.dumps(broken))  # invalid: its verdict names the field
    out.append(b"\xa1\x01")  # not a CWT at all
    return out


def test_spans_is_the_sequence_it_stands_for():
    payloads = _payloads()
    data, starts, ends = _buffer(payloads)
    rows = array("I", [3, 0, 13, 3])
    spans = Spans(data, starts, ends, rows)
    want = [payloads[r] for r in rows]
    assert len(spans) == 4 and list(spans) == want and spans[1] == payloads[0]
    assert spans[1:3] == want[1:3] and spans[-1] == payloads[3]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((bytearray(b"x"), array("I"), array("I"), array("I")), TypeError, "data must be bytes"),
        ((b"x", [0], array("I", [1]), array("I")), TypeError, "starts must be an array"),
        ((b"x", array("I"), array("i"), array("I")), TypeError, "ends must be an array"),
        ((b"x", array("I", [0]), array("I"), array("I")), ValueError, "starts has 1"),
    ],
)
def test_spans_refuse_what_is_not_spans(args, error, message):
    with pytest.raises(error, match=message):
        Spans(*args)


def test_validate_cwt_batch_reads_spans_as_the_bytes_they_are(impl):
    payloads = _payloads()
    data, starts, ends = _buffer(payloads)
    rules = impl.DccRules()
    today = date(2024, 6, 1)
    rows = array("I", [13, 0, 5, 12, 12, 1])
    got = impl.validate_cwt_batch(rules, Spans(data, starts, ends, rows), today)
    want = impl.validate_cwt_batch(rules, [payloads[r] for r in rows], today)
    assert [(type(v), str(v)) for v in got] == [(type(v), str(v)) for v in want]
    assert "CBOR" in str(got[0]) and isinstance(got[1], str) and "dob" in str(got[3])


def test_sign_reads_spans_in_place_and_every_signature_verifies(impl):
    key = ec.generate_private_key(ec.SECP256R1())
    sk = impl.SigningKey.load_pem(_pem(key), PASS)
    prot = impl.protected_header(-7, bytes(range(8)))
    payloads = _payloads()[:12]
    data, starts, ends = _buffer(payloads)
    rows = array("I", [11, 2, 2, 7])
    sigs = sk.sign(prot, Spans(data, starts, ends, rows))
    assert len(sigs) == 4
    for row, sig in zip(rows, sigs, strict=True):
        _verify(key.public_key(), -7, impl.sig_structure(prot, payloads[row]), sig)
    assert sk.sign(prot, Spans(data, starts, ends, array("I"))) == []


@pytest.mark.parametrize(
    ("starts", "ends", "rows", "message"),
    [
        ([0, 2], [2, 4], [0, 2], r"row 2 is out of range \(2 spans\)"),
        ([0, 3], [2, 2], [0, 1], r"span 3:2 is not inside the 4-byte buffer"),
        ([0, 2], [2, 5], [1], r"span 2:5 is not inside the 4-byte buffer"),
    ],
)
def test_both_refuse_spans_that_do_not_fit_before_using_any(impl, starts, ends, rows, message):
    key = ec.generate_private_key(ec.SECP256R1())
    sk = impl.SigningKey.load_pem(_pem(key), PASS)
    prot = impl.protected_header(-7, bytes(range(8)))
    spans = Spans(b"abcd", array("I", starts), array("I", ends), array("I", rows))
    with pytest.raises(ValueError, match=message):
        sk.sign(prot, spans)
    with pytest.raises(ValueError, match=message):
        impl.validate_cwt_batch(impl.DccRules(), spans)
