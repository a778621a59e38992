"""verify_hc1: what it must accept (spec notes §1.2, §4) and what it must refuse."""

import datetime as dt
import zlib

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dccsign import native
from dccsign.bench.core import ephemeral_certificate
from dccsign.dcc.dsc import DSC
from dccsign.dcc.verify import verify_hc1
from dccsign.testing.samples import sample

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def signer():
    key, cert = ephemeral_certificate()
    return key, DSC.from_certificate(cert)


def _claims(iat=None, exp=None, dcc=None):
    t = int(NOW.timestamp())
    return {
        1: "NL",
        4: t + 3600 if exp is None else exp,
        6: t - 60 if iat is None else iat,
        -260: {1: dcc or sample("v")},
    }


def _hc1(key, protected, unprotected, payload, tags=(18,), sig=None):
    """Build an HC1 by hand (cbor2 + cryptography), so every variant can be made."""
    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    if sig is None:
        r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    obj = [protected, unprotected, payload, sig]
    for tag in reversed(tags):
        obj = cbor2.CBORTag(tag, obj)
    return "HC1:" + native.b45encode(zlib.compress(cbor2.dumps(obj), 9))


def test_accepts_what_verifiers_must_accept(signer):
    key, dsc = signer
    payload = cbor2.dumps(_claims())
    canonical = native.protected_header(-7, dsc.kid)
    variants = {
        "tag 18": _hc1(key, canonical, {}, payload),
        "untagged": _hc1(key, canonical, {}, payload, tags=()),
        "tag 61 around 18": _hc1(key, canonical, {}, payload, tags=(61, 18)),
        "kid unprotected": _hc1(key, cbor2.dumps({1: -7}), {4: dsc.kid}, payload),
        "alg and kid unprotected": _hc1(key, b"", {1: -7, 4: dsc.kid}, payload),
        "protected kid wins": _hc1(key, canonical, {4: b"wrongkid"}, payload),
        "content type": _hc1(key, cbor2.dumps({1: -7, 4: dsc.kid, 3: 61}), {}, payload),
        "float times": _hc1(
            key,
            canonical,
            {},
            cbor2.dumps(_claims(iat=NOW.timestamp() - 60.0, exp=NOW.timestamp() + 3600.0)),
        ),
        "trailing CR LF": _hc1(key, canonical, {}, payload) + "\r\n",
    }
    for name, text in variants.items():
        result = verify_hc1(text, [dsc])
        assert result.valid and result.time_valid, (name, result.errors)
        assert result.kid == dsc.kid.hex() and result.type == "v"


@pytest.mark.parametrize(
    ("mutate", "step"),
    [
        (lambda k, d, p: "HC2:" + _hc1(k, native.protected_header(-7, d.kid), {}, p)[4:], "prefix"),
        (lambda k, d, p: _hc1(k, native.protected_header(-7, d.kid), {}, p).lower(), "prefix"),
        (
            lambda k, d, p: "HC1:" + _hc1(k, native.protected_header(-7, d.kid), {}, p)[4:].lower(),
            "base45",
        ),
        (lambda k, d, p: "HC1:" + native.b45encode(b"\x78\x9c" + b"junk"), "zlib"),
        (
            lambda k, d, p: (
                "HC1:"
                + native.b45encode(
                    zlib.compress(
                        cbor2.dumps(
                            cbor2.CBORTag(
                                18, [native.protected_header(-7, d.kid), {}, p, b"s" * 64]
                            )
                        )
                    )
                    + b"x"
                )
            ),
            "zlib",
        ),
        (lambda k, d, p: _hc1(k, native.protected_header(-7, d.kid), {}, p, tags=(61,)), "cose"),
        (lambda k, d, p: _hc1(k, native.protected_header(-7, d.kid), {}, p, tags=(18, 18)), "cose"),
        (lambda k, d, p: _hc1(k, cbor2.dumps({1: -8, 4: d.kid}), {}, p), "header"),
        (lambda k, d, p: _hc1(k, cbor2.dumps({1: -7, 4: d.kid[:7]}), {}, p), "header"),
        (lambda k, d, p: _hc1(k, cbor2.dumps({1: -7}), {}, p), "header"),
        (lambda k, d, p: _hc1(k, native.protected_header(-7, d.kid), {}, p + b"\x00"), "cwt"),
        (lambda k, d, p: _hc1(k, native.protected_header(-7, d.kid), {}, cbor2.dumps([1])), "cwt"),
        (
            lambda k, d, p: _hc1(
                k,
                native.protected_header(-7, d.kid),
                {},
                cbor2.dumps({1: "NL", 4: 1, 6: 0, -260: {"1": {}}}),
            ),
            "cwt",
        ),
        (lambda k, d, p: _hc1(k, native.protected_header(-7, b"12345678"), {}, p), "key"),
        (
            lambda k, d, p: _hc1(k, native.protected_header(-7, d.kid), {}, p, sig=b"s" * 63),
            "signature",
        ),
        (lambda k, d, p: _hc1(k, native.protected_header(-37, d.kid), {}, p), "signature"),
        (
            lambda k, d, p: _hc1(
                ec.generate_private_key(ec.SECP256R1()), native.protected_header(-7, d.kid), {}, p
            ),
            "signature",
        ),
    ],
)
def test_refuses(signer, mutate, step):
    key, dsc = signer
    result = verify_hc1(mutate(key, dsc, cbor2.dumps(_claims())), [dsc])
    assert not result.valid
    assert result.errors[0]["step"] == step, result.errors


def test_tagged_date_time_is_accepted_and_rendered_as_text(signer):
    # "sc" SHOULD be tagged 0 (spec notes §2.7); verifiers MUST accept tagged and untagged.
    key, dsc = signer
    dcc = sample("t")
    tagged = {**dcc, "t": [{**dcc["t"][0], "sc": cbor2.CBORTag(0, "2021-07-01T09:30:00Z")}]}
    claims = {**_claims(), -260: {1: tagged}}
    result = verify_hc1(
        _hc1(key, native.protected_header(-7, dsc.kid), {}, cbor2.dumps(claims)), [dsc]
    )
    assert result.valid and result.dcc == dcc
    import json

    json.dumps(result.as_json())


def test_time_and_usage_are_separate_from_the_signature(signer):
    key, dsc = signer
    t = int(NOW.timestamp())
    text = _hc1(
        key,
        native.protected_header(-7, dsc.kid),
        {},
        cbor2.dumps(_claims(iat=t - 7200, exp=t - 3600)),
    )
    result = verify_hc1(text, [dsc])
    assert result.valid and result.time_valid is False
    assert [e["step"] for e in result.errors] == ["time"]
    assert verify_hc1(text, [dsc], at=NOW - dt.timedelta(minutes=90)).time_valid is True
    assert verify_hc1(text, [dsc], at=NOW - dt.timedelta(hours=3)).time_valid is False


def test_every_dsc_with_the_kid_is_tried(signer):
    key, dsc = signer
    _, other_cert = ephemeral_certificate()
    impostor = DSC.from_certificate(other_cert)
    collided = DSC(**{**{f: getattr(impostor, f) for f in DSC.__slots__}, "kid": dsc.kid})
    text = _hc1(key, native.protected_header(-7, dsc.kid), {}, cbor2.dumps(_claims()))
    assert verify_hc1(text, [collided, dsc]).valid
    result = verify_hc1(text, [collided])
    assert not result.valid and result.errors[0]["step"] == "signature"


@pytest.mark.parametrize("junk", ["", "HC1:", "HC1", "HC1: ", "\n", "HC1:" + "A" * 3000])
def test_never_raises(signer, junk):
    assert not verify_hc1(junk, [signer[1]]).valid
