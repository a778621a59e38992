# ----------------------------------------------------------------------------- request walker
# (included by _native.pyx; the reference and the contract: _walker_py.py)

from libc.stdint cimport uint32_t

cdef extern from "walker.h" nogil:
    int WALK_OK, WALK_REFUSED, WALK_NEED_EXTRA, WALK_NOMEM, WALK_NFIELDS
    int walk_check(const uint8_t *buf, size_t len, uint64_t max_items, int max_depth)
    int walk_locate(const uint8_t *buf, size_t len, int single, size_t *items_off,
                    uint32_t *count)
    int walk_items(const uint8_t *buf, size_t len, size_t items_off, uint32_t count, int single,
                   uint32_t *out, uint8_t *extra, size_t *extra_len)

from ..protocol.wire import MAX_DEPTH as _WIRE_MAX_DEPTH, body_item_limit as _body_item_limit
from ._walker_py import BatchView, check_walk_arguments as _check_walk_arguments
from ._walker_py import walk_sign_batch as _walk_reference


cdef object _walk_refused(bytes body, max_batch, bint single):
    # The cold path: the twin names the rule with the codec's message and code. A twin that
    # accepts what C refused is a bug in one of them, never a reason to go on.
    _walk_reference(body, max_batch, single=single)
    raise RuntimeError("walk_sign_batch: the native walker refused a body the reference accepts")


def walk_sign_batch(body, max_batch, *, single=False) -> BatchView:
    _check_walk_arguments(body, max_batch)
    cdef bint one = bool(single)
    cdef const uint8_t *buf = <const uint8_t *>PyBytes_AS_STRING(body)
    cdef size_t n = PyBytes_GET_SIZE(body)
    cdef uint64_t limit = _body_item_limit(max_batch)
    cdef int depth = _WIRE_MAX_DEPTH, rc
    cdef uint32_t batch = max_batch, count = 0
    cdef size_t items_off = 0, extra_len = 0
    with nogil:
        rc = walk_check(buf, n, limit, depth)
        if rc == WALK_OK:
            rc = walk_locate(buf, n, one, &items_off, &count)
    if rc == WALK_NOMEM:
        raise MemoryError()
    if rc != WALK_OK or count > batch:
        _walk_refused(body, max_batch, one)
    cdef bytes columns = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>count * WALK_NFIELDS * 4)
    cdef uint32_t *out = <uint32_t *>PyBytes_AS_STRING(columns)
    cdef bytes data = body
    cdef object extra_obj
    cdef uint8_t *extra
    with nogil:
        rc = walk_items(buf, n, items_off, count, one, out, NULL, &extra_len)
    if rc == WALK_NEED_EXTRA:
        # Some field string came in chunks: join them after a copy of the body (rare).
        extra_obj = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(2 * n))
        extra = <uint8_t *>PyBytes_AS_STRING(extra_obj)
        memcpy(extra, buf, n)
        with nogil:
            rc = walk_items(buf, n, items_off, count, one, out, extra + n, &extra_len)
        if rc == WALK_OK:
            data = extra_obj[:n + extra_len]
    if rc != WALK_OK:
        _walk_refused(body, max_batch, one)
    return BatchView(data, n, count, columns)


# ----------------------------------------------------------------------------- claims splice
# (the reference and the contract: _splice_py.py)

cdef extern from "walker.h" nogil:
    uint32_t SPLICE_NONE
    int splice_canonical(const uint8_t *buf, size_t len)
    size_t splice_size(uint32_t count, const uint32_t *prefix_of, const size_t *prefix_len,
                       const size_t *srclen)
    void splice_assemble(uint32_t count, const uint32_t *prefix_of,
                         const uint8_t *const *prefix, const size_t *prefix_len,
                         const uint8_t *const *src, const size_t *srclen, uint8_t *out,
                         uint32_t *offsets)

from ._splice_py import SplicedPayloads, check_splice_arguments as _check_splice_arguments
from ._splice_py import reencode as _reencode


from array import array as _u32_array_type


cdef inline bint _is_u32_array(object value):
    return isinstance(value, _u32_array_type) and value.typecode == "I"


cdef tuple _splice_fast_arguments(object view, object prefixes, object prefix_of):
    """(prefixes, prefix_of) when the reference's per-call rules hold at a glance (bytes
    prefixes, an ``array('I')`` of one entry per item), else None: the reference then checks
    and names the problem. The data plane splices once per kid of every frame."""
    if type(view) is not BatchView or not _is_u32_array(prefix_of):
        return None
    cdef tuple pre = tuple(prefixes)
    for p in pre:
        if type(p) is not bytes:
            return None
    if len(prefix_of) != view.count:
        return None
    return pre, prefix_of


def splice_payloads(view, prefixes, prefix_of) -> SplicedPayloads:
    cdef tuple pre
    fast = _splice_fast_arguments(view, prefixes, prefix_of)
    if fast is None:
        pre, idx_view = _check_splice_arguments(view, prefixes, prefix_of, False)
    else:
        pre, idx_view = fast
    cdef const uint32_t[::1] idx = idx_view
    cdef const uint32_t[::1] cols = memoryview(view.columns).cast("I")
    cdef bytes data = view.data
    cdef const uint8_t *base = <const uint8_t *>PyBytes_AS_STRING(data)
    cdef uint32_t count = view.count, i
    cdef Py_ssize_t npre = len(pre), k
    cdef const uint8_t **src = <const uint8_t **>malloc(max(count, 1) * sizeof(uint8_t *))
    cdef size_t *srclen = <size_t *>malloc(max(count, 1) * sizeof(size_t))
    cdef const uint8_t **ppre = <const uint8_t **>malloc(max(npre, 1) * sizeof(uint8_t *))
    cdef size_t *plen = <size_t *>malloc(max(npre, 1) * sizeof(size_t))
    cdef uint8_t *canon = <uint8_t *>malloc(max(count, 1))
    cdef list slow = []
    cdef size_t total
    cdef bytes out, offsets
    cdef uint8_t *outp
    cdef uint32_t *offp
    cdef uint32_t npay, at, longest
    cdef uint32_t[::1] rows_v, ends_v
    try:
        if src == NULL or srclen == NULL or ppre == NULL or plen == NULL or canon == NULL:
            raise MemoryError()
        for k in range(npre):
            ppre[k] = <const uint8_t *>PyBytes_AS_STRING(pre[k])
            plen[k] = PyBytes_GET_SIZE(pre[k])
        for i in range(count):  # the per-item rule, in C; the reference names the offender
            if idx[i] != SPLICE_NONE and idx[i] >= <uint32_t>npre:
                _check_splice_arguments(view, prefixes, prefix_of)
        with nogil:
            for i in range(count):
                src[i] = base + cols[i * WALK_NFIELDS + 0]
                srclen[i] = cols[i * WALK_NFIELDS + 1]
                canon[i] = 1
                if idx[i] != SPLICE_NONE:
                    canon[i] = splice_canonical(src[i], srclen[i])
        for i in range(count):
            if not canon[i]:  # the slow path: decode, NFC, re-encode (module doc)
                again = _reencode(data[src[i] - base:src[i] - base + srclen[i]])
                slow.append(again)
                src[i] = <const uint8_t *>PyBytes_AS_STRING(again)
                srclen[i] = PyBytes_GET_SIZE(again)
        total = splice_size(count, &idx[0] if count else NULL, plen, srclen)
        if total > 0xFFFFFFFF:
            raise ValueError("the payloads of one frame exceed 4 GiB")
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>total)
        offsets = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(4 * (count + 1)))
        outp = <uint8_t *>PyBytes_AS_STRING(out)
        offp = <uint32_t *>PyBytes_AS_STRING(offsets)
        with nogil:
            splice_assemble(count, &idx[0] if count else NULL, ppre, plen, src, srclen, outp,
                            offp)
        # keyd's view of the same: the rows with a payload, their ends, the longest
        npay = 0
        for i in range(count):
            if idx[i] != SPLICE_NONE:
                npay += 1
        rows = _u32_array_type("I", bytes(4 * npay))
        ends = _u32_array_type("I", bytes(4 * npay))
        longest = 0
        if npay:
            rows_v = rows
            ends_v = ends
            with nogil:
                at = 0
                for i in range(count):
                    if idx[i] != SPLICE_NONE:
                        rows_v[at] = i
                        ends_v[at] = offp[i + 1]
                        if offp[i + 1] - offp[i] > longest:
                            longest = offp[i + 1] - offp[i]
                        at += 1
        return SplicedPayloads(out, offsets, len(slow), rows, ends, longest)
    finally:
        free(src)
        free(srclen)
        free(ppre)
        free(plen)
        free(canon)


# ----------------------------------------------------------------------------- reply body
# (the reference and the contract: _reply_py.py)

cdef extern from "walker.h" nogil:
    uint32_t REPLY_NONE
    size_t reply_max_len(uint32_t count, const uint32_t *prot_of, const size_t *prot_len,
                         const uint32_t *pay_off, const uint32_t *sig_off,
                         const size_t *refusal_len)
    int reply_encode(uint32_t count, int single, const uint32_t *prot_of,
                     const uint8_t *const *prot, const size_t *prot_len,
                     const uint8_t *const *kid, const uint8_t *pay, const uint32_t *pay_off,
                     const uint8_t *sig, const uint32_t *sig_off,
                     const uint8_t *const *refusal, const size_t *refusal_len, int level,
                     uint8_t *scratch, char *hc1, uint8_t *out, size_t *outlen, uint32_t *bad,
                     const char **err)

cdef extern from "jobpool.h" nogil:
    ctypedef struct dcc_job:
        void (*run)(dcc_job *job) noexcept nogil
        dcc_job *next
        void *owner
    ctypedef struct dcc_jobpool:
        pass
    dcc_jobpool *dcc_jobpool_new(int threads, const char *name, int *err)
    int dcc_jobpool_fd(const dcc_jobpool *pool)
    void dcc_jobpool_submit(dcc_jobpool *pool, dcc_job *job)
    dcc_job *dcc_jobpool_collect(dcc_jobpool *pool)
    void dcc_jobpool_stop(dcc_jobpool *pool)
    void dcc_jobpool_free(dcc_jobpool *pool)

import cbor2 as _cbor2

from ._reply_py import check_reply_arguments as _check_reply_arguments
from ._reply_py import first_bad_refusal as _first_bad_refusal
from ._reply_py import hc1_too_long as _hc1_too_long
from ._reply_py import refusal_map as _refusal_map
from ..protocol.wire import BodyError as _BodyError


def encode_sign_batch_result(protected, kids, protected_of, payloads, payload_offsets,
                             signatures, signature_offsets, refusals, level=9, *,
                             single=False) -> bytes:
    cdef ReplyJob job = _reply_job(protected, kids, protected_of, payloads, payload_offsets,
                                   signatures, signature_offsets, refusals, level, single)
    with nogil:
        _reply_run(&job.a.job)
    return job.result()


cdef struct reply_args:
    dcc_job job  # first member: the pool's dcc_job * is this struct's address
    uint32_t count
    int single
    int level
    const uint32_t *idx
    const uint8_t **ppre
    size_t *plen
    const uint8_t **pkid
    const uint8_t *payp
    const uint32_t *pay_off
    const uint8_t *sigp
    const uint32_t *sig_off
    const uint8_t **ref
    size_t *reflen
    uint8_t *scratch
    char *hc1
    uint8_t *out
    size_t outlen
    uint32_t bad
    const char *err
    int rc
    int ran


cdef void _reply_run(dcc_job *job) noexcept nogil:
    cdef reply_args *a = <reply_args *>job
    a.rc = reply_encode(a.count, a.single, a.idx, a.ppre, a.plen, a.pkid, a.payp, a.pay_off,
                        a.sigp, a.sig_off, a.ref, a.reflen, a.level, a.scratch, a.hc1, a.out,
                        &a.outlen, &a.bad, &a.err)
    a.ran = 1


cdef class ReplyJob:
    """One reply body being encoded (:meth:`ReplyPool.submit_encode`): its inputs held
    (their buffers are read without the GIL), its C buffers owned."""

    cdef reply_args a
    cdef tuple keep  # the bytes objects the pointers of `a` point into
    cdef const uint32_t[::1] idx_v, pay_v, sig_v  # buffer exports: the arrays cannot resize
    cdef object bad_refusal

    def __dealloc__(self):
        free(self.a.ppre)
        free(self.a.plen)
        free(self.a.pkid)
        free(self.a.ref)
        free(self.a.reflen)
        free(self.a.scratch)
        free(self.a.hc1)
        free(self.a.out)

    def result(self) -> bytes:
        """The body, or the error :func:`encode_sign_batch_result` raises for these
        arguments (BodyError, ZlibError)."""
        if not self.a.ran:
            raise RuntimeError("the reply has not been encoded yet")
        if self.a.rc == WALK_REFUSED:
            raise _BodyError(_hc1_too_long(self.a.bad, self.a.single))
        if self.a.rc != DCC_OK:
            raise ZlibError(self.a.err.decode("ascii") if self.a.err != NULL else "zlib failed")
        if self.bad_refusal is not None:
            raise _BodyError(self.bad_refusal[1])
        return PyBytes_FromStringAndSize(<char *>self.a.out, self.a.outlen)


cdef tuple _reply_fast_arguments(protected, kids, protected_of, payloads, payload_offsets,
                                 signatures, signature_offsets, refusals, level, single):
    """The reference's per-call rules (``check_reply_arguments`` without the per-item ones)
    checked without calling into Python, for the usual arguments (lists or tuples of bytes,
    ``array('I')`` columns, a dict of refusals); None when anything is unusual or wrong: the
    reference then checks and names the problem. Returns what the reference returns."""
    if type(level) is not int or not -1 <= level <= 9:
        return None
    if type(payloads) is not bytes or type(signatures) is not bytes or type(refusals) is not dict:
        return None
    if not (_is_u32_array(protected_of) and _is_u32_array(payload_offsets)
            and _is_u32_array(signature_offsets)):
        return None
    cdef tuple pre = tuple(protected), kidt = tuple(kids)
    if len(pre) != len(kidt):
        return None
    for p in pre:
        if type(p) is not bytes:
            return None
    for k in kidt:
        if type(k) is not bytes or len(<bytes>k) != 8:
            return None
    cdef Py_ssize_t count = len(protected_of)
    if count < 1 or (single and count != 1):
        return None
    cdef const uint32_t[::1] pay = payload_offsets
    cdef const uint32_t[::1] sig = signature_offsets
    if len(payload_offsets) != count + 1 or len(signature_offsets) != count + 1:
        return None
    if pay[0] != 0 or pay[count] > PyBytes_GET_SIZE(payloads):
        return None
    if sig[0] != 0 or sig[count] > PyBytes_GET_SIZE(signatures):
        return None
    for i in refusals:
        if type(i) is not int or not 0 <= i < count:
            return None
    return (pre, kidt, memoryview(protected_of).cast("B").cast("I"),
            memoryview(payload_offsets).cast("B").cast("I"),
            memoryview(signature_offsets).cast("B").cast("I"))


cdef ReplyJob _reply_job(protected, kids, protected_of, payloads, payload_offsets, signatures,
                         signature_offsets, refusals, level, single):
    """The arguments checked (TypeError / ValueError as the reference) and turned into a job
    whose encoding needs no Python."""
    cdef tuple pre, kidt
    fast = _reply_fast_arguments(protected, kids, protected_of, payloads, payload_offsets,
                                 signatures, signature_offsets, refusals, level, single)
    if fast is None:
        pre, kidt, idx_v, pay_v, sig_v = _check_reply_arguments(
            protected, kids, protected_of, payloads, payload_offsets, signatures,
            signature_offsets, refusals, level, single, False)
    else:
        pre, kidt, idx_v, pay_v, sig_v = fast
    cdef ReplyJob job = ReplyJob.__new__(ReplyJob)
    job.idx_v = idx_v
    job.pay_v = pay_v
    job.sig_v = sig_v
    cdef const uint32_t[::1] idx = job.idx_v
    cdef const uint32_t[::1] pay_off = job.pay_v
    cdef const uint32_t[::1] sig_off = job.sig_v
    cdef uint32_t count = len(idx_v), i
    cdef Py_ssize_t npre = len(pre), k
    cdef reply_args *a = &job.a
    a.count = count
    a.single = bool(single)
    a.level = level
    a.ppre = <const uint8_t **>malloc(max(npre, 1) * sizeof(uint8_t *))
    a.plen = <size_t *>malloc(max(npre, 1) * sizeof(size_t))
    a.pkid = <const uint8_t **>malloc(max(npre, 1) * sizeof(uint8_t *))
    a.ref = <const uint8_t **>malloc(max(count, 1) * sizeof(uint8_t *))
    a.reflen = <size_t *>malloc(max(count, 1) * sizeof(size_t))
    cdef size_t maxplen = 0, maxpay = 0, maxsig = 0, cap
    cdef list encoded = []
    cdef Py_ssize_t unsigned_items = 0
    cdef bint bad_columns = False
    for i in range(count):  # the per-item rules, in C; the reference names the offender
        if pay_off[i] > pay_off[i + 1] or sig_off[i] > sig_off[i + 1]:
            bad_columns = True
        if idx[i] == REPLY_NONE:
            unsigned_items += 1
        elif idx[i] >= <uint32_t>npre:
            bad_columns = True
    # Refusal keys are distinct items in range (checked): they are exactly the unsigned
    # items when their numbers agree and each refusal's item is unsigned.
    if unsigned_items != len(refusals):
        bad_columns = True
    else:
        for r in refusals:
            if idx[<uint32_t>r] != REPLY_NONE:
                bad_columns = True
    if bad_columns:
        _check_reply_arguments(protected, kids, protected_of, payloads, payload_offsets,
                               signatures, signature_offsets, refusals, level, single)
        raise AssertionError("unreachable: the reference names the inconsistency")
    job.bad_refusal = _first_bad_refusal(refusals, a.single)
    if (a.ppre == NULL or a.plen == NULL or a.pkid == NULL or a.ref == NULL
            or a.reflen == NULL):
        raise MemoryError()
    for k in range(npre):
        a.ppre[k] = <const uint8_t *>PyBytes_AS_STRING(pre[k])
        a.plen[k] = PyBytes_GET_SIZE(pre[k])
        a.pkid[k] = <const uint8_t *>PyBytes_AS_STRING(kidt[k])
        if a.plen[k] > maxplen:
            maxplen = a.plen[k]
    for i in range(count):
        a.ref[i] = NULL
        a.reflen[i] = 0
        if idx[i] == REPLY_NONE:
            if job.bad_refusal is not None and i >= job.bad_refusal[0]:
                continue  # not encoded: the body is refused at or before it
            m = _cbor2.dumps(_refusal_map(refusals[i]))  # refused items only
            encoded.append(m)
            a.ref[i] = <const uint8_t *>PyBytes_AS_STRING(m)
            a.reflen[i] = PyBytes_GET_SIZE(m)
        else:
            maxpay = max(maxpay, pay_off[i + 1] - pay_off[i])
            maxsig = max(maxsig, sig_off[i + 1] - sig_off[i])
    if job.bad_refusal is not None:
        a.count = count = job.bad_refusal[0]  # an earlier long HC1 is named first
    a.idx = &idx[0]
    a.pay_off = &pay_off[0]
    a.sig_off = &sig_off[0]
    a.payp = <const uint8_t *>PyBytes_AS_STRING(payloads)
    a.sigp = <const uint8_t *>PyBytes_AS_STRING(signatures)
    job.keep = (pre, kidt, payloads, signatures, encoded)
    cap = reply_max_len(count, a.idx, a.plen, a.pay_off, a.sig_off, a.reflen)
    a.scratch = <uint8_t *>malloc(dcc_hc1_scratch_len(maxplen, maxpay, maxsig))
    a.hc1 = <char *>malloc(dcc_hc1_max_len(maxplen, maxpay, maxsig))
    a.out = <uint8_t *>malloc(cap)
    if a.scratch == NULL or a.hc1 == NULL or a.out == NULL:
        raise MemoryError()
    return job


from cpython.ref cimport Py_INCREF, Py_DECREF, PyObject
from ._jobpool_py import check_threads as _check_threads


cdef class ReplyPool:
    """Reply bodies encoded in C threads that never take the GIL (the reference and the
    contract: ``_jobpool_py.ReplyPool``)."""

    cdef dcc_jobpool *pool
    cdef readonly int threads
    cdef Py_ssize_t in_flight

    def __cinit__(self, threads=2):
        _check_threads(threads)
        cdef int err = 0
        self.pool = dcc_jobpool_new(threads, b"reply-encode", &err)
        if self.pool == NULL:
            raise OSError(err, _os.strerror(err))
        self.threads = threads

    def fileno(self) -> int:
        if self.pool == NULL:
            raise ValueError("the pool is closed")
        return dcc_jobpool_fd(self.pool)

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet collected."""
        return self.in_flight

    def submit_encode(self, protected, kids, protected_of, payloads, payload_offsets,
                      signatures, signature_offsets, refusals, level=9, *, single=False):
        if self.pool == NULL:
            raise ValueError("the pool is closed")
        cdef ReplyJob job = _reply_job(protected, kids, protected_of, payloads,
                                       payload_offsets, signatures, signature_offsets,
                                       refusals, level, single)
        job.a.job.run = _reply_run
        job.a.job.owner = <void *>job
        Py_INCREF(job)  # the pool's reference, given back by collect
        self.in_flight += 1
        dcc_jobpool_submit(self.pool, &job.a.job)
        return job

    def collect(self) -> list:
        if self.pool == NULL:
            raise ValueError("the pool is closed")
        return self._take(dcc_jobpool_collect(self.pool))

    cdef list _take(self, dcc_job *done):
        cdef list out = []
        cdef dcc_job *nxt
        while done != NULL:
            nxt = done.next
            job = <object>done.owner
            done.owner = NULL
            out.append(job)
            Py_DECREF(job)  # the pool's reference; `out` holds one now
            self.in_flight -= 1
            done = nxt
        return out

    def close(self) -> None:
        """Let the submitted jobs finish, stop the threads; jobs not collected are dropped."""
        if self.pool == NULL:
            return
        with nogil:
            dcc_jobpool_stop(self.pool)
        self._take(dcc_jobpool_collect(self.pool))
        dcc_jobpool_free(self.pool)
        self.pool = NULL

    def __dealloc__(self):
        if self.pool != NULL:
            with nogil:
                dcc_jobpool_stop(self.pool)
            self._take(dcc_jobpool_collect(self.pool))
            dcc_jobpool_free(self.pool)
            self.pool = NULL
