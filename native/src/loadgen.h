/*
 * loadgen: counting the load generator's SIGN_RESULT / SIGN_BATCH_RESULT bodies without
 * decoding them (the C half of dccsign.native.scan_results; contract and rules in
 * native/_loadgen_py.py, the pure-Python twin, which this file follows step by step so that
 * both give the same results and the same first error).
 *
 * No Python API, no global mutable state: safe without the GIL.
 */
#ifndef DCCSIGN_LOADGEN_H
#define DCCSIGN_LOADGEN_H

#include <stddef.h>
#include <stdint.h>

enum {
    LG_OK = 0,
    LG_ERR_MALFORMED = 1,  /* "CBOR at byte <err_pos>: <err>" */
    LG_ERR_BODY = 2,       /* <err> as it is */
    LG_ERR_RESULTS = 3,    /* the results array is missing, empty or longer than allowed */
    LG_ERR_RESULT = 4      /* <err> about the result at <err_index> (prefixed by the caller) */
};

#define LG_MAX_DEPTH 16

/* One result that is not signed: its position and error code. */
typedef struct {
    uint32_t pos;
    uint32_t code;
} lg_error;

/* A result position whose HC1 is wanted; found = 1 (with the spans) if it is signed. */
typedef struct {
    uint32_t pos;
    int found;
    size_t hc1_off, hc1_len, kid_off;
} lg_want;

/* Walk a plain reply body: a SIGN_BATCH_RESULT map (batch != 0, 1..max_results results) or
 * one SIGN_RESULT map. On LG_OK: *n results, errs[0..*n_errs) the unsigned ones (errs must
 * hold max_results entries, 1 for a SIGN_RESULT), wants filled in. Otherwise *err (static
 * text), *err_pos and *err_index say what failed (see the enum). */
int lg_scan_results(const uint8_t *buf, size_t len, int batch, uint32_t max_results,
                    uint32_t *n, lg_error *errs, uint32_t *n_errs, lg_want *wants,
                    size_t n_wants, const char **err, size_t *err_pos, uint32_t *err_index);

#endif
