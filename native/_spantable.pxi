# ----------------------------------------------------------------------------- span tables
# (included by _native.pyx; the reference and the contract: _spantable_py.py)

from libc.stdint cimport uint32_t

cdef extern from "spantable.h" nogil:
    int c_span_table "span_table"(const uint8_t *data, const uint32_t *cols, uint32_t nfields,
                                  uint32_t off_field, uint32_t len_field, const uint32_t *rows,
                                  uint32_t n, uint32_t base, uint32_t absent,
                                  uint32_t *index, uint32_t *first, uint32_t *distinct)

from array import array as _array
from ._spantable_py import check_span_arguments as _span_check


cdef int _span_fast_check(object data, object columns, object nfields, object fields,
                          object rows, object base, object absent) except -1:
    """The reference's argument rules, checked without calling into Python (the data plane
    calls span_table several times per frame); 1 when they hold, 0 when the reference must
    name what is wrong."""
    if type(data) is not bytes or type(columns) is not bytes or not _is_u32_array(rows):
        return 0
    if type(nfields) is not int or not 1 <= nfields <= 0xFFFF:
        return 0
    cdef Py_ssize_t nf = nfields, clen = PyBytes_GET_SIZE(columns)
    if clen % (4 * nf):
        return 0
    if type(fields) is not tuple or len(<tuple>fields) != 2:
        return 0
    off, length = <tuple>fields
    if type(off) is not int or type(length) is not int or not (0 <= off < nf and 0 <= length < nf):
        return 0
    if type(base) is not int or type(absent) is not int:
        return 0
    if not (0 <= base <= 0xFFFFFFFF and 0 <= absent <= 0xFFFFFFFF):
        return 0
    cdef Py_ssize_t m = len(rows), i
    if base + m > 0x100000000:
        return 0
    cdef uint64_t count = clen // (4 * nf)
    cdef const uint32_t[::1] r
    if m:
        r = rows
        for i in range(m):
            if r[i] >= count:
                return 0
    return 1


def span_table(data, columns, nfields, fields, rows, base=0, absent=0xFFFFFFFF):
    if not _span_fast_check(data, columns, nfields, fields, rows, base, absent):
        _span_check(data, columns, nfields, fields, rows, base, absent)  # names the problem
    cdef uint32_t n = len(rows)
    cdef object index = _array("I", bytes(4 * n))
    cdef object first = _array("I", bytes(4 * n))
    cdef const uint32_t[::1] rows_v = rows if n else _array("I", [0])
    cdef uint32_t[::1] index_v = index if n else _array("I", [0])
    cdef uint32_t[::1] first_v = first if n else _array("I", [0])
    cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(data)
    cdef const uint32_t *cols = <const uint32_t *>PyBytes_AS_STRING(columns)
    cdef uint32_t nf = nfields, off = fields[0], ln = fields[1], distinct = 0
    cdef uint32_t b = base, a = absent
    cdef int rc
    with nogil:
        rc = c_span_table(d, cols, nf, off, ln, &rows_v[0], n, b, a, &index_v[0],
                          &first_v[0], &distinct)
    if rc:
        raise MemoryError()
    cdef list table = []
    cdef uint32_t k, r
    for k in range(distinct):
        r = rows_v[first_v[k]] * nf
        table.append(data[cols[r + off]:cols[r + off] + cols[r + ln]])
    return table, index


cdef extern from "spantable.h" nogil:
    int c_span_lengths "span_lengths"(const uint32_t *rows, const uint32_t *ends, uint32_t m,
                                      size_t len, uint32_t n, uint32_t *lens)
    void c_span_copy "span_copy"(const uint32_t *rows, const uint32_t *ends, uint32_t m,
                                 const uint8_t *data, const uint32_t *offsets, uint8_t *out)
    int c_span_fill "span_fill"(uint32_t *target, uint32_t n, const uint32_t *rows, uint32_t m,
                                uint32_t value)

from ._spantable_py import u32_array as _u32_array_py


cdef inline int _u32_array(object value, str what) except -1:
    if not _is_u32_array(value):
        _u32_array_py(value, what)  # raises the reference's TypeError
    return 0


def gather_spans(n, groups):
    if type(n) is not int or not 0 <= n < 0xFFFFFFFF:
        raise ValueError("n must be a uint32 item count")
    cdef uint32_t count = n, m
    cdef object offsets = _array("I", bytes(4 * (count + 1)))
    cdef uint32_t[::1] off_v = offsets
    cdef const uint32_t[::1] rows_v
    cdef const uint32_t[::1] ends_v
    cdef const uint8_t *d
    cdef size_t dlen
    cdef int rc
    cdef uint64_t total = 0
    cdef uint32_t i
    checked = []
    for rows, data, ends in groups:
        _u32_array(rows, "rows")
        _u32_array(ends, "ends")
        if type(data) is not bytes:
            raise TypeError("data must be bytes")
        if len(rows) != len(ends):
            raise ValueError("rows and ends must have the same length")
        m = len(rows)
        if not m:
            continue
        rows_v = rows
        ends_v = ends
        d = <const uint8_t *>PyBytes_AS_STRING(data)
        dlen = PyBytes_GET_SIZE(data)
        with nogil:
            # lengths go into offsets[1..n] first, then become running sums
            rc = c_span_lengths(&rows_v[0], &ends_v[0], m, dlen, count, &off_v[1])
        if rc:
            raise ValueError("a piece out of order, beyond its data, or of no item")
        checked.append((rows, data, ends))
    for i in range(count):
        total += off_v[i + 1]
        if total > 0xFFFFFFFF:
            raise ValueError("gathered spans exceed 4 GiB")
        off_v[i + 1] = <uint32_t>total
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>total)
    cdef uint8_t *o = <uint8_t *>PyBytes_AS_STRING(out)
    # An item in several groups: its pieces go in group order, so each group writes at the
    # item's offset plus what the earlier groups wrote there.
    cdef object cursor = _array("I", offsets)
    cdef uint32_t[::1] cur_v = cursor
    for rows, data, ends in checked:
        rows_v = rows
        ends_v = ends
        m = len(rows)
        d = <const uint8_t *>PyBytes_AS_STRING(data)
        dlen = PyBytes_GET_SIZE(data)
        with nogil:
            c_span_copy(&rows_v[0], &ends_v[0], m, d, &cur_v[0], o)
            c_span_lengths(&rows_v[0], &ends_v[0], m, dlen, count, &cur_v[0])
    return out, offsets


def fill_rows(target, rows, value):
    _u32_array(target, "target")
    _u32_array(rows, "rows")
    if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("value must be a uint32")
    cdef uint32_t m = len(rows), n = len(target), v = value
    if not m:
        return
    cdef uint32_t[::1] t = target
    cdef const uint32_t[::1] r = rows
    cdef int rc
    with nogil:
        rc = c_span_fill(&t[0], n, &r[0], m, v)
    if rc:
        raise ValueError("a row beyond the target")
