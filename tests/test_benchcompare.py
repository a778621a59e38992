"""``dccsign bench compare``: every row, its ratios, JSON, plot, and rows that cannot run."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import IN_CI
from dccsign import native
from dccsign.cli.main import main
from engine_process import EngineProcess

FAST = ["bench", "compare", "--seconds", "0.2", "--rounds", "1", "--threads", "2"]
LABELS = {
    "openssl": "openssl speed ecdsap256, 1 process",
    "openssl-all": "openssl speed -multi 2 ecdsap256",
    "naive": "naive pipeline (cbor2+cryptography), 1 thread",
    "python": "dccsign core, python reference, 1 thread",
    "native": "dccsign core, native, 1 thread",
    "native-all": "dccsign core, native, 2 threads",
    "engine": "engine end to end (bench load, closed loop)",
}


#: Under DCCSIGN_PUREPYTHON=1 the native rows cannot run and must say so.
NATIVE = native.IMPLEMENTATION == "native"
NO_NATIVE = "not measured: no native core"


def _line(text: str, row: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.startswith(LABELS[row])]
    return line


def test_every_row_with_ratios_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    assert main([*FAST, "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    have_openssl = shutil.which("openssl") is not None
    assert have_openssl or not IN_CI, "openssl is installed under CI"
    measured = ["naive", "python"]
    if NATIVE:
        measured += ["native", "native-all"]
    else:
        for row in ("native", "native-all"):
            assert NO_NATIVE in _line(text, row)
            assert doc["rows"][row]["not_measured"].startswith(NO_NATIVE)
    if have_openssl:
        measured += ["openssl", "openssl-all"]
    else:
        for row in ("openssl", "openssl-all"):
            assert "not measured: no `openssl` on PATH" in _line(text, row)
    for row in measured:
        entry = doc["rows"][row]
        assert entry["rate"]["median"] > 0 and entry["rate"]["n"] == 1, row
        assert entry["vs_naive"]["median"] > 0, row
        if have_openssl:
            assert 0 < entry["vs_openssl"]["median"], row
        fields = _line(text, row).split()
        assert fields[-4].replace(".", "").isdigit(), row  # x naive
    assert doc["rows"]["naive"]["vs_naive"]["median"] == 1.0
    assert "not measured: no --server given" in _line(text, "engine")
    assert set(doc["rows"]) == set(LABELS)
    assert doc["threads"] == 2 and doc["naive_path"].endswith("bench/naive.py")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_naive_openssl_and_engine_are_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no openssl
    out = tmp_path / "c.json"
    argv = [*FAST, "--naive", str(tmp_path / "nope.py"), "--json", str(out)]
    argv += ["--server", f"unix:{tmp_path}/no.sock"]
    assert main(argv) == 4  # the engine was asked for and could not be measured
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    assert "not measured:" in _line(captured.out, "naive")
    assert "nope.py not found" in doc["rows"]["naive"]["not_measured"]
    assert "not measured: no `openssl` on PATH" in _line(captured.out, "openssl")
    assert "cannot connect" in doc["rows"]["engine"]["not_measured"]
    assert "engine" in captured.err
    for row in ("python", "native") if NATIVE else ("python",):
        assert "vs_naive" not in doc["rows"][row] and "vs_openssl" not in doc["rows"][row]
        assert doc["rows"][row]["rate"]["median"] > 0


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*FAST, "--plot", str(tmp_path / "c.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "compare", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--seconds",
        "--rounds",
        "--threads",
        "--naive",
        "--server",
        "--json",
        "--plot",
        "Exit codes",
    ):
        assert option in text


@pytest.mark.slow
def test_engine_row_end_to_end(dev_keystore_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no openssl: keep the test short
    engine = EngineProcess(dev_keystore_copy, tmp_path, tcp=False)
    try:
        out = tmp_path / "c.json"
        argv = [*FAST, "--seconds", "1", "--server", f"unix:{engine.sock}", "--json", str(out)]
        assert main(argv) == 0
    finally:
        engine.stop()
    doc = json.loads(out.read_text())
    assert doc["rows"]["engine"]["rate"]["median"] > 0
    assert doc["rows"]["engine"]["vs_naive"]["median"] > 0
    assert _line(capsys.readouterr().out, "engine").split()[-4].replace(".", "").isdigit()
