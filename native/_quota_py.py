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
    "quota_idle",
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
    insert: tuple[tuple[int, int, int], int] | None = None,
) -> tuple[int, bool]:
    """The common case of charging a frame's accounts: from ``accounts[start]`` on, each
    account of *client* that *table* holds has ``counts[k]`` units added
    (:func:`quota_add`) and moves to the table's recent end.

    With *insert* = ``(spans, max_accounts)``, an account the table does not hold is taken
    in as well when its units fit every limit and the table holds fewer than
    *max_accounts*: first up to two accounts at the table's old end are dropped if idle
    (every window empty once buckets older than ``spans[kind]`` are expired, in order,
    stopping at the first that is not), then a fresh usage goes in at the recent end with
    the units added -- what ``QuotaTracker`` does for a new account, so a frame of new
    accounts needs no interpreter either. A full table is the caller's (it evicts and
    warns).

    Stops at the first account that is not in the table (and is not taken in), or whose
    units do not fit: returns ``(k, False)`` for the first (untouched), ``(k, True)`` for
    the second (moved to the recent end, its units taken back: the caller goes unit by
    unit), and ``(len(accounts), False)`` when every account was charged.

    Raises:
        ValueError: *start* < 0, or *limits* / *buckets* / *spans* not shaped as above.
        TypeError: a table entry that is not a usage list.
    """
    if start < 0:
        raise ValueError("start must be at least 0")
    check_shapes(limits, buckets)
    spans, max_accounts = _insert_args(insert)
    get = table.get
    for k in range(start, len(accounts)):
        key = (client, accounts[k])
        usage = get(key)
        n = counts[k]
        if usage is None:
            if (
                insert is None
                or len(table) >= max_accounts
                or any(n > limit for _kind, limit, _span in limits)
            ):
                return k, False
            for _ in range(2):  # lazily drop idle accounts from the old end
                if not table:
                    break
                oldest = next(iter(table))
                if not quota_idle(table[oldest], buckets, spans):
                    break
                del table[oldest]
            usage = table[key] = [None, None, None]
            _add(usage, limits, buckets, n)  # fits: n is within every limit
            continue
        check_usage(usage)
        table.move_to_end(key)
        if _add(usage, limits, buckets, n):
            continue
        _take_back(usage, limits, n)
        return k, True
    return len(accounts), False


def _insert_args(insert: object) -> tuple[tuple[int, int, int], int]:
    if insert is None:
        return (0, 0, 0), 0
    if type(insert) is not tuple or len(insert) != 2:  # type: ignore[arg-type]
        raise ValueError("insert must be (spans, max_accounts)")
    spans, max_accounts = insert  # type: ignore[misc]
    if type(spans) is not tuple or len(spans) != 3:
        raise ValueError("spans must hold one span per window kind (3)")
    return spans, max_accounts


def quota_idle(usage: Usage, buckets: tuple[int, int, int], spans: tuple[int, int, int]) -> bool:
    """True when every unit of *usage* has expired: each window's buckets numbered
    ``<= buckets[kind] - spans[kind]`` are expired on the way (what counts for the rest).

    Raises:
        TypeError: *usage* is not a usage list.
        ValueError: *buckets* or *spans* do not hold three entries.
    """
    check_usage(usage)
    if len(buckets) != 3 or len(spans) != 3:
        raise ValueError("buckets and spans must hold one entry per window kind (3)")
    for kind, w in enumerate(usage):
        if w is not None and w[0]:
            quota_expire(w, buckets[kind] - spans[kind])
            if w[0]:
                return False
    return True
