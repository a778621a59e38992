"""Signing through keyd vs signing in-process, measured in the same run.

The target of issue 3: through keyd with software keys, a batch benchmark reaches at least
85 % of the in-process native signing rate measured in the same run. Both sides sign the same
CWT payloads with the same ES256 key in batches; keyd also re-checks every payload and writes
its audit records (one fsync per batch) before it answers.

"In-process" is one ``SigningKey.sign`` batch call at a time (one thread), the rate the target
names; the same call on two threads at once is measured too (``in_process_2_threads``), and
``ratio_2_vs_2`` compares keyd on two connections with it: both sides on both cores.

keyd validates every DCC by default (``dccsign keyd``; ``--no-validate-dcc`` turns it off).
``--validation both`` (the default) runs a second keyd with ``--no-validate-dcc`` beside the
default one and measures both in the same rounds: the ``*_novalidate`` cases, and
``validation_cost_1`` / ``validation_cost_2``, the validating keyd's rate over the other's
(1 or 2 connections). ``--validation on`` or ``off`` measures one keyd only. For every keyd
case, ``*_cpu_us`` is keyd's CPU time (user + system, from /proc) per signature: unlike the
rates, it hardly depends on what else the machine runs.

Usage::

    .venv/bin/python bench/keyd_compare.py [--batch 250] [--seconds 3] [--rounds 3] [--json FILE]
        [--validation both|on|off] [--nonce-pool N]

It makes a throw-away development keystore in a temporary directory and starts a private keyd
on it (its audit log lands there too; the second keyd's in another directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid* so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_cpu(pid: int, case):
    """Run *case* (returns items/s); (items/s, CPU µs of *pid* per item)."""
    cpu, wall = _cpu_seconds(pid), time.perf_counter()
    rate = case()
    cpu, wall = _cpu_seconds(pid) - cpu, time.perf_counter() - wall
    return rate, cpu / (rate * wall) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument(
        "--validation",
        choices=("both", "on", "off"),
        default="both",
        help="keyd's DCC validation: on (keyd's default), off (--no-validate-dcc), or both "
        "(two keyds, measured in the same rounds; default)",
    )
    parser.add_argument(  # the option of the days when keyd did not validate by default
        "--validate-dcc", dest="validation", action="store_const", const="on",
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--nonce-pool", type=int, metavar="N", help="keyd's --nonce-pool (default: keyd's)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        signing = vaccination_batch(Path(tmp) / "ks", args.batch)
        store, entry, local = signing.store, signing.entry, signing.key
        protected, payloads = signing.protected, signing.payloads
        rounds = []
        # suffix -> keyd: "" validates (unless --validation off), "_novalidate" does not
        keyds = {}
        for suffix, validate in (("", True), ("_novalidate", False)):
            if args.validation == ("off" if validate else "on"):
                continue
            keyds["" if args.validation != "both" else suffix] = stack.enter_context(
                PrivateKeyd(
                    store.directory,
                    validate_dcc=validate,
                    nonce_pool=args.nonce_pool,
                    audit_dir=Path(tmp) / f"audit{suffix}",
                )
            )
        clients = {suffix: stack.enter_context(k.client()) for suffix, k in keyds.items()}

        def through(client):
            client.sign(entry.kid, payloads, client="bench", account="bench")

        for r in range(args.rounds):
            cases = {
                "in_process": lambda: _rate(
                    lambda: local.sign(protected, payloads), len(payloads), args.seconds
                ),
                "in_process_2_threads": lambda: rate_two_threads(
                    [lambda: local.sign(protected, payloads)] * 2, len(payloads), args.seconds
                ),
            }
            for suffix, keyd in keyds.items():
                client = clients[suffix]
                cases[f"keyd_1_connection{suffix}"] = lambda c=client: _rate(
                    lambda: through(c), len(payloads), args.seconds
                )
                cases[f"keyd_2_connections{suffix}"] = lambda k=keyd: rate_two_connections(
                    k, entry.kid, payloads, args.seconds
                )
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            row = {}
            for name in order:
                suffix = name.removeprefix("keyd_1_connection").removeprefix("keyd_2_connections")
                if name.startswith("keyd_"):
                    pid = keyds[suffix]._proc.pid  # type: ignore[union-attr]
                    rate, cpu = _with_cpu(pid, cases[name])
                    row[f"{name}_cpu_us"] = round(cpu, 2)
                else:
                    rate = cases[name]()
                row[name] = round(rate, 1)
            for suffix in keyds:
                one, two = row[f"keyd_1_connection{suffix}"], row[f"keyd_2_connections{suffix}"]
                row[f"ratio_1{suffix}"] = round(one / row["in_process"], 3)
                row[f"ratio_2{suffix}"] = round(two / row["in_process"], 3)
                # both sides on both cores: keyd's chunks are signed by two worker threads
                row[f"ratio_2_vs_2{suffix}"] = round(two / row["in_process_2_threads"], 3)
            if len(keyds) == 2:
                for n in ("1_connection", "2_connections"):
                    row[f"validation_cost_{n[0]}"] = round(
                        row[f"keyd_{n}"] / row[f"keyd_{n}_novalidate"], 3
                    )
                    row[f"validation_cpu_us_{n[0]}"] = round(
                        row[f"keyd_{n}_cpu_us"] - row[f"keyd_{n}_novalidate_cpu_us"], 2
                    )
            rounds.append(row)
            print(f"round {r}: " + ", ".join(f"{k} {v:,}" for k, v in row.items()))
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print("median: " + ", ".join(f"{k} {v:,}" for k, v in summary.items()))
    best = max(summary["ratio_1"], summary["ratio_2"])
    print(
        f"target (keyd >= 0.85 x one in-process batch call): {'PASS' if best >= 0.85 else 'FAIL'}"
        f" (best of 1 or 2 connections: {best:.2f}); keyd on 2 connections vs in-process on 2"
        f" threads: {summary['ratio_2_vs_2']:.2f}"
    )
    if "validation_cost_1" in summary:
        print(
            f"validating keyd vs --no-validate-dcc: {summary['validation_cost_1']:.2f} on one "
            f"connection, {summary['validation_cost_2']:.2f} on two; keyd CPU per signature "
            f"{summary['keyd_1_connection_cpu_us']:.1f} vs "
            f"{summary['keyd_1_connection_novalidate_cpu_us']:.1f} µs on one connection, "
            f"{summary['keyd_2_connections_cpu_us']:.1f} vs "
            f"{summary['keyd_2_connections_novalidate_cpu_us']:.1f} µs on two"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "batch": args.batch,
                    "seconds": args.seconds,
                    "validation": args.validation,
                    "nonce_pool": args.nonce_pool,
                    "rounds": rounds,
                    "median": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
