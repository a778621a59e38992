"""Quota windows (reference): the per-account arithmetic of ``policy.QuotaTracker``.

A frame of a busy portal names ~50 distinct accounts, and each costs the tracker a table
lookup, a move to the recent end of its LRU table and an addition to every window of the
client's account quota. In Python that was the largest single share of the engine's per-frame
interpreter work (issue 14). The native twin (``_quota.pxi``) runs the same steps, on the same
Python lists and the same ``OrderedDict``, without the interpreter: the tracker keeps one data
structure whichever implementation runs, and this file says what both do.

A window is a flat list ``[total, b0, c0, b1, c1, ...]``: the units it counts, then
(bucket number, units) pairs for the buckets that hold units, oldest first. No stored bucket
holds 0 units, so ``total == 0`` exactly when no bucket is stored. A usage is a list of three
windows (minute, hour, day), ``None`` where nothing was counted yet. *limits* is a quota's
``(window kind, limit, buckets counted)`` per window that is set; *buckets* the current bucket
number of each kind.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = [
    "quota_add",
    "quota_charge_known",
    "quota_expire",
    "quota_remove_newest",
    "quota_take_back",
]

Window = list[int]
Usage = list["Window | None"]
Limits = tuple[tuple[int, int, int], ...]


def check_shapes(limits: Limits, buckets: tuple[int, int, int] | None) -> None:
    """The argument rules both implementations share (the native loops index without
    bounds checks, so the shapes are checked once per call)."""
    if buckets is not None and len(buckets) != 3:
        raise ValueError("buckets must hold one bucket number per window kind (3)")
    for entry in limits:
        if type(entry) is not tuple or len(entry) != 3:
            raise ValueError("each limit must be (window kind, limit, buckets counted)")
        if not 0 <= entry[0] <= 2:
            raise ValueError("a window kind must be 0, 1 or 2")


def check_usage(usage: object) -> None:
    if type(usage) is not list or len(usage) != 3:
        raise TypeError("a quota usage must be a list of three windows")


def quota_expire(w: Window, cutoff: int) -> None:
    """Drop the buckets numbered <= *cutoff* (they have left the window)."""
    i = 1
    end = len(w)
    freed = 0
    while i < end and w[i] <= cutoff:
        freed += w[i + 1]
        i += 2
    del w[1:i]
    w[0] -= freed


def quota_remove_newest(w: Window, n: int) -> None:
    """Take back up to *n* units, newest bucket first (the ones just reserved)."""
    while n > 0 and w[0]:
        take = min(n, w[-1])
        w[-1] -= take
        w[0] -= take
        n -= take
        if w[-1] == 0:
            del w[-2:]


def quota_add(usage: Usage, limits: Limits, buckets: tuple[int, int, int], n: int) -> bool:
    """Add *n* units to every window of *limits* (expiring old buckets first); True when all
    stay within their limits. On False the caller takes them back with
    :func:`quota_take_back` (optimistic: one pass on the hot path, two only when refusing).

    Raises:
        ValueError / TypeError: *limits*, *buckets* or *usage* not shaped as above.
    """
    check_shapes(limits, buckets)
    check_usage(usage)
    return _add(usage, limits, buckets, n)


def _add(usage: Usage, limits: Limits, buckets: tuple[int, int, int], n: int) -> bool:
    ok = True
    for kind, limit, span in limits:
        w = usage[kind]
        b = buckets[kind]
        if w is None:
            w = usage[kind] = [n, b, n]
        else:
            if w[0] and w[1] <= b - span:
                quota_expire(w, b - span)
            if w[0] and w[-2] >= b:  # same bucket (>=: a clock that went back adds here too)
                w[-1] += n
            else:
                w.append(b)
                w.append(n)
            w[0] += n
        if w[0] > limit:
            ok = False
    return ok


def quota_take_back(usage: Usage, limits: Limits, n: int) -> None:
    """Undo :func:`quota_add` exactly (it put *n* units in the newest bucket of each
    window)."""
    check_shapes(limits, None)
    check_usage(usage)
    _take_back(usage, limits, n)


def _take_back(usage: Usage, limits: Limits, n: int) -> None:
    for kind, _limit, _span in limits:
        quota_remove_newest(usage[kind], n)  # type: ignore[arg-type]


def quota_charge_known(
    table: OrderedDict[tuple[str, str], Usage],
    client: str,
    accounts: Sequence[str],
    counts: Sequence[int],
    limits: Limits,
    buckets: tuple[int, int, int],
    start: int,
) -> tuple[int, bool]:
    """The common case of charging a frame's accounts: from ``accounts[start]`` on, each
    account of *client* that *table* holds has ``counts[k]`` units added
    (:func:`quota_add`) and moves to the table's recent end.

    Stops at the first account that is not in the table, or whose units do not fit: returns
    ``(k, False)`` for the first (untouched), ``(k, True)`` for the second (moved to the
    recent end, its units taken back: the caller goes unit by unit), and
    ``(len(accounts), False)`` when every account was charged.

    Raises:
        ValueError: *start* < 0, or *limits* / *buckets* not shaped as above.
        TypeError: a table entry that is not a usage list.
    """
    if start < 0:
        raise ValueError("start must be at least 0")
    check_shapes(limits, buckets)
    get = table.get
    for k in range(start, len(accounts)):
        key = (client, accounts[k])
        usage = get(key)
        if usage is None:
            return k, False
        check_usage(usage)
        table.move_to_end(key)
        n = counts[k]
        if _add(usage, limits, buckets, n):
            continue
        _take_back(usage, limits, n)
        return k, True
    return len(accounts), False

