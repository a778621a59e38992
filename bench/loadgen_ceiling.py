"""The load generator's own ceiling: how many certificates/s ``dccsign bench load`` can offer.

The engine is replaced by ``python -m dccsign.bench.loadfake --fast`` in its own process (it
answers repeats of the generator's pool from a cache, so it costs little and sits on the
other core); this process is the generator. For each case (batch size, rate) it runs an
open-loop constant profile with uniform arrivals and reports what was achieved, the
latency, the generator's schedule lag and its CPU use. A rate is within the ceiling when it
is achieved (>= 99 %) with a schedule lag p99 under 5 ms. CPU use is reported, not judged:
with single frames answered at once, every frame costs its own event-loop wake-ups, so the
process reads ~100 % from about 5,000 frames/s on while still keeping up far beyond that
(the wake-ups coalesce as the rate rises).

**CPU per certificate** (issue 14's target for the generator: <= 3 us): each case reports
the generator's CPU microseconds per certificate signed (``/proc/self/task/*/stat``,
utime + stime, from the run's clock start to its last reply: :mod:`dccsign.bench.cpustat`), and
the fake's. Each case runs twice in a row, with replies counted (``counted``, what ``bench
load`` does) and with every reply decoded into per-item objects by the codec (``full``, the
old path, ``--full-decode``), so that the saving is measured in the same run. The first case
is a closed loop with frames of 50 (4 connections x 2 in flight), the shape of
bench/engine_targets.py.

    .venv/bin/python bench/loadgen_ceiling.py       # ~4 min, writes bench/results/...json
    .venv/bin/python bench/loadgen_ceiling.py --modes counted --seconds 5
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

from dccsign.bench.loadgen import LoadConfig, build_payloads, run_load
from dccsign.bench.loadprofile import load_profile

#: (batch, rate); rate None: closed loop.
CASES: list[tuple[int, int | None]] = [
    (50, None),
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
    parser.add_argument(
        "--json",
        type=Path,
        help="write every case's figures here (default bench/results/loadgen_ceiling-<date>.json)",
    )
    parser.add_argument(
        "--modes",
        default="counted,full",
        help="comma-separated: counted (replies counted), full (replies decoded, the old path) "
        "(default both)",
    )
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"counted", "full"}:
        parser.error("--modes: counted and/or full")
    if args.json is None:
        results = Path(__file__).resolve().parent / "results"
        args.json = results / f"loadgen_ceiling-{time.strftime('%Y-%m-%dT%H%M')}.json"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/fake.sock"
        fake = subprocess.Popen(
            [sys.executable, "-m", "dccsign.bench.loadfake", "--fast", "--unix", sock],
            stderr=subprocess.DEVNULL,
        )
        try:
            while not os.path.exists(sock):
                time.sleep(0.02)
            for batch, rate in CASES:
                payloads = build_payloads(batch=batch)
                profile = load_profile("constant").scaled(
                    rate=rate or 1000, duration=args.seconds, arrivals="uniform"
                )
                for mode in modes:
                    config = LoadConfig(
                        profile=profile,
                        server=f"unix:{sock}",
                        batch=batch,
                        verify_sample=0.0,
                        closed_loop=rate is None,
                        in_flight=2 if rate is None else None,
                        full_decode=mode == "full",
                        cpu_pids=(("fake", fake.pid),),
                    )
                    r = trio.run(run_load, config, payloads)
                    rows.append(_row(r, batch, rate, mode))
        finally:
            fake.send_signal(signal.SIGTERM)
            fake.wait(10)
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "seconds": args.seconds,
        "cpu_us_per_cert": "CPU of the process per certificate signed, /proc utime+stime",
        "cases": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written: {args.json}")
    return 0


def _us(cpu: dict | None, role: str) -> float | None:
    p = ((cpu or {}).get("processes") or {}).get(role) or {}
    return p.get("us_per_cert")


def _row(r, batch: int, rate: int | None, mode: str) -> dict:
    cpu = r.cpu_s / r.elapsed_s
    row = {
        "batch": batch,
        "rate": rate,
        "mode": mode,
        "achieved": round(r.certs_per_s),
        "frames_per_s": round(r.ok_frames / r.elapsed_s),
        "p99_ms": round(r.latency.percentile(99) * 1e3, 2),
        "schedule_lag_p99_ms": round(r.schedule_lag.percentile(99) * 1e3, 2),
        "cpu_share": round(cpu, 2),
        "generator_cpu_us_per_cert": _us(r.cpu, "generator"),
        "fake_cpu_us_per_cert": _us(r.cpu, "fake"),
    }
    row["within_ceiling"] = rate is None or (
        r.certs_per_s >= 0.99 * rate and row["schedule_lag_p99_ms"] < 5
    )
    offered = "closed loop" if rate is None else f"offered {rate:>8,}/s"
    gen = row["generator_cpu_us_per_cert"]
    print(
        f"batch {batch:>3}  {mode:<7}  {offered:<18}  achieved {row['achieved']:>8,}/s "
        f"({row['frames_per_s']:>6,} frames/s)  p99 {row['p99_ms']:7.2f} ms  "
        f"lag p99 {row['schedule_lag_p99_ms']:6.2f} ms  CPU {cpu:4.0%}  "
        f"generator {gen if gen is not None else float('nan'):5.2f} us/cert  "
        f"{'ok' if row['within_ceiling'] else 'AT/ABOVE CEILING'}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    sys.exit(main())
