"""Exceptions of the native core, defined once and shared by both implementations.

The Cython extension imports these classes, so ``except Base45DecodeError`` works whichever
implementation :mod:`dccsign.native` selected. Every class mixes in the builtin that callers
would naturally catch (``ValueError`` for bad input, ``RuntimeError`` for a library failure).
"""

from __future__ import annotations

__all__ = [
    "Base45DecodeError",
    "CoseFormatError",
    "DCCDecodeError",
    "KeyLoadError",
    "NativeError",
    "SigningError",
    "ZlibError",
]


class NativeError(Exception):
    """Base class of every error raised by :mod:`dccsign.native`."""


class Base45DecodeError(NativeError, ValueError):
    """Text is not valid base45 (RFC 9285).

    Attributes:
        position: index of the first offending character (or chunk start), or -1.
    """

    def __init__(self, message: str, position: int = -1) -> None:
        super().__init__(message)
        self.position = position


class CoseFormatError(NativeError, ValueError):
    """Bytes are not a well-formed COSE_Sign1 structure (or a header is invalid)."""


class ZlibError(NativeError, ValueError):
    """Data is not a complete, well-formed zlib (RFC 1950) stream, or inflates too large."""


class KeyLoadError(NativeError, ValueError):
    """A private key could not be loaded: wrong passphrase, bad file, or unsupported type."""


class SigningError(NativeError, RuntimeError):
    """The crypto library failed while signing (should not happen with a loaded key)."""


class DCCDecodeError(NativeError, ValueError):
    """The bytes given as a DCC (or as a CWT payload) are not what the decoder in use accepts:
    not one well-formed CBOR item, text that is not UTF-8, or (strict decoding, the engine's)
    a tag, a duplicate map key or a map key that is not text or bytes. The message is the
    decoder's. Validation rules are :class:`dccsign.dcc.validate.DCCValidationError`'s business."""
