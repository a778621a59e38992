"""Python lines the engine and keyd execute per frame: a count that does not drift.

Timings on this machine move by ±30 % and more between runs; the number of Python lines the
interpreter runs for one frame does not. This tool starts ``dccsign serve --dev`` with a line
tracer (``sys.settrace``) in the engine's event loop and, with ``--keyd``, in every thread of
its keyd; drives it with ``dccsign bench load --closed-loop`` over loopback TLS (4
connections × 2 frames of 50, 10,000 accounts, the generator untraced) for ``--seconds``;
stops it, and divides each function's line events by the frames answered. Start-up is in the
counts, except imports and regular-expression compiling; ``--min-calls`` (default 0.5 per
frame) leaves out what does not run per frame.

The tracer slows the engine about tenfold, so fewer frames fit in a run; what is counted
per frame is unaffected, except the per-account work of accounts seen for the first time
(there are more of them per frame in a short run).

    .venv/bin/python bench/frame_lines.py --keyd --json bench/results/frame_lines-$(date +%F).json
    # an older checkout: arranged as bench/engine_ab.py says, in DIR
    PYTHONPATH=DIR .venv/bin/python bench/frame_lines.py --json ...

It prints lines per frame in total, by file and for the top functions ("frames": the
requests the engine answered, its ``dccsign_requests_total``).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import benchsetup

_HERE = Path(__file__).resolve().parent

# Run as ``python _tracer.py OUT -m dccsign ...``, or imported as sitecustomize in keyd (the
# engine starts keyd itself): count line events per code object, write them at exit.
_TRACER = """
import atexit, collections, json, os, runpy, sys, threading
def _install(out):
    lines = collections.Counter()
    calls = collections.Counter()
    def local(frame, event, arg):
        if event == "line":
            lines[frame.f_code] += 1
        return local
    def called(frame, event, arg):
        calls[frame.f_code] += 1
        return local
    def dump():
        sys.settrace(None)
        threading.settrace(None)
        rows = {}
        for code in list(set(lines) | set(calls)):
            key = f"{code.co_filename}:{code.co_firstlineno}:{code.co_name}"
            rows[key] = [lines[code], calls[code]]
        with open(out, "w") as f:
            json.dump(rows, f)
    atexit.register(dump)
    threading.settrace(called)
    sys.settrace(called)
if __name__ == "__main__":
    out = sys.argv[1]
    sys.argv = sys.argv[3:]
    _install(out)
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    _out = os.environ.get("DCCSIGN_FRAME_LINES_KEYD")
    if _out:
        _argv = open("/proc/self/cmdline", "rb").read().split(b"\\0")
        if b"keyd" in _argv and b"serve" not in _argv:
            _install(f"{_out}.{os.getpid()}")
"""


def _short(key: str) -> str:
    path, line, name = key.rsplit(":", 2)
    for marker in ("/site-packages/", "/dccsign/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.rsplit("/lib/python3", 1)[-1]
    return f"{path}:{line}:{name}"


def _requests_answered(url: str) -> int:
    """The engine's ``dccsign_requests_total`` over all clients: the frames it answered."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return round(sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("dccsign_requests_total")
    ))  # fmt: skip


#: Code that runs at start-up only (imports and compiling regular expressions), however often
#: it is called then: left out of the counts.
_START_UP = ("<frozen importlib", "/re/_parser.py", "/re/_compiler.py", "/re/__init__.py")


def per_frame(rows: dict[str, list[int]], frames: float, min_calls: float) -> dict:
    """Line events per frame: total, by file, and by function (those called at least
    *min_calls* times per frame, start-up code left out)."""
    funcs = {
        _short(k): (lines / frames, calls / frames)
        for k, (lines, calls) in rows.items()
        if calls >= min_calls * frames and not any(s in k for s in _START_UP)
    }
    by_file: collections.Counter[str] = collections.Counter()
    for key, (lines, _calls) in funcs.items():
        path = key.rsplit(":", 2)[0]
        by_file["trio" if path.startswith("trio/") else path] += lines
    top = sorted(funcs.items(), key=lambda kv: -kv[1][0])
    return {
        "lines_per_frame": round(sum(v[0] for v in funcs.values()), 1),
        "by_file": {k: round(v, 1) for k, v in by_file.most_common()},
        "functions": {k: {"lines": round(v[0], 1), "calls": round(v[1], 2)} for k, v in top},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keyd", action="store_true", help="count keyd's threads too")
    parser.add_argument("--min-calls", type=float, default=0.5, metavar="PER_FRAME")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dccsign-lines-") as tmp:
        work = Path(tmp)
        tracer_dir = work / "tracer"
        tracer_dir.mkdir()
        (tracer_dir / "sitecustomize.py").write_text(_TRACER)
        engine_out = work / "engine-lines.json"
        keyd_out = work / "keyd-lines.json"
        saved = benchsetup.DCCSIGN
        env_before = dict(os.environ)
        benchsetup.DCCSIGN = [
            sys.executable, str(tracer_dir / "sitecustomize.py"), str(engine_out), "-m", "dccsign"
        ]  # fmt: skip
        if args.keyd:
            os.environ["DCCSIGN_FRAME_LINES_KEYD"] = str(keyd_out)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(tracer_dir), env_before.get("PYTHONPATH")) if p
            )
        try:
            with benchsetup.dev_engine(work) as engine:
                report = work / "load.json"
                subprocess.run(
                    [*saved, "bench", "load", "--quiet", *engine.load_args(), "--closed-loop",
                     "--batch", "50", "--connections", "4", "--in-flight", "2",
                     "--duration", str(args.seconds), "--verify-sample", "0",
                     "--json", str(report)],
                    check=True, capture_output=True, env=env_before,
                )  # fmt: skip
                load = json.loads(report.read_text())
                frames = _requests_answered(engine.metrics_url())
        finally:
            benchsetup.DCCSIGN = saved
            os.environ.clear()
            os.environ.update(env_before)
        for _ in range(100):  # the engine writes its counts as it exits
            if engine_out.exists() and (not args.keyd or list(work.glob("keyd-lines.json.*"))):
                break
            time.sleep(0.1)
        result = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python bench/frame_lines.py " + " ".join(sys.argv[1:]),
            "frames": round(frames),
            "certs_per_s_traced": load["certs_per_s"],
            "engine": per_frame(json.loads(engine_out.read_text()), frames, args.min_calls),
        }
        if args.keyd:
            rows: dict[str, list[int]] = {}
            for path in work.glob("keyd-lines.json.*"):
                for k, v in json.loads(path.read_text()).items():
                    rows[k] = [a + b for a, b in zip(rows.get(k, [0, 0]), v, strict=True)]
            result["keyd"] = per_frame(rows, frames, args.min_calls)
    for who in ("engine", "keyd"):
        if who not in result:
            continue
        part = result[who]
        print(f"{who}: {part['lines_per_frame']:,.0f} Python lines per frame "
              f"({result['frames']:,} frames)")  # fmt: skip
        for path, lines in list(part["by_file"].items())[:10]:
            print(f"  {lines:8.1f}  {path}")
        for key, v in list(part["functions"].items())[: args.top]:
            print(f"  {v['lines']:8.1f} lines {v['calls']:6.2f} calls  {key}")
    if args.json:
        benchsetup.save_result(result, "frame_lines", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
