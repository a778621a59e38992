"""What the log stores and how an entry is written: the format's constants, the records keyd
hands over, the canonical JSON of a line and the message a checkpoint signs
(docs/audit-format.md)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHECKPOINT_ENDS",
    "DCC_TYPES",
    "ES256",
    "FORMAT",
    "GENESIS",
    "PS256",
    "TIME_FORMAT",
    "IssuanceBatch",
    "IssuanceRecord",
    "KeyEvent",
    "batches_of",
    "canonical",
    "checkpoint_message",
    "format_time",
    "revocation_hashes",
]

FORMAT = "dccsign-audit/1"
GENESIS = "0" * 64
ES256, PS256 = -7, -37
DCC_TYPES = ("v", "t", "r")
CHECKPOINT_ENDS = (None, "segment", "close")
#: ``time`` of every entry (UTC); the strings sort as the times do.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True, slots=True)
class IssuanceRecord:
    """What keyd hands over per signature; the log stores only the fields derived from it
    (see docs/audit-format.md): ``uvci`` and ``payload`` are stored as hashes only."""

    kid: bytes
    alg: int
    client: str
    account: str
    operator: str | None
    dcc_type: str
    uvci: str
    iss: str
    payload: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class IssuanceBatch:
    """The records of one keyd batch in columns: what they share, then per signature its DCC
    type (one letter each in *dcc_types*), UVCI, CWT issuer, payload and signature."""

    kid: bytes
    alg: int
    client: str
    account: str
    operator: str | None
    dcc_types: str
    uvcis: Sequence[str]
    isses: Sequence[str]
    payloads: Sequence[bytes]
    signatures: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A key lifecycle operation (generate, csr, import-cert, activate, retire, disable, keyd
    start/stop, ...), stored as given."""

    action: str
    kid: bytes | None
    key_id: str | None
    actor: str
    reason: str | None


def batches_of(records: Sequence[IssuanceRecord]) -> list[IssuanceBatch]:
    """*records* in columns: each run of records that share kid, alg, client, account and
    operator is one batch (a DCC type other than v, t, r becomes ``?``)."""
    batches: list[IssuanceBatch] = []
    start = 0
    while start < len(records):
        first = records[start]
        shared = (first.kid, first.alg, first.client, first.account, first.operator)
        end = start + 1
        while (
            end < len(records)
            and (
                (r := records[end]).kid,
                r.alg,
                r.client,
                r.account,
                r.operator,
            )
            == shared
        ):
            end += 1
        run = records[start:end]
        batches.append(
            IssuanceBatch(
                *shared,
                "".join(r.dcc_type if r.dcc_type in DCC_TYPES else "?" for r in run),
                [r.uvci for r in run],
                [r.iss for r in run],
                [r.payload for r in run],
                [r.signature for r in run],
            )
        )
        start = end
    return batches


def revocation_hashes(uvci: str, iss: str, signature: bytes, alg: int) -> dict[str, str]:
    """The EU DCC revocation hashes (hex) of one signed DCC, as the log stores them."""
    if alg == ES256:
        signed = signature[:32]
    elif alg == PS256:
        signed = signature
    else:
        raise ValueError(f"unknown COSE algorithm {alg}")
    return {
        "UCI": hashlib.sha256(uvci.encode()).hexdigest()[:32],
        "COUNTRYCODEUCI": hashlib.sha256((iss + uvci).encode()).hexdigest()[:32],
        "SIGNATURE": hashlib.sha256(signed).hexdigest()[:32],
    }


# ----------------------------------------------------------------------------- lines


def canonical(obj: dict[str, Any]) -> bytes:
    """The stored form of an entry: canonical JSON (sorted keys, no spaces, UTF-8), the exact
    bytes the next entry's ``prev`` hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_time(when: float) -> str:
    """*when* (seconds since the epoch) in the log's time format (UTC, microseconds)."""
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime(TIME_FORMAT)


def checkpoint_message(seq: int, segment: int, head: str, when: str, end: str | None) -> bytes:
    """The message a checkpoint's signature covers (docs/audit-format.md)."""
    return (
        f"{FORMAT} checkpoint\nseq={seq}\nsegment={segment}\nhead={head}\n"
        f"time={when}\nend={end or '-'}\n"
    ).encode()
