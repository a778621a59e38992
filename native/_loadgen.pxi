# ----------------------------------------------------------------------------- load generator
# scan_results: the twin of native/_loadgen_py.py (contract there), over native/src/loadgen.c.

from libc.stdint cimport uint32_t
from cpython.unicode cimport PyUnicode_DecodeUTF8

cdef extern from "loadgen.h" nogil:
    enum:
        LG_OK
        LG_ERR_MALFORMED
        LG_ERR_BODY
        LG_ERR_RESULTS
        LG_ERR_RESULT
    ctypedef struct lg_error:
        uint32_t pos
        uint32_t code
    ctypedef struct lg_want:
        uint32_t pos
        int found
        size_t hc1_off, hc1_len, kid_off
    int lg_scan_results(const uint8_t *buf, size_t len, int batch, uint32_t max_results,
                        uint32_t *n, lg_error *errs, uint32_t *n_errs, lg_want *wants,
                        size_t n_wants, const char **err, size_t *err_pos,
                        uint32_t *err_index)

def scan_results(body, batch, max_results, want=()):
    if type(max_results) is not int or max_results < 1:
        raise ValueError("max_results must be a positive int")
    cdef const uint8_t[::1] view = memoryview(body).cast("B")
    cdef size_t n = view.shape[0]
    cdef int is_batch = 1 if batch else 0
    cdef uint32_t limit = max_results if max_results < 0xFFFFFFFF else 0xFFFFFFFF
    # Each result takes at least one byte: no more than that many can fail.
    cdef uint32_t cap = 1
    if is_batch:
        cap = limit if <size_t> limit < n else <uint32_t> n
        if cap == 0:
            cap = 1
    cdef tuple wanted = tuple(want)
    cdef size_t n_wants = len(wanted), j
    cdef uint32_t count = 0, n_errs = 0, err_index = 0, i
    cdef size_t err_pos = 0
    cdef const char *err = NULL
    cdef int rc
    # Small stack buffers for the usual frame; the heap only for large batches.
    cdef lg_error small_errs[64]
    cdef lg_want small_wants[8]
    cdef lg_error *errs = small_errs
    cdef lg_want *wants = small_wants
    if cap > 64:
        errs = <lg_error *> malloc(cap * sizeof(lg_error))
    if n_wants > 8:
        wants = <lg_want *> malloc(n_wants * sizeof(lg_want))
    if errs == NULL or wants == NULL:
        if errs != small_errs:
            free(errs)
        if wants != small_wants:
            free(wants)
        raise MemoryError()
    try:
        for j in range(n_wants):
            p = wanted[j]
            # A position that cannot be a result's is never found.
            wants[j].pos = p if 0 <= p < 0xFFFFFFFF else 0xFFFFFFFF
        with nogil:
            rc = lg_scan_results(&view[0] if n else NULL, n, is_batch, limit, &count, errs,
                                 &n_errs, wants, n_wants, &err, &err_pos, &err_index)
        if rc == LG_ERR_MALFORMED:
            raise ValueError(f"CBOR at byte {err_pos}: {err.decode('ascii')}")
        if rc == LG_ERR_BODY:
            raise ValueError(err.decode("ascii"))
        if rc == LG_ERR_RESULTS:
            raise ValueError(
                f"SIGN_BATCH_RESULT.results: must be an array of 1..{max_results} results"
            )
        if rc == LG_ERR_RESULT:
            text = err.decode("ascii")
            where = f"SIGN_BATCH_RESULT.results[{err_index}]" if is_batch else "SIGN_RESULT"
            sep = " " if text.startswith(("is ", "has ")) else "."
            raise ValueError(f"{where}{sep}{text}")
        errors = tuple([(errs[i].pos, errs[i].code) for i in range(n_errs)])
        picked = []
        for j in range(n_wants):
            if wants[j].found:
                picked.append((
                    PyUnicode_DecodeUTF8(<const char *> &view[wants[j].hc1_off],
                                         wants[j].hc1_len, NULL),
                    PyBytes_FromStringAndSize(<const char *> &view[wants[j].kid_off], 8),
                ))
            else:
                picked.append(None)
        return count, errors, tuple(picked)
    finally:
        if errs != small_errs:
            free(errs)
        if wants != small_wants:
            free(wants)
