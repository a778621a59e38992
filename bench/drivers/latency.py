"""Latency histograms for the load generator: an HDR histogram in microseconds.

A thin layer over the ``hdrhistogram`` package (HdrHistogram_py) that fixes the units and the
range and keeps what a load report needs exact: the count, the maximum (HDR reports a bucket's
upper end; the report shows the true maximum) and how many values were clamped to the range.

Precision: with *significant_digits* = 3 (the default) every value is stored in a bucket no
wider than 1/1024 of its value, so any percentile is within 0.1 % of the exact one (HDR
returns the bucket's highest equivalent value, i.e. it rounds up). Range: 1 us to one hour;
longer values are recorded as one hour and counted in :attr:`LatencyHistogram.clamped`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["PERCENTILES", "LatencyHistogram"]

#: The percentiles a report shows, with their JSON names.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p999", 99.9),
)
_HIGHEST_US = 3_600_000_000  # one hour


class LatencyHistogram:
    """Latencies in seconds, kept as integer microseconds in an HDR histogram.

    *significant_digits* 1..5: 3 for the run's totals, 2 for the per-second buckets of a
    timeline (a tenth of the memory, percentiles within 1 %).
    """

    __slots__ = ("_h", "_index", "clamped", "count", "max_s", "min_s", "sum_s")

    def __init__(self, significant_digits: int = 3) -> None:
        self._h = HdrHistogram(1, _HIGHEST_US, significant_digits)
        self._index = _bucket_formula(self._h)
        self.count = 0
        self.max_s = 0.0
        self.min_s = float("inf")
        self.sum_s = 0.0
        #: Values above one hour, recorded as one hour.
        self.clamped = 0

    def record(self, seconds: float, count: int = 1) -> None:
        """Record *count* observations of *seconds* (negative values count as 0)."""
        if count <= 0:
            return
        if seconds < 0:
            seconds = 0.0
        us = int(seconds * 1e6 + 0.5)
        if us > _HIGHEST_US:
            us = _HIGHEST_US
            self.clamped += count
        h = self._h
        if self._index is None:
            h.record_value(us, count)
        else:
            # HdrHistogram.record_value's steps, with its bucket index as one expression
            # (the load generator records ~4 values per frame; hdrh's method calls cost
            # ~30 lines of Python each). _bucket_formula checked it against hdrh's own.
            k, mask, unit, half_magnitude, half = self._index
            bucket = (us | mask).bit_length() - k
            h.counts[((bucket + 1) << half_magnitude) + (us >> (bucket + unit)) - half] += count
            h.total_count += count
            if us < h.min_value:
                h.min_value = us
            if us > h.max_value:
                h.max_value = us
        self.count += count
        self.sum_s += seconds * count
        if seconds > self.max_s:
            self.max_s = seconds
        if seconds < self.min_s:
            self.min_s = seconds

    def merge(self, other: LatencyHistogram) -> None:
        """Add *other*'s observations to this one. Values of a histogram with fewer
        significant digits keep their coarser precision."""
        if other.count == 0:
            return
        self._h.add(other._h)
        self.count += other.count
        self.sum_s += other.sum_s
        self.clamped += other.clamped
        self.max_s = max(self.max_s, other.max_s)
        self.min_s = min(self.min_s, other.min_s)

    def percentile(self, p: float) -> float:
        """The value at percentile *p* (0..100) in seconds; 0.0 when empty. Within the
        histogram's precision of the exact value; never above the true maximum."""
        if self.count == 0:
            return 0.0
        return min(self._h.get_value_at_percentile(p) / 1e6, self.max_s)

    def percentiles(self, ps: Iterable[float]) -> dict[float, float]:
        """Several percentiles at once (one pass over the buckets), in seconds."""
        ps = list(ps)
        if self.count == 0:
            return {p: 0.0 for p in ps}
        values = self._h.get_percentile_to_value_dict(ps)
        return {p: min(values[p] / 1e6, self.max_s) for p in ps}

    @property
    def mean_s(self) -> float:
        return self.sum_s / self.count if self.count else 0.0

    def summary_ms(self) -> dict[str, Any]:
        """``count``, ``mean``, ``p50`` ... ``p999``, ``max`` (milliseconds), for reports."""
        values = self.percentiles(p for _, p in PERCENTILES)
        out: dict[str, Any] = {"count": self.count, "mean": round(self.mean_s * 1e3, 3)}
        for name, p in PERCENTILES:
            out[name] = round(values[p] * 1e3, 3)
        out["max"] = round(self.max_s * 1e3, 3)
        if self.clamped:
            out["clamped_at_1h"] = self.clamped
        return out

    def encode(self) -> str:
        """The histogram in HdrHistogram's compressed base64 form (microseconds), which the
        HdrHistogram tools in every language read back; empty string when empty."""
        if self.count == 0:
            return ""
        data = self._h.encode()
        return data.decode("ascii") if isinstance(data, bytes) else str(data)


def _bucket_formula(h: HdrHistogram) -> tuple[int, int, int, int, int] | None:
    """The constants of *h*'s counts index, ``((b + 1) << half_magnitude) + (v >> (b +
    unit)) - half`` with ``b = (v | mask).bit_length() - k`` (hdrh's ``_counts_index_for``
    written out), or None -- then :meth:`LatencyHistogram.record` calls ``record_value`` --
    if this hdrh version does not store what it needs or computes a different index for
    any probe value across the range."""
    try:
        k = h.unit_magnitude + h.sub_bucket_half_count_magnitude + 1
        index = (k, h.sub_bucket_mask, h.unit_magnitude, h.sub_bucket_half_count_magnitude,
                 h.sub_bucket_half_count)  # fmt: skip
        h.counts[h.counts_len - 1]  # the counts are an indexable array
        if not all(isinstance(getattr(h, a), int) for a in ("total_count", "min_value",
                                                             "max_value")):  # fmt: skip
            return None
        for v in _PROBES:
            b = (v | index[1]).bit_length() - k
            if ((b + 1) << index[3]) + (v >> (b + index[2])) - index[4] != h._counts_index_for(v):
                return None
    except (AttributeError, TypeError, IndexError):
        return None
    return index


#: Values the index formula is checked on: every power of two and its neighbours up to the
#: range's top, and the top itself.
_PROBES: tuple[int, ...] = tuple(
    sorted({v for e in range(33) for v in (2**e - 1, 2**e, 2**e + 1) if 0 <= v <= _HIGHEST_US}
           | {_HIGHEST_US})
)  # fmt: skip
