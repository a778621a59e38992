"""QR images read back by an independent decoder (zbar), as a scanner would read them."""

import shutil
import subprocess

import pytest

from conftest import IN_CI
from dccsign.dcc.qr import make_qr, numbered_paths, write_qr

ZBARIMG = shutil.which("zbarimg")


def _need_zbar():
    if ZBARIMG is None:
        if IN_CI:
            pytest.fail("zbarimg (Debian zbar-tools) is required in CI")
        pytest.skip("zbarimg not installed (apt-get install zbar-tools)")


def _read(path):
    out = subprocess.run([ZBARIMG, "-q", "--raw", str(path)], capture_output=True, check=True)
    return out.stdout.decode("ascii").removesuffix("\n")


def test_png_reads_back_exactly(tmp_path):
    _need_zbar()
    # An HC1 of every base45 symbol, spaces included, near the size of an RSA-3072 certificate.
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
    texts = ["HC1:" + (alphabet * 40)[:n] for n in (200, 600, 1100)]
    for i, text in enumerate(texts):
        path = tmp_path / f"q{i}.png"
        write_qr(text, path)
        assert _read(path) == text


def test_qr_parameters():
    qr = make_qr("HC1:ABC")
    assert qr.mode == "alphanumeric" and qr.error == "Q"
    with pytest.raises(ValueError, match="too long"):
        make_qr("HC1:" + "A" * 2500)  # beyond version 40-Q
    with pytest.raises(ValueError):
        make_qr("HC1:lower case")  # not in the alphanumeric set


def test_suffix_and_numbering(tmp_path):
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        write_qr("HC1:A", tmp_path / "x.jpg")
    assert numbered_paths(tmp_path / "x.png", 1) == [tmp_path / "x.png"]
    assert [p.name for p in numbered_paths(tmp_path / "x.svg", 10)][::9] == ["x-01.svg", "x-10.svg"]
