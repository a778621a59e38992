# keyd's per-item work over a batch in columns (SIGN_COLUMNS): see native/src/keydcols.h and
# the pure-Python twin native/_keydcols_py.py (contracts, exceptions, messages).

from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.math cimport ceil, floor
from libc.stdint cimport uint32_t
from libc.string cimport memset

cdef extern from "keydcols.h" nogil:
    ctypedef struct kc_limits:
        size_t max_payload
        int64_t not_before, not_after, latest_iat
        uint8_t allowed[3]
    void kc_check(const uint8_t *buf, const uint32_t *ends, size_t n, const uint32_t *client_ix,
                  const uint8_t *client_ok, const kc_limits *lim, uint8_t *codes,
                  uint8_t *facts, const char **errs, uint8_t *cbor_error)
    size_t kc_json_literal_max(size_t len)
    size_t kc_json_literal(const uint8_t *s, size_t len, char *out)
    ctypedef struct kc_text:
        const char *ptr
        size_t len
    ctypedef struct kc_audit_batch:
        const kc_text *clients
        const kc_text *accounts
        const kc_text *operators
        const uint32_t *client_ix
        const uint32_t *account_ix
        const uint32_t *operator_ix
        const char *alg
        const char *kid
        const char *time
        size_t time_len
        const uint8_t *payloads
        const uint32_t *ends
        const uint8_t *facts
        int es256
    size_t kc_audit_line_bound(const kc_audit_batch *b, uint32_t item)
    size_t kc_audit_scratch_len(const kc_audit_batch *b, uint32_t item)
    size_t kc_audit_lines(const kc_audit_batch *b, const uint32_t *sel, size_t nsel,
                          const uint8_t *sigs, const uint32_t *sig_ends, uint64_t seq,
                          char *prev, char *head, char *middle, char *out)
    int KC_FACT_SIZE

from ._keydcols_py import (
    BAD_FACTS as _BAD_FACTS,
    UVCI_MAX as _UVCI_MAX,
    ES256_LENGTH as _ES256_LENGTH,
    FACT as _FACT,
    MAX_TEXT as _KC_MAX_TEXT,
    NO_FACTS as _NO_FACTS,
    TEXT_INVALID as _TEXT_INVALID,
    TEXT_NOT_UNICODE as _TEXT_NOT_UNICODE,
    check_audit_arguments as _check_kc_audit,
    check_columns_arguments as _check_kc_columns,
)

assert _FACT.size == KC_FACT_SIZE


cdef const uint32_t *_u32_ptr(object column, Py_ssize_t *n) except? NULL:
    """A C view of an array('I') (the caller keeps the array alive and unchanged)."""
    cdef const unsigned int[::1] view = column
    n[0] = view.shape[0]
    if n[0] == 0:
        return NULL
    return <const uint32_t *>&view[0]


cdef inline bint _exact_u32(object value):
    # the reference's rule: an array('I') itself, not a subclass
    return type(value) is _u32_array_type and value.typecode == "I"


cdef bint _u32_monotone(const uint32_t *v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(1, n):
        if v[i] < v[i - 1]:
            return False
    return True


cdef bint _u32_below(const uint32_t *v, Py_ssize_t n, Py_ssize_t bound) noexcept nogil:
    """Every value < *bound* (true for no values)."""
    cdef Py_ssize_t i
    for i in range(n):
        if v[i] >= bound:
            return False
    return True


# Bounds the fast paths below handle in C; beyond them the reference computes (and clamps).
cdef double _TIME_FAST = 4.0e18
_VTR_SUBSETS = frozenset(("", "v", "t", "r", "vt", "tv", "vr", "rv", "tr", "rt", "vtr", "vrt",
                          "tvr", "trv", "rvt", "rtv"))


cdef tuple _kc_columns_fast(payloads, ends, client_ix, client_ok, max_payload, not_before,
                            not_after, latest_iat, allowed):
    """What check_columns_arguments returns, computed in C, when its rules hold for the
    usual arguments (floats for the times, within +-4e18); None for anything else, which
    the reference then checks, computes or names (keyd calls this per message and kid)."""
    if type(payloads) is not bytes or type(client_ok) is not bytes:
        return None
    if not (_exact_u32(ends) and _exact_u32(client_ix)):
        return None
    if type(allowed) is not str or allowed not in _VTR_SUBSETS:
        return None
    if type(max_payload) is not int or not 0 <= max_payload < (1 << 62):
        return None
    if type(not_before) is not float or type(not_after) is not float:
        return None
    if type(latest_iat) is not float:
        return None
    cdef double nb = not_before, na = not_after, li = latest_iat
    if not (-_TIME_FAST < nb < _TIME_FAST and -_TIME_FAST < na < _TIME_FAST
            and -_TIME_FAST < li < _TIME_FAST):
        return None  # (NaN fails these too)
    cdef Py_ssize_t n, m
    cdef const uint32_t *e = _u32_ptr(ends, &n)
    cdef const uint32_t *c = _u32_ptr(client_ix, &m)
    if m != n:
        return None
    if n and (e[n - 1] != <size_t>PyBytes_GET_SIZE(payloads) or not _u32_monotone(e, n)
              or not _u32_below(c, n, PyBytes_GET_SIZE(client_ok))):
        return None
    return (max_payload, <int64_t>ceil(nb), <int64_t>floor(na), <int64_t>floor(li))


cdef bint _kc_audit_fast(time, alg, kid, clients, accounts, operators, client_ix, account_ix,
                         operator_ix, payloads, ends, facts, selected, signatures, sig_ends,
                         seq, prev):
    """True when check_audit_arguments' rules hold, checked in C for the usual arguments;
    False for anything else (the reference then checks and names the problem)."""
    if type(time) is not bytes or type(payloads) is not bytes or type(facts) is not bytes:
        return False
    if type(signatures) is not bytes or type(kid) is not bytes or len(kid) != 8:
        return False
    if not (_exact_u32(client_ix) and _exact_u32(account_ix) and _exact_u32(operator_ix)
            and _exact_u32(ends) and _exact_u32(selected) and _exact_u32(sig_ends)):
        return False
    if type(clients) is not tuple or type(accounts) is not tuple or type(operators) is not tuple:
        return False
    if not (<bytes>time).isascii():
        return False
    if type(alg) is not int or (alg != ES256 and alg != PS256):
        return False
    if type(seq) is not int or not 0 <= seq < (1 << 63):
        return False
    if type(prev) is not str or len(prev) != 64 or not _is_lower_hex(prev):
        return False
    cdef Py_ssize_t n, a, b, c, nsel, nse
    cdef const uint32_t *e = _u32_ptr(ends, &n)
    cdef const uint32_t *ci = _u32_ptr(client_ix, &a)
    cdef const uint32_t *ai = _u32_ptr(account_ix, &b)
    cdef const uint32_t *oi = _u32_ptr(operator_ix, &c)
    cdef const uint32_t *sel = _u32_ptr(selected, &nsel)
    cdef const uint32_t *se = _u32_ptr(sig_ends, &nse)
    if not (a == n and b == n and c == n) or PyBytes_GET_SIZE(facts) != n * KC_FACT_SIZE:
        return False
    if (e[n - 1] if n else 0) != <size_t>PyBytes_GET_SIZE(payloads) or not _u32_monotone(e, n):
        return False
    if nse != nsel:
        return False
    if (se[nse - 1] if nse else 0) != <size_t>PyBytes_GET_SIZE(signatures):
        return False
    if not _u32_monotone(se, nse) or not _u32_below(sel, nsel, n):
        return False
    if n and not (_u32_below(ci, n, len(clients)) and _u32_below(ai, n, len(accounts))
                  and _u32_below(oi, n, len(operators))):
        return False
    return True


cdef bint _is_lower_hex(str text):
    cdef Py_UCS4 ch
    for ch in text:
        if not ("0" <= ch <= "9" or "a" <= ch <= "f"):
            return False
    return True


def keyd_check_columns(payloads, ends, client_ix, client_ok, max_payload, not_before,
                       not_after, latest_iat, allowed) -> tuple:
    fast = _kc_columns_fast(payloads, ends, client_ix, client_ok, max_payload, not_before,
                            not_after, latest_iat, allowed)
    if fast is None:
        fast = _check_kc_columns(payloads, ends, client_ix, client_ok, max_payload,
                                 not_before, not_after, latest_iat, allowed)
    limit, nb, na, latest = fast
    cdef Py_ssize_t n, n2, i
    cdef const uint32_t *ends_p = _u32_ptr(ends, &n)
    cdef const uint32_t *cix_p = _u32_ptr(client_ix, &n2)
    cdef kc_limits lim
    # a bound beyond any payload's length decides nothing: clamped (a Python int may not fit)
    lim.max_payload = limit if limit < (1 << 62) else (1 << 62)
    lim.not_before = nb
    lim.not_after = na
    lim.latest_iat = latest
    lim.allowed[0] = "v" in allowed
    lim.allowed[1] = "t" in allowed
    lim.allowed[2] = "r" in allowed
    cdef bytearray codes = bytearray(n)
    cdef bytes facts = PyBytes_FromStringAndSize(NULL, max(n, 1) * KC_FACT_SIZE)
    cdef const char **errs = <const char **>malloc(max(n, 1) * sizeof(char *))
    cdef uint8_t *cbor_error = <uint8_t *>malloc(max(n, 1))
    cdef const uint8_t *buf = <const uint8_t *>PyBytes_AS_STRING(payloads)
    cdef const uint8_t *ok = <const uint8_t *>PyBytes_AS_STRING(client_ok)
    cdef uint8_t *codes_p = <uint8_t *>(<char *>codes) if n else NULL
    cdef uint8_t *facts_p = <uint8_t *>PyBytes_AS_STRING(facts)
    try:
        if errs == NULL or cbor_error == NULL:
            raise MemoryError()
        if n:
            with nogil:
                kc_check(buf, ends_p, n, cix_p, ok, &lim, codes_p, facts_p, errs, cbor_error)
        malformed = {}
        for i in range(n):
            if errs[i] != NULL and codes_p[i] == 1:
                text = errs[i].decode("ascii")
                malformed[i] = "not one CBOR item: " + text if cbor_error[i] else text
        return codes, facts[: n * KC_FACT_SIZE], malformed
    finally:
        free(errs)
        free(cbor_error)


cdef list _kc_literals(str name, tuple table, char **arena_out, kc_text **texts_out):
    """Escaped JSON literals of a table's entries, in one malloc'ed arena (texts point in)."""
    cdef Py_ssize_t k, count = len(table), size, total = 0
    cdef const char *utf8
    keep = []
    for k in range(count):
        value = table[k]
        if value is None and name == "operators":
            keep.append(None)
            total += 4
            continue
        if type(value) is not str or not value or len(value) > _KC_MAX_TEXT:
            raise ValueError(_TEXT_INVALID.format(name=name, k=k))
        try:
            utf8 = PyUnicode_AsUTF8AndSize(value, &size)
        except UnicodeEncodeError:
            raise ValueError(_TEXT_NOT_UNICODE.format(name=name, k=k)) from None
        keep.append(value)
        total += kc_json_literal_max(size)
    cdef char *arena = <char *>malloc(max(total, 1))
    cdef kc_text *texts = <kc_text *>malloc(max(count, 1) * sizeof(kc_text))
    if arena == NULL or texts == NULL:
        free(arena)
        free(texts)
        raise MemoryError()
    arena_out[0] = arena
    texts_out[0] = texts
    cdef char *o = arena
    for k in range(count):
        value = keep[k]
        texts[k].ptr = o
        if value is None:
            memcpy(o, b"null", 4)
            texts[k].len = 4
        else:
            utf8 = PyUnicode_AsUTF8AndSize(value, &size)
            texts[k].len = kc_json_literal(<const uint8_t *>utf8, size, o)
        o += texts[k].len
    return keep


def audit_issue_columns(time, alg, kid, clients, accounts, operators, client_ix, account_ix,
                        operator_ix, payloads, ends, facts, selected, signatures, sig_ends, seq,
                        prev) -> tuple:
    if not _kc_audit_fast(time, alg, kid, clients, accounts, operators, client_ix, account_ix,
                          operator_ix, payloads, ends, facts, selected, signatures, sig_ends,
                          seq, prev):
        _check_kc_audit(time, alg, kid, clients, accounts, operators, client_ix, account_ix,
                        operator_ix, payloads, ends, facts, selected, signatures, sig_ends, seq,
                        prev)
    cdef Py_ssize_t n, m, nsel, k, x
    cdef kc_audit_batch b
    memset(&b, 0, sizeof(b))
    b.ends = _u32_ptr(ends, &n)
    b.client_ix = _u32_ptr(client_ix, &m)
    b.account_ix = _u32_ptr(account_ix, &m)
    b.operator_ix = _u32_ptr(operator_ix, &m)
    cdef const uint32_t *sel = _u32_ptr(selected, &nsel)
    cdef const uint32_t *sig_ends_p = _u32_ptr(sig_ends, &m)
    cdef const uint8_t *facts_p = <const uint8_t *>PyBytes_AS_STRING(facts)
    cdef uint32_t i
    cdef uint32_t start
    # per selected item: it was checked, and an ES256 signature is r||s
    cdef const uint8_t *rec
    cdef uint32_t ci_off
    for k in range(nsel):
        i = sel[k]
        rec = facts_p + <size_t>i * KC_FACT_SIZE
        if rec[3] == 0 or rec[2] not in b"vtr":
            raise ValueError(_NO_FACTS.format(i=i))
        # facts are keyd_check_columns' output; checked anyway (they steer reads)
        memcpy(&ci_off, rec + 4, 4)
        start = b.ends[i - 1] if i else 0
        if (not (65 <= rec[0] <= 90 and 65 <= rec[1] <= 90) or rec[3] > _UVCI_MAX
                or <size_t>ci_off + rec[3] > b.ends[i] - start):
            raise ValueError(_BAD_FACTS.format(i=i))
        start = sig_ends_p[k - 1] if k else 0
        if alg == ES256 and sig_ends_p[k] - start != 64:
            raise ValueError(_ES256_LENGTH.format(i=i))
    cdef char *arenas[3]
    cdef kc_text *tables[3]
    arenas[0] = arenas[1] = arenas[2] = NULL
    tables[0] = tables[1] = tables[2] = NULL
    cdef char *out = NULL
    cdef char *head = NULL
    cdef char *middle = NULL
    cdef size_t bound = 0, scratch = 0, written = 0, s
    cdef char chain[64]
    cdef const uint8_t *sigs_p
    cdef uint64_t first_seq
    cdef bytes prev_b = prev.encode("ascii")
    cdef bytes alg_b = str(alg).encode("ascii")
    cdef bytes kid_b = kid.hex().encode("ascii")
    memcpy(chain, PyBytes_AS_STRING(prev_b), 64)
    try:
        keep = (_kc_literals("clients", clients, &arenas[0], &tables[0]),
                _kc_literals("accounts", accounts, &arenas[1], &tables[1]),
                _kc_literals("operators", operators, &arenas[2], &tables[2]))
        if nsel == 0:
            return b"", prev
        b.clients, b.accounts, b.operators = tables[0], tables[1], tables[2]
        b.alg = PyBytes_AS_STRING(alg_b)
        b.kid = PyBytes_AS_STRING(kid_b)
        b.time = PyBytes_AS_STRING(time)
        b.time_len = PyBytes_GET_SIZE(time)
        b.payloads = <const uint8_t *>PyBytes_AS_STRING(payloads)
        b.facts = facts_p
        b.es256 = alg == ES256
        for k in range(nsel):
            bound += kc_audit_line_bound(&b, sel[k]) + 1
            s = kc_audit_scratch_len(&b, sel[k])
            if s > scratch:
                scratch = s
        out = <char *>malloc(bound)
        head = <char *>malloc(scratch)
        middle = <char *>malloc(scratch)
        if out == NULL or head == NULL or middle == NULL:
            raise MemoryError()
        sigs_p = <const uint8_t *>PyBytes_AS_STRING(signatures)
        first_seq = seq
        with nogil:
            written = kc_audit_lines(&b, sel, nsel, sigs_p, sig_ends_p, first_seq, chain, head,
                                     middle, out)
        if written == 0:
            raise RuntimeError("OpenSSL failed to compute SHA-256")
        return PyBytes_FromStringAndSize(out, written), PyUnicode_DecodeASCII(chain, 64, NULL)
    finally:
        for x in range(3):
            free(arenas[x])
            free(tables[x])
        free(out)
        free(head)
        free(middle)
