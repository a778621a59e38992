"""zlib (RFC 1950) for HC1, pure-Python reference of the native implementation."""

from __future__ import annotations

import zlib

from .errors import ZlibError

__all__ = ["zlib_compress", "zlib_decompress"]

#: Default cap on inflated size: a QR code holds at most ~1.6 KB of zlib data, and a
#: decompression bomb must not get more than this out of us.
MAX_INFLATED = 64 * 1024


def _check_level(level: int) -> None:
    if not isinstance(level, int) or not -1 <= level <= 9:
        raise ValueError(f"zlib level must be an integer from -1 to 9, not {level!r}")


def zlib_compress(data: bytes, level: int = 9) -> bytes:
    """A zlib stream (32 KiB window, so the first byte is 0x78) of *data* at *level*.

    Raises:
        ValueError: *level* is not in -1..9.
    """
    _check_level(level)
    return zlib.compress(bytes(memoryview(data)), level)


def zlib_decompress(data: bytes, max_length: int = MAX_INFLATED) -> bytes:
    """Inflate exactly one complete zlib stream.

    Raises:
        ZlibError: not zlib data (raw deflate and gzip included), a truncated stream, data
            after the end of the stream, or more than *max_length* bytes of output.
    """
    if max_length < 1:
        raise ValueError("max_length must be positive")
    d = zlib.decompressobj()
    try:
        out = d.decompress(bytes(memoryview(data)), max_length)
    except zlib.error as exc:
        raise ZlibError(f"invalid zlib data: {exc}") from None
    if d.unconsumed_tail:
        raise ZlibError("inflated data exceeds the size limit")
    if not d.eof:
        if len(out) == max_length:
            raise ZlibError("inflated data exceeds the size limit")
        raise ZlibError("truncated zlib stream")
    if d.unused_data:
        raise ZlibError("trailing data after the zlib stream")
    return out
