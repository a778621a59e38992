"""The native DCC validator against the Python one on a million generated and mutated DCCs.

One command::

    .venv/bin/python bench/validator_diff.py                  # 1,000,000 items, ~5-10 min
    .venv/bin/python bench/validator_diff.py --items 20000    # a quick look

Each item is CBOR bytes made from a generated DCC (seeded, reproducible: ``--seed``), in one of
the categories below. All items of a chunk go through the native batch call
(``validate_dcc_batch``, or ``validate_cwt_batch`` for CWT payloads) in one buffer, and each
item through the oracle: the decoder of its mode (the engine's strict
``cborlimits.decode`` or keyd's ``loads_exact``) followed by ``dccsign.dcc.validate.validate``. A
disagreement is any difference in the type, the error class, or the issues (path, rule,
message), or a disagreement the native slow path counted itself. There must be none.

Categories: ``valid`` (canonical cbor2 encoding, strict), ``valid-encodings`` (the same DCCs
with random head widths, indefinite lengths, chunked text, float widths; strict or keyd),
``mutated`` (field deletions, type swaps, boundary lengths, bad dates and codes, unknown
fields, extra groups and entries, relabelled versions), ``cbor-oddities`` (tags, bignums,
undefined, simple values, byte-string, integer and duplicate keys spliced in), ``byte-flips``
and ``truncated`` (random damage to valid or mutated encodings), ``cwt`` (whole CWT payloads
in keyd's form).

Speed (``speed`` in the JSON): the per-item cost of valid DCCs through the native batch call
against the pure-Python twin (decode + validate), and against ``validate`` alone on objects
decoded beforehand (what the engine pays today), interleaved over ``--speed-rounds`` rounds in
this process; the ratios are what to quote (absolute times drift on shared machines).

The result goes to ``bench/results/validator_diff-<date>.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2

from dccsign import native
from dccsign.dcc.issuer import claims_prefix, nfc_names
from dccsign.dcc.uvci import make_uvci
from dccsign.dcc.validate import DOSE_MAX, DCCValidationError, validate
from dccsign.dcc.valuesets import ValueSets
from dccsign.dcc.verify import loads_exact
from dccsign.native import DCCDecodeError
from dccsign.protocol import cborlimits
from dccsign.testing.cborvariants import encode_float, head
from dccsign.testing.samples import FIELD_NAMES, NEAR_MISS, field_slots

TODAY = date(2025, 1, 15)
VERSIONS = ["1.0.0", "1.0.1", "1.1.0", "1.2.0", "1.2.1", "1.3.0", "1.3.1", "1.3.2", "1.3.3"]
ODD_VERSIONS = ["1.3.7", "1.0.4", "1.4.0", "1.03.0", "2.0.0", "", "1.3"]
VS = ValueSets.builtin()
CODES = {
    s: sorted(VS.codes(s))
    for s in (
        "disease-agent-targeted",
        "vaccine-prophylaxis",
        "vaccine-medicinal-product",
        "vaccine-mah-manf",
        "test-type",
        "test-result",
        "country-2-codes",
    )
}
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Free text as European certificates carry it (the speed section): Latin letters, some accents.
REAL_POOL = "abcdefghijklmnopqrstuvwxyz" * 3 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ -'" + "éèëçöüßøåñ"
TEXT_POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -'.çéøÅßŁЖ中😀"
    "\u0301\u0308\u212bΩ\u1161"  # combining marks, a singleton, a jamo: NFC changes them
)
KEYS = [*FIELD_NAMES, "x", "a b", "é", "zz" * 25]


# ---------------------------------------------------------------------------------------------
# Generation


def _text(rnd: random.Random, lo: int, hi: int, alphabet: str = TEXT_POOL) -> str:
    n = rnd.choice([rnd.randint(lo, hi), hi, lo])
    return "".join(rnd.choice(alphabet) for _ in range(n))


def _date(rnd: random.Random, lo: int = 1900, hi: int = 2099) -> date:
    return date(lo, 1, 1) + timedelta(days=rnd.randrange((date(hi, 12, 31) - date(lo, 1, 1)).days))


def _datetime(rnd: random.Random) -> str:
    d = _date(rnd, 2000, 2030).isoformat()
    frac = rnd.choice(["", ".5", ".123", ".123456789"])
    off = rnd.choice(["Z", "z", "+00:00", f"-{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}"])
    sep = rnd.choice("Tt")
    return (
        f"{d}{sep}{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:"
        f"{rnd.randint(0, 59):02d}{frac}{off}"
    )


def _uvci(rnd: random.Random, limit: int) -> str:
    checksum = rnd.random() < 0.5
    room = limit - 15 - (2 if checksum else 0)
    n = rnd.randint(1, 3)
    size = max(1, (room - (n - 1)) // n)
    parts = [_text(rnd, 1, size, UPPER + "0123456789") for _ in range(n)]
    return make_uvci(rnd.choice(UPPER) + rnd.choice(UPPER), *parts, checksum=checksum)


def valid_dcc(
    rnd: random.Random, ver: str | None = None, kind: str | None = None, pool: str = ""
) -> dict:
    """A valid DCC; pool: the free-text alphabet (default TEXT_POOL)."""
    pool = pool or TEXT_POOL
    ver = ver or rnd.choice(VERSIONS)
    kind = kind or rnd.choice("vtr")
    limit = 80 if ver >= "1.3.0" else 50
    entry: dict[str, Any] = {
        "tg": "840539006",
        "co": rnd.choice(CODES["country-2-codes"]),
        "is": _text(rnd, 1, limit, pool),
        "ci": _uvci(rnd, limit),
    }
    if kind == "v":
        top = 9 if ver < "1.3.0" else DOSE_MAX
        entry.update(
            vp=rnd.choice(CODES["vaccine-prophylaxis"]),
            mp=rnd.choice(CODES["vaccine-medicinal-product"]),
            ma=rnd.choice(CODES["vaccine-mah-manf"]),
            dn=rnd.randint(1, top),
            sd=rnd.randint(1, top),
            dt=_date(rnd, 2020, 2030).isoformat(),
        )
    elif kind == "t":
        entry.update(
            tt=_text(rnd, 1, limit, pool) if ver == "1.0.0" else rnd.choice(CODES["test-type"]),
            sc=_datetime(rnd),
            tr=rnd.choice(CODES["test-result"]),
        )
        for key in ("nm", "ma", "tc", "dr"):
            if key == "dr" and ver > "1.1.0":
                continue
            if rnd.random() < 0.5 or (key == "tc" and ver < "1.3.0"):
                entry[key] = _datetime(rnd) if key == "dr" else _text(rnd, 1, limit, pool)
    else:
        df = _date(rnd, 2020, 2030)
        entry.update(
            fr=_date(rnd, 2020, 2030).isoformat(),
            df=df.isoformat(),
            du=(df + timedelta(days=rnd.randint(0, 400))).isoformat(),
        )
    icao = UPPER + "<"
    nam: dict[str, str] = {"fnt": _text(rnd, 1, limit, icao)}
    if rnd.random() < 0.7:
        nam["gnt"] = _text(rnd, 0, limit, icao)
    if ver >= "1.3.2" and rnd.random() < 0.1:
        nam = {"gnt": _text(rnd, 1, limit, icao)}
    for key in ("fn", "gn"):
        if rnd.random() < 0.7:
            nam[key] = _text(rnd, 0, limit, pool)
    dob_forms = [_date(rnd, 1900, 2024).isoformat()]
    if ver >= "1.1.0":
        dob_forms += [dob_forms[0][:4], dob_forms[0][:7]]
    if ver >= "1.3.0":
        dob_forms.append("")
    items = [("ver", ver), ("nam", nam), ("dob", rnd.choice(dob_forms)), (kind, [entry])]
    rnd.shuffle(items)
    return dict(items)


def mutated_dcc(rnd: random.Random) -> dict:
    dcc = valid_dcc(rnd)
    if rnd.random() < 0.3:
        dcc["ver"] = rnd.choice(VERSIONS + ODD_VERSIONS)
        if rnd.random() < 0.5:
            return dcc
    for _ in range(rnd.randint(1, 3)):
        action = rnd.choice(["ver", "replace", "replace", "delete", "add", "group", "entry"])
        slots = field_slots(dcc)
        if action == "ver":
            dcc["ver"] = rnd.choice(VERSIONS + ODD_VERSIONS)
        elif action == "replace" and slots:
            target, key = rnd.choice(slots)
            target[key] = rnd.choice(NEAR_MISS)
        elif action == "delete" and slots:
            target, key = rnd.choice(slots)
            del target[key]
        elif action == "add" and slots:
            target, _ = rnd.choice(slots)
            target[rnd.choice(KEYS)] = rnd.choice(NEAR_MISS)
        elif action == "group":
            other = rnd.choice("vtr")
            dcc[other] = valid_dcc(rnd, kind=other)[other]
        elif action == "entry":
            kind = next((k for k in "vtr" if isinstance(dcc.get(k), list)), None)
            if kind is not None:
                first = dcc[kind][0] if dcc[kind] else {}
                dcc[kind] = [*dcc[kind], dict(first) if isinstance(first, dict) else first]
    return dcc


def encode(obj: Any, rnd: random.Random | None = None) -> bytes:
    """CBOR with, given rnd, random head widths, indefinite lengths, chunked strings and float
    widths (all decode to the same object); anything else through cbor2."""
    if isinstance(obj, bool) or obj is None:
        return cbor2.dumps(obj)
    if isinstance(obj, int):
        if 0 <= obj < 2**64:
            return head(0, obj, rnd)
        if -(2**64) <= obj < 0:
            return head(1, -1 - obj, rnd)
        return cbor2.dumps(obj)
    if isinstance(obj, float):
        return encode_float(obj, rnd)
    if isinstance(obj, (str, bytes)):
        major = 3 if isinstance(obj, str) else 2
        if rnd is not None and obj and rnd.random() < 0.2:
            out, rest = bytes([major << 5 | 31]), obj
            while rest:
                cut = rnd.randint(1, len(rest))
                piece, rest = rest[:cut], rest[cut:]
                chunk = piece.encode("utf-8") if isinstance(piece, str) else piece
                out += head(major, len(chunk), rnd) + chunk
            return out + b"\xff"
        raw = obj.encode("utf-8") if isinstance(obj, str) else obj
        return head(major, len(raw), rnd) + raw
    indefinite = rnd is not None and rnd.random() < 0.2
    if isinstance(obj, list):
        body = b"".join(encode(x, rnd) for x in obj)
        return (b"\x9f" + body + b"\xff") if indefinite else head(4, len(obj), rnd) + body
    if isinstance(obj, dict):
        body = b"".join(encode(k, rnd) + encode(v, rnd) for k, v in obj.items())
        return (b"\xbf" + body + b"\xff") if indefinite else head(5, len(obj), rnd) + body
    return cbor2.dumps(obj)


ODDITIES: list[Any] = [
    cbor2.CBORTag(0, "2021-07-01T09:30:00Z"),
    cbor2.CBORTag(1, 1625131800),
    cbor2.CBORTag(2, b"\x02"),
    cbor2.CBORTag(3, b"\x01"),
    cbor2.CBORTag(55799, 2),
    cbor2.CBORTag(55799, "NL"),
    cbor2.CBORTag(258, [1, 2]),
    cbor2.CBORTag(4, [0, 1]),
    cbor2.CBORTag(1004, "1979-04-01"),
    cbor2.CBORTag(100, 3000),
    cbor2.CBORTag(99999, "x"),
    cbor2.CBORTag(28, [1]),
    cbor2.undefined,
    cbor2.CBORSimpleValue(16),
    cbor2.CBORSimpleValue(255),
    2**70,
    -(2**70),
    1.5,
    float("inf"),
    b"840539006",
]
ODD_KEYS: list[Any] = [1, -260, 0, 1.0, True, None, b"ver", b"x", (1,)]


def odd_dcc(rnd: random.Random) -> tuple[bytes, bool]:
    """A DCC with a CBOR oddity spliced in: (bytes, strict)."""
    dcc = valid_dcc(rnd) if rnd.random() < 0.7 else mutated_dcc(rnd)
    slots = field_slots(dcc)
    target, key = rnd.choice(slots)
    what = rnd.random()
    if what < 0.5:
        target[key] = rnd.choice(ODDITIES)
    elif what < 0.8:
        target[rnd.choice(ODD_KEYS)] = rnd.choice([*NEAR_MISS[:10], *ODDITIES[:3]])
    data = cbor2.dumps(dcc) if what < 0.8 else encode(dcc, rnd)
    if what >= 0.8:  # a duplicate key: one more entry in the top-level map
        if 0xA1 <= data[0] <= 0xB6:
            extra_key = rnd.choice(["ver", "dob", "nam", "x"])
            data = (
                bytes([data[0] + 1])
                + data[1:]
                + encode(extra_key)
                + encode(rnd.choice(["1.3.0", "1979", {}, 1, "1.0.0"]))
            )
        elif data[0] == 0xBF:
            data = data[:-1] + encode("ver") + encode("1.2.1") + b"\xff"
    return data, rnd.random() < 0.5


def damaged(rnd: random.Random, cut: bool) -> bytes:
    dcc = valid_dcc(rnd) if rnd.random() < 0.5 else mutated_dcc(rnd)
    data = bytearray(encode(dcc, rnd if rnd.random() < 0.5 else None))
    if cut:
        return bytes(data[: rnd.randrange(len(data))])
    for _ in range(rnd.randint(1, 3)):
        i = rnd.randrange(len(data))
        op = rnd.random()
        if op < 0.5:
            data[i] = rnd.randrange(256)
        elif op < 0.8:
            data[i] ^= 1 << rnd.randrange(8)
        else:
            data[i:i] = bytes([rnd.choice([0xC0, 0xC2, 0xD9, 0xF7, 0xFF, 0x5F, 0x7F, 0xBF])])
    return bytes(data)


CATEGORIES = {  # share of the items
    "valid": 0.25,
    "valid-encodings": 0.15,
    "mutated": 0.25,
    "cbor-oddities": 0.10,
    "byte-flips": 0.10,
    "truncated": 0.05,
    "cwt": 0.10,
}


def make_item(category: str, rnd: random.Random) -> tuple[bytes, bool, bool]:
    """(bytes, strict, nfc_names) for one item of a category (cwt items: the payload, keyd
    form). Strict items are checked half the time in the engine's view (names NFC first)."""
    data, strict = _make_item(category, rnd)
    return data, strict, strict and rnd.random() < 0.5


def _make_item(category: str, rnd: random.Random) -> tuple[bytes, bool]:
    if category == "valid":
        return cbor2.dumps(valid_dcc(rnd)), True
    if category == "valid-encodings":
        return encode(valid_dcc(rnd), rnd), rnd.random() < 0.5
    if category == "mutated":
        return encode(mutated_dcc(rnd), rnd if rnd.random() < 0.5 else None), rnd.random() < 0.5
    if category == "cbor-oddities":
        return odd_dcc(rnd)
    if category == "byte-flips":
        return damaged(rnd, cut=False), rnd.random() < 0.5
    if category == "truncated":
        return damaged(rnd, cut=True), rnd.random() < 0.5
    dcc = valid_dcc(rnd) if rnd.random() < 0.6 else mutated_dcc(rnd)
    prefix = claims_prefix("NL", 1_600_000_000, 1_700_000_000)
    return prefix + encode(dcc, rnd if rnd.random() < 0.5 else None), False


# ---------------------------------------------------------------------------------------------
# The oracle and the comparison


def oracle(data: bytes, strict: bool, nfc: bool, cwt: bool) -> tuple:
    try:
        if cwt:
            claims = loads_exact(data)
            hcert = claims.get(-260) if type(claims) is dict else None
            if type(hcert) is not dict or 1 not in hcert:
                return ("undecodable",)
            obj = hcert[1]
        elif strict:
            obj = cborlimits.decode(data, scan=cborlimits.scan, max_items=65536, max_depth=16)
        else:
            obj = loads_exact(data)
    except (cbor2.CBORError, ValueError):
        return ("undecodable",)
    if nfc and isinstance(obj, dict):
        obj = nfc_names(obj)
    try:
        return ("ok", validate(obj, today=TODAY))
    except DCCValidationError as exc:
        return ("invalid", tuple((i.path, i.rule, i.message) for i in exc.issues))


def shape(result: Any) -> tuple:
    if isinstance(result, DCCValidationError):
        return ("invalid", tuple((i.path, i.rule, i.message) for i in result.issues))
    if isinstance(result, DCCDecodeError):
        return ("undecodable",)
    return ("ok", result)


def run_chunk(impl: Any, rules: Any, items: list[tuple[bytes, bool, bool]], cwt: bool) -> list:
    if cwt:
        return impl.validate_cwt_batch(rules, [d for d, _, _ in items], TODAY)
    out: list[Any] = [None] * len(items)
    for strict, nfc in ((True, False), (True, True), (False, False)):
        idx = [i for i, (_, s, n) in enumerate(items) if s is strict and n is nfc]
        if not idx:
            continue
        buf = b"".join(items[i][0] for i in idx)
        offsets = [0]
        for i in idx:
            offsets.append(offsets[-1] + len(items[i][0]))
        results = impl.validate_dcc_batch(rules, buf, offsets, TODAY, strict=strict, nfc_names=nfc)
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out


def differential(impl: Any, n: int, seed: int, chunk: int, examples: int) -> dict:
    rnd = random.Random(seed)
    rules = impl.DccRules()
    stats0 = impl.dcc_validator_stats()
    cats = list(CATEGORIES)
    weights = [CATEGORIES[c] for c in cats]
    per: dict[str, dict[str, int]] = {
        c: {
            "items": 0,
            "ok": 0,
            "invalid": 0,
            "undecodable": 0,
            "disagreements": 0,
            "fast": 0,
            "punted": 0,
        }
        for c in cats
    }
    bad: list[dict] = []
    done = 0
    t0 = time.monotonic()
    while done < n:
        size = min(chunk, n - done)
        batch: dict[str, list[tuple[bytes, bool, bool]]] = {c: [] for c in cats}
        for c in rnd.choices(cats, weights, k=size):
            batch[c].append(make_item(c, rnd))
        for c, items in batch.items():
            if not items:
                continue
            before = impl.dcc_validator_stats()
            got = run_chunk(impl, rules, items, c == "cwt")
            after = impl.dcc_validator_stats()
            for k in ("fast", "punted"):
                per[c][k] += after[k] - before[k]
            for (data, strict, nfc), result in zip(items, got, strict=True):
                mine = shape(result)
                want = oracle(data, strict, nfc, c == "cwt")
                p = per[c]
                p["items"] += 1
                p[mine[0]] += 1
                if mine != want:
                    p["disagreements"] += 1
                    if len(bad) < examples:
                        bad.append(
                            {
                                "category": c,
                                "strict": strict,
                                "nfc_names": nfc,
                                "hex": data.hex(),
                                "native": repr(mine)[:500],
                                "python": repr(want)[:500],
                            }
                        )
        done += size
        if done % (chunk * 25) == 0 or done == n:
            rate = done / (time.monotonic() - t0)
            print(
                f"  {done:,} items, {sum(p['disagreements'] for p in per.values())} "
                f"disagreements ({rate:,.0f} items/s)",
                file=sys.stderr,
            )
    stats1 = impl.dcc_validator_stats()
    counters = {k: stats1[k] - stats0[k] for k in stats1}
    return {
        "per_category": per,
        "native_counters": counters,
        "examples": bad,
        "disagreements": sum(p["disagreements"] for p in per.values()) + counters["disagreements"],
    }


# ---------------------------------------------------------------------------------------------
# Speed


def speed(rounds: int, n: int, seed: int) -> dict:
    rnd = random.Random(seed + 1)
    dccs = [valid_dcc(rnd, pool=REAL_POOL) for _ in range(n)]
    blobs = [cbor2.dumps(d) for d in dccs]
    buf = b"".join(blobs)
    offsets = [0]
    for b in blobs:
        offsets.append(offsets[-1] + len(b))
    payloads = [claims_prefix("NL", 1_600_000_000, 1_700_000_000) + b for b in blobs]
    decoded = [loads_exact(b) for b in blobs]
    nat, py = native.implementation("native"), native.implementation("python")
    rn, rp = nat.DccRules(), py.DccRules()
    cases = {
        "native_batch": lambda: nat.validate_dcc_batch(rn, buf, offsets, TODAY),
        "native_batch_nfc": lambda: nat.validate_dcc_batch(rn, buf, offsets, TODAY, nfc_names=True),
        "native_cwt_batch": lambda: nat.validate_cwt_batch(rn, payloads, TODAY),
        "python_twin_batch": lambda: py.validate_dcc_batch(rp, buf, offsets, TODAY),
        "python_validate_only": lambda: [validate(d, today=TODAY) for d in decoded],
    }
    for f in cases.values():  # every case agrees before it is timed
        assert [r for r in f()] == [next(k for k in "vtr" if k in d) for d in dccs]
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(rounds):
        order = list(cases) if r % 2 == 0 else list(cases)[::-1]
        for name in order:
            t = time.perf_counter()
            cases[name]()
            samples[name].append((time.perf_counter() - t) / n * 1e6)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "items": n,
        "rounds": rounds,
        "us_per_item_median": med,
        "us_per_item_samples": samples,
        "ratio_python_twin_over_native": med["python_twin_batch"] / med["native_batch"],
        "ratio_validate_only_over_native": med["python_validate_only"] / med["native_batch"],
        "note": "wall clock in one process, cases interleaved; quote the ratios",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--chunk", type=int, default=2000)
    ap.add_argument("--examples", type=int, default=20, help="disagreements kept in the JSON")
    ap.add_argument("--speed-items", type=int, default=20000)
    ap.add_argument("--speed-rounds", type=int, default=7)
    ap.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).parent
        / "results"
        / f"validator_diff-{datetime.now(UTC):%Y-%m-%d}.json",
    )
    args = ap.parse_args()
    impl = native.implementation("native")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    print(f"differential: {args.items:,} items, seed {args.seed}", file=sys.stderr)
    diff = differential(impl, args.items, args.seed, args.chunk, args.examples)
    diff_s = time.monotonic() - t0
    print("speed ...", file=sys.stderr)
    spd = speed(args.speed_rounds, args.speed_items, args.seed)
    result = {
        "bench": "validator_diff",
        "started": started,
        "seconds": {"differential": round(diff_s, 1)},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "items": args.items,
        **diff,
        "speed": spd,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(
        json.dumps(
            {
                "items": args.items,
                "disagreements": result["disagreements"],
                "native_counters": diff["native_counters"],
                "speed_us": spd["us_per_item_median"],
                "ratio_twin": round(spd["ratio_python_twin_over_native"], 1),
                "ratio_validate_only": round(spd["ratio_validate_only_over_native"], 1),
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}", file=sys.stderr)
    return 0 if result["disagreements"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
