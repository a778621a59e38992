/*
 * loadgen: counting reply bodies for the load generator (see loadgen.h). Each function
 * follows its namesake in native/_loadgen_py.py; keep the two in step (tests/test_loadgen.py
 * compares them on generated and mutated bodies).
 */
#include "loadgen.h"
#include "utf8.h"

#include <string.h>

#define UINT32_MAX_ 0xFFFFFFFFu
#define MAX_HC1 8192
#define MAX_MESSAGE 1024
#define KID_SIZE 8

typedef struct {
    const uint8_t *buf;
    size_t len;
    size_t pos;
    const char *err;
    size_t err_pos;
} walk;

static int mal(walk *w, size_t at, const char *why)
{
    w->err = why;
    w->err_pos = at;
    return LG_ERR_MALFORMED;
}

/* A head at pos: its start, major type, argument, indefinite flag; pos moves past it.
 * A break (0xff) comes back as major 7, argument 31, indefinite. */
static int head(walk *w, size_t *start, unsigned *major, uint64_t *arg, int *indef)
{
    size_t s = w->pos, p = s + 1;
    if (s >= w->len) return mal(w, s, "truncated");
    unsigned ib = w->buf[s], mj = ib >> 5, info = ib & 0x1F;
    *start = s;
    *major = mj;
    *indef = 0;
    if (info < 24) {
        *arg = info;
        w->pos = p;
        return LG_OK;
    }
    if (info <= 27) {
        size_t size = (size_t)1 << (info - 24);
        if (size > w->len - p) return mal(w, s, "truncated");
        uint64_t v = 0;
        for (size_t i = 0; i < size; i++) v = (v << 8) | w->buf[p + i];
        *arg = v;
        w->pos = p + size;
        return LG_OK;
    }
    if (info < 31) return mal(w, s, "reserved additional information");
    if (mj == 0 || mj == 1 || mj == 6) return mal(w, s, "indefinite length for this major type");
    if (mj == 2 || mj == 3) return mal(w, s, "indefinite-length strings are not supported");
    *arg = 31;
    *indef = 1;
    w->pos = p;
    return LG_OK;
}

/* Strict UTF-8 as Python decodes it (no overlong forms, no surrogates, nothing above
 * U+10FFFF); *nchars: the characters. ASCII runs are checked a word at a time: HC1 strings
 * are ~600 ASCII bytes each and this is most of the walk's work. */
static int utf8_chars(const uint8_t *s, size_t n, size_t *nchars)
{
    size_t i = 0, c = 0;
    while (i < n) {
        if (n - i >= 32) {
            uint64_t w4[4];
            memcpy(w4, s + i, 32);
            if (!((w4[0] | w4[1] | w4[2] | w4[3]) & 0x8080808080808080ull)) {
                i += 32;
                c += 32;
                continue;
            }
        }
        if (n - i >= 8) {
            uint64_t word;
            memcpy(&word, s + i, 8);
            if (!(word & 0x8080808080808080ull)) {
                i += 8;
                c += 8;
                continue;
            }
        }
        uint8_t b = s[i];
        c++;
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t seq = utf8_sequence(s + i, n - i);
        if (!seq) return 0;
        i += seq;
    }
    *nchars = c;
    return 1;
}

/* The definite string whose head (at start) ended at pos: its span (for text also its
 * characters, *nchars); pos moves past it. */
static int string(walk *w, size_t start, unsigned major, uint64_t length, size_t *off,
                  size_t *nchars)
{
    size_t p = w->pos;
    if (length > w->len - p) return mal(w, start, "truncated");
    w->pos = p + (size_t)length;
    if (major == 3 && !utf8_chars(w->buf + p, (size_t)length, nchars))
        return mal(w, start, "invalid UTF-8 in a text string");
    *off = p;
    return LG_OK;
}

static int at_break(walk *w, int *yes)
{
    if (w->pos >= w->len) return mal(w, w->pos, "truncated");
    *yes = w->buf[w->pos] == 0xFF;
    if (*yes) w->pos++;
    return LG_OK;
}

/* Whether a container has another entry: fewer than `count` taken so far, or (indefinite
 * length) no break byte next; the break is consumed. */
static inline int more_entries(walk *w, int indef, uint64_t count, uint64_t taken, int *more)
{
    int brk, rc;
    if (!indef) {
        *more = taken < count;
        return LG_OK;
    }
    if ((rc = at_break(w, &brk)) != LG_OK) return rc;
    *more = !brk;
    return LG_OK;
}

/* A map key: *text = 1 and its span if it is text, *text = 0 if bytes. */
static int key(walk *w, int *text, size_t *off, size_t *klen)
{
    size_t start;
    unsigned major;
    uint64_t arg;
    int indef, rc;
    if ((rc = head(w, &start, &major, &arg, &indef)) != LG_OK) return rc;
    if (major != 2 && major != 3) return mal(w, start, "map keys must be text or byte strings");
    size_t nchars;
    if ((rc = string(w, start, major, arg, off, &nchars)) != LG_OK) return rc;
    *text = major == 3;
    *klen = (size_t)arg;
    return LG_OK;
}

/* Past one data item at nesting level depth (the body's own item is at 1). */
static int skip(walk *w, int depth)
{
    size_t start, off, klen, nchars;
    unsigned major;
    uint64_t arg;
    int indef, rc, text, brk;
    if ((rc = head(w, &start, &major, &arg, &indef)) != LG_OK) return rc;
    if (major == 2 || major == 3) return string(w, start, major, arg, &off, &nchars);
    if (major == 4 || major == 5) {
        if (depth > LG_MAX_DEPTH) return mal(w, start, "nested more than 16 levels deep");
        if (indef) {
            for (;;) {
                if ((rc = at_break(w, &brk)) != LG_OK) return rc;
                if (brk) return LG_OK;
                if (major == 5 && (rc = key(w, &text, &off, &klen)) != LG_OK) return rc;
                if ((rc = skip(w, depth + 1)) != LG_OK) return rc;
            }
        }
        for (uint64_t i = 0; i < arg; i++) {
            if (major == 5 && (rc = key(w, &text, &off, &klen)) != LG_OK) return rc;
            if ((rc = skip(w, depth + 1)) != LG_OK) return rc;
        }
        return LG_OK;
    }
    if (major == 6) return mal(w, start, "tags are not allowed");
    if (major == 7 && indef) return mal(w, start, "unexpected break");
    return LG_OK;
}

enum { K_NULL, K_UINT, K_TEXT, K_BYTES, K_OTHER };

typedef struct {
    int kind;
    uint64_t a; /* the value (K_UINT) or the offset (K_TEXT, K_BYTES) */
    size_t b;   /* the length (K_TEXT, K_BYTES) */
    size_t chars; /* K_TEXT */
    int set;
} field;

static int value(walk *w, int depth, field *f)
{
    size_t save = w->pos, start, off;
    unsigned major;
    uint64_t arg;
    int indef, rc;
    if ((rc = head(w, &start, &major, &arg, &indef)) != LG_OK) return rc;
    f->set = 1;
    if (major == 0) {
        f->kind = K_UINT;
        f->a = arg;
        return LG_OK;
    }
    if (major == 2 || major == 3) {
        if ((rc = string(w, start, major, arg, &off, &f->chars)) != LG_OK) return rc;
        f->kind = major == 3 ? K_TEXT : K_BYTES;
        f->a = off;
        f->b = (size_t)arg;
        return LG_OK;
    }
    if (major == 7 && !indef && arg == 22) {
        f->kind = K_NULL;
        return LG_OK;
    }
    w->pos = save;
    f->kind = K_OTHER;
    return skip(w, depth);
}

/* The head of a map (want 5) or array (want 4); *is = 0 (pos unchanged) if the next item is
 * something else. */
static int container(walk *w, unsigned want, int *is, uint64_t *count, int *indef)
{
    size_t save = w->pos, start;
    unsigned major;
    int rc;
    if ((rc = head(w, &start, &major, count, indef)) != LG_OK) return rc;
    *is = major == want;
    if (!*is) w->pos = save;
    return LG_OK;
}

enum { F_HC1, F_KID, F_ERROR, F_MESSAGE, F_RETRY, F_COUNT };
static const char *const DUPLICATE[F_COUNT] = {
    "duplicate key 'hc1'", "duplicate key 'kid'", "duplicate key 'error'",
    "duplicate key 'message'", "duplicate key 'retry_after_ms'"};

static int field_of(const uint8_t *k, size_t n)
{
    switch (n) {
    case 3:
        if (!memcmp(k, "hc1", 3)) return F_HC1;
        if (!memcmp(k, "kid", 3)) return F_KID;
        return -1;
    case 5:
        return memcmp(k, "error", 5) ? -1 : F_ERROR;
    case 7:
        return memcmp(k, "message", 7) ? -1 : F_MESSAGE;
    case 14:
        return memcmp(k, "retry_after_ms", 14) ? -1 : F_RETRY;
    default:
        return -1;
    }
}

/* One result map: *code = 0 and the hc1/kid spans if signed, else its error code. A broken
 * rule is LG_ERR_RESULT with w->err relative to the result. */
static int result(walk *w, int depth, uint32_t *code, size_t *hc1_off, size_t *hc1_len,
                  size_t *kid_off)
{
    uint64_t count, k = 0;
    int is, indef, rc, text, more;
    size_t off, klen;
    field f[F_COUNT];
    if ((rc = container(w, 5, &is, &count, &indef)) != LG_OK) return rc;
    if (!is) {
        if ((rc = skip(w, depth)) != LG_OK) return rc;
        w->err = "is not a map";
        return LG_ERR_RESULT;
    }
    memset(f, 0, sizeof f);
    for (;; k++) {
        if ((rc = more_entries(w, indef, count, k, &more)) != LG_OK) return rc;
        if (!more) break;
        size_t key_at = w->pos;
        if ((rc = key(w, &text, &off, &klen)) != LG_OK) return rc;
        int slot = text ? field_of(w->buf + off, klen) : -1;
        if (slot < 0) {
            if ((rc = skip(w, depth + 1)) != LG_OK) return rc;
            continue;
        }
        if (f[slot].set) return mal(w, key_at, DUPLICATE[slot]);
        if ((rc = value(w, depth + 1, &f[slot])) != LG_OK) return rc;
    }
    const uint8_t *b = w->buf;
    field *hc1 = &f[F_HC1], *kid = &f[F_KID], *error = &f[F_ERROR];
    field *message = &f[F_MESSAGE], *retry = &f[F_RETRY];
    if (hc1->kind != K_NULL) {
        if (hc1->kind != K_TEXT || hc1->chars <= 4 || hc1->chars > MAX_HC1 ||
            memcmp(b + hc1->a, "HC1:", 4) != 0) {
            w->err = "hc1: must be text starting \"HC1:\", at most 8192 characters";
            return LG_ERR_RESULT;
        }
        if (kid->kind != K_BYTES || kid->b != KID_SIZE) {
            w->err = "kid: must be a byte string of 8 bytes";
            return LG_ERR_RESULT;
        }
        if (error->kind != K_NULL) {
            w->err = "has both hc1 and error";
            return LG_ERR_RESULT;
        }
        *code = 0;
        *hc1_off = (size_t)hc1->a;
        *hc1_len = hc1->b;
        *kid_off = (size_t)kid->a;
        return LG_OK;
    }
    if (error->kind == K_NULL) {
        w->err = "has neither hc1 nor error";
        return LG_ERR_RESULT;
    }
    if (error->kind != K_UINT || error->a == 0 || error->a > UINT32_MAX_) {
        w->err = "error: must be an error code (unsigned integer, not 0)";
        return LG_ERR_RESULT;
    }
    if (message->kind != K_TEXT || message->chars > MAX_MESSAGE) {
        w->err = "message: must be text of at most 1024 characters";
        return LG_ERR_RESULT;
    }
    if (retry->kind != K_NULL && (retry->kind != K_UINT || retry->a > UINT32_MAX_)) {
        w->err = "retry_after_ms: must be an unsigned integer in 0..4294967295";
        return LG_ERR_RESULT;
    }
    *code = (uint32_t)error->a;
    return LG_OK;
}

static void record(uint32_t i, uint32_t code, size_t hc1_off, size_t hc1_len, size_t kid_off,
                   lg_error *errs, uint32_t *n_errs, lg_want *wants, size_t n_wants)
{
    if (code) {
        errs[*n_errs].pos = i;
        errs[*n_errs].code = code;
        (*n_errs)++;
        return;
    }
    for (size_t j = 0; j < n_wants; j++) {
        if (wants[j].pos == i) {
            wants[j].found = 1;
            wants[j].hc1_off = hc1_off;
            wants[j].hc1_len = hc1_len;
            wants[j].kid_off = kid_off;
        }
    }
}

static int batch_body(walk *w, uint32_t limit, uint32_t *n, lg_error *errs, uint32_t *n_errs,
                      lg_want *wants, size_t n_wants, uint32_t *err_index)
{
    uint64_t count, k = 0, length;
    int is, indef, aindef, rc, text, more, have = 0;
    size_t off, klen, hc1_off = 0, hc1_len = 0, kid_off = 0;
    uint32_t code;
    if ((rc = container(w, 5, &is, &count, &indef)) != LG_OK) return rc;
    if (!is) {
        if ((rc = skip(w, 1)) != LG_OK) return rc;
        w->err = "the body is not a CBOR map";
        return LG_ERR_BODY;
    }
    for (;; k++) {
        if ((rc = more_entries(w, indef, count, k, &more)) != LG_OK) return rc;
        if (!more) break;
        size_t key_at = w->pos;
        if ((rc = key(w, &text, &off, &klen)) != LG_OK) return rc;
        if (!text || klen != 7 || memcmp(w->buf + off, "results", 7) != 0) {
            if ((rc = skip(w, 2)) != LG_OK) return rc;
            continue;
        }
        if (have) return mal(w, key_at, "duplicate key 'results'");
        if ((rc = container(w, 4, &is, &length, &aindef)) != LG_OK) return rc;
        if (!is) {
            if ((rc = skip(w, 2)) != LG_OK) return rc;
            return LG_ERR_RESULTS;
        }
        if (!aindef && (length == 0 || length > limit)) return LG_ERR_RESULTS;
        uint32_t i = 0;
        for (;;) {
            if ((rc = more_entries(w, aindef, length, i, &more)) != LG_OK) return rc;
            if (!more) break;
            if (i >= limit) return LG_ERR_RESULTS;
            rc = result(w, 3, &code, &hc1_off, &hc1_len, &kid_off);
            if (rc == LG_ERR_RESULT) *err_index = i;
            if (rc != LG_OK) return rc;
            record(i, code, hc1_off, hc1_len, kid_off, errs, n_errs, wants, n_wants);
            i++;
        }
        if (i == 0) return LG_ERR_RESULTS;
        *n = i;
        have = 1;
    }
    return have ? LG_OK : LG_ERR_RESULTS;
}

int lg_scan_results(const uint8_t *buf, size_t len, int batch, uint32_t max_results,
                    uint32_t *n, lg_error *errs, uint32_t *n_errs, lg_want *wants,
                    size_t n_wants, const char **err, size_t *err_pos, uint32_t *err_index)
{
    walk w = {buf, len, 0, NULL, 0};
    int rc, is, indef;
    uint64_t count;
    uint32_t code = 0;
    size_t hc1_off = 0, hc1_len = 0, kid_off = 0;
    *n = 0;
    *n_errs = 0;
    *err_index = 0;
    for (size_t j = 0; j < n_wants; j++) wants[j].found = 0;
    if (batch) {
        rc = batch_body(&w, max_results, n, errs, n_errs, wants, n_wants, err_index);
    } else {
        rc = container(&w, 5, &is, &count, &indef);
        if (rc == LG_OK && !is) {
            rc = skip(&w, 1);
            if (rc == LG_OK) {
                w.err = "the body is not a CBOR map";
                rc = LG_ERR_BODY;
            }
        } else if (rc == LG_OK) {
            w.pos = 0;
            rc = result(&w, 1, &code, &hc1_off, &hc1_len, &kid_off);
            if (rc == LG_OK) {
                *n = 1;
                record(0, code, hc1_off, hc1_len, kid_off, errs, n_errs, wants, n_wants);
            }
        }
    }
    if (rc == LG_OK && w.pos != len) {
        w.err = "trailing bytes after the CBOR item";
        rc = LG_ERR_BODY;
    }
    *err = w.err;
    *err_pos = w.err_pos;
    return rc;
}
