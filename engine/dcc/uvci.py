"""Unique Vaccination Certificate Identifiers (UVCI): grammar, check character, construction.

The canonical form this engine signs is::

    URN:UVCI:01:<CC>:<PART>[/<PART>[/<PART>]][#<C>]

* ``01`` is the only UVCI version defined so far.
* ``CC`` is an ISO 3166-1 alpha-2 country code: two letters ``A``-``Z``.
* Each ``PART`` is a non-empty run of ``A``-``Z`` / ``0``-``9``. One part is the bare
  identifier; two are issuer and identifier; three are issuer, vaccine and identifier.
* ``#C`` is an optional check character: the Luhn mod-N (N = 38) check character over the
  alphabet :data:`LUHN_ALPHABET`, computed over everything before the ``#`` (the whole
  identifier, ``URN:UVCI:`` prefix included).

Verifiers treat ``ci`` as an opaque string, and real certificates carry many other shapes
(lower case, no prefix, a missing colon, checksums that do not verify). A signer should only
emit the canonical form, so :func:`check_uvci` accepts nothing else. Upper case is required:
the identifier compares case-insensitively, so two spellings of one identifier would be
different strings in two signed certificates.

This module needs only the standard library and does no I/O; every function is pure.
"""

from __future__ import annotations

import re
import zlib

__all__ = [
    "LUHN_ALPHABET",
    "UVCI_MAX_LENGTH",
    "UVCI_PREFIX",
    "check_uvci",
    "luhn_mod38_check_char",
    "make_uvci",
]

#: The 38 symbols of the check-character alphabet; a symbol's value is its index.
LUHN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:"
_N = len(LUHN_ALPHABET)
_VALUE = {ch: i for i, ch in enumerate(LUHN_ALPHABET)}

#: Prefix of every canonical UVCI (URN namespace, UVCI version 01).
UVCI_PREFIX = "URN:UVCI:01:"

#: Longest ``ci`` any DCC schema version allows (80 from schema 1.3.0, 50 before).
UVCI_MAX_LENGTH = 80

# The whole grammar in one expression, used with fullmatch (Python's `$` would also match
# before a trailing newline). Explicit ASCII classes, because `\d` and `\w` match non-ASCII
# digits and letters in Python. Possessive `++` because a part never needs backtracking.
_UVCI_RE = re.compile(r"URN:UVCI:01:[A-Z]{2}:[A-Z0-9]++(?:/[A-Z0-9]++){0,2}(?:#[A-Z0-9/:])?")
_COUNTRY_RE = re.compile(r"[A-Z]{2}")
_PART_RE = re.compile(r"[A-Z0-9]+")


# Luhn over this alphabet is a sum of per-character values, half of them "doubled" (twice the
# value, its two base-38 digits added). Both value tables are byte-translation tables, so the
# whole sum runs in C: bytes.translate() maps each character to its value, and Adler-32 adds
# the bytes (see _luhn_total). This is on the signing hot path (every ci with a check
# character).
_PLAIN_TABLE = bytes(_VALUE.get(chr(b), 0) for b in range(256))
_DOUBLE_TABLE = bytes(
    (2 * _VALUE[chr(b)]) // _N + (2 * _VALUE[chr(b)]) % _N if chr(b) in _VALUE else 0
    for b in range(256)
)
_ALPHABET_RE = re.compile(r"[A-Z0-9/:]+")
_adler32 = zlib.adler32
# Every table value is at most 37, so a byte sum stays below Adler-32's modulus (65521) for
# any input up to this length.
_ADLER_SAFE_LENGTH = 1700


def luhn_mod38_check_char(text: str) -> str:
    """Return the Luhn mod-38 check character of ``text``.

    Every character of ``text`` must belong to :data:`LUHN_ALPHABET` (upper case only).
    Starting from the right, every second value (the rightmost first) is doubled and folded
    back into the alphabet's range by adding its base-38 digits; the check character is what
    brings the sum to a multiple of 38.

    Raises:
        ValueError: ``text`` is empty or contains a character outside the alphabet.
    """
    if not isinstance(text, str) or not _ALPHABET_RE.fullmatch(text):
        shown = (
            repr(text[:40]) + ("…" if len(text) > 40 else "")
            if isinstance(text, str)
            else type(text).__name__
        )
        raise ValueError(
            f"the check character needs a non-empty string over {LUHN_ALPHABET!r}, got {shown}"
        )
    return LUHN_ALPHABET[_luhn_total(text.encode("ascii")) % _N]


def _luhn_total(raw: bytes) -> int:
    """Minus the Luhn sum of ``raw`` (alphabet already checked): its value mod 38 indexes the
    check character."""
    n = len(raw)
    # Doubled positions: the rightmost character and every second one to its left, i.e. the
    # indexes with the parity of n - 1.
    doubled = raw[(n - 1) & 1 :: 2].translate(_DOUBLE_TABLE)
    plain = raw[n & 1 :: 2].translate(_PLAIN_TABLE)
    if n <= _ADLER_SAFE_LENGTH:
        # The low half of Adler-32 is 1 + the byte sum mod 65521 (RFC 1950), so for short
        # inputs it is the exact sum, computed in C: about 3x faster than sum() over bytes.
        return 2 - (_adler32(doubled) & 0xFFFF) - (_adler32(plain) & 0xFFFF)
    return -(sum(doubled) + sum(plain))


def check_uvci(ci: str) -> tuple[str, str] | None:
    """Check ``ci`` against the canonical UVCI grammar and its optional check character.

    Returns:
        ``None`` when ``ci`` is canonical. Otherwise a ``(rule, message)`` pair where rule is
        ``"uvci-grammar"`` (not the canonical shape) or ``"uvci-checksum"`` (the character
        after ``#`` is not the Luhn mod-38 check character of the identifier).

    Length is not checked here: the limit depends on the schema version (see
    :mod:`dccsign.dcc.validate`). Never raises, whatever ``ci`` is.
    """
    if not isinstance(ci, str):
        return ("uvci-grammar", "a UVCI must be a string")
    if _UVCI_RE.fullmatch(ci) is None:
        return ("uvci-grammar", _grammar_message(ci))
    if ci[-2] != "#":  # no check character ('#' cannot occur anywhere else)
        return None
    expected = LUHN_ALPHABET[_luhn_total(ci[:-2].encode("ascii")) % _N]
    check = ci[-1]
    if check != expected:
        return (
            "uvci-checksum",
            f"the check character after '#' must be the Luhn mod-38 character of the UVCI, "
            f"{expected!r}, not {check!r}",
        )
    return None


_GRAMMAR_FORM = "URN:UVCI:01:CC:PART[/PART[/PART]][#C] in upper case (parts A-Z/0-9)"


def _grammar_message(ci: str) -> str:
    """Say what is wrong with a non-canonical UVCI (slow path only)."""
    if ci.upper() != ci and _UVCI_RE.fullmatch(ci.upper()):
        hint = "it must be upper case"
    elif not ci.upper().startswith(UVCI_PREFIX):
        hint = f"it must start with {UVCI_PREFIX!r}"
    elif "#" in ci and not re.fullmatch(r"[^#]*#[A-Z0-9/:]", ci):
        hint = f"'#' must be followed by exactly one check character from {LUHN_ALPHABET!r}"
    else:
        hint = "country or identifier parts are malformed"
    return f"a UVCI must have the canonical form {_GRAMMAR_FORM}; {hint}"


def make_uvci(country: str, *parts: str, checksum: bool = True) -> str:
    """Build a canonical UVCI ``URN:UVCI:01:<country>:<part>[/<part>…]``.

    Args:
        country: ISO 3166-1 alpha-2 code (two ASCII letters; lower case is upper-cased).
        parts: one to three identifier parts (``ID``; ``ISSUER, ID``; or
            ``ISSUER, VACCINE, ID``), each ASCII letters and digits; upper-cased.
        checksum: append ``#`` and the Luhn mod-38 check character (recommended for print).

    Raises:
        ValueError: a malformed country or part, a wrong number of parts, or a result longer
            than :data:`UVCI_MAX_LENGTH` (no schema version would accept it).
    """
    if (
        not isinstance(country, str)
        or not country.isascii()
        or not _COUNTRY_RE.fullmatch(country.upper())
    ):
        raise ValueError(f"country must be two ASCII letters, got {country!r}")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"a UVCI has one to three identifier parts, got {len(parts)}")
    upper_parts = []
    for part in parts:
        # isascii() first: str.upper() maps some non-ASCII letters to ASCII ones ('ı' -> 'I').
        if not isinstance(part, str) or not part.isascii() or not _PART_RE.fullmatch(part.upper()):
            raise ValueError(f"each UVCI part must be non-empty ASCII letters/digits, got {part!r}")
        upper_parts.append(part.upper())
    body = UVCI_PREFIX + country.upper() + ":" + "/".join(upper_parts)
    if checksum:
        body += "#" + luhn_mod38_check_char(body)
    if len(body) > UVCI_MAX_LENGTH:
        raise ValueError(f"the UVCI would be {len(body)} characters; at most {UVCI_MAX_LENGTH}")
    return body
