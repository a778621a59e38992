"""Is the naive baseline of ``dccsign bench compare`` really what a user would get?

    python bench/naive_check.py [--seconds N] [--rounds R]

Times, interleaved on the same DCCs and the same key, (a) the naive row exactly as
``dccsign bench compare`` measures it (bench/naive.py driven by dccsign.bench.compare.Naive)
and (b) the plain loop below, written the obvious way from the library docs with no help from
dccsign. The baseline is fair when (a) / (b) stays within 15% of 1 (exit 1 otherwise).
Both outputs are decoded and verified first.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import zlib
from pathlib import Path

import base45
import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dccsign.bench.compare import Naive, check_hc1, load_naive

TOLERANCE = 0.15


def sign_hc1(key, kid, iss, iat, exp, dcc):
    """One DCC to an HC1 string, written the obvious way."""
    header = cbor2.dumps({1: -7, 4: kid})  # alg ES256, kid
    claims = cbor2.dumps({1: iss, 4: exp, 6: iat, -260: {1: dcc}})
    tbs = cbor2.dumps(["Signature1", header, b"", claims])
    r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    cose = cbor2.CBORTag(18, [header, {}, claims, r.to_bytes(32, "big") + s.to_bytes(32, "big")])
    return "HC1:" + base45.b45encode(zlib.compress(cbor2.dumps(cose), 9)).decode()


def hand_written_rate(key, kid, iss, iat, exp, dccs, seconds):
    """Certificates per second of a plain loop over *dccs* for about *seconds*."""
    count = 0
    start = time.perf_counter()
    for dcc in itertools.cycle(dccs):
        sign_hc1(key, kid, iss, iat, exp, dcc)
        count += 1
        if count % 64 == 0 and time.perf_counter() - start >= seconds:
            break
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 2)[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per sample (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args(argv)

    naive = Naive(load_naive(Path(__file__).with_name("naive.py")))
    s = naive.signer
    dccs = naive.dccs  # the same pool of DCCs
    hc1 = sign_hc1(s.private_key, s.kid, s.iss, naive.iat, naive.exp, dccs[0])
    check_hc1(hc1, s.dsc, dccs[0], "hand-written loop")
    check_hc1(naive.one(dccs[0]), s.dsc, dccs[0], "bench/naive.py")
    print(
        f"{args.rounds} rounds, {args.seconds:g} s per sample, {len(dccs)} DCCs, both "
        "outputs verified",
        flush=True,
    )

    ratios = []
    for r in range(args.rounds):
        rates = {}
        for name in ("naive", "hand") if r % 2 == 0 else ("hand", "naive"):
            if name == "naive":
                rates[name] = naive.rate(args.seconds)
            else:
                rates[name] = hand_written_rate(
                    s.private_key, s.kid, s.iss, naive.iat, naive.exp, dccs, args.seconds
                )
        ratios.append(rates["naive"] / rates["hand"])
        print(
            f"  round {r + 1}: bench/naive.py {rates['naive']:,.0f} certs/s, hand-written "
            f"{rates['hand']:,.0f} certs/s, ratio {ratios[-1]:.3f}",
            flush=True,
        )
    median = statistics.median(ratios)
    ok = abs(median - 1.0) <= TOLERANCE
    print(
        f"bench/naive.py / hand-written: median {median:.3f} (min {min(ratios):.3f}, max "
        f"{max(ratios):.3f}); {'PASS' if ok else 'FAIL'}: within {TOLERANCE:.0%} of 1"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
