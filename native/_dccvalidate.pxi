# DCC validation on CBOR bytes (native/src/dccvalidate.c); included by _native.pyx.
#
# The reference and the contracts are in _dccvalidate_py.py. C decides every item; the valid
# ones (all but a few in production) are answered from C alone, with the GIL released over the
# batch. An item C refuses or leaves undecided goes through the reference once more, under the
# GIL, which builds the error (Python messages by construction) and cross-checks C's (path,
# rule) list: _dccvalidate_py._settle.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t

cdef extern from "dccvalidate.h" nogil:
    enum:
        DV_INVALID
        DV_UNDECODABLE
        DV_PUNT
        DV_PATH_MAX
        DV_NSETS
        DV_STRICT_MAX_ITEMS
        DV_STRICT_MAX_DEPTH
        DV_STRICT
        DV_NFC
        DV_NFC_LIMIT
    ctypedef struct dv_issue:
        uint8_t rule
        uint32_t key_off
        char path[80]
    ctypedef struct dv_issues:
        dv_issue *items
        int cap
        int n
        int overflow
    ctypedef struct dv_set:
        pass
    ctypedef struct dv_rules:
        dv_set sets[8]
        int has_test_manf
        const uint8_t *nfc_inert
    uint32_t dv_set_slots(uint32_t n)
    void dv_set_build(dv_set *set, const uint8_t *blob, const uint32_t *lens, uint32_t n,
                      uint32_t *slot, uint32_t *off, uint32_t *len)
    int dv_validate(const dv_rules *rules, const uint8_t *buf, size_t len, const char *today,
                    int flags, dv_issues *issues)
    int dv_validate_cwt(const dv_rules *rules, const uint8_t *buf, size_t len,
                        const char *today, dv_issues *issues)

from array import array as _array

from . import _dccvalidate_py as _dvpy
from .errors import DCCDecodeError

# The order of the C enum DV_RULE_*.
_DV_RULES = (
    "type", "required", "unknown-field", "version", "one-group", "one-entry", "max-length",
    "pattern", "empty", "date", "date-time", "date-order", "range", "value-set",
    "uvci-grammar", "uvci-checksum",
)
_DV_KINDS = ("v", "t", "r")
_dv_stats = _dvpy._Stats()
# Issues C records for one item on the slow path (more: the list is not compared).
cdef enum:
    _DV_ISSUE_CAP = 64

assert DV_STRICT_MAX_ITEMS == _dvpy.STRICT_MAX_ITEMS
assert DV_STRICT_MAX_DEPTH == _dvpy.STRICT_MAX_DEPTH


cdef class DccRules:
    """The value-set tables in C, compiled once from a ValueSets (see the reference)."""
    cdef dv_rules c
    cdef uint32_t *mem
    cdef readonly object valuesets
    cdef list _blobs
    cdef bytes _nfc

    def __cinit__(self, valuesets=None):
        self.mem = NULL
        self.valuesets = _dvpy._valuesets(valuesets)
        self._nfc = _dvpy._nfc_inert_bitmap()
        assert len(self._nfc) * 8 == DV_NFC_LIMIT
        self.c.nfc_inert = <const uint8_t *>PyBytes_AS_STRING(self._nfc)
        lk = self.valuesets._lookup
        tables = (lk.tg, lk.vp, lk.mp, lk.vma, lk.tt, lk.tr, lk.co,
                  lk.test_manf if lk.test_manf is not None else frozenset())
        assert len(tables) == DV_NSETS
        self.c.has_test_manf = lk.test_manf is not None
        self._blobs = []
        encoded = []
        cdef size_t total = 0
        for codes in tables:
            raw = []
            for code in sorted(codes):
                try:
                    raw.append(code.encode("utf-8"))
                except UnicodeEncodeError:
                    pass  # a lone surrogate: no CBOR text can equal it
            encoded.append(raw)
            total += dv_set_slots(len(raw)) + 3 * len(raw)
        self.mem = <uint32_t *>malloc((total if total else 1) * sizeof(uint32_t))
        if self.mem == NULL:
            raise MemoryError()
        cdef uint32_t *p = self.mem
        cdef uint32_t n, slots
        cdef const uint8_t[::1] bview
        cdef uint32_t[::1] lview
        for i, raw in enumerate(encoded):
            blob = b"".join(raw)
            lens = _array("I", [len(r) for r in raw] or [0])
            self._blobs.append((blob, lens))
            n = len(raw)
            slots = dv_set_slots(n)
            bview = blob if blob else b"\0"
            lview = lens
            dv_set_build(&self.c.sets[i], &bview[0], &lview[0], n, p, p + slots,
                         p + slots + n)
            p += slots + 3 * n

    def __dealloc__(self):
        free(self.mem)

    def __repr__(self):
        return f"<DccRules {self.valuesets!r} (native)>"


cdef bytes _dv_today(today):
    if today is None:
        from ..dcc.validate import _utc_today_iso
        return _utc_today_iso().encode("ascii")
    _dvpy._check_today(today)
    return f"{today.year:04d}-{today.month:02d}-{today.day:02d}".encode("ascii")


cdef object _dv_slow(DccRules rules, int outcome, const uint8_t *p, size_t n, size_t base,
                     bytes whole, const char *today, int flags, int cwt, object today_obj,
                     object item):
    """The slow path of one item: C's issues, the reference's answer, _settle."""
    cdef dv_issue store[_DV_ISSUE_CAP]
    cdef dv_issues iss
    cdef list c_issues = None
    iss.items = store
    iss.cap = _DV_ISSUE_CAP
    iss.n = 0
    iss.overflow = 0
    if outcome == DV_INVALID:
        if cwt:
            dv_validate_cwt(&rules.c, p, n, today, &iss)
        else:
            dv_validate(&rules.c, p, n, today, flags, &iss)
        if not iss.overflow:
            c_issues = []
            for k in range(iss.n):
                path = store[k].path.decode("utf-8")
                if store[k].key_off:
                    path = _dvpy._render(path, whole, store[k].key_off + base)
                c_issues.append((path, _DV_RULES[store[k].rule]))
    if cwt:
        reference = _dvpy._verdict(_dvpy._cwt_dcc, item, rules, today_obj)
    else:
        strict, nfc = bool(flags & DV_STRICT), bool(flags & DV_NFC)
        reference = _dvpy._verdict(lambda d: _dvpy._decode(d, strict, nfc), item, rules,
                                   today_obj)
    return _dvpy._settle(_dv_stats, outcome, c_issues, reference)


def validate_dcc_cbor(DccRules rules, data, today=None, *, strict=True, nfc_names=False):
    cdef bytes t = _dv_today(today)
    cdef const char *tc = t
    cdef bytes raw = bytes(data)
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(raw)
    cdef size_t n = PyBytes_GET_SIZE(raw)
    cdef int s = (DV_STRICT if strict else 0) | (DV_NFC if nfc_names else 0)
    cdef int rc
    with nogil:
        rc = dv_validate(&rules.c, p, n, tc, s, NULL)
    if rc < DV_INVALID:
        _dv_stats.count(1, 1)
        return _DV_KINDS[rc]
    _dv_stats.count(1, 0)
    result = _dv_slow(rules, rc, p, n, 0, raw, tc, s, 0, today, raw)
    if isinstance(result, Exception):
        raise result
    return result


def validate_dcc_batch(DccRules rules, buf, offsets, today=None, *, ends=None, strict=True,
                       nfc_names=False):
    cdef bytes t = _dv_today(today)
    cdef const char *tc = t
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _dv_batch(rules, buf, <const uint8_t *>view.buf, <size_t>view.len, offsets,
                         ends, tc, (DV_STRICT if strict else 0) | (DV_NFC if nfc_names else 0),
                         today)
    finally:
        PyBuffer_Release(&view)


cdef const int64_t[::1] _dv_int64s(seq):
    # A buffer of 64-bit signed integers is used in place; any other sequence (an
    # array('I') of the walker's spans, a list) is converted: its memory must never be
    # reinterpreted as int64.
    try:
        view = memoryview(seq)
    except TypeError:
        return _array("q", seq)
    if view.ndim == 1 and view.itemsize == 8 and view.format in ("q", "l", "=q", "<q", "@q"):
        return view.cast("B").cast("q")
    return _array("q", seq)


cdef list _dv_batch(DccRules rules, object buf, const uint8_t *base, size_t size, offsets,
                    ends, const char *tc, int flags, object today):
    cdef const int64_t[::1] starts = _dv_int64s(offsets)
    cdef const int64_t[::1] stops
    cdef Py_ssize_t n, i, step
    if ends is None:
        if starts.shape[0] < 1:
            raise ValueError("offsets must hold N+1 boundaries (at least one)")
        n = starts.shape[0] - 1
        stops = starts[1:]
    else:
        stops = _dv_int64s(ends)
        if stops.shape[0] != starts.shape[0]:
            raise ValueError("offsets and ends must have the same length")
        n = starts.shape[0]
    for i in range(n):
        if not 0 <= starts[i] <= stops[i] <= <int64_t>size:
            raise ValueError(f"span {starts[i]}:{stops[i]} is not inside the {size}-byte buffer")
    cdef int *rcs = <int *>malloc(max(n, 1) * sizeof(int))
    if rcs == NULL:
        raise MemoryError()
    cdef Py_ssize_t fast = 0
    try:
        with nogil:
            for i in range(n):
                rcs[i] = dv_validate(&rules.c, base + starts[i], <size_t>(stops[i] - starts[i]),
                                     tc, flags, NULL)
                if rcs[i] < DV_INVALID:
                    fast += 1
        out = [None] * n
        whole = None
        for i in range(n):
            if rcs[i] < DV_INVALID:
                out[i] = _DV_KINDS[rcs[i]]
                continue
            if whole is None:
                whole = bytes(buf)
            item = whole[starts[i]:stops[i]]
            out[i] = _dv_slow(rules, rcs[i], base + starts[i], <size_t>(stops[i] - starts[i]),
                              0, item, tc, flags, 0, today, item)
        _dv_stats.count(n, fast)
        return out
    finally:
        free(rcs)


def validate_cwt_batch(DccRules rules, payloads, today=None):
    cdef bytes t = _dv_today(today)
    cdef const char *tc = t
    cdef _Batch b = _payload_batch(payloads, "payload")
    cdef Py_ssize_t n = b.n, i, fast = 0
    cdef int *rcs = <int *>malloc(max(n, 1) * sizeof(int))
    if rcs == NULL:
        raise MemoryError()
    try:
        with nogil:
            for i in range(n):
                rcs[i] = dv_validate_cwt(&rules.c, b.ptrs[i], b.lens[i], tc, NULL)
                if rcs[i] < DV_INVALID:
                    fast += 1
        out = [None] * n
        for i in range(n):
            if rcs[i] < DV_INVALID:
                out[i] = _DV_KINDS[rcs[i]]
            else:
                item = PyBytes_FromStringAndSize(<const char *>b.ptrs[i], b.lens[i])
                out[i] = _dv_slow(rules, rcs[i], b.ptrs[i], b.lens[i], 0, item, tc, 0, 1,
                                  today, item)
        _dv_stats.count(n, fast)
        return out
    finally:
        free(rcs)


def dcc_validator_stats():
    return _dv_stats.snapshot()
