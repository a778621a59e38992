/*
 * keydcols: keyd's per-item work over a batch in columns (SIGN_COLUMNS, protocol/keyd.py):
 * the structural check of every payload against the DSC, the clock and the client allow-list,
 * and the issue lines of the audit log built straight from the message's string tables.
 *
 * A batch is one buffer of payloads with end offsets, and per item three indices into small
 * string tables (clients, accounts, operators). Nothing here touches Python: the Cython glue
 * (_keydcols.pxi) owns arguments, results and exceptions; the pure-Python twin
 * (_keydcols_py.py) states the same contracts readably.
 */
#ifndef KEYDCOLS_H
#define KEYDCOLS_H

#include <stddef.h>
#include <stdint.h>

#include "keydcore.h"

/* Per-item codes: 0 = may be signed, else the ItemError of protocol/keyd.py (same numbers). */
enum {
    KC_OK = 0,
    KC_MALFORMED_CWT = 1,
    KC_EXP_AFTER_DSC = 2,
    KC_IAT_BEFORE_DSC = 3,
    KC_IAT_IN_FUTURE = 4,
    KC_EXP_NOT_AFTER_IAT = 5,
    KC_TYPE_NOT_ALLOWED = 6,
    KC_CLIENT_NOT_ALLOWED = 8,
    KC_TOO_LARGE_FOR_QR = 12
};

/* The facts of one checked payload, packed (native byte order) so that a column of them can
 * travel from the check to the audit as one byte string:
 *   0 iss[2]   2 type ('v','t','r')   3 ci_len (1..80)   4 ci_off (uint32, in the payload)
 *   8 exp (int64)   16 iat (int64)
 * An item refused before its payload was read (client, size, malformed) has all zeros; one
 * refused after keeps its facts (keyd's reasons quote them). */
#define KC_FACT_SIZE 24

typedef struct {
    size_t max_payload;   /* longer payloads: TOO_LARGE_FOR_QR */
    int64_t not_before;   /* ceil of the DSC's notBefore (iat below it: IAT_BEFORE_DSC) */
    int64_t not_after;    /* floor of its notAfter (exp above it: EXP_AFTER_DSC) */
    int64_t latest_iat;   /* floor(now + skew) (iat above it: IAT_IN_FUTURE) */
    uint8_t allowed[3];   /* the DSC allows v, t, r */
} kc_limits;

/* Checks item i = buf[ends[i-1]..ends[i]) for i < n, in keyd's order of rules: its client
 * allowed (client_ok[client_ix[i]]), at most max_payload bytes, a DCC CWT
 * (dcc_cwt_facts_read: on failure errs[i] is the message and cbor_error[i] says whether the
 * bytes were not one CBOR item at all), exp <= not_after, iat >= not_before, exp > iat,
 * iat <= latest_iat, type allowed. Writes codes[i] and the facts record i. The caller has
 * checked that ends are monotone and indices within client_ok. Never fails. */
void kc_check(const uint8_t *buf, const uint32_t *ends, size_t n, const uint32_t *client_ix,
              const uint8_t *client_ok, const kc_limits *lim, uint8_t *codes, uint8_t *facts,
              const char **errs, uint8_t *cbor_error);

/* JSON string literal of UTF-8 text s (quotes included), escaped exactly as Python's
 * json.encoder.encode_basestring (ensure_ascii=False): \" \\ \b \f \n \r \t, other bytes
 * below 0x20 as \u00xx (lower-case hex), everything else as is. out must hold
 * kc_json_literal_max(len) bytes; returns the length written. */
#define kc_json_literal_max(len) (2 + 6 * (size_t)(len))
size_t kc_json_literal(const uint8_t *s, size_t len, char *out);

typedef struct {
    const char *ptr;
    size_t len;
} kc_text;

/* What the issue lines of a columns batch share. Literals are escaped JSON (operators: the
 * literal null for no operator). */
typedef struct {
    const kc_text *clients, *accounts, *operators;
    const uint32_t *client_ix, *account_ix, *operator_ix;
    const char *alg;  /* "-7" or "-37" */
    const char *kid;  /* 16 lower-case hex digits */
    const char *time; /* the commit time as the log writes it */
    size_t time_len;
    const uint8_t *payloads;
    const uint32_t *ends;
    const uint8_t *facts; /* KC_FACT_SIZE per item (kc_check) */
    int es256;            /* the SIGNATURE hash covers r (the first 32 bytes) only */
} kc_audit_batch;

/* Upper bound of item i's line length. */
size_t kc_audit_line_bound(const kc_audit_batch *b, uint32_t item);

/* The issue lines of the items sel[0..nsel), in that order, joined by '\n' (none after the
 * last), into out (at least the sum of their kc_audit_line_bound plus nsel bytes): sequence
 * numbers seq, seq+1, ...; the first chains to prev, and prev gets the hash of the last line.
 * Signature k is sigs[sig_ends[k-1]..sig_ends[k]). head and middle are scratch buffers of
 * kc_audit_scratch_len(b, item) bytes for every selected item. Returns the bytes written,
 * 0 if OpenSSL failed to hash. Line format: docs/audit-format.md; each line equals
 * dcc_audit_issue_line's for the item's head and middle. */
size_t kc_audit_scratch_len(const kc_audit_batch *b, uint32_t item);
size_t kc_audit_lines(const kc_audit_batch *b, const uint32_t *sel, size_t nsel,
                      const uint8_t *sigs, const uint32_t *sig_ends, uint64_t seq, char prev[64],
                      char *head, char *middle, char *out);

#endif
