"""keyd's nonce pool as ``dccsign bench load`` sees it, through the engine's ``/metrics``.

keyd precomputes ECDSA nonces for each active ES256 key and refills them in idle time, so
that a signature made from the pool costs far less than one made the ordinary way. The
engine exports, per kid (label ``kid``: the 8-byte kid in lowercase hex)::

    dccsign_keyd_nonce_pool_entries          gauge    ready now
    dccsign_keyd_nonce_pool_capacity         gauge    the bound
    dccsign_keyd_nonce_pool_refilled_total   counter  ever added
    dccsign_keyd_nonce_pool_spent_total      counter  signatures made from the pool
    dccsign_keyd_nonce_pool_misses_total     counter  signatures that found it empty

No series at all: the engine runs with ``--nonce-pool 0``, or no key has a pool.

Two uses, both reading the endpoint with :func:`dccsign.bench.scrape.scrape_metrics` (the
parser of the before/after scrape) in a worker thread, so that an HTTP GET never blocks the
event loop that releases and times the load:

- :func:`wait_for_full_pool`, before a profile with ``wait_for_pool`` sends anything: polls
  until every kid's pool holds at least :data:`FULL_SHARE` of its capacity.
- :class:`PoolSampler`, during every run with ``--metrics``: one sample about every second,
  in its own task, plus one before the first request and one shortly after the last reply.
  Its :class:`PoolSeries` goes into the JSON report as ``nonce_pool``.

The engine mirrors keyd's counts every 0.25 s (``KEYD_POLL`` in :mod:`dccsign.server.engine`),
so a sample may be that much behind keyd.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .scrape import scrape_metrics

__all__ = [
    "COLUMNS",
    "FULL_SHARE",
    "PoolLevel",
    "PoolSampler",
    "PoolSeries",
    "PoolTimeout",
    "PoolUnavailable",
    "PoolWait",
    "PoolWaitError",
    "WaitProgress",
    "pool_levels",
    "scrape_pool",
    "summarize",
    "total",
    "wait_for_full_pool",
]

#: "Full" for the wait: every kid at 99.9 % of its capacity or more. Exactly equal is not
#: asked for because a live engine's active keys are spent by other traffic while they
#: refill, so the last few entries may never be seen all at once; 0.1 % of a pool is a
#: negligible part of a burst that spends many times that (65 of 65,536 entries).
FULL_SHARE = 0.999

#: The columns of a sample row in the JSON report (counters are cumulative, as exported).
COLUMNS = ("t", "entries", "capacity", "refilled", "spent", "misses")

_SERIES = re.compile(
    r"dccsign_keyd_nonce_pool_(entries|capacity|refilled_total|spent_total|misses_total)"
    r"\{([^}]*)\}"
)
_KID = re.compile(r'(?:^|,)\s*kid="([^"]*)"')
_FIELD = {
    "entries": "entries",
    "capacity": "capacity",
    "refilled_total": "refilled",
    "spent_total": "spent",
    "misses_total": "misses",
}


@dataclass(frozen=True, slots=True)
class PoolLevel:
    """One kid's pool in one scrape (or the sum over kids)."""

    entries: float = 0.0
    capacity: float = 0.0
    refilled: float = 0.0
    spent: float = 0.0
    misses: float = 0.0

    def __add__(self, other: PoolLevel) -> PoolLevel:
        return PoolLevel(
            self.entries + other.entries,
            self.capacity + other.capacity,
            self.refilled + other.refilled,
            self.spent + other.spent,
            self.misses + other.misses,
        )

    @property
    def share(self) -> float:
        """entries / capacity (0 without capacity)."""
        return self.entries / self.capacity if self.capacity > 0 else 0.0

    def full(self, share: float = FULL_SHARE) -> bool:
        return self.entries >= share * self.capacity

    def row(self, t: float) -> list[float]:
        """A sample row in :data:`COLUMNS` order."""
        values = (self.entries, self.capacity, self.refilled, self.spent, self.misses)
        return [round(t, 3), *(int(v) if float(v).is_integer() else v for v in values)]


def pool_levels(samples: Mapping[str, float]) -> dict[str, PoolLevel]:
    """The nonce pool of each kid in one scrape (*samples* as
    :func:`dccsign.bench.scrape.parse_prometheus` returns them), sorted by kid. A kid whose
    capacity is missing or 0 has no pool and is left out; ``{}`` when the engine exports
    none. A missing counter reads 0."""
    fields: dict[str, dict[str, float]] = {}
    for key, value in samples.items():
        m = _SERIES.fullmatch(key)
        if m is None:
            continue
        kid = _KID.search(m.group(2))
        if kid is not None:
            fields.setdefault(kid.group(1), {})[_FIELD[m.group(1)]] = value
    return {kid: PoolLevel(**f) for kid, f in sorted(fields.items()) if f.get("capacity", 0.0) > 0}


def total(levels: Mapping[str, PoolLevel]) -> PoolLevel:
    """The sum over kids."""
    return sum(levels.values(), PoolLevel())


def scrape_pool(url: str, timeout: float) -> tuple[dict[str, PoolLevel] | None, str | None]:
    """One blocking scrape of *url*: (the pool by kid, None), or (None, why not). Never
    raises. Meant for a worker thread."""
    snap = scrape_metrics(url, timeout)
    if snap.samples is None:
        return None, snap.error
    return pool_levels(snap.samples), None


async def _scrape(url: str, limit_s: float) -> tuple[dict[str, PoolLevel] | None, str | None]:
    # abandon_on_cancel: the run's end must not wait for a slow endpoint; the thread finishes
    # on its own within *limit_s* and its result is dropped.
    return await trio.to_thread.run_sync(scrape_pool, url, limit_s, abandon_on_cancel=True)


def _pct(level: PoolLevel) -> str:
    return f"{math.floor(level.share * 100):.0f} %"


# ----------------------------------------------------------------------------- waiting


class PoolWaitError(Exception):
    """The wait for a full pool ended without one; the message says why."""


class PoolUnavailable(PoolWaitError):
    """The endpoint could not be scraped at the start, or it exports no nonce pool."""


class PoolTimeout(PoolWaitError):
    """The pool did not fill within the time allowed."""


@dataclass(frozen=True, slots=True)
class WaitProgress:
    """What :func:`wait_for_full_pool` reports at most once a second."""

    elapsed_s: float
    level: PoolLevel  # the sum over kids
    kids: int
    #: The rise of the entries (sum over kids) since the previous report, per second; None in
    #: the first report. The rise, not the refill counter: it is what brings "full" closer.
    per_s: float | None

    def line(self) -> str:
        text = (
            f"waiting for the nonce pool: {self.level.entries:,.0f} / "
            f"{self.level.capacity:,.0f} entries ({_pct(self.level)})"
        )
        if self.per_s is not None:
            text += f", {self.per_s:,.0f} entries/s"
        return text


@dataclass(frozen=True, slots=True)
class PoolWait:
    """A wait that ended with a full pool."""

    waited_s: float
    timeout_s: float
    levels: dict[str, PoolLevel]
    scrapes: int
    full_share: float = FULL_SHARE

    def as_json(self) -> dict[str, Any]:
        level = total(self.levels)
        return {
            "waited_s": round(self.waited_s, 3),
            "timeout_s": self.timeout_s,
            "full_share": self.full_share,
            "scrapes": self.scrapes,
            "entries": int(level.entries),
            "capacity": int(level.capacity),
            "per_kid": {
                kid: {"entries": int(v.entries), "capacity": int(v.capacity)}
                for kid, v in self.levels.items()
            },
        }


def _not_full(levels: Mapping[str, PoolLevel], share: float) -> str:
    low = [
        f"{kid} {v.entries:,.0f} / {v.capacity:,.0f}"
        for kid, v in levels.items()
        if not v.full(share)
    ]
    return ", ".join(low[:4]) + (f" and {len(low) - 4} more" if len(low) > 4 else "")


async def wait_for_full_pool(
    url: str,
    wait_s: float,
    *,
    progress: Callable[[WaitProgress], None] | None = None,
    poll_s: float = 0.5,
    scrape_timeout: float = 3.0,
    full_share: float = FULL_SHARE,
) -> PoolWait:
    """Poll the metrics endpoint *url* until every kid's pool holds at least *full_share* of
    its capacity; sends nothing to the engine. *progress*, if given, is called with the
    level at most once a second while the pool is not full.

    A scrape that fails after a successful one is a hiccup: the wait goes on (the timeout
    message names the last error).

    Raises:
        PoolUnavailable: the first scrape fails, or a scrape shows no pool series.
        PoolTimeout: not full within *wait_s* seconds; the message has the last level.
    """
    start = trio.current_time()
    deadline = start + wait_s
    levels: dict[str, PoolLevel] | None = None
    last_error: str | None = None
    shown: tuple[float, float] | None = None  # (time, entries) of the last report
    for scrapes in itertools.count(1):
        got, error = await _scrape(url, scrape_timeout)
        now = trio.current_time()
        if got is None:
            if levels is None:
                raise PoolUnavailable(f"{error} (the nonce pool is read from --metrics)")
            last_error = error
        elif not got:
            raise PoolUnavailable(
                f"{url} exports no nonce pool (no dccsign_keyd_nonce_pool_* series): the "
                "engine was started with --nonce-pool 0, or none of its keys has a pool"
            )
        else:
            levels, last_error = got, None
            if all(v.full(full_share) for v in levels.values()):
                return PoolWait(now - start, wait_s, levels, scrapes, full_share)
            shown = _report(progress, shown, now - start, levels)
        if now >= deadline:
            assert levels is not None
            level = total(levels)
            raise PoolTimeout(
                f"the nonce pool did not fill within --pool-wait {wait_s:g} s: "
                f"{level.entries:,.0f} / {level.capacity:,.0f} entries ({_pct(level)}) at the "
                f"last scrape; not full (< {full_share * 100:g} % of capacity): "
                f"{_not_full(levels, full_share)}"
                + (f"; last scrape failed: {last_error}" if last_error else "")
            )
        await trio.sleep(min(poll_s, deadline - now))
    raise AssertionError("unreachable")  # pragma: no cover - itertools.count is endless


def _report(
    progress: Callable[[WaitProgress], None] | None,
    shown: tuple[float, float] | None,
    elapsed: float,
    levels: Mapping[str, PoolLevel],
) -> tuple[float, float] | None:
    """Call *progress* if a second has passed since *shown*; returns the new *shown*."""
    if progress is None or (shown is not None and elapsed - shown[0] < 1.0):
        return shown
    level = total(levels)
    per_s = (level.entries - shown[1]) / (elapsed - shown[0]) if shown is not None else None
    progress(WaitProgress(elapsed, level, len(levels), per_s))
    return elapsed, level.entries


# ----------------------------------------------------------------------------- sampling


@dataclass
class PoolSeries:
    """The samples of one run; times are seconds from the run's start (t = 0: the first
    intended request), taken at the middle of each scrape."""

    url: str
    interval_s: float
    times: list[float] = field(default_factory=list)
    levels: list[dict[str, PoolLevel]] = field(default_factory=list)
    scrape_errors: int = 0
    last_error: str | None = None

    def totals(self) -> list[list[float]]:
        """Rows (:data:`COLUMNS`) of the sum over kids."""
        return [total(lv).row(t) for t, lv in zip(self.times, self.levels, strict=True)]

    def per_kid(self) -> dict[str, list[list[float]]]:
        """Rows (:data:`COLUMNS`) of each kid, in the samples where it appears."""
        out: dict[str, list[list[float]]] = {}
        for t, lv in zip(self.times, self.levels, strict=True):
            for kid, level in lv.items():
                out.setdefault(kid, []).append(level.row(t))
        return dict(sorted(out.items()))

    def as_json(self, window: tuple[float, float]) -> dict[str, Any]:
        """The ``nonce_pool`` section of the report; *window* is the burst's (start, end)
        in seconds, for the level at its start and end."""
        rows = self.totals()
        return {
            "url": self.url,
            "interval_s": self.interval_s,
            "columns": list(COLUMNS),
            "samples": rows,
            "per_kid": self.per_kid(),
            "scrape_errors": self.scrape_errors,
            "last_error": self.last_error,
            "summary": summarize(rows, window, len({k for lv in self.levels for k in lv})),
        }


def _increase(values: Sequence[float]) -> float:
    """How much a counter rose over *values*; a drop is a reset (keyd restarted), after
    which the counter counts from 0 again (as Prometheus' ``increase`` reads it)."""
    return sum(b - a if b >= a else b for a, b in itertools.pairwise(values))


def summarize(
    rows: Sequence[Sequence[float]], window: tuple[float, float], kids: int
) -> dict[str, Any] | None:
    """Derived figures of sample *rows* (sums over kids, :data:`COLUMNS`): the level at the
    start of the burst (the last sample at or before ``window[0]``, else the first), at its
    end (the first sample at or after ``window[1]``, else the last), the lowest level, what
    was refilled, spent and missed between the first and the last sample, and the refill
    rate (mean over that span, and the highest between two consecutive samples). None
    without samples."""
    if not rows:
        return None
    start = next((r for r in reversed(rows) if r[0] <= window[0]), rows[0])
    end = next((r for r in rows if r[0] >= window[1]), rows[-1])
    low = min(rows, key=lambda r: r[1])
    span = rows[-1][0] - rows[0][0]
    refilled = _increase([r[3] for r in rows])
    rates = [
        _increase([a[3], b[3]]) / (b[0] - a[0]) for a, b in itertools.pairwise(rows) if b[0] > a[0]
    ]

    def level(r: Sequence[float]) -> dict[str, float]:
        return {"t": r[0], "entries": r[1], "capacity": r[2]}

    return {
        "kids": kids,
        "burst_start": level(start),
        "burst_end": level(end),
        "min": level(low),
        "refilled": refilled,
        "spent": _increase([r[4] for r in rows]),
        "misses": _increase([r[5] for r in rows]),
        "refill_per_s_mean": round(refilled / span, 1) if span > 0 else None,
        "refill_per_s_max": round(max(rates), 1) if rates else None,
    }


class PoolSampler:
    """Samples the pool during a run (see the module docstring). Scrape failures are
    counted, never raised: the load goes on whatever the metrics endpoint does."""

    def __init__(
        self, url: str, *, interval_s: float = 1.0, timeout: float = 1.0, settle_s: float = 0.5
    ) -> None:
        self.url = url
        self.interval_s = interval_s
        self.timeout = timeout
        self.settle_s = settle_s
        self._times: list[float] = []  # trio clock
        self._levels: list[dict[str, PoolLevel]] = []
        self.scrape_errors = 0
        self.last_error: str | None = None

    @property
    def has_pool(self) -> bool:
        """Whether any sample so far showed a pool."""
        return bool(self._levels)

    @property
    def latest(self) -> PoolLevel | None:
        """The last sample's sum over kids."""
        return total(self._levels[-1]) if self._levels else None

    async def sample(self) -> None:
        """Take one sample now."""
        before = trio.current_time()
        got, error = await _scrape(self.url, self.timeout)
        if got:
            self._times.append((before + trio.current_time()) / 2)
            self._levels.append(got)
            return
        if got is None:
            self.scrape_errors += 1
        self.last_error = error or (
            f"{self.url} exports no nonce pool (no dccsign_keyd_nonce_pool_* series)"
        )

    async def final_sample(self) -> None:
        """The sample after the last reply, *settle_s* later: the engine's copy of keyd's
        counts is refreshed every 0.25 s, so a scrape at once may not include the last
        signatures yet. Not part of any rate (the run's elapsed time ends at its last reply)."""
        await trio.sleep(self.settle_s)
        await self.sample()

    async def run(self, t0: float) -> None:
        """Sample at ``t0 + k * interval_s`` for k = 1, 2, ... until cancelled; a tick
        missed behind a slow scrape is skipped, not caught up."""
        k = 1
        while True:
            await trio.sleep_until(t0 + k * self.interval_s)
            await self.sample()
            k = max(k + 1, math.floor((trio.current_time() - t0) / self.interval_s) + 1)

    def series(self, t0: float) -> PoolSeries:
        """The samples so far, timed from *t0* (the run's start on the trio clock)."""
        return PoolSeries(
            self.url,
            self.interval_s,
            [t - t0 for t in self._times],
            list(self._levels),
            self.scrape_errors,
            self.last_error,
        )
