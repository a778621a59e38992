"""Batch HC1 assembly, pure-Python reference of the native implementation."""

from __future__ import annotations

from collections.abc import Sequence

from ._base45_py import b45encode
from ._cose_py import sign1_encode
from ._signing_py import SigningKey, _check_payloads
from ._zlib_py import _check_level, zlib_compress

__all__ = ["hc1_encode", "hc1_sign"]

PREFIX = "HC1:"


def hc1_encode(
    protected: bytes, payloads: Sequence[bytes], signatures: Sequence[bytes], level: int = 9
) -> list[str]:
    """Turn N (payload, signature) pairs into N ``HC1:`` strings, in order.

    COSE_Sign1 (tag 18, empty unprotected map) -> zlib at *level* -> base45 -> ``HC1:``.

    Raises:
        ValueError: the two sequences differ in length, or *level* is not in -1..9.
        TypeError: an item is not ``bytes``.
    """
    _check_level(level)
    items = _check_payloads(payloads)
    sigs = tuple(signatures)
    if len(sigs) != len(items):
        raise ValueError(f"{len(items)} payloads but {len(sigs)} signatures")
    for i, s in enumerate(sigs):
        if type(s) is not bytes:
            raise TypeError(f"signature {i} must be bytes, not {type(s).__name__}")
    if type(protected) is not bytes:
        raise TypeError("protected must be bytes")
    return [
        PREFIX + b45encode(zlib_compress(sign1_encode(protected, p, s), level))
        for p, s in zip(items, sigs, strict=True)
    ]


def hc1_sign(
    key: SigningKey, protected: bytes, payloads: Sequence[bytes], level: int = 9
) -> list[str]:
    """Sign and encode N payloads in one call: ``hc1_encode(key.sign(...))``.

    Raises:
        ValueError, TypeError: as :meth:`SigningKey.sign` and :func:`hc1_encode`.
    """
    _check_level(level)
    return hc1_encode(protected, payloads, key.sign(protected, payloads), level)
