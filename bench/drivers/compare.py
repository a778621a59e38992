"""``dccsign bench compare``: the product against its ceiling and its baseline, in one run.

Rows (each measured in every round, same process, same DCC pool):

  openssl      ``openssl speed -seconds 1 ecdsap256``: ECDSA P-256 signatures/s on one core,
               the signing ceiling (subprocess; system OpenSSL).
  openssl-all  the same with ``-multi N`` (N = ``--threads``, default all cores).
  naive        the naive pipeline a user would write (cbor2 + cryptography + zlib + PyPI
               base45), one thread. It lives in the source checkout (``bench/naive.py``),
               never in the product: it is loaded from its file with importlib.
  python       ``dccsign.bench.core.run(impl_name="python", threads=1)``: the pure-Python
               reference of the product path.
  native       the same with the native core, one thread (what ``dccsign bench core`` prints).
  native-all   the native core with N threads (the batch calls release the GIL).
  engine       only with ``--server``: the running engine end to end, from
               ``dccsign bench load --closed-loop --batch 50`` run as a subprocess.

Rounds are interleaved (every other round in reverse order), so that the drift of a shared
VM touches every row alike; the ratios are taken within a round and their median reported.
Before timing, one HC1 of the naive pipeline and a batch of each product implementation are
decoded and their signatures verified; the engine row verifies a 1% sample after each run.
For every sample the CPU used meanwhile by *other* processes is recorded (Linux /proc/stat).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from ..cli.args import add_options, number, tls_client_args
from ..cli.exits import error_exit

__all__ = [
    "ForeignLoad",
    "Naive",
    "add_compare_parser",
    "cmd_bench_compare",
    "compare",
    "find_naive",
    "load_naive",
    "openssl_sign_rate",
    "print_table",
]

EXIT_OK = 0
EXIT_WRONG = 1
EXIT_USAGE = 2
EXIT_ENGINE = 4

#: The pool the product benchmark signs from (core.run: max(batch * 16, 1024) DCCs).
POOL = 1024
CHECK_EVERY = 64
#: A multi-worker sample counts as "quiet" when other processes used less than this.
QUIET_CORES = 0.25

NAIVE_HOME = "it lives in the source checkout, never in the product"
ROWS = ("openssl", "openssl-all", "naive", "python", "native", "native-all", "engine")
MULTI = {"openssl-all", "native-all", "engine"}

_OPENSSL_RE = re.compile(r"256 bits ecdsa \(nistp256\)\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)")


class CompareError(Exception):
    """A pipeline's output did not verify, or a row could not run at all."""


def row_labels(threads: int) -> dict[str, tuple[str, str]]:
    """``{row: (label, unit)}``."""
    return {
        "openssl": ("openssl speed ecdsap256, 1 process", "sign/s"),
        "openssl-all": (f"openssl speed -multi {threads} ecdsap256", "sign/s"),
        "naive": ("naive pipeline (cbor2+cryptography), 1 thread", "certs/s"),
        "python": ("dccsign core, python reference, 1 thread", "certs/s"),
        "native": ("dccsign core, native, 1 thread", "certs/s"),
        "native-all": (f"dccsign core, native, {threads} threads", "certs/s"),
        "engine": ("engine end to end (bench load, closed loop)", "certs/s"),
    }


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


def environment(openssl: str | None) -> dict[str, Any]:
    from .. import native

    version = None
    if openssl is not None:
        out = subprocess.run([openssl, "version"], capture_output=True, text=True, check=False)
        version = out.stdout.strip() or None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "openssl": version,
        "python": platform.python_version(),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "native_core": native.IMPLEMENTATION,
        "packages": {d: _version(d) for d in ("cryptography", "cbor2", "base45", "dccsign")},
    }


# -- the rows -----------------------------------------------------------------------------


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
        raise CompareError(f"cannot parse `openssl speed` output:\n{out.stdout}")
    return float(match.group(1))


def find_naive() -> Path | None:
    """``bench/naive.py`` under the current directory or beside these drivers (which live in
    ``bench/drivers`` of a source checkout); None if there is none (an installed product has
    none)."""
    beside = Path(__file__).resolve().parents[1] / "naive.py"
    for path in (Path.cwd() / "bench" / "naive.py", beside):
        if path.is_file():
            return path
    return None


def load_naive(path: Path) -> ModuleType:
    """Import the naive pipeline from its file (never ``import bench``)."""
    spec = importlib.util.spec_from_file_location("dccsign_bench_naive", path)
    if spec is None or spec.loader is None:
        raise CompareError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


class Naive:
    """The naive pipeline (a module with ``naive_signer``, ``naive_times``, ``naive_hc1``)
    over the product benchmark's DCC pool, one thread."""

    def __init__(self, module: ModuleType) -> None:
        from ..testing.samples import varied_samples

        self.hc1 = module.naive_hc1
        self.signer = module.naive_signer()
        self.dccs = varied_samples(POOL)
        self.iat, self.exp = module.naive_times(self.signer, time.time())

    def one(self, dcc: dict[str, Any]) -> str:
        s = self.signer
        return self.hc1(s.private_key, s.kid, dcc, s.iss, self.iat, self.exp)

    def rate(self, seconds: float) -> float:
        """Certificates per second over about *seconds* of signing."""
        hc1, s, iat, exp = self.hc1, self.signer, self.iat, self.exp
        key, kid, iss = s.private_key, s.kid, s.iss
        dccs, n = self.dccs, len(self.dccs)
        done, i = 0, 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(CHECK_EVERY):
                hc1(key, kid, dccs[i], iss, iat, exp)
                i = i + 1 if i + 1 < n else 0
            done += CHECK_EVERY
            now = time.perf_counter()
            if now >= deadline:
                return done / (now - t0)


def check_hc1(text: str, dsc: Any, dcc: dict[str, Any], what: str) -> None:
    """Raise :class:`CompareError` unless *text* verifies with *dsc* and carries *dcc*."""
    from ..dcc.verify import verify_hc1

    result = verify_hc1(text, [dsc])
    if not result.valid or result.errors or result.dcc != dcc:
        raise CompareError(f"{what}: the HC1 does not verify: {result.errors}")


def verify_product(impls: list[str]) -> None:
    """Decode and verify a batch of HC1s from each product implementation."""
    from .. import native
    from ..dcc.issuer import Issuer
    from ..testing.samples import varied_samples
    from .core import ephemeral_key

    dccs = varied_samples(8)
    for name in impls:
        key = ephemeral_key(name)
        texts = Issuer([key], impl=native.implementation(name)).issue(dccs)
        for text, d in zip(texts, dccs, strict=True):
            check_hc1(text, key.dsc, d, f"dccsign core ({name})")


@dataclass(frozen=True)
class Engine:
    """``dccsign bench load --closed-loop`` against a running engine, as a subprocess."""

    server: str
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def argv(self, seconds: float, out: Path) -> list[str]:
        argv = [sys.executable, "-m", "dccsign", "bench", "load", "--server", self.server]
        argv += ["--closed-loop", "--batch", "50", "--duration", f"{seconds:g}"]
        argv += ["--json", str(out), "--quiet", "--verify-sample", "0.01", "--metrics", "none"]
        for flag, value in (("--cert", self.cert), ("--key", self.key), ("--ca", self.ca)):
            if value is not None:
                argv += [flag, str(value)]
        return argv

    def rate(self, seconds: float) -> float:
        with tempfile.TemporaryDirectory(prefix="dccsign-compare-") as tmp:
            out = Path(tmp) / "load.json"
            proc = subprocess.run(
                self.argv(seconds, out), capture_output=True, text=True, check=False
            )
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise CompareError(f"`dccsign bench load` exit {proc.returncode}: {tail}")
            doc = json.loads(out.read_text(encoding="utf-8"))
        if doc.get("errors") or doc.get("wrong_answers"):
            raise CompareError(
                f"engine answered with errors: {doc.get('errors_by_code') or doc.get('errors')}"
            )
        return float(doc["certs_per_s"])


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


def summary(values: list[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def ratios(
    rounds: list[dict[str, float]],
    loads: list[dict[str, float | None]],
    num: str,
    den: str,
    quiet_only: bool = False,
) -> list[float]:
    """num / den within every round that measured both (and was quiet, if asked)."""
    out = []
    for sample, load in zip(rounds, loads, strict=True):
        if not (sample.get(num) and sample.get(den)):
            continue
        other = load.get(num)
        if quiet_only and (other is None or other >= QUIET_CORES):
            continue
        out.append(sample[num] / sample[den])
    return out


# -- the run ------------------------------------------------------------------------------


def compare(
    *,
    seconds: float,
    rounds: int,
    threads: int,
    naive_path: Path | None,
    engine: Engine | None = None,
    wait_quiet: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Verify every pipeline, run the interleaved rounds; return the JSON document.

    Raises:
        CompareError: a pipeline's HC1 did not verify.
    """
    openssl = shutil.which("openssl")
    skipped: dict[str, str] = {}
    if openssl is None:
        skipped["openssl"] = skipped["openssl-all"] = "not measured: no `openssl` on PATH"
    naive_case, naive_path = _verified_naive(naive_path, skipped)
    impls = _verified_impls(skipped)
    if engine is None:
        skipped["engine"] = "not measured: no --server given"
    product_runs: dict[str, list[dict[str, Any]]] = {}
    cases = _cases(openssl, naive_case, impls, engine, seconds, threads, product_runs)
    env = environment(openssl)
    log(
        f"{env['date']}  nproc={env['nproc']}  cpu={env['cpu_model']}  "
        f"{env['openssl'] or 'no openssl'}  python {env['python']}  zlib {env['zlib']}"
    )
    log(
        f"{rounds} rounds x {len(cases)} rows, {seconds:g} s per sample (openssl: 1 s); "
        "every pipeline's HC1 verified first"
    )
    samples, loads, errors = _run_rounds(cases, rounds, wait_quiet, log)
    skipped.update(errors)
    order = list(cases)
    return {
        "benchmark": "compare",
        "environment": env,
        "seconds_per_sample": seconds,
        "threads": threads,
        "naive_path": str(naive_path) if naive_path else None,
        "server": engine.server if engine else None,
        "order": order,
        "rows": _rows(samples, loads, [n for n in order if n not in errors], skipped, threads),
        "scaling": _scaling(samples, loads),
        "rounds": samples,
        "other_processes_cores": loads,
        "product_runs": product_runs,
    }


def _verified_naive(
    naive_path: Path | None, skipped: dict[str, str]
) -> tuple[Naive | None, Path | None]:
    """The naive pipeline, its HC1 verified, and its path; or (None, None), with the reason
    in *skipped*.

    Raises:
        CompareError: its HC1 did not verify.
    """
    if naive_path is None:
        skipped["naive"] = f"not measured: bench/naive.py not found ({NAIVE_HOME})"
        return None, None
    if not naive_path.is_file():
        skipped["naive"] = f"not measured: {naive_path} not found (bench/naive.py: {NAIVE_HOME})"
        return None, None
    naive_case = Naive(load_naive(naive_path))
    dcc = naive_case.dccs[0]
    check_hc1(naive_case.one(dcc), naive_case.signer.dsc, dcc, "naive pipeline")
    return naive_case, naive_path


def _verified_impls(skipped: dict[str, str]) -> list[str]:
    """The product's implementations this process has, each verified; why native is missing
    goes to *skipped*.

    Raises:
        CompareError: an implementation's HC1 did not verify.
    """
    from .. import native

    impls = ["python", "native"]
    try:
        native.implementation("native")
    except ImportError as exc:
        impls.remove("native")
        skipped["native"] = skipped["native-all"] = f"not measured: no native core: {exc}"
    verify_product(impls)
    return impls


def _cases(
    openssl: str | None,
    naive_case: Naive | None,
    impls: list[str],
    engine: Engine | None,
    seconds: float,
    threads: int,
    product_runs: dict[str, list[dict[str, Any]]],
) -> dict[str, Callable[[], float]]:
    """The rows to measure, in their order, each a call that returns one sample's rate; the
    product's rows also keep their whole results in *product_runs*."""
    from .core import run

    def product(impl_name: str, n: int, row: str) -> Callable[[], float]:
        def case() -> float:
            result = run(impl_name=impl_name, threads=n, seconds=seconds)
            product_runs.setdefault(row, []).append(result)
            return float(result["certs_per_s"])

        return case

    cases: dict[str, Callable[[], float]] = {}
    if openssl is not None:
        cases["openssl"] = lambda: openssl_sign_rate(openssl)
        cases["openssl-all"] = lambda: openssl_sign_rate(openssl, threads)
    if naive_case is not None:
        cases["naive"] = lambda: naive_case.rate(seconds)
    cases["python"] = product("python", 1, "python")
    if "native" in impls:
        cases["native"] = product("native", 1, "native")
        cases["native-all"] = product("native", threads, "native-all")
    if engine is not None:
        cases["engine"] = lambda: engine.rate(seconds)
    return cases


def _run_rounds(
    cases: dict[str, Callable[[], float]],
    rounds: int,
    wait_quiet: float,
    log: Callable[[str], None],
) -> tuple[list[dict[str, float]], list[dict[str, float | None]], dict[str, str]]:
    """The interleaved rounds (every other one in reverse order): each round's rates, the
    other processes' load during each sample, and the rows that failed (not measured
    again)."""
    samples: list[dict[str, float]] = []
    loads: list[dict[str, float | None]] = []
    errors: dict[str, str] = {}
    meter = ForeignLoad()
    order = list(cases)
    for r in range(rounds):
        sample: dict[str, float] = {}
        load: dict[str, float | None] = {}
        for name in order if r % 2 == 0 else order[::-1]:
            if name in errors:
                continue
            if name in MULTI and wait_quiet > 0:
                wait_for_quiet(meter, wait_quiet)
            meter.start()
            try:
                sample[name] = cases[name]()
            except CompareError as exc:
                errors[name] = f"not measured: {exc}"
                continue
            load[name] = meter.stop()
        samples.append(sample)
        loads.append(load)
        parts = [f"{n} {sample[n]:,.0f}" for n in order if n in sample]
        log(f"  round {r + 1}: " + ", ".join(parts))
    return samples, loads, errors


def _rows(
    samples: list[dict[str, float]],
    loads: list[dict[str, float | None]],
    measured: list[str],
    skipped: dict[str, str],
    threads: int,
) -> dict[str, dict[str, Any]]:
    """Every row of ROWS: its label and unit, and its rate summary and ratios, or why it
    was not measured."""
    rates = {n: summary([s[n] for s in samples if n in s]) for n in measured}
    foreign = {n: summary([v for ld in loads if (v := ld.get(n)) is not None]) for n in rates}
    labels = row_labels(threads)
    rows: dict[str, dict[str, Any]] = {}
    for name in ROWS:
        label, unit = labels[name]
        entry: dict[str, Any] = {"label": label, "unit": unit}
        if rates.get(name):
            entry["rate"] = rates[name]
            entry["other_processes_cores"] = foreign[name]
            for key, den in (("vs_naive", "naive"), ("vs_openssl", "openssl")):
                s = summary(ratios(samples, loads, name, den))
                if s is not None:
                    entry[key] = s
        else:
            entry["not_measured"] = skipped.get(name, "not measured")
        rows[name] = entry
    return rows


def _scaling(
    samples: list[dict[str, float]], loads: list[dict[str, float | None]]
) -> dict[str, dict[str, list[float]]]:
    """All cores against one, for the native core and openssl: in every round, and in the
    rounds other processes left quiet."""
    return {
        f"{num}/{den}": {
            "all_rounds": ratios(samples, loads, num, den),
            "quiet_rounds": ratios(samples, loads, num, den, quiet_only=True),
        }
        for num, den in (("native-all", "native"), ("openssl-all", "openssl"))
    }


def print_table(doc: dict[str, Any], out: Any = None) -> None:
    """The table: median rate over the rounds, and the within-round ratios (medians)."""
    write = (out or sys.stdout).write
    head = f"{'row':<46} {'median':>9} {'min':>9} {'max':>9}  {'unit':<7} {'x naive':>8} "
    write("\n" + head + f"{'x openssl 1p':>12}  other procs\n")
    for entry in doc["rows"].values():
        if "rate" not in entry:
            write(f"{entry['label']:<46} {entry['not_measured']}\n")
            continue
        s = entry["rate"]
        vn = f"{entry['vs_naive']['median']:.2f}" if "vs_naive" in entry else "-"
        vo = f"{entry['vs_openssl']['median']:.3f}" if "vs_openssl" in entry else "-"
        f = entry["other_processes_cores"]
        other = f"{f['median']:.2f} cores" if f else "-"
        write(
            f"{entry['label']:<46} {s['median']:>9,.0f} {s['min']:>9,.0f} {s['max']:>9,.0f}  "
            f"{entry['unit']:<7} {vn:>8} {vo:>12}  {other}\n"
        )
    for key, v in doc["scaling"].items():
        s = summary(v["all_rounds"])
        if s is not None:
            q = summary(v["quiet_rounds"])
            quiet = f"{q['median']:.2f} in {q['n']} quiet rounds" if q else "no quiet round"
            write(f"scaling {key}: {s['median']:.2f} (median of {s['n']}; {quiet})\n")


def plot(doc: dict[str, Any], path: Path) -> None:
    """A horizontal bar chart of the median rates (min..max as error bars) into *path*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [e for e in doc["rows"].values() if "rate" in e][::-1]
    labels = [e["label"] for e in measured]
    med = [e["rate"]["median"] for e in measured]
    err = [
        [m - e["rate"]["min"] for m, e in zip(med, measured, strict=True)],
        [e["rate"]["max"] - m for m, e in zip(med, measured, strict=True)],
    ]
    colors = ["tab:gray" if e["unit"] == "sign/s" else "tab:blue" for e in measured]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(measured)))
    ax.barh(labels, med, xerr=err, color=colors, capsize=3)
    for y, (m, e) in enumerate(zip(med, measured, strict=True)):
        note = f" {m:,.0f} {e['unit']}"
        if "vs_naive" in e:
            note += f"  ({e['vs_naive']['median']:.2f}x naive)"
        ax.text(m, y, note, va="center", fontsize=8)
    ax.set_xlim(0, max(med) * 1.45 if med else 1)
    ax.set_xlabel("per second (median over rounds; bars: min..max)")
    env = doc["environment"]
    ax.set_title(
        f"dccsign bench compare: {env['date'][:10]}, {env['nproc']} CPUs, {env['cpu_model']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------


def add_compare_parser(bsub: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to the ``bench`` subcommands *bsub*; returns its parser."""
    p = bsub.add_parser(
        "compare",
        help="openssl speed vs the naive Python pipeline vs dccsign (python, native, engine), "
        "same run, same payloads; rates and ratios",
        description="Measure, interleaved in the same run and on the same DCCs: `openssl "
        "speed ecdsap256` (1 process and -multi N: the signing ceiling), the naive pipeline a "
        "user would write (cbor2 + cryptography + zlib + base45, from bench/naive.py), the "
        "product's pure-Python reference and native core (1 thread, and N threads), and with "
        "--server the engine end to end (`dccsign bench load --closed-loop --batch 50` as a "
        "subprocess). Every pipeline's HC1 is decoded and verified before timing. Prints the "
        "median rate per row over the rounds and the within-round ratios to the naive "
        "pipeline and to openssl on 1 process.",
        epilog="Exit codes: 0 done; 1 a pipeline's HC1 did not verify; 2 usage (bad option, "
        "matplotlib missing for --plot); 4 --server given but the engine row could not be "
        'measured. See bench/README.md, section "dccsign bench compare".',
    )
    helps = {
        "--seconds": "seconds per sample of each row (openssl: always 1 s) (default 2)",
        "--rounds": "interleaved rounds; each measures every row once (default 3)",
        "--threads": "workers of the 'all cores' rows: openssl -multi N and "
        f"the native core with N threads (default: all cores, {os.cpu_count()})",
        "--naive": "the naive pipeline file (default: bench/naive.py under the current "
        "directory or the source checkout; without it the naive row is not "
        "measured and its ratios are omitted)",
        "--server": "also measure a running engine end to end: unix:PATH or HOST:PORT, "
        "passed to `dccsign bench load` with --cert/--key/--ca",
        "--json": "write every row, round, ratio and the environment as JSON",
        "--plot": "draw a bar chart of the rates (needs matplotlib)",
    }
    add_options(
        p,
        (
            ("--seconds", number(float, 3600, 2.0)),
            ("--rounds", number(int, 1000, 3, "R")),
            ("--threads", number(int, 256, os.cpu_count() or 1)),
            ("--naive", {"type": Path, "metavar": "PATH"}),
        ),
        helps,
    )
    g = p.add_argument_group("engine (optional)")
    add_options(g, (("--server", {"metavar": "ADDR"}),), helps)
    tls_client_args(
        g,
        cert="TLS client certificate",
        key="TLS client key",
        ca="CA of the engine's certificate",
    )
    g = p.add_argument_group("output")
    add_options(
        g,
        (
            ("--json", {"type": Path, "metavar": "FILE"}),
            ("--plot", {"type": Path, "metavar": "FILE.png"}),
        ),
        helps,
    )
    p.set_defaults(func=cmd_bench_compare)
    return p


def cmd_bench_compare(args: argparse.Namespace) -> int:
    """Run ``dccsign bench compare``; returns the exit code."""

    def fail(code: int, message: str) -> int:
        return error_exit("dccsign bench compare", code, message)

    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        return fail(
            EXIT_USAGE, "--plot needs matplotlib: install matplotlib (pip install 'dccsign[bench]')"
        )
    engine = Engine(args.server, args.cert, args.key, args.ca) if args.server else None
    try:
        doc = compare(
            seconds=args.seconds,
            rounds=args.rounds,
            threads=args.threads,
            naive_path=args.naive or find_naive(),
            engine=engine,
            log=lambda line: print(line, flush=True),
        )
    except CompareError as exc:
        return fail(EXIT_WRONG, str(exc))
    print_table(doc)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            return fail(EXIT_USAGE, f"cannot write {args.json}: {exc.strerror}")
        print(f"wrote {args.json}")
    if args.plot is not None:
        try:
            plot(doc, args.plot)
        except OSError as exc:
            return fail(EXIT_USAGE, f"cannot write {args.plot}: {exc.strerror}")
        print(f"plot: {args.plot}")
    if engine is not None and "rate" not in doc["rows"]["engine"]:
        return fail(EXIT_ENGINE, f"engine row {doc['rows']['engine']['not_measured']}")
    return EXIT_OK
