"""Claims by splicing: CWT payloads built around the DCC's own CBOR bytes (reference).

Today the engine signs ``claims_prefix(iss, iat, exp) + cbor2.dumps(nfc_names(dcc))`` where
``dcc`` is the decoded request map (``dccsign.dcc.issuer``). :func:`splice_payloads` gives the
same bytes without decoding: for each item of a :class:`~dccsign.native.BatchView`, its claims
prefix followed by the DCC map exactly as the client encoded it -- when that encoding is the
one ``cbor2.dumps`` would write again. The check (:func:`is_canonical`) is per byte:

* every head the shortest for its argument, every length definite (no indefinite strings,
  arrays or maps);
* floats as the encoder writes them: finite values as doubles (``fb``), NaN as ``f97e00``,
  the infinities as ``f97c00`` / ``f9fc00`` (a half or single, another NaN, or a
  non-finite double is re-encoded);
* map keys keep their order (the encoder writes a decoded map in insertion order, the
  request's order), so order never forces a re-encoding;
* ``nam.fn`` / ``nam.gn`` are normalised to NFC before signing (hcert spec §3.3.7): a name
  made only of NFC-stable code points (``scripts/gen_nfc_table.py``: combining class 0, NFC
  by itself, never composing with what precedes it) is NFC already and stays on the fast
  path (Müller, Łukasz, Nguyễn, Παπαδόπουλος); a name with any other code point (a
  combining mark, a Hangul jamo, ...) may change, so it takes the slow path.

Items failing the check take the slow path: decoded, normalised and re-encoded in Python
(the same result by definition). Their number is reported (``slow``) so the share can be
measured: 0 for every body a cbor2-based client (``protocol/clients/blocking.py``) sends for the
engine's sample generator, unless a name holds combining marks.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from ._nfc_table import UNSTABLE
from ._walker_py import BatchView
from .layout import DCC_LEN, DCC_OFF, NFIELDS, NO_PAYLOAD

__all__ = [
    "NO_PAYLOAD",
    "SplicedPayloads",
    "check_splice_arguments",
    "is_canonical",
    "splice_payloads",
]


@dataclass(frozen=True, slots=True)
class SplicedPayloads:
    """Payload *i* is ``data[offsets[i]:offsets[i + 1]]`` (``offsets``: count + 1 native
    ``uint32``); empty for an item without a prefix. ``slow``: items re-encoded in Python.

    The same, as keyd's columns want it: ``rows`` are the items with a payload, ascending
    (``array('I')``), ``ends`` the end of each one's payload in ``data`` (``array('I')``,
    parallel to ``rows``), and ``longest`` the largest payload's length (0 without any)."""

    data: bytes
    offsets: bytes
    slow: int
    rows: array.array
    ends: array.array
    longest: int

    def payload(self, i: int) -> bytes:
        off = memoryview(self.offsets).cast("I")
        return self.data[off[i] : off[i + 1]]


def check_splice_arguments(
    view: Any, prefixes: Any, prefix_of: Any, per_item: bool = True
) -> tuple[tuple[bytes, ...], memoryview]:
    """The argument rules both implementations share; returns (prefixes, prefix_of as uint32).
    With *per_item* false the per-item rule is left to the caller (the native loop checks it
    without Python and calls this again, per item, to name the first offender).

    Raises:
        TypeError: *view* is not a BatchView, a prefix is not bytes, *prefix_of* is not a
            buffer of uint32 (``array('I')`` or its bytes).
        ValueError: *prefix_of* does not hold one entry per item, or names no prefix.
    """
    if type(view) is not BatchView:
        raise TypeError(f"view must be a BatchView, not {type(view).__name__}")
    prefixes = tuple(prefixes)
    for i, p in enumerate(prefixes):
        if type(p) is not bytes:
            raise TypeError(f"prefix {i} must be bytes, not {type(p).__name__}")
    try:
        idx = memoryview(prefix_of).cast("B").cast("I")
    except TypeError:
        raise TypeError("prefix_of must be a buffer of uint32 (array('I'))") from None
    if len(idx) != view.count:
        raise ValueError(f"prefix_of has {len(idx)} entries for {view.count} items")
    for i, p in enumerate(idx if per_item else ()):
        if p != NO_PAYLOAD and p >= len(prefixes):
            raise ValueError(f"prefix_of[{i}] = {p} names no prefix ({len(prefixes)} given)")
    return prefixes, idx


def splice_payloads(view: BatchView, prefixes: Sequence[bytes], prefix_of: Any) -> SplicedPayloads:
    """Each item's CWT payload: ``prefixes[prefix_of[i]]`` + the DCC's canonical CBOR.

    Args:
        view: the frame's items (:func:`~dccsign.native.walk_sign_batch`).
        prefixes: the distinct claims prefixes of the frame (one per (kid, validity), built
            once per frame with ``dccsign.dcc.issuer.claims_prefix``).
        prefix_of: per item, the index of its prefix, or :data:`NO_PAYLOAD`.

    Returns:
        One buffer and its offsets; payload *i* equals
        ``prefix + cbor2.dumps(nfc_names(cbor2.loads(dcc_bytes(i))))`` byte for byte.
    """
    prefixes, idx = check_splice_arguments(view, prefixes, prefix_of)
    cols = memoryview(view.columns).cast("I")
    out = bytearray()
    offsets = array.array("I")
    rows = array.array("I")
    ends = array.array("I")
    longest = 0
    slow = 0
    for i in range(view.count):
        offsets.append(len(out))
        if idx[i] == NO_PAYLOAD:
            continue
        off, n = cols[i * NFIELDS + DCC_OFF], cols[i * NFIELDS + DCC_LEN]
        dcc = view.data[off : off + n]
        if not is_canonical(dcc):
            dcc = reencode(dcc)
            slow += 1
        out += prefixes[idx[i]]
        out += dcc
        rows.append(i)
        ends.append(len(out))
        longest = max(longest, len(prefixes[idx[i]]) + len(dcc))
    offsets.append(len(out))
    return SplicedPayloads(bytes(out), offsets.tobytes(), slow, rows, ends, longest)


def reencode(dcc: bytes) -> bytes:
    """The slow path: what the engine signs today for these DCC bytes."""
    # The engine's own rule, so the slow path cannot drift from it (imported here: the engine
    # imports this package).
    from ..dcc.issuer import nfc_names

    obj = cbor2.loads(dcc)
    return cbor2.dumps(nfc_names(obj) if isinstance(obj, dict) else obj)


_STARTS = [lo for lo, _ in UNSTABLE]
_FIRST = _STARTS[0]


def nfc_stable(text: str) -> bool:
    """Every code point of *text* is NFC-stable (``scripts/gen_nfc_table.py``): then *text*
    is NFC whatever their order, and normalising it changes nothing."""
    for ch in text:
        cp = ord(ch)
        if cp < _FIRST:
            continue
        i = bisect.bisect_right(_STARTS, cp) - 1
        if i >= 0 and cp <= UNSTABLE[i][1]:
            return False
    return True


def is_canonical(dcc: bytes) -> bool:
    """True if *dcc* (a DCC map the walker accepted) may be signed as it is (module doc)."""
    if not dcc or dcc[0] >> 5 != 5:
        return False
    r = _Canon(dcc)
    return r.item(0, False, False) and r.pos == len(dcc)


class _Canon:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def head(self) -> tuple[int, int, int] | None:
        """(major, additional information, argument) of a shortest definite head, else None."""
        b = self.buf[self.pos]
        self.pos += 1
        major, info = b >> 5, b & 0x1F
        if info < 24:
            return major, info, info
        if info == 31 or info > 27:
            return None
        size = 1 << (info - 24)
        arg = int.from_bytes(self.buf[self.pos : self.pos + size], "big")
        self.pos += size
        if major == 7:
            return major, info, arg  # floats and simple values: judged by item()
        shortest = 24 if arg < 0x100 else 25 if arg < 0x10000 else 26 if arg < 2**32 else 27
        return (major, info, arg) if arg >= 24 and info == shortest else None

    def item(self, depth: int, nam: bool, name: bool) -> bool:
        h = self.head()
        if h is None:
            return False
        major, info, arg = h
        if major <= 1:
            return True
        if major <= 3:
            text = self.buf[self.pos : self.pos + arg]
            self.pos += arg
            return not (name and major == 3 and not nfc_stable(text.decode()))
        if major == 4:
            return all(self.item(depth + 1, False, False) for _ in range(arg))
        if major == 5:
            for _ in range(arg):
                start = self.pos
                if not self.item(depth + 1, False, False):
                    return False
                key = self.buf[start : self.pos]
                is_nam = depth == 0 and key == b"\x63nam" and self.buf[self.pos] >> 5 == 5
                is_name = nam and key in (b"\x62fn", b"\x62gn")
                if not self.item(depth + 1, is_nam, is_name):
                    return False
            return True
        if major == 6:
            return False
        if info <= 24:
            return True  # one-byte simple values; simple values from 32 (walker-checked)
        if info == 25:
            return arg in (0x7E00, 0x7C00, 0xFC00)
        if info == 26:
            return False
        return (arg >> 52) & 0x7FF != 0x7FF
