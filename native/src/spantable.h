/* Span tables: the distinct strings among one field of a frame's items, and each item's index
 * into them, without a Python object per item (issue 14: quotas are charged once per distinct
 * account of a frame, and keyd's columnar message names each client, account and operator
 * once). The Python twin is native/_spantable_py.py.
 */
#ifndef DCCSIGN_SPANTABLE_H
#define DCCSIGN_SPANTABLE_H

#include <stddef.h>
#include <stdint.h>

#define SPAN_ABSENT 0xFFFFFFFFu /* the index of an item whose span is empty (absent field) */

/* For each of the n rows rows[i] (item numbers), the span data[cols[r*nfields+off_field] ..
 * + cols[r*nfields+len_field]] of item r. Writes index[i] (base + the position of the span's
 * first appearance among the distinct spans, or absent for an empty span) and first[k] (the
 * row position i where distinct span k first appears); *distinct is their count.
 * Returns 0, or -1 when out of memory. Spans must lie within data (the walker's contract). */
int span_table(const uint8_t *data, const uint32_t *cols, uint32_t nfields, uint32_t off_field,
               uint32_t len_field, const uint32_t *rows, uint32_t n, uint32_t base,
               uint32_t absent, uint32_t *index, uint32_t *first, uint32_t *distinct);



/* Scatter pieces into item order. Piece j of a group belongs to item rows[j] (< n) and is
 * data[start(j) .. ends[j]] (start(0) = 0, else ends[j-1]). span_lengths adds each piece's
 * length to lens[rows[j]] (call it once per group, lens zeroed first); then offsets[0..n]
 * are the running sums of lens; span_copy writes each piece at out + offsets[rows[j]].
 * Returns 0, or -1 when a piece is out of order or beyond data (len), or an item beyond n. */
int span_lengths(const uint32_t *rows, const uint32_t *ends, uint32_t m, size_t len,
                 uint32_t n, uint32_t *lens);
void span_copy(const uint32_t *rows, const uint32_t *ends, uint32_t m, const uint8_t *data,
               const uint32_t *offsets, uint8_t *out);
/* target[rows[j]] = value for each j < m; -1 when a row is >= n. */
int span_fill(uint32_t *target, uint32_t n, const uint32_t *rows, uint32_t m, uint32_t value);
#endif
