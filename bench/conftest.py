"""pytest plumbing for the micro benchmarks in this directory.

Every micro benchmark times a batch of certificates (so that per-call overhead and the
native batch calls are measured alike). pytest-benchmark's own table therefore shows times
*per batch*; the summary printed at the end by :func:`pytest_terminal_summary` divides by the
batch size and lines the contenders of each stage up against the library baseline.
The same per-certificate table goes into ``--benchmark-json FILE`` (as ``per_certificate``),
and the raw per-round timings are left out of that file to keep it small.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Row:
    group: str
    contender: str
    items: int
    median_s: float
    min_s: float
    rounds: int
    baseline: bool


_ROWS = pytest.StashKey[list[Row]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = []


@pytest.fixture
def per_cert(benchmark, request):
    """``per_cert(fn, *args, items=N, baseline=False)``: benchmark ``fn(*args)``, which
    handles *items* certificates per call, and record the result for the summary table.

    *baseline* marks the library contender of the stage that the others are compared to.
    """
    rows = request.config.stash[_ROWS]

    def run(fn, *args, items: int, baseline: bool = False):
        benchmark.extra_info["items_per_call"] = items
        result = benchmark(fn, *args)
        meta = benchmark.stats
        if meta:  # None or empty when benchmarks are disabled
            callspec = getattr(request.node, "callspec", None)
            contender = callspec.id if callspec is not None else request.node.name
            rows.append(
                Row(
                    group=benchmark.group or request.node.name,
                    contender=contender,
                    items=items,
                    median_s=meta.stats.median,
                    min_s=meta.stats.min,
                    rounds=meta.stats.rounds,
                    baseline=baseline,
                )
            )
        return result

    return run


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "dccsign micro benchmarks: microseconds per certificate (median)")
    tr.write_line(
        "speedup = library baseline median / contender median, both from this run "
        "(higher is better; the baseline row reads 1.00)"
    )
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for group in sorted(groups):
        members = groups[group]
        base = next((r for r in members if r.baseline), None)
        base_us = base.median_s / base.items * 1e6 if base else None
        tr.write_line("")
        tr.write_line(group)
        tr.write_line(
            f"  {'contender':<34} {'us/cert':>10} {'min':>10} {'rounds':>7} {'speedup':>9}"
        )
        for r in sorted(members, key=lambda r: r.median_s / r.items):
            us = r.median_s / r.items * 1e6
            speedup = f"{base_us / us:8.2f}x" if base_us else "        -"
            tr.write_line(
                f"  {r.contender:<34} {us:10.2f} {r.min_s / r.items * 1e6:10.2f} "
                f"{r.rounds:7d} {speedup:>9}"
            )


def _per_cert_rows(rows: list[Row]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for group in sorted({r.group for r in rows}):
        members = [r for r in rows if r.group == group]
        base = next((r for r in members if r.baseline), None)
        for r in members:
            us = r.median_s / r.items * 1e6
            out.append(
                {
                    "group": group,
                    "contender": r.contender,
                    "us_per_cert_median": round(us, 3),
                    "us_per_cert_min": round(r.min_s / r.items * 1e6, 3),
                    "rounds": r.rounds,
                    "baseline": r.baseline,
                    "speedup_vs_baseline": round(base.median_s / base.items * 1e6 / us, 3)
                    if base
                    else None,
                }
            )
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    for bench in output_json.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    output_json["per_certificate"] = _per_cert_rows(config.stash.get(_ROWS, []))
