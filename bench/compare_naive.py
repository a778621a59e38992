"""``dccsign bench compare`` with two workers and the project's targets checked.

    python bench/compare_naive.py [--seconds N] [--rounds R] [--wait-quiet S] [--json FILE]
                                  [--check]

The measuring (openssl speed, the naive pipeline of bench/naive.py, the product's python and
native cores, interleaved rounds, ratios within each round, the CPU other processes used
meanwhile) lives in :mod:`dccsign.bench.compare`; this script runs it with ``--threads 2``
and judges the results against the targets below. ``--wait-quiet S`` waits (up to S seconds)
for a free second core before each two-worker sample; the two-worker target is judged on
quiet rounds only (other processes below 0.25 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dccsign.bench.compare import CompareError, compare, print_table

TARGET_NATIVE_1T = 15_000.0
TARGET_NATIVE_OVER_NAIVE = 3.0
TARGET_2T_OVER_1T = 1.7


def checks(doc: dict) -> list[tuple[str, str]]:
    rows = doc["rows"]
    out: list[tuple[str, str]] = []
    if "rate" in rows["native"]:
        ok = rows["native"]["rate"]["median"] >= TARGET_NATIVE_1T
        out.append(
            (
                "PASS" if ok else "FAIL",
                f"native >= {TARGET_NATIVE_1T:,.0f} certs/s on one core (median)",
            )
        )
    if "vs_naive" in rows["native"]:
        ok = rows["native"]["vs_naive"]["median"] >= TARGET_NATIVE_OVER_NAIVE
        out.append(
            (
                "PASS" if ok else "FAIL",
                f"native / naive >= {TARGET_NATIVE_OVER_NAIVE:g} (median of all rounds)",
            )
        )
    quiet = doc["scaling"]["native-all/native"]["quiet_rounds"]
    text = f"native 2 threads / 1 thread >= {TARGET_2T_OVER_1T:g} (median of quiet rounds)"
    if doc["scaling"]["native-all/native"]["all_rounds"]:
        if not quiet:
            out.append(("UNKNOWN", f"{text}: no quiet round, the second core was busy"))
        else:
            out.append(("PASS" if statistics.median(quiet) >= TARGET_2T_OVER_1T else "FAIL", text))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0].strip("`"))
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="seconds per product/naive sample (default 2)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds; each runs every case once (default 5)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write all samples as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each two-worker sample, wait up to S seconds for other "
        "processes to leave the second core (default 0: do not wait)",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")
    try:
        doc = compare(
            seconds=args.seconds,
            rounds=args.rounds,
            threads=2,
            naive_path=Path(__file__).with_name("naive.py"),
            wait_quiet=args.wait_quiet,
            log=lambda s: print(s, flush=True),
        )
    except CompareError as exc:
        raise SystemExit(str(exc)) from None
    print_table(doc)
    results = checks(doc)
    print()
    for status, text in results:
        print(f"{status:<8} {text}")
    if not results:
        print("no target could be checked (native implementation missing)")
    if args.json:
        doc["benchmark"] = "compare_naive"
        doc["command"] = " ".join(["python", "bench/compare_naive.py", *(argv or sys.argv[1:])])
        doc["checks"] = [{"status": st, "target": t} for st, t in results]
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    if args.check and (not results or any(st != "PASS" for st, _ in results)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
