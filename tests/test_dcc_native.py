"""The DCC validator on CBOR bytes (dccsign.native validate_dcc_*): both implementations
against the Python validator (dccsign.dcc.validate.validate on the decoded object), differentially.

Every check goes through :func:`agree`, which asks three parties about the same bytes:

* the implementation under test (``impl``: native or the pure-Python twin),
* the oracle: the decoder the mode names (the engine's strict ``cborlimits.decode`` or keyd's
  ``loads_exact``) followed by :func:`dccsign.dcc.validate.validate`, written out here again,

and requires the same result: the same type, or the same error class with the same issues
(path, rule and message) or the same decoder message; and for the native implementation, no
new disagreement between C and the reference in its counters. Inputs: hypothesis-generated
valid DCCs and mutations of them (the strategies of test_dcc_validation.py), the same DCCs in
every CBOR encoding a peer may choose (indefinite lengths, wide heads, floats of each width,
chunked text), CBOR-level junk (tags, bignums, byte-string and duplicate keys, undefined,
simple values), byte flips and truncations, and the official test vectors.
"""

from __future__ import annotations

import functools
import io
import json
import random
import unicodedata
from datetime import date
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dcc_validation import (
    TODAY,
    VERSIONS,
    _schema_for,
    _vector,
    base,
    junk,
    mutated_dcc,
    valid_dcc,
)

from conftest import shared_path
from dccsign.dcc.issuer import claims_prefix, nfc_names
from dccsign.dcc.validate import DOSE_MAX, DCCValidationError, validate
from dccsign.dcc.valuesets import ValueSets
from dccsign.dcc.verify import loads_exact
from dccsign.native import DCCDecodeError
from dccsign.protocol import cborlimits
from dccsign.testing.cborvariants import encode_float, head

STRICT_LIMITS = {"max_items": 65536, "max_depth": 16}
_RULES: dict[tuple[str, int], Any] = {}


def rules_of(impl: Any, valuesets: ValueSets | None = None) -> Any:
    if valuesets is not None:
        return impl.DccRules(valuesets)
    key = (impl.__name__, 0)
    if key not in _RULES:
        _RULES[key] = impl.DccRules()
    return _RULES[key]


def oracle(
    data: bytes, strict: bool, valuesets: ValueSets | None, today: date, nfc: bool = False
) -> Any:
    """What the Python validator says about the object the mode's decoder makes of data (with
    nfc, after the engine's NFC normalisation of the names)."""
    try:
        if strict:
            obj = cborlimits.decode(data, scan=cborlimits.scan, **STRICT_LIMITS)
        else:
            obj = loads_exact(data)
    except (cbor2.CBORError, ValueError) as exc:
        return ("undecodable", str(exc))
    if nfc and isinstance(obj, dict):
        obj = nfc_names(obj)
    try:
        return ("ok", validate(obj, valuesets=valuesets, today=today))
    except DCCValidationError as exc:
        return ("invalid", [(i.path, i.rule, i.message) for i in exc.issues])


def _shape(result: Any) -> Any:
    if isinstance(result, DCCValidationError):
        return ("invalid", [(i.path, i.rule, i.message) for i in result.issues])
    if isinstance(result, DCCDecodeError):
        return ("undecodable", str(result))
    assert isinstance(result, str), result
    return ("ok", result)


def agree(
    impl: Any,
    data: bytes,
    *,
    strict: bool = True,
    valuesets: ValueSets | None = None,
    today: date = TODAY,
    nfc: bool = False,
) -> Any:
    """Check impl against the oracle on data; return the (kind, detail) outcome."""
    before = impl.dcc_validator_stats()["disagreements"]
    rules = rules_of(impl, valuesets)
    try:
        got = _shape(impl.validate_dcc_cbor(rules, data, today, strict=strict, nfc_names=nfc))
    except (DCCValidationError, DCCDecodeError) as exc:
        got = _shape(exc)
    want = oracle(data, strict, valuesets, today, nfc)
    assert impl.dcc_validator_stats()["disagreements"] == before, (data.hex(), got, want)
    if want[0] == "undecodable":
        # The decoder's own words are wrapped; the verdict is what must agree.
        assert got[0] == "undecodable", (data.hex(), got, want)
        assert want[1] in got[1]
    else:
        assert got == want, data.hex()
    return got


# ---------------------------------------------------------------------------------------------
# A CBOR encoder with every choice a peer may make (RFC 8949 §3, §4.2 is only a SHOULD).


def encode(obj: Any, rnd: random.Random | None = None) -> bytes:
    """CBOR of a JSON-like object; with rnd, random head widths, indefinite lengths, chunked
    strings and the narrowest-or-wider float width (all decode to the same object)."""
    if obj is None:
        return b"\xf6"
    if obj is True:
        return b"\xf5"
    if obj is False:
        return b"\xf4"
    if isinstance(obj, int):
        if obj >= 0:
            return head(0, obj, rnd) if obj < 2**64 else cbor2.dumps(obj)
        return head(1, -1 - obj, rnd) if obj >= -(2**64) else cbor2.dumps(obj)
    if isinstance(obj, float):
        return encode_float(obj, rnd)
    if isinstance(obj, (str, bytes)):
        raw = obj.encode("utf-8") if isinstance(obj, str) else obj
        major = 3 if isinstance(obj, str) else 2
        if rnd is not None and rnd.random() < 0.3:
            # chunks on code point boundaries (each chunk must be valid UTF-8 by itself)
            pieces, text = [], obj
            while text:
                cut = rnd.randint(1, len(text))
                pieces.append(text[:cut])
                text = text[cut:]
            out = bytes([major << 5 | 31])
            for piece in pieces:
                chunk = piece.encode("utf-8") if isinstance(piece, str) else piece
                out += head(major, len(chunk), rnd) + chunk
            return out + b"\xff"
        return head(major, len(raw), rnd) + raw
    indefinite = rnd is not None and rnd.random() < 0.3
    if isinstance(obj, (list, tuple)):
        body = b"".join(encode(x, rnd) for x in obj)
        return (b"\x9f" + body + b"\xff") if indefinite else head(4, len(obj), rnd) + body
    if isinstance(obj, dict):
        body = b"".join(encode(k, rnd) + encode(v, rnd) for k, v in obj.items())
        return (b"\xbf" + body + b"\xff") if indefinite else head(5, len(obj), rnd) + body
    raise TypeError(type(obj).__name__)


# ---------------------------------------------------------------------------------------------
# Hand-picked cases


@pytest.mark.parametrize("ver", VERSIONS)
@pytest.mark.parametrize("kind", ["v", "t", "r"])
def test_valid_payloads_of_every_version(impl, kind: str, ver: str) -> None:
    assert agree(impl, cbor2.dumps(base(kind, ver))) == ("ok", kind)
    assert agree(impl, cbor2.dumps(base(kind, ver)), strict=False) == ("ok", kind)


def test_dose_bounds_match_the_python_constant(impl) -> None:
    for ver, top in (("1.2.1", 9), ("1.3.0", DOSE_MAX)):
        for dn, ok in ((top, True), (top + 1, False), (0, False), (-1, False), (2**64 - 1, False)):
            dcc = base("v", ver)
            dcc["v"][0]["dn"] = dn
            assert (agree(impl, encode(dcc))[0] == "ok") is ok


DATES = [
    "2021-02-28",
    "2021-02-29",
    "2020-02-29",
    "1900-02-29",
    "2000-02-29",
    "0000-01-01",
    "0001-01-01",
    "9999-12-31",
    "2021-13-01",
    "2021-00-10",
    "2021-04-31",
    "2021-4-30",
    "2021-04-3a",
    "２０２１-04-30",
    "2021/04/30",
    "",
]
DATETIMES = [
    "2021-07-01T09:30:00Z",
    "2021-07-01t09:30:00z",
    "2021-07-01T09:30:00.123456789Z",
    "2021-07-01T09:30:00.1234567890Z",
    "2021-07-01T09:30:00.Z",
    "2021-07-01T24:00:00Z",
    "2021-07-01T23:60:00Z",
    "2021-07-01T23:59:60Z",
    "2021-07-01T09:30:00+02:00",
    "2021-07-01T09:30:00+0200",
    "2021-07-01T09:30:00+02",
    "2021-07-01 09:30:00Z",
    "2021-02-30T09:30:00Z",
    "2021-07-01T09:30:00-23:59",
    "2021-07-01T09:30:00+24:00",
    "2021-07-01T09:30Z",
    "2021-07-01T09:30:00Z\n",
]
UVCIS = [
    "URN:UVCI:01:NL:187/37512422923#Z",
    "URN:UVCI:01:NL:187/37512422923#Y",
    "URN:UVCI:01:NL:A/B/C",
    "URN:UVCI:01:NL:A/B/C/D",
    "URN:UVCI:01:NL:A//B",
    "URN:UVCI:01:NL:",
    "URN:UVCI:01:NL:A#",
    "URN:UVCI:01:NL:A#AB",
    "urn:uvci:01:nl:abc",
    "URN:UVCI:01:N1:ABC",
    "URN:UVCI:01:NL:ABC#/",
    "URN:UVCI:01:NL:ABC#:",
    "URN:UVCI:02:NL:ABC",
    "URN:UVCI:01NL:ABC",
    "URN:UVCI:01:NL:ABÇ",
    "URN:UVCI:01:NL:" + "A" * 70,
]


@pytest.mark.parametrize("ver", ["1.0.0", "1.2.1", "1.3.0", "1.3.2"])
def test_fields_one_at_a_time(impl, ver: str) -> None:
    cases: list[tuple[str, str, object]] = []
    for d in DATES:
        cases += [("v", "dt", d), ("r", "fr", d), ("r", "df", d), ("r", "du", d)]
    for d in DATETIMES:
        cases += [("t", "sc", d), ("t", "dr", d)]
    for u in UVCIS:
        cases += [(k, "ci", u) for k in "vtr"]
    for k in "vtr":
        for f in ("tg", "co", "is", "ma", "tc", "nm", "tt"):
            for value in (
                "",
                "NL",
                "nl",
                "840539006",
                "x" * 50,
                "é" * 51,
                "é" * 80,
                "x" * 81,
                1,
                1.5,
                None,
                True,
                [],
                {},
                b"NL",
            ):
                cases.append((k, f, value))
    for kind, key, value in cases:
        dcc = base(kind, ver)
        dcc[kind][0][key] = value
        agree(impl, encode(dcc))
        del dcc[kind][0][key]
        agree(impl, encode(dcc))


ODD_VERSIONS = [
    "1.3.9",
    "1.0.7",
    "1.4.0",
    "1.03.0",
    "1.3.01",
    "1.3",
    "1.3.0 ",
    "",
    "1.3.0\n",
    "1.3.10000000000000",
]


@pytest.mark.parametrize("ver", [*VERSIONS, *ODD_VERSIONS])
def test_versions_and_dob(impl, ver: str) -> None:
    for dob in [
        "",
        "1979",
        "1979-04",
        "1979-13",
        "1979-00",
        "1979-04-31",
        "1899-01-01",
        "2099-12-31",
        "2025-01-15",
        "2025-01-16",
        "2025-01",
        "2025-02",
        "2025",
        "2026",
        "1979-4",
        "19790401",
        "２０００",
        1979,
        None,
    ]:
        dcc = base("v", "1.3.0")
        dcc["ver"] = ver
        dcc["dob"] = dob
        agree(impl, encode(dcc))


def test_names(impl) -> None:
    values = ["", "A", "<", "A<B", "a", "É", "X" * 50, "X" * 51, "X" * 80, "X" * 81, 1, None, []]
    for ver in ("1.2.1", "1.3.0", "1.3.2"):
        for fnt in [*values, "MISSING"]:
            for gnt in ["MISSING", "", "B", "b", 7]:
                dcc = base("r", ver)
                nam = {"fn": "x"}
                if fnt != "MISSING":
                    nam["fnt"] = fnt
                if gnt != "MISSING":
                    nam["gnt"] = gnt
                dcc["nam"] = nam
                agree(impl, encode(dcc))
        for nam in ({}, [], "X", None, {"fn": "é" * 81, "fnt": "X", "zz": 1, "a b": 2}):
            dcc = base("r", ver)
            dcc["nam"] = nam
            agree(impl, encode(dcc))


NAMES = [
    "Bakker",
    "Çelik",
    "Zoë",
    "e\u0301" * 41,
    "é" * 80,
    "e\u0301",
    "\u212b",
    "Ωμέγα",
    "Ω\u0301",
    "Жанна",
    "Й",
    "И\u0306",
    "中村",
    "\u1100\u1161",
    "\u1100",
    "😀",
    "a\u0308o",
    "ñ" * 81,
    "\u0958",
    "\u0915\u093c",
    "\u00c5" * 3,
    "A\u030a",
]


@pytest.mark.parametrize("name", NAMES)
def test_names_the_engine_normalises(impl, name: str) -> None:
    for ver in ("1.2.1", "1.3.2"):
        for where in ("fn", "gn"):
            dcc = base("v", ver)
            dcc["nam"][where] = name
            for nfc in (True, False):
                agree(impl, encode(dcc), nfc=nfc)
    # 41 decomposed é: 82 code points, 41 once normalised, so valid only in the engine's view
    dcc = base("v", "1.2.1")
    dcc["nam"]["fn"] = "e\u0301" * 41
    assert agree(impl, encode(dcc), nfc=True) == ("ok", "v")
    assert agree(impl, encode(dcc), nfc=False)[0] == "invalid"


@functools.cache
def _inert_chars() -> list[str]:
    from dccsign.native._dccvalidate_py import _nfc_inert_bitmap

    bits = _nfc_inert_bitmap()
    return [chr(c) for c in range(len(bits) * 8) if bits[c >> 3] >> (c & 7) & 1]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_texts_of_nfc_inert_characters_are_nfc(data: st.DataObject) -> None:
    # The table the native side uses to skip normalisation must never be wrong.
    text = data.draw(st.text(alphabet=st.sampled_from(_inert_chars()), max_size=20))
    assert unicodedata.is_normalized("NFC", text)


def test_groups_and_entries(impl) -> None:
    entry = base("v")["v"][0]
    for groups in (
        {},
        {"v": []},
        {"v": [entry, entry]},
        {"v": [entry], "t": None},
        {"v": None},
        {"v": {}},
        {"v": [1]},
        {"v": [[]]},
        {"r": [entry]},
        {"v": [entry], "r": [entry], "t": [entry]},
        {"t": [{}]},
    ):
        dcc = base("v")
        del dcc["v"]
        dcc.update(groups)
        agree(impl, encode(dcc))
    for top in (1, "x", [], None, b"", 1.5, [base("v")]):
        agree(impl, encode(top))


def test_odd_keys_are_reported_where_python_reports_them(impl) -> None:
    for key in ("x", "a b", "é", "x" * 40, "x" * 41, "_ok", "9x", b"v", b"\x00'\"", "'", "\\"):
        for where in ("top", "nam", "entry"):
            dcc = base("t", "1.0.0")
            target = {"top": dcc, "nam": dcc["nam"], "entry": dcc["t"][0]}[where]
            target[key] = 1
            agree(impl, encode(dcc))
            agree(impl, encode(dcc), strict=False)


def test_cbor_decoder_cases(impl) -> None:
    dcc = base("v")
    good = encode(dcc)
    d = {"ver": "1.3.0"}
    cases = [
        b"",
        b"\xff",
        good + b"\x00",
        good[:-1],
        b"\xa1\x61a",  # malformed / trailing
        b"\xa1\x62\xc3\x28\x01",  # invalid UTF-8 in a key
        b"\xa1\x61x\x62\xed\xa0",  # truncated
        b"\xa1\x61x\x7f\x61\xc3\x61\xa9\xff",  # a code point split over two chunks
        b"\xa1\x61x\xf8\x10",  # two-byte simple value below 32
        b"\xa1\x61x\xf8\x20",
        b"\xa1\x61x\xf7",
        b"\xa1\x61x\xf0",  # simple values, undefined
        b"\xa2\x61a\x01\x61a\x02",  # duplicate key
        b"\xa1\x01\x01",
        b"\xa1\xf5\x01",
        b"\xa1\xf9\x3c\x00\x01",
        b"\xa1\x80\x01",  # keys
        b"\xa1\x7f\x61a\xff\x01",  # chunked key
        b"\xa1\xc2\x41\x01\x01",
        b"\xc2\x41\x01",  # bignum key / value
        b"\xd9\xd9\xf7" + good,  # self-described CBOR
        b"\xa1\x61x\xc0\x74" + b"2021-05-30T10:12:22Z",  # a date-time tag
        b"\x81" * 17 + b"\x01",
        b"\x81" * 15 + b"\x01",
        b"\x81" * 40 + b"\x01",  # depth
        b"\xbf\x63ver\x651.3.0\xff",
        b"\x9f\xff",
        b"\x5f\x41\x01\xff",
        encode(d),
        cbor2.dumps({"ver": "1.3.0", "dob": b"1979"}),
    ]
    for name, value in (
        ("dn", 2.0),
        ("dn", float("nan")),
        ("dn", -0.0),
        ("dn", 2**64 - 1),
        ("dn", -(2**64)),
        ("dt", b"2021-01-01"),
    ):
        e = base("v")
        e["v"][0][name] = value
        cases.append(encode(e))
    for case in cases:
        for strict in (True, False):
            agree(impl, case, strict=strict)
    # A tag where the DCC puts a dose: keyd's decoder makes an int of a bignum.
    tagged = good.replace(b"\x62dn\x02", b"\x62dn\xc2\x41\x02")
    assert tagged != good
    assert agree(impl, tagged, strict=False) == ("ok", "v")
    assert agree(impl, tagged, strict=True)[0] == "undecodable"
    # keyd's decoder keeps the last of two equal keys.
    dup = good[:1].replace(b"\xa4", b"\xa5") + good[1:] + b"\x63ver\x651.0.0"
    assert agree(impl, dup, strict=False)[0] in ("ok", "invalid")
    assert agree(impl, dup, strict=True)[0] == "undecodable"


def test_bad_arguments(impl) -> None:
    rules = rules_of(impl)
    with pytest.raises(TypeError):
        impl.DccRules(object())
    with pytest.raises(TypeError):
        impl.validate_dcc_cbor(rules, encode(base("v")), "2025-01-01")
    with pytest.raises(TypeError):
        impl.validate_dcc_cbor(object(), encode(base("v")))
    with pytest.raises(ValueError):
        impl.validate_dcc_batch(rules, b"\xa0", [0, 2])
    with pytest.raises(ValueError):
        impl.validate_dcc_batch(rules, b"\xa0", [1, 0])
    with pytest.raises(ValueError):
        impl.validate_dcc_batch(rules, b"\xa0\xa0", [0, 1], ends=[1])
    with pytest.raises(TypeError):
        impl.validate_cwt_batch(rules, [bytearray(b"\xa0")])


def test_today_defaults_to_utc_today(impl) -> None:
    dcc = base("v")
    dcc["dob"] = date.today().replace(year=date.today().year + 1).isoformat()[:4]
    with pytest.raises(DCCValidationError) as err:
        impl.validate_dcc_cbor(rules_of(impl), encode(dcc))
    assert [(i.path, i.rule) for i in err.value.issues] == [("$.dob", "range")]
    assert impl.validate_dcc_cbor(rules_of(impl), encode(base("v"))) == "v"


# ---------------------------------------------------------------------------------------------
# Batches and the CWT form


def test_batch_matches_single_calls(impl) -> None:
    rnd = random.Random(7)
    items = [encode(base(k, v), rnd) for k in "vtr" for v in VERSIONS]
    bad = base("t")
    bad["t"][0]["sc"] = "yesterday"
    items += [encode(bad), b"\xa1", b"\xc0\x01", encode([1])]
    buf = b"".join(items)
    offsets = [0]
    for item in items:
        offsets.append(offsets[-1] + len(item))
    got = impl.validate_dcc_batch(rules_of(impl), buf, offsets, TODAY)
    assert [_shape(g) for g in got] == [agree(impl, i) for i in items]
    # starts and ends inside a larger buffer, any order, overlapping allowed
    padded = b"\x00" * 3 + buf
    starts = [o + 3 for o in offsets[:-1]][::-1]
    ends = [o + 3 for o in offsets[1:]][::-1]
    again = impl.validate_dcc_batch(rules_of(impl), memoryview(padded), starts, TODAY, ends=ends)
    assert [_shape(g) for g in again] == [_shape(g) for g in got][::-1]
    assert impl.validate_dcc_batch(rules_of(impl), b"", [0]) == []


def cwt(dcc_cbor: bytes) -> bytes:
    claims = {1: b"\x62NL", 4: b"\x1a\x70\x00\x00\x00", 6: b"\x1a\x60\x00\x00\x00"}
    body = b"".join(encode(k) + v for k, v in claims.items())
    return bytes([0xA4]) + body + b"\x39\x01\x03\xa1\x01" + dcc_cbor


def cwt_oracle(payload: bytes, valuesets: ValueSets | None = None) -> Any:
    try:
        claims = loads_exact(payload)
    except (cbor2.CBORError, ValueError) as exc:
        return ("undecodable", str(exc))
    hcert = claims.get(-260) if type(claims) is dict else None
    if type(hcert) is not dict or 1 not in hcert:
        return ("undecodable", "")
    try:
        return ("ok", validate(hcert[1], valuesets=valuesets, today=TODAY))
    except DCCValidationError as exc:
        return ("invalid", [(i.path, i.rule, i.message) for i in exc.issues])


def cwt_agree(impl: Any, payloads: list[bytes], valuesets: ValueSets | None = None) -> list:
    before = impl.dcc_validator_stats()["disagreements"]
    got = [_shape(r) for r in impl.validate_cwt_batch(rules_of(impl, valuesets), payloads, TODAY)]
    assert impl.dcc_validator_stats()["disagreements"] == before
    for g, p in zip(got, payloads, strict=True):
        want = cwt_oracle(p, valuesets)
        assert g[0] == want[0], (p.hex(), g, want)
        if want[0] != "undecodable":
            assert g == want
        else:
            assert want[1] in g[1]
    return got


def test_cwt_form(impl) -> None:
    rnd = random.Random(3)
    payloads = [cwt(encode(base(k, v), rnd)) for k in "vtr" for v in VERSIONS]
    bad = base("r")
    bad["r"][0]["du"] = "2021-01-01"
    payloads += [
        cwt(encode(bad)),
        cwt(encode(base("v"))) + b"\x00",  # trailing
        b"\xa1\x01\x02",  # no -260
        b"\xa1\x39\x01\x03\xa1\x02\xa0",  # -260 without 1
        b"\xa1\x39\x01\x03\xa2\x01\xa0\x02\xa0",  # -260 with more
        b"\xa1\x39\x01\x03\x80",  # -260 not a map
        b"\x82\x01\x02",  # not a map
        b"\xa2\x39\x01\x03\xa1\x01\xa0\x39\x01\x03\xa1\x01" + encode(base("t")),  # twice
        b"\xa1\xf9\xdc\x10\xa1\x01" + encode(base("t")),  # -260.0 as a float key
        b"\xa1\x39\x01\x03\xa1\x01\xc2\x41\x01",  # a bignum DCC
    ]
    kinds = cwt_agree(impl, payloads)
    assert [k for k in kinds[:27]] == [("ok", k) for k in "vtr" for _ in VERSIONS]


def test_cwt_form_of_the_engine_payloads(impl) -> None:
    # The claims the engine itself builds (claims + cbor2.dumps), as keyd receives them.
    payloads = [
        claims_prefix("NL", 1_600_000_000, 1_700_000_000) + cbor2.dumps(base(k, v))
        for k in "vtr"
        for v in VERSIONS
    ]
    cwt_agree(impl, payloads)


# ---------------------------------------------------------------------------------------------
# Generated and mutated DCCs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_dcc(), st.randoms(use_true_random=False))
def test_generated_valid_dccs(impl, dcc: dict, rnd: random.Random) -> None:
    assert agree(impl, cbor2.dumps(dcc)) == ("ok", next(k for k in "vtr" if k in dcc))
    assert agree(impl, encode(dcc, rnd), strict=rnd.random() < 0.5)[0] == "ok"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_dcc(), st.randoms(use_true_random=False), st.booleans())
def test_mutated_dccs(impl, dcc: dict, rnd: random.Random, strict: bool) -> None:
    agree(impl, encode(dcc, rnd), strict=strict)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_dcc(), mutated_dcc()))
def test_whatever_the_native_side_accepts_the_official_schema_accepts(impl, dcc: dict) -> None:
    # The soundness property of test_dcc_validation.py, asked of the bytes validator.
    try:
        impl.validate_dcc_cbor(rules_of(impl), cbor2.dumps(dcc), TODAY)
    except (DCCValidationError, DCCDecodeError):  # (cbor2 writes ints past 64 bits as tags)
        return
    errors = [e.message for e in _schema_for(dcc).iter_errors(dcc)]
    assert errors == [], f"accepted, but the official schema says: {errors}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk, st.booleans())
def test_junk(impl, value: object, strict: bool) -> None:
    agree(impl, cbor2.dumps(value), strict=strict)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_dcc(), mutated_dcc()), st.randoms(use_true_random=False))
def test_byte_flips_and_cuts(impl, dcc: dict, rnd: random.Random) -> None:
    data = bytearray(encode(dcc, rnd))
    for _ in range(rnd.randint(1, 3)):
        op = rnd.random()
        i = rnd.randrange(len(data))
        if op < 0.5:
            data[i] = rnd.randrange(256)
        elif op < 0.7:
            data[i] ^= 1 << rnd.randrange(8)
        elif op < 0.85:
            del data[i:]
            if not data:
                break
        else:
            data[i:i] = bytes([rnd.choice([0xC0, 0xC2, 0xD9, 0xF7, 0xFF, 0x5F, 0x7F, 0xBF])])
    agree(impl, bytes(data), strict=rnd.random() < 0.5)


# ---------------------------------------------------------------------------------------------
# Official material


def _vectors() -> list[Path]:
    root = shared_path("testdata", "dgc")
    return sorted(p for p in root.glob("**/*.json") if "JSON" in p.read_text("utf-8"))


def test_official_vectors(impl) -> None:
    n = 0
    for path in _vectors():
        doc = json.loads(path.read_text("utf-8"))
        dcc = doc["JSON"]
        agree(impl, encode(dcc))
        agree(impl, cbor2.dumps(dcc), strict=False)
        n += 1
        # The issuer's own CBOR: the DCC map itself in some vectors, the CWT in others.
        raw = doc.get("CBOR")
        if raw:
            data = bytes.fromhex(raw)
            try:
                decoded = loads_exact(data)
            except (cbor2.CBORError, ValueError):
                decoded = None
            if isinstance(decoded, dict) and -260 in decoded:
                cwt_agree(impl, [data])
            else:
                agree(impl, data, strict=False)
                agree(impl, data, strict=True)
        cose = doc.get("COSE")
        if cose:
            try:
                sign1 = cbor2.CBORDecoder(io.BytesIO(bytes.fromhex(cose))).decode()
                payload = (sign1.value if isinstance(sign1, cbor2.CBORTag) else sign1)[2]
            except Exception:  # some vectors carry broken COSE on purpose
                continue
            if isinstance(payload, bytes):
                cwt_agree(impl, [payload])
    assert n >= 100


def test_official_vectors_with_a_device_list(impl, tmp_path: Path) -> None:
    (tmp_path / "test-manf.json").write_bytes(
        shared_path("testdata", "dcc-valuesets", "test-manf-example.json").read_bytes()
    )
    vs = ValueSets.from_directory(tmp_path)
    for ver in ("1.0.0", "1.2.1", "1.3.0"):
        for n in (5, 7):
            agree(impl, encode(_vector(f"PL/{ver}/2DCode/raw/{n}.json")["JSON"]), valuesets=vs)
    dcc = base("t")
    for ma in ("1232", "9999", "", 1):
        dcc["t"][0]["ma"] = ma
        agree(impl, encode(dcc), valuesets=vs)
        agree(impl, encode(dcc))


def test_value_sets_from_a_directory(impl, tmp_path: Path) -> None:
    # A replaced set: codes that are not ASCII, and a country list with junk entries.
    (tmp_path / "country-2-codes.json").write_text(
        json.dumps(
            {
                "valueSetId": "country-2-codes",
                "valueSetDate": "2021-01-01",
                "valueSetValues": {"NL": {}, "nl": {}, "ÅX": {}, "XYZ": {}},
            }
        ),
        "utf-8",
    )
    (tmp_path / "test-type.json").write_text(
        json.dumps(
            {
                "valueSetId": "covid-19-lab-test-type",
                "valueSetDate": "2021-01-01",
                "valueSetValues": {"Ťest": {}, "LP6464-4": {"active": False}},
            }
        ),
        "utf-8",
    )
    vs = ValueSets.from_directory(tmp_path)
    for co in ("NL", "nl", "ÅX", "XYZ", "BE"):
        for tt in ("Ťest", "LP6464-4", "LP217198-3"):
            dcc = base("t")
            dcc["t"][0]["co"] = co
            dcc["t"][0]["tt"] = tt
            agree(impl, encode(dcc), valuesets=vs)


def test_batch_spans_may_come_as_uint32_arrays(impl):
    """The engine passes the walker's spans as array('I'): they are converted, never read
    as int64 memory (which once turned two spans into one absurd one)."""
    from array import array

    import cbor2

    from dccsign.testing.samples import varied_samples

    dccs = [cbor2.dumps(d) for d in varied_samples(3)]
    buf = b"".join(dccs)
    starts = array("I", [0, len(dccs[0]), len(dccs[0]) + len(dccs[1])])
    ends = array("I", [s + len(d) for s, d in zip(starts, dccs, strict=True)])
    rules = impl.DccRules()
    assert impl.validate_dcc_batch(rules, buf, starts, ends=ends) == ["v", "t", "r"]
    bounds = array("I", [*starts, len(buf)])
    assert impl.validate_dcc_batch(rules, buf, bounds) == ["v", "t", "r"]
