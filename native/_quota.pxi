# ----------------------------------------------------------------------------- quota windows
# (included by _native.pyx; the reference and the contract: _quota_py.py)
#
# The same steps as the reference, on the same Python lists and OrderedDict (the tracker keeps
# one data structure whichever implementation runs), compiled: no interpreter per account.
# Numbers are read as int64; a limit beyond that (a policy may name any positive integer) is
# clamped, which changes nothing (no window can count that many units).

from libc.stdint cimport INT64_MAX

from ._quota_py import quota_remove_newest as _quota_remove_newest_py


cdef inline int64_t _q_int(object v) except? -1:
    if v >= INT64_MAX:
        return INT64_MAX
    return <int64_t>v


cdef int _q_expire(list w, int64_t cutoff) except -1:
    cdef Py_ssize_t i = 1, end = len(w)
    cdef int64_t freed = 0
    while i < end and <int64_t>w[i] <= cutoff:
        freed += <int64_t>w[i + 1]
        i += 2
    if i > 1:
        del w[1:i]
        w[0] = <int64_t>w[0] - freed
    return 0


cdef int _q_remove_newest(list w, int64_t n) except -1:
    cdef int64_t take, last, total = w[0]
    cdef Py_ssize_t end
    while n > 0 and total:
        end = len(w)
        last = w[end - 1]
        take = n if n < last else last
        last -= take
        total -= take
        n -= take
        w[0] = total
        if last == 0:
            del w[end - 2:]
        else:
            w[end - 1] = last
    return 0


cdef int _q_add(list usage, tuple limits, tuple buckets, int64_t n) except -1:
    """1 when every window stays within its limit, else 0 (the units are added anyway)."""
    cdef int ok = 1
    cdef Py_ssize_t kind, end
    cdef int64_t limit, span, b, total
    cdef list w
    for entry in limits:
        kind = (<tuple>entry)[0]
        limit = _q_int((<tuple>entry)[1])
        span = (<tuple>entry)[2]
        b = buckets[kind]
        cur = usage[kind]
        if cur is None:
            usage[kind] = [n, b, n]
            total = n
        else:
            w = cur
            total = w[0]
            if total and <int64_t>w[1] <= b - span:
                _q_expire(w, b - span)
                total = w[0]
            end = len(w)
            if total and <int64_t>w[end - 2] >= b:
                w[end - 1] = <int64_t>w[end - 1] + n
            else:
                w.append(b)
                w.append(n)
            total += n
            w[0] = total
        if total > limit:
            ok = 0
    return ok


cdef int _q_take_back(list usage, tuple limits, int64_t n) except -1:
    cdef Py_ssize_t kind
    for entry in limits:
        kind = (<tuple>entry)[0]
        cur = usage[kind]
        if cur is None:  # the reference fails the same way, with its own message
            _quota_remove_newest_py(cur, n)
        _q_remove_newest(cur, n)
    return 0


cdef int _q_check(tuple limits, tuple buckets) except -1:
    # The loops index without bounds checks (the module's directives): the shapes are
    # checked once per call instead.
    if buckets is not None and len(buckets) != 3:
        raise ValueError("buckets must hold one bucket number per window kind (3)")
    return _q_check_limits(limits)


cdef int _q_check_limits(tuple limits) except -1:
    for entry in limits:
        if type(entry) is not tuple or len(<tuple>entry) != 3:
            raise ValueError("each limit must be (window kind, limit, buckets counted)")
        if not 0 <= (<tuple>entry)[0] <= 2:
            raise ValueError("a window kind must be 0, 1 or 2")
    return 0


cdef inline int _q_usage(object usage) except -1:
    if type(usage) is not list or len(<list>usage) != 3:
        raise TypeError("a quota usage must be a list of three windows")
    return 0


def quota_expire(list w, cutoff) -> None:
    _q_expire(w, cutoff)


def quota_remove_newest(list w, n) -> None:
    _q_remove_newest(w, n)


def quota_add(list usage, tuple limits, tuple buckets, n) -> bool:
    _q_check(limits, buckets)
    _q_usage(usage)
    return _q_add(usage, limits, buckets, n) == 1


def quota_take_back(list usage, tuple limits, n) -> None:
    _q_check_limits(limits)
    _q_usage(usage)
    _q_take_back(usage, limits, n)


cdef int _q_idle(list usage, tuple buckets, tuple spans) except -1:
    """1 when every unit of *usage* has expired (old buckets expired on the way)."""
    cdef Py_ssize_t kind
    for kind in range(3):
        cur = usage[kind]
        if cur is not None and <int64_t>(<list>cur)[0]:
            _q_expire(<list>cur, <int64_t>buckets[kind] - <int64_t>spans[kind])
            if <int64_t>(<list>cur)[0]:
                return 0
    return 1


def quota_idle(usage, tuple buckets, tuple spans) -> bool:
    _q_usage(usage)
    if len(buckets) != 3 or len(spans) != 3:  # the loop indexes without bounds checks
        raise ValueError("buckets and spans must hold one entry per window kind (3)")
    return _q_idle(<list>usage, buckets, spans) == 1


def quota_charge_known(table, str client, accounts, counts, tuple limits, tuple buckets,
                       Py_ssize_t start, insert=None):
    cdef Py_ssize_t k, count = len(accounts), max_accounts = 0
    cdef int64_t n
    cdef tuple spans = None
    cdef bint fits
    if start < 0:
        raise ValueError("start must be at least 0")
    _q_check(limits, buckets)
    if insert is not None:
        if type(insert) is not tuple or len(<tuple>insert) != 2:
            raise ValueError("insert must be (spans, max_accounts)")
        spans_obj, max_accounts_obj = <tuple>insert
        if type(spans_obj) is not tuple or len(<tuple>spans_obj) != 3:
            raise ValueError("spans must hold one span per window kind (3)")
        spans = <tuple>spans_obj
        max_accounts = max_accounts_obj
    get = table.get
    move = table.move_to_end
    for k in range(start, count):
        key = (client, accounts[k])
        usage = get(key)
        n = counts[k]
        if usage is None:
            if spans is None or len(table) >= max_accounts:
                return k, False
            fits = True
            for entry in limits:
                if n > _q_int((<tuple>entry)[1]):
                    fits = False
                    break
            if not fits:
                return k, False
            for _ in range(2):  # lazily drop idle accounts from the old end
                if not table:
                    break
                oldest = next(iter(table))
                old = table[oldest]
                _q_usage(old)
                if not _q_idle(<list>old, buckets, spans):
                    break
                del table[oldest]
            usage = [None, None, None]
            table[key] = usage
            _q_add(<list>usage, limits, buckets, n)  # fits: n is within every limit
            continue
        _q_usage(usage)
        move(key)
        if _q_add(<list>usage, limits, buckets, n):
            continue
        _q_take_back(<list>usage, limits, n)
        return k, True
    return count, False
