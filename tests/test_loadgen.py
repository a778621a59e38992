"""``dccsign bench load``: open loop against a stalled fake engine (coordinated omission is
not hidden), closed loop for contrast, counting of BUSY, errors and wrong answers, profiles,
the HDR histogram's precision, the report (JSON, plot, metrics), the nonce pool (the wait for
a full pool, its samples, the burst's rate) against the fake's simulated pool, and a run
against the real engine (slow)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import trio

from dccsign.bench.latency import LatencyHistogram
from dccsign.bench.loadfake import CANNED_KID, FakeEngine, FakePool
from dccsign.bench.loadgen import LoadConfig, LoadError, build_payloads, run_load
from dccsign.bench.loadpool import (
    PoolTimeout,
    PoolUnavailable,
    pool_levels,
    summarize,
    wait_for_full_pool,
)
from dccsign.bench.loadprofile import PRESETS, ProfileError, load_profile, parse_profile
from dccsign.bench.loadreport import plot, text_report, to_json
from dccsign.bench.scrape import metrics_delta, parse_prometheus, scrape_metrics
from dccsign.cli.main import main
from dccsign.testing.wirepair import open_pair
from engine_process import EngineProcess

IN_CI = os.environ.get("CI") == "true"
STALL_AFTER, STALL_FOR = 0.75, 0.5


def _constant(rate: float, seconds: float, arrivals: str = "uniform"):
    return load_profile("constant").scaled(rate=rate, duration=seconds, arrivals=arrivals)


async def _against_fake(tmp_path, fake: FakeEngine, payloads=None, **config):
    """Serve fake on a Unix socket in tmp_path, run one load against it with config (no
    verify sample and 100 accounts unless it says otherwise), stop the fake and return the
    result."""
    path = str(tmp_path / "fake.sock")
    config.setdefault("verify_sample", 0.0)
    config.setdefault("accounts", 100)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve_unix, path)
        result = await run_load(LoadConfig(server=f"unix:{path}", **config), payloads)
        nursery.cancel_scope.cancel()
    return result


# ----------------------------------------------------------------------------- stalls


@pytest.mark.trio
async def test_open_loop_latency_includes_the_stall(tmp_path):
    """A 0.5 s stall in a 2 s run at 1000 requests/s: about a quarter of the requests were
    due while nothing was answered. Measured from their intended start, they waited up to
    the whole stall, so p99 and max show it."""
    fake = FakeEngine(stall_after=STALL_AFTER, stall_for=STALL_FOR)
    r = await _against_fake(tmp_path, fake, profile=_constant(1000, 2.0), connections=1)
    assert fake.held > 0
    assert r.ok == r.offered == r.sent and r.errors == 0 and r.busy_replies == 0
    assert r.latency.percentile(99) >= 0.8 * STALL_FOR
    assert r.latency.max_s >= 0.9 * STALL_FOR
    # The requests due during the stall waited in the backlog (the engine's 32 in-flight
    # slots were full): many more than 1 % of them were delayed by a large part of it.
    assert r.latency.percentile(90) >= 0.2 * STALL_FOR
    assert r.send_delay.max_s >= 0.5 * STALL_FOR


@pytest.mark.trio
async def test_closed_loop_hides_the_same_stall(tmp_path):
    """The coordinated-omission contrast: a closed loop sends nothing while it waits, so the
    same stall touches only the 4 requests in flight. max sees it, the percentiles do not --
    which is why open loop is the default."""
    fake = FakeEngine(stall_after=STALL_AFTER, stall_for=STALL_FOR)
    r = await _against_fake(
        tmp_path,
        fake,
        profile=_constant(1000, 2.0),
        closed_loop=True,
        connections=1,
        in_flight=4,
    )
    assert fake.held == 4
    assert r.latency.max_s >= 0.9 * STALL_FOR
    assert r.latency.percentile(99) < 0.2 * STALL_FOR
    assert r.ok > 1000  # far more than 100 x the 4 stalled requests: p99 cannot see them


# ----------------------------------------------------------------------------- counting


@pytest.mark.trio
async def test_busy_is_counted_and_nothing_is_retried(tmp_path):
    fake = FakeEngine(stall_after=0.2, stall_for=0.3, max_in_flight=2)
    r = await _against_fake(
        tmp_path,
        fake,
        profile=_constant(400, 1.0),
        connections=1,
        exceed_in_flight=True,
        batch=2,
    )
    assert r.busy_replies > 0 and r.busy_certs == 2 * r.busy_replies
    assert r.ok + r.busy_certs == r.offered == r.sent
    assert fake.requests == r.sent_frames  # each request exactly once


@pytest.mark.trio
async def test_invalid_items_get_the_expected_rejection(tmp_path):
    payloads = build_payloads(batch=10, invalid_share=0.2, accounts=50, pool_items=500)
    assert sum(payloads.invalid) == 100
    assert {k for k in payloads.invalid_kind if k} == {
        "uvci-check-character",
        "unknown-country",
        "impossible-date",
        "missing-name",
    }
    assert len(set(payloads.accounts)) == 50
    assert {d[t][0]["ci"][:8] for d in payloads.dccs for t in "vtr" if t in d} == {"URN:UVCI"}
    fake = FakeEngine(validate=True)
    path = str(tmp_path / "fake.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve_unix, path)
        config = LoadConfig(
            profile=_constant(2000, 1.0),
            server=f"unix:{path}",
            batch=10,
            invalid_share=0.2,
            verify_sample=0.0,
        )
        r = await run_load(config, payloads)
        nursery.cancel_scope.cancel()
    assert r.errors == 0
    assert r.rejected_as_expected + r.ok == r.offered
    assert r.rejected_as_expected == pytest.approx(0.2 * r.offered, rel=0.25)


@pytest.mark.trio
async def test_a_fast_wrong_answer_never_counts(tmp_path):
    """The fake answers at once with an HC1 that verifies against nothing: every sampled
    certificate moves from ok to the error bad_signature."""
    r = await _against_fake(
        tmp_path,
        FakeEngine(),
        profile=_constant(500, 0.5),
        verify_sample=1.0,
        batch=5,
    )
    assert r.verify["verified"] == r.offered
    assert r.errors_by_code == {"bad_signature": r.offered}
    assert r.ok == 0 and r.wrong_answers == r.offered
    assert "not a valid signature" in r.verify["reasons"][0]


@pytest.mark.parametrize("batch", [1, 10])
@pytest.mark.trio
async def test_fast_fake_answers_from_its_cache(tmp_path, batch):
    """The fake of the ceiling measurement (bench/loadgen_ceiling.py): LIST_KEYS still
    answered, every request once, replies of the right size."""
    fake = FakeEngine(fast=True)
    r = await _against_fake(tmp_path, fake, profile=_constant(2000, 0.5), batch=batch)
    assert r.ok == r.offered == r.sent > 0 and r.errors == 0
    assert fake.requests == r.sent_frames and fake.items == r.sent


@pytest.mark.trio
async def test_unreachable_engine_is_a_load_error(tmp_path):
    config = LoadConfig(profile=_constant(10, 0.1), server=f"unix:{tmp_path}/none.sock")
    with pytest.raises(LoadError, match="cannot connect"):
        await run_load(config, build_payloads(batch=1, accounts=10, pool_items=10))


@pytest.mark.trio
async def test_batch_above_max_batch_is_refused(tmp_path):
    fake = FakeEngine(max_batch=5)
    path = str(tmp_path / "fake.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve_unix, path)
        config = LoadConfig(profile=_constant(10, 0.1), server=f"unix:{path}", batch=10)
        with pytest.raises(LoadError, match="max_batch 5"):
            await run_load(config, build_payloads(batch=10, accounts=10, pool_items=10))
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- profiles


def test_presets_parse_and_have_their_shapes():
    for name in PRESETS:
        p = load_profile(name)
        assert p.name == name and p.duration > 0 and p.description
    spike = load_profile("spike")
    assert spike.rate_at(5) == spike.base_rate
    assert spike.rate_at(15) == 10 * spike.base_rate
    assert spike.rate_at(25) == spike.base_rate
    ramp = load_profile("ramp")
    assert ramp.rate_at(0) < ramp.rate_at(30) < ramp.rate_at(59.9)
    herd = load_profile("herd")
    assert max(herd.rate_at(t / 10) for t in range(250)) == 20 * herd.base_rate


def test_profile_file_and_overrides(tmp_path):
    path = tmp_path / "wave.toml"
    path.write_text(
        'description = "a test"\nbase_rate = 100\narrivals = "uniform"\n'
        "[[phase]]\nduration = 2\nlevel = 0\nto_level = 2\n"
        "[[phase]]\nduration = 1\nlevel = 1\n"
    )
    p = load_profile(str(path))
    assert p.name == "wave" and p.arrivals == "uniform" and p.duration == 3
    assert p.cumulative(3) == pytest.approx(200 + 100)
    assert load_profile(str(path)).to_toml() == parse_profile(p.to_toml(), "again").to_toml()
    q = p.scaled(rate=1000, duration=6, arrivals="poisson")
    assert q.duration == pytest.approx(6) and q.cumulative(6) == pytest.approx(6000)
    assert q.arrivals == "poisson"


def test_arrivals_match_the_intended_rate():
    p = parse_profile(
        "base_rate = 1000\narrivals = 'uniform'\n[[phase]]\nduration = 2\nlevel = 0\n"
        "to_level = 1\n[[phase]]\nduration = 1\nlevel = 1\n",
        "test",
    )
    times = list(p.arrival_times(10))
    assert len(times) == round(p.cumulative(3) / 10) == 200
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= 3
    # The first second of a ramp from 0 gets a quarter of the ramp's requests.
    assert sum(t < 1 for t in times) == pytest.approx(25, abs=1)
    for u in (0.0, 1.0, 333.3, 1000.0, 1999.9):
        assert p.cumulative(p.time_for(u)) == pytest.approx(u, abs=1e-6)
    assert p.time_for(2000.1) is None
    poisson = list(p.scaled(arrivals="poisson").arrival_times(1, seed=7))
    assert abs(len(poisson) - 2000) < 5 * math.sqrt(2000)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base_rate = 1\n[[phase]]\nduration = 1\nlevel = 1\nlevl = 2\n", "unknown key"),
        ("[[phase]]\nduration = 1\nlevel = 1\n", "base_rate: missing"),
        ("base_rate = 1\n", "at least one [[phase]]"),
        ("base_rate = 1\n[[phase]]\nduration = 1\nlevel = -1\n", "phase[0].level"),
        ("base_rate = 1\n[[phase]]\nduration = 0\nlevel = 1\n", "phase[0].duration"),
        ("base_rate = 1\n[[phase]]\nduration = 1\nlevel = true\n", "must be a number"),
        ("base_rate = 1\n[[phase]]\nduration = 1\nlevel = 0\n", "every level is 0"),
        ("base_rate = 1\narrivals = 'bursty'\n[[phase]]\nduration = 1\nlevel = 1\n", "arrivals"),
        ("base_rate = [\n", "not valid TOML"),
        ("rate = 5\n", "unknown key(s) rate"),
        ("base_rate = 1\nwait_for_pool = 1\n[[phase]]\nduration = 1\nlevel = 1\n", "true or false"),
        ("base_rate = 1\nmin_duration = 5\n[[phase]]\nduration = 1\nlevel = 1\n", "min_duration 5"),
    ],
)
def test_bad_profiles_are_refused_clearly(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ProfileError, match="unknown profile 'spiky'"):
        load_profile("spiky")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile("/nonexistent/profile.toml")


# ----------------------------------------------------------------------------- histogram


def _exact(sorted_values, p):
    # HdrHistogram's definition: the smallest value with at least p % of the count at or
    # below it (the target count rounded to nearest, at least 1).
    n = len(sorted_values)
    return sorted_values[max(int(p * n / 100 + 0.5), 1) - 1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_histogram_percentiles_are_within_hdr_precision(seed):
    rng = random.Random(seed)
    # Latencies from 20 us to tens of seconds: a lognormal body and a stall-like tail.
    values = [rng.lognormvariate(math.log(0.003), 1.2) for _ in range(20_000)]
    values += [rng.uniform(0.5, 30.0) for _ in range(300)]
    h = LatencyHistogram()
    for v in values:
        h.record(v)
    exact = sorted(int(v * 1e6 + 0.5) / 1e6 for v in values)  # what was recorded, in us
    for p in (0.1, 1, 10, 50, 90, 99, 99.9, 99.99, 100):
        got, want = h.percentile(p), _exact(exact, p)
        # 3 significant digits: the bucket is at most 1/1024 of the value wide, and HDR
        # reports its upper end.
        assert want - 1e-6 <= got <= want * (1 + 1 / 1024) + 1e-6, (p, got, want)
    assert h.max_s == max(values) and h.count == len(values)
    assert h.percentiles([50.0, 99.0]) == {50.0: h.percentile(50), 99.0: h.percentile(99)}


@pytest.mark.parametrize("digits", [2, 3])
def test_histogram_records_exactly_what_hdr_record_value_does(digits):
    """LatencyHistogram.record's written-out bucket index against hdrh's own record_value:
    the same counts (the encoded histograms are equal), total, minimum and maximum, over
    the whole range -- zero, every power of two's neighbourhood, random values, the clamp."""
    from hdrh.histogram import HdrHistogram

    from dccsign.bench import latency

    rng = random.Random(digits)
    values_us = [0, 1, 2, 3, latency._HIGHEST_US, latency._HIGHEST_US - 1]
    values_us += [v for e in range(32) for v in (2**e - 1, 2**e, 2**e + 1)
                  if v <= latency._HIGHEST_US]  # fmt: skip
    values_us += [rng.randrange(0, latency._HIGHEST_US + 1) for _ in range(3000)]
    values_us += [int(rng.lognormvariate(math.log(3000), 1.5)) % latency._HIGHEST_US
                  for _ in range(3000)]  # fmt: skip
    ours = LatencyHistogram(digits)
    assert ours._index is not None  # the fast path is the one under test
    theirs = HdrHistogram(1, latency._HIGHEST_US, digits)
    for i, us in enumerate(values_us):
        ours.record(us / 1e6, 1 + i % 3)
        theirs.record_value(us, 1 + i % 3)
    ours.record(7200.0)  # clamped to the top
    theirs.record_value(latency._HIGHEST_US)
    h = ours._h
    assert (h.total_count, h.min_value, h.max_value) == (
        theirs.total_count,
        theirs.min_value,
        theirs.max_value,
    )
    assert list(h.counts) == list(theirs.counts)
    assert h.encode() == theirs.encode()


def test_histogram_falls_back_to_record_value_when_hdrh_differs(monkeypatch):
    """An hdrh whose index differs from the formula (a future version): record_value."""
    from hdrh.histogram import HdrHistogram

    monkeypatch.setattr(HdrHistogram, "_counts_index_for", lambda self, v: 0)
    h = LatencyHistogram()
    assert h._index is None
    h.record(0.004)
    assert h.count == 1 and h._h.total_count == 1 and h._h.counts[0] == 1  # by the patched hdrh


def test_histogram_counts_merge_and_clamp():
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record(0.010, 99)
    b.record(7200.0)  # two hours: beyond the range
    b.record(-1.0)  # a clock step back: counted as 0
    a.merge(b)
    assert a.count == 101 and a.clamped == 1 and a.max_s == 7200.0
    assert a.percentile(50) == pytest.approx(0.010, rel=1e-3)
    assert a.percentile(100) == pytest.approx(3600.0, rel=1e-3)
    assert a.encode().startswith("HISTF")
    empty = LatencyHistogram()
    assert empty.percentile(99) == 0.0 and empty.summary_ms()["max"] == 0.0


# ----------------------------------------------------------------------------- reports


def test_prometheus_parsing_and_delta():
    before = parse_prometheus(
        '# HELP x\ndccsign_items_total{client="a",kid="k",result="ok"} 10.0\n'
        'dccsign_busy_total{client="a"} 1.0\ndccsign_request_seconds_count 4.0\n'
        "dccsign_request_seconds_sum 0.4\ngarbage line\n"
    )
    after = parse_prometheus(
        'dccsign_items_total{client="a",kid="k",result="ok"} 110.0\n'
        'dccsign_items_total{client="a",kid="",result="INVALID_DCC"} 5.0\n'
        'dccsign_busy_total{client="a"} 3.0\ndccsign_request_seconds_count 14.0\n'
        "dccsign_request_seconds_sum 1.4\n"
    )
    from dccsign.bench.scrape import MetricsSnapshot

    d = metrics_delta(MetricsSnapshot("u", before, None), MetricsSnapshot("u", after, None))
    assert d["items_by_result"] == {"INVALID_DCC": 5, "ok": 100}
    assert d["busy"] == 2 and d["requests"] == 10 and d["mean_request_ms"] == 100.0
    assert d["stage_mean_ms"] == {}


def test_stage_means_come_in_path_order_from_the_run_only():
    """dccsign_stage_seconds: the run's share (after minus before) of each stage's sum and
    count gives its mean, listed in the order of the signing path; unknown stages last."""
    from dccsign.bench.scrape import MetricsSnapshot

    def snap(scale):
        lines = [
            f'dccsign_stage_seconds_sum{{stage="{name}"}} {s * scale}\n'
            f'dccsign_stage_seconds_count{{stage="{name}"}} {c * scale}\n'
            for name, s, c in (
                ("encode", 0.02, 10),
                ("future", 1.0, 1),
                ("keyd", 0.5, 100),
                ("start", 0.01, 50),
            )
        ]
        return MetricsSnapshot("u", parse_prometheus("".join(lines)), None)

    d = metrics_delta(snap(1), snap(3))  # the run: twice the totals before it
    assert list(d["stage_mean_ms"]) == ["start", "keyd", "encode", "future"]
    assert d["stage_mean_ms"] == {"start": 0.2, "keyd": 5.0, "encode": 2.0, "future": 1000.0}


def test_unreachable_metrics_are_reported_not_raised():
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    snap = scrape_metrics(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert snap.samples is None and "cannot scrape" in snap.error
    assert "error" in metrics_delta(snap, snap)


@pytest.fixture
def fake_process(tmp_path):
    """The fake engine in its own process, for the command line (which runs its own trio)."""
    path = tmp_path / "f.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dccsign.bench.loadfake", "--unix", str(path)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the fake did not start"
        time.sleep(0.02)
    yield f"unix:{path}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def _plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("matplotlib is missing under CI (it is in the [test] extra)")
        return False
    return True


def test_cli_json_plot_and_exit_codes(fake_process, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    plot = _plot_available()
    argv = ["bench", "load", "--server", fake_process, "--profile", "spike", "--rate", "50"]
    argv += ["--duration", "1.5", "--batch", "5", "--verify-sample", "0", "--metrics", "none"]
    argv += ["--accounts", "100"]
    argv += ["--quiet", "--json", str(out)] + (["--plot", str(png)] if plot else [])
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    for key in ("certs_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "busy"):
        assert isinstance(doc[key], int | float), key
    assert doc["errors"] == 0 and doc["busy"] == 0
    assert doc["counts"]["ok"] == doc["counts"]["offered"] > 0
    assert doc["latency"]["p99"] == doc["p99_ms"]
    assert doc["profile"]["name"] == "spike" and doc["engine_metrics"] is None
    intended = [e["intended"] for e in doc["timeline"]]
    assert max(intended) > 5 * min(i for i in intended if i)  # the spike is in the timeline
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "signed ok" in text and "p99.9" in text

    # JSON to stdout; a sampled HC1 of the fake does not verify: exit 1.
    argv = ["bench", "load", "--server", fake_process, "--rate", "100", "--duration", "0.5"]
    argv += ["--verify-sample", "1", "--metrics", "none", "--quiet", "--json", "--accounts", "9"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["errors_by_code"]["bad_signature"] == doc["wrong_answers"] > 0
    assert "FAILED" in captured.err and "signed ok" in captured.err


def test_cli_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("base_rate = 0\n")
    assert main(["bench", "load", "--profile", str(bad)]) == 2
    assert "base_rate" in capsys.readouterr().err
    assert main(["bench", "load", "--server", f"unix:{tmp_path}/no.sock", "--quiet"]) == 4
    assert "cannot connect" in capsys.readouterr().err
    assert main(["bench", "load", "--profile", "ramp", "--rate", "10", "--print-profile"]) == 0
    assert "base_rate = 10\n" in capsys.readouterr().out


def test_to_json_of_an_empty_run_is_complete():
    from dccsign.bench.loadgen import LoadResult

    config = LoadConfig(profile=_constant(10, 1.0))
    r = LoadResult(config, config.profile, "open-loop", {"server": "x"}, 0, 0.0, 0.0, 1.0, 1.0)
    doc = to_json(r)
    assert doc["certs_per_s"] == 0 and doc["p99_ms"] == 0.0 and doc["errors"] == 0
    assert doc["burst_certs_per_s"] == 0 and doc["burst"]["end_s"] == 1.0
    assert doc["nonce_pool"] is None and doc["pool_wait"] is None
    json.dumps(doc)


# ----------------------------------------------------------------------------- nonce pool

POOL_KID = CANNED_KID.hex()  # the kid of every reply of the fake, whose pool signing spends


def test_burst_preset_parses_and_is_listed(capsys):
    burst = load_profile("burst")
    assert "burst" in PRESETS and burst.wait_for_pool and burst.min_duration == 10
    assert burst.duration == 10 and [p.level for p in burst.phases] == [1]
    assert "full nonce pool" in burst.description and "--rate" in burst.description
    assert not load_profile("spike").wait_for_pool  # the flag, not the name, decides
    # --duration stretches it, never shrinks it below its 10 s.
    assert burst.scaled(duration=25).duration == pytest.approx(25)
    with pytest.raises(ProfileError, match="at least 10 s"):
        burst.scaled(duration=9.5)
    again = parse_profile(burst.to_toml(), "again")
    assert again.wait_for_pool and again.min_duration == 10
    assert main(["bench", "load", "--profile", "burst", "--rate", "9000", "--print-profile"]) == 0
    out = capsys.readouterr().out
    assert "wait_for_pool = true" in out and "base_rate = 9000\n" in out
    assert (
        main(["bench", "load", "--profile", "burst", "--duration", "5", "--metrics", "none"]) == 2
    )
    assert "min_duration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "load", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "burst: launch morning with a full nonce pool" in help_text
    assert "--pool-wait S" in help_text and "5 the nonce pool did not fill" in help_text


def test_pool_series_are_read_per_kid():
    text = (
        "# TYPE dccsign_keyd_nonce_pool_entries gauge\n"
        'dccsign_keyd_nonce_pool_entries{kid="a1b2c3d4e5f60718"} 41230.0\n'
        'dccsign_keyd_nonce_pool_entries{kid="00000000000000ff"} 7.0\n'
        'dccsign_keyd_nonce_pool_capacity{kid="a1b2c3d4e5f60718"} 65536.0\n'
        'dccsign_keyd_nonce_pool_capacity{kid="00000000000000ff"} 0.0\n'
        'dccsign_keyd_nonce_pool_refilled_total{kid="a1b2c3d4e5f60718"} 70000.0\n'
        'dccsign_keyd_nonce_pool_refilled_created{kid="a1b2c3d4e5f60718"} 1.7e9\n'
        'dccsign_keyd_nonce_pool_spent_total{kid="a1b2c3d4e5f60718"} 4464.0\n'
        'dccsign_keyd_nonce_pool_misses_total{kid="a1b2c3d4e5f60718"} 3.0\n'
        'dccsign_items_total{client="a",kid="a1b2c3d4e5f60718",result="ok"} 10.0\n'
    )
    levels = pool_levels(parse_prometheus(text))
    assert list(levels) == ["a1b2c3d4e5f60718"]  # capacity 0: no pool
    level = levels["a1b2c3d4e5f60718"]
    assert (level.entries, level.capacity, level.refilled, level.spent, level.misses) == (
        41230,
        65536,
        70000,
        4464,
        3,
    )
    assert not level.full() and level.share == pytest.approx(41230 / 65536)
    assert pool_levels(parse_prometheus("dccsign_keyd_up 1.0\n")) == {}


def test_pool_summary_picks_the_burst_window_and_survives_a_counter_reset():
    # t, entries, capacity, refilled, spent, misses (sums over kids)
    rows = [
        [-0.05, 1000, 1000, 1000, 0, 0],
        [1.0, 600, 1000, 1100, 500, 0],
        [2.0, 0, 1000, 1200, 1200, 40],
        [3.0, 300, 1000, 300, 0, 0],  # keyd restarted: its counters start again
        [4.0, 500, 1000, 500, 0, 0],
    ]
    s = summarize(rows, (1.0, 2.5), 2)
    assert s["burst_start"] == {"t": 1.0, "entries": 600, "capacity": 1000}
    assert s["burst_end"] == {"t": 3.0, "entries": 300, "capacity": 1000}
    assert s["min"]["entries"] == 0 and s["min"]["t"] == 2.0
    assert s["refilled"] == 100 + 100 + 300 + 200
    assert s["spent"] == 1200 and s["misses"] == 40 and s["kids"] == 2
    assert s["refill_per_s_max"] == 300.0
    assert s["refill_per_s_mean"] == round(700 / 4.05, 1)
    assert summarize([], (0, 1), 0) is None


@pytest.mark.trio
async def test_the_burst_is_the_busiest_phase_counted_by_reply_time(tmp_path):
    """0.6 s at 300/s, then 0.6 s at 1,500/s: the burst is the second phase, and its rate
    counts only the replies that arrived within it."""
    profile = parse_profile(
        "base_rate = 300\narrivals = 'uniform'\n[[phase]]\nduration = 0.6\nlevel = 1\n"
        "[[phase]]\nduration = 0.6\nlevel = 5\n",
        "two",
    )
    r = await _against_fake(tmp_path, FakeEngine(), profile=profile, batch=5)
    doc = to_json(r)
    first, second = doc["phases"]
    assert doc["burst"] == second and (second["start_s"], second["end_s"]) == (0.6, 1.2)
    assert second["intended_certs_per_s"] == 5 * first["intended_certs_per_s"] == 1500
    assert second["ok"] > first["ok"] > 0
    assert sum(r.phase_ok) == r.ok and len(r.phase_ok) == 3  # the last: after the profile
    assert doc["burst_certs_per_s"] == round(second["ok"] / 0.6, 1)
    assert doc["nonce_pool"] is None  # no metrics_url: not sampled


@pytest.mark.trio
async def test_wait_for_full_pool_waits_for_the_fill(tmp_path):
    """An empty pool of 1,000 filling at 2,500 entries/s: it cannot hold 999 before 0.3996 s
    of simulated fill, so the wait cannot end earlier; nothing is sent to the engine."""
    fake = FakeEngine(pools={CANNED_KID: FakePool(1000, fill_rate=2500)})
    seen = []
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(fake.serve_metrics)
        url = f"http://{host}:{port}/metrics"
        waited = await wait_for_full_pool(url, 30, progress=seen.append, poll_s=0.05)
        nursery.cancel_scope.cancel()
    assert waited.waited_s >= 0.39 and waited.scrapes >= 2
    assert waited.levels[POOL_KID].entries >= 999 and waited.levels[POOL_KID].capacity == 1000
    assert seen and seen[0].level.entries < 999 and seen[0].per_s is None
    assert seen[0].line().startswith("waiting for the nonce pool: ")
    assert "/ 1,000 entries (" in seen[0].line()
    assert fake.requests == 0 and fake.scrapes == waited.scrapes
    assert waited.as_json()["per_kid"][POOL_KID]["capacity"] == 1000


@pytest.mark.trio
async def test_wait_for_full_pool_times_out_or_finds_no_pool(tmp_path):
    stuck = FakeEngine(pools={CANNED_KID: FakePool(1000, entries=10)})  # never refilled
    none = FakeEngine()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(stuck.serve_metrics)
        with pytest.raises(PoolTimeout) as info:
            await wait_for_full_pool(f"http://{host}:{port}/metrics", 0.3, poll_s=0.05)
        host, port = await nursery.start(none.serve_metrics)
        with pytest.raises(PoolUnavailable, match=r"exports no nonce pool.*--nonce-pool 0"):
            await wait_for_full_pool(f"http://{host}:{port}/metrics", 5)
        nursery.cancel_scope.cancel()
    message = str(info.value)
    assert "did not fill within --pool-wait 0.3 s" in message
    assert "10 / 1,000 entries (1 %)" in message and f"{POOL_KID} 10 / 1,000" in message
    assert stuck.scrapes >= 2


@contextlib.contextmanager
def _fake_in_thread(tmp_path, fake: FakeEngine):
    """The fake engine and its metrics endpoint in a thread with a trio run of its own, so
    that the command line (which runs trio itself) drives it while the test can still look
    at the fake's state afterwards."""
    path = str(tmp_path / "pool.sock")
    ready = threading.Event()
    box = {}

    async def serve():
        async with trio.open_nursery() as nursery:
            box["scope"] = nursery.cancel_scope
            box["token"] = trio.lowlevel.current_trio_token()
            await nursery.start(fake.serve_unix, path)
            host, port = await nursery.start(fake.serve_metrics)
            box["url"] = f"http://{host}:{port}/metrics"
            ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(30), "the fake did not start"
    try:
        yield f"unix:{path}", box["url"]
    finally:
        trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(30)


def _pool_profile(tmp_path, seconds: float, rate: float):
    path = tmp_path / "pool.toml"
    path.write_text(
        f"base_rate = {rate}\narrivals = 'uniform'\nwait_for_pool = true\n"
        f"[[phase]]\nduration = {seconds}\nlevel = 1\n"
    )
    return str(path)


def _pool_argv(server, url, profile, *more):
    return [
        "bench", "load", "--server", server, "--metrics", url, "--profile", profile,
        "--batch", "10", "--verify-sample", "0", "--accounts", "100", "--quiet", *more,
    ]  # fmt: skip


def test_cli_waits_for_the_pool_before_sending_and_counts_the_wait_in_no_rate(tmp_path, capsys):
    """The pool starts empty and takes 2 s of simulated fill: the first request must find
    it full, and the 1 s run's rates must not include the wait."""
    pool = FakePool(2000, fill_rate=1000)
    fake = FakeEngine(pools={CANNED_KID: pool})
    out = tmp_path / "r.json"
    with _fake_in_thread(tmp_path, fake) as (server, url):
        argv = _pool_argv(server, url, _pool_profile(tmp_path, 1.0, 500), "--json", str(out))
        assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert fake.pool_at_first_request is not None and fake.pool_at_first_request >= 1998
    wait = doc["pool_wait"]
    assert wait["waited_s"] >= 1.9 and wait["entries"] >= 1998 and wait["capacity"] == 2000
    ok = doc["counts"]["ok"]
    assert ok > 0 and doc["elapsed_s"] < 1.0 + wait["waited_s"]
    assert doc["certs_per_s"] == round(ok / doc["elapsed_s"], 1)
    assert doc["burst"]["start_s"] == 0 and doc["burst"]["end_s"] == 1.0
    assert doc["burst_certs_per_s"] == doc["burst"]["ok"] <= ok  # a window of 1 s
    err = capsys.readouterr().err
    assert "nonce pool full after" in err and "entries over 1 kid(s)" in err


def test_cli_samples_the_pool_and_reports_the_burst(tmp_path, capsys):
    """A full pool of 2,000 refilled at 400/s and a 1.5 s burst of ~3,000 certificates:
    it runs dry, and the report's spent and misses are exactly the fake's."""
    pool = FakePool(2000, entries=2000, fill_rate=400)
    fake = FakeEngine(pools={CANNED_KID: pool, b"\x00" * 7 + b"\x02": FakePool(50, entries=50)})
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    plotting = _plot_available()
    more = ["--json", str(out)] + (["--plot", str(png)] if plotting else [])
    with _fake_in_thread(tmp_path, fake) as (server, url):
        assert main(_pool_argv(server, url, _pool_profile(tmp_path, 1.5, 2000), *more)) == 0
    doc = json.loads(out.read_text())
    pool_doc = doc["nonce_pool"]
    assert pool_doc["columns"] == ["t", "entries", "capacity", "refilled", "spent", "misses"]
    rows = pool_doc["samples"]
    assert len(rows) >= 3 and rows[0][0] < 0 < rows[-1][0]  # before the first request, after
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert rows[0][1:3] == [2050, 2050]  # the sum over both kids, full at the start
    assert sorted(pool_doc["per_kid"]) == sorted([POOL_KID, "0000000000000002"])
    assert len(pool_doc["per_kid"][POOL_KID]) == len(rows)
    s = pool_doc["summary"]
    assert s["kids"] == 2 and s["burst_start"]["entries"] == 2050
    assert s["spent"] == pool.spent and s["misses"] == pool.misses > 0
    assert s["spent"] + s["misses"] == doc["counts"]["ok"]
    assert 0 < s["refilled"] <= pool.refilled - 2000 and s["min"]["entries"] < 2050
    b = doc["burst"]
    assert b["phase"] == 0 and b["end_s"] == 1.5 and doc["phases"] == [b]
    assert doc["burst_certs_per_s"] == round(b["ok"] / 1.5, 1)
    text = capsys.readouterr().out
    assert text == text_report(doc) + (f"  plot: {png}\n" if plotting else "")
    assert f"burst       {b['certs_per_s']:>10,.0f} certs/s   (signed ok in phase[0]" in text
    assert f"misses {s['misses']:,}" in text and "nonce pool  burst start 2,050 / 2,050" in text
    assert "2 kids" in text and f"{len(rows)} samples" in text
    if plotting:
        assert _png_height(png) > 0


def _png_height(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[20:24])[0]  # IHDR: width, then height


def test_plot_gets_a_pool_panel_when_there_are_samples(tmp_path):
    if not _plot_available():
        pytest.skip("matplotlib is not installed (pip install matplotlib, or the [test] extra)")
    from dccsign.bench.loadgen import LoadResult
    from dccsign.bench.loadpool import PoolLevel, PoolSeries

    config = LoadConfig(profile=_constant(10, 2.0))
    r = LoadResult(config, config.profile, "open-loop", {"server": "x"}, 0, 0.0, 0.0, 2.0, 2.0)
    doc = to_json(r)
    plot(doc, tmp_path / "plain.png")
    r.nonce_pool = PoolSeries(
        "u",
        1.0,
        [0.0, 1.0, 2.0],
        [{"k": PoolLevel(e, 100, 100, 100 - e, 0)} for e in (100.0, 40.0, 0.0)],
    )
    doc = to_json(r)
    plot(doc, tmp_path / "pool.png")
    assert _png_height(tmp_path / "pool.png") > _png_height(tmp_path / "plain.png")


def test_cli_pool_errors_are_clear(tmp_path, capsys):
    """--metrics none with a waiting profile: usage (2) before anything is prepared; an
    engine without a pool, or an unreachable endpoint: 4; a pool that never fills: 5."""
    assert main(["bench", "load", "--profile", "burst", "--metrics", "none"]) == 2
    err = capsys.readouterr().err
    assert "the burst profile waits for the nonce pool: give --metrics URL" in err
    assert "preparing" not in err
    profile = _pool_profile(tmp_path, 0.5, 100)
    fake = FakeEngine()
    with _fake_in_thread(tmp_path, fake) as (server, url):
        assert main(_pool_argv(server, url, profile)) == 4
    assert "exports no nonce pool" in capsys.readouterr().err and fake.requests == 0
    stuck = FakeEngine(pools={CANNED_KID: FakePool(1000, entries=500)})
    with _fake_in_thread(tmp_path, stuck) as (server, url):
        assert main(_pool_argv(server, url, profile, "--pool-wait", "0.5")) == 5
    err = capsys.readouterr().err
    assert "did not fill within --pool-wait 0.5 s: 500 / 1,000 entries (50 %)" in err
    assert stuck.requests == 0 and stuck.first_request is None
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The wait fails before anything connects to the (stopped) fake.
    assert main(_pool_argv(server, f"http://127.0.0.1:{port}/metrics", profile)) == 4
    assert "cannot scrape" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real engine


@pytest.fixture
def engine(dev_keystore_copy, tmp_path):
    """``dccsign serve`` on a copy of the development keystore: Unix socket and TLS."""
    e = EngineProcess(dev_keystore_copy, tmp_path)
    yield {"unix": f"unix:{e.sock}", "tcp": f"127.0.0.1:{e.port}", "tls": e.tls}
    e.stop()


@pytest.mark.slow
def test_against_the_real_engine_every_sample_verifies(engine):
    """Unix socket and TLS: the engine's HC1s verify against its DSCs and carry the DCCs
    sent; invalid DCCs are refused with INVALID_DCC."""
    payloads = build_payloads(batch=20, invalid_share=0.1, accounts=1000, pool_items=1000)
    for server, tls in ((engine["unix"], {}), (engine["tcp"], engine["tls"])):
        config = LoadConfig(
            profile=_constant(1000, 2.0),
            server=server,
            cert=tls.get("client_cert"),
            key=tls.get("client_key"),
            ca=tls.get("ca"),
            batch=20,
            invalid_share=0.1,
            accounts=1000,
            verify_sample=0.2,
            connections=2,
        )
        r = trio.run(run_load, config, payloads)
        assert r.errors == 0, r.errors_by_code
        assert r.ok > 0 and r.ok + r.rejected_as_expected + r.busy_certs == r.offered
        assert r.verify["keys"] >= 1 and r.verify["verified"] > 50
        assert r.verify["failed"] == 0, r.verify["reasons"]
        assert r.rejected_as_expected > 0


# ----------------------------------------------------------------------------- counted replies


def _full_decode(body: bytes, batch: bool, rid: int = 1):
    """What the codec makes of *body* as a result frame: the results, or its error."""
    from dccsign.protocol import wire

    client, _server = open_pair(max_batch=100, server="test")
    client.note_sent(rid)
    ftype = wire.FrameType.SIGN_BATCH_RESULT if batch else wire.FrameType.SIGN_RESULT
    client.receive_data(wire.HEADER.pack(wire.MAGIC, wire.VERSION, ftype, 0, rid, len(body)))
    client.receive_data(body)
    try:
        event = client.next_event()
    except wire.RemoteProtocolError as exc:
        return str(exc)
    return event.results if batch else (event.result,)


def _random_result(rng: random.Random) -> dict:
    if rng.random() < 0.7:
        out: dict = {"hc1": "HC1:" + "6BF" * rng.randint(1, 300), "kid": rng.randbytes(8)}
    else:
        out = {
            "error": rng.choice([1, 2, 5, 7, 9, 12, 1000, 2**32 - 1]),
            "message": rng.choice(["", "refused", "ungültig: dob", "x" * 1024]),
        }
        if rng.random() < 0.5:
            out["retry_after_ms"] = rng.choice([0, 250, 2**32 - 1])
    if rng.random() < 0.1:  # keys a reader must skip, of any shape
        out["x-extra"] = rng.choice([None, [1, {"a": b"b"}], 3.5, -7, "t", {"hc1": 1}])
    if rng.random() < 0.05:  # an absent field spelled null
        out["retry_after_ms" if "hc1" in out else "kid"] = None
    return out


def _random_body(rng: random.Random, batch: bool) -> bytes:
    import cbor2

    if not batch:
        return cbor2.dumps(_random_result(rng))
    body: dict = {"results": [_random_result(rng) for _ in range(rng.randint(1, 60))]}
    if rng.random() < 0.1:
        body = {"x": [1, 2], **body, "y": {"z": None}}
    return cbor2.dumps(body)


def _counts_of(results) -> tuple[int, tuple[tuple[int, int], ...]]:
    return len(results), tuple((i, int(r.error)) for i, r in enumerate(results) if r.error)


@pytest.mark.parametrize("seed", range(3))
def test_counted_replies_equal_a_full_decode(impl, seed):
    """Generated SIGN_RESULT / SIGN_BATCH_RESULT bodies: the counter's number of results,
    failed positions and codes, and the sampled HC1s are exactly what the codec decodes."""
    rng = random.Random(seed)
    for _ in range(150):
        batch = rng.random() < 0.85
        body = _random_body(rng, batch)
        results = _full_decode(body, batch)
        assert not isinstance(results, str), results
        want = sorted(rng.sample(range(len(results)), min(3, len(results))))
        n, errors, picked = impl.scan_results(body, batch, 100, want)
        assert (n, errors) == _counts_of(results)
        assert picked == tuple(
            (results[p].hc1, results[p].kid) if results[p].ok else None for p in want
        )


def test_counted_replies_of_the_wire_codec_and_the_fake(impl):
    """Bodies as the codec itself encodes them (the engine's encoder), compressed or not."""
    from dccsign.bench.loadfake import CANNED_HC1
    from dccsign.protocol import wire

    rng = random.Random(7)
    _client, server = open_pair(max_batch=100, server="test")
    server.receive_data(b"")  # only its encoder is used; it needs a request to answer
    for rid in range(1, 20):
        results = []
        for _ in range(rng.randint(1, 100)):
            if rng.random() < 0.8:
                results.append(wire.ItemResult(hc1=CANNED_HC1, kid=CANNED_KID))
            else:
                results.append(
                    wire.ItemResult(error=wire.ErrorCode.BUSY, message="busy", retry_after_ms=100)
                )
        server.last_request_id = rid
        frame = server.send(wire.SignBatchResult(rid, tuple(results)))
        body = frame[wire.HEADER_SIZE :]
        if frame[4] & wire.FLAG_ZSTD:
            import zstandard

            body = zstandard.ZstdDecompressor().decompress(body)
        n, errors, picked = impl.scan_results(body, True, 100, (0,))
        assert (n, errors) == _counts_of(results)
        assert picked == ((CANNED_HC1, CANNED_KID) if results[0].ok else None,)


def _mutate(rng: random.Random, body: bytes) -> bytes:
    b = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        what = rng.random()
        i = rng.randrange(len(b))
        if what < 0.6:
            b[i] = rng.randrange(256)
        elif what < 0.8:
            del b[i : i + rng.randint(1, 8)]
        else:
            b[i:i] = rng.randbytes(rng.randint(1, 4))
        if not b:
            break
    return bytes(b)


@pytest.mark.parametrize("seed", range(4))
def test_counted_replies_on_mutated_bodies(seed):
    """Fuzzed bodies: the native counter and its Python twin agree exactly (results or error
    message); where the counter accepts a body the codec decodes it too, with the same
    counts; where the codec accepts one, so does the counter."""
    from dccsign import native

    try:
        fast = native.implementation("native").scan_results
    except ImportError:
        fast = None
    twin = native.implementation("python").scan_results
    rng = random.Random(1000 + seed)

    def call(f, *args):
        try:
            return f(*args)
        except ValueError as exc:
            return f"error: {exc}"

    accepted = refused = 0
    for _ in range(600):
        batch = rng.random() < 0.85
        body = _mutate(rng, _random_body(rng, batch))
        got = call(twin, body, batch, 100, (0, 1))
        if fast is not None:
            assert call(fast, body, batch, 100, (0, 1)) == got, body.hex()
        decoded = _full_decode(body, batch)
        if isinstance(got, str):
            refused += 1
            assert isinstance(decoded, str), (got, body.hex())
        else:
            accepted += 1
            assert not isinstance(decoded, str), (decoded, body.hex())
            assert got[:2] == _counts_of(decoded)
    assert accepted > 20 and refused > 200  # the fuzzing reaches both sides


def test_counted_replies_refuse_clearly(impl):
    import cbor2

    ok = {"hc1": "HC1:ABC", "kid": b"12345678"}
    cases = [
        (cbor2.dumps({"results": []}), "SIGN_BATCH_RESULT.results: must be an array of 1..3"),
        (cbor2.dumps({"results": [ok] * 4}), "must be an array of 1..3 results"),
        (cbor2.dumps([ok]), "the body is not a CBOR map"),
        (cbor2.dumps({"results": [ok, 5]}), "SIGN_BATCH_RESULT.results[1] is not a map"),
        (cbor2.dumps({"results": [{"hc1": "HC1:ABC"}]}), "results[0].kid: must be a byte"),
        (cbor2.dumps({"results": [{"error": 0, "message": ""}]}), "results[0].error: must be"),
        (cbor2.dumps({"results": [{"kid": b"12345678"}]}), "has neither hc1 nor error"),
        (cbor2.dumps({"results": [ok]}) + b"\x00", "trailing bytes after the CBOR item"),
        (cbor2.dumps({"results": [ok]})[:-3], "CBOR at byte 27: truncated"),
        (b"\xa1\x67results\x81\xc1\x00", "CBOR at byte 10: tags are not allowed"),
    ]
    for body, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            impl.scan_results(body, True, 3)
    with pytest.raises(ValueError, match=re.escape("SIGN_RESULT.hc1: must be text")):
        impl.scan_results(cbor2.dumps({"hc1": "HC2:x", "kid": b"12345678"}), False, 1)
    with pytest.raises(ValueError, match="max_results must be a positive int"):
        impl.scan_results(cbor2.dumps(ok), False, 0)


# ----------------------------------------------------------------------------- pre-encoded frames


def test_pre_encoded_frames_decode_to_their_items():
    """Every prepared frame's body, as sent (compressed or not), decodes with the server's
    codec to exactly the pool items it claims, and knows which of them are invalid."""
    from dccsign.protocol import wire

    payloads = build_payloads(batch=7, invalid_share=0.2, accounts=30, pool_items=210)
    seen = []
    for frame in payloads.frames:
        for flags, body in ((frame.packed_flags, frame.packed), (0, frame.raw)):
            _client, server = open_pair(max_batch=100, server="test")
            server.receive_data(
                wire.HEADER.pack(wire.MAGIC, wire.VERSION, frame.ftype, flags << 24, 1, len(body))
                + body
            )
            event = server.next_event()
            assert [it.dcc for it in event.items] == [payloads.dccs[i] for i in frame.items]
            assert [it.account for it in event.items] == [payloads.accounts[i] for i in frame.items]
        assert frame.invalid_positions == tuple(
            p for p, i in enumerate(frame.items) if payloads.invalid[i]
        )
        seen += frame.items
    assert sorted(seen) == list(range(210))  # every pool item in exactly one frame


@pytest.mark.parametrize("full_decode", [False, True])
@pytest.mark.trio
async def test_request_ids_are_unique_and_invalid_signed_items_are_found(tmp_path, full_decode):
    """Against a fake that signs everything: the fake's codec accepted every request id
    (each must rise above the last), and every invalid DCC that came back signed is the
    error SIGNED_INVALID, never ok -- whether replies are counted or decoded."""
    payloads = build_payloads(batch=10, invalid_share=0.1, accounts=50, pool_items=500)
    fake = FakeEngine()
    r = await _against_fake(
        tmp_path,
        fake,
        profile=_constant(4000, 0.5),
        batch=10,
        invalid_share=0.1,
        full_decode=full_decode,
        payloads=payloads,
    )
    assert r.sent == 2000  # the pool of 500 four times: 50 invalid DCCs each time
    assert r.connection_losses == [] and fake.requests == r.sent_frames == 200
    assert r.errors_by_code == {"SIGNED_INVALID": 200}
    assert r.ok == 1800 and r.wrong_answers == 200


@pytest.mark.trio
async def test_counted_and_decoded_replies_give_the_same_counts(tmp_path):
    """The same run against a validating fake, replies counted or decoded: the same ok,
    expected rejections, errors and latency counts."""
    payloads = build_payloads(batch=10, invalid_share=0.2, accounts=50, pool_items=500)
    runs = []
    for full_decode in (False, True):
        runs.append(
            await _against_fake(
                tmp_path,
                FakeEngine(validate=True),
                profile=_constant(2000, 0.5),
                batch=10,
                invalid_share=0.2,
                full_decode=full_decode,
                verify_sample=1.0,
                payloads=payloads,
            )
        )
        (tmp_path / "fake.sock").unlink()
    counted, decoded = runs
    for r in runs:
        # Every signed certificate sampled, and the fake's HC1 verifies against nothing.
        assert r.sent == r.offered == 1000 and r.ok == 0
        assert r.rejected_as_expected == 200
        assert r.errors_by_code == {"bad_signature": 800}
        assert r.verify["verified"] == r.verify["failed"] == 800
        assert r.latency.count == 800  # recorded before verification
    assert counted.busy_certs == decoded.busy_certs == 0


# ----------------------------------------------------------------------------- CPU accounting


def test_cpu_per_process_and_thread_from_proc():
    from dccsign.bench import cpustat

    if not os.path.exists("/proc/self/task"):
        pytest.skip("no /proc")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        before = cpustat.snapshot({"sleeper": child.pid})
        t = time.process_time()
        while time.process_time() - t < 0.3:  # burn 0.3 s in this thread
            pass
        after = cpustat.snapshot({"sleeper": child.pid})
    finally:
        child.kill()
        child.wait()
    report = cpustat.delta(before, after, 1000)
    gen = report["processes"]["generator"]
    assert gen["pid"] == os.getpid()
    assert 0.25 <= gen["cpu_s"] <= 1.0
    main_thread = next(t for t in gen["threads"] if t["name"] == "main")
    assert main_thread["cpu_s"] >= 0.25
    assert gen["us_per_cert"] == pytest.approx(gen["cpu_s"] / 1000 * 1e6, abs=0.01)
    assert report["processes"]["sleeper"]["cpu_s"] <= 0.05
    gone = cpustat.delta(before, cpustat.snapshot({"sleeper": child.pid}), 0)
    assert "missing" in gone["processes"]["sleeper"]
    assert cpustat._ticks("1 (a) b) (c) S " + "0 " * 10 + "7 5 0") == ("a) b) (c", 12)
    assert cpustat.summary_lines(report)[1].split()[0] == "generator"


class _BrokenResultFake(FakeEngine):
    """Answers every SIGN_BATCH with a result body that breaks the protocol (a kid of 5
    bytes) behind a valid header."""

    def _reply(self, codec, event, in_flight):
        from dccsign.protocol import wire

        if not isinstance(event, wire.SignBatch):
            return super()._reply(codec, event, in_flight)
        import cbor2

        body = cbor2.dumps({"results": [{"hc1": "HC1:AB", "kid": b"short"}] * len(event.items)})
        head = wire.HEADER.pack(
            wire.MAGIC,
            wire.VERSION,
            wire.FrameType.SIGN_BATCH_RESULT,
            0,
            event.request_id,
            len(body),
        )
        return head + body, None


@pytest.mark.parametrize("full_decode", [False, True])
@pytest.mark.trio
async def test_a_broken_result_body_ends_the_connection_as_a_protocol_error(tmp_path, full_decode):
    r = await _against_fake(
        tmp_path,
        _BrokenResultFake(),
        profile=_constant(200, 0.3),
        batch=5,
        full_decode=full_decode,
        drain_timeout=10.0,  # ends as soon as every request is lost (not a wait)
    )
    assert r.ok == 0 and r.connection_losses, (r.errors_by_code, r.connection_losses)
    assert set(r.errors_by_code) <= {"CONNECTION_LOST", "NO_REPLY"}
    assert all(
        "protocol error from the engine" in why and "results[0].kid: must be a byte string" in why
        for why in r.connection_losses
    ), r.connection_losses
