"""Span tables (reference): the distinct strings of one field over a frame's items.

:func:`span_table` serves the data plane (issue 14): quotas are charged once per distinct
account of a frame, and keyd's columnar message names each account and operator once. The
native twin (``_spantable.pxi`` over ``src/spantable.c``) builds no object per item: only the
distinct strings.
"""

from __future__ import annotations

from array import array

__all__ = ["SPAN_ABSENT", "fill_rows", "gather_spans", "span_table"]

#: The index of an item whose span is empty (an absent optional field).
SPAN_ABSENT = 0xFFFFFFFF


def check_span_arguments(
    data: object,
    columns: object,
    nfields: int,
    fields: tuple[int, int],
    rows: array,
    base: int = 0,
    absent: int = SPAN_ABSENT,
) -> int:
    """The argument rules both implementations share; returns the number of items."""
    if type(data) is not bytes or type(columns) is not bytes:
        raise TypeError("data and columns must be bytes")
    if not isinstance(rows, array) or rows.typecode != "I":
        raise TypeError("rows must be an array('I')")
    if type(nfields) is not int or nfields < 1 or len(columns) % (4 * nfields):
        raise ValueError("columns must hold a whole number of items of nfields uint32 each")
    off, length = fields
    if not (
        type(off) is int and type(length) is int and 0 <= off < nfields and 0 <= length < nfields
    ):
        raise ValueError("fields must be two column numbers below nfields")
    for v in (base, absent):
        if type(v) is not int or not 0 <= v <= SPAN_ABSENT:
            raise ValueError("base and absent must be uint32 values")
    if base + len(rows) > SPAN_ABSENT + 1:
        raise ValueError("base + rows does not fit uint32")
    count = len(columns) // (4 * nfields)
    if rows and max(rows) >= count:  # max: one C-level pass (the data plane calls this per kid)
        r = next(r for r in rows if r >= count)
        raise ValueError(f"row {r} is not an item (there are {count})")
    return count


def span_table(
    data: bytes,
    columns: bytes,
    nfields: int,
    fields: tuple[int, int],
    rows: array,
    base: int = 0,
    absent: int = SPAN_ABSENT,
) -> tuple[list[bytes], array]:
    """The distinct non-empty spans of one field among the items *rows*, in order of first
    appearance, and per row *base* + its index into them (*absent* for an empty span: e.g.
    ``base=1, absent=0`` puts "no operator" first in a table of the caller's).

    *columns* holds *nfields* native-endian uint32 per item; *fields* is (offset column, length
    column) of the field; every span lies within *data* (the walker's BatchView guarantees it).

    Raises:
        TypeError: data or columns not bytes, rows not an ``array('I')``.
        ValueError: a column number or a row out of range, or columns not whole items.
    """
    check_span_arguments(data, columns, nfields, fields, rows, base, absent)
    cols = memoryview(columns).cast("I")
    off, length = fields
    seen: dict[bytes, int] = {}
    table: list[bytes] = []
    index = array("I")
    for r in rows:
        n = cols[r * nfields + length]
        if not n:
            index.append(absent)
            continue
        start = cols[r * nfields + off]
        span = data[start : start + n]
        k = seen.get(span)
        if k is None:
            k = seen[span] = len(table)
            table.append(span)
        index.append(base + k)
    return table, index


def u32_array(value: object, what: str) -> array:
    if not isinstance(value, array) or value.typecode != "I":
        raise TypeError(f"{what} must be an array('I')")
    return value


def gather_spans(n: int, groups: list[tuple[array, bytes, array]]) -> tuple[bytes, array]:
    """Pieces of several buffers put in item order: piece *j* of a group ``(rows, data,
    ends)`` is ``data[ends[j-1]:ends[j]]`` (the first from 0) and belongs to item
    ``rows[j]``. Returns one buffer with every item's pieces in item order, and its *n* + 1
    offsets (item *i* is ``buf[off[i]:off[i+1]]``; empty for an item in no group). An item
    is in a group at most once; in more than one group it gets its pieces in group order.
    Used to lay out per-kid payloads and signatures as one frame's columns.

    Raises:
        TypeError: rows / ends not ``array('I')``, data not bytes.
        ValueError: rows and ends of different lengths, an item >= *n*, ends that go back or
            beyond data.
    """
    if type(n) is not int or not 0 <= n < SPAN_ABSENT:
        raise ValueError("n must be a uint32 item count")
    lens = [0] * n
    pieces: list[list[bytes]] = [[] for _ in range(n)]
    for rows, data, ends in groups:
        u32_array(rows, "rows")
        u32_array(ends, "ends")
        if type(data) is not bytes:
            raise TypeError("data must be bytes")
        if len(rows) != len(ends):
            raise ValueError("rows and ends must have the same length")
        start = 0
        for r, e in zip(rows, ends, strict=True):
            if e < start or e > len(data) or r >= n:
                raise ValueError("a piece out of order, beyond its data, or of no item")
            lens[r] += e - start
            pieces[r].append(data[start:e])
            start = e
    offsets = array("I", [0])
    total = 0
    for length in lens:
        total += length
        offsets.append(total)
    return b"".join(b"".join(p) for p in pieces), offsets


def fill_rows(target: array, rows: array, value: int) -> None:
    """``target[r] = value`` for every *r* of *rows* (in C natively).

    Raises:
        TypeError: target or rows not ``array('I')``.
        ValueError: a row beyond target, or value not uint32.
    """
    u32_array(target, "target")
    u32_array(rows, "rows")
    if type(value) is not int or not 0 <= value <= SPAN_ABSENT:
        raise ValueError("value must be a uint32")
    if any(r >= len(target) for r in rows):
        raise ValueError("a row beyond the target")
    for r in rows:
        target[r] = value
