/* Strict UTF-8, one multi-byte sequence at a time: the rules the walker, the load generator's
 * result scan and the DCC validator share (what Python's and Rust's strict decoders accept:
 * no overlong form, no surrogate, nothing above U+10FFFF). Each caller keeps its own loop
 * and its own ASCII fast path; only a non-ASCII byte comes here. */
#ifndef DCCSIGN_UTF8_H
#define DCCSIGN_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* The length (2..4) of the strict UTF-8 sequence that starts at s[0] (>= 0x80), with `avail`
 * bytes readable from s on; 0 when there is no valid sequence there. */
static inline size_t utf8_sequence(const uint8_t *s, size_t avail)
{
    uint8_t c = s[0], lo = 0x80, hi = 0xbf;
    size_t need;
    if (c >= 0xc2 && c <= 0xdf) {
        need = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
        need = 2;
        if (c == 0xe0) lo = 0xa0; /* overlong */
        if (c == 0xed) hi = 0x9f; /* surrogates */
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 3;
        if (c == 0xf0) lo = 0x90; /* overlong */
        if (c == 0xf4) hi = 0x8f; /* above U+10FFFF */
    } else {
        return 0;
    }
    if (avail <= need) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 2; k <= need; k++)
        if ((s[k] & 0xc0) != 0x80) return 0;
    return need + 1;
}

#endif
