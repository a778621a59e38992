"""The engine's /metrics as the benchmark drivers read it: one scrape
(:func:`scrape_metrics`, which never raises), and what changed between two
(:func:`metrics_delta`). The load report and the nonce pool sampler both use it.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any

__all__ = ["STAGES", "MetricsSnapshot", "metrics_delta", "parse_prometheus", "scrape_metrics"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition, keyed ``name{labels}`` as written. Comments,
    and samples whose value is not a number, are skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            out[m.group(1)] = float(m.group(2))
        except ValueError:
            continue
    return out


class MetricsSnapshot:
    """One scrape: the samples, or why there are none (``error``)."""

    __slots__ = ("error", "samples", "url")

    def __init__(self, url: str, samples: dict[str, float] | None, error: str | None) -> None:
        self.url = url
        self.samples = samples
        self.error = error


def scrape_metrics(url: str, timeout: float = 3.0) -> MetricsSnapshot:
    """GET *url* (the engine's /metrics). Never raises: an unreachable endpoint is reported
    in the snapshot's ``error`` and the run goes on."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return MetricsSnapshot(url, None, f"cannot scrape {url}: {reason}")
    return MetricsSnapshot(url, parse_prometheus(text), None)


def metrics_delta(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, Any]:
    """What the engine says happened during the run: every sample that changed (after minus
    before; counters are cumulative, so this is the run's share), plus a few derived figures
    (``items_by_result``, ``busy``, ``mean_request_ms``, and ``stage_mean_ms``: the mean of
    each stage of ``dccsign_stage_seconds``, in the order of the signing path)."""
    out: dict[str, Any] = {"url": after.url}
    if before.error or after.error:
        out["error"] = after.error or before.error
        return out
    assert before.samples is not None and after.samples is not None
    delta = {
        k: v - before.samples.get(k, 0.0)
        for k, v in after.samples.items()
        if v != before.samples.get(k, 0.0) and not k.endswith("_created") and "_created{" not in k
    }
    items: dict[str, float] = {}
    for key, value in delta.items():
        if key.startswith("dccsign_items_total{"):
            m = re.search(r'result="([^"]*)"', key)
            if m:
                items[m.group(1)] = items.get(m.group(1), 0.0) + value
    busy = sum(v for k, v in delta.items() if k.startswith("dccsign_busy_total"))
    count = delta.get("dccsign_request_seconds_count", 0.0)
    total = delta.get("dccsign_request_seconds_sum", 0.0)
    out["items_by_result"] = {k: int(v) for k, v in sorted(items.items())}
    out["busy"] = int(busy)
    out["requests"] = int(count)
    out["mean_request_ms"] = round(total / count * 1e3, 3) if count else None
    stages: dict[str, dict[str, float]] = {}
    for key, value in delta.items():
        m = _STAGE_SAMPLE.fullmatch(key)
        if m:
            stages.setdefault(m.group(2), {})[m.group(1)] = value
    order = {name: i for i, name in enumerate(STAGES)}
    out["stage_mean_ms"] = {
        name: round(v["sum"] / v["count"] * 1e3, 3)
        for name, v in sorted(stages.items(), key=lambda kv: order.get(kv[0], len(order)))
        if v.get("count")
    }
    out["delta"] = {k: delta[k] for k in sorted(delta)}
    return out


#: The stages of ``dccsign_stage_seconds``, in the order a certificate passes them.
STAGES = ("start", "prepare", "batch_wait", "keyd", "encode")
_STAGE_SAMPLE = re.compile(r'dccsign_stage_seconds_(sum|count)\{stage="([^"]*)"\}')
