"""Verification of a whole log (:func:`verify`): every segment in order, the hash chain
across them, every checkpoint signature, witnessed checkpoints; what it can and cannot detect
is in docs/audit-format.md ("What verify detects"). :func:`verify_logs` verifies the logs of
several nodes, each on its own."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chain import Break, BreakFound, Chain, Tail, parse_witnesses
from .errors import AuditKeyError, AuditLogError
from .key import PUBKEY_FILE, PublicKey
from .logs import LogSource, open_logs
from .records import GENESIS
from .segments import Raced, list_segments, read_segment

__all__ = ["LogsReport", "VerifyReport", "key_for", "verify", "verify_logs"]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of :func:`verify`.

    Attributes:
        ok: no break found.
        records: issue and key entries checked (up to the first break).
        segments: segments read completely.
        first_break: where the log stops being intact, or None.
        entries: all entries checked (headers, records, checkpoints, recover entries).
        checkpoints: signatures verified.
        last_sequence: the sequence number of the last entry checked.
        head: the hash of that entry's line.
        closed_cleanly: the log ends with an ``end: "close"`` checkpoint.
        recoveries: the ``recover`` entries found (torn writes set aside on reopen).
        key_fingerprint: SHA-256 of the audit public key (DER SubjectPublicKeyInfo), hex.
        key_pinned: the key was given by the caller; False means the key stored beside the
            log was used, which anyone able to rewrite the log can also replace.
        node: the node id the log's headers name (checked up to the first break; None: an
            older log without one). Not in :meth:`as_json`, which :class:`LogsReport` extends.
    """

    ok: bool
    records: int
    segments: int
    first_break: Break | None
    entries: int = 0
    checkpoints: int = 0
    last_sequence: int = 0
    head: str = GENESIS
    closed_cleanly: bool = False
    recoveries: tuple[dict[str, Any], ...] = ()
    key_fingerprint: str = ""
    key_pinned: bool = False
    node: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "segments": self.segments,
            "first_break": self.first_break.as_json() if self.first_break else None,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "last_sequence": self.last_sequence,
            "head": self.head,
            "closed_cleanly": self.closed_cleanly,
            "recoveries": list(self.recoveries),
            "key_fingerprint": self.key_fingerprint,
            "key_pinned": self.key_pinned,
        }


def verify(
    directory: str | os.PathLike[str],
    public_key_pem: bytes | None = None,
    *,
    witnesses: Iterable[bytes | str] = (),
) -> VerifyReport:
    """Check the whole log: every segment (plain and .zst) in order, sequence continuity, the
    hash chain across segments, every checkpoint signature; report the first break.

    Args:
        public_key_pem: the audit public key to trust. None uses ``DIR/audit-key.pub.pem``,
            which proves little: whoever can rewrite the log can replace it
            (:attr:`VerifyReport.key_pinned` is then False).
        witnesses: checkpoint lines kept outside the log (:attr:`.writer.AuditLog.last_checkpoint`);
            each must appear unchanged at its sequence number (detects a rollback).

    Raises:
        AuditKeyError: the public key is missing or unusable.
        AuditLogError: *directory* is not a directory.
        ValueError: a witness is not a checkpoint validly signed by the audit key.
    """
    root = Path(directory)
    if not root.is_dir():
        raise AuditLogError(f"{root}: no such audit log directory")
    if public_key_pem is None:
        source = root / PUBKEY_FILE
        try:
            pem = source.read_bytes()
        except OSError as exc:
            raise AuditKeyError(
                f"{source}: cannot read the stored audit public key ({exc.strerror}); "
                "give the audit public key explicitly"
            ) from None
        public = PublicKey(pem, str(source))
    else:
        public = PublicKey(public_key_pem, "the given audit public key")
    witnessed = parse_witnesses(witnesses, public)
    for attempt in range(3):
        try:
            return _verify_once(root, public, public_key_pem is not None, witnessed, attempt == 2)
        except Raced:
            time.sleep(0.05)
    raise AuditLogError(f"{root}: the log keeps changing while it is read; try again")


def _verify_once(
    root: Path, public: PublicKey, pinned: bool, witnessed: dict[int, dict], last_try: bool
) -> VerifyReport:
    """One pass of :func:`verify`.

    Raises:
        Raced: the newest segment looks unfinished while the log is changing (a live
            writer); never on the *last_try*, which reports what it found.
    """
    chain = Chain(public, witnessed)
    segments = list_segments(root)
    done = 0
    brk: Break | None = None
    closed_cleanly = False
    try:
        if not segments:
            chain.fail(1, 1, f"{root} holds no audit segments")
        for position, (number, plain, zst) in enumerate(segments):
            if number != done + 1:
                missing = f"{done + 1}" if number == done + 2 else f"{done + 1}..{number - 1}"
                chain.fail(done + 1, chain.state.next_seq, f"segment {missing} missing (deleted)")
            final = position == len(segments) - 1
            try:
                data = read_segment(root, number, plain, zst)
                if plain is not None and zst is not None and plain.read_bytes() != data:
                    chain.fail(number, chain.state.next_seq, "plain and .zst copies differ")
            except ValueError as exc:
                chain.fail(number, chain.state.next_seq, f"segment {number}: {exc}")
            except FileNotFoundError:
                pass  # the plain copy was unlinked after the .zst was read: fine
            tail = chain.segment(number, data, final=final)
            if final:
                problem = _unfinished_end(number, data, tail, chain.state.next_seq)
                if problem is not None:
                    grown = plain is not None and zst is None and _size(plain) != len(data)
                    if not last_try and (grown or list_segments(root) != segments):
                        raise Raced
                    sequence = (
                        chain.state.next_seq
                        if tail.last_end == "segment" and not tail.uncovered
                        else chain.at_checkpoint.next_seq
                    )
                    chain.fail(number + (tail.last_end == "segment"), sequence, problem)
                closed_cleanly = tail.last_end == "close"
            done += 1
        beyond = [seq for seq in witnessed if seq >= chain.state.next_seq]
        if beyond:
            chain.fail(
                done,
                chain.state.next_seq,
                f"the log ends at entry {chain.state.next_seq - 1} but a witnessed checkpoint "
                f"has sequence {min(beyond)}: the tail was truncated or the log rolled back",
            )
    except BreakFound as exc:
        brk = exc.brk
    return VerifyReport(
        ok=brk is None,
        records=chain.records,
        segments=done,
        first_break=brk,
        entries=chain.entries,
        checkpoints=chain.checkpoints,
        last_sequence=chain.state.next_seq - 1,
        head=chain.state.prev,
        closed_cleanly=closed_cleanly and brk is None,
        recoveries=tuple(chain.recoveries),
        key_fingerprint=public.fingerprint,
        key_pinned=pinned,
        node=chain.node,
    )


def _unfinished_end(number: int, data: bytes, tail: Tail, next_seq: int) -> str | None:
    """What is wrong with how the newest segment (*number*, content *data*) ends, or None
    when it ends with a checkpoint that leaves the log open or closed cleanly."""
    if not data:
        return f"segment {number} is empty (created when keyd stopped?)"
    if tail.partial:
        return (
            f"the log ends in an incomplete entry ({tail.partial} bytes after entry "
            f"{next_seq - 1}): a torn write, or the file was truncated"
        )
    if tail.uncovered:
        return (
            f"{tail.uncovered} entries after the last checkpoint are not covered "
            "by a signature: a torn write, the checkpoint removed, or entries added"
        )
    if tail.last_end == "segment":
        return (
            f"segment {number + 1} is missing: segment {number} was closed (deleted, "
            "or keyd stopped while rotating and has not been restarted since)"
        )
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


@dataclass(frozen=True, slots=True)
class LogsReport:
    """The result of :func:`verify_logs`: each log's report, in the order given.

    Attributes:
        logs: ``(source, report)`` per log: which directory, log and node (as its headers
            say, :class:`.logs.LogSource`) and its :class:`VerifyReport`.
    """

    logs: tuple[tuple[LogSource, VerifyReport], ...]

    @property
    def ok(self) -> bool:
        """Every log is intact."""
        return all(report.ok for _, report in self.logs)

    @property
    def records(self) -> int:
        """Issue and key entries checked, over all logs."""
        return sum(report.records for _, report in self.logs)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "logs": [
                {
                    "directory": str(source.directory),
                    "node": report.node,
                    "log": source.log_id,
                    **report.as_json(),
                }
                for source, report in self.logs
            ],
        }


def verify_logs(
    directories: Sequence[str | os.PathLike[str]], public_keys_pem: Sequence[bytes] = ()
) -> LogsReport:
    """:func:`verify` each of several logs (one per node), each on its own: its chain, its
    checkpoints, its audit key.

    Args:
        public_keys_pem: the audit public keys to trust. Each log is verified with the one
            whose fingerprint its first header names (nodes may have keys of their own); if
            none does, with the first (the log then breaks at that header). Empty: each
            log's stored ``DIR/audit-key.pub.pem``, as :func:`verify` without a key.

    Raises:
        AuditLogError: one is not a directory, or keeps changing while it is read.
        DuplicateLog: two directories hold the same log or the same node's (checked before
            any is verified).
        AuditKeyError: a given key is unusable, or a stored one is missing or unusable.
    """
    sources = open_logs(directories)
    return LogsReport(
        tuple((src, verify(src.directory, key_for(src, public_keys_pem))) for src in sources)
    )


def key_for(source: LogSource, public_keys_pem: Sequence[bytes]) -> bytes | None:
    """Of the audit public keys *public_keys_pem*, the one whose fingerprint the first
    header of *source* names; else the first (None if there is none).

    Raises:
        AuditKeyError: a key is not a usable audit public key.
    """
    keys = [PublicKey(pem, "a given audit public key") for pem in public_keys_pem]
    match = next((k for k in keys if k.fingerprint == source.audit_key), None)
    return (match or keys[0]).pem if keys else None
