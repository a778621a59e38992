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

Many accounts (issue 14, part 4): ``--accounts N`` adds, per keyd, the engine's micro-batch
as it looks with N end-user accounts (every item of a batch another account, rotating over N):
``keyd_accounts_many`` sends it as SIGN_MANY (one part per account, what the engine sent
before) and ``keyd_accounts_columns`` as SIGN_COLUMNS (when the dccsign being run has it).
For these it reports keyd's CPU per certificate in total and per thread (from
``/proc/<pid>/task/*/stat``), and the sender's CPU per certificate to build and encode the
message and to decode the reply (what the engine's event loop pays). ``--only-accounts``
skips the other cases. To measure the code before this change, run the same script with the
interpreter of a checkout of it (its dccsign is the one imported)::

    .venv/bin/python bench/keyd_compare.py --accounts 10000 --batch 512 --only-accounts \
        --rounds 5 --seconds 2 --json bench/results/keyd_accounts-$(date +%F).json

Usage::

    .venv/bin/python bench/keyd_compare.py [--batch 250] [--seconds 3] [--rounds 3] [--json FILE]
        [--validation both|on|off] [--nonce-pool N] [--accounts N [--only-accounts]]

It makes a throw-away development keystore in a temporary directory and starts a private keyd
on it (its audit log lands there too; the second keyd's in another directory).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchsetup import timed_threads, vaccination_batch
from dccsign.keyd.supervisor import PrivateKeyd
from dccsign.protocol.keyd import NEED_DATA


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

    return sum(counts) / timed_threads(work, 2)


def rate_two_connections(
    keyd: PrivateKeyd, kid: bytes, payloads: list[bytes], seconds: float
) -> float:
    """Signatures/s with two connections signing at once (keyd serves each on a thread)."""
    clients = [keyd.client(), keyd.client()]
    try:
        return rate_two_threads(
            [lambda c=c: c.sign(kid, payloads, client="bench", account="bench") for c in clients],
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


def _task_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of process *pid*: its name and user + system CPU seconds so far."""
    out: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = text.rsplit(")", 1)[1].split()
        name = text[text.index("(") + 1 : text.rindex(")")]
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _exchange(client, wire: bytes):
    """Send one encoded request on a blocking KeydClient and return the decoded reply."""
    client._sock.sendall(wire)
    codec = client._codec
    while True:
        event = codec.next_event()
        if event is not None and event is not NEED_DATA:
            return event
        codec.receive_data(client._sock.recv(1 << 16))


def accounts_case(client, pid: int, kid: bytes, payloads: list[bytes], n_accounts: int,
                  message: str, seconds: float) -> dict[str, object]:  # fmt: skip
    """Closed loop on one connection: micro-batches of *payloads* whose every item is another
    of *n_accounts* accounts, sent as *message* ("many": SIGN_MANY, one part per account;
    "columns": SIGN_COLUMNS). Returns the rate, keyd's CPU µs per certificate (total and per
    thread) and the sender's encode / decode CPU µs per certificate."""
    from dccsign.protocol import keyd as kp

    batch = len(payloads)
    names = [f"uzi:{k:06d}" for k in range(n_accounts)]
    ids = itertools.count(1 << 20)
    blob = b"".join(payloads)
    position = 0
    encode = decode = 0.0
    done = 0
    before = _task_cpu(pid)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        accounts = [names[(position + j) % n_accounts] for j in range(batch)]
        position = (position + batch) % n_accounts
        t0 = time.process_time()
        if message == "many":
            pairs = zip(accounts, payloads, strict=True)
            parts = tuple(kp.SignPart("bench", a, (p,)) for a, p in pairs)
            msg = kp.SignMany(next(ids), kid, parts)
        else:
            from array import array

            ends = array("I", itertools.accumulate(map(len, payloads)))
            columns = kp.KeydColumns(blob, ends, ("bench",), tuple(accounts), (None,),
                                     array("I", bytes(4 * batch)), array("I", range(batch)),
                                     array("I", bytes(4 * batch)))  # fmt: skip
            msg = kp.SignColumns(next(ids), kid, columns)
        wire = client._codec.send(msg)
        encode += time.process_time() - t0
        t0 = time.process_time()
        reply = _exchange(client, wire)
        if message == "many":
            signed = sum(isinstance(r, bytes) for r in reply.results)
        else:
            signed = reply.codes.count(0)
            reply.signature_list()  # what the batcher asks of it
        decode += time.process_time() - t0  # includes waiting idle: process_time is CPU only
        if signed != batch:
            raise SystemExit(f"keyd refused {batch - signed} of {batch} items: {reply!r:.300}")
        done += batch
    wall = time.perf_counter() - start
    after = _task_cpu(pid)
    threads = sorted(
        ((after[t][0], after[t][1] - before.get(t, (None, 0.0))[1]) for t in after),
        key=lambda x: -x[1],
    )
    total = sum(cpu for _, cpu in threads)
    return {
        "rate": round(done / wall, 1),
        "cpu_us": round(total / done * 1e6, 2),
        "threads_us": [
            [name, round(cpu / done * 1e6, 2)] for name, cpu in threads if cpu / done * 1e6 >= 0.05
        ],
        "sender_encode_us": round(encode / done * 1e6, 2),
        "sender_decode_us": round(decode / done * 1e6, 2),
    }


def _code() -> dict[str, str]:
    """Which dccsign this run measured: its checkout and commit (before/after comparisons)."""
    import subprocess

    import dccsign

    where = Path(dccsign.__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"checkout": str(where), "commit": commit}


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
        "--validate-dcc",
        dest="validation",
        action="store_const",
        const="on",
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--nonce-pool", type=int, metavar="N", help="keyd's --nonce-pool (default: keyd's)"
    )
    parser.add_argument(
        "--accounts",
        type=int,
        default=0,
        metavar="N",
        help="add the many-accounts cases: every item of a batch another of N accounts",
    )
    parser.add_argument("--only-accounts", action="store_true", help="only the many-accounts cases")
    args = parser.parse_args()
    from dccsign.protocol import keyd as kp

    messages = ("many", "columns") if hasattr(kp, "SignColumns") else ("many",)
    accounts_rows: list[dict[str, object]] = []

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

        for r in range(args.rounds if args.accounts else 0):
            row: dict[str, object] = {}
            order = [(suffix, m) for suffix in keyds for m in messages]
            for suffix, m in order if r % 2 == 0 else reversed(order):
                pid = keyds[suffix]._proc.pid  # type: ignore[union-attr]
                row[f"keyd_accounts_{m}{suffix}"] = accounts_case(
                    clients[suffix], pid, entry.kid, payloads, args.accounts, m, args.seconds
                )
            accounts_rows.append(row)
            print(f"round {r} (accounts): " + json.dumps(row))
        for r in range(0 if args.only_accounts else args.rounds):
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
    accounts_summary = {
        case: {
            field: statistics.median(r[case][field] for r in accounts_rows)
            for field in ("rate", "cpu_us", "sender_encode_us", "sender_decode_us")
        }
        for case in (accounts_rows[0] if accounts_rows else {})
    }
    for case, values in accounts_summary.items():
        print(f"median {case}: " + ", ".join(f"{k} {v:,}" for k, v in values.items()))
    if args.only_accounts:
        if args.json:
            args.json.write_text(json.dumps({
                "batch": args.batch, "seconds": args.seconds, "validation": args.validation,
                "nonce_pool": args.nonce_pool, "accounts": args.accounts, "code": _code(),
                "messages": list(messages), "accounts_rounds": accounts_rows,
                "accounts_median": accounts_summary,
            }, indent=2))  # fmt: skip
        return
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
                    "accounts": args.accounts,
                    "accounts_rounds": accounts_rows,
                    "accounts_median": accounts_summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
