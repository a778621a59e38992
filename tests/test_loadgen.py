"""``dccsign bench load``: open loop against a stalled fake engine (coordinated omission is
not hidden), closed loop for contrast, counting of BUSY, errors and wrong answers, profiles,
the HDR histogram's precision, the report (JSON, plot, metrics), and a run against the real
engine (slow)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio

from dccsign.cli import main
from dccsign.latency import LatencyHistogram
from dccsign.loadfake import FakeEngine
from dccsign.loadgen import LoadConfig, LoadError, build_payloads, run_load
from dccsign.loadprofile import PRESETS, ProfileError, load_profile, parse_profile
from dccsign.loadreport import metrics_delta, parse_prometheus, scrape_metrics, to_json
from engine_process import EngineProcess

IN_CI = os.environ.get("CI") == "true"
STALL_AFTER, STALL_FOR = 0.75, 0.5


def _constant(rate: float, seconds: float, arrivals: str = "uniform"):
    return load_profile("constant").scaled(rate=rate, duration=seconds, arrivals=arrivals)


async def _against_fake(nursery, tmp_path, fake: FakeEngine, **config):
    path = str(tmp_path / "fake.sock")
    await nursery.start(fake.serve_unix, path)
    config.setdefault("verify_sample", 0.0)
    config.setdefault("accounts", 100)
    result = await run_load(LoadConfig(server=f"unix:{path}", **config))
    nursery.cancel_scope.cancel()
    return result


# ----------------------------------------------------------------------------- stalls


@pytest.mark.trio
async def test_open_loop_latency_includes_the_stall(tmp_path):
    """A 0.5 s stall in a 2 s run at 1000 requests/s: about a quarter of the requests were
    due while nothing was answered. Measured from their intended start, they waited up to
    the whole stall, so p99 and max show it."""
    fake = FakeEngine(stall_after=STALL_AFTER, stall_for=STALL_FOR)
    async with trio.open_nursery() as nursery:
        r = await _against_fake(
            nursery, tmp_path, fake, profile=_constant(1000, 2.0), connections=1
        )
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
    async with trio.open_nursery() as nursery:
        r = await _against_fake(
            nursery,
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
    async with trio.open_nursery() as nursery:
        r = await _against_fake(
            nursery,
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
    async with trio.open_nursery() as nursery:
        r = await _against_fake(
            nursery,
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
    async with trio.open_nursery() as nursery:
        r = await _against_fake(nursery, tmp_path, fake, profile=_constant(2000, 0.5), batch=batch)
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
    from dccsign.loadreport import MetricsSnapshot

    d = metrics_delta(MetricsSnapshot("u", before, None), MetricsSnapshot("u", after, None))
    assert d["items_by_result"] == {"INVALID_DCC": 5, "ok": 100}
    assert d["busy"] == 2 and d["requests"] == 10 and d["mean_request_ms"] == 100.0
    assert d["stage_mean_ms"] == {}


def test_stage_means_come_in_path_order_from_the_run_only():
    """dccsign_stage_seconds: the run's share (after minus before) of each stage's sum and
    count gives its mean, listed in the order of the signing path; unknown stages last."""
    from dccsign.loadreport import MetricsSnapshot

    def snap(scale):
        lines = [
            f'dccsign_stage_seconds_sum{{stage="{name}"}} {s * scale}\n'
            f'dccsign_stage_seconds_count{{stage="{name}"}} {c * scale}\n'
            for name, s, c in (
                ("encode", 0.02, 10), ("future", 1.0, 1), ("keyd", 0.5, 100), ("start", 0.01, 50)
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
        [sys.executable, "-m", "dccsign.loadfake", "--unix", str(path)],
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
    from dccsign.loadgen import LoadResult

    config = LoadConfig(profile=_constant(10, 1.0))
    r = LoadResult(config, config.profile, "open-loop", {"server": "x"}, 0, 0.0, 0.0, 1.0, 1.0)
    doc = to_json(r)
    assert doc["certs_per_s"] == 0 and doc["p99_ms"] == 0.0 and doc["errors"] == 0
    json.dumps(doc)


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
