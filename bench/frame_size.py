"""The engine's main-thread CPU per frame and per certificate: the same engine driven with
frames of several sizes, and a straight line through the results.

    .venv/bin/python bench/frame_size.py [--sizes 200,50,20,100] [--passes 2] [--json FILE]

One ``dccsign serve --dev`` on loopback TLS (its default nonce pool), then for each pass and
each frame size a closed loop of ``dccsign bench load`` (4 connections x 2 frames in flight,
8 s), the engine's threads' CPU read from ``/proc/<pid>/task/*/stat`` over the middle 4 s.
With CPU per certificate ``c(n) = a + b / n`` for frames of ``n``, ``b`` is what a frame
costs the event loop whatever it holds (the control plane: TLS records, scheduling, the
frame's Python) and ``a`` what each certificate costs it; the fit is least squares over every
(pass, size). The machine drifts by +-30 % between steps: passes repeat the sizes in turn.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchsetup import DCCSIGN, dev_engine, save_result

ROOT = Path(__file__).resolve().parents[1]
TICK = 100  # clock ticks per second (USER_HZ)


def _cpu(pid: int, tid: int) -> int:
    """utime + stime of one thread, in clock ticks."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])


def _threads(pid: int) -> dict[int, int]:
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        tid = int(task.rsplit("/", 1)[1])
        try:
            out[tid] = _cpu(pid, tid)
        except OSError:
            pass  # a thread that ended meanwhile
    return out


def step(engine, work: Path, size: int) -> dict:
    """One closed loop with frames of *size*: certificates/s and the engine's CPU per
    certificate (main thread, whole process) over its middle 4 seconds."""
    pid = engine.proc.pid
    report = work / f"closed-{size}.json"
    cmd = [*DCCSIGN, "bench", "load", "--quiet", *engine.load_args(), "--batch", str(size),
           "--connections", "4", "--in-flight", "2", "--closed-loop", "--duration", "8",
           "--verify-sample", "0.01", "--json", str(report)]  # fmt: skip
    load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)
    main0, all0, t0 = _cpu(pid, pid), _threads(pid), time.monotonic()
    time.sleep(4)
    main1, all1, elapsed = _cpu(pid, pid), _threads(pid), time.monotonic() - t0
    if load.wait() != 0:
        raise SystemExit(f"dccsign bench load failed for frames of {size}")
    rate = json.loads(report.read_text())["certs_per_s"]
    certs = rate * elapsed
    spent = sum(v - all0.get(k, 0) for k, v in all1.items())
    return {
        "frame": size,
        "certs_per_s": rate,
        "main_us_per_cert": round((main1 - main0) / TICK * 1e6 / certs, 2),
        "engine_us_per_cert": round(spent / TICK * 1e6 / certs, 2),
    }


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares for c = a + b * x over (x, c) points: (a, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="200,50,20,100", help="frame sizes, in the order run")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(set(sizes)) < 2:
        raise SystemExit("give at least two frame sizes")
    steps = []
    with tempfile.TemporaryDirectory() as tmp, dev_engine(Path(tmp)) as engine:
        warm = [*DCCSIGN, "bench", "load", "--quiet", *engine.load_args(), "--closed-loop",
                "--duration", "3"]  # fmt: skip
        subprocess.run(warm, check=True, capture_output=True)
        for p in range(args.passes):
            for size in sizes:
                s = step(engine, Path(tmp), size)
                s["pass"] = p
                steps.append(s)
                print(f"  pass {p} frames of {size:4}: {s['certs_per_s']:8,.0f}/s, main "
                      f"{s['main_us_per_cert']:6.1f} us/cert, engine "
                      f"{s['engine_us_per_cert']:6.1f}", flush=True)  # fmt: skip
    out: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/frame_size.py " + " ".join(argv or sys.argv[1:]),
        "steps": steps,
    }
    for what in ("main", "engine"):
        a, b = fit([(1 / s["frame"], s[f"{what}_us_per_cert"]) for s in steps])
        out[f"{what}_fit"] = {"per_cert_us": round(a, 2), "per_frame_us": round(b, 1)}
        print(f"{what}: {a:.1f} us per certificate + {b:,.0f} us per frame")
    print(f"wrote {save_result(out, 'frame_size', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
