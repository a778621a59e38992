/* The native DCC validator (see dccvalidate.h). The readable reference is engine/dcc/validate.py; the
 * comments name the Python function each part mirrors. Two passes over the bytes:
 *
 *  1. decodability (pre_item): would the decoder accept the bytes, and does this walker model
 *     its result exactly? Refusals the decoder would make give DV_UNDECODABLE; anything the
 *     second pass does not model gives DV_PUNT.
 *  2. validation (check_*): the rules of dcc.py over a map that is known to be clean (every
 *     item well formed, text valid UTF-8, map keys distinct, no tags), issues in the order the
 *     Python validator appends them. */
#include "dccvalidate.h"
#include "fnv1a.h"
#include "utf8.h"

#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------------------ value sets */

uint32_t dv_set_slots(uint32_t n)
{
    uint32_t slots = 8;
    while (slots < 2 * n + 2)
        slots <<= 1;
    return slots;
}

void dv_set_build(dv_set *set, const uint8_t *blob, const uint32_t *lens, uint32_t n,
                  uint32_t *slot, uint32_t *off, uint32_t *len)
{
    uint32_t slots = dv_set_slots(n), pos = 0;
    set->mask = slots - 1;
    set->slot = slot;
    set->off = off;
    set->len = len;
    set->blob = blob;
    memset(slot, 0, slots * sizeof(uint32_t));
    for (uint32_t i = 0; i < n; i++) {
        off[i] = pos;
        len[i] = lens[i];
        uint32_t j = (uint32_t)fnv1a(blob + pos, lens[i]) & set->mask;
        while (slot[j])
            j = (j + 1) & set->mask;
        slot[j] = i + 1;
        pos += lens[i];
    }
}

int dv_set_contains(const dv_set *set, const uint8_t *s, size_t n)
{
    if (set->slot == NULL)
        return 0;
    uint32_t j = (uint32_t)fnv1a(s, n) & set->mask;
    for (;;) {
        uint32_t k = set->slot[j];
        if (k == 0)
            return 0;
        k--;
        if (set->len[k] == n && memcmp(set->blob + set->off[k], s, n) == 0)
            return 1;
        j = (j + 1) & set->mask;
    }
}

/* ------------------------------------------------------------------------------ CBOR heads */

typedef struct {
    int major;
    int info;
    uint64_t arg;
    int indef;
    size_t start; /* the head's first byte */
    size_t data;  /* first byte after the head */
} head_t;

/* Reads the head at pos. -1: truncated, reserved info, or an indefinite length where none is
 * allowed, or a two-byte simple value below 32 (cbor2 refuses those). A lone break (0xff)
 * comes back as major 7 with indef set. */
static inline int read_head(const uint8_t *b, size_t len, size_t pos, head_t *h)
{
    if (pos >= len)
        return -1;
    uint8_t ib = b[pos];
    h->start = pos;
    h->major = ib >> 5;
    h->info = ib & 0x1f;
    h->indef = 0;
    pos++;
    if (h->info < 24) {
        h->arg = (uint64_t)h->info;
        h->data = pos;
        return 0;
    } else if (h->info == 31) {
        if (h->major == 0 || h->major == 1 || h->major == 6)
            return -1;
        h->indef = 1;
        h->arg = 0;
    } else if (h->info > 27) {
        return -1;
    } else {
        size_t size = (size_t)1 << (h->info - 24);
        if (len - pos < size)
            return -1;
        uint64_t v = 0;
        for (size_t i = 0; i < size; i++)
            v = (v << 8) | b[pos + i];
        pos += size;
        h->arg = v;
        if (h->major == 7 && h->info == 24 && v < 32)
            return -1;
    }
    h->data = pos;
    return 0;
}

/* The head at pos of bytes pass 1 has checked (no bounds checks, never fails). */
static inline void rd(const uint8_t *b, size_t pos, head_t *h)
{
    uint8_t ib = b[pos];
    h->start = pos;
    h->major = ib >> 5;
    h->info = ib & 0x1f;
    h->indef = h->info == 31;
    h->arg = h->info < 24 ? (uint64_t)h->info : 0;
    pos++;
    if (h->info >= 24 && h->info <= 27) {
        size_t size = (size_t)1 << (h->info - 24);
        uint64_t v = 0;
        for (size_t i = 0; i < size; i++)
            v = (v << 8) | b[pos + i];
        pos += size;
        h->arg = v;
    }
    h->data = pos;
}

/* Strict UTF-8 (what Python's and Rust's decoders accept): no overlongs, no surrogates, at
 * most U+10FFFF. */
static int utf8_ok(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        /* ASCII runs, eight bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t seq = utf8_sequence(s + i, n - i);
        if (!seq)
            return 0;
        i += seq;
    }
    return 1;
}

/* ------------------------------------------------------------------- pass 1: decodability */

#define PW_MAX_KEYS 32   /* maps with more entries are left to the Python twin */
#define PW_KEYD_DEPTH 32 /* so are deeper ones in keyd mode (strict mode is bounded by scan) */

enum { PW_OK = 0, PW_UNDECODABLE = 1, PW_PUNT = 2 };
#define PW_ENDS 16

typedef struct {
    const uint8_t *b;
    size_t len;
    size_t pos;
    int strict;
    int int_keys; /* keyd mode: integer map keys are modelled (as unknown fields / CWT claims) */
    uint64_t items; /* heads seen (strict mode: cborlimits.scan's count) */
    /* where the first PW_ENDS containers end, so that pass 2 skips them without a walk */
    int nends;
    size_t cstart[PW_ENDS], cend[PW_ENDS];
} pw_t;

typedef struct {
    int major;
    uint64_t arg;     /* integers: the value; strings: the joined length */
    const uint8_t *p; /* definite strings: the content */
    size_t pos;       /* chunked strings: the head */
    int indef;
    uint64_t packed; /* definite strings of at most 8 bytes: the content, zero-padded */
} pw_key;

#define KEY_JOIN 256 /* chunked keys longer than this are left to the Python twin */

/* The content of a string item at pos, its chunks joined into out (at most cap bytes).
 * Returns the joined length, or (size_t)-1 when it does not fit. */
static size_t join_str(const uint8_t *b, size_t len, size_t pos, uint8_t *out, size_t cap)
{
    head_t h;
    (void)len;
    rd(b, pos, &h);
    if (!h.indef) {
        if (h.arg > cap)
            return (size_t)-1;
        memcpy(out, b + h.data, (size_t)h.arg);
        return (size_t)h.arg;
    }
    size_t n = 0;
    pos = h.data;
    while (b[pos] != 0xff) {
        head_t k;
        rd(b, pos, &k);
        if (k.arg > cap - n)
            return (size_t)-1;
        memcpy(out + n, b + k.data, (size_t)k.arg);
        n += (size_t)k.arg;
        pos = k.data + (size_t)k.arg;
    }
    return n;
}

/* Whether two text/bytes keys of the same major type are equal (decoded, chunks joined);
 * -1 when a chunked key is too long to tell here. */
static int keys_equal(const pw_t *w, const pw_key *a, const pw_key *k)
{
    uint8_t ba[KEY_JOIN], bk[KEY_JOIN];
    const uint8_t *pa = a->p, *pk = k->p;
    if (a->arg != k->arg)
        return 0;
    if (a->indef) {
        if (join_str(w->b, w->len, a->pos, ba, sizeof ba) == (size_t)-1)
            return -1;
        pa = ba;
    }
    if (k->indef) {
        if (join_str(w->b, w->len, k->pos, bk, sizeof bk) == (size_t)-1)
            return -1;
        pk = bk;
    }
    return memcmp(pa, pk, (size_t)a->arg) == 0;
}

static int pre_item(pw_t *w, int depth);
static int pre_array(pw_t *w, const head_t *hp, int depth);

static int pre_string(pw_t *w, const head_t *h)
{
    if (!h->indef) {
        if (w->len - h->data < h->arg)
            return PW_UNDECODABLE;
        if (h->major == 3 && !utf8_ok(w->b + h->data, (size_t)h->arg))
            return PW_UNDECODABLE;
        w->pos = h->data + (size_t)h->arg;
        return PW_OK;
    }
    w->pos = h->data;
    for (;;) {
        if (w->pos >= w->len)
            return PW_UNDECODABLE;
        if (w->b[w->pos] == 0xff) {
            w->pos++;
            return PW_OK;
        }
        head_t c;
        if (read_head(w->b, w->len, w->pos, &c) < 0 || c.major != h->major || c.indef)
            return PW_UNDECODABLE;
        if (++w->items > DV_STRICT_MAX_ITEMS && w->strict)
            return PW_UNDECODABLE;
        if (w->len - c.data < c.arg)
            return PW_UNDECODABLE;
        /* Each chunk must be valid on its own (a code point split over chunks is refused). */
        if (h->major == 3 && !utf8_ok(w->b + c.data, (size_t)c.arg))
            return PW_UNDECODABLE;
        w->pos = c.data + (size_t)c.arg;
    }
}

static int pre_map(pw_t *w, const head_t *h, int depth)
{
    pw_key keys[PW_MAX_KEYS];
    int nkeys = 0, rc;
    uint64_t i = 0;
    w->pos = h->data;
    if (!h->indef && h->arg > (w->len - w->pos) / 2)
        return PW_UNDECODABLE; /* announces more entries than there are bytes */
    for (;;) {
        if (h->indef) {
            if (w->pos >= w->len)
                return PW_UNDECODABLE;
            if (w->b[w->pos] == 0xff) {
                w->pos++;
                return PW_OK;
            }
        } else if (i == h->arg) {
            return PW_OK;
        }
        i++;
        head_t k;
        if (read_head(w->b, w->len, w->pos, &k) < 0)
            return PW_UNDECODABLE;
        if (k.major == 7 && k.indef)
            return PW_UNDECODABLE; /* a break where a key belongs */
        int text_or_bytes = k.major == 2 || k.major == 3;
        int modelled = text_or_bytes || (w->int_keys && k.major <= 1);
        if (!modelled) {
            if (w->strict)
                return PW_UNDECODABLE; /* tags and non-text keys are refused */
            /* keyd: an int key equals a float or bool key of the same value in Python (1 ==
             * 1.0 == True), containers become tuples/frozendicts; leave all that to Python. */
            return PW_PUNT;
        }
        size_t kpos = w->pos;
        rc = pre_item(w, depth + 1);
        if (rc != PW_OK)
            return rc;
        if (nkeys == PW_MAX_KEYS)
            return PW_PUNT;
        pw_key *nk = &keys[nkeys];
        nk->major = k.major;
        nk->arg = k.arg;
        nk->p = w->b + k.data;
        nk->pos = kpos;
        nk->indef = k.indef;
        nk->packed = 0;
        if (!k.indef && k.major >= 2 && k.arg <= 8)
            memcpy(&nk->packed, nk->p, (size_t)k.arg);
        if (k.indef) {
            /* the joined length (the chunks are valid: pre_item checked them) */
            uint64_t total = 0;
            size_t q = k.data;
            while (w->b[q] != 0xff) {
                head_t c;
                rd(w->b, q, &c);
                total += c.arg;
                q = c.data + (size_t)c.arg;
            }
            nk->arg = total;
            if (total > KEY_JOIN)
                return PW_PUNT;
        }
        for (int j = 0; j < nkeys; j++) {
            int same;
            if (k.major <= 1 || keys[j].major <= 1)
                same = keys[j].major == k.major && keys[j].arg == k.arg;
            else if (keys[j].major != k.major || keys[j].arg != nk->arg)
                same = 0;
            else if (!nk->indef && !keys[j].indef && nk->arg <= 8)
                same = keys[j].packed == nk->packed;
            else
                same = keys_equal(w, &keys[j], nk);
            if (same < 0)
                return PW_PUNT;
            if (same)
                return w->strict ? PW_UNDECODABLE : PW_PUNT; /* keyd: the last one wins */
        }
        nkeys++;
        rc = pre_item(w, depth + 1);
        if (rc != PW_OK)
            return rc;
    }
}

/* One item at w->pos; depth counts the containers around it (the outermost item: 0). */
static int pre_item(pw_t *w, int depth)
{
    head_t h;
    if (read_head(w->b, w->len, w->pos, &h) < 0)
        return PW_UNDECODABLE;
    /* cborlimits.scan's limits, counted the same way (every head; the outermost item at
     * depth 0, a container or tag at depth d nests its contents at d + 1) */
    if (++w->items > DV_STRICT_MAX_ITEMS && w->strict)
        return PW_UNDECODABLE;
    if (w->strict && h.major >= 4 && h.major <= 6 &&
        depth + 1 > DV_STRICT_MAX_DEPTH)
        return PW_UNDECODABLE;
    switch (h.major) {
    case 0:
    case 1:
        w->pos = h.data;
        return PW_OK;
    case 2:
    case 3:
        return pre_string(w, &h);
    case 6:
        /* strict: every tag is refused; keyd: cbor2 turns tags into dates, bignums, sets,
         * shared values... (or passes 55799 through): the Python twin decides. */
        return w->strict ? PW_UNDECODABLE : PW_PUNT;
    case 7:
        if (h.indef)
            return PW_UNDECODABLE; /* a break outside an indefinite-length item */
        w->pos = h.data;
        return PW_OK;
    default:
        break;
    }
    if (!w->strict && depth + 1 > PW_KEYD_DEPTH)
        return PW_PUNT;
    int rc = h.major == 5 ? pre_map(w, &h, depth) : pre_array(w, &h, depth);
    if (rc == PW_OK && w->nends < PW_ENDS) {
        w->cstart[w->nends] = h.start;
        w->cend[w->nends++] = w->pos;
    }
    return rc;
}

static int pre_array(pw_t *w, const head_t *hp, int depth)
{
    head_t h = *hp;
    w->pos = h.data;
    if (!h.indef && h.arg > w->len - w->pos)
        return PW_UNDECODABLE;
    for (uint64_t i = 0;; i++) {
        if (h.indef) {
            if (w->pos >= w->len)
                return PW_UNDECODABLE;
            if (w->b[w->pos] == 0xff) {
                w->pos++;
                return PW_OK;
            }
        } else if (i == h.arg) {
            return PW_OK;
        }
        int rc = pre_item(w, depth + 1);
        if (rc != PW_OK)
            return rc;
    }
}

/* ------------------------------------------------------------------- pass 2: the rules */

typedef struct {
    int max_len;
    int dose_max;
    int dob_partial;
    int dob_empty;
    int tt_coded;
    int has_dr;
    int tc_required;
    int fnt_required;
} prof_t;

/* dcc.py's _Profile instances (DOSE_MAX = 99 from schema 1.3.0). */
static const prof_t P100 = {50, 9, 0, 0, 0, 1, 1, 1};
static const prof_t P101 = {50, 9, 0, 0, 1, 1, 1, 1};
static const prof_t P110 = {50, 9, 1, 0, 1, 1, 1, 1};
static const prof_t P120 = {50, 9, 1, 0, 1, 0, 1, 1};
static const prof_t P130 = {80, 99, 1, 1, 1, 0, 0, 1};
static const prof_t P132 = {80, 99, 1, 1, 1, 0, 0, 0};

#define SCRATCH 2048

typedef struct {
    const dv_rules *rules;
    const uint8_t *b;
    size_t len;
    size_t base; /* offset of b in the caller's buffer (for key offsets) */
    const char *today;
    dv_issues *out;
    int nissues;
    int punt;
    const prof_t *pf;
    int nfc;           /* DV_NFC */
    const pw_t *ends; /* pass 1's container ends (positions relative to b + ... see skip) */
    uint8_t scratch[SCRATCH];
} vctx;

typedef struct {
    const uint8_t *p;
    size_t n; /* bytes */
} str_t;

enum { K_INT, K_STR, K_BYTES, K_LIST, K_MAP, K_OTHER };

static inline void hd(const vctx *c, size_t pos, head_t *h)
{
    rd(c->b, pos, h); /* pass 1 has checked every head */
}

/* The kind of each CBOR major type (a head's major is 0..7): a tag (6) and bool, null,
 * undefined, simple values and floats (7) are none of the kinds the rules ask for. */
static const int KIND_OF_MAJOR[8] = {K_INT, K_INT, K_BYTES, K_STR, K_LIST, K_MAP, K_OTHER, K_OTHER};

static int kind_at(const vctx *c, size_t pos)
{
    head_t h;
    hd(c, pos, &h);
    return KIND_OF_MAJOR[h.major];
}

static size_t skip(const vctx *c, size_t pos)
{
    head_t h;
    hd(c, pos, &h);
    switch (h.major) {
    case 0:
    case 1:
    case 7:
        return h.data;
    case 2:
    case 3:
        if (!h.indef)
            return h.data + (size_t)h.arg;
        pos = h.data;
        while (c->b[pos] != 0xff) {
            head_t k;
            hd(c, pos, &k);
            pos = k.data + (size_t)k.arg;
        }
        return pos + 1;
    default: {
        const pw_t *e = c->ends;
        if (e) {
            for (int i = 0; i < e->nends; i++)
                if (e->cstart[i] == pos + c->base)
                    return e->cend[i] - c->base;
        }
        uint64_t per = h.major == 5 ? 2 : 1;
        pos = h.data;
        if (h.indef) {
            while (c->b[pos] != 0xff)
                pos = skip(c, pos);
            return pos + 1;
        }
        for (uint64_t i = 0; i < h.arg * per; i++)
            pos = skip(c, pos);
        return pos;
    }
    }
}

static size_t count_cps(const uint8_t *p, size_t n);

/* More than limit code points? (A text of at most limit bytes never is: no counting.) */
static int too_long(const str_t *s, size_t limit)
{
    return s->n > limit && count_cps(s->p, s->n) > limit;
}

static size_t count_cps(const uint8_t *p, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += (p[i] & 0xc0) != 0x80;
    return k;
}

/* The text at pos (a text item). A chunked text longer than the scratch buffer sets punt. */
static void get_str(vctx *c, size_t pos, str_t *s)
{
    head_t h;
    hd(c, pos, &h);
    if (!h.indef) {
        s->p = c->b + h.data;
        s->n = (size_t)h.arg;
    } else {
        size_t n = 0;
        pos = h.data;
        while (c->b[pos] != 0xff) {
            head_t k;
            hd(c, pos, &k);
            if (k.arg > SCRATCH - n) {
                c->punt = 1;
                break;
            }
            memcpy(c->scratch + n, c->b + k.data, (size_t)k.arg);
            n += (size_t)k.arg;
            pos = k.data + (size_t)k.arg;
        }
        s->p = c->scratch;
        s->n = n;
    }
}

static void add(vctx *c, int rule, const char *path, size_t key_pos)
{
    c->nissues++;
    dv_issues *o = c->out;
    if (o == NULL)
        return;
    if (o->n >= o->cap) {
        o->overflow = 1;
        return;
    }
    dv_issue *i = &o->items[o->n++];
    i->rule = (uint8_t)rule;
    i->key_off = key_pos ? (uint32_t)(key_pos + c->base) : 0;
    size_t n = strlen(path);
    if (n >= DV_PATH_MAX)
        n = DV_PATH_MAX - 1; /* never in practice: keys past 40 characters go by reference */
    memcpy(i->path, path, n);
    i->path[n] = '\0';
}

static void add2(vctx *c, int rule, const char *prefix, const char *key)
{
    char path[2 * DV_PATH_MAX]; /* add() keeps what fits */
    snprintf(path, sizeof path, "%s.%s", prefix, key);
    add(c, rule, path, 0);
}

/* Identifier keys of at most 40 characters print as .key (dcc.validate.child_path); others
 * by reference. */
static int ident_key(const str_t *k)
{
    if (k->n == 0 || k->n > 40)
        return 0;
    for (size_t i = 0; i < k->n; i++) {
        uint8_t ch = k->p[i];
        int alpha = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || ch == '_';
        if (!alpha && !(i > 0 && ch >= '0' && ch <= '9'))
            return 0;
    }
    return 1;
}

static inline uint32_t pack3(const uint8_t *p, size_t n)
{
    uint32_t v = (uint32_t)n << 24;
    for (size_t i = 0; i < n; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}

/* Collects the values of the named fields of the map at mpos (0 = absent) and reports every
 * other key as unknown-field, in map order (dcc._unknown_fields). nallowed: how many of names
 * are allowed (a name past it is reported, never looked up). */
static void fields(vctx *c, size_t mpos, const char *const *names, int nallowed, size_t *vals,
                   const char *prefix)
{
    head_t h;
    hd(c, mpos, &h);
    size_t pos = h.data;
    uint32_t packed[16]; /* names are 1-3 bytes: compare them as length + bytes in one word */
    for (int i = 0; i < nallowed; i++) {
        vals[i] = 0;
        packed[i] = pack3((const uint8_t *)names[i], strlen(names[i]));
    }
    for (uint64_t i = 0;; i++) {
        if (h.indef ? c->b[pos] == 0xff : i == h.arg)
            break;
        size_t kpos = pos;
        head_t k;
        hd(c, kpos, &k);
        size_t vpos = skip(c, kpos);
        int known = 0;
        if (k.major == 3) {
            uint8_t joined[KEY_JOIN]; /* pass 1 left longer chunked keys to Python */
            str_t ks = {c->b + k.data, (size_t)k.arg};
            if (k.indef) {
                ks.n = join_str(c->b, c->len, kpos, joined, sizeof joined);
                ks.p = joined;
            }
            uint32_t kp = ks.n <= 3 ? pack3(ks.p, ks.n) : 0;
            for (int j = 0; ks.n <= 3 && j < nallowed; j++) {
                if (packed[j] == kp) {
                    vals[j] = vpos;
                    known = 1;
                    break;
                }
            }
            if (!known) {
                if (ident_key(&ks)) {
                    char path[DV_PATH_MAX];
                    snprintf(path, sizeof path, "%s.%.*s", prefix, (int)ks.n, (const char *)ks.p);
                    add(c, DV_RULE_UNKNOWN_FIELD, path, 0);
                } else {
                    add(c, DV_RULE_UNKNOWN_FIELD, prefix, kpos);
                }
            }
        } else {
            add(c, DV_RULE_UNKNOWN_FIELD, prefix, kpos);
        }
        pos = skip(c, vpos);
    }
}

/* The text of field prefix.key at vpos into *s and 1; else 0, with the rule it breaks: REQUIRED
 * when it is absent (0: the field is optional) and `required`, TYPE when it is not text. The
 * opening of every text field's check (dcc._text, dcc._code, dcc._date, ...). */
static inline int field_text(vctx *c, size_t vpos, const char *prefix, const char *key,
                             int required, str_t *s)
{
    if (!vpos) {
        if (required)
            add2(c, DV_RULE_REQUIRED, prefix, key);
        return 0;
    }
    if (kind_at(c, vpos) != K_STR) {
        add2(c, DV_RULE_TYPE, prefix, key);
        return 0;
    }
    get_str(c, vpos, s);
    return 1;
}

/* dcc._text: free text within the version's limit (optionally non-empty). */
static int check_text(vctx *c, size_t vpos, const char *prefix, const char *key, int required,
                      int nonempty)
{
    str_t s;
    if (!field_text(c, vpos, prefix, key, required, &s))
        return 0;
    if (too_long(&s, (size_t)c->pf->max_len)) {
        add2(c, DV_RULE_MAX_LENGTH, prefix, key);
        return 0;
    }
    if (s.n == 0 && nonempty) {
        add2(c, DV_RULE_EMPTY, prefix, key);
        return 0;
    }
    /* "encoding" (lone surrogates) cannot happen: pass 1 refused invalid UTF-8. */
    return 1;
}

/* dcc._code */
static void check_code(vctx *c, size_t vpos, const char *prefix, const char *key, int set)
{
    str_t s;
    if (!field_text(c, vpos, prefix, key, 1, &s))
        return;
    if (!dv_set_contains(&c->rules->sets[set], s.p, s.n))
        add2(c, DV_RULE_VALUE_SET, prefix, key);
}

static int digits(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

static int num2(const uint8_t *s) { return (s[0] - '0') * 10 + (s[1] - '0'); }

/* dcc._is_date: YYYY-MM-DD (ASCII digits) that date.fromisoformat accepts: year 1-9999, a
 * real month and day of the proleptic Gregorian calendar. */
static int is_date(const uint8_t *s, size_t n)
{
    if (n != 10 || s[4] != '-' || s[7] != '-' || !digits(s, 4) || !digits(s + 5, 2) ||
        !digits(s + 8, 2))
        return 0;
    int y = num2(s) * 100 + num2(s + 2), m = num2(s + 5), d = num2(s + 8);
    static const int dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1 || m < 1 || m > 12 || d < 1)
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return d <= dim[m - 1] + (m == 2 && leap);
}

/* dcc._date; copies a valid date into out (10 bytes) and returns 1. */
static int check_date(vctx *c, size_t vpos, const char *prefix, const char *key, char *out)
{
    str_t s;
    if (!field_text(c, vpos, prefix, key, 1, &s))
        return 0;
    if (!is_date(s.p, s.n)) {
        add2(c, DV_RULE_DATE, prefix, key);
        return 0;
    }
    if (out)
        memcpy(out, s.p, 10);
    return 1;
}

/* dcc._DATETIME_RE (fullmatch) and a real calendar date. */
static int is_datetime(const uint8_t *s, size_t n)
{
    if (n < 20 || !is_date(s, 10) || (s[10] != 'T' && s[10] != 't'))
        return 0;
    const uint8_t *t = s + 11;
    if (!digits(t, 2) || t[2] != ':' || !digits(t + 3, 2) || t[5] != ':' || !digits(t + 6, 2))
        return 0;
    if (num2(t) > 23 || t[3] > '5' || t[6] > '5')
        return 0;
    size_t i = 19;
    if (i < n && s[i] == '.') {
        size_t j = i + 1;
        while (j < n && s[j] >= '0' && s[j] <= '9' && j - i <= 9)
            j++;
        if (j == i + 1)
            return 0;
        i = j;
    }
    if (i >= n)
        return 0;
    if (s[i] == 'Z' || s[i] == 'z')
        return i + 1 == n;
    if (s[i] != '+' && s[i] != '-')
        return 0;
    const uint8_t *o = s + i + 1;
    if (n - i != 6 || !digits(o, 2) || o[2] != ':' || !digits(o + 3, 2))
        return 0;
    return num2(o) <= 23 && o[3] <= '5';
}

/* dcc._datetime (presence handled by the caller) */
static void check_datetime(vctx *c, size_t vpos, const char *prefix, const char *key)
{
    if (kind_at(c, vpos) != K_STR) {
        add2(c, DV_RULE_TYPE, prefix, key);
        return;
    }
    str_t s;
    get_str(c, vpos, &s);
    if (!is_datetime(s.p, s.n))
        add2(c, DV_RULE_DATE_TIME, prefix, key);
}

/* dcc._dose */
static void check_dose(vctx *c, size_t vpos, const char *prefix, const char *key)
{
    if (!vpos) {
        add2(c, DV_RULE_REQUIRED, prefix, key);
        return;
    }
    head_t h;
    hd(c, vpos, &h);
    if (h.major > 1) {
        add2(c, DV_RULE_TYPE, prefix, key); /* bool and float included */
        return;
    }
    if (h.major == 1 || h.arg < 1 || h.arg > (uint64_t)c->pf->dose_max)
        add2(c, DV_RULE_RANGE, prefix, key);
}

static int luhn_value(uint8_t ch)
{
    if (ch >= 'A' && ch <= 'Z')
        return ch - 'A';
    if (ch >= '0' && ch <= '9')
        return 26 + ch - '0';
    return ch == '/' ? 36 : 37;
}

static const char LUHN_ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:";

char dv_luhn38(const uint8_t *s, size_t n)
{
    /* uvci._luhn_total: the rightmost value and every second one to its left are doubled and
     * folded back (base-38 digits added); the check character makes the sum 0 mod 38. */
    unsigned long sum = 0;
    for (size_t i = 0; i < n; i++) {
        int v = luhn_value(s[i]);
        if ((i & 1) == ((n - 1) & 1)) {
            v *= 2;
            v = v / 38 + v % 38;
        }
        sum += (unsigned long)v;
    }
    return LUHN_ALPHABET[(38 - sum % 38) % 38];
}

static int upper(uint8_t ch) { return ch >= 'A' && ch <= 'Z'; }
static int alnum(uint8_t ch) { return upper(ch) || (ch >= '0' && ch <= '9'); }

/* uvci.check_uvci: 0 canonical, else the rule. */
static int uvci_rule(const uint8_t *s, size_t n)
{
    static const char prefix[] = "URN:UVCI:01:";
    if (n < 16 || memcmp(s, prefix, 12) != 0 || !upper(s[12]) || !upper(s[13]) || s[14] != ':')
        return DV_RULE_UVCI_GRAMMAR;
    size_t i = 15;
    for (int parts = 0;;) {
        size_t j = i;
        while (j < n && alnum(s[j]))
            j++;
        if (j == i)
            return DV_RULE_UVCI_GRAMMAR;
        parts++;
        i = j;
        if (i < n && s[i] == '/' && parts < 3) {
            i++;
            continue;
        }
        break;
    }
    if (i == n)
        return 0;
    if (s[i] != '#' || i + 2 != n || !(alnum(s[i + 1]) || s[i + 1] == '/' || s[i + 1] == ':'))
        return DV_RULE_UVCI_GRAMMAR;
    return dv_luhn38(s, n - 2) == (char)s[n - 1] ? 0 : DV_RULE_UVCI_CHECKSUM;
}

/* dcc._uvci */
static void check_ci(vctx *c, size_t vpos, const char *prefix)
{
    str_t s;
    if (!field_text(c, vpos, prefix, "ci", 1, &s))
        return;
    if (too_long(&s, (size_t)c->pf->max_len)) {
        add2(c, DV_RULE_MAX_LENGTH, prefix, "ci");
        return;
    }
    int rule = uvci_rule(s.p, s.n);
    if (rule)
        add2(c, rule, prefix, "ci");
}

/* fnt/gnt alphabet: A-Z and '<' */
static int translit_chars(const str_t *s)
{
    for (size_t i = 0; i < s->n; i++)
        if (!upper(s->p[i]) && s->p[i] != '<')
            return 0;
    return 1;
}

/* dcc._translit after the quick test failed (value present) */
static int check_translit(vctx *c, size_t vpos, const char *key)
{
    if (!check_text(c, vpos, "$.nam", key, 1, 0))
        return 0;
    str_t s;
    get_str(c, vpos, &s);
    if (translit_chars(&s))
        return 1;
    add2(c, DV_RULE_PATTERN, "$.nam", key);
    return 0;
}

static const char *const NAM_KEYS[] = {"fn", "fnt", "gn", "gnt"};

/* Whether NFC leaves the text as it is, provably: every code point in the inert table. */
static int nfc_inert(const vctx *c, const str_t *s)
{
    const uint8_t *bits = c->rules->nfc_inert;
    size_t i = 0;
    while (i < s->n) {
        uint8_t b = s->p[i];
        uint32_t cp;
        if (b < 0x80) {
            i++;
            continue; /* ASCII is inert */
        }
        if (b < 0xe0) {
            cp = (uint32_t)(b & 0x1f) << 6 | (s->p[i + 1] & 0x3f);
            i += 2;
        } else if (b < 0xf0) {
            cp = (uint32_t)(b & 0x0f) << 12 | (uint32_t)(s->p[i + 1] & 0x3f) << 6 |
                 (s->p[i + 2] & 0x3f);
            i += 3;
        } else {
            return 0; /* beyond the table */
        }
        if (bits == NULL || cp >= DV_NFC_LIMIT || !(bits[cp >> 3] & (1u << (cp & 7))))
            return 0;
    }
    return 1;
}

/* dcc._check_nam */
static void check_nam(vctx *c, size_t pos)
{
    if (kind_at(c, pos) != K_MAP) {
        add(c, DV_RULE_TYPE, "$.nam", 0);
        return;
    }
    size_t v[4];
    fields(c, pos, NAM_KEYS, 4, v, "$.nam");
    for (int i = 0; c->nfc && i < 4; i += 2) {
        if (v[i] && kind_at(c, v[i]) == K_STR) {
            str_t s;
            get_str(c, v[i], &s);
            if (!nfc_inert(c, &s))
                c->punt = 1; /* chain._nfc might change it: the Python twin decides */
        }
    }
    if (v[0]) /* fn and gn are optional: checked when present */
        check_text(c, v[0], "$.nam", "fn", 1, 0);
    if (v[2])
        check_text(c, v[2], "$.nam", "gn", 1, 0);
    size_t fnt = v[1], gnt = v[3];
    int ok[2] = {0, 0}, nonempty[2] = {0, 0};
    size_t at[2] = {fnt, gnt};
    const char *names[2] = {"fnt", "gnt"};
    for (int i = 0; i < 2; i++) {
        if (!at[i])
            continue;
        if (kind_at(c, at[i]) == K_STR) {
            str_t s;
            get_str(c, at[i], &s);
            nonempty[i] = s.n > 0;
            if (!too_long(&s, (size_t)c->pf->max_len) && translit_chars(&s)) {
                ok[i] = 1;
                continue;
            }
        }
        ok[i] = check_translit(c, at[i], names[i]);
    }
    if (ok[0] && nonempty[0])
        return;
    if (!fnt) {
        if (c->pf->fnt_required)
            add(c, DV_RULE_REQUIRED, "$.nam.fnt", 0);
        else if (!gnt)
            add(c, DV_RULE_REQUIRED, "$.nam", 0);
    }
    if ((ok[0] || ok[1]) && !nonempty[0] && !nonempty[1])
        add(c, DV_RULE_EMPTY, "$.nam", 0);
}

/* dcc._dob (and the quick test before it) */
static void check_dob(vctx *c, size_t pos)
{
    if (!pos) {
        add(c, DV_RULE_REQUIRED, "$.dob", 0);
        return;
    }
    if (kind_at(c, pos) != K_STR) {
        add(c, DV_RULE_TYPE, "$.dob", 0);
        return;
    }
    str_t s;
    get_str(c, pos, &s);
    const uint8_t *d = s.p;
    size_t n = s.n;
    if (n == 0 && c->pf->dob_empty)
        return;
    /* the version's dob_re: (19|20)YY, then -MM and -DD (partial forms where allowed) */
    int shaped = (n == 10 || (c->pf->dob_partial && (n == 4 || n == 7))) && n >= 4 &&
                 ((d[0] == '1' && d[1] == '9') || (d[0] == '2' && d[1] == '0')) &&
                 digits(d + 2, 2) && (n < 7 || (d[4] == '-' && digits(d + 5, 2))) &&
                 (n < 10 || (d[7] == '-' && digits(d + 8, 2)));
    if (!shaped) {
        add(c, DV_RULE_DATE, "$.dob", 0);
        return;
    }
    if ((n == 10 && !is_date(d, n)) || (n == 7 && !(num2(d + 5) >= 1 && num2(d + 5) <= 12))) {
        add(c, DV_RULE_DATE, "$.dob", 0);
        return;
    }
    if (memcmp(d, c->today, n) > 0)
        add(c, DV_RULE_RANGE, "$.dob", 0);
}

static const char *const V_KEYS[] = {"tg", "vp", "mp", "ma", "dn", "sd", "dt", "co", "is", "ci"};
static const char *const T_KEYS[] = {"tg", "tt", "nm", "ma", "sc", "tr", "tc", "co", "is", "ci",
                                     "dr"};
static const char *const R_KEYS[] = {"tg", "fr", "co", "is", "df", "du", "ci"};

/* dcc._check_co_is */
static void check_co_is(vctx *c, size_t co, size_t is, const char *p)
{
    check_code(c, co, p, "co", DV_SET_CO);
    check_text(c, is, p, "is", 1, 1);
}

static void check_v(vctx *c, size_t pos, const char *p)
{
    size_t f[10];
    fields(c, pos, V_KEYS, 10, f, p);
    check_code(c, f[0], p, "tg", DV_SET_TG);
    check_code(c, f[1], p, "vp", DV_SET_VP);
    check_code(c, f[2], p, "mp", DV_SET_MP);
    check_code(c, f[3], p, "ma", DV_SET_VMA);
    check_dose(c, f[4], p, "dn");
    check_dose(c, f[5], p, "sd");
    check_date(c, f[6], p, "dt", NULL);
    check_co_is(c, f[7], f[8], p);
    check_ci(c, f[9], p);
}

static void check_t(vctx *c, size_t pos, const char *p)
{
    size_t f[11];
    const prof_t *pf = c->pf;
    fields(c, pos, T_KEYS, pf->has_dr ? 11 : 10, f, p);
    check_code(c, f[0], p, "tg", DV_SET_TG);
    if (!pf->tt_coded)
        check_text(c, f[1], p, "tt", 1, 1);
    else
        check_code(c, f[1], p, "tt", DV_SET_TT);
    if (f[2])
        check_text(c, f[2], p, "nm", 1, 1);
    if (f[3]) {
        if (c->rules->has_test_manf)
            check_code(c, f[3], p, "ma", DV_SET_TEST_MANF);
        else
            check_text(c, f[3], p, "ma", 1, 1);
    }
    if (!f[4])
        add2(c, DV_RULE_REQUIRED, p, "sc");
    else
        check_datetime(c, f[4], p, "sc");
    if (pf->has_dr && f[10])
        check_datetime(c, f[10], p, "dr");
    check_code(c, f[5], p, "tr", DV_SET_TR);
    if (f[6] || pf->tc_required)
        check_text(c, f[6], p, "tc", 1, 1);
    check_co_is(c, f[7], f[8], p);
    check_ci(c, f[9], p);
}

static void check_r(vctx *c, size_t pos, const char *p)
{
    size_t f[7];
    char df[10], du[10];
    fields(c, pos, R_KEYS, 7, f, p);
    check_code(c, f[0], p, "tg", DV_SET_TG);
    check_date(c, f[1], p, "fr", NULL);
    check_co_is(c, f[2], f[3], p);
    int df_ok = check_date(c, f[4], p, "df", df);
    int du_ok = check_date(c, f[5], p, "du", du);
    if (df_ok && du_ok && memcmp(du, df, 10) < 0)
        add2(c, DV_RULE_DATE_ORDER, p, "du");
    check_ci(c, f[6], p);
}

static const char *const TOP_KEYS[] = {"ver", "nam", "dob", "v", "t", "r"};

/* dcc._profile_for on a ver text (NULL: not 1.0.x-1.3.x) */
static const prof_t *profile_for(const uint8_t *s, size_t n)
{
    if (n < 5 || s[0] != '1' || s[1] != '.' || s[2] < '0' || s[2] > '3' || s[3] != '.')
        return NULL;
    const uint8_t *patch = s + 4;
    size_t pn = n - 4;
    if (!digits(patch, pn) || (pn > 1 && patch[0] == '0'))
        return NULL;
    int zero = pn == 1 && patch[0] == '0', one = pn == 1 && patch[0] == '1';
    switch (s[2]) {
    case '0':
        return zero ? &P100 : &P101;
    case '1':
        return &P110;
    case '2':
        return &P120;
    default:
        return zero || one ? &P130 : &P132;
    }
}

/* dcc._check: the DCC map at offset 0 of c->b. Returns DV_V/T/R or DV_INVALID. */
static int check_dcc(vctx *c)
{
    if (kind_at(c, 0) != K_MAP) {
        add(c, DV_RULE_TYPE, "$", 0);
        return DV_INVALID;
    }
    size_t f[6];
    fields(c, 0, TOP_KEYS, 6, f, "$");
    c->pf = NULL;
    if (!f[0]) {
        add(c, DV_RULE_REQUIRED, "$.ver", 0);
    } else if (kind_at(c, f[0]) != K_STR) {
        add(c, DV_RULE_TYPE, "$.ver", 0);
    } else {
        str_t s;
        get_str(c, f[0], &s);
        c->pf = profile_for(s.p, s.n);
        if (c->pf == NULL)
            add(c, DV_RULE_VERSION, "$.ver", 0);
    }
    if (c->pf == NULL)
        c->pf = &P132; /* keep checking under the newest rules */
    if (!f[1])
        add(c, DV_RULE_REQUIRED, "$.nam", 0);
    else
        check_nam(c, f[1]);
    check_dob(c, f[2]);

    int found = 0, kind = -1;
    for (int g = 0; g < 3; g++)
        if (f[3 + g]) {
            found++;
            kind = g;
        }
    if (found != 1)
        add(c, DV_RULE_ONE_GROUP, "$", 0);
    static const char *const gname[] = {"v", "t", "r"};
    for (int g = 0; g < 3; g++) {
        size_t gpos = f[3 + g];
        if (!gpos)
            continue;
        char path[DV_PATH_MAX];
        snprintf(path, sizeof path, "$.%s", gname[g]);
        if (kind_at(c, gpos) != K_LIST) {
            add(c, DV_RULE_TYPE, path, 0);
            continue;
        }
        head_t h;
        hd(c, gpos, &h);
        uint64_t n = 0;
        size_t pos = h.data;
        if (h.indef) {
            while (c->b[pos] != 0xff) {
                pos = skip(c, pos);
                n++;
            }
        } else {
            n = h.arg;
        }
        if (n != 1)
            add(c, DV_RULE_ONE_ENTRY, path, 0);
        pos = h.data;
        for (uint64_t i = 0; i < n; i++) {
            char p[DV_PATH_MAX];
            snprintf(p, sizeof p, "$.%s[%llu]", gname[g], (unsigned long long)i);
            if (kind_at(c, pos) != K_MAP)
                add(c, DV_RULE_TYPE, p, 0);
            else if (g == 0)
                check_v(c, pos, p);
            else if (g == 1)
                check_t(c, pos, p);
            else
                check_r(c, pos, p);
            pos = skip(c, pos);
        }
    }
    if (c->nissues || found != 1)
        return DV_INVALID;
    return kind;
}

static int run(const dv_rules *rules, const uint8_t *buf, size_t len, size_t base,
               const char *today, dv_issues *issues, const pw_t *ends, int nfc)
{
    vctx c;
    c.ends = ends;
    c.nfc = nfc;
    c.rules = rules;
    c.b = buf;
    c.len = len;
    c.base = base;
    c.today = today;
    c.out = issues;
    c.nissues = 0;
    c.punt = 0;
    c.pf = &P132;
    int rc = check_dcc(&c);
    return c.punt ? DV_PUNT : rc;
}

/* Clears *issues* and runs pass 1 over the one item that must fill w's buffer: -1 when it
 * passed, else the verdict (DV_UNDECODABLE, DV_PUNT). */
static int first_pass(pw_t *w, dv_issues *issues)
{
    if (issues) {
        issues->n = 0;
        issues->overflow = 0;
    }
    int rc = pre_item(w, 0);
    if (rc == PW_UNDECODABLE)
        return DV_UNDECODABLE;
    if (rc == PW_PUNT)
        return DV_PUNT;
    if (w->pos != w->len)
        return DV_UNDECODABLE; /* trailing bytes */
    return -1;
}

int dv_validate(const dv_rules *rules, const uint8_t *buf, size_t len, const char *today,
                int flags, dv_issues *issues)
{
    int strict = (flags & DV_STRICT) != 0;
    /* strict: pass 1 also enforces cborlimits.scan's limits, as the Python twin's decode does */
    pw_t w = {buf, len, 0, strict, !strict, 0, 0, {0}, {0}};
    int verdict = first_pass(&w, issues);
    if (verdict >= 0)
        return verdict;
    return run(rules, buf, len, 0, today, issues, &w, (flags & DV_NFC) != 0);
}

int dv_validate_cwt(const dv_rules *rules, const uint8_t *buf, size_t len, const char *today,
                    dv_issues *issues)
{
    pw_t w = {buf, len, 0, 0, 1, 0, 0, {0}, {0}};
    int verdict = first_pass(&w, issues);
    if (verdict >= 0)
        return verdict;
    /* The claims: a map (keys distinct, pass 1) holding -260 = {1: DCC} and nothing odd. */
    vctx c;
    c.b = buf;
    c.len = len;
    c.base = 0;
    c.ends = &w;
    head_t h;
    hd(&c, 0, &h);
    if (h.major != 5)
        return DV_PUNT;
    size_t pos = h.data, dcc = 0;
    for (uint64_t i = 0;; i++) {
        if (h.indef ? buf[pos] == 0xff : i == h.arg)
            break;
        head_t k;
        hd(&c, pos, &k);
        size_t vpos = skip(&c, pos);
        if (k.major == 1 && k.arg == 259) {
            head_t m;
            hd(&c, vpos, &m);
            if (m.major != 5 || m.indef || m.arg != 1)
                return DV_PUNT;
            head_t k1;
            hd(&c, m.data, &k1);
            if (k1.major != 0 || k1.arg != 1)
                return DV_PUNT;
            dcc = skip(&c, m.data);
        }
        pos = skip(&c, vpos);
    }
    if (!dcc)
        return DV_PUNT;
    size_t end = skip(&c, dcc);
    return run(rules, buf + dcc, end - dcc, dcc, today, issues, &w, 0);
}
