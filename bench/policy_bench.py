"""Cost of the policy hot path: ``Policy.check`` + ``QuotaTracker.try_reserve`` per item.

    python bench/policy_bench.py [--items N] [--accounts N] [--rounds R]

Prints microseconds per item (best and median of R rounds) for a client with every rule set
(kid, type, country and issuer lists, a client quota and a two-window account quota), items
spread over N accounts, and the memory the tracker holds per account (tracemalloc). Not a
test: times on a shared VM drift, read them as an order of magnitude (the target is a few
µs per item, well under 20).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from dccsign.server.policy import Policy, PolicyFile, QuotaTracker
from dccsign.testing.samples import sample

KID = bytes.fromhex("d0ff3fe0ad2e2c1b")
POLICY = {
    "clients": {
        "portal-a": {
            "kids": [KID.hex()],
            "types": ["v", "t", "r"],
            "countries": ["NL"],
            "issuers": ["Ministry of Health Welfare and Sport"],
            "quota": {"per_minute": 10**9, "per_hour": 10**9},
            "account_quota": {"per_hour": 10**9, "per_day": 10**9},
        }
    }
}


class Clock:
    """A fake clock that advances 1 ms per read (for the memory measurement: every
    reservation of it lands in the same few buckets as in service)."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def one_round(policy: Policy, items: int, accounts: list[str]) -> float:
    tracker = QuotaTracker(time.monotonic)  # the engine's clock
    dccs = [(t, sample(t)) for t in "vtr"]
    check = policy.check
    reserve = tracker.try_reserve
    n_acc = len(accounts)
    start = time.perf_counter()
    for i in range(items):
        dcc_type, dcc = dccs[i % 3]
        if check("portal-a", KID, dcc_type, dcc) is not None:
            raise SystemExit("unexpected refusal by check")
        if reserve(policy, "portal-a", accounts[i % n_acc]) is not None:
            raise SystemExit("unexpected refusal by try_reserve")
    return (time.perf_counter() - start) / items * 1e6


def bytes_per_account(policy: Policy, count: int) -> float:
    tracker = QuotaTracker(Clock(), max_accounts=count)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        tracker.try_reserve(policy, "portal-a", f"uzi:{900000000 + i}")
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--accounts", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    policy = Policy.from_dict(POLICY, source="bench")
    accounts = [f"uzi:{900000000 + i}" for i in range(args.accounts)]
    one_round(policy, min(args.items, 10_000), accounts)  # warm-up
    times = [one_round(policy, args.items, accounts) for _ in range(args.rounds)]
    print(
        f"check + try_reserve: {min(times):.2f} µs/item best, "
        f"{statistics.median(times):.2f} µs/item median "
        f"({args.rounds} rounds x {args.items:,} items over {args.accounts:,} accounts)"
    )
    tracker = QuotaTracker(time.monotonic)
    dcc = sample("v")
    start = time.perf_counter()
    for _ in range(args.items):
        policy.check("portal-a", KID, "v", dcc)
    check_us = (time.perf_counter() - start) / args.items * 1e6
    start = time.perf_counter()
    for i in range(args.items):
        tracker.try_reserve(policy, "portal-a", accounts[i % len(accounts)])
    reserve_us = (time.perf_counter() - start) / args.items * 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.json"
        path.write_text(json.dumps(POLICY))
        current = PolicyFile(path).current
        start = time.perf_counter()
        for _ in range(args.items):
            current()
        current_us = (time.perf_counter() - start) / args.items * 1e6
    print(
        f"  check alone {check_us:.2f} µs/item, try_reserve alone {reserve_us:.2f} µs/item, "
        f"PolicyFile.current() {current_us:.2f} µs/item"
    )
    per_account = bytes_per_account(policy, 50_000)
    print(f"tracker memory: {per_account:.0f} bytes per account (one reservation, 2 windows)")


if __name__ == "__main__":
    main()
