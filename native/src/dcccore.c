/*
 * dcccore.c: see dcccore.h for the contracts.
 */
#include "dcccore.h"
#include "smalldeflate.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <libdeflate.h>
#include <zlib.h>

/* ======================================================================== base45 */

static const char B45_ALPHABET[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

/* Reverse table: 255 marks a character outside the alphabet (lower case included, RFC 9285
 * §4: decoders must reject it, TD common/B1). */
static uint8_t b45_value[256];
static pthread_once_t b45_once = PTHREAD_ONCE_INIT;

static void b45_init(void)
{
    memset(b45_value, 255, sizeof b45_value);
    for (int i = 0; i < 45; i++)
        b45_value[(uint8_t)B45_ALPHABET[i]] = (uint8_t)i;
}

size_t dcc_b45_encoded_len(size_t n) { return (n / 2) * 3 + (n % 2) * 2; }

size_t dcc_b45_encode(const uint8_t *in, size_t n, char *out)
{
    char *o = out;
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
        /* Least significant digit first (RFC 9285 §4). */
        unsigned v = ((unsigned)in[i] << 8) | in[i + 1];
        o[0] = B45_ALPHABET[v % 45];
        v /= 45;
        o[1] = B45_ALPHABET[v % 45];
        o[2] = B45_ALPHABET[v / 45];
        o += 3;
    }
    if (i < n) {
        unsigned v = in[i];
        o[0] = B45_ALPHABET[v % 45];
        o[1] = B45_ALPHABET[v / 45];
        o += 2;
    }
    return (size_t)(o - out);
}

int dcc_b45_decode(const char *in, size_t n, uint8_t *out, size_t *outlen, size_t *errpos)
{
    pthread_once(&b45_once, b45_init);
    if (n % 3 == 1) {
        *errpos = n;
        return DCC_ERR_B45_LENGTH;
    }
    uint8_t *o = out;
    size_t i = 0;
    for (; i < n; i += 3) {
        size_t chunk = (n - i >= 3) ? 3 : 2;
        unsigned v = 0, mul = 1;
        for (size_t j = 0; j < chunk; j++) {
            uint8_t d = b45_value[(uint8_t)in[i + j]];
            if (d == 255) {
                *errpos = i + j;
                return DCC_ERR_B45_CHAR;
            }
            v += d * mul;
            mul *= 45;
        }
        if (chunk == 3) {
            if (v > 0xFFFF) {
                *errpos = i;
                return DCC_ERR_B45_OVERFLOW;
            }
            *o++ = (uint8_t)(v >> 8);
            *o++ = (uint8_t)(v & 0xFF);
        } else {
            if (v > 0xFF) {
                *errpos = i;
                return DCC_ERR_B45_OVERFLOW;
            }
            *o++ = (uint8_t)v;
        }
    }
    *outlen = (size_t)(o - out);
    return DCC_OK;
}

/* ======================================================================== CBOR */

size_t dcc_cbor_head_len(uint64_t val)
{
    if (val < 24) return 1;
    if (val <= 0xFF) return 2;
    if (val <= 0xFFFF) return 3;
    if (val <= 0xFFFFFFFFULL) return 5;
    return 9;
}

/* Shortest-form head: the protected header and COSE framing must be canonical so that
 * verifiers which re-encode (dcc-spec-notes §1.2) get the same bytes. */
size_t dcc_cbor_head(uint8_t *out, unsigned major, uint64_t val)
{
    uint8_t mt = (uint8_t)(major << 5);
    if (val < 24) {
        out[0] = mt | (uint8_t)val;
        return 1;
    }
    if (val <= 0xFF) {
        out[0] = mt | 24;
        out[1] = (uint8_t)val;
        return 2;
    }
    if (val <= 0xFFFF) {
        out[0] = mt | 25;
        out[1] = (uint8_t)(val >> 8);
        out[2] = (uint8_t)val;
        return 3;
    }
    if (val <= 0xFFFFFFFFULL) {
        out[0] = mt | 26;
        for (int k = 0; k < 4; k++) out[1 + k] = (uint8_t)(val >> (24 - 8 * k));
        return 5;
    }
    out[0] = mt | 27;
    for (int k = 0; k < 8; k++) out[1 + k] = (uint8_t)(val >> (56 - 8 * k));
    return 9;
}

/* A byte string (head and content) at o; returns the position after it. */
static inline uint8_t *put_bstr(uint8_t *o, const uint8_t *p, size_t n)
{
    o += dcc_cbor_head(o, 2, n);
    memcpy(o, p, n);
    return o + n;
}

static const uint8_t SIG1_CONTEXT[] = {0x84, 0x6a, 'S', 'i', 'g', 'n', 'a', 't', 'u', 'r', 'e', '1'};

size_t dcc_sig_structure_len(size_t plen, size_t paylen)
{
    return sizeof SIG1_CONTEXT + dcc_cbor_head_len(plen) + plen + 1 + dcc_cbor_head_len(paylen) +
           paylen;
}

size_t dcc_sig_structure(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                         uint8_t *out)
{
    uint8_t *o = out;
    memcpy(o, SIG1_CONTEXT, sizeof SIG1_CONTEXT);
    o += sizeof SIG1_CONTEXT;
    o = put_bstr(o, prot, plen);
    *o++ = 0x40; /* external_aad = h'' */
    o = put_bstr(o, pay, paylen);
    return (size_t)(o - out);
}

size_t dcc_sign1_len(size_t plen, size_t paylen, size_t siglen)
{
    return 2 + dcc_cbor_head_len(plen) + plen + 1 + dcc_cbor_head_len(paylen) + paylen +
           dcc_cbor_head_len(siglen) + siglen;
}

size_t dcc_sign1(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                 const uint8_t *sig, size_t siglen, uint8_t *out)
{
    uint8_t *o = out;
    *o++ = 0xd2; /* tag 18, COSE_Sign1 */
    *o++ = 0x84;
    o = put_bstr(o, prot, plen);
    *o++ = 0xa0; /* empty unprotected map: the kid lives in the protected header only */
    o = put_bstr(o, pay, paylen);
    o = put_bstr(o, sig, siglen);
    return (size_t)(o - out);
}

#define DCC_CBOR_MAX_DEPTH 64

/* Reads a head. *indef is set for indefinite length (additional info 31). */
int dcc_cbor_read_head(const uint8_t *buf, size_t len, size_t *pos, unsigned *major,
                          uint64_t *val, int *indef, const char **err)
{
    if (*pos >= len) {
        *err = "truncated CBOR item";
        return DCC_ERR_CBOR;
    }
    uint8_t ib = buf[(*pos)++];
    unsigned ai = ib & 0x1f;
    *major = ib >> 5;
    *indef = 0;
    if (ai < 24) {
        *val = ai;
        return DCC_OK;
    }
    if (ai == 31) {
        if (*major == 0 || *major == 1 || *major == 6) {
            *err = "invalid indefinite length on an integer or tag";
            return DCC_ERR_CBOR;
        }
        *indef = 1;
        *val = 0;
        return DCC_OK;
    }
    if (ai > 27) {
        *err = "reserved CBOR additional information (28-30)";
        return DCC_ERR_CBOR;
    }
    size_t nb = (size_t)1 << (ai - 24);
    if (len - *pos < nb) {
        *err = "truncated CBOR head";
        return DCC_ERR_CBOR;
    }
    uint64_t v = 0;
    for (size_t k = 0; k < nb; k++) v = (v << 8) | buf[*pos + k];
    *pos += nb;
    *val = v;
    return DCC_OK;
}

/* Inside an indefinite-length item: *brk = whether the break byte is next (then consumed).
 * DCC_ERR_CBOR with *err = truncated when the data ends first. */
static inline int cbor_at_break(const uint8_t *buf, size_t len, size_t *pos,
                                const char *truncated, int *brk, const char **err)
{
    if (*pos >= len) {
        *err = truncated;
        return DCC_ERR_CBOR;
    }
    *brk = buf[*pos] == 0xff;
    if (*brk) (*pos)++;
    return DCC_OK;
}

/* Past a string's n bytes of content, if the data holds them. */
static inline int cbor_skip_content(size_t len, size_t *pos, uint64_t n, const char **err)
{
    if (len - *pos < n) {
        *err = "truncated CBOR string";
        return DCC_ERR_CBOR;
    }
    *pos += (size_t)n;
    return DCC_OK;
}

int dcc_cbor_skip(const uint8_t *buf, size_t len, size_t *pos, int depth, const char **err)
{
    if (depth > DCC_CBOR_MAX_DEPTH) {
        *err = "CBOR nesting too deep";
        return DCC_ERR_CBOR;
    }
    unsigned major;
    uint64_t val;
    int indef, rc, brk;
    if ((rc = dcc_cbor_read_head(buf, len, pos, &major, &val, &indef, err)) != DCC_OK) return rc;
    switch (major) {
    case 0:
    case 1:
        return DCC_OK;
    case 2:
    case 3:
        if (indef) {
            /* Chunks of the same major type, definite length, until the break byte. */
            for (;;) {
                rc = cbor_at_break(buf, len, pos, "truncated indefinite-length string", &brk, err);
                if (rc != DCC_OK) return rc;
                if (brk) return DCC_OK;
                unsigned cm;
                uint64_t cl;
                int ci;
                if ((rc = dcc_cbor_read_head(buf, len, pos, &cm, &cl, &ci, err)) != DCC_OK) return rc;
                if (cm != major || ci) {
                    *err = "bad chunk in indefinite-length string";
                    return DCC_ERR_CBOR;
                }
                if ((rc = cbor_skip_content(len, pos, cl, err)) != DCC_OK) return rc;
            }
        }
        return cbor_skip_content(len, pos, val, err);
    case 4:
    case 5: {
        if (indef) {
            for (;;) {
                rc = cbor_at_break(buf, len, pos, "truncated indefinite-length container", &brk,
                                   err);
                if (rc != DCC_OK) return rc;
                if (brk) return DCC_OK;
                int items = (major == 5) ? 2 : 1;
                for (int k = 0; k < items; k++)
                    if ((rc = dcc_cbor_skip(buf, len, pos, depth + 1, err)) != DCC_OK) return rc;
            }
        }
        /* Each item takes at least one byte: a count above the remaining bytes is a lie,
         * and checking it here bounds the loop for hostile input. */
        uint64_t items = (major == 5) ? val * 2 : val;
        if (val > len || items > len - *pos) {
            *err = "CBOR container longer than its data";
            return DCC_ERR_CBOR;
        }
        for (uint64_t k = 0; k < items; k++)
            if ((rc = dcc_cbor_skip(buf, len, pos, depth + 1, err)) != DCC_OK) return rc;
        return DCC_OK;
    }
    case 6:
        return dcc_cbor_skip(buf, len, pos, depth + 1, err);
    default: /* 7: simple values and floats; the head already consumed their bytes */
        if (indef) {
            *err = "unexpected CBOR break";
            return DCC_ERR_CBOR;
        }
        return DCC_OK;
    }
}

/* ---- bounded scan (protocol/cborscan.py is the reference: same order of checks) ---- */

typedef struct {
    const uint8_t *buf;
    size_t len, pos;
    uint64_t count, max_items;
    int max_depth;
} cbor_scan_state;

static int scan_counted(cbor_scan_state *s, uint64_t n)
{
    s->count += n;
    return s->count > s->max_items ? DCC_ERR_TOO_LARGE : DCC_OK;
}

/* 1 when the next byte is a break (consumed), 0 when it is not, <0 on truncation. */
static int scan_at_break(cbor_scan_state *s, const char *truncated, const char **err)
{
    if (s->pos >= s->len) {
        *err = truncated;
        return -1;
    }
    if (s->buf[s->pos] == 0xff) {
        s->pos++;
        return 1;
    }
    return 0;
}

static int scan_skip(cbor_scan_state *s, uint64_t n, const char **err)
{
    if (s->len - s->pos < n) {
        *err = "truncated CBOR string";
        return DCC_ERR_CBOR;
    }
    s->pos += (size_t)n;
    return DCC_OK;
}

static int scan_item(cbor_scan_state *s, int depth, const char **err)
{
    unsigned major;
    uint64_t val;
    int indef, rc, brk;
    if ((rc = dcc_cbor_read_head(s->buf, s->len, &s->pos, &major, &val, &indef, err)) != DCC_OK)
        return rc;
    if ((rc = scan_counted(s, 1)) != DCC_OK) return rc;
    if (major <= 1) return DCC_OK;
    if (major <= 3) {
        if (!indef) return scan_skip(s, val, err);
        while ((brk = scan_at_break(s, "truncated indefinite-length string", err)) == 0) {
            unsigned cm;
            uint64_t cl;
            int ci;
            if ((rc = dcc_cbor_read_head(s->buf, s->len, &s->pos, &cm, &cl, &ci, err)) != DCC_OK)
                return rc;
            if (cm != major || ci) {
                *err = "bad chunk in indefinite-length string";
                return DCC_ERR_CBOR;
            }
            if ((rc = scan_counted(s, 1)) != DCC_OK) return rc;
            if ((rc = scan_skip(s, cl, err)) != DCC_OK) return rc;
        }
        return brk < 0 ? DCC_ERR_CBOR : DCC_OK;
    }
    if (major == 7) {
        if (indef) {
            *err = "unexpected CBOR break";
            return DCC_ERR_CBOR;
        }
        return DCC_OK;
    }
    if (depth + 1 > s->max_depth) return DCC_ERR_SHAPE;
    if (major == 6) return scan_item(s, depth + 1, err);
    uint64_t per_entry = (major == 5) ? 2 : 1;
    if (indef) {
        while ((brk = scan_at_break(s, "truncated indefinite-length container", err)) == 0)
            for (uint64_t k = 0; k < per_entry; k++)
                if ((rc = scan_item(s, depth + 1, err)) != DCC_OK) return rc;
        return brk < 0 ? DCC_ERR_CBOR : DCC_OK;
    }
    /* Each member takes at least one byte: a count above the bytes left is a lie, and refusing
     * it at the head bounds the walk for hostile input. */
    if (val > s->len || val * per_entry > s->len - s->pos) {
        *err = "CBOR container longer than its data";
        return DCC_ERR_CBOR;
    }
    uint64_t members = val * per_entry;
    if (s->count + members > s->max_items) return DCC_ERR_TOO_LARGE;
    for (uint64_t k = 0; k < members; k++)
        if ((rc = scan_item(s, depth + 1, err)) != DCC_OK) return rc;
    return DCC_OK;
}

int dcc_cbor_scan(const uint8_t *buf, size_t len, uint64_t max_items, int max_depth,
                  uint64_t *count, const char **err)
{
    cbor_scan_state s = {buf, len, 0, 0, max_items, max_depth};
    int rc = scan_item(&s, 0, err);
    *count = s.count;
    if (rc == DCC_OK && s.pos != len) {
        *err = "trailing bytes after the CBOR item";
        return DCC_ERR_TRAILING;
    }
    return rc;
}

static int cbor_read_bstr(const uint8_t *buf, size_t len, size_t *pos, size_t *off, size_t *blen,
                          const char *what, const char **err)
{
    unsigned major;
    uint64_t val;
    int indef, rc;
    if ((rc = dcc_cbor_read_head(buf, len, pos, &major, &val, &indef, err)) != DCC_OK) return rc;
    if (major != 2) {
        *err = what;
        return DCC_ERR_CBOR;
    }
    if (indef) {
        *err = "indefinite-length byte string in COSE_Sign1 is not supported";
        return DCC_ERR_CBOR;
    }
    if (len - *pos < val) {
        *err = "truncated byte string in COSE_Sign1";
        return DCC_ERR_CBOR;
    }
    *off = *pos;
    *blen = (size_t)val;
    *pos += (size_t)val;
    return DCC_OK;
}

int dcc_sign1_split(const uint8_t *buf, size_t len, dcc_sign1_parts *p, const char **err)
{
    size_t pos = 0;
    unsigned major;
    uint64_t val;
    int indef, rc;
    p->ntags = 0;
    for (;;) {
        size_t start = pos;
        if ((rc = dcc_cbor_read_head(buf, len, &pos, &major, &val, &indef, err)) != DCC_OK) return rc;
        if (major != 6) {
            pos = start;
            break;
        }
        if (p->ntags == DCC_MAX_TAGS) {
            *err = "too many CBOR tags around COSE_Sign1";
            return DCC_ERR_CBOR;
        }
        p->tags[p->ntags++] = val;
    }
    if ((rc = dcc_cbor_read_head(buf, len, &pos, &major, &val, &indef, err)) != DCC_OK) return rc;
    if (major != 4 || (!indef && val != 4)) {
        *err = "COSE_Sign1 must be an array of 4 items";
        return DCC_ERR_CBOR;
    }
    if ((rc = cbor_read_bstr(buf, len, &pos, &p->prot_off, &p->prot_len,
                             "COSE_Sign1 protected header must be a byte string", err)) != DCC_OK)
        return rc;
    p->unprot_off = pos;
    if (pos >= len || (buf[pos] >> 5) != 5) {
        *err = "COSE_Sign1 unprotected header must be a map";
        return DCC_ERR_CBOR;
    }
    if ((rc = dcc_cbor_skip(buf, len, &pos, 0, err)) != DCC_OK) return rc;
    p->unprot_len = pos - p->unprot_off;
    if ((rc = cbor_read_bstr(buf, len, &pos, &p->pay_off, &p->pay_len,
                             "COSE_Sign1 payload must be a byte string (detached payloads are not "
                             "allowed)",
                             err)) != DCC_OK)
        return rc;
    if ((rc = cbor_read_bstr(buf, len, &pos, &p->sig_off, &p->sig_len,
                             "COSE_Sign1 signature must be a byte string", err)) != DCC_OK)
        return rc;
    if (indef) {
        if (pos >= len || buf[pos] != 0xff) {
            *err = "COSE_Sign1 array must hold exactly 4 items";
            return DCC_ERR_CBOR;
        }
        pos++;
    }
    if (pos != len) {
        /* cbor2.loads ignores trailing bytes silently (dcc-spec-notes §4.13); we do not. */
        *err = "trailing bytes after COSE_Sign1";
        return DCC_ERR_CBOR;
    }
    return DCC_OK;
}

/* ======================================================================== zlib */

/* Inputs under DCC_SMALL_DEFLATE_MAX (4 KiB) -- every HC1 COSE_Sign1 -- go to smalldeflate.c;
 * larger ones to libdeflate, with one compressor per thread and level, created on first use
 * and reused afterwards.
 *
 * Why not zlib's deflate(): on DCC-sized inputs (~350 bytes) zlib's time goes to fixed
 * per-stream work, not matching effort, at every level 1-9 and even Huffman-only, with a
 * reused z_stream (deflateReset). libdeflate's one-shot compressor writes an equally small
 * standard zlib stream (RFC 1950, CMF 0x78) faster, but on these inputs its cost too is mostly
 * fixed per-call work, for state sized for large inputs. smalldeflate.c sizes everything to
 * the input and writes one block: on real COSE_Sign1s its output is as small as libdeflate
 * level 9 on average, for a fraction of the instructions (figures: bench/README.md, "Deflate
 * for small inputs"; bench/results/deflate_small-*.json). libdeflate stays for inputs of
 * 4 KiB and more, where its matchfinders and block splitting pay off.
 *
 * A fresh libdeflate compressor per call would repeat the allocation that glibc hands back to
 * the kernel (performance-baseline.md §4.2), so each thread keeps its own; the pthread key's
 * destructor frees them when the thread exits. */
typedef struct {
    struct libdeflate_compressor *c[10];
} deflate_tls;

static pthread_key_t deflate_key;
static pthread_once_t deflate_once = PTHREAD_ONCE_INIT;

static void deflate_tls_free(void *ptr)
{
    deflate_tls *t = ptr;
    for (int i = 0; i < 10; i++)
        if (t->c[i]) libdeflate_free_compressor(t->c[i]);
    free(t);
}

static void deflate_key_make(void) { (void)pthread_key_create(&deflate_key, deflate_tls_free); }

static struct libdeflate_compressor *deflate_compressor(int level, const char **err)
{
    pthread_once(&deflate_once, deflate_key_make);
    deflate_tls *t = pthread_getspecific(deflate_key);
    if (t == NULL) {
        t = calloc(1, sizeof *t);
        if (t == NULL || pthread_setspecific(deflate_key, t) != 0) {
            free(t);
            *err = "out of memory for the deflate compressor";
            return NULL;
        }
    }
    if (t->c[level] == NULL) {
        t->c[level] = libdeflate_alloc_compressor(level);
        if (t->c[level] == NULL) {
            *err = "out of memory for the deflate compressor";
            return NULL;
        }
    }
    return t->c[level];
}

size_t dcc_zlib_bound(size_t n)
{
    /* zlib's compressBound() plus margin for the stored-block framing of level 0. */
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13 + 16;
}

int dcc_deflate(const uint8_t *in, size_t n, int level, uint8_t *out, size_t cap, size_t *outlen,
                const char **err)
{
    if (n < DCC_SMALL_DEFLATE_MAX) return dcc_small_deflate(in, n, level, out, cap, outlen, err);
    return dcc_deflate_libdeflate(in, n, level, out, cap, outlen, err);
}

int dcc_deflate_libdeflate(const uint8_t *in, size_t n, int level, uint8_t *out, size_t cap,
                           size_t *outlen, const char **err)
{
    if (level < -1 || level > 9) {
        *err = "zlib level must be -1..9";
        return DCC_ERR_ZLIB;
    }
    if (level < 0) level = 6; /* Z_DEFAULT_COMPRESSION */
    struct libdeflate_compressor *c = deflate_compressor(level, err);
    if (c == NULL) return DCC_ERR_ZLIB;
    size_t got = libdeflate_zlib_compress(c, in, n, out, cap);
    if (got == 0) {
        *err = "deflate did not finish (output buffer too small)";
        return DCC_ERR_ZLIB;
    }
    *outlen = got;
    return DCC_OK;
}

int dcc_inflate(const uint8_t *in, size_t n, uint8_t *out, size_t cap, size_t *outlen,
                const char **err)
{
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit(&zs) != Z_OK) { /* windowBits 15 with zlib header: RFC 1950 only */
        *err = "inflateInit failed";
        return DCC_ERR_ZLIB;
    }
    zs.next_in = (Bytef *)in;
    zs.avail_in = (uInt)n;
    zs.next_out = out;
    zs.avail_out = (uInt)cap;
    int rc = inflate(&zs, Z_FINISH);
    int status = DCC_OK;
    if (rc == Z_STREAM_END) {
        if (zs.avail_in != 0) {
            *err = "trailing data after the zlib stream";
            status = DCC_ERR_ZLIB;
        }
        *outlen = (size_t)zs.total_out;
    } else if (rc == Z_BUF_ERROR && zs.avail_out == 0) {
        *err = "inflated data exceeds the size limit";
        status = DCC_ERR_TOO_LARGE;
    } else if (rc == Z_BUF_ERROR) {
        *err = "truncated zlib stream";
        status = DCC_ERR_ZLIB;
    } else if (rc == Z_DATA_ERROR) {
        *err = zs.msg ? zs.msg : "invalid zlib data";
        status = DCC_ERR_ZLIB;
    } else {
        *err = "zlib inflate failed";
        status = DCC_ERR_ZLIB;
    }
    inflateEnd(&zs);
    return status;
}

/* ======================================================================== keys */

typedef struct {
    const char *pass;
    size_t len;
} pass_arg;

/* Never prompts: a missing passphrase for an encrypted key is an error, not a tty read. */
static int pass_cb(char *buf, int size, int rwflag, void *u)
{
    (void)rwflag;
    pass_arg *a = u;
    if (a == NULL || a->pass == NULL || a->len > (size_t)size) return -1;
    memcpy(buf, a->pass, a->len);
    return (int)a->len;
}

static void openssl_err(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char reason[256] = "";
    if (e) ERR_error_string_n(e, reason, sizeof reason);
    ERR_clear_error();
    snprintf(err, errlen, "%s%s%s", what, e ? ": " : "", reason);
}

EVP_PKEY *dcc_load_private_key(const char *pem, size_t pemlen, const char *pass, size_t passlen,
                               int *alg, char *err, size_t errlen)
{
    ERR_clear_error();
    BIO *bio = BIO_new_mem_buf(pem, (int)pemlen);
    if (bio == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pass_arg a = {pass, passlen};
    EVP_PKEY *pkey = PEM_read_bio_PrivateKey(bio, NULL, pass_cb, &a);
    BIO_free(bio);
    if (pkey == NULL) {
        openssl_err(err, errlen,
                    pass ? "cannot decrypt or parse the private key (wrong passphrase or corrupt "
                           "file)"
                         : "cannot parse the private key (encrypted keys need a passphrase)");
        return NULL;
    }
    if (EVP_PKEY_is_a(pkey, "EC")) {
        char group[64] = "";
        size_t glen = 0;
        if (!EVP_PKEY_get_group_name(pkey, group, sizeof group, &glen) ||
            strcmp(group, "prime256v1") != 0) {
            snprintf(err, errlen, "EC key on curve %s: ES256 needs P-256 (prime256v1)",
                     group[0] ? group : "(unknown)");
            EVP_PKEY_free(pkey);
            return NULL;
        }
        *alg = DCC_ALG_ES256;
    } else if (EVP_PKEY_is_a(pkey, "RSA") || EVP_PKEY_is_a(pkey, "RSA-PSS")) {
        int bits = EVP_PKEY_get_bits(pkey);
        if (bits < 2048 || bits > 4096) {
            snprintf(err, errlen, "RSA key of %d bits: PS256 needs 2048 to 4096 bits", bits);
            EVP_PKEY_free(pkey);
            return NULL;
        }
        *alg = DCC_ALG_PS256;
    } else {
        snprintf(err, errlen, "unsupported key type: only EC P-256 (ES256) and RSA (PS256)");
        EVP_PKEY_free(pkey);
        return NULL;
    }
    return pkey;
}

int dcc_public_key_der(EVP_PKEY *pkey, unsigned char **out)
{
    *out = NULL;
    return i2d_PUBKEY(pkey, out);
}

size_t dcc_signature_max_len(EVP_PKEY *pkey, int alg)
{
    return alg == DCC_ALG_ES256 ? 64 : (size_t)EVP_PKEY_get_size(pkey);
}

int dcc_signer_open(dcc_signer *s, EVP_PKEY *pkey, int alg)
{
    memset(s, 0, sizeof *s);
    s->alg = alg;
    s->pctx = EVP_PKEY_CTX_new(pkey, NULL);
    if (s->pctx == NULL || EVP_PKEY_sign_init(s->pctx) <= 0) goto fail;
    if (EVP_PKEY_CTX_set_signature_md(s->pctx, EVP_sha256()) <= 0) goto fail;
    if (alg == DCC_ALG_PS256) {
        /* RFC 8230 §2: MGF1 with SHA-256 and a salt as long as the hash (32), not the maximum. */
        if (EVP_PKEY_CTX_set_rsa_padding(s->pctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
            EVP_PKEY_CTX_set_rsa_mgf1_md(s->pctx, EVP_sha256()) <= 0 ||
            EVP_PKEY_CTX_set_rsa_pss_saltlen(s->pctx, 32) <= 0)
            goto fail;
    }
    size_t maxsig = 0;
    static const uint8_t zero[32];
    if (EVP_PKEY_sign(s->pctx, NULL, &maxsig, zero, sizeof zero) <= 0) goto fail;
    s->maxsig = maxsig;
    return DCC_OK;
fail:
    ERR_clear_error();
    dcc_signer_close(s);
    return DCC_ERR_SIGN;
}

void dcc_signer_close(dcc_signer *s)
{
    if (s->pctx) EVP_PKEY_CTX_free(s->pctx);
    s->pctx = NULL;
}

/* The order n of P-256 and floor(n / 2), big-endian. */
static const uint8_t P256_N[32] = {
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51};
static const uint8_t P256_HALF_N[32] = {
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8};

/* Reads one DER INTEGER (positive, < 2^256) into a 32-byte left-padded buffer. */
static int der_read_uint256(const uint8_t *der, size_t len, size_t *pos, uint8_t out[32])
{
    if (*pos + 2 > len || der[*pos] != 0x02) return -1;
    size_t ilen = der[*pos + 1];
    *pos += 2;
    if (ilen == 0 || ilen > 33 || *pos + ilen > len) return -1;
    const uint8_t *v = der + *pos;
    *pos += ilen;
    if (v[0] & 0x80) return -1; /* negative */
    if (ilen == 33) {
        if (v[0] != 0) return -1;
        v++;
        ilen--;
    }
    memset(out, 0, 32 - ilen);
    memcpy(out + 32 - ilen, v, ilen);
    return 0;
}

/* DER ECDSA-Sig-Value -> raw r||s (RFC 8152 §8.1), with s normalised to the low half. Writing
 * both halves padded to 32 bytes avoids the 63-byte signature that dropping leading zeros
 * gives about one time in 128. */
static int ecdsa_der_to_raw(const uint8_t *der, size_t len, uint8_t raw[64])
{
    size_t pos = 0;
    if (len < 8 || der[0] != 0x30) return -1;
    size_t seqlen = der[1];
    if (seqlen & 0x80 || seqlen + 2 != len) return -1; /* P-256 sigs are < 128 bytes */
    pos = 2;
    if (der_read_uint256(der, len, &pos, raw) != 0) return -1;
    if (der_read_uint256(der, len, &pos, raw + 32) != 0) return -1;
    if (pos != len) return -1;
    uint8_t *s = raw + 32;
    if (memcmp(s, P256_HALF_N, 32) > 0) {
        /* s := n - s: both (r, s) and (r, n - s) verify; low-S keeps signatures unmalleable. */
        int borrow = 0;
        for (int i = 31; i >= 0; i--) {
            int d = (int)P256_N[i] - (int)s[i] - borrow;
            borrow = d < 0;
            s[i] = (uint8_t)(d + (borrow ? 256 : 0));
        }
    }
    return 0;
}

/* SHA-256 with the digest fetched once and one context per thread. The one-shot SHA256()
 * makes an implicit fetch (a lookup under a lock) on every call, a large share of its time
 * over a ~450-byte Sig_structure (bench/README.md, "SHA-256 without an implicit fetch per
 * call"), and keyd hashes every certificate five times more for its audit line. */
static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;
static pthread_key_t sha256_key;

static void sha256_ctx_free(void *ctx) { EVP_MD_CTX_free(ctx); }

static void sha256_init(void)
{
    if (pthread_key_create(&sha256_key, sha256_ctx_free) != 0) return;
    sha256_md = EVP_MD_fetch(NULL, "SHA2-256", NULL);
}

int dcc_sha256(const uint8_t *data, size_t n, uint8_t out[32])
{
    pthread_once(&sha256_once, sha256_init);
    if (sha256_md == NULL) return 0;
    EVP_MD_CTX *ctx = pthread_getspecific(sha256_key);
    if (ctx == NULL) {
        ctx = EVP_MD_CTX_new();
        if (ctx == NULL || pthread_setspecific(sha256_key, ctx) != 0) {
            EVP_MD_CTX_free(ctx);
            return 0;
        }
    }
    return EVP_DigestInit_ex2(ctx, sha256_md, NULL) == 1 &&
           EVP_DigestUpdate(ctx, data, n) == 1 && EVP_DigestFinal_ex(ctx, out, NULL) == 1;
}

int dcc_sign_tbs(dcc_signer *s, const uint8_t *tbs, size_t tbslen, uint8_t *sig, size_t *siglen)
{
    uint8_t digest[32];
    if (!dcc_sha256(tbs, tbslen, digest)) return DCC_ERR_SIGN;
    return dcc_sign_digest(s, digest, sig, siglen);
}

int dcc_sign_digest(dcc_signer *s, const uint8_t digest[32], uint8_t *sig, size_t *siglen)
{
    if (s->alg == DCC_ALG_ES256) {
        uint8_t der[80];
        size_t derlen = sizeof der;
        if (EVP_PKEY_sign(s->pctx, der, &derlen, digest, 32) <= 0) goto fail;
        if (ecdsa_der_to_raw(der, derlen, sig) != 0) goto fail;
        *siglen = 64;
        return DCC_OK;
    }
    size_t outlen = s->maxsig;
    if (EVP_PKEY_sign(s->pctx, sig, &outlen, digest, 32) <= 0) goto fail;
    *siglen = outlen;
    return DCC_OK;
fail:
    ERR_clear_error();
    return DCC_ERR_SIGN;
}

/* ======================================================================== HC1 */

size_t dcc_hc1_scratch_len(size_t plen, size_t paylen, size_t siglen)
{
    size_t cose = dcc_sign1_len(plen, paylen, siglen);
    return cose + dcc_zlib_bound(cose);
}

size_t dcc_hc1_max_len(size_t plen, size_t paylen, size_t siglen)
{
    return DCC_HC1_PREFIX_LEN + dcc_b45_encoded_len(dcc_zlib_bound(dcc_sign1_len(plen, paylen,
                                                                                 siglen)));
}

int dcc_hc1_encode_one(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                       const uint8_t *sig, size_t siglen, int level, uint8_t *scratch, char *out,
                       size_t *outlen, const char **err)
{
    size_t cose_len = dcc_sign1(prot, plen, pay, paylen, sig, siglen, scratch);
    uint8_t *z = scratch + cose_len;
    size_t zlen = 0;
    int rc = dcc_deflate(scratch, cose_len, level, z, dcc_zlib_bound(cose_len), &zlen, err);
    if (rc != DCC_OK) return rc;
    memcpy(out, DCC_HC1_PREFIX, DCC_HC1_PREFIX_LEN);
    *outlen = DCC_HC1_PREFIX_LEN + dcc_b45_encode(z, zlen, out + DCC_HC1_PREFIX_LEN);
    return DCC_OK;
}
