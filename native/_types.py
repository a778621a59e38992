"""Result types shared by both implementations."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ES256", "PS256", "CwtFacts", "Sign1Parts"]

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
