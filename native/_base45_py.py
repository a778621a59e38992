"""Base45 (RFC 9285), pure-Python reference of the native implementation."""

from __future__ import annotations

from .errors import Base45DecodeError

__all__ = ["b45decode", "b45encode"]

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_VALUES = {ch: i for i, ch in enumerate(ALPHABET)}


def b45encode(data: bytes) -> str:
    """Encode bytes as base45 text (upper case; may contain and end with a space).

    Raises:
        TypeError: *data* is not a bytes-like object.
    """
    data = bytes(memoryview(data))
    out: list[str] = []
    for i in range(0, len(data) - 1, 2):
        # n = c + 45 d + 45^2 e, written least significant digit first (RFC 9285 §4).
        n = data[i] * 256 + data[i + 1]
        n, c = divmod(n, 45)
        e, d = divmod(n, 45)
        out.append(ALPHABET[c] + ALPHABET[d] + ALPHABET[e])
    if len(data) % 2:
        d, c = divmod(data[-1], 45)
        out.append(ALPHABET[c] + ALPHABET[d])
    return "".join(out)


def b45decode(text: str | bytes) -> bytes:
    """Decode base45 text.

    Never trims: a space is a symbol of the alphabet.

    Raises:
        Base45DecodeError: a character outside the alphabet (lower case included), a length
            of 1 mod 3, a triplet above 65535 or a final pair above 255.
        TypeError: *text* is neither ``str`` nor bytes-like.
    """
    if isinstance(text, str):
        s = text
    elif isinstance(text, (bytes, bytearray, memoryview)):
        s = bytes(text).decode("latin-1")
    else:
        raise TypeError(f"base45 input must be str or bytes, not {type(text).__name__}")
    if len(s) % 3 == 1:
        raise Base45DecodeError(
            f"invalid base45 length {len(s)}: a length of 1 mod 3 cannot occur", len(s)
        )
    out = bytearray()
    for i in range(0, len(s), 3):
        chunk = s[i : i + 3]
        n = 0
        for j, ch in enumerate(chunk):
            value = _VALUES.get(ch)
            if value is None:
                raise Base45DecodeError(
                    f"invalid base45 character {ch!r} at position {i + j}", i + j
                )
            n += value * 45**j
        if len(chunk) == 3:
            if n > 0xFFFF:
                raise Base45DecodeError(f"base45 triplet at position {i} exceeds 65535", i)
            out += n.to_bytes(2, "big")
        else:
            if n > 0xFF:
                raise Base45DecodeError(f"base45 final pair at position {i} exceeds 255", i)
            out.append(n)
    return bytes(out)
