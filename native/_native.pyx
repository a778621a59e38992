# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False
"""The native implementation of :mod:`dccsign.native` (Cython over libcrypto and zlib).

Same API, same exceptions and same messages as the pure-Python reference (``_reference.py``,
whose docstrings state the contracts). Batch functions take the inputs' buffers, release the
GIL for the whole batch, and build Python objects only at the end, so two threads signing at
once use two cores.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII

from .errors import Base45DecodeError, CoseFormatError, KeyLoadError, SigningError, ZlibError
from ._types import ES256, PS256, CwtFacts, NoncePoolInfo, Sign1Parts, Spans

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_PKEY:
        pass
    void EVP_PKEY_free(EVP_PKEY *pkey)

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_free(void *ptr)

cdef extern from "dcccore.h" nogil:
    enum:
        DCC_OK
        DCC_ERR_B45_CHAR
        DCC_ERR_B45_LENGTH
        DCC_ERR_B45_OVERFLOW
        DCC_ERR_TOO_LARGE
        DCC_ERR_SIGN
        DCC_ERR_SHAPE
        DCC_ERR_TRAILING
        DCC_MAX_TAGS
    size_t dcc_b45_encoded_len(size_t n)
    size_t dcc_b45_encode(const uint8_t *inp, size_t n, char *out)
    int dcc_b45_decode(const char *inp, size_t n, uint8_t *out, size_t *outlen, size_t *errpos)
    size_t dcc_sig_structure_len(size_t plen, size_t paylen)
    size_t dcc_sig_structure(const uint8_t *prot, size_t plen, const uint8_t *pay,
                             size_t paylen, uint8_t *out)
    size_t dcc_sign1_len(size_t plen, size_t paylen, size_t siglen)
    size_t dcc_sign1(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                     const uint8_t *sig, size_t siglen, uint8_t *out)
    ctypedef struct dcc_sign1_parts:
        uint64_t tags[4]
        int ntags
        size_t prot_off, prot_len, unprot_off, unprot_len, pay_off, pay_len, sig_off, sig_len
    int dcc_sign1_split(const uint8_t *buf, size_t len, dcc_sign1_parts *parts, const char **err)
    int dcc_cbor_scan(const uint8_t *buf, size_t len, uint64_t max_items, int max_depth,
                      uint64_t *count, const char **err)
    size_t dcc_zlib_bound(size_t n)
    int dcc_deflate(const uint8_t *inp, size_t n, int level, uint8_t *out, size_t cap,
                    size_t *outlen, const char **err)
    int dcc_inflate(const uint8_t *inp, size_t n, uint8_t *out, size_t cap, size_t *outlen,
                    const char **err)
    EVP_PKEY *dcc_load_private_key(const char *pem, size_t pemlen, const char *passw,
                                   size_t passlen, int *alg, char *err, size_t errlen)
    int dcc_public_key_der(EVP_PKEY *pkey, unsigned char **out)
    size_t dcc_signature_max_len(EVP_PKEY *pkey, int alg)
    ctypedef struct dcc_signer:
        size_t maxsig
    int dcc_signer_open(dcc_signer *s, EVP_PKEY *pkey, int alg)
    void dcc_signer_close(dcc_signer *s)
    int dcc_sha256(const uint8_t *data, size_t n, uint8_t *out)
    int dcc_sign_tbs(dcc_signer *s, const uint8_t *tbs, size_t tbslen, uint8_t *sig,
                     size_t *siglen)
    int dcc_sign_digest(dcc_signer *s, const uint8_t *digest, uint8_t *sig, size_t *siglen)
    size_t dcc_hc1_scratch_len(size_t plen, size_t paylen, size_t siglen)
    size_t dcc_hc1_max_len(size_t plen, size_t paylen, size_t siglen)
    int dcc_hc1_encode_one(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                           const uint8_t *sig, size_t siglen, int level, uint8_t *scratch,
                           char *out, size_t *outlen, const char **err)


cdef extern from "noncepool.h" nogil:
    ctypedef struct dcc_pool:
        pass
    ctypedef struct dcc_pool_work:
        pass
    ctypedef struct dcc_pool_info:
        size_t capacity, level
        uint64_t refilled, spent, misses, discarded
        int locked, dontdump, wipeonfork, lock_errno, orphaned, refill_policy
    dcc_pool *dcc_pool_new(EVP_PKEY *pkey, size_t capacity, char *err, size_t errlen)
    void dcc_pool_free(dcc_pool *pool)
    size_t dcc_pool_refill(dcc_pool *pool, size_t max_new)
    int dcc_pool_start_refill(dcc_pool *pool)
    int dcc_pool_enter(dcc_pool *pool)
    void dcc_pool_leave(dcc_pool *pool)
    dcc_pool_work *dcc_pool_work_new()
    void dcc_pool_work_free(dcc_pool_work *w)
    int dcc_pool_sign(dcc_pool *pool, dcc_pool_work *w, const uint8_t *digest, uint8_t *sig)
    void dcc_pool_clear(dcc_pool *pool)
    void dcc_pool_info_get(dcc_pool *pool, dcc_pool_info *info)
    size_t dcc_pool_residue(dcc_pool *pool)

import os as _os

# dcc_pool_info.refill_policy -> NoncePoolInfo.refill_thread
_REFILL_POLICY = {0: None, 1: "SCHED_IDLE", 2: "nice 19", 3: "normal priority"}

MAX_INFLATED = 64 * 1024

_PROTECTED_PREFIX = {ES256: b"\xa2\x01\x26\x04\x48", PS256: b"\xa2\x01\x38\x24\x04\x48"}


# ----------------------------------------------------------------------------- base45

def b45encode(data) -> str:
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef size_t n = view.shape[0]
    cdef size_t outlen = dcc_b45_encoded_len(n)
    cdef char *out = <char *>malloc(outlen + 1)
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            dcc_b45_encode(&view[0] if n else NULL, n, out)
        return PyUnicode_DecodeASCII(out, outlen, NULL)
    finally:
        free(out)


def b45decode(text) -> bytes:
    cdef bytes raw
    if isinstance(text, str):
        try:
            raw = (<str>text).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise Base45DecodeError(
                f"invalid base45 character {text[exc.start]!r} at position {exc.start}", exc.start
            ) from None
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
    else:
        raise TypeError(f"base45 input must be str or bytes, not {type(text).__name__}")
    cdef size_t n = PyBytes_GET_SIZE(raw)
    cdef size_t outlen = 0, errpos = 0
    cdef uint8_t *out = <uint8_t *>malloc(n // 3 * 2 + 2)
    cdef int rc
    if out == NULL:
        raise MemoryError()
    try:
        rc = dcc_b45_decode(PyBytes_AS_STRING(raw), n, out, &outlen, &errpos)
        if rc == DCC_OK:
            return PyBytes_FromStringAndSize(<char *>out, outlen)
    finally:
        free(out)
    if rc == DCC_ERR_B45_LENGTH:
        raise Base45DecodeError(
            f"invalid base45 length {n}: a length of 1 mod 3 cannot occur", n)
    if rc == DCC_ERR_B45_CHAR:
        raise Base45DecodeError(
            f"invalid base45 character {chr(raw[errpos])!r} at position {errpos}", errpos)
    if n - errpos >= 3:
        raise Base45DecodeError(f"base45 triplet at position {errpos} exceeds 65535", errpos)
    raise Base45DecodeError(f"base45 final pair at position {errpos} exceeds 255", errpos)


# ----------------------------------------------------------------------------- COSE

def check_protected(int alg, protected) -> None:
    prefix = _PROTECTED_PREFIX[alg]
    if (type(protected) is not bytes or len(protected) != len(prefix) + 8
            or not protected.startswith(prefix)):
        name = "ES256" if alg == ES256 else "PS256"
        raise ValueError(f"protected header is not the canonical {{1: {name}, 4: kid}} map")


def protected_header(alg, kid) -> bytes:
    prefix = _PROTECTED_PREFIX.get(alg)
    if prefix is None:
        raise ValueError(f"unsupported COSE algorithm {alg!r}: only ES256 (-7) and PS256 (-37)")
    if type(kid) is not bytes or len(kid) != 8:
        raise ValueError("kid must be 8 bytes (the first 8 bytes of SHA-256 over the DSC)")
    return prefix + kid


def sig_structure(const uint8_t[::1] protected, const uint8_t[::1] payload) -> bytes:
    cdef size_t plen = protected.shape[0], paylen = payload.shape[0]
    cdef bytes out = PyBytes_FromStringAndSize(NULL, dcc_sig_structure_len(plen, paylen))
    dcc_sig_structure(&protected[0] if plen else NULL, plen, &payload[0] if paylen else NULL,
                      paylen, <uint8_t *>PyBytes_AS_STRING(out))
    return out


def sign1_encode(const uint8_t[::1] protected, const uint8_t[::1] payload,
                 const uint8_t[::1] signature) -> bytes:
    cdef size_t plen = protected.shape[0], paylen = payload.shape[0]
    cdef size_t siglen = signature.shape[0]
    cdef bytes out = PyBytes_FromStringAndSize(NULL, dcc_sign1_len(plen, paylen, siglen))
    dcc_sign1(&protected[0] if plen else NULL, plen, &payload[0] if paylen else NULL, paylen,
              &signature[0] if siglen else NULL, siglen, <uint8_t *>PyBytes_AS_STRING(out))
    return out


def sign1_decode(data) -> Sign1Parts:
    cdef bytes raw = bytes(memoryview(data))
    cdef dcc_sign1_parts p
    cdef const char *err = NULL
    cdef const uint8_t *buf = <const uint8_t *>PyBytes_AS_STRING(raw)
    if dcc_sign1_split(buf, PyBytes_GET_SIZE(raw), &p, &err) != DCC_OK:
        raise CoseFormatError(err.decode("ascii"))
    return Sign1Parts(
        tuple(p.tags[i] for i in range(p.ntags)),
        raw[p.prot_off:p.prot_off + p.prot_len],
        raw[p.unprot_off:p.unprot_off + p.unprot_len],
        raw[p.pay_off:p.pay_off + p.pay_len],
        raw[p.sig_off:p.sig_off + p.sig_len],
    )


# ----------------------------------------------------------------------------- zlib

cdef int _check_level(level) except -1:
    if not isinstance(level, int) or not -1 <= level <= 9:
        raise ValueError(f"zlib level must be an integer from -1 to 9, not {level!r}")
    return 0


def zlib_compress(data, level=9) -> bytes:
    _check_level(level)
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef size_t n = view.shape[0], outlen = 0
    cdef size_t cap = dcc_zlib_bound(n)
    cdef const char *err = NULL
    cdef int lvl = level, rc
    cdef uint8_t *out = <uint8_t *>malloc(cap)
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            rc = dcc_deflate(&view[0] if n else NULL, n, lvl, out, cap, &outlen, &err)
        if rc != DCC_OK:
            raise ZlibError(err.decode("ascii"))
        return PyBytes_FromStringAndSize(<char *>out, outlen)
    finally:
        free(out)


def zlib_decompress(data, Py_ssize_t max_length=MAX_INFLATED) -> bytes:
    if max_length < 1:
        raise ValueError("max_length must be positive")
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef size_t n = view.shape[0], outlen = 0
    cdef const char *err = NULL
    cdef int rc
    cdef uint8_t *out = <uint8_t *>malloc(max_length)
    if out == NULL:
        raise MemoryError()
    try:
        with nogil:
            rc = dcc_inflate(&view[0] if n else NULL, n, out, max_length, &outlen, &err)
        if rc == DCC_OK:
            return PyBytes_FromStringAndSize(<char *>out, outlen)
        message = err.decode("ascii", "replace")
        if rc == DCC_ERR_TOO_LARGE or message.startswith(("truncated", "trailing")):
            raise ZlibError(message)
        raise ZlibError(f"invalid zlib data: {message}")
    finally:
        free(out)


# ----------------------------------------------------------------------------- CBOR scan

from ..protocol.cborlimits import MAX_SCAN_DEPTH


def cbor_scan(data, max_items, max_depth) -> int:
    if type(max_items) is not int or max_items < 1:
        raise ValueError("max_items must be a positive int")
    if type(max_depth) is not int or not 1 <= max_depth <= MAX_SCAN_DEPTH:
        raise ValueError(f"max_depth must be an int in 1..{MAX_SCAN_DEPTH}")
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef size_t n = view.shape[0]
    cdef uint64_t limit = max_items if max_items < 0xFFFFFFFFFFFFFFFF else 0xFFFFFFFFFFFFFFFF
    cdef uint64_t count = 0
    cdef int depth = max_depth, rc
    cdef const char *err = NULL
    with nogil:
        rc = dcc_cbor_scan(&view[0] if n else NULL, n, limit, depth, &count, &err)
    if rc == DCC_OK:
        return count
    if rc == DCC_ERR_TOO_LARGE:
        raise ValueError(f"more than {max_items} CBOR data items")
    if rc == DCC_ERR_SHAPE:
        raise ValueError(f"CBOR nested more than {max_depth} levels deep")
    if rc == DCC_ERR_TRAILING:
        raise ValueError(err.decode("ascii"))
    raise ValueError("malformed CBOR: " + err.decode("ascii"))


# ----------------------------------------------------------------------------- signing

cdef tuple _bytes_items(seq, str what):
    if type(seq) is Spans:
        return tuple(seq)  # the reference's reading: every span checked, as bytes
    cdef tuple items = tuple(seq)
    for i, item in enumerate(items):
        if type(item) is not bytes:
            raise TypeError(f"{what} {i} must be bytes, not {type(item).__name__}")
    return items


cdef class _Batch:
    """C views of a tuple of bytes objects, or of the spans of a :class:`Spans` (kept alive
    by this object), for nogil loops."""
    cdef tuple items
    cdef Py_ssize_t n
    cdef const uint8_t **ptrs
    cdef size_t *lens
    cdef size_t maxlen

    def __cinit__(self, tuple items, spans=None):
        cdef const unsigned int[::1] starts, ends, rows
        cdef const uint8_t *base
        cdef size_t size, start, end
        cdef Py_ssize_t i, count
        cdef unsigned int row
        if spans is not None:
            data = (<object>spans).data
            self.items = (data,)
            starts = (<object>spans).starts
            ends = (<object>spans).ends
            rows = (<object>spans).rows
            self.n = rows.shape[0]
        else:
            self.items = items
            self.n = len(items)
        self.ptrs = <const uint8_t **>malloc(max(self.n, 1) * sizeof(uint8_t *))
        self.lens = <size_t *>malloc(max(self.n, 1) * sizeof(size_t))
        if self.ptrs == NULL or self.lens == NULL:
            raise MemoryError()
        self.maxlen = 0
        if spans is not None:
            # The same checks, in the same order, as the reference's reading (_types.Spans)
            base = <const uint8_t *>PyBytes_AS_STRING(data)
            size = PyBytes_GET_SIZE(data)
            count = starts.shape[0]
            for i in range(self.n):
                row = rows[i]
                if row >= count:
                    raise ValueError(f"row {row} is out of range ({count} spans)")
                start = starts[row]
                end = ends[row]
                if not start <= end <= size:
                    raise ValueError(
                        f"span {start}:{end} is not inside the {size}-byte buffer"
                    )
                self.ptrs[i] = base + start
                self.lens[i] = end - start
                if self.lens[i] > self.maxlen:
                    self.maxlen = self.lens[i]
            return
        for i in range(self.n):
            self.ptrs[i] = <const uint8_t *>PyBytes_AS_STRING(items[i])
            self.lens[i] = PyBytes_GET_SIZE(items[i])
            if self.lens[i] > self.maxlen:
                self.maxlen = self.lens[i]


    def __dealloc__(self):
        free(self.ptrs)
        free(self.lens)


cdef _Batch _payload_batch(payloads, str what):
    """The C views of *payloads*: a :class:`Spans` read in place, else a sequence of bytes."""
    if type(payloads) is Spans:
        return _Batch((), payloads)
    return _Batch(_bytes_items(payloads, what))


cdef class SigningKey:
    """A private signing key for ES256 (P-256) or PS256 (RSA 2048-4096); see the reference.

    The key lives in OpenSSL memory; there is no method that returns it. Its nonce pool, when
    enabled, lives in one locked mapping of C memory (native/src/noncepool.h) and is spent by
    :meth:`sign` only.
    """
    cdef EVP_PKEY *_pkey
    cdef dcc_pool *_pool
    # A pool closed while a sign or refill call still uses it (without the GIL) is wiped at
    # once and freed by the last of those calls.
    cdef dcc_pool *_retired
    cdef int _pool_users
    cdef readonly int alg

    def __cinit__(self):
        self._pkey = NULL
        self._pool = NULL
        self._retired = NULL
        self._pool_users = 0

    def __init__(self):
        raise TypeError("use SigningKey.load_pem()")

    def __dealloc__(self):
        dcc_pool_free(self._pool)  # wipes every entry
        dcc_pool_free(self._retired)
        self._pool = NULL
        self._retired = NULL
        if self._pkey != NULL:
            EVP_PKEY_free(self._pkey)

    cdef dcc_pool *_use_pool(self):
        if self._pool != NULL:
            self._pool_users += 1
        return self._pool

    cdef void _done_with_pool(self, dcc_pool *pool):
        cdef dcc_pool *retired
        if pool == NULL:
            return
        self._pool_users -= 1
        if self._pool_users == 0 and self._retired != NULL:
            retired = self._retired
            self._retired = NULL
            with nogil:
                dcc_pool_free(retired)

    def __reduce__(self):
        raise TypeError("a SigningKey cannot be pickled or copied out of its process")

    @staticmethod
    def load_pem(pem, passphrase) -> SigningKey:
        cdef bytes pem_b = bytes(pem)
        cdef bytes pass_b
        cdef const char *pass_p = NULL
        cdef size_t pass_n = 0
        cdef char err[512]
        cdef int alg = 0
        if passphrase is not None:
            pass_b = bytes(passphrase)
            pass_p = PyBytes_AS_STRING(pass_b)
            pass_n = PyBytes_GET_SIZE(pass_b)
        cdef EVP_PKEY *pkey = dcc_load_private_key(PyBytes_AS_STRING(pem_b), len(pem_b),
                                                   pass_p, pass_n, &alg, err, sizeof(err))
        if pkey == NULL:
            raise KeyLoadError(err.decode("utf-8", "replace"))
        cdef SigningKey self = SigningKey.__new__(SigningKey)
        self._pkey = pkey
        self.alg = alg
        return self

    def public_key_der(self) -> bytes:
        cdef unsigned char *der = NULL
        cdef int n = dcc_public_key_der(self._pkey, &der)
        if n <= 0:
            raise SigningError("cannot encode the public key")
        try:
            return PyBytes_FromStringAndSize(<char *>der, n)
        finally:
            OPENSSL_free(der)

    def sign(self, protected, payloads) -> list:
        check_protected(self.alg, protected)
        cdef _Batch batch = _payload_batch(payloads, "payload")
        cdef const uint8_t *prot = <const uint8_t *>PyBytes_AS_STRING(protected)
        cdef size_t plen = len(protected)
        cdef size_t maxsig = dcc_signature_max_len(self._pkey, self.alg)
        cdef uint8_t *tbs = <uint8_t *>malloc(dcc_sig_structure_len(plen, batch.maxlen))
        cdef uint8_t *sigs = <uint8_t *>malloc(max(batch.n, 1) * maxsig)
        cdef size_t *siglens = <size_t *>malloc(max(batch.n, 1) * sizeof(size_t))
        cdef dcc_signer signer
        cdef int opened = 0
        cdef int rc = DCC_OK
        cdef int pooled
        cdef Py_ssize_t i
        cdef size_t tbslen
        cdef uint8_t digest[32]
        cdef dcc_pool *held = self._use_pool()
        cdef dcc_pool *pool = held
        cdef dcc_pool_work *work = NULL
        if pool != NULL:
            work = dcc_pool_work_new()
            if work == NULL:
                pool = NULL  # no scratch: sign the ordinary way
        try:
            if tbs == NULL or sigs == NULL or siglens == NULL:
                raise MemoryError()
            with nogil:
                # The refill waits until we are done; a forked child signs without the pool.
                if pool != NULL and not dcc_pool_enter(pool):
                    pool = NULL
                for i in range(batch.n):
                    tbslen = dcc_sig_structure(prot, plen, batch.ptrs[i], batch.lens[i], tbs)
                    pooled = 0
                    if pool != NULL:
                        if not dcc_sha256(tbs, tbslen, digest):
                            rc = DCC_ERR_SIGN
                            break
                        pooled = dcc_pool_sign(pool, work, digest, sigs + i * maxsig)
                        if pooled < 0:
                            rc = DCC_ERR_SIGN
                            break
                        if pooled:
                            siglens[i] = 64
                        # 0: empty (each miss is counted; a refill may land mid-batch)
                    if not pooled:
                        if not opened:
                            rc = dcc_signer_open(&signer, self._pkey, self.alg)
                            if rc != DCC_OK:
                                break
                            opened = 1
                        if pool != NULL:  # a miss: the digest is already there
                            rc = dcc_sign_digest(&signer, digest, sigs + i * maxsig, &siglens[i])
                        else:
                            rc = dcc_sign_tbs(&signer, tbs, tbslen, sigs + i * maxsig,
                                              &siglens[i])
                        if rc != DCC_OK:
                            break
                if opened:
                    dcc_signer_close(&signer)
                if pool != NULL:
                    dcc_pool_leave(pool)
            if rc != DCC_OK:
                raise SigningError("OpenSSL failed to sign")
            return [PyBytes_FromStringAndSize(<char *>(sigs + i * maxsig), siglens[i])
                    for i in range(batch.n)]
        finally:
            dcc_pool_work_free(work)
            self._done_with_pool(held)
            free(tbs)
            free(sigs)
            free(siglens)

    # -- the nonce pool (ES256 only; see the reference for the contracts) -----------------

    def enable_nonce_pool(self, capacity, *, background=False) -> NoncePoolInfo:
        cdef char err[256]
        cdef int rc
        if type(capacity) is not int:
            raise TypeError("capacity must be an int")
        if self._pool != NULL:
            raise ValueError("this key already has a nonce pool")
        if self._retired != NULL:
            raise ValueError("the previous nonce pool is still in use by a signing call")
        if self.alg != ES256:
            raise ValueError("a nonce pool needs an ES256 key")
        if not 1 <= capacity <= (1 << 24):
            raise ValueError("nonce pool capacity must be 1 to 16777216 entries")
        self._pool = dcc_pool_new(self._pkey, capacity, err, sizeof(err))
        if self._pool == NULL:
            raise SigningError(err.decode("utf-8", "replace"))
        if background:
            rc = dcc_pool_start_refill(self._pool)
            if rc != 0:
                self.close_nonce_pool()
                raise SigningError(f"cannot start the refill thread: {_os.strerror(rc)}")
        return self.nonce_pool_info()

    def refill_nonce_pool(self, max_entries=64) -> int:
        cdef size_t want, added
        cdef dcc_pool *pool
        if type(max_entries) is not int or max_entries < 0:
            raise ValueError("max_entries must be an int >= 0")
        if self._pool == NULL:
            raise ValueError("this key has no nonce pool")
        want = max_entries
        pool = self._use_pool()
        try:
            with nogil:
                added = dcc_pool_refill(pool, want)
        finally:
            self._done_with_pool(pool)
        if added == <size_t>-1:
            raise SigningError("OpenSSL failed to compute nonce pool entries")
        return added

    def nonce_pool_info(self):
        cdef dcc_pool_info info
        if self._pool == NULL:
            return None
        dcc_pool_info_get(self._pool, &info)
        return NoncePoolInfo(
            info.capacity, info.level, info.refilled, info.spent, info.misses, info.discarded,
            bool(info.locked),
            None if info.locked else _os.strerror(info.lock_errno),
            bool(info.dontdump), bool(info.wipeonfork), bool(info.orphaned),
            _REFILL_POLICY.get(info.refill_policy),
        )

    def clear_nonce_pool(self) -> None:
        if self._pool != NULL:
            dcc_pool_clear(self._pool)

    def close_nonce_pool(self) -> None:
        cdef dcc_pool *pool = self._pool
        if pool == NULL:
            return
        self._pool = NULL
        if self._pool_users > 0:
            dcc_pool_clear(pool)  # wiped now; freed by the last call still using it
            self._retired = pool  # NULL before: enable_nonce_pool refuses while one is held
            return
        with nogil:  # joins the refill thread, which may be finishing a chunk
            dcc_pool_free(pool)

    def _nonce_pool_residue(self) -> int:
        if self._pool == NULL:
            raise ValueError("this key has no nonce pool")
        return dcc_pool_residue(self._pool)


# ----------------------------------------------------------------------------- HC1

cdef list _hc1_batch(SigningKey key, bytes protected, _Batch batch, _Batch sigs, int level):
    """Shared loop of hc1_encode (sigs given) and hc1_sign (key given)."""
    cdef const uint8_t *prot = <const uint8_t *>PyBytes_AS_STRING(protected)
    cdef size_t plen = PyBytes_GET_SIZE(protected)
    cdef size_t maxsig = 0
    cdef Py_ssize_t i, n = batch.n
    if key is not None:
        maxsig = dcc_signature_max_len(key._pkey, key.alg)
    else:
        for i in range(n):
            if sigs.lens[i] > maxsig:
                maxsig = sigs.lens[i]
    cdef size_t *offs = <size_t *>malloc((n + 1) * sizeof(size_t))
    cdef size_t *outlens = <size_t *>malloc(max(n, 1) * sizeof(size_t))
    if offs == NULL or outlens == NULL:
        free(offs)
        free(outlens)
        raise MemoryError()
    offs[0] = 0
    for i in range(n):
        offs[i + 1] = offs[i] + dcc_hc1_max_len(plen, batch.lens[i], maxsig)
    cdef char *arena = <char *>malloc(offs[n] if offs[n] else 1)
    cdef uint8_t *scratch = <uint8_t *>malloc(dcc_hc1_scratch_len(plen, batch.maxlen, maxsig))
    cdef uint8_t *tbs = NULL
    cdef uint8_t *sig = NULL
    cdef const uint8_t *sigp
    cdef size_t siglen = 0, tbslen
    cdef const char *err = NULL
    cdef dcc_signer signer
    cdef int rc = DCC_OK, sign_failed = 0
    cdef EVP_PKEY *pkey = NULL
    cdef int alg = 0
    if key is not None:
        pkey = key._pkey
        alg = key.alg
        tbs = <uint8_t *>malloc(dcc_sig_structure_len(plen, batch.maxlen))
        sig = <uint8_t *>malloc(maxsig)
    try:
        if arena == NULL or scratch == NULL or (key is not None and (tbs == NULL or sig == NULL)):
            raise MemoryError()
        with nogil:
            if pkey != NULL:
                rc = dcc_signer_open(&signer, pkey, alg)
                sign_failed = rc != DCC_OK
            if rc == DCC_OK:
                for i in range(n):
                    if pkey != NULL:
                        tbslen = dcc_sig_structure(prot, plen, batch.ptrs[i], batch.lens[i], tbs)
                        rc = dcc_sign_tbs(&signer, tbs, tbslen, sig, &siglen)
                        if rc != DCC_OK:
                            sign_failed = 1
                            break
                        sigp = sig
                    else:
                        sigp = sigs.ptrs[i]
                        siglen = sigs.lens[i]
                    rc = dcc_hc1_encode_one(prot, plen, batch.ptrs[i], batch.lens[i], sigp,
                                            siglen, level, scratch, arena + offs[i],
                                            &outlens[i], &err)
                    if rc != DCC_OK:
                        break
                if pkey != NULL:
                    dcc_signer_close(&signer)
        if sign_failed:
            raise SigningError("OpenSSL failed to sign")
        if rc != DCC_OK:
            raise ZlibError(err.decode("ascii") if err != NULL else "zlib failed")
        return [PyUnicode_DecodeASCII(arena + offs[i], outlens[i], NULL) for i in range(n)]
    finally:
        free(offs)
        free(outlens)
        free(arena)
        free(scratch)
        free(tbs)
        free(sig)


def hc1_encode(protected, payloads, signatures, level=9) -> list:
    _check_level(level)
    cdef _Batch batch = _Batch(_bytes_items(payloads, "payload"))
    cdef _Batch sigs = _Batch(_bytes_items(signatures, "signature"))
    if sigs.n != batch.n:
        raise ValueError(f"{batch.n} payloads but {sigs.n} signatures")
    if type(protected) is not bytes:
        raise TypeError("protected must be bytes")
    return _hc1_batch(None, protected, batch, sigs, level)


def hc1_sign(SigningKey key not None, protected, payloads, level=9) -> list:
    _check_level(level)
    check_protected(key.alg, protected)
    cdef _Batch batch = _Batch(_bytes_items(payloads, "payload"))
    return _hc1_batch(key, protected, batch, None, level)


# ----------------------------------------------------------------------------- keyd

cdef extern from "keydcore.h" nogil:
    ctypedef struct dcc_cwt_facts:
        char iss[2]
        int64_t exp, iat
        char type
        size_t ci_off, ci_len
    int dcc_cwt_facts_read(const uint8_t *buf, size_t len, dcc_cwt_facts *facts,
                           const char **err)
    ctypedef struct dcc_audit_common:
        const char *head
        size_t head_len
        const char *middle
        size_t middle_len
        const char *time
        size_t time_len
    size_t dcc_audit_line_max(const dcc_audit_common *c)
    size_t dcc_audit_issue_line(const dcc_audit_common *c, const char *iss, const uint8_t *uvci,
                                size_t uvci_len, char type, const uint8_t *payload,
                                size_t payload_len, const uint8_t *signed_part,
                                size_t signed_len, uint64_t seq, const char *prev,
                                uint8_t *scratch, char *out, char *next_prev)

from ._audit_py import MAX_UVCI_CHARS, check_arguments as _check_audit_arguments


def cwt_facts(payloads) -> list:
    cdef _Batch batch = _Batch(_bytes_items(payloads, "payload"))
    cdef Py_ssize_t n = batch.n, i
    cdef dcc_cwt_facts *facts = <dcc_cwt_facts *>malloc(max(n, 1) * sizeof(dcc_cwt_facts))
    cdef int *rcs = <int *>malloc(max(n, 1) * sizeof(int))
    cdef const char **errs = <const char **>malloc(max(n, 1) * sizeof(char *))
    cdef const uint8_t *p
    try:
        if facts == NULL or rcs == NULL or errs == NULL:
            raise MemoryError()
        with nogil:
            for i in range(n):
                errs[i] = NULL
                rcs[i] = dcc_cwt_facts_read(batch.ptrs[i], batch.lens[i], &facts[i], &errs[i])
        out = []
        for i in range(n):
            if rcs[i] == DCC_OK:
                p = batch.ptrs[i]
                out.append(CwtFacts(
                    PyUnicode_DecodeASCII(facts[i].iss, 2, NULL),
                    facts[i].exp,
                    facts[i].iat,
                    chr(facts[i].type),
                    PyUnicode_DecodeASCII(<const char *>p + facts[i].ci_off, facts[i].ci_len,
                                          NULL),
                ))
            elif rcs[i] == DCC_ERR_SHAPE:
                out.append(errs[i].decode("ascii"))
            else:
                out.append("not one CBOR item: " + errs[i].decode("ascii"))
        return out
    finally:
        free(facts)
        free(rcs)
        free(errs)


def audit_issue_lines(head, middle, time, alg, isses, uvcis, dcc_types, payloads, signatures,
                      seq, prev, first_index=0) -> tuple:
    payloads = tuple(payloads)
    return audit_issue_groups((head,), (middle,), (len(payloads),), time, alg, isses, uvcis,
                              dcc_types, payloads, signatures, seq, prev, first_index)


def audit_issue_groups(heads, middles, sizes, time, alg, isses, uvcis, dcc_types, payloads,
                       signatures, seq, prev, first_index=0) -> tuple:
    # One set of argument checks for both implementations (same errors, same messages).
    heads, middles, sizes, isses, raws, pays, sigs = _check_audit_arguments(
        heads, middles, sizes, time, alg, isses, uvcis, dcc_types, payloads, signatures, seq,
        prev, first_index)
    cdef Py_ssize_t n = len(pays), groups = len(sizes), i, g, start, end
    cdef bint es256 = alg == ES256
    cdef _Batch pay_b = _Batch(pays)
    cdef _Batch sig_b = _Batch(sigs)
    cdef _Batch uvci_b = _Batch(raws)
    cdef bytes iss_all = "".join(isses).encode("ascii")
    cdef bytes types_b = dcc_types.encode("ascii")
    cdef const char *iss_c = PyBytes_AS_STRING(iss_all)
    cdef const char *types_c = PyBytes_AS_STRING(types_b)
    cdef dcc_audit_common *common = <dcc_audit_common *>malloc(
        max(groups, 1) * sizeof(dcc_audit_common))
    cdef Py_ssize_t *ends = <Py_ssize_t *>malloc(max(groups, 1) * sizeof(Py_ssize_t))
    cdef size_t line_max = 0
    cdef char *arena = NULL
    cdef size_t *lens = NULL
    cdef uint8_t *scratch = NULL
    cdef char chain[64]
    cdef uint64_t first_seq = seq
    cdef bytes prev_b = prev.encode("ascii")
    memcpy(chain, PyBytes_AS_STRING(prev_b), 64)
    cdef int failed = 0
    try:
        if common == NULL or ends == NULL:
            raise MemoryError()
        end = 0
        for g in range(groups):
            # heads and middles are a tuple of bytes, alive for the whole call
            common[g].head = PyBytes_AS_STRING(heads[g])
            common[g].head_len = len(heads[g])
            common[g].middle = PyBytes_AS_STRING(middles[g])
            common[g].middle_len = len(middles[g])
            common[g].time = PyBytes_AS_STRING(time)
            common[g].time_len = len(time)
            line_max = max(line_max, dcc_audit_line_max(&common[g]))
            end += sizes[g]
            ends[g] = end
        arena = <char *>malloc(max(n, 1) * line_max)
        lens = <size_t *>malloc(max(n, 1) * sizeof(size_t))
        scratch = <uint8_t *>malloc(2 + uvci_b.maxlen)
        if arena == NULL or lens == NULL or scratch == NULL:
            raise MemoryError()
        with nogil:
            start = 0
            for g in range(groups):
                for i in range(start, ends[g]):
                    lens[i] = dcc_audit_issue_line(
                        &common[g], iss_c + 2 * i, uvci_b.ptrs[i], uvci_b.lens[i], types_c[i],
                        pay_b.ptrs[i], pay_b.lens[i], sig_b.ptrs[i],
                        32 if es256 else sig_b.lens[i], first_seq + i, chain, scratch,
                        arena + i * line_max, chain)
                    if lens[i] == 0:
                        failed = 1
                        break
                if failed:
                    break
                start = ends[g]
        if failed:
            raise RuntimeError("OpenSSL failed to compute SHA-256")
        lines = [PyBytes_FromStringAndSize(arena + i * line_max, lens[i]) for i in range(n)]
        return lines, PyUnicode_DecodeASCII(chain, 64, NULL)
    finally:
        free(common)
        free(ends)
        free(arena)
        free(lens)
        free(scratch)
include "_walker.pxi"
include "_spantable.pxi"
include "_keydcols.pxi"
include "_dccvalidate.pxi"
include "_loadgen.pxi"
include "_pool.pxi"
include "_smalldeflate.pxi"
include "_quota.pxi"
