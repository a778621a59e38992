/* The native DCC validator: the twin of engine/dcc/validate.py + uvci.py + value sets, on CBOR bytes.
 *
 * dv_validate() reads one DCC map in CBOR (the value under CWT claim -260/1) and decides what
 * engine/dcc/validate.py's validate() decides about the object a given decoder makes of those bytes:
 *
 *   strict (the engine):  protocol/cborlimits.decode() with DV_STRICT_MAX_ITEMS and
 *                         DV_STRICT_MAX_DEPTH: no tags, no duplicate keys, text/bytes keys;
 *   keyd:                 engine/verify.loads_exact() (cbor2 with its defaults).
 *
 * Outcomes: DV_V/DV_T/DV_R (valid, of that type); DV_INVALID with the list of (path, rule) in
 * the order the Python validator reports them; DV_UNDECODABLE when the decoder refuses the
 * bytes; DV_PUNT when the bytes hold something this walker does not model exactly (tags in
 * keyd mode, duplicate or non-text keys in keyd mode, chunked map keys, very large maps,
 * very deep nesting): the caller then asks the Python validator. Only the DV_V/DV_T/DV_R
 * answers are final; every other answer is re-derived by the Python twin by the caller, which
 * builds the exception (so messages are the Python ones) and cross-checks the (path, rule)
 * list. Nothing here allocates; no global state; safe without the GIL. */
#ifndef DCCSIGN_DCCVALIDATE_H
#define DCCSIGN_DCCVALIDATE_H

#include <stddef.h>
#include <stdint.h>

enum { DV_V = 0, DV_T = 1, DV_R = 2, DV_INVALID = 3, DV_UNDECODABLE = 4, DV_PUNT = 5 };

/* Rule ids; the order is the Cython table's (native/_dccvalidate.pxi, _DV_RULES). */
enum {
    DV_RULE_TYPE = 0,
    DV_RULE_REQUIRED,
    DV_RULE_UNKNOWN_FIELD,
    DV_RULE_VERSION,
    DV_RULE_ONE_GROUP,
    DV_RULE_ONE_ENTRY,
    DV_RULE_MAX_LENGTH,
    DV_RULE_PATTERN,
    DV_RULE_EMPTY,
    DV_RULE_DATE,
    DV_RULE_DATE_TIME,
    DV_RULE_DATE_ORDER,
    DV_RULE_RANGE,
    DV_RULE_VALUE_SET,
    DV_RULE_UVCI_GRAMMAR,
    DV_RULE_UVCI_CHECKSUM,
};

/* The decoders' limits in strict mode (the Python twin passes the same to cborlimits.decode):
 * a DCC that came out of a request body that decoded (wire.MAX_DEPTH = 16 for the whole body)
 * always fits. */
#define DV_STRICT_MAX_ITEMS 65536
#define DV_STRICT_MAX_DEPTH 16

#define DV_PATH_MAX 80
typedef struct {
    uint8_t rule;
    /* key_off != 0: the path is `path` followed by the child of the map key whose CBOR item
     * starts at key_off (a key that is not a short identifier: the caller renders it the way
     * dcc.validate.child_path does); otherwise `path` is the whole JSON path. */
    uint32_t key_off;
    char path[DV_PATH_MAX];
} dv_issue;

typedef struct {
    dv_issue *items;
    int cap;
    int n;
    int overflow; /* more issues than cap: the list is incomplete */
} dv_issues;

/* One value set: an open-addressing hash of its codes (UTF-8). */
typedef struct {
    uint32_t mask;      /* slots - 1 (slots a power of two), or 0 with no codes */
    uint32_t *slot;     /* index + 1 into off/len, 0 = empty */
    uint32_t *off;
    uint32_t *len;
    const uint8_t *blob;
} dv_set;

enum { DV_SET_TG = 0, DV_SET_VP, DV_SET_MP, DV_SET_VMA, DV_SET_TT, DV_SET_TR, DV_SET_CO,
       DV_SET_TEST_MANF, DV_NSETS };

/* Code points below DV_NFC_LIMIT that no NFC normalisation ever changes or combines with a
 * neighbour (canonical combining class 0, NFC of itself, never the second character of a
 * canonical composition): a text of only these is NFC. Built from Python's unicodedata by
 * DccRules, so the C side and engine/chain._nfc use the same Unicode version. */
#define DV_NFC_LIMIT 0x3000

typedef struct {
    dv_set sets[DV_NSETS];
    int has_test_manf; /* 0: no RAT device list loaded, a test's ma is free text */
    const uint8_t *nfc_inert; /* bitmap, DV_NFC_LIMIT bits */
} dv_rules;

/* dv_validate flags */
#define DV_STRICT 1 /* the engine's decoder (else keyd's) */
#define DV_NFC 2    /* the engine's view: fn and gn NFC-normalised first (chain._nfc); a name C
                     * cannot prove NFC is punted */

/* Builds set `which` over n codes stored back to back in blob (lengths in lens). slot must
 * have room for dv_set_slots(n) entries, off and len for n; all stay owned by the caller. */
uint32_t dv_set_slots(uint32_t n);
void dv_set_build(dv_set *set, const uint8_t *blob, const uint32_t *lens, uint32_t n,
                  uint32_t *slot, uint32_t *off, uint32_t *len);
int dv_set_contains(const dv_set *set, const uint8_t *s, size_t n);

/* Validates the CBOR item buf[0..len) (exactly one item). today: "YYYY-MM-DD". flags: DV_STRICT
 * and/or DV_NFC. issues may be NULL (then only the outcome). */
int dv_validate(const dv_rules *rules, const uint8_t *buf, size_t len, const char *today,
                int flags, dv_issues *issues);

/* keyd's form: buf[0..len) is a whole CWT payload, decoded the keyd way; the DCC under claim
 * -260/1 is validated. DV_PUNT when the payload is not plainly a map of integer claims with
 * -260 a one-entry map {1: DCC} (the Python twin says what is wrong). Issue key offsets are
 * relative to buf. */
int dv_validate_cwt(const dv_rules *rules, const uint8_t *buf, size_t len, const char *today,
                    dv_issues *issues);

/* Luhn mod 38 check character of s[0..n) over "A-Z0-9/:" (all characters assumed in it). */
char dv_luhn38(const uint8_t *s, size_t n);

#endif
