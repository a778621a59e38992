"""Claims by splicing (``splice_payloads``): every payload equals what the engine signs today,
``claims_prefix(...) + cbor2.dumps(nfc_names(dcc))``, for canonical and non-canonical request
encodings, in both implementations, with the same slow-path count."""

from __future__ import annotations

import array
import math
import random
import struct

import cbor2
import pytest

from dccsign.dcc.issuer import claims_prefix, nfc_names
from dccsign.native import _splice_py as S
from dccsign.protocol import wire
from dccsign.testing.samples import varied_samples

PREFIXES = [claims_prefix("NL", 1_700_000_000, 1_731_536_000), claims_prefix("DE", 5, 2**33)]


def _expected(view, prefixes, prefix_of) -> list[bytes]:
    out = []
    for i in range(view.count):
        if prefix_of[i] == S.NO_PAYLOAD:
            out.append(b"")
            continue
        dcc = cbor2.loads(view.dcc_bytes(i))
        out.append(prefixes[prefix_of[i]] + cbor2.dumps(nfc_names(dcc)))
    return out


def check(impl, body: bytes, prefix_of=None, max_batch: int = 64):
    view = impl.walk_sign_batch(body, max_batch)
    if prefix_of is None:
        prefix_of = array.array("I", [i % 2 for i in range(view.count)])
    got = impl.splice_payloads(view, PREFIXES, prefix_of)
    want = _expected(view, PREFIXES, prefix_of)
    assert [got.payload(i) for i in range(view.count)] == want
    # keyd's view: the rows with a payload, where each ends in data, and the longest
    rows = [i for i, p in enumerate(want) if p]
    assert list(got.rows) == rows and got.rows.typecode == got.ends.typecode == "I"
    assert [got.data[:e] for e in got.ends] == [b"".join(want[: i + 1]) for i in rows]
    assert got.longest == max(map(len, want), default=0)
    ref = S.splice_payloads(view, PREFIXES, prefix_of)
    assert got == ref
    return got


def _client_body(dccs) -> bytes:
    """A SIGN_BATCH body as the protocol's own client encodes it (cbor2)."""
    items = tuple(wire.SignItem(d, f"uzi:{i}") for i, d in enumerate(dccs))
    return cbor2.dumps(wire.bodies.body_of(wire.SignBatch(1, items), check_dcc=True))


def test_samples_take_the_fast_path(impl):
    dccs = varied_samples(64, seed=7)
    got = check(impl, _client_body(dccs))
    assert got.slow == 0, got.slow


def test_no_payload_items(impl):
    body = _client_body(varied_samples(5, seed=3))
    got = check(impl, body, array.array("I", [0, S.NO_PAYLOAD, 1, S.NO_PAYLOAD, 0]))
    assert got.payload(1) == b"" and got.payload(3) == b""
    with pytest.raises(ValueError):
        impl.splice_payloads(impl.walk_sign_batch(body, 8), PREFIXES, array.array("I", [0] * 4))
    with pytest.raises(ValueError):
        impl.splice_payloads(impl.walk_sign_batch(body, 8), PREFIXES, array.array("I", [2] * 5))
    with pytest.raises(TypeError):
        impl.splice_payloads(impl.walk_sign_batch(body, 8), [b"", "x"], array.array("I", [0] * 5))


def _names(fn: str, gn: str) -> dict:
    d = dict(varied_samples(1, seed=1)[0])
    d["nam"] = dict(d["nam"], fn=fn, gn=gn)
    return d


def test_names_and_nfc(impl):
    cases = [
        (_names("Müller", "Łukasz Ørsted"), 0),  # precomposed, below U+0300: fast
        (_names("Mu\u0308ller", "Anna"), 1),  # decomposed: normalised on the slow path
        (_names("Παπαδόπουλος", "Γιώργος"), 0),  # NFC-stable code points: fast
        (_names("Nguyễn", "김민준"), 0),
        (_names("Kim", "\u1100\u1161"), 1),  # Hangul jamo: compose under NFC
        (_names("Ivanov", "Ива\u0306н"), 1),
    ]
    for dcc, slow in cases:
        got = check(impl, _client_body([dcc]))
        assert got.slow == slow


# ---------------------------------------------------------------- a sloppy CBOR encoder


def _head(rng: random.Random, major: int, n: int, sloppy: bool) -> bytes:
    sizes = [s for s, lim in ((0, 24), (1, 256), (2, 65536), (4, 2**32), (8, 2**64)) if n < lim]
    size = rng.choice(sizes) if sloppy else sizes[0]
    if size == 0:
        return bytes([major << 5 | n])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[size]
    return bytes([major << 5 | info]) + n.to_bytes(size, "big")


def _enc(v, rng: random.Random, p: float) -> bytes:
    sloppy = rng.random() < p
    if v is None:
        return b"\xf6"
    if v is True or v is False:
        return b"\xf5" if v else b"\xf4"
    if type(v) is int:
        return _head(rng, 0, v, sloppy) if v >= 0 else _head(rng, 1, -1 - v, sloppy)
    if type(v) is float:
        forms = [b"\xfb" + struct.pack(">d", v)]
        for code, fmt in ((b"\xfa", ">f"), (b"\xf9", ">e")):
            try:
                if math.isnan(v) or struct.unpack(fmt, struct.pack(fmt, v))[0] == v:
                    forms.append(code + struct.pack(fmt, v))
            except OverflowError:
                pass
        return rng.choice(forms) if sloppy else cbor2.dumps(v)
    if type(v) in (str, bytes):
        raw = v.encode() if type(v) is str else v
        major = 3 if type(v) is str else 2
        if sloppy and rng.random() < 0.5:
            parts, s = [], v
            while s:
                k = rng.randrange(0, len(s) + 1)
                parts.append(s[:k])
                s = s[k:]
            chunks = b"".join(_enc(x, rng, 0) for x in parts)
            return bytes([major << 5 | 31]) + chunks + b"\xff"
        return _head(rng, major, len(raw), sloppy) + raw
    if type(v) is list:
        inner = b"".join(_enc(x, rng, p) for x in v)
        if sloppy and rng.random() < 0.5:
            return b"\x9f" + inner + b"\xff"
        return _head(rng, 4, len(v), sloppy) + inner
    if type(v) is dict:
        inner = b"".join(_enc(k, rng, p) + _enc(x, rng, p) for k, x in v.items())
        if sloppy and rng.random() < 0.5:
            return b"\xbf" + inner + b"\xff"
        return _head(rng, 5, len(v), sloppy) + inner
    raise TypeError(type(v))


def _noise(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 2 or r < 0.5:
        return rng.choice(
            [
                0,
                23,
                24,
                255,
                256,
                65535,
                65536,
                2**32,
                -1,
                -25,
                -(2**40),
                1.5,
                0.1,
                -0.0,
                float("inf"),
                float("-inf"),
                float("nan"),
                1e300,
                65504.0,
                "",
                "x" * 30,
                "é",
                b"\x01" * 300,
                True,
                False,
                None,
            ]
        )
    if r < 0.75:
        return [_noise(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _noise(rng, depth + 1) for i in range(rng.randrange(4))}


def test_sloppy_encodings_agree(impl):
    rng = random.Random(2014)
    dccs = varied_samples(40, seed=11)
    slow = fast = 0
    for _ in range(300):
        batch = []
        for i in range(rng.randrange(1, 6)):
            dcc = dict(rng.choice(dccs))
            if rng.random() < 0.5:
                dcc["x"] = _noise(rng)
            if rng.random() < 0.1:
                dcc = _names("Mu\u0308ller" if rng.random() < 0.5 else "Kim", "Ωmega")
            p = rng.choice([0.0, 0.0, 0.05, 0.3])
            item = b"\xa2" + cbor2.dumps("dcc") + _enc(dcc, rng, p)
            item += cbor2.dumps("account") + cbor2.dumps(f"a{i}")
            batch.append(item)
        body = b"\xa1" + cbor2.dumps("items") + bytes([0x80 + len(batch)]) + b"".join(batch)
        prefix_of = array.array("I", [rng.choice([0, 1, S.NO_PAYLOAD]) for _ in batch])
        got = check(impl, body, prefix_of)
        slow += got.slow
        fast += sum(1 for p in prefix_of if p != S.NO_PAYLOAD) - got.slow
    assert slow > 50 and fast > 100  # both paths were exercised


def test_canonical_check_edges():
    for raw, canonical in [
        (b"\xa1\x61a\xfb" + struct.pack(">d", 1.5), True),
        (b"\xa1\x61a\xf9\x3e\x00", False),
        (b"\xa1\x61a\xfa\x3f\xc0\x00\x00", False),
        (b"\xa1\x61a\xf9\x7e\x00", True),
        (b"\xa1\x61a\xf9\x7e\x01", False),
        (b"\xa1\x61a\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", False),
        (b"\xa1\x61a\xf9\xfc\x00", True),
        (b"\xa1\x61a\x18\x17", False),
        (b"\xa1\x61a\x18\x18", True),
        (b"\xa1\x61a\x39\x00\xff", False),
        (b"\xa1\x61a\xf8\x20", True),
        (b"\xbf\x61a\x01\xff", False),
        (b"\xb8\x01\x61a\x01", False),
    ]:
        assert S.is_canonical(raw) is canonical, raw.hex()
        assert (cbor2.dumps(cbor2.loads(raw)) == raw) is canonical, raw.hex()


def test_nfc_table_matches_this_python():
    """The generated table (C and Python) is this Python's Unicode data; if not, run
    scripts/gen_nfc_table.py."""
    import importlib.util
    import unicodedata
    from pathlib import Path

    from dccsign.native import _nfc_table

    script = Path(__file__).resolve().parents[1] / "scripts" / "gen_nfc_table.py"
    spec = importlib.util.spec_from_file_location("gen_nfc_table", script)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert _nfc_table.UNIDATA_VERSION == unicodedata.unidata_version
    assert list(_nfc_table.UNSTABLE) == gen.unstable_ranges()


def test_nfc_stable_texts_are_nfc():
    import unicodedata

    rng = random.Random(5)
    # Precomposed letters and their neighbours: where a wrong table would show.
    pool = [chr(c) for c in range(0xC0, 0x2000) if S.nfc_stable(chr(c))]
    pool += [chr(c) for c in range(0xAC00, 0xAC40)] + [chr(c) for c in range(0x1E00, 0x1F00)]
    pool = [c for c in pool if S.nfc_stable(c)]
    for _ in range(20000):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 6)))
        assert unicodedata.is_normalized("NFC", text), ascii(text)
    assert not S.nfc_stable("e\u0301") and not S.nfc_stable("\u1100\u1161")
