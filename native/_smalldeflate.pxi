# Included by _native.pyx: the small-input deflate encoder (native/src/smalldeflate.c) and a
# libdeflate hook for benchmarks and tests. The contract is in native/_smalldeflate_py.py.

from libc.stdint cimport uint32_t

cdef extern from "smalldeflate.h" nogil:
    enum:
        DCC_SMALL_DEFLATE_MAX
    int dcc_sd_code_lengths(const uint32_t *freqs, int nsym, int limit, uint8_t *lengths)
    int dcc_small_deflate(const uint8_t *inp, size_t n, int level, uint8_t *out, size_t cap,
                          size_t *outlen, const char **err)

cdef extern from "dcccore.h" nogil:
    int dcc_deflate_libdeflate(const uint8_t *inp, size_t n, int level, uint8_t *out,
                               size_t cap, size_t *outlen, const char **err)

SMALL_DEFLATE_MAX = DCC_SMALL_DEFLATE_MAX


cdef bytes _deflate_with(data, level, bint small):
    _check_level(level)
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef size_t n = view.shape[0], outlen = 0
    if small and n >= DCC_SMALL_DEFLATE_MAX:
        raise ValueError(f"small_deflate takes fewer than {DCC_SMALL_DEFLATE_MAX} bytes, not {n}")
    cdef size_t cap = dcc_zlib_bound(n)
    cdef const char *err = NULL
    cdef int lvl = level, rc
    cdef uint8_t *out = <uint8_t *>malloc(cap)
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            if small:
                rc = dcc_small_deflate(&view[0] if n else NULL, n, lvl, out, cap, &outlen, &err)
            else:
                rc = dcc_deflate_libdeflate(&view[0] if n else NULL, n, lvl, out, cap, &outlen,
                                            &err)
        if rc != DCC_OK:
            raise ZlibError(err.decode("ascii"))
        return PyBytes_FromStringAndSize(<char *>out, outlen)
    finally:
        free(out)


def small_deflate(data, level=9) -> bytes:
    return _deflate_with(data, level, True)


def _libdeflate_compress(data, level=9) -> bytes:
    """libdeflate's zlib stream of *data* whatever its size (benchmark and test hook only)."""
    return _deflate_with(data, level, False)


def _small_deflate_code_lengths(freqs, int limit) -> list:
    """The encoder's length-limited Huffman code lengths for *freqs* (test hook only)."""
    cdef uint32_t f[286]
    cdef uint8_t lengths[286]
    cdef int nsym = len(freqs), k
    if not 2 <= nsym <= 286:
        raise ValueError("2..286 frequencies")
    for k in range(nsym):
        if not 0 <= freqs[k] <= (1 << 22):
            raise ValueError("a frequency must be in 0..2**22")
        f[k] = freqs[k]
    if dcc_sd_code_lengths(f, nsym, limit, lengths) != 0:
        raise ValueError("limit must be 5..15")
    return [lengths[k] for k in range(nsym)]
