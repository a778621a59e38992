"""Result types shared by both implementations."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ES256", "PS256", "CwtFacts", "NoncePoolInfo", "Sign1Parts"]

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
