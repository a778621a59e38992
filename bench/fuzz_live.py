"""A fuzz campaign against a live engine: millions of hostile frames, with the engine watched.

    .venv/bin/python bench/fuzz_live.py [--frames 1000000] [--workers 4] [--seed N] [--json F]

Starts ``dccsign serve --dev`` (development keystore, Unix socket) in a temporary directory
and plays :class:`dccsign.testing.wirefuzz.SessionFuzzer` sessions at it from *workers*
threads -- mutated, random and malicious frames (bombs, deep nesting, frames that never end)
-- until *frames* frames have been sent. Meanwhile it samples the engine's resident memory
every 0.5 s and has a legitimate client sign one certificate every second (latency, result).

The result (JSON, default ``bench/results/fuzz_live-DATE.json``) holds the frames and
sessions sent, the rate, the engine's peak and final RSS with a series over time, the
legitimate requests' latencies and failures, the engine's connection counters (closed by
reason, internal errors) and what it logged as errors (with tracebacks). Exit status 1 when
the engine exited, any connection ended in an engine fault, a request got INTERNAL, a
legitimate request failed or took over 1 s, or RSS passed --rss-bound (default 300 MiB, the
bound docs/security.md states).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchsetup import dev_engine
from dccsign.protocol.clients.blocking import Client
from dccsign.testing.samples import sample
from dccsign.testing.wirefuzz import SessionFuzzer, run_session

RESULTS = Path(__file__).parent / "results"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _metrics(http: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("dccsign_connections", "dccsign_internal_errors", "dccsign_busy")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--rss-bound", type=int, default=300, metavar="MIB")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    out = args.json or RESULTS / f"fuzz_live-{dt.date.today().isoformat()}.json"

    with tempfile.TemporaryDirectory(prefix="dccsign-fuzz-") as tmp:
        work = Path(tmp)
        sock = work / "engine.sock"
        with dev_engine(work, ["--unix", str(sock), "--nonce-pool", "0"]) as engine:
            pid = engine.proc.pid
            stop = threading.Event()
            lock = threading.Lock()
            sent = {"frames": 0, "sessions": 0, "bytes": 0, "closed_by_engine": 0}
            rss_series: list[tuple[float, int]] = []
            peak = [0]
            latencies: list[float] = []
            failures: list[str] = []
            started = time.monotonic()

            def sampler() -> None:
                last = 0.0
                while not stop.is_set():
                    rss = _rss(pid)
                    peak[0] = max(peak[0], rss)
                    now = time.monotonic() - started
                    if now - last >= 10:
                        rss_series.append((round(now, 1), rss))
                        last = now
                    time.sleep(0.5)

            def legit() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    t = time.monotonic()
                    try:
                        with Client(f"unix:{sock}", retries=0, timeout=10) as c:
                            r = c.sign(sample("vtr"[n % 3]), account=f"uzi:legit{n % 50}")
                        if not r.ok:
                            failures.append(f"{r.error!r}: {r.message}")
                    except Exception as exc:  # recorded, and the campaign fails
                        failures.append(repr(exc))
                    latencies.append(time.monotonic() - t)
                    time.sleep(1.0)

            def worker(i: int) -> None:
                fuzzer = SessionFuzzer(args.seed + i)
                while not stop.is_set():
                    chunks, frames = fuzzer.session()
                    with lock:
                        if sent["frames"] >= args.frames:
                            return
                        sent["frames"] += frames
                        sent["sessions"] += 1
                    try:
                        result = run_session(str(sock), chunks, wait=0.01)
                    except OSError as exc:  # the engine refused or vanished
                        with lock:
                            failures.append(f"fuzz connect: {exc!r}")
                        if engine.proc.poll() is not None:
                            return
                        time.sleep(0.1)
                        continue
                    with lock:
                        sent["bytes"] += result.sent
                        sent["closed_by_engine"] += result.closed_by_engine

            threads = [threading.Thread(target=sampler), threading.Thread(target=legit)]
            workers = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
            for t in threads + workers:
                t.start()
            last_report = 0.0
            while any(w.is_alive() for w in workers):
                time.sleep(1)
                elapsed = time.monotonic() - started
                if elapsed - last_report >= 30:
                    last_report = elapsed
                    print(
                        f"{elapsed:6.0f} s  {sent['frames']:>9,} frames  "
                        f"rss {peak[0] / 2**20:.0f} MiB peak",
                        file=sys.stderr,
                        flush=True,
                    )
            seconds = time.monotonic() - started
            time.sleep(2)  # the last sessions settle
            stop.set()
            for t in threads:
                t.join(30)
            alive = engine.proc.poll() is None
            counters = _metrics(engine.http) if alive else {}
            final_rss = _rss(pid) if alive else 0
        # What the engine logged as an error (a fault's traceback follows its ERROR line),
        # read before the temporary directory goes.
        log = (work / "engine.log").read_text(errors="replace").splitlines()
        errors = [
            "\n".join(log[i : i + 25]) for i, line in enumerate(log)
            if " ERROR " in line or line.startswith("Traceback")
        ][:10]  # fmt: skip

    faults = counters.get('dccsign_connections_closed_total{reason="failure"}', 0)
    internal = counters.get("dccsign_internal_errors_total", 0)
    slow = [x for x in latencies if x > 1.0]
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "command": "python bench/fuzz_live.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "workers": args.workers,
        **sent,
        "seconds": round(seconds, 1),
        "frames_per_second": round(sent["frames"] / seconds),
        "engine_alive": alive,
        "engine_rss_peak_mib": round(peak[0] / 2**20, 1),
        "engine_rss_final_mib": round(final_rss / 2**20, 1),
        "rss_bound_mib": args.rss_bound,
        "rss_series_mib": [(t, round(r / 2**20, 1)) for t, r in rss_series],
        "legit_requests": len(latencies),
        "legit_failures": failures[:20],
        "legit_latency_max_s": round(max(latencies, default=0), 3),
        "legit_over_1s": len(slow),
        "engine_counters": counters,
        "engine_log_errors": errors,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_series_mib"}, indent=2))
    ok = (
        alive
        and not faults
        and not internal
        and not failures
        and not slow
        and peak[0] <= args.rss_bound * 2**20
    )
    print(f"{'PASS' if ok else 'FAIL'}: written to {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
