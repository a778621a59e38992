"""What a nonce pool entry costs to make, against a plain ES256 signature and ``openssl speed``.

Issue 14 (item 9) asks that refilling one entry of keyd's nonce pool cost clearly less than
a signature, and that the default pool carry a 10-second burst at the target rate. This
measures both sides in one run:

* **Instruction counts** (``valgrind --tool=callgrind``, repeatable on a loaded machine): one
  callgrind run per case, collecting only inside one C function (``--toggle-collect``), divided
  by the number of entries or signatures:

  - ``refill``: ``dcc_pool_refill`` filling ``--entries`` entries (chunks of 64);
  - ``background``: the pool's own refill thread (``refill_main``) filling the same number;
  - ``sign_plain``: ``dcc_sign_tbs``, the product's ordinary ES256 signature (SHA-256 of the
    Sig_structure, ``EVP_PKEY_sign``, DER to ``r || s``, low S), with a key that has no pool;
  - ``evp_pkey_sign``: only the ``EVP_PKEY_sign`` inside it (OpenSSL's ECDSA sign on a digest);
  - ``pool_sign``: ``dcc_pool_sign``, the online part of a pooled signature;
  - ``ec_mul_named`` / ``ec_mul_generic``: ``EC_POINT_mul`` of the generator by a secret
    scalar (called as the refill calls it, here through ctypes: callgrind sees libffi's
    ``ffi_call``, so the count is the difference between runs of 2N and N calls) on the named
    P-256 group, and on the same curve built from its parameters, which OpenSSL gives its
    generic Montgomery-ladder method: the named group must be the cheaper one, or the refill
    is not getting the precomputed generator table (nistz256 on x86_64);
  - ``openssl_speed``: ``openssl speed -seconds 1 ecdsap256`` itself, collecting inside
    ``EVP_PKEY_sign`` and divided by the signatures it reports (``-mr``).

* **Paired CPU time** (same process, one thread, ``--rounds``): refills of 256 entries into
  an emptied pool alternate with signing 256 payloads with a key without a pool, each timed
  by the thread's CPU clock (``time.thread_time``: less disturbed by other load than the wall
  clock), ``--entries`` of each per round; then ``openssl speed -seconds 1 ecdsap256`` (one
  process, which by default also divides by its CPU time) -- per round the ratios refill per
  entry / plain signature and / openssl's signature. Absolute times drift ±30 % on the
  shared VMs; read the ratios.

* **Sizing**: ``openssl speed -seconds 1 -multi 2 ecdsap256`` once (the bar: that, or twice
  the single-process rate above if higher, as on a loaded machine); the entries a 10-second
  burst needs at 0.75x and 1.0x the bar if every signature goes through one key; how many
  seconds the default pool (``DEFAULT_NONCE_POOL``) carries at each; how long one idle core
  takes to fill it at the measured cost; its memory.

Usage::

    .venv/bin/python bench/pool_refill.py    # writes bench/results/pool_refill-DATE.json
    .venv/bin/python bench/pool_refill.py --no-callgrind --rounds 9
    .venv/bin/python bench/pool_refill.py --compare-python /path/to/other/.venv/bin/python

``--compare-python`` also counts ``refill`` with another checkout's interpreter (e.g. the code
before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchsetup import save_result

HERE = Path(__file__).resolve().parent
KID = bytes.fromhex("a1b2c3d4e5f60718")
#: callgrind cases: the function collected, and what the count is divided by.
CASES = {
    "refill": "dcc_pool_refill",
    "background": "refill_main",
    "sign_plain": "dcc_sign_tbs",
    "evp_pkey_sign": "EVP_PKEY_sign",
    "pool_sign": "dcc_pool_sign",
    "ec_mul_named": "ffi_call",
    "ec_mul_generic": "ffi_call",
}
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.M)
_SPEED_SIGN = re.compile(r"^\+R5:(\d+):256:([\d.]+)", re.M)  # openssl speed -mr: count, s


def _key():
    """A fresh ES256 SigningKey of the native implementation, and that module."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from dccsign.native import _native

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _native.SigningKey.load_pem(pem, None), _native


def _ec_mul(n: int, generic: bool) -> None:
    """n fixed-base multiplications kG with libcrypto's EC_POINT_mul, called through ctypes."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("crypto"))
    vp = ctypes.c_void_p
    for name, args in {
        "EC_GROUP_new_by_curve_name": [ctypes.c_int],
        "BN_CTX_new": [],
        "BN_new": [],
        "EC_GROUP_get_curve": [vp] * 5,
        "EC_GROUP_new_curve_GFp": [vp] * 4,
        "EC_GROUP_set_generator": [vp] * 4,
        "EC_GROUP_get0_generator": [vp],
        "EC_GROUP_get0_order": [vp],
        "BN_value_one": [],
        "BN_rand_range": [vp, vp],
        "BN_set_flags": [vp, ctypes.c_int],
        "EC_POINT_new": [vp],
        "EC_POINT_mul": [vp] * 6,
    }.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None if name == "BN_set_flags" else vp
    named = lib.EC_GROUP_new_by_curve_name(415)  # NID_X9_62_prime256v1
    ctx = lib.BN_CTX_new()
    group = named
    if generic:
        p, a, b = lib.BN_new(), lib.BN_new(), lib.BN_new()
        lib.EC_GROUP_get_curve(named, p, a, b, ctx)
        group = lib.EC_GROUP_new_curve_GFp(p, a, b, ctx)
        lib.EC_GROUP_set_generator(
            group,
            lib.EC_GROUP_get0_generator(named),
            lib.EC_GROUP_get0_order(named),
            lib.BN_value_one(),
        )
    k = lib.BN_new()
    lib.BN_rand_range(k, lib.EC_GROUP_get0_order(named))
    lib.BN_set_flags(k, 0x04)  # BN_FLG_CONSTTIME, as for the refill's nonces
    point = lib.EC_POINT_new(group)
    for _ in range(n):
        if not lib.EC_POINT_mul(group, point, k, None, None, ctx):
            raise SystemExit("EC_POINT_mul failed")


def child(case: str, n: int) -> None:
    """One callgrind case (run under valgrind by :func:`callgrind`): do its work once."""
    if case.startswith("ec_mul_"):
        _ec_mul(n, generic=case == "ec_mul_generic")
        return
    key, native = _key()
    protected = native.protected_header(-7, KID)
    payloads = [b"payload %d" % i for i in range(n)]
    if case == "refill":
        key.enable_nonce_pool(n)
        done = key.refill_nonce_pool(n)
    elif case == "background":
        key.enable_nonce_pool(n, background=True)
        while key.nonce_pool_info().level < n:
            time.sleep(0.01)
        done = key.nonce_pool_info().refilled
        key.close_nonce_pool()
    elif case in ("sign_plain", "evp_pkey_sign"):
        done = len(key.sign(protected, payloads))
    elif case == "pool_sign":
        key.enable_nonce_pool(n)
        key.refill_nonce_pool(n)
        done = len(key.sign(protected, payloads))
        if key.nonce_pool_info().misses:
            raise SystemExit("pool_sign: the pool ran dry")
    else:
        raise SystemExit(f"unknown case {case}")
    if done != n:
        raise SystemExit(f"{case}: {done} of {n}")


def _valgrind(cmd: list[str], function: str) -> tuple[int, subprocess.CompletedProcess]:
    """Instructions executed inside *function* (and what it calls) while *cmd* runs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                f"--toggle-collect={function}",
                *cmd,
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise SystemExit(f"callgrind failed on {cmd}:\n{run.stderr[-2000:]}")
        match = _TOTALS.search(out.read_text(errors="replace"))
        if match is None:
            raise SystemExit(f"no totals in the callgrind output of {cmd}")
        counted = int(match.group(1))
        if counted == 0:
            raise SystemExit(f"callgrind counted nothing in {function} (not called, or inlined?)")
        return counted, run


def callgrind(n: int, n_sign: int, python: str = sys.executable) -> dict:
    """Instructions per entry / per signature for each case."""
    out = {}
    for case, function in CASES.items():
        count = n if case in ("refill", "background") else n_sign
        cmd = [python, __file__, "--_child", case]
        if function == "ffi_call":  # every ctypes call counts: keep only the extra N calls
            total = _valgrind([*cmd, str(2 * count)], function)[0]
            total -= _valgrind([*cmd, str(count)], function)[0]
        else:
            total = _valgrind([*cmd, str(count)], function)[0]
        out[case] = round(total / count)
        print(f"  callgrind {case:<14} {out[case]:>9,} instructions each", flush=True)
    openssl = shutil.which("openssl")
    if openssl:
        total, run = _valgrind(
            [openssl, "speed", "-seconds", "1", "-mr", "ecdsap256"], "EVP_PKEY_sign"
        )
        match = _SPEED_SIGN.search(run.stdout + run.stderr)
        if match is not None:
            out["openssl_speed"] = round(total / int(match.group(1)))
            print(
                f"  callgrind {'openssl_speed':<14} {out['openssl_speed']:>9,} instructions "
                f"each ({match.group(1)} signatures)",
                flush=True,
            )
    return out


def paired(n: int, rounds: int) -> list[dict]:
    """Same process, one thread: refill n entries vs sign n payloads without a pool vs
    ``openssl speed`` (one process), alternating; µs per entry / signature, and ratios."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from dccsign.bench.compare import openssl_sign_rate

    openssl = shutil.which("openssl")
    pooled, native = _key()
    plain, _ = _key()
    pooled.enable_nonce_pool(n)
    protected = native.protected_header(-7, KID)
    payloads = [b"payload %d" % i for i in range(n)]
    # The refilled entries are checked before anything is timed: spent on n signatures that
    # must verify, with n distinct r.
    pooled.refill_nonce_pool(n)
    sigs = pooled.sign(protected, payloads)
    public = serialization.load_der_public_key(pooled.public_key_der())
    for p, s in zip(payloads, sigs, strict=True):
        public.verify(
            encode_dss_signature(int.from_bytes(s[:32], "big"), int.from_bytes(s[32:], "big")),
            native.sig_structure(protected, p),
            ec.ECDSA(hashes.SHA256()),
        )
    if len({s[:32] for s in sigs}) != n or pooled.nonce_pool_info().misses:
        raise SystemExit("pooled signatures repeated an r or missed the pool")
    rows = []
    block = 256  # refill and sign alternate in blocks this size: paired at a fine grain
    for r in range(rounds):
        spent = {"refill": 0.0, "sign": 0.0}
        for b in range(max(1, n // block)):
            for step in ("refill", "sign") if (r + b) % 2 == 0 else ("sign", "refill"):
                pooled.clear_nonce_pool()  # (not timed) room for a block
                t = time.thread_time()
                if step == "refill":
                    if pooled.refill_nonce_pool(block) != block:
                        raise SystemExit("a refill fell short")
                else:
                    plain.sign(protected, payloads[:block])
                spent[step] += time.thread_time() - t
        count = max(1, n // block) * block
        row = {"refill_us": spent["refill"] / count * 1e6, "sign_us": spent["sign"] / count * 1e6}
        if openssl:  # openssl speed counts its own CPU time too (unless -elapsed)
            row["openssl_us"] = 1e6 / openssl_sign_rate(openssl, 1)
        row["refill/sign"] = row["refill_us"] / row["sign_us"]
        if "openssl_us" in row:
            row["refill/openssl"] = row["refill_us"] / row["openssl_us"]
        rows.append({k: round(v, 3) for k, v in row.items()})
        print(f"  round {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()), flush=True)
    pooled.close_nonce_pool()
    return rows


def sizing(refill_us: float, openssl_us: float | None, seconds: float = 10.0) -> dict:
    """The sizing rule applied to this run: entries = rate through one key x seconds.

    The bar is ``openssl speed -multi 2`` of this run, or twice the single-process rate of
    the paired rounds (CPU time) if that is higher: on a loaded machine ``-multi 2`` gets
    less than two cores and would understate what a quiet one needs.
    """
    from dccsign.bench.compare import openssl_sign_rate
    from dccsign.keyd.service import DEFAULT_NONCE_POOL

    openssl = shutil.which("openssl")
    multi = openssl_sign_rate(openssl, 2) if openssl else None
    from_cpu = round(2e6 / openssl_us) if openssl_us else None
    bar = max((r for r in (multi, from_cpu) if r), default=None)
    out: dict = {
        "default_pool": DEFAULT_NONCE_POOL,
        "default_pool_mib": DEFAULT_NONCE_POOL * 64 / 2**20,
        "fill_s_one_core": round(DEFAULT_NONCE_POOL * refill_us / 1e6, 1),
        "burst_s": seconds,
        "openssl_2p": multi,
        "openssl_2x1p_cpu": from_cpu,
        "bar": bar,
    }
    if bar:
        for share in (0.75, 1.0):
            rate = share * bar
            out[f"entries_for_{seconds:g}s_at_{share}x"] = round(rate * seconds)
            out[f"default_covers_s_at_{share}x"] = round(DEFAULT_NONCE_POOL / rate, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=4096, help="entries per refill measured")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument(
        "--compare-python",
        metavar="PYTHON",
        help="also count `refill` with this interpreter (another checkout)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="default: bench/results/pool_refill-YYYY-MM-DD.json",
    )
    parser.add_argument("--_child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child[0], int(args._child[1]))
        return
    os.chdir(HERE.parent)
    doc: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "entries": args.entries}
    if not args.no_callgrind:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind not found (or run with --no-callgrind)")
        print("instruction counts (callgrind):", flush=True)
        counts = callgrind(min(args.entries, 2048), 512)
        counts["refill/sign_plain"] = round(counts["refill"] / counts["sign_plain"], 3)
        counts["background/sign_plain"] = round(counts["background"] / counts["sign_plain"], 3)
        counts["ec_mul_named/generic"] = round(counts["ec_mul_named"] / counts["ec_mul_generic"], 3)
        if "openssl_speed" in counts:
            counts["refill/openssl_speed"] = round(counts["refill"] / counts["openssl_speed"], 3)
        if args.compare_python:
            total, _ = _valgrind(
                [args.compare_python, __file__, "--_child", "refill", "2048"], "dcc_pool_refill"
            )
            counts["compare_refill"] = round(total / 2048)
            counts["refill/compare_refill"] = round(counts["refill"] / counts["compare_refill"], 3)
            print(
                f"  callgrind refill with {args.compare_python}: {counts['compare_refill']:,}",
                flush=True,
            )
        doc["callgrind"] = counts
    print(f"paired CPU time ({args.entries:,} entries and signatures per round):", flush=True)
    rows = paired(args.entries, args.rounds)
    doc["paired"] = rows
    doc["paired_median"] = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    doc["sizing"] = sizing(
        doc["paired_median"]["refill_us"], doc["paired_median"].get("openssl_us")
    )
    print("medians:", json.dumps(doc["paired_median"]))
    print("sizing:", json.dumps(doc["sizing"]))
    print(f"wrote {save_result(doc, 'pool_refill', args.json, indent=2)}")


if __name__ == "__main__":
    main()
