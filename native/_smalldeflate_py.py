"""The small-input deflate encoder, pure-Python reference of ``native/src/smalldeflate.c``.

Why it exists: HC1 compresses one ~350-450-byte COSE_Sign1 per certificate. There most of
each call of libdeflate's one-shot compressor, at every level, goes to work sized for large
inputs rather than to the matching effort (issue 14; bench/README.md, "Deflate for small
inputs"). This encoder is sized for inputs under :data:`SMALL_DEFLATE_MAX` bytes: the whole
input is its window, so it keeps no history state, its hash table is sized to the input, and
it writes exactly one deflate block.

Contract: ``small_deflate(data, level)`` returns a standard zlib stream (RFC 1950: CMF 0x78,
a valid FLG, one RFC 1951 block, adler32) that inflates back to *data*. The C encoder produces
exactly the same bytes as this module (tests/test_smalldeflate.py checks that byte for byte), so
this file is the readable specification of the algorithm:

1. **Matches.** Every position gets the longest match (3..258 bytes) against earlier positions,
   from a hash chain over 3-byte prefixes, nearest distance first, at most
   :data:`MAX_CHAIN` candidates, stopping early at :data:`NICE_LEN`.
2. **Parse.** Lazy matching with one step of look-ahead: a match is deferred by one literal
   when the next position has a strictly longer one. (A shortest-path parse priced with a
   first pass's code lengths was tried: on real COSE_Sign1s it came out no smaller on
   average than this and cost two more Huffman builds, so it is not used.)
3. **Codes.** Huffman code lengths from a two-queue Huffman build with fixed tie rules, limited
   to 15 bits (7 for the code-length code) by a Kraft-sum repair, assigned canonically.
4. **Block.** The smallest of dynamic Huffman, fixed Huffman and stored (ties in that order).

``level``: 0 writes a stored block; 1..9 and -1 all use the full algorithm above (on HC1
inputs it costs fewer instructions than libdeflate's fastest level while matching level 9's
size, so there is nothing to trade). The level only sets the informational FLEVEL bits of the
zlib header, as zlib does.

Errors: :class:`ValueError` for a level outside -1..9 or an input of
:data:`SMALL_DEFLATE_MAX` bytes or more (the callers route those to libdeflate).
"""

from __future__ import annotations

import zlib

__all__ = ["MAX_CHAIN", "NICE_LEN", "SMALL_DEFLATE_MAX", "small_deflate"]

#: Inputs shorter than this use the small encoder; longer ones keep libdeflate.
SMALL_DEFLATE_MAX = 4096
#: Hash-chain candidates looked at per position (the inputs are short, so this rarely binds).
MAX_CHAIN = 32
#: A match this long ends the search at its position (keeps repetitive inputs linear).
NICE_LEN = 32
MIN_MATCH = 3
MAX_MATCH = 258

# RFC 1951 3.2.5: length codes 257..285 (base, extra bits) and distance codes 0..29.
# fmt: off
LEN_BASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258]
LEN_EXTRA = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0]
DIST_BASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
             1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577]
DIST_EXTRA = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
              12, 13, 13]
# fmt: on
# Order in which the code-length code's lengths are sent (RFC 1951 3.2.7).
CL_ORDER = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]

# Length 3..258 -> length symbol index 0..28; distance 1..32768 -> distance code.
LEN_SYM = [0] * (MAX_MATCH + 1)
for _c in range(29):
    for _l in range(LEN_BASE[_c], LEN_BASE[_c] + (1 << LEN_EXTRA[_c])):
        if _l <= MAX_MATCH:
            LEN_SYM[_l] = _c
LEN_SYM[258] = 28  # 258 has its own code; 227 + 31 would otherwise claim it (RFC 1951)
DIST_SYM = [0] * (SMALL_DEFLATE_MAX + 1)  # distances here are < SMALL_DEFLATE_MAX
for _c in range(30):
    _end = min(DIST_BASE[_c] + (1 << DIST_EXTRA[_c]), SMALL_DEFLATE_MAX + 1)
    for _d in range(DIST_BASE[_c], _end):
        DIST_SYM[_d] = _c

# The fixed Huffman code (RFC 1951 3.2.6).
FIXED_LIT = [8] * 144 + [9] * 112 + [7] * 24 + [8] * 8
FIXED_DIST = [5] * 30


def _hash_bits(n: int) -> int:
    """Hash table of 2^bits heads, sized to the input: no clearing of a large table per call."""
    return max(6, min(12, n.bit_length()))


def find_matches(data: bytes) -> tuple[list[int], list[int]]:
    """For each position, the longest earlier match (length, distance); length 0 when none.

    Candidates come from a hash chain of 3-byte prefixes, nearest first; a candidate replaces
    the best only when strictly longer, so each length keeps its nearest distance.
    """
    n = len(data)
    lens = [0] * n
    dists = [0] * n
    if n < MIN_MATCH:
        return lens, dists
    bits = _hash_bits(n)
    shift = 32 - bits
    head = [-1] * (1 << bits)
    prev = [-1] * n
    for i in range(n - MIN_MATCH + 1):
        v = data[i] | data[i + 1] << 8 | data[i + 2] << 16
        h = ((v * 0x9E3779B1) & 0xFFFFFFFF) >> shift
        limit = min(MAX_MATCH, n - i)
        best = 0
        bestd = 0
        j = head[h]
        chain = MAX_CHAIN
        while j >= 0 and chain > 0:
            chain -= 1
            # Only a candidate that can beat the best is measured in full.
            if data[j + best] == data[i + best]:
                k = 0
                while k < limit and data[j + k] == data[i + k]:
                    k += 1
                if k > best:
                    best = k
                    bestd = i - j
                    if k >= NICE_LEN or k == limit:
                        break
            j = prev[j]
        if best >= MIN_MATCH:
            lens[i] = best
            dists[i] = bestd
        prev[i] = head[h]
        head[h] = i
    return lens, dists


def lazy_parse(n: int, lens: list[int], dists: list[int]) -> list[tuple[int, int]]:
    """The parse: ``(length, distance)`` items, ``(byte position, 0)`` meaning a literal.

    A match at i is taken unless position i+1 has a strictly longer one (then i is a literal).
    """
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        m = lens[i]
        if m >= MIN_MATCH and not (i + 1 < n and lens[i + 1] > m):
            out.append((m, dists[i]))
            i += m
        else:
            out.append((i, 0))
            i += 1
    return out


def _count(data: bytes, items: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    lit = [0] * 286
    dist = [0] * 30
    for a, d in items:
        if d == 0:
            lit[data[a]] += 1
        else:
            lit[257 + LEN_SYM[a]] += 1
            dist[DIST_SYM[d]] += 1
    lit[256] = 1
    return lit, dist


def code_lengths(freqs: list[int], limit: int) -> list[int]:
    """Length-limited Huffman code lengths for *freqs* (a complete code, Kraft sum exactly 1).

    At least two symbols get a code (padding with the lowest unused symbols, frequency 0), so
    every inflater accepts the code. Leaves sort by (frequency, symbol); the two-queue build
    takes the leaf on a tie. Depths over *limit* are clamped and the Kraft sum repaired by
    moving one code from the deepest level below the limit down one level, one unit at a time.
    Lengths are then handed out again from the depth counts, longest to the least frequent.
    """
    nsym = len(freqs)
    used = [s for s in range(nsym) if freqs[s]]
    s = 0
    while len(used) < 2:
        if s not in used:
            used.append(s)
        s += 1
    leaves = sorted(used, key=lambda x: (freqs[x], x))
    m = len(leaves)
    # Two-queue Huffman over leaf weights; internal nodes are numbered in creation order.
    weight = [freqs[x] for x in leaves]
    parent_leaf = [0] * m
    iw: list[int] = []
    iparent: list[int] = []
    li = 0
    ii = 0

    def take() -> tuple[bool, int]:
        nonlocal li, ii
        if li < m and (ii >= len(iw) or weight[li] <= iw[ii]):
            li += 1
            return True, li - 1
        ii += 1
        return False, ii - 1

    for _ in range(m - 1):
        a_leaf, a = take()
        b_leaf, b = take()
        node = len(iw)
        iw.append((weight[a] if a_leaf else iw[a]) + (weight[b] if b_leaf else iw[b]))
        iparent.append(-1)
        for is_leaf, x in ((a_leaf, a), (b_leaf, b)):
            if is_leaf:
                parent_leaf[x] = node
            else:
                iparent[x] = node
    idepth = [0] * len(iw)
    for k in range(len(iw) - 2, -1, -1):  # the root is the last node, depth 0
        idepth[k] = idepth[iparent[k]] + 1
    count = [0] * (max(limit, m) + 2)
    for k in range(m):
        count[idepth[parent_leaf[k]] + 1] += 1
    over = sum(count[limit + 1 :])
    if over:
        for d in range(limit + 1, len(count)):
            count[d] = 0
        count[limit] += over
        excess = sum(count[d] << (limit - d) for d in range(1, limit + 1)) - (1 << limit)
        while excess > 0:
            b = limit - 1
            while count[b] == 0:
                b -= 1
            count[b] -= 1
            count[b + 1] += 2
            count[limit] -= 1
            excess -= 1
    lengths = [0] * nsym
    k = 0
    for d in range(len(count) - 1, 0, -1):
        for _ in range(count[d]):
            lengths[leaves[k]] = d
            k += 1
    return lengths


def canonical_codes(lengths: list[int]) -> list[int]:
    """RFC 1951 3.2.2 canonical codes, bit-reversed for the LSB-first bit writer."""
    maxlen = max(lengths) if lengths else 0
    bl_count = [0] * (maxlen + 1)
    for x in lengths:
        if x:
            bl_count[x] += 1
    next_code = [0] * (maxlen + 2)
    bl_count[0] = 0
    code = 0
    for b in range(1, maxlen + 1):
        code = (code + bl_count[b - 1]) << 1
        next_code[b] = code
    codes = [0] * len(lengths)
    for s, x in enumerate(lengths):
        if x:
            c = next_code[x]
            next_code[x] += 1
            r = 0
            for _ in range(x):
                r = (r << 1) | (c & 1)
                c >>= 1
            codes[s] = r
    return codes


def cl_items(seq: list[int]) -> list[tuple[int, int]]:
    """Run-length code a code-length sequence: (symbol 0..18, extra-bit value) items."""
    out: list[tuple[int, int]] = []
    i = 0
    n = len(seq)
    while i < n:
        v = seq[i]
        run = 1
        while i + run < n and seq[i + run] == v:
            run += 1
        i += run
        if v == 0:
            while run >= 11:
                k = min(run, 138)
                out.append((18, k - 11))
                run -= k
            if run >= 3:
                out.append((17, run - 3))
                run = 0
        else:
            out.append((v, 0))
            run -= 1
            while run >= 3:
                k = min(run, 6)
                out.append((16, k - 3))
                run -= k
        out.extend((v, 0) for _ in range(run))
    return out


CL_EXTRA = {16: 2, 17: 3, 18: 7}


class _Bits:
    """LSB-first bit writer (RFC 1951 3.1.1)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.n = 0

    def put(self, value: int, nbits: int) -> None:
        self.acc |= value << self.n
        self.n += nbits
        while self.n >= 8:
            self.out.append(self.acc & 0xFF)
            self.acc >>= 8
            self.n -= 8

    def flush(self) -> bytes:
        if self.n:
            self.out.append(self.acc & 0xFF)
        self.acc = self.n = 0
        return bytes(self.out)


def _data_bits(lit: list[int], dist: list[int], ll: list[int], dl: list[int]) -> int:
    bits = sum(f * x for f, x in zip(lit, ll, strict=False))
    bits += sum(lit[257 + s] * LEN_EXTRA[s] for s in range(29))
    bits += sum(f * x for f, x in zip(dist, dl, strict=False))
    bits += sum(dist[s] * DIST_EXTRA[s] for s in range(30))
    return bits


def _zlib_header(level: int) -> bytes:
    # FLEVEL as zlib writes it for the requested level (informational only).
    flevel = 0 if level in (0, 1) else 1 if 2 <= level <= 5 else 2 if level in (-1, 6) else 3
    cmf = 0x78
    flg = flevel << 6
    flg |= 31 - (cmf * 256 + flg) % 31
    return bytes((cmf, flg))


def _write_items(w: _Bits, data: bytes, items, lcode, llen, dcode, dlen) -> None:
    for a, d in items:
        if d == 0:
            b = data[a]
            w.put(lcode[b], llen[b])
        else:
            s = LEN_SYM[a]
            w.put(lcode[257 + s], llen[257 + s])
            if LEN_EXTRA[s]:
                w.put(a - LEN_BASE[s], LEN_EXTRA[s])
            ds = DIST_SYM[d]
            w.put(dcode[ds], dlen[ds])
            if DIST_EXTRA[ds]:
                w.put(d - DIST_BASE[ds], DIST_EXTRA[ds])
    w.put(lcode[256], llen[256])


def small_deflate(data: bytes, level: int = 9) -> bytes:
    """A zlib stream of *data* (under :data:`SMALL_DEFLATE_MAX` bytes); see the module docstring.

    Raises:
        ValueError: *level* is not in -1..9, or *data* has :data:`SMALL_DEFLATE_MAX` bytes or more.
    """
    if not isinstance(level, int) or not -1 <= level <= 9:
        raise ValueError(f"zlib level must be an integer from -1 to 9, not {level!r}")
    data = bytes(memoryview(data))
    n = len(data)
    if n >= SMALL_DEFLATE_MAX:
        raise ValueError(f"small_deflate takes fewer than {SMALL_DEFLATE_MAX} bytes, not {n}")
    trailer = zlib.adler32(data).to_bytes(4, "big")
    stored = _zlib_header(level) + bytes((1, n & 0xFF, n >> 8, ~n & 0xFF, (~n >> 8) & 0xFF))
    stored += data + trailer
    if level == 0:
        return stored

    lens, dists = find_matches(data)
    items = lazy_parse(n, lens, dists)
    lit, dist = _count(data, items)
    ll = code_lengths(lit, 15)
    dl = code_lengths(dist, 15)

    hlit = max(257, max(s for s in range(286) if ll[s]) + 1)
    hdist = max(1, max(s for s in range(30) if dl[s]) + 1)
    cli = cl_items(ll[:hlit] + dl[:hdist])
    clf = [0] * 19
    for s, _ in cli:
        clf[s] += 1
    cll = code_lengths(clf, 7)
    hclen = 19
    while hclen > 4 and cll[CL_ORDER[hclen - 1]] == 0:
        hclen -= 1
    dyn_bits = 3 + 14 + 3 * hclen
    dyn_bits += sum(cll[s] + CL_EXTRA.get(s, 0) for s, _ in cli)
    dyn_bits += _data_bits(lit, dist, ll, dl)
    fixed_bits = 3 + _data_bits(lit, dist, FIXED_LIT, FIXED_DIST)
    dyn_bytes = (dyn_bits + 7) >> 3
    fixed_bytes = (fixed_bits + 7) >> 3
    stored_bytes = 5 + n
    if stored_bytes < min(dyn_bytes, fixed_bytes):
        return stored

    w = _Bits()
    if dyn_bytes <= fixed_bytes:
        w.put(1, 1)
        w.put(2, 2)
        w.put(hlit - 257, 5)
        w.put(hdist - 1, 5)
        w.put(hclen - 4, 4)
        for k in range(hclen):
            w.put(cll[CL_ORDER[k]], 3)
        clc = canonical_codes(cll)
        for s, x in cli:
            w.put(clc[s], cll[s])
            if s in CL_EXTRA:
                w.put(x, CL_EXTRA[s])
        _write_items(w, data, items, canonical_codes(ll), ll, canonical_codes(dl), dl)
    else:
        w.put(1, 1)
        w.put(1, 2)
        _write_items(w, data, items, _FIXED_LIT_CODES, FIXED_LIT, _FIXED_DIST_CODES, FIXED_DIST)
    return _zlib_header(level) + w.flush() + trailer


_FIXED_LIT_CODES = canonical_codes(FIXED_LIT)
_FIXED_DIST_CODES = canonical_codes(FIXED_DIST)
