# ----------------------------------------------------------------------------- span tables
# (included by _native.pyx; the reference and the contract: _spantable_py.py)

from libc.stdint cimport uint32_t

cdef extern from "spantable.h" nogil:
    int c_span_table "span_table"(const uint8_t *data, const uint32_t *cols, uint32_t nfields,
                                  uint32_t off_field, uint32_t len_field, const uint32_t *rows,
                                  uint32_t n, uint32_t base, uint32_t absent,
                                  uint32_t *index, uint32_t *first, uint32_t *distinct)

from array import array as _array
from ._spantable_py import _check as _span_check


def span_table(data, columns, nfields, fields, rows, base=0, absent=0xFFFFFFFF):
    _span_check(data, columns, nfields, fields, rows, base, absent)
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
