"""Compare the product's signing core with the naive pipeline and with ``openssl speed``.

    python bench/compare_naive.py [--seconds N] [--rounds R] [--wait-quiet S] [--json FILE]
                                  [--check]

All cases run in one process, interleaved: each round runs every case once, and every other
round runs them in reverse order, so that the drift of a shared VM touches every case alike.
The ratios are taken within a round (same minutes, same machine state) and then summarised
over the rounds; absolute rates are printed too but only the ratios are comparable between
runs.

Cases:
  openssl     ``openssl speed -seconds 1 ecdsap256``: ECDSA P-256 signatures/s, the
              physical anchor (subprocess; system OpenSSL).
  openssl-2p  the same with ``-multi 2``: what two processes get from the machine right now.
  naive       bench/naive.py, one thread, over the same DCCs the product case uses.
  native      ``dccsign.benchcore.run(impl_name="native", threads=1)``: the full product
              path (validation, claims, CBOR, sign, COSE, zlib, base45), what
              ``dccsign bench core --impl native`` prints.
  python      the same with the pure-Python reference implementation.
  native-2t   the native case with two threads (the batch calls release the GIL).

Before timing, one HC1 of each pipeline is decoded and its signature verified.

The machine may be shared: for every sample the script also records the CPU that *other*
processes used meanwhile (from /proc/stat, minus this process and its children), in cores.
When that is well above zero, the 2-thread figure says more about the neighbours than about
dccsign; ``openssl-2p / openssl`` in the same round shows how much of a second core there was.
``--wait-quiet S`` waits (up to S seconds) for a free second core before each two-worker
sample; the two-worker targets are judged on quiet samples only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from naive import naive_hc1, naive_signer, naive_times

from dccsign import native
from dccsign.benchcore import ephemeral_key, run
from dccsign.chain import Issuer
from dccsign.samples import varied_samples
from dccsign.verify import verify_hc1

#: The pool the product benchmark signs from (benchcore.run: max(batch * 16, 1024) DCCs).
POOL = 1024
CHECK_EVERY = 64

TARGET_NATIVE_1T = 15_000.0
TARGET_NATIVE_OVER_NAIVE = 3.0
TARGET_2T_OVER_1T = 1.7

_OPENSSL_RE = re.compile(
    r"256 bits ecdsa \(nistp256\)\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)"
)


# -- environment --------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _openssl_version(binary: str | None) -> str | None:
    if binary is None:
        return None
    out = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def environment(openssl: str | None) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "openssl": _openssl_version(openssl),
        "python": platform.python_version(),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "native_core": native.IMPLEMENTATION,
        "packages": {d: _version(d) for d in ("cryptography", "cbor2", "base45", "dccsign")},
    }


# -- cases --------------------------------------------------------------------------------


def openssl_sign_rate(binary: str, processes: int = 1) -> float:
    """Signatures per second from one ``openssl speed -seconds 1 [-multi N] ecdsap256``."""
    multi = ["-multi", str(processes)] if processes > 1 else []
    out = subprocess.run(
        [binary, "speed", "-seconds", "1", *multi, "ecdsap256"],
        capture_output=True,
        text=True,
        check=True,
    )
    match = _OPENSSL_RE.search(out.stdout)
    if match is None:
        raise RuntimeError(f"cannot parse `openssl speed` output:\n{out.stdout}")
    return float(match.group(1))


class Naive:
    """The naive pipeline over the product benchmark's DCC pool, one thread."""

    def __init__(self) -> None:
        self.signer = naive_signer()
        self.dccs = varied_samples(POOL)
        self.iat, self.exp = naive_times(self.signer, time.time())

    def one(self, dcc: dict[str, Any]) -> str:
        s = self.signer
        return naive_hc1(s.private_key, s.kid, dcc, s.iss, self.iat, self.exp)

    def rate(self, seconds: float) -> float:
        """Certificates per second over about *seconds* of signing."""
        key, kid, iss, iat, exp = (
            self.signer.private_key,
            self.signer.kid,
            self.signer.iss,
            self.iat,
            self.exp,
        )
        dccs, n = self.dccs, len(self.dccs)
        done, i = 0, 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(CHECK_EVERY):
                naive_hc1(key, kid, dccs[i], iss, iat, exp)
                i = i + 1 if i + 1 < n else 0
            done += CHECK_EVERY
            now = time.perf_counter()
            if now >= deadline:
                return done / (now - t0)


def _check_hc1(text: str, dsc: Any, dcc: dict[str, Any], what: str) -> None:
    result = verify_hc1(text, [dsc])
    if not result.valid or result.errors or result.dcc != dcc:
        raise SystemExit(f"{what}: the HC1 does not verify: {result.errors}")


def verify_pipelines(naive_case: Naive, impls: list[str]) -> None:
    """Decode and verify one HC1 from the naive pipeline and a batch from each product impl."""
    dcc = naive_case.dccs[0]
    _check_hc1(naive_case.one(dcc), naive_case.signer.dsc, dcc, "naive pipeline")
    dccs = varied_samples(8)
    for name in impls:
        key = ephemeral_key(name)
        texts = Issuer([key], impl=native.implementation(name)).issue(dccs)
        for text, d in zip(texts, dccs, strict=True):
            _check_hc1(text, key.dsc, d, f"dccsign core ({name})")


class ForeignLoad:
    """CPU used by other processes while a sample runs, in cores (Linux /proc/stat)."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.t0 = self.busy0 = self.own0 = 0.0

    def _busy(self) -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(f) for f in fields]
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait is busy
        # (steal too: the hypervisor gave that time to someone else).
        return (sum(ticks[:8]) - ticks[3] - ticks[4]) / self.tick

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy() or 0.0, self._own()

    def stop(self) -> float | None:
        busy = self._busy()
        if busy is None:
            return None
        wall = time.perf_counter() - self.t0
        return max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / wall


def wait_for_quiet(meter: ForeignLoad, limit: float) -> float:
    """Sleep in half-second steps until other processes use < QUIET_CORES, or *limit* s pass.

    Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        meter.start()
        time.sleep(0.5)
        other = meter.stop()
        if other is None or other < QUIET_CORES:
            break
    return time.perf_counter() - t0


# -- statistics ---------------------------------------------------------------------------

#: A two-worker sample counts as "quiet" when other processes used less than this many cores.
QUIET_CORES = 0.25


def summary(values: list[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


@dataclass(frozen=True)
class Ratio:
    key: str
    label: str
    num: str
    den: str
    target: float | None = None
    two_workers: bool = False  # the numerator needs both cores: also report quiet rounds

    def values(
        self,
        rounds: list[dict[str, float]],
        loads: list[dict[str, float | None]],
        quiet_only: bool = False,
    ) -> list[float]:
        """num / den of every round that measured both (and was quiet, if asked)."""
        out = []
        for sample, load in zip(rounds, loads, strict=True):
            if not (sample.get(self.num) and sample.get(self.den)):
                continue
            other = load.get(self.num)
            if quiet_only and (other is None or other >= QUIET_CORES):
                continue
            out.append(sample[self.num] / sample[self.den])
        return out


RATIOS = [
    Ratio("native_over_naive", "native / naive", "native", "naive", TARGET_NATIVE_OVER_NAIVE),
    Ratio("native_over_openssl", "native / openssl sign", "native", "openssl"),
    Ratio("native_2t_over_1t", "native 2 threads / 1 thread", "native-2t", "native",
          TARGET_2T_OVER_1T, two_workers=True),
    Ratio("openssl_2p_over_1p", "openssl 2 processes / 1 process", "openssl-2p", "openssl",
          two_workers=True),
    Ratio("python_over_naive", "python ref / naive", "python", "naive"),
    Ratio("native_over_python", "native / python ref", "native", "python"),
    Ratio("naive_over_openssl", "naive / openssl sign", "naive", "openssl"),
]

TWO_WORKERS = {"openssl-2p", "native-2t"}

LABELS = {
    "openssl": ("openssl speed ecdsap256, sign", "sign/s"),
    "openssl-2p": ("openssl speed -multi 2 ecdsap256, sign", "sign/s"),
    "naive": ("naive pipeline, 1 thread", "certs/s"),
    "native": ("dccsign core native, 1 thread", "certs/s"),
    "python": ("dccsign core python ref, 1 thread", "certs/s"),
    "native-2t": ("dccsign core native, 2 threads", "certs/s"),
}


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Interleaved comparison: openssl speed vs naive pipeline vs dccsign core."
    )
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="seconds per product/naive sample (default 2)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds; each runs every case once (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write all samples as JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every target is met")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each two-worker sample, wait up to S seconds for other "
                        "processes to leave the second core (default 0: do not wait)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be > 0 and --rounds >= 1")

    openssl = shutil.which("openssl")
    skipped: dict[str, str] = {}
    if openssl is None:
        skipped["openssl"] = skipped["openssl-2p"] = "no `openssl` binary on PATH"
    impls = ["native", "python"]
    try:
        native.implementation("native")
    except ImportError as exc:
        impls.remove("native")
        skipped["native"] = skipped["native-2t"] = f"native implementation not available: {exc}"

    env = environment(openssl)
    naive_case = Naive()
    verify_pipelines(naive_case, impls)

    product_runs: dict[str, list[dict[str, Any]]] = {}

    def product(impl_name: str, threads: int, label: str) -> Callable[[], float]:
        def case() -> float:
            result = run(impl_name=impl_name, threads=threads, seconds=args.seconds)
            product_runs.setdefault(label, []).append(result)
            return float(result["certs_per_s"])

        return case

    cases: dict[str, Callable[[], float]] = {}
    if openssl is not None:
        cases["openssl"] = lambda: openssl_sign_rate(openssl)
        cases["openssl-2p"] = lambda: openssl_sign_rate(openssl, 2)
    cases["naive"] = lambda: naive_case.rate(args.seconds)
    if "native" in impls:
        cases["native"] = product("native", 1, "native")
    cases["python"] = product("python", 1, "python")
    if "native" in impls:
        cases["native-2t"] = product("native", 2, "native-2t")

    print(
        f"{env['date']}  nproc={env['nproc']}  cpu={env['cpu_model']}  "
        f"{env['openssl'] or 'no openssl'}  python {env['python']}  zlib {env['zlib']}",
        flush=True,
    )
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", flush=True)
    print(f"{args.rounds} rounds x {len(cases)} cases, {args.seconds:g} s per sample "
          "(openssl: 1 s); every pipeline's HC1 verified first", flush=True)
    print("per sample: rate (cores used by other processes meanwhile)", flush=True)

    rounds: list[dict[str, float]] = []
    loads: list[dict[str, float | None]] = []
    meter = ForeignLoad()
    order = list(cases)
    for r in range(args.rounds):
        sample: dict[str, float] = {}
        load: dict[str, float | None] = {}
        for name in order if r % 2 == 0 else order[::-1]:
            if name in TWO_WORKERS and args.wait_quiet > 0:
                wait_for_quiet(meter, args.wait_quiet)
            meter.start()
            sample[name] = cases[name]()
            load[name] = meter.stop()
        rounds.append(sample)
        loads.append(load)
        parts = []
        for n in order:
            other = load[n]
            parts.append(f"{n} {sample[n]:,.0f}" + (f" ({other:.2f})" if other is not None else ""))
        print(f"  round {r + 1}: " + ", ".join(parts), flush=True)

    rates = {name: summary([s[name] for s in rounds]) for name in order}
    foreign = {
        name: summary([v for ld in loads if (v := ld.get(name)) is not None]) for name in order
    }
    all_ratios = {q.key: q.values(rounds, loads) for q in RATIOS}
    quiet_ratios = {q.key: q.values(rounds, loads, quiet_only=True) for q in RATIOS
                    if q.two_workers}

    print()
    print(f"{'case':<42} {'median':>9} {'min':>9} {'max':>9}  {'unit':<8} other processes")
    for name in order:
        label, unit = LABELS[name]
        s = rates[name]
        f = foreign[name]
        other = f"{f['median']:.2f} cores (median)" if f else "-"
        print(
            f"{label:<42} {s['median']:>9,.0f} {s['min']:>9,.0f} {s['max']:>9,.0f}  "
            f"{unit:<8} {other}"
        )
    if "native-2t" in product_runs:
        cores = [e["cpu_cores_used"] for e in product_runs["native-2t"]]
        print(f"{'  native 2 threads: cores busy (median)':<42} {statistics.median(cores):>9.2f}")

    def ratio_line(label: str, values: list[float], goal: str) -> None:
        s = summary(values)
        if s is None:
            print(f"{label:<42} {'-':>9} {'-':>9} {'-':>9}  {0:>3}  {goal}")
        else:
            print(f"{label:<42} {s['median']:>9.2f} {s['min']:>9.2f} {s['max']:>9.2f}  "
                  f"{s['n']:>3}  {goal}")

    print()
    print(f"{'ratio, within each round':<42} {'median':>9} {'min':>9} {'max':>9}  "
          f"{'n':>3}  target")
    for q in RATIOS:
        if not all_ratios[q.key]:
            continue
        goal = f">= {q.target:g}" if q.target else ""
        ratio_line(q.label, all_ratios[q.key], goal)
        if q.two_workers:
            ratio_line(f"  same, quiet rounds only (< {QUIET_CORES:g} other cores)",
                       quiet_ratios[q.key], goal)

    checks: list[tuple[str, str]] = []
    if rates.get("native"):
        ok = rates["native"]["median"] >= TARGET_NATIVE_1T
        checks.append(("PASS" if ok else "FAIL",
                       f"native >= {TARGET_NATIVE_1T:,.0f} certs/s on one core (median)"))
    for q in RATIOS:
        if q.target is None or not all_ratios[q.key]:
            continue
        values = quiet_ratios[q.key] if q.two_workers else all_ratios[q.key]
        where = "quiet rounds" if q.two_workers else "all rounds"
        text = f"{q.label} >= {q.target:g} (median of {where})"
        if not values:
            checks.append(("UNKNOWN", f"{text}: no quiet round, the second core was busy"))
        else:
            checks.append(("PASS" if statistics.median(values) >= q.target else "FAIL", text))
    print()
    for status, text in checks:
        print(f"{status:<8} {text}")
    if not checks:
        print("no target could be checked (native implementation missing)")

    if args.json:
        doc = {
            "benchmark": "compare_naive",
            "command": " ".join(["python", "bench/compare_naive.py", *(argv or sys.argv[1:])]),
            "environment": env,
            "seconds_per_sample": args.seconds,
            "order": order,
            "rounds": rounds,
            "other_processes_cores": loads,
            "skipped": skipped,
            "rates": rates,
            "ratios": {
                q.key: {
                    "label": q.label,
                    "target": q.target,
                    "all_rounds": all_ratios[q.key],
                    **({"quiet_rounds": quiet_ratios[q.key]} if q.two_workers else {}),
                }
                for q in RATIOS
            },
            "product_runs": product_runs,
            "checks": [{"status": st, "target": t} for st, t in checks],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    if args.check and (not checks or any(st != "PASS" for st, _ in checks)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
