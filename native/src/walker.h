/* Request walker: a SIGN / SIGN_BATCH body (after zstd) to flat item spans, no objects.
 *
 * The Python twin is native/_walker_py.py; protocol/SPEC.md sections 4.3 and 6.4 are the rules.
 * The C side only decides accept or refuse: on refusal the caller asks the twin, which names
 * the rule broken with the codec's own message and code (a refusal is the cold path, and the
 * connection ends with it).
 */
#ifndef DCCSIGN_WALKER_H
#define DCCSIGN_WALKER_H

#include <stddef.h>
#include <stdint.h>

enum {
    WALK_OK = 0,
    WALK_REFUSED = 1,    /* a framing rule is broken: the twin says which */
    WALK_NEED_EXTRA = 2, /* an item's field string is indefinite-length: call again with extra */
    WALK_NOMEM = 3,
};

/* Per-item columns (uint32 each; WALK_NFIELDS per item). Offsets index the view's data: the
 * body itself, followed by the joined chunks of any indefinite-length field strings. */
enum {
    WALK_DCC_OFF = 0, /* the DCC map's encoded bytes (head included) */
    WALK_DCC_LEN,
    WALK_ACCOUNT_OFF, /* UTF-8 content */
    WALK_ACCOUNT_LEN,
    WALK_OPERATOR_OFF,
    WALK_OPERATOR_LEN, /* 0: absent (an operator has at least one character) */
    WALK_KID_OFF,      /* 8 bytes; 0: absent (offset 0 is the body's head, never a kid) */
    WALK_VALIDITY,     /* validity_days; 0: absent */
    WALK_KEY_OFF,
    WALK_KEY_LEN, /* idempotency_key content; 0: absent */
    WALK_FLAGS,
    WALK_NFIELDS
};

#define WALK_FLAG_KEY_TEXT 0x1u         /* the idempotency key is text (else bytes) */
#define WALK_FLAG_ACCOUNT_NON_ASCII 0x2u
#define WALK_FLAG_OPERATOR_NON_ASCII 0x4u

/* In one pass: exactly one well-formed CBOR item within the limits (what dcc_cbor_scan
 * refuses: more than max_items data items, more than max_depth levels, malformed, trailing
 * bytes) and every rule the codec's strict decoder applies: no tags, valid UTF-8 in every
 * text chunk, no two-byte simple values below 32, map keys text or bytes only, no duplicate
 * keys. */
int walk_check(const uint8_t *buf, size_t len, uint64_t max_items, int max_depth);

/* Where the items are: for a batch (single = 0) the body map's "items" array (its offset and
 * entry count; refused unless a non-empty array); for SIGN (single = 1) the body map itself,
 * count 1. Only after walk_check accepted buf. */
int walk_locate(const uint8_t *buf, size_t len, int single, size_t *items_off, uint32_t *count);

/* Pass 3: every item's fields (SPEC.md 6.4) into out[count * WALK_NFIELDS]. extra may be NULL
 * until WALK_NEED_EXTRA asks for it (capacity len bytes: joined content never exceeds its
 * encoding); *extra_len is how much of it was used. Only after walk_locate. */
int walk_items(const uint8_t *buf, size_t len, size_t items_off, uint32_t count, int single,
               uint32_t *out, uint8_t *extra, size_t *extra_len);

#endif

/* ---- claims splice ---- */

/* 1 if the DCC map encoded at buf[0, len) is byte for byte what the engine's encoder
 * (cbor2.dumps of the decoded value) gives for it, and no name in it may change under NFC
 * normalisation (nam.fn / nam.gn with a code point from U+0300 up: such names go to the
 * slow path, which normalises them); 0 otherwise. buf has passed walk_check. */
int splice_canonical(const uint8_t *buf, size_t len);

/* Payload i = prefixes[prefix_of[i]] + its DCC bytes (src[i], srclen[i]) into out at
 * offsets[i]; prefix_of[i] == SPLICE_NONE gives an empty payload. offsets has count + 1
 * entries, offsets[count] the total; out has room for it (splice_size). */
#define SPLICE_NONE 0xffffffffu
size_t splice_size(uint32_t count, const uint32_t *prefix_of, const size_t *prefix_len,
                   const size_t *srclen);
void splice_assemble(uint32_t count, const uint32_t *prefix_of, const uint8_t *const *prefix,
                     const size_t *prefix_len, const uint8_t *const *src, const size_t *srclen,
                     uint8_t *out, uint32_t *offsets);

/* ---- reply body (SIGN_BATCH_RESULT / SIGN_RESULT) ---- */

#define REPLY_NONE 0xffffffffu
#define REPLY_MAX_HC1 8192 /* characters (SPEC.md 6.6) */

/* Room reply_encode needs: for each signed item (prot_of[i] != REPLY_NONE) its result map
 * around an HC1 of at most dcc_hc1_max_len characters; for each refused one its pre-encoded
 * map (refusal_len[i]). */
size_t reply_max_len(uint32_t count, const uint32_t *prot_of, const size_t *prot_len,
                     const uint32_t *pay_off, const uint32_t *sig_off, const size_t *refusal_len);

/* The CBOR result body, as the codec encodes it: {"results": [result map, ...]} (or, with
 * single, the one result map). A signed item i is {"hc1": HC1 of COSE_Sign1(prot[p],
 * payload i, signature i), "kid": kid[p]} with p = prot_of[i] (payload i =
 * pay[pay_off[i], pay_off[i + 1]), likewise the signature); a refused item is copied from
 * refusal[i]. scratch holds dcc_hc1_scratch_len and hc1 dcc_hc1_max_len bytes for the
 * largest item. Returns DCC_OK with *outlen; WALK_REFUSED with *bad the first item whose HC1
 * would pass REPLY_MAX_HC1 characters; or a deflate failure (DCC_ERR_ZLIB, message in err). */
int reply_encode(uint32_t count, int single, const uint32_t *prot_of, const uint8_t *const *prot,
                 const size_t *prot_len, const uint8_t *const *kid, const uint8_t *pay,
                 const uint32_t *pay_off, const uint8_t *sig, const uint32_t *sig_off,
                 const uint8_t *const *refusal, const size_t *refusal_len, int level,
                 uint8_t *scratch, char *hc1, uint8_t *out, size_t *outlen, uint32_t *bad,
                 const char **err);
