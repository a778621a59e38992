# The nonce pool's batch inversion, exposed for tests (included by _native.pyx). The pool
# itself is SigningKey's (enable_nonce_pool and the rest, in _native.pyx).

cdef extern from "noncepool.h" nogil:
    enum:
        DCC_POOL_REFILL_CHUNK
    int dcc_pool_batch_inverse(int field, const uint8_t *inp, size_t count, uint8_t *out,
                               uint8_t *ok)

cdef object _P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
cdef object _P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF


def _nonce_batch_inverse(values, *, field=False) -> list:
    """Test support: the refill's batch inversion (Montgomery's trick, blinded) on the
    caller's values; see the reference for the contract."""
    cdef tuple items = tuple(values)
    cdef Py_ssize_t i, n = len(items)
    cdef object m = _P256_P if field else _P256_N
    if not 1 <= n <= DCC_POOL_REFILL_CHUNK:
        raise ValueError(f"_nonce_batch_inverse takes 1 to {DCC_POOL_REFILL_CHUNK} values")
    for i in range(n):
        v = items[i]
        if type(v) is not int:
            raise TypeError(f"value {i} must be an int, not {type(v).__name__}")
        if not 0 <= v < m:
            raise ValueError(f"value {i} is not in [0, {'p' if field else 'n'})")
    cdef bytes packed = b"".join(v.to_bytes(32, "big") for v in items)
    cdef uint8_t out[DCC_POOL_REFILL_CHUNK * 32]
    cdef uint8_t ok[DCC_POOL_REFILL_CHUNK]
    cdef int rc = dcc_pool_batch_inverse(1 if field else 0,
                                         <const uint8_t *>PyBytes_AS_STRING(packed),
                                         n, out, ok)
    if rc < 0:
        raise SigningError("OpenSSL failed to invert")
    if rc == 0:  # ruled out above
        raise ValueError("bad input to the batch inversion")
    return [int.from_bytes(PyBytes_FromStringAndSize(<char *>(out + 32 * i), 32), "big")
            if ok[i] else None for i in range(n)]
