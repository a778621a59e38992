/*
 * smalldeflate.c: see smalldeflate.h for the contract and native/_smalldeflate_py.py for the
 * algorithm, step by step; names here follow that file.
 */
#include "smalldeflate.h"
#include "dcccore.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#define SD_MAX DCC_SMALL_DEFLATE_MAX
#define MIN_MATCH 3
#define MAX_MATCH 258
#define MAX_CHAIN 32
#define NICE_LEN 32
#define NLIT 286
#define NDIST 30
#define NCL 19

static const uint16_t LEN_BASE[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                      31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t LEN_EXTRA[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                      2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t DIST_BASE[30] = {1,    2,    3,    4,    5,    7,     9,     13,    17,  25,
                                       33,   49,   65,   97,   129,  193,   257,   385,   513, 769,
                                       1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const uint8_t DIST_EXTRA[30] = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                       6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
static const uint8_t CL_ORDER[NCL] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
static const uint8_t CL_EXTRA[NCL] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7};

/* Tables built once per process: length/distance -> symbol, and the fixed Huffman code. */
static uint8_t len_sym[MAX_MATCH + 1];
static uint8_t dist_sym[SD_MAX + 1];
static uint8_t fixed_lit_len[288], fixed_dist_len[NDIST];
static uint16_t fixed_lit_code[288], fixed_dist_code[NDIST];
static uint8_t rev8[256]; /* bit-reversed bytes, for the LSB-first codes */
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void canonical_codes(const uint8_t *lengths, int nsym, uint16_t *codes);

static void tables_init(void)
{
    for (int b = 0; b < 256; b++) {
        int r = 0;
        for (int t = 0; t < 8; t++) r |= ((b >> t) & 1) << (7 - t);
        rev8[b] = (uint8_t)r;
    }
    for (int c = 0; c < 29; c++)
        for (int l = LEN_BASE[c]; l < LEN_BASE[c] + (1 << LEN_EXTRA[c]) && l <= MAX_MATCH; l++)
            len_sym[l] = (uint8_t)c;
    len_sym[MAX_MATCH] = 28; /* 258 has its own code (RFC 1951 3.2.5) */
    for (int c = 0; c < NDIST; c++)
        for (int d = DIST_BASE[c]; d < DIST_BASE[c] + (1 << DIST_EXTRA[c]) && d <= SD_MAX; d++)
            dist_sym[d] = (uint8_t)c;
    for (int s = 0; s < 288; s++)
        fixed_lit_len[s] = s < 144 ? 8 : s < 256 ? 9 : s < 280 ? 7 : 8;
    for (int s = 0; s < NDIST; s++) fixed_dist_len[s] = 5;
    canonical_codes(fixed_lit_len, 288, fixed_lit_code);
    canonical_codes(fixed_dist_len, NDIST, fixed_dist_code);
}

/* Per-thread scratch: 48 KB, allocated on a thread's first call. Per call, only what the input
 * uses is cleared: 2^bits hash heads (sized to the input) and n match lengths. */
typedef struct {
    int16_t head[1 << 12];
    int16_t prev[SD_MAX];
    uint16_t mlen[SD_MAX], mdist[SD_MAX];
    uint16_t item_a[SD_MAX], item_d[SD_MAX]; /* (length, distance) or (position, 0) */
} sd_scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_key_make(void) { (void)pthread_key_create(&scratch_key, free); }

static sd_scratch *thread_scratch(void)
{
    pthread_once(&scratch_once, scratch_key_make);
    sd_scratch *s = pthread_getspecific(scratch_key);
    if (s == NULL) {
        s = malloc(sizeof *s);
        if (s != NULL && pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}

/* ---------------------------------------------------------------- matches and parses */

static void find_matches(const uint8_t *in, int n, sd_scratch *s)
{
    memset(s->mlen, 0, (size_t)n * sizeof s->mlen[0]);
    if (n < MIN_MATCH) return;
    int bits = 32 - __builtin_clz((unsigned)n); /* n.bit_length() */
    if (bits < 6) bits = 6;
    if (bits > 12) bits = 12;
    int shift = 32 - bits;
    memset(s->head, 0xFF, sizeof(int16_t) << bits);
    uint32_t v = (uint32_t)in[0] << 8 | (uint32_t)in[1] << 16;
    for (int i = 0; i <= n - MIN_MATCH; i++) {
        v = v >> 8 | (uint32_t)in[i + 2] << 16; /* in[i] | in[i+1] << 8 | in[i+2] << 16 */
        uint32_t h = (v * 0x9E3779B1u) >> shift;
        int j = s->head[h];
        s->prev[i] = (int16_t)j;
        s->head[h] = (int16_t)i;
        if (j < 0) continue; /* the common case on HC1 inputs: nothing to compare */
        int limit = n - i < MAX_MATCH ? n - i : MAX_MATCH;
        int best = 0, bestd = 0, chain = MAX_CHAIN;
        for (; j >= 0 && chain > 0; j = s->prev[j]) {
            chain--;
            if (in[j + best] != in[i + best]) continue; /* cannot beat the best */
            const uint8_t *a = in + j, *b = in + i;
            int k = 0;
            while (k < limit && a[k] == b[k]) k++;
            if (k > best) {
                best = k;
                bestd = i - j;
                if (k >= NICE_LEN || k == limit) break;
            }
        }
        if (best >= MIN_MATCH) {
            s->mlen[i] = (uint16_t)best;
            s->mdist[i] = (uint16_t)bestd;
        }
    }
}

/* Lazy matching with one step of look-ahead; leaves the items in s->item_*, counts their
 * symbols, and returns their number. */
static int lazy_parse(const uint8_t *in, int n, sd_scratch *s, uint32_t *lit, uint32_t *dist,
                      uint64_t *fixed_bits)
{
    memset(lit, 0, NLIT * sizeof *lit);
    memset(dist, 0, NDIST * sizeof *dist);
    /* The fixed code's symbol bits, counted on the way (RFC 1951 3.2.6): 8 bits per literal
     * or length symbol, +1 for literals 144..255, -1 for symbols 256..279 (EOB and lengths
     * under 115), and 5 bits per distance. */
    int nitems = 0, i = 0, nmatch = 0, short_len = 0;
    while (i < n) {
        int m = s->mlen[i];
        if (m >= MIN_MATCH && !(i + 1 < n && s->mlen[i + 1] > m)) {
            nmatch++;
            short_len += m < 115;
            lit[257 + len_sym[m]]++;
            dist[dist_sym[s->mdist[i]]]++;
            s->item_a[nitems] = (uint16_t)m;
            s->item_d[nitems++] = s->mdist[i];
            i += m;
        } else {
            lit[in[i]]++;
            s->item_a[nitems] = (uint16_t)i;
            s->item_d[nitems++] = 0;
            i++;
        }
    }
    lit[256] = 1;
    uint32_t high = 0;
    for (int b = 144; b < 256; b++) high += lit[b];
    *fixed_bits = 8 * (uint64_t)(nitems + 1) + (uint64_t)high - (uint64_t)(short_len + 1) +
                  5 * (uint64_t)nmatch;
    return nitems;
}

/* ---------------------------------------------------------------- Huffman codes */

/* Length-limited code lengths; see code_lengths() in the Python file for the rules. */
static uint64_t code_lengths(const uint32_t *freqs, int nsym, int limit, uint8_t *lengths)
{
    uint32_t key[NLIT]; /* frequency << 9 | symbol: sorting keys sorts by (frequency, symbol) */
    int m = 0;
    for (int s = 0; s < nsym; s++)
        if (freqs[s]) key[m++] = freqs[s] << 9 | (uint32_t)s;
    for (int s = 0; m < 2; s++) /* at least two codes: pad with the lowest unused symbols */
        if (!freqs[s]) key[m++] = (uint32_t)s;
    /* Stable counting sort on the frequency: the keys were collected in ascending symbol
     * order (the zero-frequency padding last, but it sorts first anyway), so this sorts by
     * (frequency, symbol). One pass over maxf + 1 buckets while the frequencies are small
     * (HC1 inputs), else LSD radix passes of 8 bits. An insertion sort cost more than the rest
     * of the encoder together. */
    uint32_t maxf = 0, tmp[NLIT];
    for (int a = 0; a < m; a++)
        if ((key[a] >> 9) > maxf) maxf = key[a] >> 9;
    int pos[257];
    if (maxf < 256) {
        memset(pos, 0, (maxf + 2) * sizeof pos[0]);
        for (int a = 0; a < m; a++) pos[(key[a] >> 9) + 1]++;
        for (uint32_t b = 1; b <= maxf; b++) pos[b] += pos[b - 1];
        for (int a = 0; a < m; a++) tmp[pos[key[a] >> 9]++] = key[a];
        memcpy(key, tmp, (size_t)m * sizeof key[0]);
    } else {
        for (int shift = 9; shift < 32 && (maxf << 9) >> shift; shift += 8) {
            memset(pos, 0, sizeof pos);
            for (int a = 0; a < m; a++) pos[((key[a] >> shift) & 255) + 1]++;
            for (int b = 1; b <= 256; b++) pos[b] += pos[b - 1];
            for (int a = 0; a < m; a++) tmp[pos[(key[a] >> shift) & 255]++] = key[a];
            memcpy(key, tmp, (size_t)m * sizeof key[0]);
        }
    }
    uint32_t iw[NLIT];
    int16_t iparent[NLIT], parent_leaf[NLIT];
    int li = 0, ii = 0, ni = 0;
    for (int step = 0; step < m - 1; step++) {
        uint32_t w = 0;
        for (int t = 0; t < 2; t++) {
            if (li < m && (ii >= ni || (key[li] >> 9) <= iw[ii])) {
                w += key[li] >> 9;
                parent_leaf[li++] = (int16_t)ni;
            } else {
                w += iw[ii];
                iparent[ii++] = (int16_t)ni;
            }
        }
        iw[ni++] = w;
    }
    uint16_t idepth[NLIT]; /* a degenerate tree is up to m - 1 deep, before the limit applies */
    idepth[ni - 1] = 0;
    for (int k = ni - 2; k >= 0; k--) idepth[k] = (uint16_t)(idepth[iparent[k]] + 1);
    int count[NLIT + 2];
    memset(count, 0, sizeof count);
    int maxd = 0;
    for (int k = 0; k < m; k++) {
        int d = idepth[parent_leaf[k]] + 1;
        count[d]++;
        if (d > maxd) maxd = d;
    }
    if (maxd > limit) {
        int over = 0;
        for (int d = limit + 1; d <= maxd; d++) {
            over += count[d];
            count[d] = 0;
        }
        count[limit] += over;
        long excess = -(1L << limit);
        for (int d = 1; d <= limit; d++) excess += (long)count[d] << (limit - d);
        while (excess > 0) {
            int b = limit - 1;
            while (count[b] == 0) b--;
            count[b]--;
            count[b + 1] += 2;
            count[limit]--;
            excess--;
        }
        maxd = limit;
    }
    memset(lengths, 0, (size_t)nsym);
    uint64_t bits = 0; /* what the symbols cost under the code, returned for the block choice */
    int k = 0;
    for (int d = maxd; d >= 1; d--)
        for (int c = 0; c < count[d]; c++, k++) {
            lengths[key[k] & 511] = (uint8_t)d;
            bits += (uint64_t)(key[k] >> 9) * (uint64_t)d;
        }
    return bits;
}

int dcc_sd_code_lengths(const uint32_t *freqs, int nsym, int limit, uint8_t *lengths)
{
    /* nsym bounds the local arrays; limit >= 4 so that even 19 symbols fit under it. */
    if (nsym < 2 || nsym > NLIT || limit < 5 || limit > 15) return -1;
    for (int s = 0; s < nsym; s++)
        if (freqs[s] > (1u << 22)) return -1; /* keeps frequency << 9 | symbol in 32 bits */
    (void)code_lengths(freqs, nsym, limit, lengths);
    return 0;
}

static void canonical_codes(const uint8_t *lengths, int nsym, uint16_t *codes)
{
    int bl_count[16] = {0};
    uint16_t next_code[17];
    for (int s = 0; s < nsym; s++) bl_count[lengths[s]]++;
    bl_count[0] = 0;
    uint16_t code = 0;
    for (int b = 1; b <= 15; b++) {
        code = (uint16_t)((code + bl_count[b - 1]) << 1);
        next_code[b] = code;
    }
    for (int s = 0; s < nsym; s++) {
        int len = lengths[s];
        codes[s] = 0;
        if (!len) continue;
        uint32_t c = next_code[len]++;
        uint32_t r = ((uint32_t)rev8[c & 255] << 8 | rev8[c >> 8]) >> (16 - len);
        codes[s] = (uint16_t)r;
    }
}

/* Run-length codes a code-length sequence into (symbol, extra value) items. */
static int cl_items(const uint8_t *seq, int n, uint8_t *sym, uint8_t *extra, uint32_t *freq,
                    uint64_t *extra_bits_total)
{
    int k = 0, i = 0;
    while (i < n) {
        int v = seq[i], run = 1;
        while (i + run < n && seq[i + run] == v) run++;
        i += run;
        if (v == 0) {
            while (run >= 11) {
                int t = run < 138 ? run : 138;
                sym[k] = 18;
                extra[k++] = (uint8_t)(t - 11);
                run -= t;
            }
            if (run >= 3) {
                sym[k] = 17;
                extra[k++] = (uint8_t)(run - 3);
                run = 0;
            }
        } else {
            sym[k] = (uint8_t)v;
            extra[k++] = 0;
            run--;
            while (run >= 3) {
                int t = run < 6 ? run : 6;
                sym[k] = 16;
                extra[k++] = (uint8_t)(t - 3);
                run -= t;
            }
        }
        for (; run > 0; run--) {
            sym[k] = (uint8_t)v;
            extra[k++] = 0;
        }
    }
    uint64_t xb = 0;
    for (int t = 0; t < k; t++) {
        freq[sym[t]]++;
        xb += CL_EXTRA[sym[t]];
    }
    *extra_bits_total = xb;
    return k;
}

/* ---------------------------------------------------------------- output */

typedef struct {
    uint8_t *p;
    uint64_t acc;
    int n;
} bitw;

/* Adds up to 16 bits; stores 32 bits at a time (all of them final, so nothing is written past
 * the stream's end), which matters because put() runs once per symbol. */
static inline void put(bitw *w, uint32_t value, int nbits)
{
    w->acc |= (uint64_t)value << w->n;
    w->n += nbits;
    if (w->n >= 32) {
        uint32_t lo = (uint32_t)w->acc;
        w->p[0] = (uint8_t)lo;
        w->p[1] = (uint8_t)(lo >> 8);
        w->p[2] = (uint8_t)(lo >> 16);
        w->p[3] = (uint8_t)(lo >> 24);
        w->p += 4;
        w->acc >>= 32;
        w->n -= 32;
    }
}

static void flush(bitw *w)
{
    while (w->n > 0) {
        *w->p++ = (uint8_t)w->acc;
        w->acc >>= 8;
        w->n -= 8;
    }
}

static uint64_t extra_bits(const uint32_t *lit, const uint32_t *dist)
{
    uint64_t bits = 0;
    for (int s = 0; s < 29; s++) bits += (uint64_t)lit[257 + s] * LEN_EXTRA[s];
    for (int s = 0; s < NDIST; s++) bits += (uint64_t)dist[s] * DIST_EXTRA[s];
    return bits;
}

static void write_items(bitw *w, const uint8_t *in, const sd_scratch *s, int nitems,
                        const uint16_t *lcode, const uint8_t *llen, const uint16_t *dcode,
                        const uint8_t *dlen)
{
    for (int k = 0; k < nitems; k++) {
        int a = s->item_a[k], d = s->item_d[k];
        if (d == 0) {
            put(w, lcode[in[a]], llen[in[a]]);
            continue;
        }
        int sy = len_sym[a];
        put(w, lcode[257 + sy], llen[257 + sy]);
        if (LEN_EXTRA[sy]) put(w, (uint32_t)(a - LEN_BASE[sy]), LEN_EXTRA[sy]);
        int ds = dist_sym[d];
        put(w, dcode[ds], dlen[ds]);
        if (DIST_EXTRA[ds]) put(w, (uint32_t)(d - DIST_BASE[ds]), DIST_EXTRA[ds]);
    }
    put(w, lcode[256], llen[256]);
}

static void zlib_header(int level, uint8_t *out)
{
    int flevel = (level == 0 || level == 1) ? 0 : level < 6 && level > 1 ? 1
                 : (level == -1 || level == 6)                         ? 2
                                                                       : 3;
    int cmf = 0x78, flg = flevel << 6;
    flg |= 31 - (cmf * 256 + flg) % 31;
    out[0] = (uint8_t)cmf;
    out[1] = (uint8_t)flg;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

int dcc_small_deflate(const uint8_t *in, size_t nbytes, int level, uint8_t *out, size_t cap,
                      size_t *outlen, const char **err)
{
    if (level < -1 || level > 9) {
        *err = "zlib level must be -1..9";
        return DCC_ERR_ZLIB;
    }
    if (nbytes >= SD_MAX) {
        *err = "small deflate input too large";
        return DCC_ERR_ZLIB;
    }
    int n = (int)nbytes;
    if (cap < nbytes + 11) { /* the stored form bounds every output */
        *err = "deflate did not finish (output buffer too small)";
        return DCC_ERR_ZLIB;
    }
    pthread_once(&tables_once, tables_init);
    uint32_t adler = (uint32_t)adler32(adler32(0L, Z_NULL, 0), in, (uInt)n);
    zlib_header(level, out);

    int stored = level == 0;
    sd_scratch *s = NULL;
    uint32_t lit[NLIT], dist[NDIST];
    uint8_t ll[NLIT], dl[NDIST], cll[NCL], seq[NLIT + NDIST], cls[NLIT + NDIST], clx[NLIT + NDIST];
    int nitems = 0, hlit = 0, hdist = 0, hclen = 0, ncl = 0, dynamic = 0;
    if (!stored) {
        s = thread_scratch();
        if (s == NULL) {
            *err = "out of memory for the deflate compressor";
            return DCC_ERR_ZLIB;
        }
        find_matches(in, n, s);
        uint64_t fixed_sym_bits;
        nitems = lazy_parse(in, n, s, lit, dist, &fixed_sym_bits);
        uint64_t dyn_sym_bits = code_lengths(lit, NLIT, 15, ll) + code_lengths(dist, NDIST, 15, dl);
        for (hlit = NLIT; ll[hlit - 1] == 0; hlit--) {}
        if (hlit < 257) hlit = 257;
        for (hdist = NDIST; hdist > 1 && dl[hdist - 1] == 0; hdist--) {}
        memcpy(seq, ll, (size_t)hlit);
        memcpy(seq + hlit, dl, (size_t)hdist);
        uint32_t clf[NCL] = {0};
        uint64_t cl_extra;
        ncl = cl_items(seq, hlit + hdist, cls, clx, clf, &cl_extra);
        uint64_t cl_bits = code_lengths(clf, NCL, 7, cll);
        for (hclen = NCL; hclen > 4 && cll[CL_ORDER[hclen - 1]] == 0; hclen--) {}
        uint64_t dyn_bits = 3 + 14 + 3 * (uint64_t)hclen + cl_bits + cl_extra;
        uint64_t extra = extra_bits(lit, dist);
        dyn_bits += extra + dyn_sym_bits;
        uint64_t fixed_bits = 3 + extra + fixed_sym_bits;
        uint64_t dyn_bytes = (dyn_bits + 7) >> 3, fixed_bytes = (fixed_bits + 7) >> 3;
        uint64_t best = dyn_bytes < fixed_bytes ? dyn_bytes : fixed_bytes;
        stored = (uint64_t)n + 5 < best;
        dynamic = dyn_bytes <= fixed_bytes;
    }
    if (stored) {
        uint8_t *p = out + 2;
        p[0] = 1;
        p[1] = (uint8_t)n;
        p[2] = (uint8_t)(n >> 8);
        p[3] = (uint8_t)~n;
        p[4] = (uint8_t)(~n >> 8);
        if (n) memcpy(p + 5, in, (size_t)n);
        put_be32(p + 5 + n, adler);
        *outlen = (size_t)n + 11;
        return DCC_OK;
    }
    bitw w = {out + 2, 0, 0};
    if (dynamic) {
        uint16_t lcode[NLIT], dcode[NDIST], clc[NCL];
        put(&w, 1, 1);
        put(&w, 2, 2);
        put(&w, (uint32_t)(hlit - 257), 5);
        put(&w, (uint32_t)(hdist - 1), 5);
        put(&w, (uint32_t)(hclen - 4), 4);
        for (int k = 0; k < hclen; k++) put(&w, cll[CL_ORDER[k]], 3);
        canonical_codes(cll, NCL, clc);
        for (int k = 0; k < ncl; k++) {
            put(&w, clc[cls[k]], cll[cls[k]]);
            if (CL_EXTRA[cls[k]]) put(&w, clx[k], CL_EXTRA[cls[k]]);
        }
        canonical_codes(ll, NLIT, lcode);
        canonical_codes(dl, NDIST, dcode);
        write_items(&w, in, s, nitems, lcode, ll, dcode, dl);
    } else {
        put(&w, 1, 1);
        put(&w, 1, 2);
        write_items(&w, in, s, nitems, fixed_lit_code, fixed_lit_len, fixed_dist_code,
                    fixed_dist_len);
    }
    flush(&w);
    put_be32(w.p, adler);
    *outlen = (size_t)(w.p + 4 - out);
    return DCC_OK;
}
