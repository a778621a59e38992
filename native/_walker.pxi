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


def splice_payloads(view, prefixes, prefix_of) -> SplicedPayloads:
    cdef tuple pre
    pre, idx_view = _check_splice_arguments(view, prefixes, prefix_of, False)
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
        return SplicedPayloads(out, offsets, len(slow))
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

import cbor2 as _cbor2

from ._reply_py import check_reply_arguments as _check_reply_arguments
from ._reply_py import first_bad_refusal as _first_bad_refusal
from ._reply_py import hc1_too_long as _hc1_too_long
from ._reply_py import refusal_map as _refusal_map
from ..protocol.wire import BodyError as _BodyError


def encode_sign_batch_result(protected, kids, protected_of, payloads, payload_offsets,
                             signatures, signature_offsets, refusals, level=9, *,
                             single=False) -> bytes:
    cdef tuple pre, kidt
    pre, kidt, idx_v, pay_v, sig_v = _check_reply_arguments(
        protected, kids, protected_of, payloads, payload_offsets, signatures,
        signature_offsets, refusals, level, single, False)
    cdef const uint32_t[::1] idx = idx_v
    cdef const uint32_t[::1] pay_off = pay_v
    cdef const uint32_t[::1] sig_off = sig_v
    cdef uint32_t count = len(idx_v), i, bad = 0
    cdef int lvl = level, one = bool(single), rc
    bad_refusal = None
    cdef Py_ssize_t npre = len(pre), k
    cdef const uint8_t **ppre = <const uint8_t **>malloc(max(npre, 1) * sizeof(uint8_t *))
    cdef size_t *plen = <size_t *>malloc(max(npre, 1) * sizeof(size_t))
    cdef const uint8_t **pkid = <const uint8_t **>malloc(max(npre, 1) * sizeof(uint8_t *))
    cdef const uint8_t **ref = <const uint8_t **>malloc(count * sizeof(uint8_t *))
    cdef size_t *reflen = <size_t *>malloc(count * sizeof(size_t))
    cdef uint8_t *scratch = NULL
    cdef char *hc1 = NULL
    cdef uint8_t *out = NULL
    cdef size_t maxplen = 0, maxpay = 0, maxsig = 0, cap, outlen = 0
    cdef const char *err = NULL
    cdef list encoded = []
    cdef const uint8_t *payp = <const uint8_t *>PyBytes_AS_STRING(payloads)
    cdef const uint8_t *sigp = <const uint8_t *>PyBytes_AS_STRING(signatures)
    cdef Py_ssize_t unsigned_items = 0
    cdef bint bad_columns = False
    try:
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
        bad_refusal = _first_bad_refusal(refusals, one)
        if ppre == NULL or plen == NULL or pkid == NULL or ref == NULL or reflen == NULL:
            raise MemoryError()
        for k in range(npre):
            ppre[k] = <const uint8_t *>PyBytes_AS_STRING(pre[k])
            plen[k] = PyBytes_GET_SIZE(pre[k])
            pkid[k] = <const uint8_t *>PyBytes_AS_STRING(kidt[k])
            if plen[k] > maxplen:
                maxplen = plen[k]
        for i in range(count):
            ref[i] = NULL
            reflen[i] = 0
            if idx[i] == REPLY_NONE:
                if bad_refusal is not None and i >= bad_refusal[0]:
                    continue  # not encoded: the body is refused at or before it
                m = _cbor2.dumps(_refusal_map(refusals[i]))  # refused items only
                encoded.append(m)
                ref[i] = <const uint8_t *>PyBytes_AS_STRING(m)
                reflen[i] = PyBytes_GET_SIZE(m)
            else:
                maxpay = max(maxpay, pay_off[i + 1] - pay_off[i])
                maxsig = max(maxsig, sig_off[i + 1] - sig_off[i])
        if bad_refusal is not None:
            count = bad_refusal[0]  # encode up to it: an earlier long HC1 is named first
        cap = reply_max_len(count, &idx[0], plen, &pay_off[0], &sig_off[0], reflen)
        scratch = <uint8_t *>malloc(dcc_hc1_scratch_len(maxplen, maxpay, maxsig))
        hc1 = <char *>malloc(dcc_hc1_max_len(maxplen, maxpay, maxsig))
        out = <uint8_t *>malloc(cap)
        if scratch == NULL or hc1 == NULL or out == NULL:
            raise MemoryError()
        with nogil:
            rc = reply_encode(count, one, &idx[0], ppre, plen, pkid, payp, &pay_off[0], sigp,
                              &sig_off[0], ref, reflen, lvl, scratch, hc1, out, &outlen, &bad,
                              &err)
        if rc == WALK_REFUSED:
            raise _BodyError(_hc1_too_long(bad, one))
        if rc != DCC_OK:
            raise ZlibError(err.decode("ascii") if err != NULL else "zlib failed")
        if bad_refusal is not None:
            raise _BodyError(bad_refusal[1])
        return PyBytes_FromStringAndSize(<char *>out, outlen)
    finally:
        free(ppre)
        free(plen)
        free(pkid)
        free(ref)
        free(reflen)
        free(scratch)
        free(hc1)
        free(out)
