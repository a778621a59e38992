"""keyd's structural check of CWT payloads, pure-Python reference of the native implementation.

keyd re-checks every payload before it signs (engine/keyd/service.py). This is the part of that
check that reads bytes: is the payload one well-formed CBOR item shaped like a DCC CWT, and
what are its issuer, times, DCC type and UVCI. The comparisons against the DSC and the clock
are plain integer work and stay in keyd.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._cose_py import _Reader
from ._types import CwtFacts
from .errors import CoseFormatError

__all__ = ["UVCI_MAX", "cwt_facts"]

#: The longest UVCI any DCC schema version accepts.
UVCI_MAX = 80
_MAX_FIELDS = 16  # the schemas allow 4 fields in a DCC and 10 in a certificate entry
_CWT_CLAIMS = "the CWT must be a map of exactly the claims 1, 4, 6, -260"
_HCERT = "claim -260 must be {1: DCC} with the DCC a map"
_ONE_TYPE = "the DCC must hold exactly one of v, t, r"
_CI = "ci must be 1 to 80 printable ASCII characters"
_CLAIM_OF_HEAD = {(0, 1): 1, (0, 4): 4, (0, 6): 6, (1, 259): -260}  # -260 = -1 - 259


class _Shape(Exception):
    """Well-formed CBOR of the wrong shape."""


def _text_map(reader: _Reader, not_map: str, bad_keys: str, duplicate: str):
    """Yield the keys (bytes) of a definite map with distinct definite text keys; the caller
    reads or skips each value before asking for the next key."""
    major, count, indef = reader.head()
    if major != 5 or indef or count > _MAX_FIELDS:
        raise _Shape(not_map)
    seen: set[bytes] = set()
    for _ in range(count):
        major, size, indef = reader.head()
        if major != 3 or indef:
            raise _Shape(bad_keys)
        key = reader.data[reader.pos : reader.pos + size]
        reader.pos += size
        if key in seen:
            raise _Shape(duplicate)
        seen.add(key)
        yield key


def _int64(reader: _Reader) -> int:
    major, value, _ = reader.head()
    if major not in (0, 1) or value > 2**63 - 1:
        raise _Shape("exp and iat must be 64-bit integers")
    return value if major == 0 else -1 - value


def _entry_ci(reader: _Reader) -> tuple[str, int]:
    major, count, indef = reader.head()
    if major != 4 or indef or count != 1:
        raise _Shape("the certificate array (v, t or r) must hold exactly one entry")
    ci = None
    for key in _text_map(
        reader,
        "the certificate entry must be a definite-length map",
        "the certificate entry's field names must be definite-length text",
        "the certificate entry has a duplicate field",
    ):
        if key != b"ci":
            reader.skip()
            continue
        major, size, indef = reader.head()
        if major != 3 or indef or not 1 <= size <= UVCI_MAX:
            raise _Shape(_CI)
        raw = reader.data[reader.pos : reader.pos + size]
        at = reader.pos
        reader.pos += size
        if any(not 0x21 <= c <= 0x7E for c in raw):
            raise _Shape(_CI)
        ci = raw.decode("ascii")
    if ci is None:
        raise _Shape("the certificate entry has no ci (UVCI)")
    return ci, at


def _facts(payload: bytes) -> CwtFacts:
    return facts_and_ci(payload)[0]


def facts_and_ci(payload: bytes) -> tuple[CwtFacts, int]:
    """The facts of one payload and the offset of its UVCI's bytes in it (the columns twin
    packs it); raises CoseFormatError or _Shape with the reason."""
    reader = _Reader(payload)
    try:
        reader.skip()
    except CoseFormatError as exc:
        raise CoseFormatError(f"not one CBOR item: {exc}") from None
    if reader.pos != len(payload):
        raise CoseFormatError("not one CBOR item: trailing bytes after the CBOR item")
    reader.pos = 0
    major, count, indef = reader.head()
    if major != 5 or indef or count != 4:
        raise _Shape(_CWT_CLAIMS)
    claims: dict[int, object] = {}
    for _ in range(4):
        major, value, _ = reader.head()
        claim = _CLAIM_OF_HEAD.get((major, value))
        if claim is None or claim in claims:
            raise _Shape(_CWT_CLAIMS)
        if claim == 1:
            major, size, indef = reader.head()
            iss = reader.data[reader.pos : reader.pos + 2]
            if major != 3 or indef or size != 2 or not all(0x41 <= c <= 0x5A for c in iss):
                raise _Shape("iss must be an ISO 3166-1 alpha-2 code")
            reader.pos += 2
            claims[1] = iss.decode("ascii")
        elif claim in (4, 6):
            claims[claim] = _int64(reader)
        else:
            major, count, indef = reader.head()
            if major != 5 or indef or count != 1:
                raise _Shape(_HCERT)
            major, value, _ = reader.head()
            if (major, value) != (0, 1):
                raise _Shape(_HCERT)
            dcc_type = uvci = None
            ci_at = 0
            for key in _text_map(
                reader,
                _HCERT,
                "the DCC's field names must be definite-length text",
                "the DCC has a duplicate field",
            ):
                if key not in (b"v", b"t", b"r"):
                    reader.skip()
                    continue
                if dcc_type is not None:
                    raise _Shape(_ONE_TYPE)
                dcc_type = key.decode("ascii")
                uvci, ci_at = _entry_ci(reader)
            if dcc_type is None or uvci is None:
                raise _Shape(_ONE_TYPE)
            claims[-260] = (dcc_type, uvci)
    dcc_type, uvci = claims[-260]  # type: ignore[misc]
    facts = CwtFacts(claims[1], claims[4], claims[6], dcc_type, uvci)  # type: ignore[arg-type]
    return facts, ci_at


def cwt_facts(payloads: Sequence[bytes]) -> list[CwtFacts | str]:
    """Check N CWT payloads; per payload its :class:`CwtFacts`, or the reason it is refused.

    The shape accepted, all lengths definite::

        {1: tstr(2 capitals), 4: int, 6: int, -260: {1: DCC}}   exactly these claims
        DCC = map with distinct text keys and exactly one of "v", "t", "r", whose value is
              an array of one map with distinct text keys holding "ci": 1-80 printable
              ASCII characters

    ``exp`` and ``iat`` must fit in 64 bits. The rest of the DCC is only checked to be
    well-formed CBOR (its content is the engine validator's business); trailing bytes after
    the item are refused. Reasons for malformed CBOR start with ``"not one CBOR item: "``.

    Raises:
        TypeError: an item is not ``bytes``.
    """
    items = tuple(payloads)
    out: list[CwtFacts | str] = []
    for i, payload in enumerate(items):
        if type(payload) is not bytes:
            raise TypeError(f"payload {i} must be bytes, not {type(payload).__name__}")
        try:
            out.append(_facts(payload))
        except (CoseFormatError, _Shape) as exc:
            out.append(str(exc))
    return out
