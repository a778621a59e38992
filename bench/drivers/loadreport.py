"""Reports of ``dccsign bench load``: the JSON document, the text table and the plot, with the
engine's own metrics scraped before and after the run (:mod:`.scrape`).

The JSON's top level carries the headline figures -- ``certs_per_s``, ``burst_certs_per_s``,
``p50_ms``, ``p90_ms``, ``p99_ms``, ``p999_ms``, ``max_ms``, ``busy``, ``errors`` -- and the
detail below them: ``counts``, ``errors_by_code``, ``latency`` (from the intended start; with
the HDR histogram encoded), ``service_latency`` (from the write), ``generator`` (its own lag
and CPU), ``verify``, ``phases`` and ``burst`` (signed OK per phase, see :func:`burst`),
``pool_wait`` (the wait for a full nonce pool before the run), ``nonce_pool`` (the pool's
samples during the run, :meth:`dccsign.bench.loadpool.PoolSeries.as_json`), ``timeline`` (one
entry per second) and ``engine_metrics``. The text table and the plot are drawn from the same
:class:`~dccsign.bench.loadgen.LoadResult`, so the three agree.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cpustat import summary_lines
from .latency import PERCENTILES
from .loadgen import ERROR_NAMES, LoadResult
from .loadpool import PoolWait

__all__ = ["plot", "text_report", "to_json"]

# ----------------------------------------------------------------------------- JSON


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def timeline(result: LoadResult) -> list[dict[str, Any]]:
    """One entry per second of the run: ``intended`` (the profile's certificates for that
    second; None in closed loop), ``offered`` (by intended time), ``sent``, ``ok``,
    ``busy``, ``errors``, ``rejected_as_expected`` (by completion time), and ``p50_ms``/
    ``p99_ms`` of the certificates completed in that second (None when none)."""
    out = []
    profile = result.profile
    for i, b in enumerate(result.timeline):
        intended = None
        if result.mode == "open-loop":
            intended = round(profile.cumulative(i + 1) - profile.cumulative(i), 1)
        ps = b.hist.percentiles((50.0, 99.0)) if b.hist.count else None
        out.append(
            {
                "t": i,
                "intended": intended,
                "offered": b.offered,
                "sent": b.sent,
                "ok": b.ok,
                "busy": b.busy,
                "errors": b.errors,
                "rejected_as_expected": b.rejected,
                "not_sent": b.not_sent,
                "p50_ms": _ms(ps[50.0]) if ps else None,
                "p99_ms": _ms(ps[99.0]) if ps else None,
            }
        )
    return out


def knee(result: LoadResult) -> dict[str, Any] | None:
    """For an open-loop run: the first second at which the engine stopped keeping up -- the
    certificates offered so far but not yet served (signed, or rejected as expected) exceed
    one second of the offered load and have grown three seconds in a row. Cumulative
    counts, so the noise of single seconds (a few Poisson-spaced batch frames) cannot trip
    it. Returns that second and the rate intended then; None if the engine kept up
    throughout (or in closed loop)."""
    if result.mode != "open-loop":
        return None
    offered = served = 0
    backlog: list[int] = []
    for entry in timeline(result):
        if entry["t"] >= result.duration_s:
            break
        offered += entry["offered"]
        served += entry["ok"] + entry["rejected_as_expected"]
        backlog.append(offered - served)
        rising = len(backlog) >= 4 and backlog[-4] < backlog[-3] < backlog[-2] < backlog[-1]
        if rising and backlog[-1] > max(entry["offered"], 1):
            return {
                "t": entry["t"],
                "intended_certs_per_s": entry["intended"],
                "unserved_certs": backlog[-1],
            }
    return None


def phases(result: LoadResult) -> list[dict[str, Any]]:
    """Per phase of the profile: its window (``start_s``, ``end_s``, from the run's start),
    the intended rate, and the certificates signed OK whose reply arrived within it
    (``ok``, ``certs_per_s``; before verification, like the timeline)."""
    out, start = [], 0.0
    profile = result.profile
    for i, p in enumerate(profile.phases):
        end = start + p.duration
        ok = result.phase_ok[i] if i < len(result.phase_ok) else 0
        out.append(
            {
                "phase": i,
                "start_s": round(start, 3),
                "end_s": round(end, 3),
                "intended_certs_per_s": round(
                    (profile.cumulative(end) - profile.cumulative(start)) / p.duration, 1
                ),
                "ok": ok,
                "certs_per_s": round(ok / p.duration, 1),
            }
        )
        start = end
    return out


def burst(result: LoadResult) -> dict[str, Any]:
    """The burst: in open loop, the phase with the highest intended rate (the first of equal
    ones) -- the whole profile for ``burst`` and ``constant``, the 10 x phase for ``spike``;
    in closed loop, where the profile's rates do not apply, the whole duration. Its window
    and the rate signed OK within it; a wait for the nonce pool lies before t = 0 and is in
    no window."""
    if result.mode == "open-loop":
        table = phases(result)
        return max(table, key=lambda e: e["intended_certs_per_s"])
    ok = sum(result.phase_ok[:-1])
    duration = max(result.duration_s, 1e-9)
    return {
        "phase": None,
        "start_s": 0.0,
        "end_s": round(result.duration_s, 3),
        "intended_certs_per_s": None,
        "ok": ok,
        "certs_per_s": round(ok / duration, 1),
    }


def to_json(
    result: LoadResult,
    metrics: dict[str, Any] | None = None,
    pool_wait: PoolWait | None = None,
) -> dict[str, Any]:
    """The report as one JSON-ready dict (see the module docstring); *pool_wait* is the
    wait for a full nonce pool that preceded the run, if any."""
    lat = result.latency.summary_ms()
    window = burst(result)
    wall = max(result.elapsed_s, 1e-9)
    doc: dict[str, Any] = {
        "tool": "dccsign bench load",
        "mode": result.mode,
        "server": result.config.server,
        "started_at": dt.datetime.fromtimestamp(result.started_at, dt.UTC).isoformat(),
        "duration_s": round(result.duration_s, 3),
        "elapsed_s": round(result.elapsed_s, 3),
        "certs_per_s": round(result.certs_per_s, 1),
        "burst_certs_per_s": window["certs_per_s"],
        "frames_per_s": round(result.ok_frames / wall, 1),
        "offered_certs_per_s": round(result.offered / max(result.duration_s, 1e-9), 1),
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "p999_ms": lat["p999"],
        "max_ms": lat["max"],
        "busy": result.busy_replies,
        "errors": result.errors,
        "wrong_answers": result.wrong_answers,
        "counts": _counts(result),
        "errors_by_code": dict(sorted(result.errors_by_code.items())),
        "latency": {
            "from": "intended start (open loop) / write (closed loop)",
            "unit": "ms",
            **lat,
            "hdr_us": result.latency.encode(),
        },
        "service_latency": {"from": "write", "unit": "ms", **result.service_latency.summary_ms()},
        "generator": _generator(result, wall),
        "verify": result.verify,
        "cpu": result.cpu,
        "phases": phases(result),
        "burst": window,
        "pool_wait": pool_wait.as_json() if pool_wait is not None else None,
        "nonce_pool": (
            result.nonce_pool.as_json((window["start_s"], window["end_s"]))
            if result.nonce_pool is not None
            else None
        ),
        "knee": knee(result),
        "engine": result.welcome | {"keys": result.keys},
        "profile": result.profile.as_json(),
        "config": _config(result),
        "timeline": timeline(result),
        "engine_metrics": metrics,
    }
    return doc


def _counts(result: LoadResult) -> dict[str, int]:
    """What happened to the certificates and frames, counted."""
    return {
        "offered": result.offered,
        "sent": result.sent,
        "sent_frames": result.sent_frames,
        "ok": result.ok,
        "ok_frames": result.ok_frames,
        "rejected_as_expected": result.rejected_as_expected,
        "busy_replies": result.busy_replies,
        "busy_certs": result.busy_certs,
        "errors": result.errors,
        "not_sent_generator_limit": result.not_sent_generator_limit,
        "not_sent_at_end": result.not_sent_at_end,
    }


def _generator(result: LoadResult, wall: float) -> dict[str, Any]:
    """The load generator's own figures: how late it was, its CPU, its connections."""
    return {
        "schedule_lag_ms": result.schedule_lag.summary_ms(),
        "send_delay_ms": result.send_delay.summary_ms(),
        "cpu_s": round(result.cpu_s, 3),
        "cpu_share": round(result.cpu_s / wall, 3),
        "payload_prep_s": round(result.payload_seconds, 3),
        "connect_failures": result.connect_failures,
        "last_connect_error": result.last_connect_error,
        "connection_losses": result.connection_losses[:20],
    }


def _config(result: LoadResult) -> dict[str, Any]:
    """The run's settings (the in-flight window as the engine granted it)."""
    config = result.config
    return {
        "batch": config.batch,
        "connections": config.connections,
        "in_flight": result.welcome.get("in_flight_per_connection"),
        "exceed_in_flight": config.exceed_in_flight,
        "invalid_share": config.invalid_share,
        "accounts": config.accounts,
        "account_prefix": config.account_prefix,
        "verify_sample": config.verify_sample,
        "max_outstanding": config.max_outstanding,
        "drain_timeout_s": config.drain_timeout,
        "compression": config.compression,
        "seed": config.seed,
    }


# ----------------------------------------------------------------------------- text


def _n(x: float) -> str:
    return f"{x:,.0f}"


def text_report(doc: dict[str, Any]) -> str:
    """A human-readable summary of a :func:`to_json` document."""
    lines = [
        *_header_lines(doc),
        "",
        *_latency_lines(doc),
        "",
        *_outcome_lines(doc),
        *_pool_lines(doc.get("nonce_pool")),
        *summary_lines(doc.get("cpu")),
        "",
        *_generator_lines(doc["generator"]),
        *_knee_lines(doc.get("knee")),
        *_engine_metrics_lines(doc.get("engine_metrics")),
    ]
    return "\n".join(lines) + "\n"


def _header_lines(doc: dict[str, Any]) -> list[str]:
    """The run's mode, profile and engine, then the offered and signed rates."""
    c = doc["counts"]
    return [
        f"dccsign bench load: {doc['mode']}, profile {doc['profile']['name']!r} "
        f"({doc['profile']['arrivals']} arrivals), {doc['server']}",
        f"  engine {doc['engine']['server']!r}: max_batch {doc['engine']['max_batch']}, "
        f"max_in_flight {doc['engine']['max_in_flight']}, compression "
        f"{doc['engine']['compression']}; batch {doc['config']['batch']}, "
        f"{doc['config']['connections']} connections",
        "",
        f"  offered     {_n(doc['offered_certs_per_s']):>10} certs/s   "
        f"({_n(c['offered'])} certs in {doc['duration_s']:g} s)",
        f"  signed ok   {_n(doc['certs_per_s']):>10} certs/s   "
        f"({_n(c['ok'])} certs in {doc['elapsed_s']:g} s; {_n(doc['frames_per_s'])} frames/s)",
        *_burst_lines(doc),
    ]


def _latency_lines(doc: dict[str, Any]) -> list[str]:
    """The percentiles table: from the intended start and from the write (closed loop has
    only the write, under the first row's key)."""
    lines = ["  latency (ms)       p50       p90       p99     p99.9       max"]
    for name, key in (("from intended", "latency"), ("from write", "service_latency")):
        s = doc[key]
        if doc["mode"] == "closed-loop" and key == "latency":
            name = "from write"
        elif doc["mode"] == "closed-loop":
            continue
        cells = "".join(f"{s[p]:>10.2f}" for p, _ in PERCENTILES)
        lines.append(f"  {name:<14}{cells}{s['max']:>10.2f}")
    return lines


def _outcome_lines(doc: dict[str, Any]) -> list[str]:
    """What did not end signed OK: BUSY, errors, expected rejections, unsent; and the
    verification of the sampled HC1s."""
    c = doc["counts"]
    lines = [
        f"  busy        {_n(doc['busy']):>10} answers ({_n(c['busy_certs'])} certs)",
        f"  errors      {_n(doc['errors']):>10} certs"
        + (
            "  " + ", ".join(f"{k} {_n(v)}" for k, v in doc["errors_by_code"].items())
            if doc["errors_by_code"]
            else ""
        ),
        f"  rejected    {_n(c['rejected_as_expected']):>10} invalid DCCs, as expected",
        f"  not sent    {_n(c['not_sent_generator_limit']):>10} generator limit, "
        f"{_n(c['not_sent_at_end'])} still waiting at the end",
    ]
    v = doc["verify"]
    if v:
        lines.append(
            f"  verified    {_n(v['verified']):>10} sampled HC1s against {v['keys']} DSCs: "
            f"{_n(v['failed'])} failed" + (f" ({v['reasons'][0]})" if v["reasons"] else "")
        )
    return lines


def _generator_lines(g: dict[str, Any]) -> list[str]:
    """The generator's lateness and CPU, a warning when it may be the bottleneck, and its
    lost connections."""
    lag, wait = g["schedule_lag_ms"], g["send_delay_ms"]
    lines = [
        f"  generator: schedule lag p99 {lag['p99']:.2f} ms, max {lag['max']:.2f} ms; waited "
        f"for an in-flight slot p99 {wait['p99']:.2f} ms, max {wait['max']:.2f} ms; "
        f"CPU {g['cpu_share']:.0%} of one core",
    ]
    if g["cpu_share"] > 0.9:
        lines.append("  WARNING: the generator used > 90 % of a core: it may be the bottleneck")
    if g["connection_losses"] or g["connect_failures"]:
        lines.append(
            f"  connections lost: {len(g['connection_losses'])}, failed reconnects: "
            f"{g['connect_failures']} ({g['last_connect_error'] or '-'})"
        )
    return lines


def _knee_lines(k: dict[str, Any] | None) -> list[str]:
    """Where the engine fell behind for good, if it did."""
    if not k:
        return []
    return [
        f"  knee: at t={k['t']} s, intended {_n(k['intended_certs_per_s'])} certs/s, the "
        f"engine had fallen behind by {_n(k['unserved_certs'])} certs and kept falling"
    ]


def _engine_metrics_lines(m: dict[str, Any] | None) -> list[str]:
    """The engine's own figures over the run, from its /metrics, or why there are none."""
    if m is None:
        return ["  engine metrics: not scraped"]
    if m.get("error"):
        return [f"  engine metrics: {m['error']}"]
    mean = m["mean_request_ms"]
    lines = [
        f"  engine metrics ({m['url']}): {m['requests']:,} requests, mean "
        f"{mean if mean is not None else '-'} ms inside the engine, items "
        + (", ".join(f"{k} {v:,}" for k, v in m["items_by_result"].items()) or "none")
        + f", busy {m['busy']:,}"
    ]
    if m.get("stage_mean_ms"):
        lines.append(
            "  engine stages (mean ms, per request or micro-batch): "
            + ", ".join(f"{k} {v:.2f}" for k, v in m["stage_mean_ms"].items())
        )
    return lines


def _burst_lines(doc: dict[str, Any]) -> list[str]:
    """The rate during the burst, and the wait for the pool that preceded the run."""
    b = doc.get("burst")
    if not b:
        return []
    where = f"phase[{b['phase']}], " if b["phase"] is not None else ""
    intended = (
        f"; intended {_n(b['intended_certs_per_s'])} certs/s"
        if b["intended_certs_per_s"] is not None
        else ""
    )
    lines = [
        f"  burst       {_n(b['certs_per_s']):>10} certs/s   (signed ok in {where}"
        f"t={b['start_s']:g}-{b['end_s']:g} s: {_n(b['ok'])} certs{intended})"
    ]
    w = doc.get("pool_wait")
    if w:
        lines.append(
            f"  pool wait   {w['waited_s']:>10.1f} s         before t=0, until every key's nonce "
            f"pool was full ({_n(w['entries'])} / {_n(w['capacity'])} entries, "
            f"{_kids(len(w['per_kid']))}); in no rate"
        )
    return lines


def _kids(n: int) -> str:
    return f"{n} kid" if n == 1 else f"{n} kids"


def _level(e: dict[str, float]) -> str:
    share = e["entries"] / e["capacity"] if e["capacity"] else 0.0
    return f"{_n(e['entries'])} / {_n(e['capacity'])} ({math.floor(share * 100):.0f} %)"


def _pool_lines(pool: dict[str, Any] | None) -> list[str]:
    """The nonce pool's level over the run (nothing when it was not sampled)."""
    if pool is None:
        return []
    s = pool["summary"]
    if s is None:
        return [f"  nonce pool  not sampled: {pool['last_error'] or 'no samples'}"]
    start, end, low = s["burst_start"], s["burst_end"], s["min"]

    def rate(x: float | None) -> str:
        return "-" if x is None else _n(x)

    return [
        f"  nonce pool  burst start {_level(start)} entries (t={start['t']:.1f} s), end "
        f"{_level(end)} (t={end['t']:.1f} s), min {_level(low)} (t={low['t']:.1f} s)",
        f"  nonce pool  during the run: spent {_n(s['spent'])}, misses {_n(s['misses'])}, "
        f"refilled {_n(s['refilled'])}: {rate(s['refill_per_s_mean'])} entries/s mean, "
        f"{rate(s['refill_per_s_max'])} entries/s max between samples "
        f"({len(pool['samples'])} samples, {_kids(s['kids'])})",
    ]


def error_legend(names: Sequence[str]) -> list[str]:
    """Explanations of the generator's own error names among *names*."""
    return [f"{n}: {ERROR_NAMES[n]}" for n in names if n in ERROR_NAMES]


# ----------------------------------------------------------------------------- plot


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(doc: dict[str, Any], path: Path) -> None:
    """Draw throughput (with the intended rate) and latency p50/p99 (log scale) per second
    into a PNG at *path*; when the nonce pool was sampled, a third panel with its level over
    time (sum over kids, the capacity dashed, the burst's window shaded, misses if any).

    Raises:
        PlotUnavailable: matplotlib is missing (install it: ``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed or wanted
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            f"--plot needs matplotlib: install matplotlib (pip install matplotlib): {exc}"
        ) from None
    tl = doc["timeline"]
    t = [e["t"] + 0.5 for e in tl]
    pool = (doc.get("nonce_pool") or {}).get("samples")
    if pool:
        fig, (top, bottom, third) = plt.subplots(
            3, 1, figsize=(10, 9.5), sharex=True, height_ratios=(3, 3, 2)
        )
    else:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    title = (
        f"dccsign bench load: {doc['mode']}, profile {doc['profile']['name']!r}, "
        f"batch {doc['config']['batch']}, {doc['config']['connections']} connections"
    )
    fig.suptitle(title, fontsize=11)
    if doc["mode"] == "open-loop":
        top.step(
            [e["t"] for e in tl] + [len(tl)],
            [e["intended"] or 0 for e in tl] + [0],
            where="post",
            color="0.5",
            linestyle="--",
            label="intended",
        )
    top.plot(t, [e["ok"] for e in tl], color="tab:blue", marker=".", label="signed ok")
    if any(e["busy"] for e in tl):
        top.plot(t, [e["busy"] for e in tl], color="tab:orange", marker=".", label="BUSY")
    if any(e["errors"] for e in tl):
        top.plot(t, [e["errors"] for e in tl], color="tab:red", marker=".", label="errors")
    top.set_ylabel("certificates / s")
    top.set_ylim(bottom=0)
    top.grid(True, alpha=0.3)
    top.legend(loc="upper right", fontsize=8)
    for key, color, label in (("p50_ms", "tab:green", "p50"), ("p99_ms", "tab:purple", "p99")):
        xs = [x for x, e in zip(t, tl, strict=True) if e[key] is not None and e[key] > 0]
        ys = [e[key] for e in tl if e[key] is not None and e[key] > 0]
        bottom.plot(xs, ys, color=color, marker=".", label=label)
    bottom.set_yscale("log")
    bottom.set_ylabel(
        "latency, ms (from intended start)" if doc["mode"] == "open-loop" else "latency, ms"
    )
    bottom.grid(True, which="both", alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8)
    summary = (
        f"{doc['certs_per_s']:,.0f} certs/s ok; p50 {doc['p50_ms']:.1f} ms, "
        f"p99 {doc['p99_ms']:.1f} ms, max {doc['max_ms']:.1f} ms; busy {doc['busy']:,}, "
        f"errors {doc['errors']:,}"
    )
    bottom.set_title(summary, fontsize=9)
    axes = [top, bottom]
    if pool:
        _plot_pool(third, doc)
        axes.append(third)
    axes[-1].set_xlabel("seconds since start (by completion)")
    if doc["duration_s"] and not math.isnan(doc["duration_s"]):
        for ax in axes:
            ax.axvline(doc["duration_s"], color="0.7", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pool(ax: Any, doc: dict[str, Any]) -> None:
    """The nonce pool panel: entries and capacity (sums over kids) at each sample, the
    burst's window shaded, cumulative misses on a second axis when there are any."""
    pool = doc["nonce_pool"]
    rows = pool["samples"]
    ts = [r[0] for r in rows]
    b = doc.get("burst") or {}
    if b:
        ax.axvspan(b["start_s"], b["end_s"], color="tab:blue", alpha=0.06, label="burst")
    ax.plot(ts, [r[2] for r in rows], color="0.5", linestyle="--", label="capacity")
    ax.plot(ts, [r[1] for r in rows], color="tab:green", marker=".", label="entries")
    ax.set_ylabel("nonce pool entries")
    ax.set_ylim(0, max(max(r[2] for r in rows), 1) * 1.08)  # a full pool stays visible
    ax.grid(True, alpha=0.3)
    s = pool["summary"]
    if s and s["misses"]:
        twin = ax.twinx()
        first = rows[0][5]
        twin.plot(ts, [r[5] - first for r in rows], color="tab:red", marker=".", label="misses")
        twin.set_ylabel("misses (cumulative)", color="tab:red")
        twin.set_ylim(bottom=0)
        twin.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    if s:
        ax.set_title(
            f"nonce pool ({_kids(s['kids'])}): min {s['min']['entries']:,.0f}, spent "
            f"{s['spent']:,.0f}, misses {s['misses']:,.0f}, refill "
            f"{s['refill_per_s_mean'] or 0:,.0f} entries/s mean",
            fontsize=9,
        )
