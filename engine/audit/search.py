"""Reading the log without verifying it: the entries that match filters (:func:`search`) and
the EU revocation hashes of what an account issued (:func:`revocations`); over the logs of
several nodes at once, merged in time order (:func:`search_logs`, :func:`revocations_logs`)."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from .errors import AuditLogError
from .logs import LogSource, merge_by_time, open_logs
from .records import TIME_FORMAT
from .segments import Raced, list_segments, read_segment, segment_name

__all__ = [
    "Revocation",
    "read_entries",
    "revocations",
    "revocations_logs",
    "search",
    "search_logs",
]


@dataclass(frozen=True, slots=True)
class Revocation:
    """The EU revocation hashes of one issued DCC (hex, 128 bits each)."""

    sequence: int
    time: str
    kid: str
    dcc_type: str
    uci: str
    countrycodeuci: str
    signature: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.sequence,
            "time": self.time,
            "kid": self.kid,
            "type": self.dcc_type,
            "UCI": self.uci,
            "COUNTRYCODEUCI": self.countrycodeuci,
            "SIGNATURE": self.signature,
        }


def _time_bound(value: dt.datetime | str | None) -> str | None:
    """A search bound in the log's time format (naive datetimes are UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime(TIME_FORMAT)


def read_entries(root: Path, needles: Sequence[bytes] = ()) -> Iterator[dict[str, Any]]:
    """Every complete entry in order (no verification); lines lacking any of *needles* (byte
    strings) are skipped without parsing."""
    if not root.is_dir():
        raise AuditLogError(f"{root}: no such audit log directory")
    for number, plain, zst in list_segments(root):
        try:
            data = read_segment(root, number, plain, zst)
        except ValueError as exc:
            raise AuditLogError(f"{zst}: segment {number}: {exc}") from None
        except Raced:
            raise AuditLogError(f"{root}: segment {number} vanished while being read") from None
        lines = data.split(b"\n")
        lines.pop()  # b"" after the final newline, or an incomplete (torn) last line
        for lineno, raw in enumerate(lines, 1):
            if needles and not all(n in raw for n in needles):
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                raise AuditLogError(
                    f"{root / segment_name(number)}: line {lineno} is not JSON; run "
                    f"'dccsign audit verify {root}'"
                ) from None
            yield entry


def search(
    directory: str | os.PathLike[str],
    client: str | None = None,
    account: str | None = None,
    kid: bytes | str | None = None,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    *,
    operator: str | None = None,
    kinds: Sequence[str] = ("issue",),
) -> Iterator[dict[str, Any]]:
    """The stored entries that match every given filter, in log order (dicts as stored; see
    docs/audit-format.md).

    ``since`` is inclusive and ``until`` exclusive (naive datetimes are UTC). ``kinds`` picks
    entry types: ``"issue"`` (default), ``"key"``; a filter on a field an entry lacks (client,
    account, operator on key events) excludes it. Reading does not verify the log: run
    :func:`.verify.verify` for that.

    Raises:
        AuditLogError: no such directory, or an unreadable segment.
    """
    kid_hex = kid.hex() if isinstance(kid, bytes) else (kid.lower() if kid else None)
    low, high = _time_bound(since), _time_bound(until)
    wanted = {"client": client, "account": account, "operator": operator, "kid": kid_hex}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    # canonical JSON lets a byte search skip most lines before parsing them
    needles = [f'"{k}":{encode_basestring(v)}'.encode() for k, v in wanted.items()]
    for entry in read_entries(Path(directory), needles):
        if entry.get("t") not in kinds:
            continue
        if any(entry.get(k) != v for k, v in wanted.items()):
            continue
        when = entry.get("time", "")
        if (low is not None and when < low) or (high is not None and when >= high):
            continue
        yield entry


def revocations(directory: str | os.PathLike[str], account: str) -> list[Revocation]:
    """The revocation hashes of every DCC that *account* issued (as account, not as operator),
    in log order: what to put on the EU revocation list to revoke what an abused account
    signed without revoking the kid."""
    return [_revocation(e) for e in search(directory, account=account)]


def _revocation(entry: dict[str, Any]) -> Revocation:
    rev = entry["rev"]
    return Revocation(
        entry["seq"],
        entry["time"],
        entry["kid"],
        entry["type"],
        rev["UCI"],
        rev["COUNTRYCODEUCI"],
        rev["SIGNATURE"],
    )


def search_logs(
    directories: Sequence[str | os.PathLike[str]], **filters: Any
) -> Iterator[tuple[LogSource, dict[str, Any]]]:
    """:func:`search` over the logs of several nodes (one directory each) at once: the
    matching entries of all of them merged by time, each with the log it comes from.
    *filters* are :func:`search`'s keyword arguments.

    The directories are identified before anything is read (so the errors below come
    first, not after some entries).

    Raises:
        AuditLogError: no such directory, or an unreadable segment.
        DuplicateLog: two directories hold the same log or the same node's.
    """
    sources = open_logs(directories)
    return merge_by_time(sources, lambda source: search(source.directory, **filters))


def revocations_logs(
    directories: Sequence[str | os.PathLike[str]], account: str
) -> list[tuple[LogSource, Revocation]]:
    """:func:`revocations` over the logs of several nodes at once, merged by time: what
    *account* issued through any of them, each DCC with the log that recorded it.

    Raises:
        AuditLogError, DuplicateLog: as :func:`search_logs`.
    """
    return [(src, _revocation(e)) for src, e in search_logs(directories, account=account)]
