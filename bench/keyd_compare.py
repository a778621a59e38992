"""Signing through keyd vs signing in-process, measured in the same run.

The target of issue 3: through keyd with software keys, a batch benchmark reaches at least
85 % of the in-process native signing rate measured in the same run. Both sides sign the same
CWT payloads with the same ES256 key in batches; keyd also re-checks every payload and writes
its audit records (one fsync per batch) before it answers.

"In-process" is one ``SigningKey.sign`` batch call at a time (one thread), the rate the target
names; the same call on two threads at once is measured too (``in_process_2_threads``), and
``ratio_2_vs_2`` compares keyd on two connections with it: both sides on both cores.

Usage::

    .venv/bin/python bench/keyd_compare.py [--batch 250] [--seconds 3] [--rounds 3] [--json FILE]

It makes a throw-away development keystore in a temporary directory and starts a private keyd
on it (its audit log lands there too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchsetup import vaccination_batch
from dccsign.keyd_supervisor import PrivateKeyd


def _rate(fn, batch: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += batch
    return done / (time.perf_counter() - start)


def rate_two_threads(fns, batch: int, seconds: float) -> float:
    """Items/s with ``fns[i]`` (one batch of *batch* items) called on thread i, both at once."""
    counts = [0, 0]
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            fns[i]()
            counts[i] += batch

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def rate_two_connections(
    keyd: PrivateKeyd, kid: bytes, payloads: list[bytes], seconds: float
) -> float:
    """Signatures/s with two connections signing at once (keyd serves each on a thread)."""
    clients = [keyd.client(), keyd.client()]
    try:
        return rate_two_threads(
            [
                lambda c=c: c.sign(kid, payloads, client="bench", account="bench")
                for c in clients
            ],
            len(payloads),
            seconds,
        )
    finally:
        for c in clients:
            c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument("--validate-dcc", action="store_true", help="run keyd with --validate-dcc")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        signing = vaccination_batch(Path(tmp) / "ks", args.batch)
        store, entry, local = signing.store, signing.entry, signing.key
        protected, payloads = signing.protected, signing.payloads
        rounds = []
        with PrivateKeyd(store.directory, validate_dcc=args.validate_dcc) as keyd:
            client = keyd.client()

            def through():
                client.sign(entry.kid, payloads, client="bench", account="bench")

            for r in range(args.rounds):
                cases = {
                    "in_process": lambda: _rate(
                        lambda: local.sign(protected, payloads), len(payloads), args.seconds
                    ),
                    "in_process_2_threads": lambda: rate_two_threads(
                        [lambda: local.sign(protected, payloads)] * 2, len(payloads), args.seconds
                    ),
                    "keyd_1_connection": lambda: _rate(through, len(payloads), args.seconds),
                    "keyd_2_connections": lambda: rate_two_connections(
                        keyd, entry.kid, payloads, args.seconds
                    ),
                }
                order = list(cases) if r % 2 == 0 else list(reversed(cases))
                row = {name: round(cases[name](), 1) for name in order}
                row["ratio_1"] = round(row["keyd_1_connection"] / row["in_process"], 3)
                row["ratio_2"] = round(row["keyd_2_connections"] / row["in_process"], 3)
                # both sides on both cores: keyd's chunks are signed by two worker threads
                row["ratio_2_vs_2"] = round(
                    row["keyd_2_connections"] / row["in_process_2_threads"], 3
                )
                rounds.append(row)
                print(f"round {r}: " + ", ".join(f"{k} {v:,}" for k, v in row.items()))
            client.close()
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print("median: " + ", ".join(f"{k} {v:,}" for k, v in summary.items()))
    best = max(summary["ratio_1"], summary["ratio_2"])
    print(
        f"target (keyd >= 0.85 x one in-process batch call): {'PASS' if best >= 0.85 else 'FAIL'}"
        f" (best of 1 or 2 connections: {best:.2f}); keyd on 2 connections vs in-process on 2"
        f" threads: {summary['ratio_2_vs_2']:.2f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"batch": args.batch, "seconds": args.seconds, "rounds": rounds, "median": summary},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
