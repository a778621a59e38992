/* Request walker, claims splice and reply body: see walker.h.
 *
 * walk_check is the one pass over untrusted bytes: it checks everything (well-formedness,
 * the data item and depth limits of dcc_cbor_scan, the strict decoder's rules), reading
 * nothing past the buffer's end. Everything after it (pass 3, the splice's canonical check)
 * reads a body walk_check accepted, and still stops at the buffer's end. */
#include "walker.h"
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

#include "dcccore.h"

/* ---------------------------------------------------------------- heads and strings */

typedef struct {
    const uint8_t *buf;
    size_t len;
    size_t pos;
    uint64_t count; /* data items read (walk_check's count; every head and string chunk) */
    uint64_t max_items;
    int max_depth;
} rd_t;

/* The head at r->pos, counted. Returns 0 if it is truncated or not well-formed (reserved
 * additional information, an indefinite integer or tag, a stray break). Inlined: the walk is
 * mostly heads. */
static inline __attribute__((always_inline)) int head(rd_t *r, unsigned *major, uint64_t *arg,
                                                      int *indef, unsigned *info)
{
    if (r->pos >= r->len) return 0;
    uint8_t ib = r->buf[r->pos++];
    *major = ib >> 5;
    *info = ib & 0x1f;
    *indef = 0;
    *arg = 0;
    r->count++;
    if (*info < 24) {
        *arg = *info;
    } else if (*info == 31) {
        /* indefinite length: strings and containers only; a break (major 7) is for the
         * callers that expect one (at_break), anywhere else it is malformed */
        if (*major <= 1 || *major >= 6) return 0;
        *indef = 1;
    } else if (*info > 27) {
        return 0; /* reserved additional information */
    } else {
        size_t size = (size_t)1 << (*info - 24);
        if (r->len - r->pos < size) return 0;
        for (size_t i = 0; i < size; i++) *arg = (*arg << 8) | r->buf[r->pos + i];
        r->pos += size;
    }
    return 1;
}

static inline __attribute__((always_inline)) int at_break(rd_t *r)
{
    if (r->pos < r->len && r->buf[r->pos] == 0xff) {
        r->pos++;
        return 1;
    }
    return 0;
}

/* A string value: its content is buf[off, off + len) when definite; when indefinite, chunks
 * start at off (heads included) and total len content bytes. */
typedef struct {
    unsigned major;
    int indef;
    size_t off;
    size_t len;
} str_t;

/* Strict UTF-8 (what a strict decoder accepts: no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_ok(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            /* ASCII runs (nearly all of a DCC) eight bytes at a time */
            uint64_t w;
            while (n - i >= 8) {
                memcpy(&w, s + i, 8);
                if (w & 0x8080808080808080ull) break;
                i += 8;
            }
            if (i < n && s[i] < 0x80) i++;
            continue;
        }
        size_t seq = utf8_sequence(s + i, n - i);
        if (!seq) return 0;
        i += seq;
    }
    return 1;
}

/* Reads a string whose head (major 2 or 3) was just read; validates text chunk by chunk (a
 * code point split over two chunks is invalid, as in the strict decoder). */
static inline __attribute__((always_inline)) int read_str_v(rd_t *r, unsigned major, uint64_t arg, int indef, str_t *s, int validate)
{
    s->major = major;
    s->indef = indef;
    s->off = r->pos;
    if (!indef) {
        if (r->len - r->pos < arg) return 0;
        if (validate && major == 3 && !utf8_ok(r->buf + r->pos, (size_t)arg)) return 0;
        s->len = (size_t)arg;
        r->pos += (size_t)arg;
        return 1;
    }
    s->len = 0;
    while (!at_break(r)) {
        unsigned m, info;
        uint64_t a;
        int ind;
        if (!head(r, &m, &a, &ind, &info) || m != major || ind) return 0;
        if (r->len - r->pos < a) return 0;
        if (validate && major == 3 && !utf8_ok(r->buf + r->pos, (size_t)a)) return 0;
        s->len += (size_t)a;
        r->pos += (size_t)a;
    }
    return 1;
}

static int read_str(rd_t *r, unsigned major, uint64_t arg, int indef, str_t *s)
{
    return read_str_v(r, major, arg, indef, s, 1);
}

/* The same once walk_check has validated every text: no second UTF-8 pass. */
static int read_str_known(rd_t *r, unsigned major, uint64_t arg, int indef, str_t *s)
{
    return read_str_v(r, major, arg, indef, s, 0);
}

/* Chunk iteration over a string's content. */
typedef struct {
    const uint8_t *buf;
    size_t pos;       /* next chunk head (indefinite) */
    const uint8_t *p; /* current chunk bytes left */
    size_t left;
    int indef;
} chunks_t;

static void chunks_init(chunks_t *c, const uint8_t *buf, const str_t *s)
{
    c->buf = buf;
    c->indef = s->indef;
    c->pos = s->off;
    c->p = buf + s->off;
    c->left = s->indef ? 0 : s->len;
}

/* Next content byte into *b; 0 at the end. */
static int chunks_byte(chunks_t *c, uint8_t *b)
{
    while (c->left == 0) {
        if (!c->indef || c->buf[c->pos] == 0xff) return 0;
        uint8_t ib = c->buf[c->pos++];
        unsigned info = ib & 0x1f;
        uint64_t a = info;
        if (info >= 24) {
            size_t size = (size_t)1 << (info - 24);
            a = 0;
            for (size_t i = 0; i < size; i++) a = (a << 8) | c->buf[c->pos + i];
            c->pos += size;
        }
        c->p = c->buf + c->pos;
        c->left = (size_t)a;
        c->pos += (size_t)a;
    }
    *b = *c->p++;
    c->left--;
    return 1;
}

/* Order of keys: major type, then length, then bytes (any total order finds duplicates). */
static int str_cmp(const uint8_t *buf, const str_t *a, const str_t *b)
{
    if (a->major != b->major) return a->major < b->major ? -1 : 1;
    if (a->len != b->len) return a->len < b->len ? -1 : 1;
    if (!a->indef && !b->indef) return memcmp(buf + a->off, buf + b->off, a->len);
    chunks_t ca, cb;
    chunks_init(&ca, buf, a);
    chunks_init(&cb, buf, b);
    uint8_t x, y;
    while (chunks_byte(&ca, &x) && chunks_byte(&cb, &y))
        if (x != y) return x < y ? -1 : 1;
    return 0;
}

static int str_is(const uint8_t *buf, const str_t *s, const char *lit)
{
    size_t n = strlen(lit);
    if (s->major != 3 || s->len != n) return 0;
    if (!s->indef) return memcmp(buf + s->off, lit, n) == 0;
    chunks_t c;
    chunks_init(&c, buf, s);
    uint8_t x;
    for (size_t i = 0; chunks_byte(&c, &x); i++)
        if (x != (uint8_t)lit[i]) return 0;
    return 1;
}

/* ---------------------------------------------------------------- pass 2: the strict rules */

/* qsort has no context argument: the buffer being walked, per thread (walks run GIL-free). */
static __thread const uint8_t *tls_sort_buf;

static int key_qcmp(const void *a, const void *b)
{
    return str_cmp(tls_sort_buf, (const str_t *)a, (const str_t *)b);
}

#define SMALL_MAP 16

/* Major type, length and up to the first five content bytes: equal keys have equal sigs. */
static inline uint64_t key_sig(const uint8_t *buf, const str_t *k)
{
    uint64_t sig = ((uint64_t)k->major << 61) ^ ((uint64_t)(k->len & 0xffff) << 40);
    if (!k->indef) {
        for (size_t i = 0; i < k->len && i < 5; i++) sig ^= (uint64_t)buf[k->off + i] << (8 * i);
        return sig;
    }
    chunks_t c; /* the same bytes, however the key is chunked */
    uint8_t x;
    chunks_init(&c, buf, k);
    for (size_t i = 0; i < 5 && chunks_byte(&c, &x); i++) sig ^= (uint64_t)x << (8 * i);
    return sig;
}

static int check_item(rd_t *r, int depth);

static int check_map(rd_t *r, uint64_t arg, int indef, int depth)
{
    str_t small[SMALL_MAP];
    uint64_t sig[SMALL_MAP]; /* of small maps' keys: most pairs differ here already */
    str_t *keys = small;
    size_t cap = SMALL_MAP, n = 0;
    int ok = 1;
    for (uint64_t k = 0; indef || k < arg; k++) {
        if (indef && at_break(r)) break;
        unsigned m, info;
        uint64_t a;
        int ind;
        if (!head(r, &m, &a, &ind, &info) || (m != 2 && m != 3) || r->count > r->max_items) {
            ok = 0;
            break;
        }
        if (n == cap) {
            size_t ncap = cap * 4;
            str_t *grown = malloc(ncap * sizeof(str_t));
            if (grown == NULL) {
                ok = -1;
                break;
            }
            memcpy(grown, keys, n * sizeof(str_t));
            if (keys != small) free(keys);
            keys = grown;
            cap = ncap;
        }
        if (!read_str(r, m, a, ind, &keys[n]) || r->count > r->max_items) {
            ok = 0;
            break;
        }
        sig[n < SMALL_MAP ? n : 0] = key_sig(r->buf, &keys[n]);
        int rc = check_item(r, depth + 1);
        if (rc != 1) {
            ok = rc;
            break;
        }
        n++;
    }
    if (ok == 1 && n > 1) {
        if (n <= SMALL_MAP) {
            for (size_t i = 1; i < n && ok; i++)
                for (size_t j = 0; j < i; j++)
                    if (sig[i] == sig[j] && str_cmp(r->buf, &keys[i], &keys[j]) == 0) {
                        ok = 0;
                        break;
                    }
        } else {
            tls_sort_buf = r->buf;
            qsort(keys, n, sizeof(str_t), key_qcmp);
            for (size_t i = 1; i < n; i++)
                if (str_cmp(r->buf, &keys[i], &keys[i - 1]) == 0) {
                    ok = 0;
                    break;
                }
        }
    }
    if (keys != small) free(keys);
    return ok;
}

/* 1: acceptable; 0: refused; -1: out of memory. */
static int check_item(rd_t *r, int depth)
{
    unsigned major, info;
    uint64_t arg;
    int indef;
    str_t s;
    if (!head(r, &major, &arg, &indef, &info) || r->count > r->max_items) return 0;
    if ((major == 4 || major == 5) && depth + 1 > r->max_depth) return 0;
    switch (major) {
    case 0:
    case 1:
        return 1;
    case 2:
    case 3:
        return read_str(r, major, arg, indef, &s) && r->count <= r->max_items;
    case 4:
        for (uint64_t k = 0; indef || k < arg; k++) {
            if (indef && at_break(r)) break;
            int rc = check_item(r, depth + 1);
            if (rc != 1) return rc;
        }
        return 1;
    case 5:
        return check_map(r, arg, indef, depth);
    case 6:
        return 0; /* no tags anywhere (SPEC.md 4.3 rule 3) */
    default:
        /* A break outside an indefinite-length item is malformed; a two-byte simple value
         * below 32 is not well-formed (RFC 8949 3.3). */
        return !indef && !(info == 24 && arg < 32);
    }
}

int walk_check(const uint8_t *buf, size_t len, uint64_t max_items, int max_depth)
{
    /* One pass for what dcc_cbor_scan and the strict decoder check: this side only decides
     * accept or refuse (the twin names the rule), and both refuse the same bodies. */
    rd_t r = {buf, len, 0, 0, max_items, max_depth};
    int rc = check_item(&r, 0);
    if (rc < 0) return WALK_NOMEM;
    return rc == 1 && r.pos == len ? WALK_OK : WALK_REFUSED;
}

/* ---------------------------------------------------------------- pass 3: the items */

static void skip_item(rd_t *r)
{
    unsigned major, info;
    uint64_t arg;
    int indef;
    str_t s;
    if (!head(r, &major, &arg, &indef, &info)) return;
    switch (major) {
    case 2:
    case 3:
        read_str_known(r, major, arg, indef, &s);
        return;
    case 4:
    case 5: {
        uint64_t per = major == 5 ? 2 : 1;
        for (uint64_t k = 0; indef || k < arg * per; k++) {
            if (indef && at_break(r)) break;
            skip_item(r);
        }
        return;
    }
    case 6:
        skip_item(r);
        return;
    default:
        return;
    }
}

int walk_locate(const uint8_t *buf, size_t len, int single, size_t *items_off, uint32_t *count)
{
    rd_t r = {buf, len, 0, 0, 0, 0};
    unsigned major, info;
    uint64_t arg;
    int indef;
    if (!head(&r, &major, &arg, &indef, &info) || major != 5) return WALK_REFUSED;
    if (single) {
        *items_off = 0;
        *count = 1;
        return WALK_OK;
    }
    for (uint64_t k = 0; indef || k < arg; k++) {
        if (indef && at_break(&r)) break;
        unsigned m;
        uint64_t a;
        int ind;
        str_t key;
        if (!head(&r, &m, &a, &ind, &info) || !read_str_known(&r, m, a, ind, &key)) return WALK_REFUSED;
        if (!str_is(buf, &key, "items")) {
            skip_item(&r);
            continue;
        }
        size_t at = r.pos;
        if (!head(&r, &m, &a, &ind, &info) || m != 4) return WALK_REFUSED;
        uint64_t n = 0;
        if (ind) {
            while (!at_break(&r)) {
                skip_item(&r);
                n++;
            }
        } else {
            n = a;
        }
        if (n == 0 || n > 0xffffffffu) return WALK_REFUSED;
        *items_off = at;
        *count = (uint32_t)n;
        return WALK_OK;
    }
    return WALK_REFUSED; /* no items */
}

/* A text's length in characters (the content is valid UTF-8: count the non-continuations). */
static size_t str_chars(const uint8_t *buf, const str_t *s, int *non_ascii)
{
    chunks_t c;
    uint8_t x;
    size_t n = 0;
    *non_ascii = 0;
    chunks_init(&c, buf, s);
    while (chunks_byte(&c, &x)) {
        if (x >= 0x80) *non_ascii = 1;
        if ((x & 0xc0) != 0x80) n++;
    }
    return n;
}

/* Where a field string's content is: in the body, or joined into extra. */
static int place(const uint8_t *buf, size_t len, const str_t *s, uint8_t *extra, size_t *extra_len,
                 uint32_t *off)
{
    if (!s->indef) {
        *off = (uint32_t)s->off;
        return WALK_OK;
    }
    if (extra == NULL) return WALK_NEED_EXTRA;
    chunks_t c;
    uint8_t x;
    *off = (uint32_t)(len + *extra_len);
    chunks_init(&c, buf, s);
    while (chunks_byte(&c, &x)) extra[(*extra_len)++] = x;
    return WALK_OK;
}

#define MAX_TEXT 256
#define KID_SIZE 8
#define MAX_VALIDITY_DAYS 3650
#define MAX_IDEMPOTENCY_KEY 64

enum { F_DCC, F_ACCOUNT, F_OPERATOR, F_KID, F_VD, F_KEY, F_N };
static const char *const FIELD_NAMES[F_N] = {"dcc",  "account",       "operator",
                                             "kid",  "validity_days", "idempotency_key"};

/* A text field (account, operator) at v->pos: 1..MAX_TEXT characters, placed (see place) at
 * o[off_slot] with its byte length at o[off_slot + 1], `non_ascii_flag` set in o[WALK_FLAGS]
 * when it is not all ASCII. */
static inline __attribute__((always_inline)) int walk_text(rd_t *v, size_t len, uint32_t *o,
                                                           uint8_t *extra, size_t *extra_len,
                                                           int off_slot, uint32_t non_ascii_flag)
{
    unsigned major, info;
    uint64_t arg;
    int indef, non_ascii, rc;
    str_t s;
    if (!head(v, &major, &arg, &indef, &info) || major != 3) return WALK_REFUSED;
    read_str_known(v, major, arg, indef, &s);
    size_t chars = str_chars(v->buf, &s, &non_ascii);
    if (chars < 1 || chars > MAX_TEXT) return WALK_REFUSED;
    if ((rc = place(v->buf, len, &s, extra, extra_len, &o[off_slot])) != WALK_OK) return rc;
    o[off_slot + 1] = (uint32_t)s.len;
    if (non_ascii) o[WALK_FLAGS] |= non_ascii_flag;
    return WALK_OK;
}
_Static_assert(WALK_ACCOUNT_LEN == WALK_ACCOUNT_OFF + 1 &&
                   WALK_OPERATOR_LEN == WALK_OPERATOR_OFF + 1,
               "walk_text writes a text's length next to its offset");

static int walk_item(rd_t *r, size_t len, uint32_t *o, uint8_t *extra, size_t *extra_len)
{
    const uint8_t *buf = r->buf;
    unsigned major, info;
    uint64_t arg;
    int indef;
    size_t at[F_N], end[F_N];
    int have[F_N] = {0};
    if (!head(r, &major, &arg, &indef, &info) || major != 5) return WALK_REFUSED;
    for (uint64_t k = 0; indef || k < arg; k++) {
        if (indef && at_break(r)) break;
        unsigned m;
        uint64_t a;
        int ind;
        str_t key;
        if (!head(r, &m, &a, &ind, &info) || !read_str_known(r, m, a, ind, &key)) return WALK_REFUSED;
        int f = -1;
        if (key.major == 3 && key.len <= 15)
            for (int i = 0; i < F_N; i++)
                if (str_is(buf, &key, FIELD_NAMES[i])) {
                    f = i;
                    break;
                }
        size_t value_at = r->pos;
        skip_item(r);
        if (f >= 0) { /* no duplicates: pass 2 saw to it */
            have[f] = 1;
            at[f] = value_at;
            end[f] = r->pos;
        }
    }
    memset(o, 0, WALK_NFIELDS * sizeof(uint32_t));
    /* Absent and null are the same for an optional field (SPEC.md 4.3 rule 8). */
    for (int f = F_OPERATOR; f < F_N; f++)
        if (have[f] && buf[at[f]] == 0xf6) have[f] = 0;
    rd_t v = {buf, len, 0, 0, 0, 0};
    str_t s;
    int rc;

    if (!have[F_DCC]) return WALK_REFUSED;
    if ((buf[at[F_DCC]] >> 5) != 5) return WALK_REFUSED;
    o[WALK_DCC_OFF] = (uint32_t)at[F_DCC];
    o[WALK_DCC_LEN] = (uint32_t)(end[F_DCC] - at[F_DCC]);

    if (!have[F_ACCOUNT]) return WALK_REFUSED;
    v.pos = at[F_ACCOUNT];
    rc = walk_text(&v, len, o, extra, extra_len, WALK_ACCOUNT_OFF, WALK_FLAG_ACCOUNT_NON_ASCII);
    if (rc != WALK_OK) return rc;
    if (have[F_OPERATOR]) {
        v.pos = at[F_OPERATOR];
        rc = walk_text(&v, len, o, extra, extra_len, WALK_OPERATOR_OFF,
                       WALK_FLAG_OPERATOR_NON_ASCII);
        if (rc != WALK_OK) return rc;
    }
    if (have[F_KID]) {
        v.pos = at[F_KID];
        if (!head(&v, &major, &arg, &indef, &info) || major != 2) return WALK_REFUSED;
        read_str_known(&v, major, arg, indef, &s);
        if (s.len != KID_SIZE) return WALK_REFUSED;
        if ((rc = place(buf, len, &s, extra, extra_len, &o[WALK_KID_OFF])) != WALK_OK) return rc;
    }
    if (have[F_VD]) {
        v.pos = at[F_VD];
        if (!head(&v, &major, &arg, &indef, &info) || major != 0) return WALK_REFUSED;
        if (arg < 1 || arg > MAX_VALIDITY_DAYS) return WALK_REFUSED;
        o[WALK_VALIDITY] = (uint32_t)arg;
    }
    if (have[F_KEY]) {
        v.pos = at[F_KEY];
        if (!head(&v, &major, &arg, &indef, &info) || (major != 2 && major != 3))
            return WALK_REFUSED;
        read_str_known(&v, major, arg, indef, &s);
        if (s.len < 1 || s.len > MAX_IDEMPOTENCY_KEY) return WALK_REFUSED;
        if ((rc = place(buf, len, &s, extra, extra_len, &o[WALK_KEY_OFF])) != WALK_OK) return rc;
        o[WALK_KEY_LEN] = (uint32_t)s.len;
        if (major == 3) o[WALK_FLAGS] |= WALK_FLAG_KEY_TEXT;
    }
    return WALK_OK;
}

int walk_items(const uint8_t *buf, size_t len, size_t items_off, uint32_t count, int single,
               uint32_t *out, uint8_t *extra, size_t *extra_len)
{
    rd_t r = {buf, len, items_off, 0, 0, 0};
    unsigned major, info;
    uint64_t arg;
    int indef;
    *extra_len = 0;
    if (!single && !head(&r, &major, &arg, &indef, &info)) return WALK_REFUSED;
    for (uint32_t i = 0; i < count; i++) {
        int rc = walk_item(&r, len, out + (size_t)i * WALK_NFIELDS, extra, extra_len);
        if (rc != WALK_OK) return rc;
    }
    return WALK_OK;
}

/* ---------------------------------------------------------------- claims splice */

/* The head's encoding is the shortest for its argument, definite. */
static int shortest(unsigned info, uint64_t arg, int indef)
{
    if (indef) return 0;
    if (arg < 24) return info == arg;
    if (arg <= 0xff) return info == 24;
    if (arg <= 0xffff) return info == 25;
    if (arg <= 0xffffffffu) return info == 26;
    return info == 27;
}

#include "nfc_table.h"

/* Every code point of a (valid UTF-8) text is NFC-stable (scripts/gen_nfc_table.py): then the
 * text is NFC whatever the order of its code points, and normalising it changes nothing. */
static int nfc_stable(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t cp = s[i];
        if (cp < 0x80) {
            i++;
            continue;
        }
        size_t k = cp >= 0xf0 ? 3 : cp >= 0xe0 ? 2 : 1;
        cp &= 0x3f >> k;
        for (size_t j = 1; j <= k && i + j < n; j++) cp = (cp << 6) | (s[i + j] & 0x3f);
        i += k + 1;
        if (cp < NFC_UNSTABLE[0][0]) continue;
        size_t lo = 0, hi = NFC_UNSTABLE_N;
        while (lo < hi) { /* the first range whose end is >= cp */
            size_t mid = (lo + hi) / 2;
            if (NFC_UNSTABLE[mid][1] < cp)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo < NFC_UNSTABLE_N && NFC_UNSTABLE[lo][0] <= cp) return 0;
    }
    return 1;
}

/* nam: this item is the map under the DCC's "nam"; name: this item is nam.fn or nam.gn. */
static int canonical_item(rd_t *r, int depth, int nam, int name)
{
    unsigned major, info;
    uint64_t arg;
    int indef;
    if (depth > 64 || !head(r, &major, &arg, &indef, &info)) return 0;
    switch (major) {
    case 0:
    case 1:
        return shortest(info, arg, indef);
    case 2:
    case 3:
        if (!shortest(info, arg, indef) || r->len - r->pos < arg) return 0;
        if (name && major == 3 && !nfc_stable(r->buf + r->pos, (size_t)arg)) return 0;
        r->pos += (size_t)arg;
        return 1;
    case 4:
        if (!shortest(info, arg, indef)) return 0;
        for (uint64_t k = 0; k < arg; k++)
            if (!canonical_item(r, depth + 1, 0, 0)) return 0;
        return 1;
    case 5:
        if (!shortest(info, arg, indef)) return 0;
        for (uint64_t k = 0; k < arg; k++) {
            size_t key_at = r->pos;
            if (!canonical_item(r, depth + 1, 0, 0)) return 0;
            const uint8_t *key = r->buf + key_at;
            size_t key_len = r->pos - key_at;
            /* Keys are text or bytes (walk_check) and canonical here: compare encodings. */
            int is_nam = depth == 0 && key_len == 4 && memcmp(key, "\x63nam", 4) == 0;
            int is_name = nam && key_len == 3 &&
                          (memcmp(key, "\x62" "fn", 3) == 0 || memcmp(key, "\x62" "gn", 3) == 0);
            if (!canonical_item(r, depth + 1, is_nam && (r->buf[r->pos] >> 5) == 5, is_name))
                return 0;
        }
        return 1;
    case 6:
        return 0;
    default:
        if (info < 24) return 1; /* false, true, null, undefined, simple 0..19: one byte */
        if (info == 24) return 1; /* simple 32..255 (walk_check refused those below 32) */
        if (info == 25) {
            /* Half precision: only NaN (7e00) and the infinities, as the encoder writes
             * them; any other half is widened to a double by the encoder. */
            uint16_t h = (uint16_t)arg;
            return h == 0x7e00 || h == 0x7c00 || h == 0xfc00;
        }
        if (info == 26) return 0; /* single precision: written as a double */
        /* A finite double stays; a non-finite one is written as a half. */
        return ((arg >> 52) & 0x7ff) != 0x7ff;
    }
}

int splice_canonical(const uint8_t *buf, size_t len)
{
    rd_t r = {buf, len, 0, 0, 0, 0};
    if (len == 0 || (buf[0] >> 5) != 5) return 0;
    return canonical_item(&r, 0, 0, 0) && r.pos == len;
}

size_t splice_size(uint32_t count, const uint32_t *prefix_of, const size_t *prefix_len,
                   const size_t *srclen)
{
    size_t total = 0;
    for (uint32_t i = 0; i < count; i++)
        if (prefix_of[i] != SPLICE_NONE) total += prefix_len[prefix_of[i]] + srclen[i];
    return total;
}

void splice_assemble(uint32_t count, const uint32_t *prefix_of, const uint8_t *const *prefix,
                     const size_t *prefix_len, const uint8_t *const *src, const size_t *srclen,
                     uint8_t *out, uint32_t *offsets)
{
    size_t at = 0;
    for (uint32_t i = 0; i < count; i++) {
        offsets[i] = (uint32_t)at;
        uint32_t p = prefix_of[i];
        if (p == SPLICE_NONE) continue;
        memcpy(out + at, prefix[p], prefix_len[p]);
        at += prefix_len[p];
        memcpy(out + at, src[i], srclen[i]);
        at += srclen[i];
    }
    offsets[count] = (uint32_t)at;
}

/* ---------------------------------------------------------------- reply body */

size_t reply_max_len(uint32_t count, const uint32_t *prot_of, const size_t *prot_len,
                     const uint32_t *pay_off, const uint32_t *sig_off, const size_t *refusal_len)
{
    size_t total = 1 + 8 + 9; /* {"results": array head} */
    for (uint32_t i = 0; i < count; i++) {
        if (prot_of[i] == REPLY_NONE) {
            total += refusal_len[i];
            continue;
        }
        size_t paylen = pay_off[i + 1] - pay_off[i], siglen = sig_off[i + 1] - sig_off[i];
        /* a2 63"hc1" text-head HC1 63"kid" 48 kid */
        total += 1 + 4 + 9 + dcc_hc1_max_len(prot_len[prot_of[i]], paylen, siglen) + 4 + 1 + 8;
    }
    return total;
}

int reply_encode(uint32_t count, int single, const uint32_t *prot_of, const uint8_t *const *prot,
                 const size_t *prot_len, const uint8_t *const *kid, const uint8_t *pay,
                 const uint32_t *pay_off, const uint8_t *sig, const uint32_t *sig_off,
                 const uint8_t *const *refusal, const size_t *refusal_len, int level,
                 uint8_t *scratch, char *hc1, uint8_t *out, size_t *outlen, uint32_t *bad,
                 const char **err)
{
    size_t at = 0;
    if (!single) {
        out[at++] = 0xa1;
        memcpy(out + at, "\x67results", 8);
        at += 8;
        at += dcc_cbor_head(out + at, 4, count);
    }
    for (uint32_t i = 0; i < count; i++) {
        uint32_t p = prot_of[i];
        if (p == REPLY_NONE) {
            memcpy(out + at, refusal[i], refusal_len[i]);
            at += refusal_len[i];
            continue;
        }
        size_t n = 0;
        int rc = dcc_hc1_encode_one(prot[p], prot_len[p], pay + pay_off[i],
                                    pay_off[i + 1] - pay_off[i], sig + sig_off[i],
                                    sig_off[i + 1] - sig_off[i], level, scratch, hc1, &n, err);
        if (rc != DCC_OK) return rc;
        if (n > REPLY_MAX_HC1) { /* ASCII: characters are bytes */
            *bad = i;
            return WALK_REFUSED;
        }
        out[at++] = 0xa2;
        memcpy(out + at, "\x63hc1", 4);
        at += 4;
        at += dcc_cbor_head(out + at, 3, n);
        memcpy(out + at, hc1, n);
        at += n;
        memcpy(out + at, "\x63kid\x48", 5);
        at += 5;
        memcpy(out + at, kid[p], 8);
        at += 8;
    }
    *outlen = at;
    return DCC_OK;
}
