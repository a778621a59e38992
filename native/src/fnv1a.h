/* FNV-1a (64-bit) over short byte strings: the hash of the open-addressing tables the DCC
 * validator (value-set codes) and the span tables (accounts like "uzi:123456789") probe.
 * Callers mask its low bits to their table size. No adversary gains from collisions here
 * beyond a longer probe within one table of bounded size. */
#ifndef DCCSIGN_FNV1A_H
#define DCCSIGN_FNV1A_H

#include <stddef.h>
#include <stdint.h>

static inline uint64_t fnv1a(const uint8_t *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

#endif
