"""Where the engine's event loop goes per frame: trio task steps and their time, by task.

    .venv/bin/python bench/loop_steps.py [--seconds 5] [--json FILE] [-- SERVE OPTIONS]

Starts ``dccsign serve --dev`` on loopback TLS with a trio ``Instrument`` in its main trio
run (the engine's code is unchanged: a wrapper adds the instrument before the CLI runs),
waits for full nonce pools, drives it with ``dccsign bench load --closed-loop`` (4
connections x 2 frames of 50), and reads the counters twice, --seconds apart, in the middle
of the run (SIGUSR1 makes the engine write them). Per frame of that window: task steps (a
task resumed by the scheduler and run to its next wait), the wall time spent inside them,
and epoll waits. Wall time includes what the instrument costs and time the thread was
preempted: compare step counts between versions, times only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine_targets import wait_pools

import benchsetup

_WRAPPER = r"""
import collections, json, os, signal, sys, time, threading
import trio, trio.abc
steps, spent = collections.Counter(), collections.Counter()
io = [0]
class Counting(trio.abc.Instrument):
    def before_task_step(self, task):
        self.t = time.perf_counter()
    def after_task_step(self, task):
        name = task.name.rsplit(".", 1)[-1]
        steps[name] += 1
        spent[name] += time.perf_counter() - self.t
    def before_io_wait(self, timeout):
        io[0] += 1
run = trio.run
def instrumented(*a, **k):
    if threading.current_thread() is threading.main_thread():
        k.setdefault("instruments", []).append(Counting())
    return run(*a, **k)
trio.run = instrumented
snaps = [0]
def snap(*_):
    snaps[0] += 1
    out = os.environ["DCCSIGN_LOOP_STEPS"] + f".{snaps[0]}"
    with open(out, "w") as f:
        json.dump({"steps": steps, "spent": spent, "io": io[0]}, f)
signal.signal(signal.SIGUSR1, snap)
sys.argv = ["dccsign", *sys.argv[1:]]
from dccsign.cli.main import main
sys.exit(main())
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="the measured window")
    p.add_argument("--json", type=Path, metavar="FILE")
    p.add_argument("serve", nargs="*", help="extra `dccsign serve` options (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dccsign-steps-") as tmp:
        work = Path(tmp)
        os.environ["DCCSIGN_LOOP_STEPS"] = str(work / "steps")
        benchsetup.DCCSIGN = [sys.executable, "-c", _WRAPPER]
        with benchsetup.dev_engine(work, args.serve) as engine:
            wait_pools(engine.metrics_url())
            load = [sys.executable, "-m", "dccsign", "bench", "load", "--quiet",
                    *engine.load_args(), "--batch", "50", "--connections", "4",
                    "--in-flight", "2", "--closed-loop", "--verify-sample", "0"]  # fmt: skip
            subprocess.run([*load, "--duration", "3"], check=True, capture_output=True)
            report = work / "load.json"
            run = subprocess.Popen([*load, "--duration", str(args.seconds + 4), "--json",
                                    str(report)], stdout=subprocess.DEVNULL)  # fmt: skip
            time.sleep(2)
            os.kill(engine.proc.pid, signal.SIGUSR1)
            t0 = time.monotonic()
            time.sleep(args.seconds)
            os.kill(engine.proc.pid, signal.SIGUSR1)
            window = time.monotonic() - t0
            if run.wait() != 0:
                raise SystemExit("bench load failed")
            time.sleep(0.5)
            a = json.loads((work / "steps.1").read_text())
            b = json.loads((work / "steps.2").read_text())
        rate = json.loads(report.read_text())["certs_per_s"]
    frames = rate * window / 50
    rows = sorted(
        ((b["steps"][k] - a["steps"].get(k, 0)) / frames,
         (b["spent"][k] - a["spent"].get(k, 0)) / frames * 1e6, k)
        for k in b["steps"]
    )[::-1]  # fmt: skip
    total_steps = sum(r[0] for r in rows)
    print(f"{rate:,.0f} certs/s; per frame of 50: {total_steps:.2f} task steps, "
          f"{sum(r[1] for r in rows):.0f} us inside them, "
          f"{(b['io'] - a['io']) / frames:.2f} epoll waits")  # fmt: skip
    for n, us, name in rows:
        if n >= 0.01:
            print(f"  {name:32s} {n:6.2f} steps  {us:7.1f} us")
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python bench/loop_steps.py " + " ".join(sys.argv[1:]),
            "certs_per_s": rate, "steps_per_frame": round(total_steps, 2),
            "by_task": {name: {"steps": round(n, 3), "us": round(us, 1)}
                        for n, us, name in rows if n >= 0.01},
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
