"""Prometheus metrics of the engine and the small HTTP endpoint that serves them.

``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (200 "ok", or 503 with the
reason while keyd is unreachable or the engine drains) on their own port, so that a scraper
never competes with portal traffic for the protocol listeners.
"""

from __future__ import annotations

import collections
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

__all__ = ["HotCounter", "HotHistogram", "Metrics", "NoncePoolCollector", "serve_http"]

LOGGER = logging.getLogger("dccsign.metrics")
_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _HotSeries:
    __slots__ = ("counts", "created", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum = 0.0
        self.created = time.time()


class HotHistogram:
    """A histogram for the signing path, exported exactly as prometheus_client's
    ``Histogram`` (``_bucket{le=...}``, ``_count``, ``_sum`` and ``_created`` per label set).

    An observation costs a bisect and two additions: ``Histogram.observe`` takes a lock and
    walks its buckets in the interpreter, and the engine observes several times per frame.
    Not thread-safe: observe and scrape from the event loop only (the engine does both).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        if list(self._bounds) != sorted(set(self._bounds)) or not self._bounds:
            raise ValueError("buckets must be distinct and ascending")
        self._series: dict[tuple[str, ...], _HotSeries] = {}
        if not self._labelnames:  # exported from the start, as prometheus_client does
            self._series[()] = _HotSeries(len(self._bounds) + 1)
        registry.register(self)

    def observe(self, value: float, labels: tuple[str, ...] = ()) -> None:
        """One observation of *value* in the series of *labels* (as many values as
        label names)."""
        series = self._series.get(labels)
        if series is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            series = self._series[labels] = _HotSeries(len(self._bounds) + 1)
        series.counts[bisect_left(self._bounds, value)] += 1  # le: value <= bound
        series.sum += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        edges = [*map(floatToGoString, self._bounds), "+Inf"]
        for labels, series in self._series.items():
            total = 0
            buckets = []
            for edge, count in zip(edges, series.counts, strict=True):
                total += count
                buckets.append((edge, total))
            family.add_metric(list(labels), buckets, series.sum)
            family.add_sample(
                self._name + "_created", dict(zip(self._labelnames, labels, strict=True)),
                series.created,
            )  # fmt: skip
        yield family


class HotCounter:
    """A labelled counter for the signing path, exported exactly as prometheus_client's
    ``Counter`` (``_total`` and ``_created`` per label set); an increment is one dict
    update. Not thread-safe, like :class:`HotHistogram`."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        *, registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        """Add *amount* (>= 0) to the series of *labels*."""
        if amount < 0:
            raise ValueError("counters only go up")
        value = self._values.get(labels)
        if value is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            self._created[labels] = time.time()
            value = 0.0
        self._values[labels] = value + amount

    def value(self, labels: tuple[str, ...]) -> float:
        return self._values.get(labels, 0.0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, value in self._values.items():
            family.add_metric(list(labels), value, created=self._created[labels])
        yield family


@dataclass(frozen=True, slots=True)
class _MetricDef:
    """One metric of :class:`Metrics`: the attribute that holds it and how it is built."""

    attr: str
    kind: type[HotCounter] | type[HotHistogram] | type[Counter] | type[Gauge]
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histograms only


# The engine's metrics, in the order they are registered (and exported). The signing path
# observes the hot kinds (HotCounter, HotHistogram) on every request.
_METRICS: Final = (
    _MetricDef(
        "items",
        HotCounter,
        "dccsign_items",
        "Signing items by client, kid, DCC type and result",
        ("client", "kid", "type", "result"),
    ),
    _MetricDef(
        "requests", HotCounter, "dccsign_requests", "Signing requests by client", ("client",)
    ),
    _MetricDef(
        "latency",
        HotHistogram,
        "dccsign_request_seconds",
        "Time from a request's arrival to its reply",
        buckets=_LATENCY_BUCKETS,
    ),
    _MetricDef("busy", Counter, "dccsign_busy", "Requests refused with BUSY", ("client",)),
    _MetricDef(
        "busy_early",
        Counter,
        "dccsign_busy_from_header",
        "Requests refused with BUSY from their frame header, body never decoded",
    ),
    _MetricDef("connections", Gauge, "dccsign_connections", "Open connections"),
    _MetricDef(
        "connections_refused",
        Counter,
        "dccsign_connections_refused",
        "Connections refused: tls (no handshake), identity (unknown or disabled client at "
        "HELLO), capacity (--max-connections reached)",
        ("reason",),
    ),
    _MetricDef(
        "connections_closed",
        Counter,
        "dccsign_connections_closed",
        "Connections the engine closed: protocol (a malformed frame), hello_timeout, "
        "frame_timeout (a frame that did not arrive whole), idle, stalled (the client "
        "read none of its replies), failure (an unexpected error in the engine's handling "
        "of that connection, logged with its traceback)",
        ("reason",),
    ),
    _MetricDef(
        "internal_errors",
        Counter,
        "dccsign_internal_errors",
        "Requests answered INTERNAL after an unexpected error in the engine (each logged "
        "with its traceback)",
    ),
    _MetricDef("pending", Gauge, "dccsign_pending_items", "Items in progress"),
    _MetricDef("keyd_up", Gauge, "dccsign_keyd_up", "1 while keyd answers"),
    _MetricDef("keyd_restarts", Counter, "dccsign_keyd_restarts", "keyd restarts"),
    _MetricDef(
        "keyd_audit_ok",
        Gauge,
        "dccsign_keyd_audit_ok",
        "1 while keyd's audit log commits (keyd can sign), 0 while it cannot or keyd is "
        "not answering (as of the last DESCRIBE poll)",
    ),
    _MetricDef(
        "keyd_audit_outages",
        Counter,
        "dccsign_keyd_audit_outages",
        "Times the engine saw keyd's audit log stop committing (keyd then signs nothing)",
    ),
    _MetricDef(
        "keyd_batch",
        HotHistogram,
        "dccsign_keyd_batch_payloads",
        "Payloads per micro-batch sent to keyd (SIGN_COLUMNS), over all connections",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    ),
    _MetricDef(
        "stage",
        HotHistogram,
        "dccsign_stage_seconds",
        "Time in each stage of the signing path: start (a request read until its task "
        "runs: the event loop's backlog), prepare (a request's validation, policy, quotas "
        "and claims), batch_wait (a micro-batch's oldest part waiting to be sent to keyd), "
        "keyd (a micro-batch's round trip: keyd's queue, checks, signing, audit commit), "
        "encode (a micro-batch's HC1 strings); per request or per micro-batch",
        ("stage",),
        buckets=_LATENCY_BUCKETS,
    ),
    _MetricDef(
        "keyd_in_flight",
        Gauge,
        "dccsign_keyd_in_flight",
        "Micro-batches sent to keyd and not yet answered",
    ),
    _MetricDef(
        "state_up",
        Gauge,
        "dccsign_state_up",
        "With --state: 1 while the shared quota and idempotency store answers",
    ),
    _MetricDef(
        "state_call",
        HotHistogram,
        "dccsign_state_call_seconds",
        "With --state: one call to the shared store (a micro-batch of charges, releases, "
        "claims, results and polls), from its send to its answer",
        buckets=(0.0002, 0.0005, *_LATENCY_BUCKETS),
    ),
    _MetricDef(
        "state_ops",
        HotHistogram,
        "dccsign_state_call_operations",
        "With --state: operations per call to the shared store (an account charged or "
        "released, a key claimed, stored or polled)",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    ),
    _MetricDef(
        "state_errors",
        Counter,
        "dccsign_state_errors",
        "With --state: calls to the shared store that failed or timed out, by exception "
        "(every operation they carried failed with STATE_UNAVAILABLE)",
        ("error",),
    ),
    _MetricDef(
        "state_lost_releases",
        Counter,
        "dccsign_state_lost_releases",
        "With --state: quota units that should have been given back but whose call failed "
        "(they stay counted until their window ends: too much, never too little)",
    ),
)


class Metrics:
    """The engine's metrics, in a registry of their own (tests run several engines).

    One attribute per row of :data:`_METRICS`, plus ``nonce_pools``.
    """

    items: HotCounter
    requests: HotCounter
    latency: HotHistogram
    busy: Counter
    busy_early: Counter
    connections: Gauge
    connections_refused: Counter
    connections_closed: Counter
    internal_errors: Counter
    #: Items in progress: Server sets its function (read at scrape time, not per request).
    pending: Gauge
    keyd_up: Gauge
    keyd_restarts: Counter
    keyd_audit_ok: Gauge
    keyd_audit_outages: Counter
    keyd_batch: HotHistogram
    stage: HotHistogram
    keyd_in_flight: Gauge
    state_up: Gauge
    state_call: HotHistogram
    state_ops: HotHistogram
    state_errors: Counter
    state_lost_releases: Counter

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for d in _METRICS:
            extra = {} if d.buckets is None else {"buckets": d.buckets}
            setattr(self, d.attr, d.kind(d.name, d.doc, d.labels, registry=self.registry, **extra))
        self.nonce_pools = NoncePoolCollector()
        self.registry.register(self.nonce_pools)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One duration of *stage* (see ``dccsign_stage_seconds``)."""
        self.stage.observe(seconds, (stage,))

    def observe(
        self, client: str, results: Sequence[Any], types: Sequence[str], seconds: float
    ) -> None:
        """One answered request: its latency, and per item its kid, DCC type ("" when not
        examined) and result (``ok`` or the error code's name)."""
        self.requests.inc((client,))
        self.latency.observe(seconds)
        # One increment per distinct (kid, type, result) of the request, not per item.
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for result, dcc_type in zip(results, types, strict=True):
            if result.ok:
                counts[result.kid.hex(), dcc_type, "ok"] += 1
            else:
                counts["", dcc_type, getattr(result.error, "name", str(result.error))] += 1
        for (kid, dcc_type, outcome), n in counts.items():
            self.items.inc((client, kid, dcc_type, outcome), n)

    def observe_counts(
        self, client: str, outcomes: dict[tuple[str, str, str], int], seconds: float
    ) -> None:
        """One answered request, counted already per (kid hex, DCC type, outcome)."""
        self.requests.inc((client,))
        self.latency.observe(seconds)
        for (kid, dcc_type, outcome), n in outcomes.items():
            self.items.inc((client, kid, dcc_type, outcome), n)


class NoncePoolCollector:
    """keyd's nonce pools as the engine last saw them (DESCRIBE, every KEYD_POLL seconds).

    keyd owns the counts; the engine only mirrors them, so they are exported as they were
    read rather than as counters the engine increments. The refill rate is
    ``rate(dccsign_keyd_nonce_pool_refilled_total[1m])``. Keys without a pool (token keys,
    ``--nonce-pool 0``) have no series.
    """

    def __init__(self) -> None:
        self._pools: dict[str, Any] = {}

    def update(self, keys: Sequence[Any]) -> None:
        """Take the pools of *keys* (``protocol.keyd.KeyFacts`` with an optional ``pool``)."""
        self.set_pools({k.kid.hex(): k.pool for k in keys if getattr(k, "pool", None) is not None})

    def set_pools(self, pools: Mapping[str, Any]) -> None:
        """Export *pools*: ``PoolStatus`` (or anything with its five fields) by kid in hex."""
        self._pools = dict(pools)

    def collect(self):  # the prometheus_client collector protocol
        families = (
            (GaugeMetricFamily, "entries", "Nonce pool entries ready now, by kid", "level"),
            (GaugeMetricFamily, "capacity", "Nonce pool bound in entries, by kid", "capacity"),
            (CounterMetricFamily, "refilled", "Nonce pool entries computed and added", "refilled"),
            (CounterMetricFamily, "spent", "Signatures made with a pool entry", "spent"),
            (
                CounterMetricFamily,
                "misses",
                "Signatures that found the pool empty (signed the ordinary way)",
                "misses",
            ),
        )
        pools = self._pools
        for family, name, text, field in families:
            metric = family(f"dccsign_keyd_nonce_pool_{name}", text, labels=["kid"])
            for kid, pool in pools.items():
                metric.add_metric([kid], getattr(pool, field))
            yield metric


async def serve_http(
    registry: CollectorRegistry,
    health: Callable[[], str | None],
    host: str,
    port: int,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics (*registry*) and /healthz on *host*:*port*; reports the bound (host,
    port).

    *health* returns None when healthy, else the reason (503).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname())

    async def handler(stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(5):
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
            line = data.split(b"\r\n", 1)[0].split()
            path = line[1].decode("ascii", "replace") if len(line) >= 2 else ""
            if line[:1] != [b"GET"]:
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
            elif path == "/healthz":
                problem = health()
                status = "200 OK" if problem is None else "503 Service Unavailable"
                ctype, body = "text/plain", (problem or "ok").encode() + b"\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            await stream.send_all(head + body)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handler, listeners)
