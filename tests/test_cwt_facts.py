"""keyd's structural CWT check (``cwt_facts``) against both implementations."""

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dccsign.dcc.issuer import claims_prefix
from dccsign.native import CwtFacts, implementation
from dccsign.testing.samples import sample, varied_samples

NOW = 1_790_000_000
INT64_MAX = 2**63 - 1


def _cwt(dcc, iss="NL", iat=NOW - 3600, exp=NOW + 86400) -> bytes:
    return claims_prefix(iss, iat, exp) + cbor2.dumps(dcc)


def test_reads_the_facts_of_every_type(impl):
    dccs = varied_samples(60)
    facts = impl.cwt_facts([_cwt(d) for d in dccs])
    for dcc, f in zip(dccs, facts, strict=True):
        (kind,) = {"v", "t", "r"} & set(dcc)
        assert f == CwtFacts("NL", NOW + 86400, NOW - 3600, kind, dcc[kind][0]["ci"])
        assert type(f) is CwtFacts


def test_claims_in_any_order_and_extreme_integers(impl):
    dcc = sample("r")
    raw = cbor2.dumps({-260: {1: dcc}, 6: -(2**63), 1: "DE", 4: INT64_MAX})
    (f,) = impl.cwt_facts([raw])
    assert f == CwtFacts("DE", INT64_MAX, -(2**63), "r", dcc["r"][0]["ci"])


def _claims(dcc, **over):
    claims = {1: "NL", 4: NOW + 10, 6: NOW, -260: {1: dcc}}
    claims.update({int(k[1:]) if k.startswith("c") else k: v for k, v in over.items()})
    return claims


V = sample("v")
CI = V["v"][0]["ci"]
CWT_CLAIMS = "the CWT must be a map of exactly the claims 1, 4, 6, -260"
HCERT = "claim -260 must be {1: DCC} with the DCC a map"
ONE_TYPE = "the DCC must hold exactly one of v, t, r"
CI_TEXT = "ci must be 1 to 80 printable ASCII characters"
INTS = "exp and iat must be 64-bit integers"

REFUSED = [
    (b"", "not one CBOR item: truncated CBOR item"),
    (b"\xff", "not one CBOR item: unexpected CBOR break"),
    (cbor2.dumps(_claims(V)) + b"\x00", "not one CBOR item: trailing bytes after the CBOR item"),
    (cbor2.dumps(_claims(V))[:-1], "not one CBOR item: truncated CBOR string"),
    (cbor2.dumps([1, 2]), CWT_CLAIMS),
    (cbor2.dumps({1: "NL", 4: 1, 6: 0}), CWT_CLAIMS),
    (cbor2.dumps({**_claims(V), 99: 1}), CWT_CLAIMS),
    (cbor2.dumps({1: "NL", 4: 1, 6: 0, 7: {1: V}}), CWT_CLAIMS),
    (cbor2.dumps({"1": "NL", 4: 1, 6: 0, -260: {1: V}}), CWT_CLAIMS),
    # a duplicate claim: the map has 4 entries but 4 appears twice
    (b"\xa4\x01\x62NL\x04\x01\x04\x02" + cbor2.dumps(-260) + cbor2.dumps({1: V}), CWT_CLAIMS),
    # indefinite-length CWT map
    (b"\xbf" + cbor2.dumps(_claims(V))[1:] + b"\xff", CWT_CLAIMS),
    (cbor2.dumps(_claims(V, c1="nl")), "iss must be an ISO 3166-1 alpha-2 code"),
    (cbor2.dumps(_claims(V, c1="NLD")), "iss must be an ISO 3166-1 alpha-2 code"),
    (cbor2.dumps(_claims(V, c1=b"NL")), "iss must be an ISO 3166-1 alpha-2 code"),
    (cbor2.dumps(_claims(V, c4=1.5)), INTS),
    (cbor2.dumps(_claims(V, c6=2**63)), INTS),
    (cbor2.dumps(_claims(V, c6=-(2**63) - 1)), INTS),
    (cbor2.dumps(_claims(V, c4=cbor2.CBORTag(1, NOW))), INTS),
    (cbor2.dumps(_claims(V, **{"c-260": V})), HCERT),
    (cbor2.dumps(_claims(V, **{"c-260": {1: V, 2: 0}})), HCERT),
    (cbor2.dumps(_claims(V, **{"c-260": {2: V}})), HCERT),
    (cbor2.dumps(_claims([V])), HCERT),
    (cbor2.dumps(_claims({**V, 7: 1})), "the DCC's field names must be definite-length text"),
    (cbor2.dumps(_claims({"ver": "1.3.0"})), ONE_TYPE),
    (cbor2.dumps(_claims({**V, "t": V["v"]})), ONE_TYPE),
    (
        cbor2.dumps(_claims({**V, "v": V["v"] * 2})),
        "the certificate array (v, t or r) must hold exactly one entry",
    ),
    (
        cbor2.dumps(_claims({**V, "v": []})),
        "the certificate array (v, t or r) must hold exactly one entry",
    ),
    (
        cbor2.dumps(_claims({**V, "v": [[CI]]})),
        "the certificate entry must be a definite-length map",
    ),
    (
        cbor2.dumps(_claims({**V, "v": [{**V["v"][0], 1: 2}]})),
        "the certificate entry's field names must be definite-length text",
    ),
    (
        cbor2.dumps(_claims({**V, "v": [{"tg": "840539006"}]})),
        "the certificate entry has no ci (UVCI)",
    ),
    (cbor2.dumps(_claims({**V, "v": [{**V["v"][0], "ci": ""}]})), CI_TEXT),
    (cbor2.dumps(_claims({**V, "v": [{**V["v"][0], "ci": "U" * 81}]})), CI_TEXT),
    (cbor2.dumps(_claims({**V, "v": [{**V["v"][0], "ci": "URN:UVCI:01 NL"}]})), CI_TEXT),
    (cbor2.dumps(_claims({**V, "v": [{**V["v"][0], "ci": "URN:UVCI:é"}]})), CI_TEXT),
    (cbor2.dumps(_claims({**V, "v": [{**V["v"][0], "ci": CI.encode()}]})), CI_TEXT),
]


def _with_duplicate_key(dcc_map_items: list[tuple[str, object]]) -> bytes:
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in dcc_map_items)
    dcc = bytes([0xA0 + len(dcc_map_items)]) + body
    return claims_prefix("NL", NOW, NOW + 10) + dcc


REFUSED += [
    (
        _with_duplicate_key([("ver", "1.3.0"), ("v", V["v"]), ("ver", "1.0.0")]),
        "the DCC has a duplicate field",
    ),
    (_with_duplicate_key([("v", V["v"]), ("v", V["v"])]), "the DCC has a duplicate field"),
]


@pytest.mark.parametrize(("raw", "reason"), REFUSED)
def test_refuses_with_the_same_reason(impl, raw, reason):
    assert impl.cwt_facts([raw]) == [reason]


def test_a_bad_item_does_not_spoil_the_batch(impl):
    good = _cwt(V)
    out = impl.cwt_facts([good, b"\xff", good])
    assert isinstance(out[0], CwtFacts) and out[2] == out[0]
    assert out[1].startswith("not one CBOR item")


def test_rejects_non_bytes(impl):
    with pytest.raises(TypeError, match="payload 1 must be bytes"):
        impl.cwt_facts([b"", bytearray(b"x")])
    assert impl.cwt_facts([]) == []


def _mutations(base: bytes):
    return st.lists(
        st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=4
    )


BASE = _cwt(V)


@settings(max_examples=400, deadline=None)
@given(_mutations(BASE), st.integers(0, len(BASE)))
@example([(0, 0xBF)], len(BASE))
def test_implementations_agree_on_mutated_payloads(impl, edits, cut):
    raw = bytearray(BASE)
    for pos, value in edits:
        raw[pos] = value
    raw = bytes(raw[:cut]) if cut < len(raw) else bytes(raw)
    assert impl.cwt_facts([raw]) == implementation("python").cwt_facts([raw])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_implementations_agree_on_random_bytes(impl, raw):
    assert impl.cwt_facts([raw]) == implementation("python").cwt_facts([raw])


def test_accepts_only_what_cbor2_decodes_to_the_same_facts(impl):
    # Accepted payloads decode (with an independent decoder) to exactly the facts read.
    for dcc in varied_samples(30):
        raw = _cwt(dcc, iss="BE", iat=NOW, exp=NOW + 5)
        (f,) = impl.cwt_facts([raw])
        claims = cbor2.loads(raw)
        (kind,) = {"v", "t", "r"} & set(claims[-260][1])
        assert f == (claims[1], claims[4], claims[6], kind, claims[-260][1][kind][0]["ci"])
