"""The fsync latency of the disk that holds keyd's audit log: the floor under every p99.

No signature leaves keyd before its audit record is durable (one write and one fsync per
micro-batch), so every certificate in flight waits for the fsync of its batch, and a stalled
fsync holds all of them. This measures what the disk does with keyd's write pattern alone:
appends of about one micro-batch of audit lines, each followed by an fsync, at about the
commit rate of a busy keyd, with nothing else running.

    .venv/bin/python bench/fsync_tail.py [--dir DIR] [--seconds 20] [--bytes 20000]
        [--interval-ms 4] [--json FILE]

DIR defaults to the current directory (run it where the audit log lives, e.g.
``var/dev-keystore/audit``); a temporary file is created there and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def measure(directory: Path, seconds: float, size: int, interval: float) -> dict:
    """Append *size* bytes and fsync, every *interval* seconds, for *seconds*; the latency
    distribution of the fsyncs in milliseconds and the stalls of 50 ms or more."""
    fd, name = tempfile.mkstemp(prefix="dccsign-fsync-", dir=directory)
    data = b"x" * (size - 1) + b"\n"
    times: list[float] = []
    stalls: list[dict[str, float]] = []
    try:
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            os.write(fd, data)
            t = time.perf_counter()
            os.fsync(fd)
            took = time.perf_counter() - t
            times.append(took)
            if took >= 0.05:
                stalls.append({"at_s": round(now - start, 2), "ms": round(took * 1e3, 1)})
            time.sleep(interval)
    finally:
        os.close(fd)
        os.unlink(name)
    times.sort()
    n = len(times)

    def pct(p: float) -> float:
        return round(times[min(n - 1, int(n * p))] * 1e3, 3)

    return {
        "directory": str(directory),
        "fsyncs": n,
        "bytes_per_write": size,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": round(times[-1] * 1e3, 3),
        "stalls_over_50ms": stalls,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("."), help="where to write (default .)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long (default 20)")
    p.add_argument("--bytes", type=int, default=20_000, help="bytes per append (default 20000)")
    p.add_argument(
        "--interval-ms", type=float, default=4.0, help="pause between commits (default 4)"
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.bytes < 1 or args.interval_ms < 0:
        p.error("--seconds and --bytes must be positive, --interval-ms not negative")
    if not args.dir.is_dir():
        p.error(f"--dir {args.dir}: not a directory")
    r = measure(args.dir, args.seconds, args.bytes, args.interval_ms / 1000)
    print(
        f"{r['fsyncs']} fsyncs of {r['bytes_per_write']} B in {args.dir}: p50 {r['p50_ms']} ms, "
        f"p99 {r['p99_ms']} ms, p99.9 {r['p999_ms']} ms, max {r['max_ms']} ms; "
        f"{len(r['stalls_over_50ms'])} stalls of 50 ms or more"
    )
    for s in r["stalls_over_50ms"]:
        print(f"  at {s['at_s']:6.2f} s: {s['ms']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
