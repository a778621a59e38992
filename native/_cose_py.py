"""COSE_Sign1 pieces for DCCs (RFC 8152), pure-Python reference of the native implementation.

Only the fixed framing is built here: the payload (a CBOR-encoded CWT) arrives encoded.
"""

from __future__ import annotations

from ._types import ES256, PS256, Sign1Parts
from .errors import CoseFormatError

__all__ = ["check_protected", "protected_header", "sig_structure", "sign1_decode", "sign1_encode"]

# Canonical protected maps {1: alg, 4: kid} (spec notes §4.32): shortest form, keys in order
# 1, 4, so that a verifier that re-encodes the decoded map gets the same bytes.
_PROTECTED_PREFIX = {ES256: b"\xa2\x01\x26\x04\x48", PS256: b"\xa2\x01\x38\x24\x04\x48"}
_SIG1_CONTEXT = b"\x84\x6aSignature1"
_MAX_DEPTH = 64
_MAX_TAGS = 4


def _head(major: int, value: int) -> bytes:
    """Shortest-form CBOR head."""
    mt = major << 5
    if value < 24:
        return bytes([mt | value])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([mt | ai]) + value.to_bytes(size, "big")
    raise ValueError("CBOR length too large")


def protected_header(alg: int, kid: bytes) -> bytes:
    """The protected-header map ``{1: alg, 4: kid}`` as canonical CBOR.

    Raises:
        ValueError: *alg* is not ES256 (-7) or PS256 (-37), or *kid* is not 8 bytes.
    """
    prefix = _PROTECTED_PREFIX.get(alg)
    if prefix is None:
        raise ValueError(f"unsupported COSE algorithm {alg!r}: only ES256 (-7) and PS256 (-37)")
    if not isinstance(kid, bytes) or len(kid) != 8:
        raise ValueError("kid must be 8 bytes (the first 8 bytes of SHA-256 over the DSC)")
    return prefix + kid


def check_protected(alg: int, protected: bytes) -> None:
    """Require *protected* to be our canonical ``{1: alg, 4: kid}`` for the key's *alg*.

    Raises:
        ValueError: any other protected header (another alg, another shape).
    """
    prefix = _PROTECTED_PREFIX[alg]
    if (
        not isinstance(protected, bytes)
        or len(protected) != len(prefix) + 8
        or not protected.startswith(prefix)
    ):
        name = "ES256" if alg == ES256 else "PS256"
        raise ValueError(f"protected header is not the canonical {{1: {name}, 4: kid}} map")


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """``["Signature1", protected, h'', payload]`` (RFC 8152 §4.4), the bytes that get signed."""
    return (
        _SIG1_CONTEXT
        + _head(2, len(protected))
        + protected
        + b"\x40"
        + _head(2, len(payload))
        + payload
    )


def sign1_encode(protected: bytes, payload: bytes, signature: bytes) -> bytes:
    """Tag 18 ``[protected, {}, payload, signature]``: the kid stays in the protected header."""
    return (
        b"\xd2\x84"
        + _head(2, len(protected))
        + protected
        + b"\xa0"
        + _head(2, len(payload))
        + payload
        + _head(2, len(signature))
        + signature
    )


class _Reader:
    """A minimal CBOR well-formedness walker (RFC 8949 §3); it decodes nothing it skips."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def head(self) -> tuple[int, int, bool]:
        """Read one head: (major type, argument, indefinite)."""
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise CoseFormatError("truncated CBOR item")
        ib = data[pos]
        self.pos = pos + 1
        major, ai = ib >> 5, ib & 0x1F
        if ai < 24:
            return major, ai, False
        if ai == 31:
            if major in (0, 1, 6):
                raise CoseFormatError("invalid indefinite length on an integer or tag")
            return major, 0, True
        if ai > 27:
            raise CoseFormatError("reserved CBOR additional information (28-30)")
        size = 1 << (ai - 24)
        if len(data) - self.pos < size:
            raise CoseFormatError("truncated CBOR head")
        value = int.from_bytes(data[self.pos : self.pos + size], "big")
        self.pos += size
        return major, value, False

    def _at_break(self, truncated: str) -> bool:
        """Inside an indefinite-length item: whether the break byte is next (then consumed);
        CoseFormatError(*truncated*) when the data ends first."""
        if self.pos >= len(self.data):
            raise CoseFormatError(truncated)
        if self.data[self.pos] == 0xFF:
            self.pos += 1
            return True
        return False

    def skip(self, depth: int = 0) -> None:
        """Advance past one well-formed item."""
        if depth > _MAX_DEPTH:
            raise CoseFormatError("CBOR nesting too deep")
        major, value, indef = self.head()
        if major in (0, 1):
            return
        if major in (2, 3):
            if indef:
                while not self._at_break("truncated indefinite-length string"):
                    cmajor, clen, cindef = self.head()
                    if cmajor != major or cindef:
                        raise CoseFormatError("bad chunk in indefinite-length string")
                    self._advance(clen, "truncated CBOR string")
                return
            self._advance(value, "truncated CBOR string")
            return
        if major in (4, 5):
            per_entry = 2 if major == 5 else 1
            if indef:
                while not self._at_break("truncated indefinite-length container"):
                    for _ in range(per_entry):
                        self.skip(depth + 1)
                return
            # Every item takes at least one byte: a larger count is a lie (and bounds the loop).
            if value > len(self.data) or value * per_entry > len(self.data) - self.pos:
                raise CoseFormatError("CBOR container longer than its data")
            for _ in range(value * per_entry):
                self.skip(depth + 1)
            return
        if major == 6:
            self.skip(depth + 1)
            return
        if indef:
            raise CoseFormatError("unexpected CBOR break")

    def _advance(self, n: int, message: str) -> None:
        if len(self.data) - self.pos < n:
            raise CoseFormatError(message)
        self.pos += n

    def bstr(self, what: str) -> bytes:
        major, value, indef = self.head()
        if major != 2:
            raise CoseFormatError(what)
        if indef:
            raise CoseFormatError("indefinite-length byte string in COSE_Sign1 is not supported")
        start = self.pos
        self._advance(value, "truncated byte string in COSE_Sign1")
        return self.data[start : self.pos]


def sign1_decode(data: bytes) -> Sign1Parts:
    """Split a COSE_Sign1 (tagged or not) into its parts without interpreting the headers.

    Raises:
        CoseFormatError: not a well-formed 4-element COSE_Sign1 array of the right member
            types, more than 4 tags, or trailing bytes after it.
        TypeError: *data* is not bytes-like.
    """
    reader = _Reader(bytes(memoryview(data)))
    tags: list[int] = []
    while True:
        start = reader.pos
        major, value, _ = reader.head()
        if major != 6:
            reader.pos = start
            break
        if len(tags) == _MAX_TAGS:
            raise CoseFormatError("too many CBOR tags around COSE_Sign1")
        tags.append(value)
    major, value, indef = reader.head()
    if major != 4 or (not indef and value != 4):
        raise CoseFormatError("COSE_Sign1 must be an array of 4 items")
    protected = reader.bstr("COSE_Sign1 protected header must be a byte string")
    start = reader.pos
    if start >= len(reader.data) or reader.data[start] >> 5 != 5:
        raise CoseFormatError("COSE_Sign1 unprotected header must be a map")
    reader.skip()
    unprotected = reader.data[start : reader.pos]
    payload = reader.bstr(
        "COSE_Sign1 payload must be a byte string (detached payloads are not allowed)"
    )
    signature = reader.bstr("COSE_Sign1 signature must be a byte string")
    if indef:
        if reader.pos >= len(reader.data) or reader.data[reader.pos] != 0xFF:
            raise CoseFormatError("COSE_Sign1 array must hold exactly 4 items")
        reader.pos += 1
    if reader.pos != len(reader.data):
        # cbor2.loads ignores trailing bytes silently (spec notes §4.13); we do not.
        raise CoseFormatError("trailing bytes after COSE_Sign1")
    return Sign1Parts(tuple(tags), protected, unprotected, payload, signature)
