/*
 * dcccore: the C half of dccsign's native core.
 *
 * Everything here runs without the Python GIL: no Python API, no global mutable state except
 * the per-thread deflate streams (thread-local by construction) and constants set up once.
 * The Cython module (_native.pyx) owns argument checking, memory for results and exceptions.
 *
 * Byte layouts follow the HC1 chain (DESIGN.md, dcc-spec-notes.md §1):
 *   Sig_structure = 84 6a "Signature1" bstr(protected) 40 bstr(payload)
 *   COSE_Sign1    = d2 84 bstr(protected) a0 bstr(payload) bstr(signature)
 */
#ifndef DCCCORE_H
#define DCCCORE_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/evp.h>

/* Status codes returned by every function that can fail. */
enum {
    DCC_OK = 0,
    DCC_ERR_B45_CHAR = 1,     /* character outside the base45 alphabet */
    DCC_ERR_B45_LENGTH = 2,   /* length = 1 (mod 3) */
    DCC_ERR_B45_OVERFLOW = 3, /* a triplet above 65535 or a pair above 255 */
    DCC_ERR_NOMEM = 4,
    DCC_ERR_ZLIB = 5,         /* deflate/inflate failure (message in *err) */
    DCC_ERR_SIGN = 6,         /* OpenSSL refused to sign */
    DCC_ERR_CBOR = 7,         /* malformed CBOR / COSE (message in *err) */
    DCC_ERR_TOO_LARGE = 8,    /* output would exceed the caller's limit */
    DCC_ERR_SHAPE = 9,        /* well-formed CBOR of the wrong shape (message in *err) */
    DCC_ERR_TRAILING = 10     /* bytes after the item (message in *err) */
};

#define DCC_ALG_ES256 (-7)
#define DCC_ALG_PS256 (-37)
#define DCC_HC1_PREFIX "HC1:"
#define DCC_HC1_PREFIX_LEN 4
#define DCC_MAX_SIG_LEN 1024 /* RSA-8192; we accept 2048..4096 */

/* ---- base45 (RFC 9285) ---- */
size_t dcc_b45_encoded_len(size_t n);
size_t dcc_b45_encode(const uint8_t *in, size_t n, char *out);
/* out must hold (n / 3) * 2 + 1 bytes. *errpos gets the offending index on failure. */
int dcc_b45_decode(const char *in, size_t n, uint8_t *out, size_t *outlen, size_t *errpos);

/* ---- CBOR pieces ---- */
size_t dcc_cbor_head_len(uint64_t val);
size_t dcc_cbor_head(uint8_t *out, unsigned major, uint64_t val);
size_t dcc_sig_structure_len(size_t plen, size_t paylen);
size_t dcc_sig_structure(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                         uint8_t *out);
size_t dcc_sign1_len(size_t plen, size_t paylen, size_t siglen);
size_t dcc_sign1(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                 const uint8_t *sig, size_t siglen, uint8_t *out);

/* Reads one CBOR head at *pos: major type, argument (0 for indefinite lengths) and whether the
 * length is indefinite. Refuses reserved additional information and indefinite integers/tags. */
int dcc_cbor_read_head(const uint8_t *buf, size_t len, size_t *pos, unsigned *major,
                       uint64_t *val, int *indef, const char **err);
/* Walks one well-formed CBOR data item starting at *pos; advances *pos past it. */
int dcc_cbor_skip(const uint8_t *buf, size_t len, size_t *pos, int depth, const char **err);

/* Walks one CBOR item that must span buf[0..len), counting its data items (every head: each
 * key, value, tag and string chunk) without decoding anything. Returns DCC_OK with *count;
 * DCC_ERR_TOO_LARGE once the count passes max_items (a definite container whose announced size
 * alone does is refused at its head); DCC_ERR_SHAPE when containers and tags nest deeper than
 * max_depth (the outermost item is level 1); DCC_ERR_CBOR for malformed CBOR and
 * DCC_ERR_TRAILING for bytes after the item (message in *err). Recursion is at most max_depth
 * deep. protocol/cborscan.py is the reference: the same checks in the same order. */
int dcc_cbor_scan(const uint8_t *buf, size_t len, uint64_t max_items, int max_depth,
                  uint64_t *count, const char **err);

#define DCC_MAX_TAGS 4
typedef struct {
    uint64_t tags[DCC_MAX_TAGS];
    int ntags;
    size_t prot_off, prot_len;
    size_t unprot_off, unprot_len; /* the raw CBOR map item */
    size_t pay_off, pay_len;
    size_t sig_off, sig_len;
} dcc_sign1_parts;
int dcc_sign1_split(const uint8_t *buf, size_t len, dcc_sign1_parts *parts, const char **err);

/* ---- zlib (RFC 1950) ---- */
size_t dcc_zlib_bound(size_t n);
/* Deflates (zlib format) at `level` (0..9, -1 = 6): inputs under 4 KiB with dcc_small_deflate
 * (smalldeflate.h), larger ones with this thread's reused libdeflate compressor. */
int dcc_deflate(const uint8_t *in, size_t n, int level, uint8_t *out, size_t cap, size_t *outlen,
                const char **err);
/* libdeflate whatever the size (dcc_deflate's path for 4 KiB and more; benchmarks compare). */
int dcc_deflate_libdeflate(const uint8_t *in, size_t n, int level, uint8_t *out, size_t cap,
                           size_t *outlen, const char **err);
/* Inflates one complete stream; fails on truncation, trailing data or more than cap bytes. */
int dcc_inflate(const uint8_t *in, size_t n, uint8_t *out, size_t cap, size_t *outlen,
                const char **err);

/* ---- keys and signing ---- */
/* Loads a PEM private key (PKCS#8, encrypted or not). Returns NULL with a message in err. */
EVP_PKEY *dcc_load_private_key(const char *pem, size_t pemlen, const char *pass, size_t passlen,
                               int *alg, char *err, size_t errlen);
/* DER SubjectPublicKeyInfo; returns its length, or -1. *out is OPENSSL_malloc'ed. */
int dcc_public_key_der(EVP_PKEY *pkey, unsigned char **out);
size_t dcc_signature_max_len(EVP_PKEY *pkey, int alg);

/* A signer holds contexts reused for every signature of one batch call. */
typedef struct {
    EVP_PKEY_CTX *pctx;
    int alg;
    size_t maxsig;
} dcc_signer;
int dcc_signer_open(dcc_signer *s, EVP_PKEY *pkey, int alg);
void dcc_signer_close(dcc_signer *s);
/* SHA-256 of data into out (fetched once, a context per thread); 1 on success, 0 when
 * OpenSSL cannot provide it. */
int dcc_sha256(const uint8_t *data, size_t n, uint8_t out[32]);
/* SHA-256 over tbs, then sign. ES256: 64-byte r||s, each half left-padded, low-S. */
int dcc_sign_tbs(dcc_signer *s, const uint8_t *tbs, size_t tbslen, uint8_t *sig, size_t *siglen);
/* The same from the SHA-256 of a Sig_structure this module built (the nonce pool's miss path
 * has hashed it already). Never exposed to Python: nothing signs a caller's digest. */
int dcc_sign_digest(dcc_signer *s, const uint8_t digest[32], uint8_t *sig, size_t *siglen);

/* One complete HC1 string (not NUL-terminated) from its parts; scratch must hold
 * dcc_hc1_scratch_len() bytes and out dcc_hc1_max_len() bytes. */
size_t dcc_hc1_scratch_len(size_t plen, size_t paylen, size_t siglen);
size_t dcc_hc1_max_len(size_t plen, size_t paylen, size_t siglen);
int dcc_hc1_encode_one(const uint8_t *prot, size_t plen, const uint8_t *pay, size_t paylen,
                       const uint8_t *sig, size_t siglen, int level, uint8_t *scratch, char *out,
                       size_t *outlen, const char **err);

#endif
