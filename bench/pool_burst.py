"""Signing with a full nonce pool vs without, against ``openssl speed -multi 2``, same run.

Issue 6 asks a burst with a full pool to beat what OpenSSL can sign on both cores. This
measures the signing side of that claim, where the pool acts: ES256 signatures of real CWT
payloads, each burst exactly one pool's worth (so that a "full pool" case never runs dry):

* ``openssl_2p``: ``openssl speed -seconds 1 -multi 2 ecdsap256``, signatures/s (the bar);
* ``in_process_pool`` / ``in_process_plain``: ``SigningKey.sign`` on two threads at once in
  this process, with a full pool and without one;
* ``in_process_nopool``: the same with a key that has no pool at all, the rate before issue 6
  (``in_process_plain`` is a pool that is empty: its misses must cost nothing);
* ``keyd_pool`` / ``keyd_plain``: through a private keyd on two connections (its payload
  checks, audit records and one fsync per batch included), started with ``--nonce-pool N``
  and with ``--nonce-pool 0``. Before each pooled burst the script waits until keyd reports
  the pool full (DESCRIBE), and times only the burst;
* ``keyd_dry``: a keyd whose pool (1 % of the burst) runs dry at once: the burst is signed
  the ordinary way while the refill thread tries to keep up, against ``keyd_plain``.

The pooled cases also report their pool misses per burst (``in_process_pool_misses``,
``keyd_pool_misses``): signatures made the ordinary way because the pool was empty. A full
pool the size of the burst must show 0.

Every signature of every case is verified (``cryptography``) before its rate counts, and the
r values of each pooled burst must all differ. The end-to-end burst (engine, TLS, load
generator) is ``dccsign bench load --profile burst``; see bench/README.md.

Usage::

    .venv/bin/python bench/pool_burst.py [--entries 100000] [--batch 250] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from benchsetup import timed_threads, vaccination_batch
from dccsign import native
from dccsign.bench.compare import openssl_sign_rate
from dccsign.keyd.supervisor import PrivateKeyd


def burst_two_threads(sign_batch, batches: list[list[bytes]]) -> tuple[float, list[bytes]]:
    """Sign every batch, the two threads taking them in turn; (signatures/s, signatures in
    batch order)."""
    out: list[list[bytes] | None] = [None] * len(batches)

    def work(first: int) -> None:
        for i in range(first, len(batches), 2):
            out[i] = sign_batch(first, batches[i])

    seconds = timed_threads(work, 2)
    sigs = [s for batch in out for s in (batch or [])]
    return len(sigs) / seconds, sigs


def check(public, protected: bytes, batches, sigs, *, pooled: bool) -> None:
    payloads = [p for b in batches for p in b]
    if len(sigs) != len(payloads) or not all(isinstance(s, bytes) for s in sigs):
        raise SystemExit(f"a burst returned {len(sigs)} results for {len(payloads)} payloads")
    for payload, sig in zip(payloads, sigs, strict=True):
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        public.verify(
            encode_dss_signature(r, s),
            native.sig_structure(protected, payload),
            ec.ECDSA(hashes.SHA256()),
        )
    if pooled and len({s[:32] for s in sigs}) != len(sigs):
        raise SystemExit("a pooled burst repeated an r")


def wait_pool_full(client, kid: bytes, timeout: float = 600) -> float:
    """Seconds until keyd reports the pool of *kid* full."""
    start = time.monotonic()
    while True:
        pool = next(k.pool for k in client.describe() if k.kid == kid)
        if pool is not None and pool.level >= pool.capacity:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise SystemExit(f"the pool did not fill in {timeout:.0f} s: {pool}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="pool size = burst size")
    parser.add_argument("--batch", type=int, default=250, help="payloads per sign call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument(
        "--only",
        metavar="CASE,...",
        help="run these cases only (e.g. keyd_plain,keyd_dry for more rounds of one pair)",
    )
    args = parser.parse_args()
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("openssl not found on PATH")

    with tempfile.TemporaryDirectory() as tmp:
        signing = vaccination_batch(Path(tmp) / "ks", args.batch)
        store, entry, local = signing.store, signing.entry, signing.key
        protected = signing.protected
        public = x509.load_der_x509_certificate(entry.dsc.der).public_key()
        batches = [signing.payloads] * max(1, args.entries // args.batch)
        n = len(batches) * args.batch
        local.enable_nonce_pool(n)
        bare = signing.load_key()  # no pool at all: the rate before issue 6
        rounds = []
        with (
            PrivateKeyd(store.directory, nonce_pool=n, audit_dir=Path(tmp) / "a1") as pooled,
            PrivateKeyd(store.directory, nonce_pool=0, audit_dir=Path(tmp) / "a2") as plain,
            PrivateKeyd(
                store.directory, nonce_pool=max(1, n // 100), audit_dir=Path(tmp) / "a3"
            ) as dry,
        ):
            pooled_clients = [pooled.client(), pooled.client()]
            plain_clients = [plain.client(), plain.client()]
            dry_clients = [dry.client(), dry.client()]

            def through(clients):
                return lambda i, batch: clients[i].sign(
                    entry.kid, batch, client="bench", account="bench"
                )

            misses: dict[str, int] = {}  # pool misses of the last burst of each pooled case

            def in_process_pool():
                while local.refill_nonce_pool(1 << 20):  # full, off the clock
                    pass
                before = local.nonce_pool_info().misses
                out = burst_two_threads(lambda i, b: local.sign(protected, b), batches)
                misses["in_process_pool"] = local.nonce_pool_info().misses - before
                return out

            def in_process_plain():
                local.clear_nonce_pool()  # empty: every signature the ordinary way
                return burst_two_threads(lambda i, b: local.sign(protected, b), batches)

            def keyd_misses() -> int:
                return next(
                    k.pool for k in pooled_clients[0].describe() if k.kid == entry.kid
                ).misses

            def keyd_pool():
                wait_pool_full(pooled_clients[0], entry.kid)
                before = keyd_misses()
                out = burst_two_threads(through(pooled_clients), batches)
                misses["keyd_pool"] = keyd_misses() - before
                return out

            cases = {
                "openssl_2p": None,
                "in_process_pool": in_process_pool,
                "in_process_plain": in_process_plain,
                "in_process_nopool": lambda: burst_two_threads(
                    lambda i, b: bare.sign(protected, b), batches
                ),
                "keyd_pool": keyd_pool,
                "keyd_plain": lambda: burst_two_threads(through(plain_clients), batches),
                "keyd_dry": lambda: burst_two_threads(through(dry_clients), batches),
            }
            if args.only:
                wanted = args.only.split(",")
                unknown = sorted(set(wanted) - set(cases))
                if unknown:
                    raise SystemExit(f"unknown cases {unknown}; known: {', '.join(cases)}")
                cases = {name: cases[name] for name in wanted}
            for r in range(args.rounds):
                order = list(cases) if r % 2 == 0 else list(reversed(cases))
                row: dict[str, float] = {}
                for name in order:
                    if name == "openssl_2p":
                        row[name] = openssl_sign_rate(openssl, 2)
                        continue
                    rate, sigs = cases[name]()
                    check(public, protected, batches, sigs, pooled=name.endswith("_pool"))
                    row[name] = round(rate, 1)
                    if name in misses:  # a full pool of the burst's size: must be 0
                        row[f"{name}_misses"] = misses.pop(name)
                for name, base in (
                    ("in_process_pool", "openssl_2p"),
                    ("keyd_pool", "openssl_2p"),
                    ("keyd_plain", "openssl_2p"),
                    ("keyd_pool", "keyd_plain"),
                    ("in_process_plain", "in_process_nopool"),
                    ("keyd_dry", "keyd_plain"),
                ):
                    if name in row and base in row:
                        row[f"{name}/{base}"] = round(row[name] / row[base], 3)
                rounds.append(row)
                print(f"round {r}: " + ", ".join(f"{k} {v:,}" for k, v in row.items()), flush=True)
            pool_info = next(k.pool for k in pooled_clients[0].describe() if k.kid == entry.kid)
            for c in pooled_clients + plain_clients + dry_clients:
                c.close()
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"bursts of {n:,} signatures (batches of {args.batch}), medians of {len(rounds)} rounds:")
    for k, v in summary.items():
        unit = "" if "/" in k else " misses" if k.endswith("_misses") else " sign/s"
        print(f"  {k:<28} {v:>12,.3f}" if "/" in k else f"  {k:<28} {v:>12,.0f}{unit}")
    print(f"  keyd pool after the run: {pool_info}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "entries": n,
                    "batch": args.batch,
                    "rounds": rounds,
                    "median": summary,
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
