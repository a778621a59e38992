/*
 * keydcore: the C half of keyd's per-item work -- its structural check of CWT payloads and the
 * lines of its issuance audit log.
 *
 * keyd checks and audits every signature it makes. Done in Python, that work held the GIL
 * longer per item than the signature itself: these functions do it in a fraction of that
 * time, without the GIL (figures: bench/README.md, "keyd"). Like dcccore, nothing here touches Python; the Cython module
 * owns arguments, results and exceptions, and the pure-Python twins (_cwt_py.py, _audit_py.py)
 * state the same contracts readably.
 */
#ifndef KEYDCORE_H
#define KEYDCORE_H

#include <stddef.h>
#include <stdint.h>

#include "dcccore.h"

/* ---- CWT payloads (keyd's structural check) ---- */

#define DCC_UVCI_MAX 80 /* the longest UVCI any DCC schema version accepts */

typedef struct {
    char iss[2];          /* claim 1: two ASCII capitals */
    int64_t exp, iat;     /* claims 4 and 6 */
    char type;            /* 'v', 't' or 'r': the one certificate array the DCC holds */
    size_t ci_off, ci_len; /* the UVCI (ci) of its one entry: printable ASCII, 1..80 bytes */
} dcc_cwt_facts;

/* Checks that buf is one well-formed CBOR item (DCC_ERR_CBOR otherwise) shaped like a DCC
 * CWT (DCC_ERR_SHAPE otherwise), and reads its facts. The shape, all lengths definite:
 *   { 1: tstr(2, A-Z), 4: int, 6: int, -260: { 1: DCC } }   (exactly these claims, any order)
 *   DCC = map with distinct text keys, exactly one of "v", "t", "r", whose value is an array
 *         of exactly one map that holds "ci" once, as 1..80 printable ASCII characters.
 * Integers must fit in int64. Everything else inside the DCC is only checked to be
 * well-formed: its content is the engine's validator's business. */
int dcc_cwt_facts_read(const uint8_t *buf, size_t len, dcc_cwt_facts *facts, const char **err);

/* ---- audit log lines ---- */

/* What the issue entries of one group share (see docs/audit-format.md for the line format):
 *   head   = {"account":A,"alg":N,"client":C,"iss":
 *   middle = ,"kid":"K","operator":O,"payload_sha256":"
 *   time   = the commit time, already formatted (fixed width, ASCII) */
typedef struct {
    const char *head;
    size_t head_len;
    const char *middle;
    size_t middle_len;
    const char *time;
    size_t time_len;
} dcc_audit_common;

/* Upper bound of one line's length for a common part c. */
size_t dcc_audit_line_max(const dcc_audit_common *c);

/* Writes one issue line (no newline) to out and returns its length; next_prev gets the
 * SHA-256 (64 lower-case hex digits) of the line, the next entry's prev. `signed_part` is
 * what the SIGNATURE revocation hash covers (r for ES256, the whole signature for PS256);
 * `scratch` must hold 2 + uvci_len bytes. Returns 0 if OpenSSL fails to hash. */
size_t dcc_audit_issue_line(const dcc_audit_common *c, const char iss[2], const uint8_t *uvci,
                            size_t uvci_len, char type, const uint8_t *payload,
                            size_t payload_len, const uint8_t *signed_part, size_t signed_len,
                            uint64_t seq, const char prev[64], uint8_t *scratch, char *out,
                            char next_prev[64]);

#endif
