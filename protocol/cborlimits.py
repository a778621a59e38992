"""What a CBOR body may cost, and how protocol bodies are decoded (sans-IO, pure Python).

A decoder builds one Python object per CBOR data item, and a data item can be a single byte:
554 bytes of zstd expand to 16 MiB of empty maps, 16.7 million objects, 1.2 GiB and seconds of
CPU in ``cbor2``. :func:`scan` walks the encoded item first, building nothing, and refuses it
as soon as it holds more data items, or nests deeper, than the caller allows; only then is it
worth decoding. Callers pick limits from what a legitimate message can hold (SPEC.md §13).

This is the readable reference of the rule. ``dccsign.native.cbor_scan`` is the same function
in C (same results, same messages); both codecs (``wire.Connection(scan=...)``,
``keyd.Connection(scan=...)``) take either. :func:`decode` is how both decode a body once it
is counted: strict, with no tags at all.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import cbor2

__all__ = ["MAX_SCAN_DEPTH", "Scan", "decode", "scan"]

#: ``scan(data, max_items, max_depth) -> items`` (this module's, or the native one).
Scan = Callable[[bytes, int, int], int]

#: The deepest nesting a caller may ask :func:`scan` to allow (both implementations recurse
#: once per level).
MAX_SCAN_DEPTH = 64


def scan(data: bytes | bytearray | memoryview, max_items: int, max_depth: int) -> int:
    """The number of data items in *data*, which must be exactly one well-formed CBOR item.

    Every head counts as one data item: integers, strings (each chunk of an indefinite-length
    string too), simple values, floats, tags, containers, and each key and value of a map.
    A container or a tag nests its contents one level deeper; the outermost item is at
    level 1. Nothing is decoded: strings are not checked for UTF-8, duplicate keys are not
    looked for (the decoder does that, once the item is known to be affordable).

    Raises:
        ValueError: *data* holds more than *max_items* data items ("more than N CBOR data
            items"), nests deeper than *max_depth* ("CBOR nested more than N levels deep"),
            is not well-formed CBOR ("malformed CBOR: ..."), or has bytes after the item
            ("trailing bytes after the CBOR item"). The walk stops at the first of these, in
            the order of the bytes; a definite-length container whose announced size alone
            passes *max_items* is refused at its head. Also for limits out of range.
    """
    if type(max_items) is not int or max_items < 1:
        raise ValueError("max_items must be a positive int")
    if type(max_depth) is not int or not 1 <= max_depth <= MAX_SCAN_DEPTH:
        raise ValueError(f"max_depth must be an int in 1..{MAX_SCAN_DEPTH}")
    walk = _Walk(bytes(data), max_items, max_depth)
    walk.item(0)
    if walk.pos != len(walk.buf):
        raise ValueError("trailing bytes after the CBOR item")
    return walk.count


class _Malformed(ValueError):
    def __init__(self, problem: str) -> None:
        super().__init__(f"malformed CBOR: {problem}")


class _Walk:
    __slots__ = ("buf", "count", "max_depth", "max_items", "pos")

    def __init__(self, buf: bytes, max_items: int, max_depth: int) -> None:
        self.buf = buf
        self.pos = 0
        self.count = 0
        self.max_items = max_items
        self.max_depth = max_depth

    def head(self) -> tuple[int, int, bool]:
        """(major type, argument, indefinite) of the head at pos; pos moves past it."""
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            raise _Malformed("truncated CBOR item")
        initial = buf[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            self.pos = pos
            return major, info, False
        if info == 31:
            if major in (0, 1, 6):
                raise _Malformed("invalid indefinite length on an integer or tag")
            self.pos = pos
            return major, 0, True
        if info > 27:
            raise _Malformed("reserved CBOR additional information (28-30)")
        size = 1 << (info - 24)
        if len(buf) - pos < size:
            raise _Malformed("truncated CBOR head")
        self.pos = pos + size
        return major, int.from_bytes(buf[pos : pos + size], "big"), False

    def counted(self, n: int) -> None:
        self.count += n
        if self.count > self.max_items:
            raise ValueError(f"more than {self.max_items} CBOR data items")

    def at_break(self, what: str) -> bool:
        """True (and past it) when the next byte ends an indefinite-length item."""
        if self.pos >= len(self.buf):
            raise _Malformed(f"truncated indefinite-length {what}")
        if self.buf[self.pos] == 0xFF:
            self.pos += 1
            return True
        return False

    def skip(self, size: int) -> None:
        if len(self.buf) - self.pos < size:
            raise _Malformed("truncated CBOR string")
        self.pos += size

    def item(self, depth: int) -> None:
        """One data item whose enclosing containers and tags number *depth*."""
        major, arg, indefinite = self.head()
        self.counted(1)
        if major <= 1:
            return
        if major <= 3:
            if not indefinite:
                self.skip(arg)
                return
            while not self.at_break("string"):
                chunk_major, size, chunk_indefinite = self.head()
                if chunk_major != major or chunk_indefinite:
                    raise _Malformed("bad chunk in indefinite-length string")
                self.counted(1)
                self.skip(size)
            return
        if major == 7:
            if indefinite:
                raise _Malformed("unexpected CBOR break")
            return
        if depth + 1 > self.max_depth:
            raise ValueError(f"CBOR nested more than {self.max_depth} levels deep")
        if major == 6:
            self.item(depth + 1)
            return
        per_entry = 2 if major == 5 else 1
        if indefinite:
            while not self.at_break("container"):
                for _ in range(per_entry):
                    self.item(depth + 1)
            return
        members = arg * per_entry
        # Each member takes at least one byte: a count above the bytes left is a lie, and
        # refusing it at the head bounds the walk for hostile input.
        if arg > len(self.buf) or members > len(self.buf) - self.pos:
            raise _Malformed("CBOR container longer than its data")
        if self.count + members > self.max_items:
            raise ValueError(f"more than {self.max_items} CBOR data items")
        for _ in range(members):
            self.item(depth + 1)


def _refuse_tag(*_args: Any) -> Any:
    raise ValueError("CBOR tags are not allowed")


# Every tag cbor2 would decode by itself (dates, bignums, sets, shared references, ...) is
# refused like an unknown one: a body is plain maps, arrays, text, bytes, numbers.
_DATES_AND_NUMBERS = (0, 1, 2, 3, 4, 5, 30, 100, 1004, 43000)
_OTHER_TAGS = (25, 28, 29, 35, 36, 37, 52, 54, 256, 258, 260, 261, 55799)
_NO_TAGS = {t: _refuse_tag for t in (*_DATES_AND_NUMBERS, *_OTHER_TAGS)}


def decode(raw: bytes, *, scan: Scan, max_items: int, max_depth: int) -> Any:
    """The one CBOR item that is *raw*, counted by *scan* first (no more than *max_items*
    data items, *max_depth* levels), then decoded: no tags, no duplicate map keys, map keys
    text or bytes only.

    Raises:
        ValueError: any of that fails; the message says what (and only that: nothing of the
            bytes is kept).
    """
    scan(raw, max_items, max_depth)
    stream = io.BytesIO(raw)
    try:
        value = cbor2.CBORDecoder(
            stream,
            tag_hook=_refuse_tag,
            semantic_decoders=_NO_TAGS,
            max_depth=max_depth,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        ).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    if stream.tell() != len(raw):  # (scan has refused these already)
        raise ValueError("trailing bytes after the CBOR item")
    return value
