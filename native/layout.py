"""The layouts that the native batch functions share with their callers, in both
implementations: the columns of a walked SIGN / SIGN_BATCH body (``BatchView.columns``), the
marker of an item without a payload (``splice_payloads``), and keyd's packed per-item facts
(``keyd_check_columns``). The numbers are those of ``src/walker.h`` and ``src/keydcols.h``.
"""

from __future__ import annotations

import struct

__all__ = [
    "ACCOUNT_LEN",
    "ACCOUNT_OFF",
    "DCC_LEN",
    "DCC_OFF",
    "FACT",
    "FLAGS",
    "FLAG_ACCOUNT_NON_ASCII",
    "FLAG_KEY_TEXT",
    "FLAG_OPERATOR_NON_ASCII",
    "KEY_LEN",
    "KEY_OFF",
    "KID_OFF",
    "NFIELDS",
    "NO_PAYLOAD",
    "OPERATOR_LEN",
    "OPERATOR_OFF",
    "VALIDITY",
    "unpack_facts",
]

# BatchView.columns: NFIELDS uint32 per item, these fields in this order.
DCC_OFF, DCC_LEN = 0, 1
ACCOUNT_OFF, ACCOUNT_LEN = 2, 3
OPERATOR_OFF, OPERATOR_LEN = 4, 5
KID_OFF = 6
VALIDITY = 7
KEY_OFF, KEY_LEN = 8, 9
FLAGS = 10
NFIELDS = 11
FLAG_KEY_TEXT = 0x1
FLAG_ACCOUNT_NON_ASCII = 0x2
FLAG_OPERATOR_NON_ASCII = 0x4

#: ``prefix_of`` value of an item that gets no payload (refused before signing).
NO_PAYLOAD = 0xFFFFFFFF

#: One item's packed facts (native byte order, no padding): iss, type, len(ci), offset of ci
#: in the payload, exp, iat. An item refused before its payload was read has all zeros.
FACT = struct.Struct("=2scBIqq")


def unpack_facts(facts: bytes, i: int) -> tuple[str, str, int, int, int, int]:
    """Item *i*'s facts: (iss, type, len(ci), offset of ci, exp, iat)."""
    iss, t, ci_len, ci_off, exp, iat = FACT.unpack_from(facts, i * FACT.size)
    return iss.decode("latin-1"), t.decode("latin-1"), ci_len, ci_off, exp, iat
