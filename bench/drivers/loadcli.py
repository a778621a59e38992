"""``dccsign bench load``: the command line of the load generator (:mod:`.loadgen`).

Exit codes: 0 the run completed; 1 it completed but wrong answers came back (a sampled HC1
failed verification, or an invalid DCC was signed); 2 usage (bad option, profile, missing
matplotlib for --plot, a profile that waits for the nonce pool with ``--metrics none``); 4
the engine could not be reached or refused the connection, or (a profile with
``wait_for_pool``) its metrics endpoint could not be scraped or exports no nonce pool; 5 the
nonce pool did not fill within ``--pool-wait`` (nothing was sent).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..cli.args import SWITCH, add_options, in_range, number, tls_client_args
from ..cli.exits import error_exit

if TYPE_CHECKING:
    from .loadgen import LoadConfig
    from .loadpool import PoolWait
    from .loadprofile import Profile

__all__ = ["add_load_parser", "cmd_bench_load"]

EXIT_OK = 0
EXIT_WRONG_ANSWERS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 4
EXIT_POOL_TIMEOUT = 5

DEV_TLS = Path("var/dev-keystore/dev-tls")
DEFAULT_METRICS = "http://127.0.0.1:9464/metrics"


#: The fields of :class:`~.loadgen.LoadConfig` that the options of the same name give as they
#: are.
_AS_GIVEN = (
    "server",
    "closed_loop",
    "connections",
    "in_flight",
    "exceed_in_flight",
    "batch",
    "invalid_share",
    "accounts",
    "account_prefix",
    "verify_sample",
    "verify_max",
    "max_outstanding",
    "drain_timeout",
    "seed",
    "full_decode",
)

_share = in_range(float, 0.0, 1.0, "a share between 0 and 1")


def _role_pid(value: str) -> tuple[str, int]:
    role, sep, pid = value.partition("=")
    if not sep or not role or not pid.isdigit() or int(pid) < 1:
        raise argparse.ArgumentTypeError(f"expected ROLE=PID (e.g. engine=1234), not {value!r}")
    return role, int(pid)


def add_load_parser(bsub: Any) -> argparse.ArgumentParser:
    """Add ``load`` to the ``bench`` subcommands *bsub*; returns its parser."""
    from .loadprofile import PRESETS, parse_profile

    shown = [parse_profile(text, name, name) for name, text in PRESETS.items()]
    presets = "; ".join(
        f"{pr.name}: {pr.description} (base_rate {pr.base_rate:g}/s)" for pr in shown
    ).replace("%", "%%")  # argparse expands % in help texts
    p = bsub.add_parser(
        "load",
        help="drive a running engine with an open-loop (or closed-loop) load; latency "
        "percentiles, throughput over time, BUSY and errors",
        description="Load generator for a running engine (e.g. `make serve`). Open loop "
        "(default): requests are released at the profile's intended times whatever the engine "
        "does, and latency is measured from each request's intended start, so a stalled "
        "engine cannot hide its queueing (no coordinated omission). Closed loop "
        "(--closed-loop): N connections x M requests in flight, for the maximum throughput. "
        "Payloads are generated before the run (all three DCC types, non-ASCII names, varied "
        "sizes) and encoded once. Each request is sent exactly once: BUSY and errors are "
        "counted, never retried. Latency percentiles come from an HDR histogram (1 us..1 h, "
        "3 significant digits) over every signed certificate (a batch frame's latency counts "
        "for each of its certificates).",
        epilog="Exit codes: 0 run completed; 1 wrong answers (a sampled HC1 failed "
        "verification or an invalid DCC was signed); 2 usage (bad option or profile, "
        "matplotlib missing for --plot, --metrics none with a profile that waits for the "
        "nonce pool); 4 the engine cannot be reached or refused the connection, or, for a "
        "profile that waits for the nonce pool, --metrics cannot be scraped or shows no pool; "
        "5 the nonce pool did not fill within --pool-wait (nothing was sent). See "
        'bench/README.md, section "dccsign bench load".',
    )
    _add_engine_options(p.add_argument_group("engine"))
    load = p.add_argument_group("load")
    _add_profile_options(load, presets)
    _add_flow_options(load)
    _add_request_options(p.add_argument_group("requests"))
    _add_output_options(p.add_argument_group("output"))
    p.set_defaults(func=cmd_bench_load)
    return p


def _add_engine_options(g: Any) -> None:
    """Where the engine is and how to talk to it (group "engine")."""
    helps = {
        "--server": "unix:PATH or HOST:PORT (TLS with a client certificate) (default "
        "unix:var/dccsign.sock, the Unix socket of `make serve`; its TLS port is "
        "127.0.0.1:8443)",
        "--no-compression": "do not offer zstd in HELLO (default: offer it, as the reference "
        "client does; batch frames are then sent compressed)",
        "--metrics": f"the engine's Prometheus endpoint, scraped before and after the run, and "
        f"during it about once a second for keyd's nonce pool (dccsign_keyd_nonce_pool_*, if the "
        f"engine exports it); 'none' skips it; if unreachable, the report says so and the run "
        f"goes on, except for a profile that waits for the nonce pool (burst), which needs it "
        f"(default {DEFAULT_METRICS})",
    }
    add_options(g, (("--server", {"default": "unix:var/dccsign.sock", "metavar": "ADDR"}),), helps)
    tls_client_args(
        g,
        cert=f"TLS client certificate (default {DEV_TLS}/client-cert.pem when it exists)",
        key=f"TLS client key (default {DEV_TLS}/client-key.pem when it exists)",
        ca=f"CA of the engine's TLS certificate (default {DEV_TLS}/ca.pem when it exists, "
        "else the system's)",
    )
    add_options(
        g,
        (
            ("--no-compression", SWITCH),
            ("--metrics", {"default": DEFAULT_METRICS, "metavar": "URL"}),
        ),
        helps,
    )


def _add_profile_options(g: Any, presets: str) -> None:
    """Which profile, reshaped how (group "load"); *presets* describes the presets."""
    helps = {
        "--profile": f"a preset or a profile file (.toml; format in bench/README.md and "
        f"bench/drivers/loadprofile.py). Presets: {presets}. (default constant)",
        "--rate": "the profile's base rate in certificates/s (level 1); the profile's shape is "
        "kept (default: the profile's base_rate)",
        "--duration": "stretch or shrink the profile to S seconds in all (phases in proportion), "
        "but not below its min_duration (10 s for burst: refused); in closed loop, the run's "
        "length (default: the profile's duration)",
        "--arrivals": "poisson: independent arrivals (exponential gaps); uniform: evenly spaced "
        "(default: the profile's; the presets use poisson)",
        "--pool-wait": "for a profile with wait_for_pool (burst): before connecting, poll "
        "--metrics until every key's nonce pool holds at least 99.9 %% of its capacity, printing "
        "the level at most once a second; give up after S s with exit 5. The wait is before t=0 "
        "and counts in no rate (default 600)",
        "--print-profile": "print the profile (after --rate/--duration/--arrivals) as TOML and "
        "exit",
    }
    add_options(
        g,
        (
            ("--profile", {"default": "constant", "metavar": "NAME|FILE"}),
            ("--rate", number(float, 1e7, None, "R")),
            ("--duration", number(float, 86_400, None, "S")),
            ("--arrivals", {"choices": ("poisson", "uniform")}),
            ("--pool-wait", number(float, 86_400, 600.0, "S")),
            ("--print-profile", SWITCH),
        ),
        helps,
    )


def _add_flow_options(g: Any) -> None:
    """Open or closed loop, connections, what may be outstanding, the drain, the seed
    (group "load")."""
    helps = {
        "--closed-loop": "closed loop: each connection keeps --in-flight requests outstanding and "
        "sends the next when one is answered (the profile's rates are ignored; only its duration "
        "counts); latency is from the write",
        "--connections": "connections to the engine, in both modes (default 4)",
        "--in-flight": "requests in flight per connection: closed loop default 4; open loop "
        "default and ceiling the engine's max_in_flight from WELCOME (32 for `make serve`); a "
        "request that finds no free slot waits in the backlog, and that wait counts in its latency",
        "--exceed-in-flight": "open loop: send at the intended time even beyond the engine's "
        "max_in_flight (the engine answers BUSY; a protocol-compliant client never does this)",
        "--max-outstanding": "open loop: requests waiting or in flight at most; a request due "
        "beyond that is not sent and counted as 'not sent (generator limit)' (default 100000)",
        "--drain-timeout": "after the profile ends, wait up to S s for outstanding replies; still "
        "unanswered: error NO_REPLY, never sent: 'not sent at end' (default 10)",
        "--seed": "seed of the payloads, the Poisson arrivals and the verification sample "
        "(default 2021)",
    }
    add_options(
        g,
        (
            ("--closed-loop", SWITCH),
            ("--connections", number(int, 1024, 4)),
            ("--in-flight", number(int, 1_000_000, None, "M")),
            ("--exceed-in-flight", SWITCH),
            ("--max-outstanding", number(int, 10_000_000, 100_000)),
            ("--drain-timeout", number(float, 3600, 10.0, "S")),
            ("--seed", {"type": int, "default": 2021, "metavar": "N"}),
        ),
        helps,
    )


def _add_request_options(g: Any) -> None:
    """What the requests carry, and how many answers are verified (group "requests")."""
    helps = {
        "--batch": "certificates per request: 1 = SIGN frames, more = SIGN_BATCH frames of N "
        "(at most the engine's max_batch, 1000 for `make serve`) (default 1)",
        "--invalid-share": "share of invalid DCCs (bad UVCI check character, unknown country, "
        "impossible date, missing name, in turn); the expected answer INVALID_DCC is counted as "
        "'rejected as expected', anything else as an error (default 0)",
        "--accounts": "spread the items over N synthetic end-user accounts: PREFIX and a "
        "zero-padded number, load:0000 .. load:9999 by default (default 10000). The dev policy "
        "that `make serve` writes allows 100,000,000 signatures per hour per client and per "
        "account, and the engine tracks up to 100,000 accounts, so neither quota nor its "
        "account table is the bottleneck; the pool holds max(N, 4096) distinct DCCs",
        "--account-prefix": "prefix of the account ids (default 'load:')",
        "--verify-sample": "share of signed HC1s verified after the run with dccsign.dcc.verify "
        "against the DSCs from LIST_KEYS, and their DCC compared with the one sent; a failure "
        "moves the certificate from ok to the error bad_signature and makes the exit status 1 "
        "(default 0.01)",
        "--verify-max": "verify at most N samples (a uniform reservoir of all sampled) (default "
        "20000)",
        "--full-decode": "decode every reply into per-item objects, as before replies were counted "
        "(costs the generator CPU; to measure the difference)",
        "--cpu-pid": "also report the CPU per certificate of process PID (and its children, e.g. "
        "an engine's keyd) and each of its threads over the run, read from /proc, under "
        "ROLE (e.g. engine=1234); repeatable. The generator's own is always reported",
    }
    add_options(
        g,
        (
            ("--batch", number(int, 100_000, 1)),
            ("--invalid-share", {"type": _share, "default": 0.0, "metavar": "F"}),
            ("--accounts", number(int, 100_000, 10_000)),
            ("--account-prefix", {"default": "load:", "metavar": "PREFIX"}),
            ("--verify-sample", {"type": _share, "default": 0.01, "metavar": "F"}),
            ("--verify-max", number(int, 10_000_000, 20_000)),
            ("--full-decode", SWITCH),
            (
                "--cpu-pid",
                {"action": "append", "default": [], "type": _role_pid, "metavar": "ROLE=PID"},
            ),
        ),
        helps,
    )


def _add_output_options(g: Any) -> None:
    """Where the report goes (group "output")."""
    helps = {
        "--json": "write the report as one JSON document to FILE, or to stdout without FILE (the "
        "progress line and the table then go to stderr). Top level: certs_per_s, "
        "burst_certs_per_s, p50_ms, p90_ms, p99_ms, p999_ms, max_ms, busy, errors, then "
        "details (among them phases, burst, pool_wait, and nonce_pool: the pool's samples "
        "[t, entries, capacity, refilled, spent, misses], summed and per kid)",
        "--plot": "draw throughput (with the intended rate) and latency p50/p99 (log scale) per "
        "second, and the nonce pool's level over time when it was sampled (needs matplotlib)",
        "--quiet": "no progress line",
    }
    add_options(
        g,
        (
            ("--json", {"nargs": "?", "const": "-", "metavar": "FILE"}),
            ("--plot", {"type": Path, "metavar": "FILE.png"}),
            ("--quiet", SWITCH),
        ),
        helps,
    )


def _dev_default(given: Path | None, name: str) -> Path | None:
    if given is not None:
        return given
    path = DEV_TLS / name
    return path if path.exists() else None


def _progress_printer(out: TextIO) -> Any:
    tty = out.isatty()

    def show(s: dict[str, Any]) -> None:
        if not tty and s["t"] % 5:
            return  # a log file gets a line every 5 s, a terminal one line updated each second
        intended = f"intended {s['intended']:>8,.0f}/s " if s["intended"] is not None else ""
        line = (
            f"[{s['t']:>4}/{s['duration']:.0f} s] {intended}ok {s['ok']:>8,}/s "
            f"p50 {s['p50_ms']:7.1f} ms p99 {s['p99_ms']:7.1f} ms busy {s['busy']:,} "
            f"err {s['errors']:,} in flight {s['in_flight']:,} waiting "
            f"{max(s['outstanding'] - s['in_flight'], 0):,} lag max {s['lag_ms']:.1f} ms"
        )
        pool = s.get("pool")
        if pool is not None:
            line += f" pool {pool.entries:,.0f} ({math.floor(pool.share * 100)} %)"
        if tty:
            out.write("\r\x1b[K" + line)
        else:
            out.write(line + "\n")
        out.flush()

    return show


def _pool_wait_printer(out: TextIO) -> Any:
    """Progress of the wait for the nonce pool: reported at most once a second; a terminal
    gets one line updated, a log file a line every 5 s."""
    tty = out.isatty()
    last = [-math.inf]

    def show(p: Any) -> None:
        if not tty and p.elapsed_s - last[0] < 5:
            return
        last[0] = p.elapsed_s
        line = f"dccsign bench load: {p.line()}"
        out.write("\r\x1b[K" + line if tty else line + "\n")
        out.flush()

    return show


def _wait_for_pool(args: argparse.Namespace, profile_name: str, url: str) -> PoolWait | int:
    """The wait for a full nonce pool, in a trio run of its own before the load's (so that
    nothing of it is inside the run's clock); returns it, or the exit code after printing
    why it failed."""
    import trio

    from .loadpool import PoolTimeout, PoolUnavailable, total, wait_for_full_pool

    progress = None if args.quiet else _pool_wait_printer(sys.stderr)
    why = f"profile {profile_name!r} waits for a full nonce pool"
    try:
        waited = trio.run(lambda: wait_for_full_pool(url, args.pool_wait, progress=progress))
    except PoolUnavailable as exc:
        return _fail(EXIT_UNREACHABLE, f"{why}: {exc}")
    except PoolTimeout as exc:
        return _fail(EXIT_POOL_TIMEOUT, f"{why}: {exc}")
    finally:
        if progress is not None and sys.stderr.isatty():
            sys.stderr.write("\n")
    level = total(waited.levels)
    print(
        f"dccsign bench load: nonce pool full after {waited.waited_s:.1f} s: "
        f"{level.entries:,.0f} / {level.capacity:,.0f} entries over {len(waited.levels)} kid(s)",
        file=sys.stderr,
    )
    return waited


def _fail(code: int, message: str) -> int:
    return error_exit("dccsign bench load", code, message)


def cmd_bench_load(args: argparse.Namespace) -> int:
    """Run ``dccsign bench load``; returns the exit code."""
    try:
        import hdrh  # noqa: F401 -- the histograms' library, which the [bench] extra brings
    except ImportError:
        return _fail(
            EXIT_USAGE,
            "the load generator needs hdrhistogram, from the [bench] extra: "
            "pip install 'dccsign[bench]' (make installs it)",
        )
    from .loadprofile import ProfileError, load_profile

    try:
        profile = load_profile(args.profile).scaled(
            rate=args.rate, duration=args.duration, arrivals=args.arrivals
        )
    except ProfileError as exc:
        return _fail(EXIT_USAGE, str(exc))
    if args.print_profile:
        sys.stdout.write(profile.to_toml())
        return EXIT_OK
    metrics_url = None if args.metrics.lower() == "none" else args.metrics
    refused = _refuse_usage(args, profile, metrics_url)
    if refused is not None:
        return refused
    return _run_and_report(args, profile, metrics_url)


def _refuse_usage(
    args: argparse.Namespace, profile: Profile, metrics_url: str | None
) -> int | None:
    """The exit code after saying why, if the options cannot work together or need what
    is not installed; else None."""
    if profile.wait_for_pool and metrics_url is None:
        return _fail(
            EXIT_USAGE,
            f"the {profile.name} profile waits for the nonce pool: give --metrics URL (the "
            f"engine's /metrics, e.g. {DEFAULT_METRICS}), not none",
        )
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail(
                EXIT_USAGE,
                "--plot needs matplotlib: install matplotlib (pip install 'dccsign[bench]')",
            )
    return None


def _load_config(args: argparse.Namespace, profile: Profile, metrics_url: str | None) -> LoadConfig:
    """The run's configuration from the options (over TLS, the dev keystore's client
    certificate, key and CA where none is given)."""
    from .loadgen import LoadConfig

    tls = not args.server.startswith("unix:")
    return LoadConfig(
        profile=profile,
        **{name: getattr(args, name) for name in _AS_GIVEN},
        cert=_dev_default(args.cert, "client-cert.pem") if tls else args.cert,
        key=_dev_default(args.key, "client-key.pem") if tls else args.key,
        ca=_dev_default(args.ca, "ca.pem") if tls else args.ca,
        compression=not args.no_compression,
        metrics_url=metrics_url,
        cpu_pids=tuple(args.cpu_pid),
    )


def _run_and_report(args: argparse.Namespace, profile: Profile, metrics_url: str | None) -> int:
    """Prepare the payloads, wait for the nonce pool if the profile asks, run the load,
    report; returns the exit code."""
    import trio

    from .loadgen import LoadError, payloads_for, run_load
    from .loadreport import to_json
    from .scrape import metrics_delta, scrape_metrics

    config = _load_config(args, profile, metrics_url)
    print(
        f"dccsign bench load: preparing {max(args.accounts, 4096):,} payloads "
        f"(batch {args.batch}) ...",
        file=sys.stderr,
    )
    payloads = payloads_for(config)
    pool_wait = None
    if profile.wait_for_pool:
        assert metrics_url is not None
        try:
            waited = _wait_for_pool(args, profile.name, metrics_url)
        except KeyboardInterrupt:
            return _fail(130, "interrupted")
        if isinstance(waited, int):
            return waited
        pool_wait = waited
    # After the wait: the engine's figures are the run's, not the wait's.
    before = scrape_metrics(metrics_url) if metrics_url else None
    mode = "closed loop" if args.closed_loop else "open loop"
    print(
        f"dccsign bench load: {mode}, profile {profile.name!r}, {profile.duration:g} s, "
        f"{args.server}",
        file=sys.stderr,
    )
    progress = None if args.quiet else _progress_printer(sys.stderr)
    try:
        result = trio.run(lambda: run_load(config, payloads, progress=progress))
    except LoadError as exc:
        return _fail(EXIT_UNREACHABLE, str(exc))
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    finally:
        if progress is not None and sys.stderr.isatty():
            sys.stderr.write("\n")
    metrics = None
    if before is not None and metrics_url:
        metrics = metrics_delta(before, scrape_metrics(metrics_url))
    return _report(args, to_json(result, metrics, pool_wait), result.wrong_answers)


def _report(args: argparse.Namespace, doc: dict[str, Any], wrong_answers: int) -> int:
    """Write the table, then the JSON and the plot if asked; returns the exit code."""
    from .loadreport import PlotUnavailable, plot, text_report

    to_stdout = args.json == "-"
    human = sys.stderr if to_stdout else sys.stdout
    human.write(text_report(doc))
    if args.json is not None:
        text = json.dumps(doc, ensure_ascii=False, indent=1) + "\n"
        if to_stdout:
            sys.stdout.write(text)
        else:
            try:
                Path(args.json).write_text(text, encoding="utf-8")
            except OSError as exc:
                return _fail(EXIT_USAGE, f"cannot write {args.json}: {exc.strerror}")
    if args.plot is not None:
        try:
            plot(doc, args.plot)
        except PlotUnavailable as exc:
            return _fail(EXIT_USAGE, str(exc))
        except OSError as exc:
            return _fail(EXIT_USAGE, f"cannot write {args.plot}: {exc.strerror}")
        human.write(f"  plot: {args.plot}\n")
    if wrong_answers:
        human.write(f"  FAILED: {wrong_answers:,} wrong answers (see errors)\n")
        return EXIT_WRONG_ANSWERS
    return EXIT_OK
