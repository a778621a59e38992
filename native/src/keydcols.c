/*
 * keydcols.c: see keydcols.h for the contracts.
 */
#include "keydcols.h"

#include <string.h>

/* ======================================================================== checks */

static void put_facts(uint8_t *rec, const dcc_cwt_facts *f)
{
    uint32_t off = (uint32_t)f->ci_off;
    rec[0] = (uint8_t)f->iss[0];
    rec[1] = (uint8_t)f->iss[1];
    rec[2] = (uint8_t)f->type;
    rec[3] = (uint8_t)f->ci_len;
    memcpy(rec + 4, &off, 4);
    memcpy(rec + 8, &f->exp, 8);
    memcpy(rec + 16, &f->iat, 8);
}

static int type_slot(char type) { return type == 'v' ? 0 : type == 't' ? 1 : 2; }

void kc_check(const uint8_t *buf, const uint32_t *ends, size_t n, const uint32_t *client_ix,
              const uint8_t *client_ok, const kc_limits *lim, uint8_t *codes, uint8_t *facts,
              const char **errs, uint8_t *cbor_error)
{
    size_t start = 0;
    for (size_t i = 0; i < n; start = ends[i], i++) {
        const uint8_t *p = buf + start;
        size_t len = ends[i] - start;
        uint8_t *rec = facts + i * KC_FACT_SIZE;
        dcc_cwt_facts f;
        memset(rec, 0, KC_FACT_SIZE);
        errs[i] = NULL;
        cbor_error[i] = 0;
        if (!client_ok[client_ix[i]]) {
            codes[i] = KC_CLIENT_NOT_ALLOWED;
            continue;
        }
        if (len > lim->max_payload) {
            codes[i] = KC_TOO_LARGE_FOR_QR;
            continue;
        }
        int rc = dcc_cwt_facts_read(p, len, &f, &errs[i]);
        if (rc != DCC_OK) {
            codes[i] = KC_MALFORMED_CWT;
            cbor_error[i] = rc != DCC_ERR_SHAPE;
            continue;
        }
        /* the order of keyd's rules (engine/keyd/service.py, check_payloads) */
        if (f.exp > lim->not_after)
            codes[i] = KC_EXP_AFTER_DSC;
        else if (f.iat < lim->not_before)
            codes[i] = KC_IAT_BEFORE_DSC;
        else if (f.exp <= f.iat)
            codes[i] = KC_EXP_NOT_AFTER_IAT;
        else if (f.iat > lim->latest_iat)
            codes[i] = KC_IAT_IN_FUTURE;
        else if (!lim->allowed[type_slot(f.type)])
            codes[i] = KC_TYPE_NOT_ALLOWED;
        else
            codes[i] = KC_OK;
        put_facts(rec, &f); /* refused items keep theirs too: keyd's reasons quote them */
    }
}

/* ======================================================================== JSON text */

size_t kc_json_literal(const uint8_t *s, size_t len, char *out)
{
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    *o++ = '"';
    for (size_t i = 0; i < len; i++) {
        uint8_t c = s[i];
        switch (c) {
        case '"': *o++ = '\\'; *o++ = '"'; break;
        case '\\': *o++ = '\\'; *o++ = '\\'; break;
        case '\b': *o++ = '\\'; *o++ = 'b'; break;
        case '\f': *o++ = '\\'; *o++ = 'f'; break;
        case '\n': *o++ = '\\'; *o++ = 'n'; break;
        case '\r': *o++ = '\\'; *o++ = 'r'; break;
        case '\t': *o++ = '\\'; *o++ = 't'; break;
        default:
            if (c < 0x20) {
                memcpy(o, "\\u00", 4);
                o[4] = hex[c >> 4];
                o[5] = hex[c & 15];
                o += 6;
            } else {
                *o++ = (char)c;
            }
        }
    }
    *o++ = '"';
    return (size_t)(o - out);
}

/* ======================================================================== audit lines */

#define LIT(s) s, sizeof(s) - 1

static char *put(char *o, const char *s, size_t n)
{
    memcpy(o, s, n);
    return o + n;
}

static size_t head_len(const kc_audit_batch *b, uint32_t i)
{
    return sizeof("{\"account\":,\"alg\":,\"client\":,\"iss\":") - 1 +
           b->accounts[b->account_ix[i]].len + strlen(b->alg) + b->clients[b->client_ix[i]].len;
}

static size_t middle_len(const kc_audit_batch *b, uint32_t i)
{
    return sizeof(",\"kid\":\"\",\"operator\":,\"payload_sha256\":\"") - 1 + 16 +
           b->operators[b->operator_ix[i]].len;
}

size_t kc_audit_scratch_len(const kc_audit_batch *b, uint32_t item)
{
    size_t h = head_len(b, item), m = middle_len(b, item);
    return h > m ? h : m;
}

size_t kc_audit_line_bound(const kc_audit_batch *b, uint32_t item)
{
    dcc_audit_common c = {NULL, head_len(b, item), NULL, middle_len(b, item), b->time,
                          b->time_len};
    return dcc_audit_line_max(&c);
}

size_t kc_audit_lines(const kc_audit_batch *b, const uint32_t *sel, size_t nsel,
                      const uint8_t *sigs, const uint32_t *sig_ends, uint64_t seq, char prev[64],
                      char *head, char *middle, char *out)
{
    uint8_t scratch[2 + DCC_UVCI_MAX];
    char *o = out;
    size_t sig_start = 0;
    for (size_t k = 0; k < nsel; sig_start = sig_ends[k], k++) {
        uint32_t i = sel[k];
        const kc_text *acc = &b->accounts[b->account_ix[i]];
        const kc_text *cli = &b->clients[b->client_ix[i]];
        const kc_text *op = &b->operators[b->operator_ix[i]];
        char *h = head, *m = middle;
        h = put(h, LIT("{\"account\":"));
        h = put(h, acc->ptr, acc->len);
        h = put(h, LIT(",\"alg\":"));
        h = put(h, b->alg, strlen(b->alg));
        h = put(h, LIT(",\"client\":"));
        h = put(h, cli->ptr, cli->len);
        h = put(h, LIT(",\"iss\":"));
        m = put(m, LIT(",\"kid\":\""));
        m = put(m, b->kid, 16);
        m = put(m, LIT("\",\"operator\":"));
        m = put(m, op->ptr, op->len);
        m = put(m, LIT(",\"payload_sha256\":\""));
        dcc_audit_common c = {head, (size_t)(h - head), middle, (size_t)(m - middle), b->time,
                              b->time_len};
        const uint8_t *rec = b->facts + (size_t)i * KC_FACT_SIZE;
        uint32_t ci_off;
        memcpy(&ci_off, rec + 4, 4);
        size_t start = i ? b->ends[i - 1] : 0;
        const uint8_t *payload = b->payloads + start;
        size_t sig_len = sig_ends[k] - sig_start;
        if (k) *o++ = '\n';
        size_t n = dcc_audit_issue_line(&c, (const char *)rec, payload + ci_off, rec[3],
                                        (char)rec[2], payload, b->ends[i] - start,
                                        sigs + sig_start, b->es256 ? 32 : sig_len, seq + k,
                                        prev, scratch, o, prev);
        if (n == 0) return 0;
        o += n;
    }
    return (size_t)(o - out);
}
