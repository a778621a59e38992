"""bench/fsync_tail.py: the disk's fsync latency under keyd's commit pattern."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fsync_tail.py"


def _module():
    spec = importlib.util.spec_from_file_location("fsync_tail", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measures_fsyncs_and_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        _module().main(
            ["--dir", str(tmp_path), "--seconds", "0.3", "--bytes", "512", "--json", str(out)]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["fsyncs"] > 0 and doc["bytes_per_write"] == 512
    assert 0 < doc["p50_ms"] <= doc["p99_ms"] <= doc["p999_ms"] <= doc["max_ms"]
    assert all(s["ms"] >= 50 for s in doc["stalls_over_50ms"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the probe file is gone
    assert f"fsyncs of 512 B in {tmp_path}" in capsys.readouterr().out
