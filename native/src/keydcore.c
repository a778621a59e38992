/*
 * keydcore.c: see keydcore.h for the contracts.
 */
#include "keydcore.h"
#include "dcccore.h"

#include <pthread.h>
#include <string.h>

#include <openssl/evp.h>

/* ======================================================================== CWT facts */

static const char CWT_CLAIMS[] = "the CWT must be a map of exactly the claims 1, 4, 6, -260";
static const char HCERT[] = "claim -260 must be {1: DCC} with the DCC a map";
#define DCC_MAX_FIELDS 16 /* the schemas allow 4 fields in a DCC and 10 in an entry */

#define SHAPE(msg)             \
    do {                       \
        *err = (msg);          \
        return DCC_ERR_SHAPE;  \
    } while (0)

/* The item at *pos is known to be well-formed (the whole payload was walked first), so a
 * failing head read cannot happen; it is still checked rather than assumed. */
#define HEAD()                                                                   \
    do {                                                                         \
        int rc_ = dcc_cbor_read_head(buf, len, pos, &major, &val, &indef, err);  \
        if (rc_ != DCC_OK) return rc_;                                           \
    } while (0)

static int is_capital(uint8_t c) { return c >= 'A' && c <= 'Z'; }

static int read_int64(const uint8_t *buf, size_t len, size_t *pos, int64_t *out,
                      const char **err)
{
    unsigned major;
    uint64_t val;
    int indef;
    HEAD();
    if ((major != 0 && major != 1) || val > (uint64_t)INT64_MAX)
        SHAPE("exp and iat must be 64-bit integers");
    *out = major == 0 ? (int64_t)val : -1 - (int64_t)val;
    return DCC_OK;
}

/* Reads the keys of a definite map whose keys must be distinct definite text strings, calling
 * `value` for each key with *pos at its value; `value` must advance past it. */
typedef int (*map_value_fn)(const uint8_t *buf, size_t len, size_t *pos, const uint8_t *key,
                            size_t klen, void *ctx, const char **err);

static int read_text_map(const uint8_t *buf, size_t len, size_t *pos, const char *not_map,
                         const char *bad_keys, const char *duplicate, map_value_fn value,
                         void *ctx, const char **err)
{
    unsigned major;
    uint64_t val;
    int indef;
    size_t koff[DCC_MAX_FIELDS], klen[DCC_MAX_FIELDS];
    HEAD();
    if (major != 5 || indef || val > DCC_MAX_FIELDS) SHAPE(not_map);
    size_t n = (size_t)val;
    for (size_t i = 0; i < n; i++) {
        HEAD();
        if (major != 3 || indef) SHAPE(bad_keys);
        koff[i] = *pos;
        klen[i] = (size_t)val;
        *pos += klen[i];
        for (size_t j = 0; j < i; j++)
            if (klen[j] == klen[i] && memcmp(buf + koff[j], buf + koff[i], klen[i]) == 0)
                SHAPE(duplicate);
        int rc = value(buf, len, pos, buf + koff[i], klen[i], ctx, err);
        if (rc != DCC_OK) return rc;
    }
    return DCC_OK;
}

static int entry_value(const uint8_t *buf, size_t len, size_t *pos, const uint8_t *key,
                       size_t klen, void *ctx, const char **err)
{
    dcc_cwt_facts *f = ctx;
    if (klen == 2 && key[0] == 'c' && key[1] == 'i') {
        unsigned major;
        uint64_t val;
        int indef;
        HEAD();
        if (major != 3 || indef || val < 1 || val > DCC_UVCI_MAX)
            SHAPE("ci must be 1 to 80 printable ASCII characters");
        for (size_t k = 0; k < val; k++)
            if (buf[*pos + k] < 0x21 || buf[*pos + k] > 0x7e)
                SHAPE("ci must be 1 to 80 printable ASCII characters");
        f->ci_off = *pos;
        f->ci_len = (size_t)val;
        *pos += (size_t)val;
        return DCC_OK;
    }
    return dcc_cbor_skip(buf, len, pos, 0, err);
}

static int dcc_value(const uint8_t *buf, size_t len, size_t *pos, const uint8_t *key,
                     size_t klen, void *ctx, const char **err)
{
    dcc_cwt_facts *f = ctx;
    if (klen != 1 || (key[0] != 'v' && key[0] != 't' && key[0] != 'r'))
        return dcc_cbor_skip(buf, len, pos, 0, err);
    if (f->type) SHAPE("the DCC must hold exactly one of v, t, r");
    f->type = (char)key[0];
    unsigned major;
    uint64_t val;
    int indef;
    HEAD();
    if (major != 4 || indef || val != 1)
        SHAPE("the certificate array (v, t or r) must hold exactly one entry");
    f->ci_len = 0;
    int rc = read_text_map(buf, len, pos, "the certificate entry must be a definite-length map",
                           "the certificate entry's field names must be definite-length text",
                           "the certificate entry has a duplicate field", entry_value, f, err);
    if (rc != DCC_OK) return rc;
    if (f->ci_len == 0) SHAPE("the certificate entry has no ci (UVCI)");
    return DCC_OK;
}

int dcc_cwt_facts_read(const uint8_t *buf, size_t len, dcc_cwt_facts *f, const char **err)
{
    size_t at = 0, *pos = &at;
    int rc = dcc_cbor_skip(buf, len, pos, 0, err);
    if (rc != DCC_OK) return rc;
    if (at != len) {
        *err = "trailing bytes after the CBOR item";
        return DCC_ERR_CBOR;
    }
    memset(f, 0, sizeof *f);
    at = 0;
    unsigned major;
    uint64_t val;
    int indef;
    HEAD();
    if (major != 5 || indef || val != 4) SHAPE(CWT_CLAIMS);
    unsigned seen = 0;
    for (int k = 0; k < 4; k++) {
        HEAD();
        unsigned claim;
        if (major == 0 && val == 1)
            claim = 1;
        else if (major == 0 && val == 4)
            claim = 2;
        else if (major == 0 && val == 6)
            claim = 4;
        else if (major == 1 && val == 259) /* -260 = -1 - 259 */
            claim = 8;
        else
            SHAPE(CWT_CLAIMS);
        if (seen & claim) SHAPE(CWT_CLAIMS);
        seen |= claim;
        switch (claim) {
        case 1:
            HEAD();
            if (major != 3 || indef || val != 2 || !is_capital(buf[at]) ||
                !is_capital(buf[at + 1]))
                SHAPE("iss must be an ISO 3166-1 alpha-2 code");
            f->iss[0] = (char)buf[at];
            f->iss[1] = (char)buf[at + 1];
            at += 2;
            break;
        case 2:
            if ((rc = read_int64(buf, len, pos, &f->exp, err)) != DCC_OK) return rc;
            break;
        case 4:
            if ((rc = read_int64(buf, len, pos, &f->iat, err)) != DCC_OK) return rc;
            break;
        default:
            HEAD();
            if (major != 5 || indef || val != 1) SHAPE(HCERT);
            HEAD();
            if (major != 0 || val != 1) SHAPE(HCERT);
            rc = read_text_map(buf, len, pos, HCERT,
                               "the DCC's field names must be definite-length text",
                               "the DCC has a duplicate field", dcc_value, f, err);
            if (rc != DCC_OK) return rc;
            if (!f->type) SHAPE("the DCC must hold exactly one of v, t, r");
        }
    }
    return DCC_OK;
}

/* ======================================================================== audit lines */

static const char HEX[] = "0123456789abcdef";
/* SHA-256: dcccore.c's dcc_sha256 (fetched once, a context per thread). */
static int sha256(const uint8_t *data, size_t n, uint8_t out[32]) { return dcc_sha256(data, n, out); }

static char *put(char *o, const void *src, size_t n)
{
    memcpy(o, src, n);
    return o + n;
}

#define PUT_LIT(o, s) ((o) = put((o), (s), sizeof(s) - 1))

static char *put_hex(char *o, const uint8_t *d, size_t nbytes)
{
    for (size_t i = 0; i < nbytes; i++) {
        *o++ = HEX[d[i] >> 4];
        *o++ = HEX[d[i] & 15];
    }
    return o;
}

static char *put_u64(char *o, uint64_t v)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) *o++ = digits[--n];
    return o;
}

size_t dcc_audit_line_max(const dcc_audit_common *c)
{
    /* the fixed literals, 3 x 64 + 3 x 32 hex digits, iss, type and a 20-digit seq */
    return c->head_len + c->middle_len + c->time_len + 512;
}

size_t dcc_audit_issue_line(const dcc_audit_common *c, const char iss[2], const uint8_t *uvci,
                            size_t uvci_len, char type, const uint8_t *payload,
                            size_t payload_len, const uint8_t *signed_part, size_t signed_len,
                            uint64_t seq, const char prev[64], uint8_t *scratch, char *out,
                            char next_prev[64])
{
    uint8_t payload_hash[32], uvci_hash[32], ccuci[32], sig_hash[32], line_hash[32];
    scratch[0] = (uint8_t)iss[0];
    scratch[1] = (uint8_t)iss[1];
    memcpy(scratch + 2, uvci, uvci_len);
    if (!sha256(payload, payload_len, payload_hash) || !sha256(uvci, uvci_len, uvci_hash) ||
        !sha256(scratch, 2 + uvci_len, ccuci) || !sha256(signed_part, signed_len, sig_hash))
        return 0;
    char *o = out;
    o = put(o, c->head, c->head_len);
    *o++ = '"';
    *o++ = iss[0];
    *o++ = iss[1];
    *o++ = '"';
    o = put(o, c->middle, c->middle_len);
    o = put_hex(o, payload_hash, 32);
    PUT_LIT(o, "\",\"prev\":\"");
    o = put(o, prev, 64);
    PUT_LIT(o, "\",\"rev\":{\"COUNTRYCODEUCI\":\"");
    o = put_hex(o, ccuci, 16);
    PUT_LIT(o, "\",\"SIGNATURE\":\"");
    o = put_hex(o, sig_hash, 16);
    PUT_LIT(o, "\",\"UCI\":\"");
    o = put_hex(o, uvci_hash, 16);
    PUT_LIT(o, "\"},\"seq\":");
    o = put_u64(o, seq);
    PUT_LIT(o, ",\"t\":\"issue\",\"time\":\"");
    o = put(o, c->time, c->time_len);
    PUT_LIT(o, "\",\"type\":\"");
    *o++ = type;
    PUT_LIT(o, "\",\"uvci_hash\":\"");
    o = put_hex(o, uvci_hash, 32);
    PUT_LIT(o, "\"}");
    size_t n = (size_t)(o - out);
    if (!sha256((const uint8_t *)out, n, line_hash)) return 0;
    put_hex(next_prev, line_hash, 32);
    return n;
}
