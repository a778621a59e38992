"""What the shared state (``serve --state``) costs the engine per certificate, by frames per
call, against a real ``redis-server``.

    .venv/bin/python bench/state_cost.py [--frames 1,2,4,8] [--seconds 3] [--rounds 3] [--json F]

The engine charges a frame's quotas once per distinct account (a busy portal's frame of 50
names ~50 accounts). In process that is ``QuotaTracker.try_reserve_many``; with ``--state``
it is ``RedisState.charge_soon``: the frame's accounts packed into three strings, queued, and
one call of the Lua script for everything queued, whose answer goes back to each frame. This
script does exactly that in a trio loop of its own, F frames of 50 accounts (out of 10,000)
per call, and measures this process's CPU (time.process_time: every thread; Redis runs in
its own process and is measured apart, from its INFO) per certificate, and the same frames
through the in-process tracker, which the shared store replaces. The difference is what
``--state`` adds to the engine's CPU per certificate at F frames per call; the engine's
``dccsign_state_call_operations`` (sum / count / 50) tells F at a given load, and
``bench/scale_out.py`` reports it for its runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from dccsign.server.policy import Policy, QuotaTracker
from dccsign.server.sharedstate import RedisState
from dccsign.testing import cluster as C

BIG = {"per_hour": 10**9}
POLICY = Policy.from_dict({"clients": {"portal": {"quota": BIG, "account_quota": BIG}}})
ACCOUNTS = [f"load:{i:04d}" for i in range(10_000)]
FRAME = 50


#: Frames drawn before any measurement (each 50 distinct accounts), cycled through.
_POOL = [random.Random(i).sample(ACCOUNTS, FRAME) for i in range(1024)]


def _frames(n: int, at: int) -> list[list[str]]:
    return [_POOL[(at + k) % len(_POOL)] for k in range(n)]


async def _shared(state: RedisState, per_call: int, seconds: float) -> tuple[float, int]:
    """CPU seconds and certificates for *seconds* of calls of *per_call* frames each."""
    counts = [1] * FRAME
    certs = 0
    cpu0 = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done = trio.Event()
        left = [per_call]

        def answered(verdicts, done=done, left=left):
            if not isinstance(verdicts, list):
                raise SystemExit(f"the store failed: {verdicts}")
            left[0] -= 1
            if not left[0]:
                done.set()

        for accounts in _frames(per_call, certs // FRAME):
            state.charge_soon(POLICY, "portal", accounts, counts, answered)
        await done.wait()
        certs += per_call * FRAME
    return time.process_time() - cpu0, certs


def _local(per_call: int, seconds: float) -> tuple[float, int]:
    tracker = QuotaTracker()
    counts = [1] * FRAME
    certs = 0
    cpu0 = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for accounts in _frames(per_call, certs // FRAME):
            tracker.try_reserve_many(POLICY, "portal", accounts, counts)
        certs += per_call * FRAME
    return time.process_time() - cpu0, certs


def _redis_cpu(port: int) -> float:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "cpu"], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


async def _measure(url: str, port: int, args) -> dict:
    rows: dict[int, dict[str, list[float]]] = {}
    state = RedisState(url, node="bench", window=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        while state.problem is not None:  # noqa: ASYNC110 -- its connection, a plain attribute
            await trio.sleep(0.01)
        for _ in range(args.rounds):
            for f in args.frames:
                row = rows.setdefault(f, {"shared": [], "local": [], "redis": []})
                before = _redis_cpu(port)
                cpu, certs = await _shared(state, f, args.seconds)
                row["redis"].append((_redis_cpu(port) - before) / certs * 1e6)
                row["shared"].append(cpu / certs * 1e6)
                cpu, certs = _local(f, args.seconds)
                row["local"].append(cpu / certs * 1e6)
        nursery.cancel_scope.cancel()
    out = {}
    for f, row in rows.items():
        med = {k: round(statistics.median(v), 2) for k, v in row.items()}
        paired = [s - loc for s, loc in zip(row["shared"], row["local"], strict=True)]
        med["added"] = round(statistics.median(paired), 2)
        med["added_min"], med["added_max"] = round(min(paired), 2), round(max(paired), 2)
        out[str(f)] = med
        print(
            f"{f} frame(s) of {FRAME} per call: engine {med['shared']} us/cert with --state, "
            f"{med['local']} in process: --state adds {med['added']} us/cert "
            f"({med['added_min']}..{med['added_max']}); Redis {med['redis']} us/cert"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--frames", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4, 8]
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    if "redis-server" in C.missing_tools():
        raise SystemExit("state_cost: needs redis-server (Debian package redis-server)")
    with tempfile.TemporaryDirectory(prefix="dccsign-state-") as tmp:
        redis = C.Redis(Path(tmp), C.free_port())
        redis.start()
        try:
            redis.wait_ready(60)
            result = trio.run(_measure, redis.url, redis.port, args)
        finally:
            redis.stop()
    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python bench/state_cost.py " + " ".join(sys.argv[1:]),
            "frame": FRAME, "accounts": len(ACCOUNTS), "per_frames_per_call": result,
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
