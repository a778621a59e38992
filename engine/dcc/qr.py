"""QR images of HC1 strings: alphanumeric mode, error correction Q (hcert spec §4.2.2)."""

from __future__ import annotations

from pathlib import Path

import segno

__all__ = ["QR_SUFFIXES", "make_qr", "numbered_paths", "write_qr"]

QR_SUFFIXES = (".png", ".svg")


def make_qr(text: str) -> segno.QRCode:
    """The QR code of an HC1 string: alphanumeric mode, error correction Q, never boosted.

    Raises:
        ValueError: text outside the alphanumeric set, or too long for a QR code.
    """
    try:
        return segno.make_qr(text, error="q", mode="alphanumeric", boost_error=False)
    except segno.DataOverflowError as exc:
        raise ValueError(f"too long for a QR code: {exc}") from None


def write_qr(text: str, path: Path) -> None:
    """Write *text* as a QR code to *path* (PNG or SVG, chosen by the suffix).

    The error-correction level is pinned at Q (segno would otherwise "boost" it), and the
    mode is alphanumeric, which base45 was designed for.

    Raises:
        ValueError: an unsupported suffix, or text that does not fit a QR code.
    """
    if path.suffix.lower() not in QR_SUFFIXES:
        raise ValueError(f"{path}: QR output must end in .png or .svg")
    qr = make_qr(text)
    qr.save(str(path), scale=4, border=4)


def numbered_paths(path: Path, count: int) -> list[Path]:
    """``out.png`` for one item; ``out-1.png`` … ``out-N.png`` for a batch."""
    if count == 1:
        return [path]
    width = len(str(count))
    return [path.with_name(f"{path.stem}-{i:0{width}d}{path.suffix}") for i in range(1, count + 1)]
