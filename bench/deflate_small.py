"""The small-input deflate encoder against libdeflate level 9: sizes, QR versions, cost per call.

Issue 14 item 6: HC1 deflates one ~350-450-byte COSE_Sign1 per certificate. libdeflate costs
7-9 us there at every level; native/src/smalldeflate.c replaces it below 4 KiB and must stay on
average within 1 % of libdeflate level 9 in size. This script measures, on real COSE_Sign1s
(varied DCCs from ``dccsign.testing.samples`` as CWT payloads, signed with an ephemeral
ES256 key and, for ``--ps256-share`` of them, an ephemeral PS256 key):

* ``sizes``: bytes per certificate of both, the mean / worst / best ratio ours : libdeflate,
  and the share of certificates whose QR code (``HC1:`` + base45, alphanumeric, ECC Q as
  ``dccsign.dcc.qr``) changes version, either way;
* ``paired_timing``: ns per call from Python, both compressors alternated over the same inputs
  in the same process (``--rounds`` rounds; the median of each and the median of the per-round
  ratios). Includes the Python call overhead, which ``empty_call_ns`` estimates;
* ``callgrind``: instructions per call inside ``dcc_small_deflate`` and inside
  ``dcc_deflate_libdeflate`` (valgrind's callgrind, ``--toggle-collect``), as the slope between
  a short and a long run, so one-time set-up (first-use allocation) is left out. Instruction
  counts are repeatable on a loaded machine; timings are not. Skipped without valgrind.

Usage::

    .venv/bin/python bench/deflate_small.py [--count 10000] [--rounds 7] [--json FILE]

Writes bench/results/deflate_small-<date>.json unless ``--json`` names another file.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2
import segno

from benchsetup import save_result
from dccsign import native
from dccsign.bench.core import ephemeral_key
from dccsign.dcc.issuer import claims_prefix
from dccsign.testing.samples import varied_samples

HERE = Path(__file__).resolve().parent


def corpus(count: int, ps256_share: float, seed: int) -> list[bytes]:
    """*count* COSE_Sign1s of distinct DCCs, as hc1_sign would deflate them."""
    nat = native.implementation("native")
    es = ephemeral_key("native")
    now = int(time.time())
    prefix = claims_prefix("NL", now, now + 365 * 86400)
    payloads = [prefix + cbor2.dumps(d) for d in varied_samples(count, seed=seed)]
    n_ps = int(count * ps256_share)
    out = []
    if n_ps:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ps = nat.SigningKey.load_pem(pem, None)
        prot = nat.protected_header(ps.alg, b"\x01" * 8)
        sigs = ps.sign(prot, payloads[:n_ps])
        out += [nat.sign1_encode(prot, p, s) for p, s in zip(payloads[:n_ps], sigs, strict=True)]
    rest = payloads[n_ps:]
    sigs = es.key.sign(es.protected, rest)
    out += [nat.sign1_encode(es.protected, p, s) for p, s in zip(rest, sigs, strict=True)]
    return out


_VERSION_BY_LEN: dict[int, int] = {}


def qr_version(hc1_len: int) -> int:
    """QR version of an ``HC1:`` text of this length (alphanumeric, ECC Q, as dccsign.dcc.qr)."""
    v = _VERSION_BY_LEN.get(hc1_len)
    if v is None:
        v = segno.make_qr("A" * hc1_len, error="q", mode="alphanumeric", boost_error=False).version
        _VERSION_BY_LEN[hc1_len] = v
    return v


def sizes(coses: list[bytes]) -> dict:
    nat = native.implementation("native")
    ours = [nat.small_deflate(c, 9) for c in coses]
    ref = [nat._libdeflate_compress(c, 9) for c in coses]
    ratios = [len(a) / len(b) for a, b in zip(ours, ref, strict=True)]
    up = down = 0
    for a, b in zip(ours, ref, strict=True):
        va = qr_version(4 + len(nat.b45encode(a)))
        vb = qr_version(4 + len(nat.b45encode(b)))
        up += va > vb
        down += va < vb
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    return {
        "certificates": len(coses),
        "cose_bytes_mean": round(statistics.fmean(map(len, coses)), 2),
        "ours_bytes_mean": round(statistics.fmean(map(len, ours)), 2),
        "libdeflate9_bytes_mean": round(statistics.fmean(map(len, ref)), 2),
        "ratio_mean": round(statistics.fmean(ratios), 5),
        "ratio_of_totals": round(sum(map(len, ours)) / sum(map(len, ref)), 5),
        "ratio_worst": round(ratios[worst], 5),
        "ratio_worst_bytes": [len(ours[worst]), len(ref[worst])],
        "ratio_best": round(min(ratios), 5),
        "smaller_share": round(sum(r < 1 for r in ratios) / len(ratios), 4),
        "equal_share": round(sum(r == 1 for r in ratios) / len(ratios), 4),
        "larger_share": round(sum(r > 1 for r in ratios) / len(ratios), 4),
        "qr_version_larger_share": round(up / len(coses), 5),
        "qr_version_smaller_share": round(down / len(coses), 5),
    }


def paired_timing(coses: list[bytes], rounds: int) -> dict:
    nat = native.implementation("native")
    ours_f, lib_f, empty_f = nat.small_deflate, nat._libdeflate_compress, nat.b45encode
    for c in coses[:200]:  # first use: per-thread scratch and compressor
        ours_f(c, 9)
        lib_f(c, 9)
    ours, lib, empty, ratios = [], [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for c in coses:
            ours_f(c, 9)
        t1 = time.perf_counter_ns()
        for c in coses:
            lib_f(c, 9)
        t2 = time.perf_counter_ns()
        for _c in coses:
            empty_f(b"")
        t3 = time.perf_counter_ns()
        n = len(coses)
        ours.append((t1 - t0) / n)
        lib.append((t2 - t1) / n)
        empty.append((t3 - t2) / n)
        ratios.append((t1 - t0) / (t2 - t1))
    return {
        "rounds": rounds,
        "ours_ns_per_call": round(statistics.median(ours)),
        "libdeflate9_ns_per_call": round(statistics.median(lib)),
        "empty_call_ns": round(statistics.median(empty)),
        "ratio_ours_to_libdeflate9_median": round(statistics.median(ratios), 4),
    }


_CHILD = """
import pickle, sys
from dccsign.native import _native
coses = pickle.load(open(sys.argv[1], "rb"))
f = _native.small_deflate if sys.argv[2] == "ours" else _native._libdeflate_compress
for c in coses[: int(sys.argv[3])]:
    f(c, 9)
"""


def _callgrind_ir(pkl: str, which: str, count: int) -> int:
    func = "dcc_small_deflate" if which == "ours" else "dcc_deflate_libdeflate"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                f"--toggle-collect={func}",
                sys.executable,
                "-c",
                _CHILD,
                pkl,
                which,
                str(count),
            ],
            check=True,
            capture_output=True,
        )
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no totals in the callgrind output")


def callgrind(coses: list[bytes], short: int, long: int) -> dict | None:
    if shutil.which("valgrind") is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(coses[:long], f)
        pkl = f.name
    try:
        out: dict = {"calls_short": short, "calls_long": long}
        for which in ("ours", "libdeflate9"):
            a = _callgrind_ir(pkl, which, short)
            b = _callgrind_ir(pkl, which, long)
            out[f"{which}_instructions_per_call"] = round((b - a) / (long - short))
        out["ratio_ours_to_libdeflate9"] = round(
            out["ours_instructions_per_call"] / out["libdeflate9_instructions_per_call"], 4
        )
        return out
    finally:
        os.unlink(pkl)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--ps256-share", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--callgrind-calls", type=int, nargs=2, default=[200, 1200])
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    coses = corpus(args.count, args.ps256_share, args.seed)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "bench/deflate_small.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "inputs": f"varied_samples(seed={args.seed}) as CWT payloads in COSE_Sign1, "
        f"{args.ps256_share:.0%} PS256-2048, the rest ES256",
        "sizes": sizes(coses),
        "paired_timing": paired_timing(coses, args.rounds),
        "callgrind": callgrind(coses, *args.callgrind_calls),
    }
    print(json.dumps(result, indent=2))
    path = save_result(result, "deflate_small", args.json, indent=2)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
