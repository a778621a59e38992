"""Two engines, or two settings of one, in the same run: closed-loop throughput, interleaved.

    .venv/bin/python bench/engine_ab.py --variant old:PYTHONPATH=/path/to/old/package \\
        --variant new --variant novalidate::--keyd-no-validate-dcc [--rounds 5] [--json F]

A variant is ``NAME[:ENV=VALUE,...][:EXTRA SERVE OPTIONS]``: each round starts a fresh
``dccsign serve --dev`` per variant (its own development keystore, a Unix socket -- or
loopback TLS with ``--tcp`` --, no nonce pool unless ``--nonce-pool N``, and then only once
every pool is full), waits until it accepts, drives it with
``dccsign bench load --closed-loop`` (4 connections x 2 frames of 50 by default; the load
generator runs with the variant's environment too) for --seconds, and stops it. Rounds take
the variants in turn, so that drift of the machine (±30 % here) falls on all of them alike;
the report gives each variant's median certificates/s, BUSY, p99 and CPU per certificate of
the engine process (keyd, its child, not included), of its main thread (the event loop) and
of the generator, and its throughput ratio to the first. With ``--same-generator`` every
variant is driven by this checkout's generator, so that only the engine's code differs, and
the report adds the engine's CPU per certificate divided by the generator's, per round: the
generator, the same code throughout, is the run's own measure of the machine's speed.

To compare with an older checkout: ``git archive OLD engine native protocol`` into a
directory, rename engine/ to dccsign/ and move native/ and protocol/ into it, copy a built
``_native*.so`` in, and give that directory as the old variant's PYTHONPATH.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dccsign.testing.net import accepts_tcp, accepts_unix, free_port

DCCSIGN = [sys.executable, "-m", "dccsign"]


def _variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    name, _, rest = text.partition(":")
    env_text, _, extra = rest.partition(":")
    env = dict(pair.split("=", 1) for pair in env_text.split(",") if pair)
    return name, env, extra.split()


def _one(work: Path, name: str, env: dict[str, str], extra: list[str], args) -> dict:
    sock = work / f"{name}.sock"
    store = work / f"ks-{name}"
    full_env = {**os.environ, **env}
    if args.tcp:
        port = free_port()
        listen = ["--tcp", f"127.0.0.1:{port}"]
        tls = store / "dev-tls"
        server = ["--server", f"127.0.0.1:{port}", "--cert", str(tls / "client-cert.pem"),
                  "--key", str(tls / "client-key.pem"), "--ca", str(tls / "ca.pem")]  # fmt: skip

        def ready() -> bool:
            return accepts_tcp(port)
    else:
        listen = ["--unix", str(sock)]
        server = ["--server", f"unix:{sock}"]

        def ready() -> bool:
            return accepts_unix(sock)

    http = free_port()
    with open(work / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [*DCCSIGN, "serve", "--dev", "--keystore", str(store), *listen, "--nonce-pool",
             str(args.nonce_pool), "--http", f"127.0.0.1:{http}", *extra],
            stderr=log, env=full_env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((work / f"{name}.log").read_text())
            time.sleep(0.1)
        time.sleep(2)  # keyd's start-up work settles
        if args.nonce_pool:
            from engine_targets import wait_pools

            wait_pools(f"http://127.0.0.1:{http}/metrics")
        out = work / f"{name}.json"
        subprocess.run(
            [*DCCSIGN, "bench", "load", *server, "--closed-loop",
             "--connections", str(args.connections), "--in-flight", str(args.in_flight),
             "--batch", str(args.batch), "--duration", str(args.seconds), "--metrics", "none",
             "--cpu-pid", f"engine={proc.pid}", "--quiet", "--json", str(out)],
            check=True, stdout=subprocess.DEVNULL,
            env=os.environ if args.same_generator else full_env,
        )  # fmt: skip
        report = json.loads(out.read_text())
        result = {k: report[k] for k in ("certs_per_s", "busy", "p50_ms", "p99_ms", "errors")}
        processes = (report.get("cpu") or {}).get("processes", {})
        for role in ("engine", "generator"):
            result[f"{role}_us_per_cert"] = processes.get(role, {}).get("us_per_cert")
        # The event loop's own share: the engine's main thread.
        main = [t for t in processes.get("engine", {}).get("threads", []) if t["name"] == "main"]
        result["engine_main_us_per_cert"] = main[0]["us_per_cert"] if main else None
        return result
    finally:
        proc.terminate()
        proc.wait(60)


def _per_generator(summary: dict, results: list[dict]) -> str:
    """The engine's CPU per certificate over the generator's, round by round (median, min,
    max). With ``--same-generator`` the generator is the same code for every variant, so its
    cost per certificate measures how fast the machine ran in that round: the quotient
    cancels most of the drift that moves both (see bench/README.md, session 10)."""
    text = ""
    for role in ("engine", "engine_main"):
        values = [
            x[f"{role}_us_per_cert"] / x["generator_us_per_cert"]
            for x in results
            if x.get(f"{role}_us_per_cert") and x.get("generator_us_per_cert")
        ]
        if values:
            summary[f"{role}_per_generator"] = {
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
            }
            text += f", {role}/generator {statistics.median(values):.3f}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, metavar="SPEC")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--nonce-pool", type=int, default=0, metavar="N",
                        help="the engines' --nonce-pool (default 0: none); measured once the "
                        "pools are full")  # fmt: skip
    parser.add_argument("--tcp", action="store_true",
                        help="loopback TCP with TLS (the development certificates) instead "
                        "of a Unix socket")  # fmt: skip
    parser.add_argument("--same-generator", action="store_true",
                        help="drive every variant with this checkout's load generator (its "
                        "environment without the variant's settings), so that only the "
                        "engine differs")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    variants = [_variant(v) for v in args.variant]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="dccsign-ab-") as tmp:
        for r in range(args.rounds):
            for name, env, extra in variants:
                result = _one(Path(tmp), f"{name}", env, extra, args)
                runs[name].append(result)
                print(f"round {r}: {name} {result}", file=sys.stderr, flush=True)
    first = statistics.median(x["certs_per_s"] for x in runs[variants[0][0]])
    summary = {}
    for name, results in runs.items():
        rate = statistics.median(x["certs_per_s"] for x in results)
        summary[name] = {
            "certs_per_s_median": rate,
            "ratio_to_first": round(rate / first, 3),
            "busy_median": statistics.median(x["busy"] for x in results),
            "p99_ms_median": statistics.median(x["p99_ms"] for x in results),
        }
        cpu = ""
        for role in ("engine", "engine_main", "generator"):
            values = [x[f"{role}_us_per_cert"] for x in results if x.get(f"{role}_us_per_cert")]
            if values:
                summary[name][f"{role}_us_per_cert_median"] = statistics.median(values)
                cpu += f", {role} {statistics.median(values):.1f} us/cert"
        if args.same_generator:
            cpu += _per_generator(summary[name], results)
        print(f"{name}: {rate:,.0f} certs/s (x{rate / first:.2f}), "
              f"BUSY {summary[name]['busy_median']:,.0f}, p99 "
              f"{summary[name]['p99_ms_median']:.0f} ms{cpu}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python bench/engine_ab.py " + " ".join(sys.argv[1:]),
            "variants": args.variant, "summary": summary, "rounds": runs,
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
