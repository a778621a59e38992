"""The load generator's own ceiling: how many certificates/s ``dccsign bench load`` can offer.

The engine is replaced by ``python -m dccsign.loadfake --fast`` in its own process (it
answers repeats of the generator's pool from a cache, so it costs little and sits on the
other core); this process is the generator. For each case (batch size, rate) it runs an
open-loop constant profile with uniform arrivals and reports what was achieved, the
latency, the generator's schedule lag and its CPU use. A rate is within the ceiling when it
is achieved (>= 99 %) with a schedule lag p99 under 5 ms. CPU use is reported, not judged:
with single frames answered at once, every frame costs its own event-loop wake-ups, so the
process reads ~100 % from about 5,000 frames/s on while still keeping up far beyond that
(the wake-ups coalesce as the rate rises).

    .venv/bin/python bench/loadgen_ceiling.py                     # ~2 min
    .venv/bin/python bench/loadgen_ceiling.py --json bench/results/loadgen_ceiling-$(date +%F).json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from dccsign.loadgen import LoadConfig, build_payloads, run_load
from dccsign.loadprofile import load_profile

CASES = [
    (1, 5_000),
    (1, 15_000),
    (1, 25_000),
    (50, 30_000),
    (50, 100_000),
    (100, 30_000),
    (100, 100_000),
    (100, 200_000),
    (100, 300_000),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per case (default 10)")
    parser.add_argument("--json", type=Path, help="write every case's figures here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/fake.sock"
        fake = subprocess.Popen(
            [sys.executable, "-m", "dccsign.loadfake", "--fast", "--unix", sock],
            stderr=subprocess.DEVNULL,
        )
        try:
            while not os.path.exists(sock):
                time.sleep(0.02)
            for batch, rate in CASES:
                payloads = build_payloads(batch=batch)
                profile = load_profile("constant").scaled(
                    rate=rate, duration=args.seconds, arrivals="uniform"
                )
                config = LoadConfig(
                    profile=profile, server=f"unix:{sock}", batch=batch, verify_sample=0.0
                )
                r = trio.run(run_load, config, payloads)
                cpu = r.cpu_s / r.elapsed_s
                row = {
                    "batch": batch,
                    "rate": rate,
                    "achieved": round(r.certs_per_s),
                    "frames_per_s": round(r.ok_frames / r.elapsed_s),
                    "p99_ms": round(r.latency.percentile(99) * 1e3, 2),
                    "schedule_lag_p99_ms": round(r.schedule_lag.percentile(99) * 1e3, 2),
                    "cpu_share": round(cpu, 2),
                }
                row["within_ceiling"] = (
                    r.certs_per_s >= 0.99 * rate and row["schedule_lag_p99_ms"] < 5
                )
                rows.append(row)
                print(
                    f"batch {batch:>3}  offered {rate:>8,}/s  achieved {row['achieved']:>8,}/s "
                    f"({row['frames_per_s']:>6,} frames/s)  p99 {row['p99_ms']:7.2f} ms  "
                    f"lag p99 {row['schedule_lag_p99_ms']:6.2f} ms  CPU {cpu:4.0%}  "
                    f"{'ok' if row['within_ceiling'] else 'AT/ABOVE CEILING'}",
                    flush=True,
                )
        finally:
            fake.send_signal(signal.SIGTERM)
            fake.wait(10)
    if args.json:
        doc = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
            "seconds": args.seconds,
            "cases": rows,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
