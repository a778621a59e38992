"""Result types shared by both implementations."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from typing import NamedTuple, overload

__all__ = ["ES256", "PS256", "CwtFacts", "NoncePoolInfo", "Sign1Parts", "Spans"]

#: COSE algorithm identifiers (RFC 8152 §8.1, RFC 8230 §2). Nothing else is allowed in a DCC.
ES256 = -7
PS256 = -37


class Sign1Parts(NamedTuple):
    """The four members of a COSE_Sign1, as sent, plus the tags found around it.

    ``protected`` is the content of the protected-header byte string (the encoded map, or
    ``b""``); ``unprotected`` is the raw CBOR of the unprotected map. Decoding the header maps
    is left to the caller, which decides what to accept.
    """

    tags: tuple[int, ...]
    protected: bytes
    unprotected: bytes
    payload: bytes
    signature: bytes


class CwtFacts(NamedTuple):
    """What keyd reads from a CWT payload it may sign (see ``cwt_facts``)."""

    iss: str  # claim 1, two ASCII capitals
    exp: int  # claim 4
    iat: int  # claim 6
    dcc_type: str  # "v", "t" or "r"
    uvci: str  # ci of the one certificate entry


class NoncePoolInfo(NamedTuple):
    """The state of a signing key's nonce pool (``SigningKey.nonce_pool_info``).

    Counts only: nothing here reveals an entry.
    """

    capacity: int  # entries the pool may hold
    level: int  # entries it holds now
    refilled: int  # entries ever added
    spent: int  # entries used for a signature, each once
    misses: int  # signatures asked of an empty pool (signed the ordinary way instead)
    discarded: int  # entries wiped unused (cleared, a forked child, an s of zero)
    locked: bool  # the entries are in mlock'ed memory (never swapped)
    lock_error: str | None  # why mlock failed, when it did
    dontdump: bool  # the entries are excluded from core dumps
    wipeonfork: bool  # a forked child's copy reads as zeros (its pid check holds regardless)
    orphaned: bool  # this process is a fork of the one that made the pool: it never spends it
    refill_thread: str | None  # the background refill's priority ("SCHED_IDLE", ...); None: none


class Spans(Sequence[bytes]):
    """Byte strings that are spans of one buffer, for the batch calls that take payloads
    (``SigningKey.sign``, ``validate_cwt_batch``): item *k* is
    ``data[starts[rows[k]]:ends[rows[k]]]``. The native implementation reads the spans in
    place -- no bytes object, slice or copy per item, where a keyd message's payloads
    already lie in one buffer; the reference reads it as the sequence it is.

    *starts* and *ends* are ``array('I')`` of one length (a span per item of *data*),
    *rows* an ``array('I')`` of the items wanted, in the order wanted.

    Raises (here): TypeError for other types, ValueError when *starts* and *ends* differ in
    length. Raises (when read, by both implementations alike, before any item is used):
    ValueError ``row R is out of range (N spans)`` or ``span A:B is not inside the N-byte
    buffer``.
    """

    __slots__ = ("data", "ends", "rows", "starts")

    def __init__(self, data: bytes, starts: array, ends: array, rows: array) -> None:
        if type(data) is not bytes:
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if not (
            type(starts) is array and type(ends) is array and type(rows) is array
            and starts.typecode == ends.typecode == rows.typecode == "I"
        ):  # fmt: skip
            for name, column in (("starts", starts), ("ends", ends), ("rows", rows)):
                if type(column) is not array or column.typecode != "I":
                    raise TypeError(f"{name} must be an array('I')")
        if len(starts) != len(ends):
            raise ValueError(f"starts has {len(starts)} entries, ends {len(ends)}")
        self.data = data
        self.starts = starts
        self.ends = ends
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, k: int) -> bytes: ...
    @overload
    def __getitem__(self, k: slice) -> list[bytes]: ...
    def __getitem__(self, k: int | slice) -> bytes | list[bytes]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        row = self.rows[k]
        if row >= len(self.starts):
            raise ValueError(f"row {row} is out of range ({len(self.starts)} spans)")
        start, end = self.starts[row], self.ends[row]
        if not start <= end <= len(self.data):
            raise ValueError(f"span {start}:{end} is not inside the {len(self.data)}-byte buffer")
        return self.data[start:end]

    def __iter__(self) -> Iterator[bytes]:
        return (self[k] for k in range(len(self.rows)))
