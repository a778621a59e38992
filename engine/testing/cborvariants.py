"""Pieces of a CBOR encoder that makes, at random, every choice RFC 8949 leaves to a peer
(§3; the preferred serialisation of §4.2 is only a SHOULD): the width of an argument and of
a float. For tests and benchmarks that feed decoders the same object in many encodings."""

from __future__ import annotations

import random
import struct

__all__ = ["encode_float", "head"]

_INFO_OF_WIDTH = {1: 24, 2: 25, 4: 26, 8: 27}


def head(major: int, n: int, rnd: random.Random | None = None) -> bytes:
    """The head of major type *major* with argument *n* (0 <= n < 2**64): the shortest form
    without *rnd*, else a form of a random width that holds *n*."""
    widths = [w for w in (0, 1, 2, 4, 8) if (w == 0 and n < 24) or (w and n < 1 << (8 * w))]
    w = widths[0] if rnd is None else rnd.choice(widths)
    if w == 0:
        return bytes([major << 5 | n])
    return bytes([major << 5 | _INFO_OF_WIDTH[w]]) + n.to_bytes(w, "big")


def encode_float(x: float, rnd: random.Random | None = None) -> bytes:
    """*x* as a CBOR float: the narrowest width that keeps its value (NaN: half) without
    *rnd*, else a random one of the widths that keep it."""
    options = [b"\xfb" + struct.pack(">d", x)]
    for code, fmt in ((b"\xfa", ">f"), (b"\xf9", ">e")):
        try:
            packed = struct.pack(fmt, x)
        except (OverflowError, struct.error):
            continue
        if struct.unpack(fmt, packed)[0] == x or x != x:
            options.append(code + packed)
    return options[-1] if rnd is None else rnd.choice(options)
