/*
 * smalldeflate: a zlib (RFC 1950/1951) encoder for inputs shorter than 4 KiB.
 *
 * Made for HC1, where each certificate deflates one ~350-450-byte COSE_Sign1: there
 * libdeflate's one-shot compressor spends most of each call, at every level, on fixed
 * per-call work (bench/README.md, "Deflate for small inputs").
 * This encoder treats the whole input as its window (no history state), sizes its hash table
 * to the input, writes one block (the smallest of dynamic Huffman, fixed Huffman and stored)
 * and keeps its scratch per thread (allocated once, freed when the thread exits).
 *
 * native/_smalldeflate_py.py is the readable specification; this file produces the same
 * bytes for every input and level (tests/test_smalldeflate.py compares them).
 */
#ifndef SMALLDEFLATE_H
#define SMALLDEFLATE_H

#include <stddef.h>
#include <stdint.h>

/* Inputs of this many bytes or more are refused (dcc_deflate sends them to libdeflate). */
#define DCC_SMALL_DEFLATE_MAX 4096

/* Writes a zlib stream of in[0..n) to out. level 0: one stored block; 1..9 and -1: the full
 * encoder (the level only sets the header's informational FLEVEL bits). The output is never
 * longer than n + 11 bytes (the stored form), which dcc_zlib_bound(n) covers.
 * Returns DCC_OK, or DCC_ERR_ZLIB with a message in *err: level outside -1..9, n too large,
 * cap too small, or no memory for the thread's scratch. */
int dcc_small_deflate(const uint8_t *in, size_t n, int level, uint8_t *out, size_t cap,
                      size_t *outlen, const char **err);

/* The length-limited Huffman code builder on its own, for differential tests: nsym 2..286,
 * limit 5..15, each frequency at most 2^22. Returns 0, or -1 for arguments out of range. */
int dcc_sd_code_lengths(const uint32_t *freqs, int nsym, int limit, uint8_t *lengths);

#endif
