"""Per-item cost of the data plane's frame functions (issue 14 items 1, 3, 5) against today's
code on the same frames: request walk vs decode, claims splice vs ``cbor2.dumps``, reply body
vs ``hc1_encode`` + ``ItemResult`` + ``Connection.send``.

Two measures, both written to the JSON result:

* ``cpu``: this thread's CPU time (``time.thread_time_ns``) per item, contenders interleaved
  round by round (odd rounds reversed) so that drift touches each alike; ratios are taken
  within each round, then the median. Other agents on the machine still move the absolute
  numbers; the ratios hold better.
* ``instructions`` (``--instructions``, needs valgrind): instructions per item counted by
  callgrind over N and 2N frames of each contender in a child process (the difference, so
  start-up cancels; the set-up's objects frozen out of the GC); repeatable under load.

Also the share of items that take the splice's slow path, for the sample generator's DCCs
encoded by the protocol's own client.

    .venv/bin/python bench/dataplane_micro.py                     # ~1 min
    .venv/bin/python bench/dataplane_micro.py --instructions      # + callgrind, ~10 min
    # writes bench/results/dataplane_micro-YYYY-MM-DD.json (--json FILE to choose)
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cbor2

from benchsetup import save_result
from dccsign import native
from dccsign.dcc.issuer import claims_prefix, nfc_names
from dccsign.native import _reference
from dccsign.protocol import wire
from dccsign.testing.samples import varied_samples

ROOT = Path(__file__).resolve().parents[1]
KIDS = [b"kid-one!", b"kid-two!"]


class Frame:
    """One SIGN_BATCH of *n* sample DCCs as the protocol client sends it, and what each
    contender needs to start from (both sides get the same inputs)."""

    def __init__(self, n: int, seed: int = 14) -> None:
        nat = native.implementation("native")
        self.n = n
        dccs = varied_samples(n, seed=seed)
        items = tuple(
            wire.SignItem(d, f"uzi:9000{i % 7}", kid=KIDS[i % 2], validity_days=365)
            for i, d in enumerate(dccs)
        )
        self.body = cbor2.dumps(wire.bodies.body_of(wire.SignBatch(1, items), check_dcc=True))
        self.max_batch = max(n, 100)
        self.limit = wire.body_item_limit(self.max_batch)
        self.items = items
        self.view = nat.walk_sign_batch(self.body, self.max_batch)
        self.prefixes = [claims_prefix("NL", 1_700_000_000 + k, 1_731_536_000) for k in (0, 1)]
        self.prefix_of = array.array("I", [i % 2 for i in range(n)])
        spliced = nat.splice_payloads(self.view, self.prefixes, self.prefix_of)
        self.payloads = [spliced.payload(i) for i in range(n)]
        self.payload_buf, self.payload_off = spliced.data, spliced.offsets
        self.protected = [nat.protected_header(-7, k) for k in KIDS]
        self.signatures = [os.urandom(64) for _ in range(n)]
        self.sig_buf = b"".join(self.signatures)
        self.sig_off = array.array("I", range(0, 64 * n + 1, 64)).tobytes()
        self.prot_of = array.array("I", [i % 2 for i in range(n)])
        self.server = _open_server(self.max_batch)
        self.plain_server = _open_server(self.max_batch, compression=())


def _open_server(max_batch: int, compression: tuple[str, ...] = ("zstd",)) -> wire.Connection:
    client = wire.Connection(wire.CLIENT)
    server = wire.Connection(wire.SERVER, compression=compression)
    server.receive_data(client.send(client.make_hello()))
    server.next_event()
    welcome = server.make_welcome(max_batch=max_batch, max_in_flight=4, server="bench")
    client.receive_data(server.send(welcome))
    client.next_event()
    server.receive_data(client.send(wire.SignBatch(1, (wire.SignItem({}, "x"),))))
    server.next_event()
    return server


# ----------------------------------------------------------------------------- contenders
# Each takes a Frame and does one frame's work.


def decode_today(f: Frame) -> object:
    value = wire.bodies.decode_cbor(f.body, native.cbor_scan, f.limit)
    return wire.bodies.read_sign_batch(1, value, f.max_batch)


def walk_native(f: Frame) -> object:
    return native.implementation("native").walk_sign_batch(f.body, f.max_batch)


def walk_python(f: Frame) -> object:
    return _reference.walk_sign_batch(f.body, f.max_batch)


def payloads_today(f: Frame) -> object:
    dumps = cbor2.dumps
    return [f.prefixes[i % 2] + dumps(nfc_names(it.dcc)) for i, it in enumerate(f.items)]


def splice_native(f: Frame) -> object:
    return native.implementation("native").splice_payloads(f.view, f.prefixes, f.prefix_of)


def reply_today(f: Frame, plain: bool = False) -> object:
    nat = native.implementation("native")
    results: list = [None] * f.n
    for k in (0, 1):  # one hc1_encode call per kid, as the dispatcher makes them
        idx = range(k, f.n, 2)
        hc1s = nat.hc1_encode(
            f.protected[k], [f.payloads[i] for i in idx], [f.signatures[i] for i in idx]
        )
        for i, h in zip(idx, hc1s, strict=True):
            results[i] = wire.ItemResult(hc1=h, kid=KIDS[k])
    server = f.plain_server if plain else f.server
    return server.send(wire.SignBatchResult(1, tuple(results)))


def reply_native(f: Frame, plain: bool = False) -> object:
    body = native.implementation("native").encode_sign_batch_result(
        f.protected, KIDS, f.prot_of, f.payload_buf, f.payload_off, f.sig_buf, f.sig_off, {}
    )
    server = f.plain_server if plain else f.server
    return server.send_encoded_result(1, body, f.n)


def reply_today_plain(f: Frame) -> object:
    """The same without zstd on the connection: what is left is the body's own cost."""
    return reply_today(f, plain=True)


def reply_native_plain(f: Frame) -> object:
    return reply_native(f, plain=True)


def hc1_only(f: Frame) -> object:
    nat = native.implementation("native")
    return [
        nat.hc1_encode(
            f.protected[k],
            [f.payloads[i] for i in range(k, f.n, 2)],
            [f.signatures[i] for i in range(k, f.n, 2)],
        )
        for k in (0, 1)
    ]


CONTENDERS = {
    "decode_today": decode_today,
    "walk_native": walk_native,
    "walk_python": walk_python,
    "payloads_today": payloads_today,
    "splice_native": splice_native,
    "reply_today": reply_today,
    "reply_native": reply_native,
    "reply_today_plain": reply_today_plain,
    "reply_native_plain": reply_native_plain,
    "hc1_encode_only": hc1_only,
}
RATIOS = {
    "walk: today / native": ("decode_today", "walk_native"),
    "splice: today / native": ("payloads_today", "splice_native"),
    "reply: today / native": ("reply_today", "reply_native"),
    "reply minus hc1_encode: today / native": (
        ("reply_today", "hc1_encode_only"),
        ("reply_native", "hc1_encode_only"),
    ),
    "reply, no zstd: today / native": ("reply_today_plain", "reply_native_plain"),
}
#: What each step saves per item (today - native): the reply's own cost is close to zero
#: beside hc1_encode, so a ratio of the remainders would mean nothing.
SAVINGS = {
    "walk": ("decode_today", "walk_native"),
    "splice": ("payloads_today", "splice_native"),
    "reply": ("reply_today", "reply_native"),
    "reply, no zstd": ("reply_today_plain", "reply_native_plain"),
}


def savings(per_item: dict[str, float]) -> dict[str, float]:
    return {k: per_item[a] - per_item[b] for k, (a, b) in SAVINGS.items()
            if a in per_item and b in per_item}  # fmt: skip


def _check(f: Frame) -> None:
    """Every contender's output is the same as today's before anything is timed."""
    today = decode_today(f).items
    for view in (walk_native(f), walk_python(f)):
        assert view.sign_items() == today
    spliced = splice_native(f)
    assert [spliced.payload(i) for i in range(f.n)] == payloads_today(f)
    assert reply_today(f) == reply_native(f)
    assert reply_today_plain(f) == reply_native_plain(f)


def _per_item_ns(fn, f: Frame, frames: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(frames):
        fn(f)
    return (time.thread_time_ns() - t0) / (frames * f.n)


def run_cpu(f: Frame, rounds: int, seconds: float) -> dict:
    names = list(CONTENDERS)
    frames = {}
    for name in names:  # frames per sample: about `seconds` each
        probe = max(_per_item_ns(CONTENDERS[name], f, 3), 1.0)
        frames[name] = max(3, int(seconds * 1e9 / (probe * f.n)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(_per_item_ns(CONTENDERS[name], f, frames[name]))
    per_item_us = {n: statistics.median(v) / 1000 for n, v in samples.items()}

    def value(spec, r):
        if isinstance(spec, tuple):
            return samples[spec[0]][r] - samples[spec[1]][r]
        return samples[spec][r]

    ratios = {
        label: statistics.median(value(a, r) / value(b, r) for r in range(rounds))
        for label, (a, b) in RATIOS.items()
    }
    return {"per_item_us_median": per_item_us, "ratios_median": ratios,
            "saved_us_per_item": savings(per_item_us), "rounds": rounds,
            "samples_ns": samples}  # fmt: skip


_COLLECTED = re.compile(r"Collected : (\d+)")


def _instructions(name: str, n: int, frames: int) -> int:
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--run", name, "--items", str(n), "--frames", str(frames),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return int(_COLLECTED.search(out.stderr).group(1))


def run_instructions(n: int, frames: int, only: list[str] | None = None) -> dict:
    per_item = {}
    for name in CONTENDERS:
        if name == "walk_python" or (only and name not in only):
            continue  # the reference: readable, not fast
        a = _instructions(name, n, frames)
        b = _instructions(name, n, 2 * frames)
        per_item[name] = (b - a) / (frames * n)
        print(f"  {name:18s} {per_item[name]:12.0f} instructions per item", flush=True)

    def value(spec):
        if isinstance(spec, tuple):
            return per_item[spec[0]] - per_item[spec[1]]
        return per_item[spec]

    ratios = {}
    for label, (a, b) in RATIOS.items():
        try:
            ratios[label] = value(a) / value(b)
        except KeyError:
            pass  # a contender left out (--only)
    return {"per_item": per_item, "ratios": ratios, "saved_per_item": savings(per_item),
            "frames": [frames, 2 * frames]}  # fmt: skip


def slow_share(count: int, batch: int) -> dict:
    """Items taking the splice's slow path: sample DCCs encoded by the protocol's client."""
    nat = native.implementation("native")
    dccs = varied_samples(count, seed=2021)
    slow = 0
    for start in range(0, count, batch):
        part = dccs[start : start + batch]
        items = tuple(wire.SignItem(d, "uzi:1") for d in part)
        body = cbor2.dumps(wire.bodies.body_of(wire.SignBatch(1, items), check_dcc=True))
        view = nat.walk_sign_batch(body, batch)
        spliced = nat.splice_payloads(view, [b"\xa0"], array.array("I", [0] * view.count))
        slow += spliced.slow
    return {"items": count, "slow": slow, "share": slow / count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=50, help="items per frame (default 50)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.4, help="per sample")
    ap.add_argument("--instructions", action="store_true", help="also count with callgrind")
    ap.add_argument("--frames", type=int, default=10, help="frames per callgrind run")
    ap.add_argument("--only", help="callgrind only these contenders (comma-separated)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--run", help=argparse.SUPPRESS)  # a callgrind child: run one contender
    args = ap.parse_args()
    f = Frame(args.items)
    if args.run:
        fn = CONTENDERS[args.run]
        fn(f)  # warm: lazy imports, caches
        # The set-up's objects (samples, frames) are not what is measured: frozen, the
        # collections that the contender's own allocations trigger do not walk them, so N
        # and 2N frames differ by the contender's work (GC included) and not by chance.
        gc.collect()
        gc.freeze()
        for _ in range(args.frames):
            fn(f)
        return 0
    _check(f)
    result: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "items_per_frame": args.items,
        "load_avg": os.getloadavg(),
        "cpu": run_cpu(f, args.rounds, args.seconds),
        "splice_slow_path": slow_share(10_000, 100),
    }
    print(json.dumps({k: v for k, v in result["cpu"].items() if k != "samples_ns"}, indent=1))
    print("splice slow path:", result["splice_slow_path"])
    if args.instructions:
        only = args.only.split(",") if args.only else None
        result["instructions"] = run_instructions(args.items, args.frames, only)
        print(json.dumps(result["instructions"]["ratios"], indent=1))
    print("wrote", save_result(result, "dataplane_micro", args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
