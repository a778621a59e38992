"""The signing path's metric kinds (``HotHistogram``, ``HotCounter``) are scraped exactly as
prometheus_client's own ``Histogram`` and ``Counter`` would be: dashboards and the load
generator's scrape parser see no difference."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from dccsign.server.metrics import HotCounter, HotHistogram, Metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
VALUES = (0.0, 0.001, 0.0010001, 0.05, 0.1, 0.7, 3.0, 10.0, 11.0, 1e9)


def _text(registry: CollectorRegistry) -> str:
    # _created holds the creation time, which differs between any two series.
    return re.sub(
        r"^(\w+_created(\{[^}]*\})?) \S+$", r"\1 T", generate_latest(registry).decode(), flags=re.M
    )


def test_hot_histogram_is_scraped_as_a_prometheus_histogram():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = HotHistogram("x_seconds", "doc", buckets=BUCKETS, registry=ours)
    labelled = HotHistogram("y_seconds", "doc y", ["stage"], buckets=BUCKETS, registry=ours)
    ref_plain = Histogram("x_seconds", "doc", buckets=BUCKETS, registry=theirs)
    ref_labelled = Histogram("y_seconds", "doc y", ["stage"], buckets=BUCKETS, registry=theirs)
    assert _text(ours) == _text(theirs)  # an unlabelled histogram is there before use
    for i, v in enumerate(VALUES):
        plain.observe(v)
        ref_plain.observe(v)
        stage = ("keyd", "prepare")[i % 2]
        labelled.observe(v, (stage,))
        ref_labelled.labels(stage).observe(v)
    assert _text(ours) == _text(theirs)
    assert 'y_seconds_bucket{le="0.001",stage="keyd"} 1.0' in _text(ours)


def test_hot_counter_is_scraped_as_a_prometheus_counter():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    items = HotCounter("items", "doc", ["client", "result"], registry=ours)
    ref = Counter("items", "doc", ["client", "result"], registry=theirs)
    assert _text(ours) == _text(theirs)
    for client, result, n in (("a", "ok", 3), ("b", "BUSY", 1), ("a", "ok", 2)):
        items.inc((client, result), n)
        ref.labels(client, result).inc(n)
    assert _text(ours) == _text(theirs)
    assert items.value(("a", "ok")) == 5


def test_hot_kinds_refuse_what_prometheus_refuses():
    registry = CollectorRegistry()
    histogram = HotHistogram("h", "doc", ["stage"], buckets=BUCKETS, registry=registry)
    counter = HotCounter("c", "doc", ["client"], registry=registry)
    with pytest.raises(ValueError, match="labels"):
        histogram.observe(1.0, ("a", "b"))
    with pytest.raises(ValueError, match="labels"):
        counter.inc(())
    with pytest.raises(ValueError, match="only go up"):
        counter.inc(("a",), -1)
    with pytest.raises(ValueError, match="ascending"):
        HotHistogram("g", "doc", buckets=(1.0, 0.5), registry=registry)


def test_engine_metrics_count_a_request():
    metrics = Metrics()
    metrics.observe_counts("portal", {("a1b2", "v", "ok"): 49, ("", "t", "INVALID_DCC"): 1}, 0.02)
    metrics.observe_stage("keyd", 0.004)
    text = generate_latest(metrics.registry).decode()
    assert 'dccsign_requests_total{client="portal"} 1.0' in text
    assert 'dccsign_items_total{client="portal",kid="a1b2",result="ok",type="v"} 49.0' in text
    assert 'dccsign_request_seconds_bucket{le="0.02"} 1.0' in text
    assert 'dccsign_stage_seconds_count{stage="keyd"} 1.0' in text
