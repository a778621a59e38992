/* Span tables: see spantable.h. An open-addressing hash table sized to the rows (a frame holds
 * at most max_batch items, 1,000 by default), so a frame costs one allocation and a hash and
 * a compare per item. */
#include "spantable.h"

#include "fnv1a.h"

#include <stdlib.h>
#include <string.h>

int span_table(const uint8_t *data, const uint32_t *cols, uint32_t nfields, uint32_t off_field,
               uint32_t len_field, const uint32_t *rows, uint32_t n, uint32_t base,
               uint32_t absent, uint32_t *index, uint32_t *first, uint32_t *distinct)
{
    uint32_t size = 16;
    while (size < 2u * n) size <<= 1;
    /* slot -> distinct number + 1 (0: empty) */
    uint32_t *slots = calloc(size, sizeof *slots);
    if (slots == NULL) return -1;
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t *f = cols + (size_t)rows[i] * nfields;
        uint32_t len = f[len_field];
        if (len == 0) {
            index[i] = absent;
            continue;
        }
        const uint8_t *p = data + f[off_field];
        uint32_t s = (uint32_t)fnv1a(p, len) & (size - 1);
        for (;;) {
            uint32_t e = slots[s];
            if (e == 0) {
                slots[s] = k + 1;
                first[k] = i;
                index[i] = base + k++;
                break;
            }
            const uint32_t *g = cols + (size_t)rows[first[e - 1]] * nfields;
            if (g[len_field] == len && memcmp(data + g[off_field], p, len) == 0) {
                index[i] = base + e - 1;
                break;
            }
            s = (s + 1) & (size - 1);
        }
    }
    free(slots);
    *distinct = k;
    return 0;
}

int span_lengths(const uint32_t *rows, const uint32_t *ends, uint32_t m, size_t len,
                 uint32_t n, uint32_t *lens)
{
    uint32_t start = 0;
    for (uint32_t j = 0; j < m; j++) {
        if (ends[j] < start || ends[j] > len || rows[j] >= n) return -1;
        lens[rows[j]] += ends[j] - start;
        start = ends[j];
    }
    return 0;
}

void span_copy(const uint32_t *rows, const uint32_t *ends, uint32_t m, const uint8_t *data,
               const uint32_t *offsets, uint8_t *out)
{
    uint32_t start = 0;
    for (uint32_t j = 0; j < m; j++) {
        memcpy(out + offsets[rows[j]], data + start, ends[j] - start);
        start = ends[j];
    }
}

int span_fill(uint32_t *target, uint32_t n, const uint32_t *rows, uint32_t m, uint32_t value)
{
    for (uint32_t j = 0; j < m; j++) {
        if (rows[j] >= n) return -1;
        target[rows[j]] = value;
    }
    return 0;
}
