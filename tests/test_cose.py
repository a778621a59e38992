"""Protected header, Sig_structure and COSE_Sign1 framing against both implementations."""

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dccsign.native import CoseFormatError, implementation

KID = bytes.fromhex("0102030405060708")


def test_protected_header_is_canonical(impl):
    # Spec notes §4.32: exactly a2 01 26 04 48 <kid> / a2 01 38 24 04 48 <kid>.
    assert impl.protected_header(-7, KID) == bytes.fromhex("a2012604 48") + KID
    assert impl.protected_header(-37, KID) == bytes.fromhex("a20138240448") + KID
    for alg in (-7, -37):
        raw = impl.protected_header(alg, KID)
        assert cbor2.loads(raw) == {1: alg, 4: KID}
        assert cbor2.dumps({1: alg, 4: KID}) == raw  # re-encoding gives the same bytes


@pytest.mark.parametrize("alg", [-35, -8, 0, "ES256", None])
def test_protected_header_rejects_other_algorithms(impl, alg):
    with pytest.raises(ValueError, match="unsupported COSE algorithm"):
        impl.protected_header(alg, KID)


@pytest.mark.parametrize("kid", [b"", b"1234567", b"123456789", "12345678", None])
def test_protected_header_rejects_bad_kid(impl, kid):
    with pytest.raises(ValueError, match="kid must be 8 bytes"):
        impl.protected_header(-7, kid)


@given(st.binary(max_size=300), st.binary(max_size=70000))
def test_sig_structure_matches_cbor(impl, protected, payload):
    expected = cbor2.dumps(["Signature1", protected, b"", payload])
    assert impl.sig_structure(protected, payload) == expected


@given(st.binary(min_size=0, max_size=20), st.binary(max_size=70000), st.binary(max_size=600))
def test_sign1_encode_matches_cbor_and_round_trips(impl, protected, payload, sig):
    raw = impl.sign1_encode(protected, payload, sig)
    assert raw == cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, sig]))
    parts = impl.sign1_decode(raw)
    assert parts == ((18,), protected, b"\xa0", payload, sig)


def test_decode_accepts_untagged_and_tag61(impl):
    body = [impl.protected_header(-7, KID), {4: KID}, b"\xa0", b"s" * 64]
    for tags, obj in [((), body), ((61, 18), cbor2.CBORTag(61, cbor2.CBORTag(18, body)))]:
        parts = impl.sign1_decode(cbor2.dumps(obj))
        assert parts.tags == tags
        assert parts.unprotected == cbor2.dumps({4: KID})


def test_decode_indefinite_array_and_map(impl):
    raw = b"\xd2\x9f\x41\xa0\xbf\x04\x48" + KID + b"\xff\x41\x00\x41\x01\xff"
    parts = impl.sign1_decode(raw)
    assert parts.protected == b"\xa0"
    assert cbor2.loads(parts.unprotected) == {4: KID}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "truncated"),
        (b"\xff", "reserved|break|array"),  # TD CBO1 starts ff
        (cbor2.dumps([b"", {}, b""]), "array of 4"),
        (cbor2.dumps([b"", {}, b"", b"", b""]), "array of 4"),
        (cbor2.dumps(["p", {}, b"", b""]), "protected header"),
        (cbor2.dumps([b"", [], b"", b""]), "unprotected header must be a map"),
        (cbor2.dumps([b"", {}, None, b""]), "detached"),
        (cbor2.dumps([b"", {}, b"", "sig"]), "signature"),
        (cbor2.dumps([b"", {}, b"", b""]) + b"\x00", "trailing bytes"),  # TD CBO2
        (
            cbor2.dumps(
                cbor2.CBORTag(
                    1,
                    cbor2.CBORTag(
                        2, cbor2.CBORTag(3, cbor2.CBORTag(4, cbor2.CBORTag(5, [b"", {}, b"", b""])))
                    ),
                )
            ),
            "too many CBOR tags",
        ),
        (b"\x84\x41", "truncated"),
        (b"\x84\x5b" + b"\xff" * 8, "truncated"),
        (b"\x84\x40\xbb" + b"\xff" * 8, "longer than its data"),
        (b"\x84\x40\xa1" + b"\x81" * 100 + b"\x00" * 2, "too deep"),
        (b"\x84\x40\xa0\x40\x1c", "reserved"),
    ],
)
def test_decode_rejects_malformed(impl, raw, message):
    with pytest.raises(CoseFormatError, match=message):
        impl.sign1_decode(raw)


def test_every_truncation_is_rejected(impl):
    raw = impl.sign1_encode(impl.protected_header(-7, KID), b"\xa1\x01\x02" * 30, b"s" * 64)
    for cut in range(len(raw)):
        with pytest.raises(CoseFormatError):
            impl.sign1_decode(raw[:cut])


@given(st.binary(max_size=200))
def test_decoder_raises_only_its_error(impl, raw):
    with contextlib.suppress(CoseFormatError):  # any other exception fails the test
        impl.sign1_decode(raw)


@given(st.binary(max_size=120))
def test_implementations_agree_on_arbitrary_input(impl, raw):
    reference = implementation("python")

    def outcome(i):
        try:
            return i.sign1_decode(raw)
        except CoseFormatError as exc:
            return ("error", str(exc))

    assert outcome(impl) == outcome(reference)
