"""The writer: :class:`AuditLog`, keyd's only handle on the log. It opens the log (checking
the newest segment, recovering a torn write, completing an interrupted rotation), appends
entries and a signed checkpoint per batch with one ``write`` and one ``fsync``, rotates and
compresses segments, and reopens in place after a failed write (docs/audit-format.md,
"Writing")."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import native
from ..process import lock_holder, name_this_thread, record_holder
from .chain import BreakFound, Chain, ChainState, Tail
from .durable import create_file, fsync_dir, write_all
from .errors import AuditLogError, AuditUnavailable
from .issue_lines import IssueLines
from .key import PUBKEY_FILE, AuditKey, PublicKey
from .node import is_node_id
from .records import (
    FORMAT,
    GENESIS,
    IssuanceBatch,
    IssuanceRecord,
    KeyEvent,
    batches_of,
    canonical,
    checkpoint_message,
    format_time,
)
from .segments import Raced, compress, decompress, list_segments, read_segment, segment_name

__all__ = ["LOCK_FILE", "REOPEN_HEADROOM", "SLOW_FSYNC", "AuditLog"]

LOGGER = logging.getLogger("dccsign.audit")

LOCK_FILE = "lock"
#: An fsync this slow (seconds) is counted and logged (see ``AuditLog._note_fsync``).
SLOW_FSYNC = 0.1
#: :meth:`AuditLog.reopen` touches the log only once the directory takes this many bytes more
#: (probe file, written, fsynced and removed): room for the recovery and the next batches.
REOPEN_HEADROOM = 1 << 20
PROBE_FILE = "reopen-probe.tmp"


def _open_lock_file(root: Path) -> int:
    """Create the log directory (mode 0700) if needed and open its lock file.

    Raises:
        AuditUnavailable: neither can be done.
    """
    try:
        if not root.is_dir():
            root.mkdir(mode=0o700, parents=True)
            fsync_dir(root.parent)
        return os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AuditUnavailable(f"{root}: cannot use the audit directory: {exc.strerror}") from exc


def _wait_for_lock(root: Path, lock_fd: int, lock_wait: float) -> None:
    """Take the flock on *lock_fd*, waiting up to *lock_wait* seconds for its holder to go
    (logging every 5 s whom it waits for).

    Raises:
        AuditLogError: still held after *lock_wait* seconds (the message names the holder).
    """
    deadline = time.monotonic() + lock_wait
    next_note = 0.0
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if now >= deadline:
                waited = f" (waited {lock_wait:g} s)" if lock_wait > 0 else ""
                raise AuditLogError(
                    f"{root}: the audit log is already open for writing, "
                    f"{lock_holder(root / LOCK_FILE)}{waited}"
                ) from None
            if now >= next_note:
                next_note = now + 5.0
                LOGGER.warning(
                    "%s: waiting up to %.0f s more for the audit log lock, %s",
                    root,
                    deadline - now,
                    lock_holder(root / LOCK_FILE),
                )
            time.sleep(0.05)


class AuditLog:
    """The writer (keyd). Open with :meth:`open`; not for concurrent writers (a lock file
    keeps a second process out). Thread-safe: appends are serialised."""

    def __init__(self, root: Path, key: AuditKey, segment_records: int, clock) -> None:
        self.directory = root
        self._key = key
        self._segment_records = segment_records
        self._clock: Callable[[], float] = clock
        self._lock = threading.Lock()
        self._lock_fd = -1
        self._fd = -1
        self._segment = 0
        self._path = root
        self._seq = 1  # the next sequence number
        self._prev = GENESIS
        self._records_in_segment = 0
        self._log_id = ""
        #: the node id this log belongs to (None: an older log without one, kept so)
        self._node: str | None = None
        #: the node id the current segment's header names
        self._header_node: str | None = None
        self._last_checkpoint = b""
        self._broken: str | None = None
        self._closed = False
        self._issue_lines = IssueLines()
        #: Commits whose fsync took SLOW_FSYNC seconds or more, since the log was opened.
        self.slow_fsyncs = 0
        self._slow_pending = 0
        self._slow_worst = 0.0
        self._slow_next_log = 0.0
        self._compress_queue: queue.SimpleQueue[Path | None] | None = None
        self._compressor: threading.Thread | None = None
        self._compress_error: str | None = None
        #: a description of the torn write that :meth:`open` recovered, or None
        self.recovered: dict[str, Any] | None = None
        #: How often :meth:`reopen` has replaced this log's state with what is on disk.
        self.reopens = 0

    # -- opening

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        audit_key: AuditKey,
        *,
        segment_records: int = 100_000,
        clock: Callable[[], float] = time.time,
        lock_wait: float = 0.0,
        node: str | None = None,
    ) -> AuditLog:
        """Open (or create) the log in *directory* for appending.

        A new directory is created with mode 0700 and gets segment 1. An existing log is
        checked: the newest segment completely (chain, sequence, checkpoint signatures) and its
        link to the closing checkpoint of the segment before; then the sequence and the chain
        continue. A torn last write is set aside and recorded (docs/audit-format.md); interrupted
        rotation and compression steps are completed.

        The writer holds a flock on ``DIR/lock`` and writes its pid, process start time and
        boot id into it (emptied again on close). When another process holds it, the open
        waits up to *lock_wait* seconds for it to go (a keyd that is stopping), logging whom
        it waits for; the error names the holder from that record, or says that the record
        is stale (its process is gone: the flock always has a live holder).

        *node* is the id of the node writing the log (:mod:`.node`), stored in every segment
        header: one log is one node's. An existing log that names another node is refused;
        one that names none yet (written before node ids) is closed at its current segment
        and continues in a new one that names *node*. None keeps what the log names (a new
        log then names no node).

        Raises:
            AuditLogError: the log is broken (the message says where), belongs to another audit
                key or another node, or another process has it open.
            ValueError: *node* is not a valid node id.
            AuditUnavailable: the directory or its files cannot be written.
        """
        if segment_records < 1:
            raise ValueError("segment_records must be at least 1")
        if node is not None and not is_node_id(node):
            raise ValueError(f"not a node id: {node!r} (1 to 64 of A-Z a-z 0-9 . _ -)")
        root = Path(directory)
        log = cls(root, audit_key, segment_records, clock)
        log._node = node
        lock_fd = _open_lock_file(root)
        try:  # until the flock is ours, the record in the file is the holder's: never touch it
            _wait_for_lock(root, lock_fd, lock_wait)
        except BaseException:
            os.close(lock_fd)
            raise
        log._lock_fd = lock_fd
        record_holder(lock_fd)
        try:
            try:
                log._start()
            except OSError as exc:
                name = f" {exc.filename}" if exc.filename else ""
                raise AuditUnavailable(
                    f"{root}: cannot write the audit log{name}: {exc.strerror or exc}"
                ) from exc
        except BaseException:
            log._release()
            raise
        return log

    def _start(self) -> None:
        root = self.directory
        for entry in os.scandir(root):  # leftovers of an interrupted compression or probe
            if entry.name.endswith((".log.zst.tmp", ".log.del")) or entry.name == PROBE_FILE:
                os.unlink(entry.path)
        segments = list_segments(root)
        have_public_key = self._check_public_key()
        if not segments:
            if not have_public_key:
                create_file(root / PUBKEY_FILE, self._key.public_key_pem(), 0o644)
            self._log_id = secrets.token_hex(16)
            self._new_segment(1)
            return
        numbers = [n for n, _, _ in segments]
        if numbers != list(range(1, len(numbers) + 1)):
            missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
            raise AuditLogError(f"{root}: segment {missing[0]} is missing (deleted)")
        pending: list[Path] = []
        for number, plain, zst in segments[:-1]:
            if plain is not None and zst is not None:
                self._finish_compression(number, plain, zst)
            elif plain is not None:
                pending.append(plain)
        number, plain, zst = segments[-1]
        if plain is None:
            raise AuditLogError(
                f"{zst}: the newest segment is already compressed (closed) but segment "
                f"{number + 1} does not exist: the newest segment was deleted"
            )
        if zst is not None:  # compression starts only once the next segment exists
            raise AuditLogError(
                f"{zst}: the newest segment exists plain and compressed, but segment "
                f"{number + 1} does not exist: was it deleted?"
            )
        chain = Chain(self._key.public)
        data = plain.read_bytes()
        try:
            if number > 1:
                chain.seed(number - 1, *self._edges(segments[-2]))
            tail = chain.segment(number, data, final=True)
        except BreakFound as exc:
            brk = exc.brk
            raise AuditLogError(
                f"{root}: the audit log is broken in segment {brk.segment} at sequence "
                f"{brk.sequence}: {brk.problem} (run 'dccsign audit verify {root}')"
            ) from None
        if not have_public_key and chain.log_id is not None:
            # lost beside an existing log: the newest header named this key, so restore it
            create_file(root / PUBKEY_FILE, self._key.public_key_pem(), 0o644)
        self._log_id = chain.log_id or ""
        self._adopt_node(chain.node)
        if tail.partial or tail.uncovered or not tail.covered_end:
            self._recover(number, plain, data, tail, chain)
        else:
            self._segment = number
            self._path = plain
            self._adopt(chain.state)
            self._fd = os.open(plain, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if tail.last_end == "segment":  # stopped between closing and creating the next
                self._new_segment(number + 1)
                pending.append(plain)
        if self._node is not None and self._header_node is None:
            pending.append(self._path)
            self._close_segment_for_node()
        for path in pending:
            self._compress_later(path)

    def _adopt_node(self, stored: str | None) -> None:
        """Take over the node id the newest segment's header names (*stored*), unless it
        contradicts the one this log was opened with.

        Raises:
            AuditLogError: the log is another node's.
        """
        if stored is not None and self._node is not None and stored != self._node:
            raise AuditLogError(
                f"{self.directory}: this audit log belongs to node {stored!r}, not "
                f"{self._node!r}: one log per node (give --node-id {stored}, or another "
                "audit directory)"
            )
        self._node = self._node or stored
        self._header_node = stored

    def _close_segment_for_node(self) -> None:
        """The log was written before it had a node id: close the current segment (a
        checkpoint that ends it) and start the next, whose header names the node, so that
        readers see the node at once rather than after the next rotation."""
        self._commit([self._checkpoint_line(format_time(self._clock()), "segment")])
        self._new_segment(self._segment + 1)

    def _check_public_key(self) -> bool:
        """False when ``DIR/audit-key.pub.pem`` does not exist; an error when it names
        another key than the one given."""
        path = self.directory / PUBKEY_FILE
        try:
            stored = PublicKey(path.read_bytes(), str(path))
        except FileNotFoundError:
            return False
        if stored.fingerprint != self._key.fingerprint:
            raise AuditLogError(
                f"{path}: this log's checkpoints are signed by another audit key "
                f"(sha256 {stored.fingerprint[:16]}..., given {self._key.fingerprint[:16]}...)"
            )
        return True

    def _edges(self, segment: tuple[int, Path | None, Path | None]) -> tuple[bytes, bytes]:
        """The first and the last line of a closed segment."""
        number, plain, zst = segment
        try:
            data = read_segment(self.directory, number, plain, zst)
        except (ValueError, Raced) as exc:
            raise AuditLogError(f"{self.directory}: segment {number}: {exc}") from None
        if not data.endswith(b"\n"):
            raise AuditLogError(f"{self.directory}: segment {number} is truncated")
        return data.split(b"\n", 1)[0], data[:-1].rsplit(b"\n", 1)[-1]

    def _finish_compression(self, number: int, plain: Path, zst: Path) -> None:
        """A crash between renaming the .zst into place and unlinking the plain file."""
        try:
            same = decompress(zst.read_bytes()) == plain.read_bytes()
        except ValueError:
            same = False
        if not same:
            raise AuditLogError(
                f"{zst}: segment {number} exists both plain and compressed, with different contents"
            )
        plain.unlink()
        fsync_dir(self.directory)

    def _adopt(self, state: ChainState) -> None:
        self._seq = state.next_seq
        self._prev = state.prev
        self._records_in_segment = state.segment_records
        self._last_checkpoint = state.last_checkpoint

    def _recover(self, number: int, path: Path, data: bytes, tail: Tail, chain: Chain) -> None:
        """Set aside a torn tail (entries after the last checkpoint that chain correctly,
        and/or an incomplete line), then record that in the chain."""
        # without any checkpoint in this segment (stopped while creating it), this is the
        # state after the previous segment's closing checkpoint (or the empty log)
        state = chain.at_checkpoint
        discarded = data[tail.covered_end :]
        evidence = self._evidence_path(number, state.next_seq)
        if discarded:
            create_file(evidence, discarded, 0o600)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, tail.covered_end)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.recovered = {
            "torn_segment": number,
            "after_sequence": state.next_seq - 1,
            "discarded_bytes": len(discarded),
            "discarded_entries": tail.uncovered,
            "discarded_sha256": hashlib.sha256(discarded).hexdigest(),
            "evidence": evidence.name if discarded else None,
        }
        LOGGER.warning(
            "audit log %s: a torn write was set aside: %d bytes (%d complete entries, never "
            "acknowledged) after sequence %d of segment %d, moved to %s",
            self.directory,
            len(discarded),
            tail.uncovered,
            state.next_seq - 1,
            number,
            evidence.name if discarded else "-",
        )
        self._segment = number
        self._path = path
        self._adopt(state)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if tail.covered_end and tail.last_end == "segment":
            # the torn bytes followed the checkpoint that closed this segment: nothing more
            # belongs in it; the recover entry goes to the next one
            self._new_segment(number + 1)
            self._compress_later(path)
        now = format_time(self._clock())
        lines = []
        if not tail.covered_end:
            if not self._log_id:
                self._log_id = secrets.token_hex(16)
            lines.append(self._header_line(now))
        lines.append(self._entry_line({"t": "recover", **self.recovered}, now))
        lines.append(self._checkpoint_line(now, None))
        self._commit(lines)

    def _evidence_path(self, number: int, seq: int) -> Path:
        base = f"torn-{number:06d}-{seq:06d}"
        path = self.directory / f"{base}.bin"
        extra = 1
        while path.exists():
            extra += 1
            path = self.directory / f"{base}-{extra}.bin"
        return path

    # -- entries

    def _header_line(self, now: str) -> bytes:
        fields = {
            "t": "header",
            "format": FORMAT,
            "log": self._log_id,
            "segment": self._segment,
            "audit_key": self._key.fingerprint,
        }
        if self._node is not None:  # a log without one stays so (verify: one log, one node)
            fields["node"] = self._node
        self._header_node = self._node
        return self._entry_line(fields, now)

    def _entry_line(self, fields: dict[str, Any], now: str) -> bytes:
        """Serialise one entry, giving it the next sequence number and chaining it."""
        line = canonical({**fields, "seq": self._seq, "prev": self._prev, "time": now})
        self._seq += 1
        self._prev = hashlib.sha256(line).hexdigest()
        return line

    def _checkpoint_line(self, now: str, end: str | None) -> bytes:
        message = checkpoint_message(self._seq, self._segment, self._prev, now, end)
        line = self._entry_line(
            {
                "t": "checkpoint",
                "segment": self._segment,
                "end": end,
                "sig": self._key.sign(message).hex(),
            },
            now,
        )
        self._last_checkpoint = line
        return line

    def _new_segment(self, number: int) -> None:
        """Create segment *number*: header and checkpoint, file and directory fsynced."""
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segment = number
        self._path = path
        self._records_in_segment = 0
        now = format_time(self._clock())
        self._commit([self._header_line(now), self._checkpoint_line(now, None)])
        fsync_dir(self.directory)

    def _commit(self, lines: list[bytes]) -> None:
        """One write and one fsync. The caller has already advanced the in-memory chain; on
        failure the log is marked unusable (reopening re-reads the file)."""
        try:
            write_all(self._fd, b"\n".join(lines) + b"\n")
            started = time.monotonic()
            os.fsync(self._fd)
            self._note_fsync(time.monotonic() - started)
        except OSError as exc:
            self._broken = f"{self._path}: {exc.strerror or exc}"
            LOGGER.error("audit log %s cannot be written: %s", self.directory, self._broken)
            raise AuditUnavailable(
                f"the audit log cannot be written durably ({self._broken}); no further "
                "signatures can be audited until it is reopened"
            ) from exc

    def _chain_position(self) -> tuple[int, str, bytes]:
        """What :meth:`_commit_records` restores when a commit fails."""
        return self._seq, self._prev, self._last_checkpoint

    def _commit_records(
        self, lines: list[bytes], count: int, now: str, saved: tuple[int, str, bytes]
    ) -> None:
        """Commit *lines* (already chained, holding *count* records) with a checkpoint after
        them: the one that closes the segment when they fill it, which then rotates.

        Raises:
            AuditUnavailable: as :meth:`_commit`; the in-memory chain is back at *saved*
                (:meth:`_chain_position` before the lines were chained).
        """
        closing = self._records_in_segment + count >= self._segment_records
        lines.append(self._checkpoint_line(now, "segment" if closing else None))
        try:
            self._commit(lines)
        except AuditUnavailable:
            self._seq, self._prev, self._last_checkpoint = saved
            raise
        self._records_in_segment += count
        if closing:
            self._rotate()

    def _note_fsync(self, seconds: float) -> None:
        """Count and report slow commits: every signature of the batch waited for this fsync
        (and every request behind it), so a disk that stalls shows in the engine's latency.
        Logged at most every 10 s, with the number and worst time since the last report."""
        if seconds < SLOW_FSYNC:
            return
        self.slow_fsyncs += 1
        self._slow_pending += 1
        self._slow_worst = max(self._slow_worst, seconds)
        now = time.monotonic()
        if now >= self._slow_next_log:
            LOGGER.warning(
                "audit log %s: %d fsync(s) over %.0f ms since the last report, the slowest "
                "%.0f ms: signatures wait for them (the disk, not keyd)",
                self.directory,
                self._slow_pending,
                SLOW_FSYNC * 1000,
                self._slow_worst * 1000,
            )
            self._slow_pending, self._slow_worst = 0, 0.0
            self._slow_next_log = now + 10.0

    def _usable(self) -> None:
        if self._closed:
            raise AuditUnavailable(f"{self.directory}: the audit log is closed")
        if self._broken is not None:
            raise AuditUnavailable(
                f"{self.directory}: the audit log failed earlier ({self._broken}); reopen it"
            )
        if self._compress_error is not None:
            self._broken = self._compress_error
            raise AuditUnavailable(f"{self.directory}: {self._compress_error}")

    def append_issuance(self, records: Sequence[IssuanceRecord]) -> list[int]:
        """Append one record per signature, then a checkpoint: one write, one fsync.

        When this returns, the records are durable; the signatures may be released.

        Returns:
            The sequence numbers of the records, in order.

        Raises:
            ValueError: a record is malformed (its index is named; nothing is written).
            AuditUnavailable: the log cannot be written durably; it refuses further appends
                until reopened. The signatures of this batch must not be released.
        """
        return self.append_batches(batches_of(records))

    def append_batch(self, batch: IssuanceBatch) -> list[int]:
        """:meth:`append_issuance` for records given in columns (keyd's form: no object per
        signature). Same contract; a bad item is named as ``record <index>``."""
        return self.append_batches([batch])

    def append_batches(self, batches: Sequence[IssuanceBatch]) -> list[int]:
        """:meth:`append_batch` for several batches in one commit (one fsync); their records
        follow each other in order. A bad item is named by its index over all batches."""
        with self._lock:
            self._usable()
            if not any(b.payloads for b in batches):
                return []
            now = format_time(self._clock())
            lines, prev = self._issue_lines.build(batches, now.encode(), self._seq, self._prev)
            first_seq = self._seq
            count = len(lines)
            saved = self._chain_position()
            self._seq, self._prev = first_seq + count, prev
            self._commit_records(lines, count, now, saved)
            return list(range(first_seq, first_seq + count))

    def append_columns(
        self,
        kid: bytes,
        alg: int,
        columns: Any,
        facts: bytes,
        selected: Any,
        signatures: bytes,
        sig_ends: Any,
    ) -> range:
        """:meth:`append_batches` for keyd's batch in columns: one ``issue`` record per item
        of *selected* (an ``array('I')`` of item numbers, in order), then a checkpoint; one
        write, one fsync. *columns* is the message's ``KeydColumns`` (protocol/keyd.py: its
        payloads, end offsets, string tables and index columns), *facts* what
        ``native.keyd_check_columns`` read from them, and selected item k was signed with
        ``signatures[sig_ends[k-1]:sig_ends[k]]``. The records equal those
        :meth:`append_batches` writes for the same items grouped in parts, byte for byte
        (``native.audit_issue_columns`` builds them in one call, without the GIL).

        Returns:
            The records' sequence numbers.

        Raises:
            ValueError, TypeError: malformed arguments (``native.audit_issue_columns`` names
                the table entry or item); nothing is written.
            AuditUnavailable: as :meth:`append_batches`; the signatures must not be released.
        """
        return self.append_columns_many(
            [(kid, alg, columns, facts, selected, signatures, sig_ends)]
        )[0]

    def append_columns_many(self, batches: Sequence[tuple[Any, ...]]) -> list[range]:
        """:meth:`append_columns` for several batches (keyd's SIGN_KIDS: one per kid), each
        a tuple of that method's arguments: their records in order, one checkpoint, one
        write, one fsync -- all of them durable, or none written.

        Returns:
            Per batch, its records' sequence numbers.

        Raises:
            ValueError, TypeError, AuditUnavailable: as :meth:`append_columns`, for all of
                them (nothing is written).
        """
        with self._lock:
            self._usable()
            first_seq = self._seq
            saved = self._chain_position()
            now = format_time(self._clock())
            stamp = now.encode()
            blobs: list[bytes] = []
            spans: list[range] = []
            seq, prev = self._seq, self._prev
            for kid, alg, c, facts, selected, signatures, sig_ends in batches:
                if not len(selected):
                    spans.append(range(seq, seq))
                    continue
                blob, prev = native.audit_issue_columns(
                    stamp, alg, kid, c.clients, c.accounts, c.operators, c.client_ix,
                    c.account_ix, c.operator_ix, c.payloads, c.ends, facts, selected,
                    signatures, sig_ends, seq, prev,
                )  # fmt: skip
                blobs.append(blob)
                spans.append(range(seq, seq + len(selected)))
                seq += len(selected)
            count = seq - first_seq
            if not count:
                return spans
            self._seq, self._prev = seq, prev
            # each batch's issue lines arrive joined by newlines: one element of the commit
            self._commit_records(blobs, count, now, saved)
            return spans

    def append_key_event(self, event: KeyEvent) -> int:
        """Append a key lifecycle record and a checkpoint; durable on return.

        Raises:
            ValueError: a malformed event (nothing is written).
            AuditUnavailable: as for :meth:`append_issuance`.
        """
        if not isinstance(event.action, str) or not event.action:
            raise ValueError("a key event needs an action")
        if not isinstance(event.actor, str) or not event.actor:
            raise ValueError("a key event needs an actor")
        if event.kid is not None and (not isinstance(event.kid, bytes) or len(event.kid) != 8):
            raise ValueError("kid must be 8 bytes or None")
        for name in ("key_id", "reason"):
            if getattr(event, name) is not None and not isinstance(getattr(event, name), str):
                raise ValueError(f"{name} must be a string or None")
        with self._lock:
            self._usable()
            now = format_time(self._clock())
            saved = self._chain_position()
            seq = self._seq
            line = self._entry_line(
                {
                    "t": "key",
                    "action": event.action,
                    "kid": event.kid.hex() if event.kid is not None else None,
                    "key_id": event.key_id,
                    "actor": event.actor,
                    "reason": event.reason,
                },
                now,
            )
            self._commit_records([line], 1, now, saved)
            return seq

    # -- rotation and compression

    def _rotate(self) -> None:
        """The batch that closed the segment is durable; a failure here only stops the next
        append (the caller's records are safe)."""
        closed = self._path
        try:
            self._new_segment(self._segment + 1)
        except AuditUnavailable:
            return
        except OSError as exc:
            self._broken = f"cannot create segment {self._segment + 1}: {exc.strerror or exc}"
            LOGGER.error("audit log %s: %s", self.directory, self._broken)
            return
        self._compress_later(closed)

    def _compress_later(self, plain: Path) -> None:
        if self._compressor is None:
            self._compress_queue = queue.SimpleQueue()
            self._compressor = threading.Thread(
                target=self._compress_worker, name="dccsign-audit-zstd", daemon=True
            )
            self._compressor.start()
        assert self._compress_queue is not None
        self._compress_queue.put(plain)

    def _compress_worker(self) -> None:
        name_this_thread("audit-zstd")
        assert self._compress_queue is not None
        while True:
            plain = self._compress_queue.get()
            if plain is None:
                return
            try:
                compress(plain)
            except (OSError, ValueError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) else str(exc)
                self._compress_error = f"cannot compress {plain.name}: {detail}"
                LOGGER.error("audit log %s: %s", self.directory, self._compress_error)

    # -- state and closing

    @property
    def head(self) -> tuple[int, str]:
        """``(sequence number, hash)`` of the last entry written."""
        return self._seq - 1, self._prev

    @property
    def node(self) -> str | None:
        """The node id the log belongs to (None: an older log, opened without one)."""
        return self._node

    @property
    def segment(self) -> int:
        """The number of the segment being appended to."""
        return self._segment

    @property
    def last_checkpoint(self) -> bytes:
        """The newest signed checkpoint line: publish it outside this host as a witness
        against truncation (``verify(..., witnesses=[...])``)."""
        return self._last_checkpoint

    def reopen(self) -> None:
        """Release the log and open it again from what is on disk, in place (callers keep
        this object): after a failed write (a full disk that has been freed, say), this is
        what makes the log usable again without restarting the process.

        First the directory must take a probe of REOPEN_HEADROOM bytes (written, fsynced,
        removed): while it cannot, nothing of the log is touched (a disk that is still full
        gets no partial recovery attempts). Then exactly as :meth:`open` at start: a torn tail
        left by the failed write (entries that were never acknowledged, an incomplete line)
        is set aside and recorded (``recover`` entry, :attr:`recovered`); a segment closed but
        not yet compressed is compressed now, before this returns (if that fails too, the log
        stays unusable). Appends wait while this runs; the flock is released and taken again
        (a second open in the same process would conflict with this one's lock).

        Raises:
            AuditUnavailable: the log still cannot be written (it stays unusable; call again
                later), or it was closed.
            AuditLogError: the log on disk is broken, or another process opened it meanwhile.
        """
        with self._lock:
            if self._closed:
                raise AuditUnavailable(f"{self.directory}: the audit log is closed")
            self._probe()
            self._release()
            self._broken = self._broken or "being reopened"
            fresh = type(self).open(
                self.directory,
                self._key,
                segment_records=self._segment_records,
                clock=self._clock,
                node=self._node,
            )
            fresh._stop_compressor()  # finish what the fresh log queued (FIFO)
            # Take over the fresh log's state and descriptors; this log's lock and its
            # counters stay. The fresh object is left inert (it owns nothing any more).
            kept = {"_lock", "reopens", "slow_fsyncs"}
            kept.update(k for k in vars(self) if k.startswith("_slow_"))
            self.__dict__.update({k: v for k, v in vars(fresh).items() if k not in kept})
            fresh._fd = fresh._lock_fd = -1
            fresh._closed = True
            self.reopens += 1
            if self._compress_error is not None:
                self._broken = self._compress_error
                raise AuditUnavailable(f"{self.directory}: {self._compress_error}")

    def _probe(self) -> None:
        """Write, fsync and remove REOPEN_HEADROOM bytes in the log's directory."""
        path = self.directory / PROBE_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, bytes(REOPEN_HEADROOM))
                os.fsync(fd)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise AuditUnavailable(
                f"{self.directory}: still cannot write {REOPEN_HEADROOM:,} bytes there "
                f"({exc.strerror or exc})"
            ) from exc

    def close(self) -> None:
        """Write a final checkpoint (``end: "close"``), wait for a pending compression and
        release the log. A log that failed earlier is released without a checkpoint."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._broken is None and self._fd >= 0:
                    saved = (self._seq, self._prev)
                    try:
                        self._commit([self._checkpoint_line(format_time(self._clock()), "close")])
                    except AuditUnavailable:
                        self._seq, self._prev = saved
                        raise
            finally:
                self._closed = True
                self._release()

    def _stop_compressor(self) -> None:
        """Let the compression thread finish the segments queued, and end it."""
        if self._compressor is not None:
            assert self._compress_queue is not None
            self._compress_queue.put(None)
            self._compressor.join()
            self._compressor = self._compress_queue = None

    def _release(self) -> None:
        self._stop_compressor()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            try:
                os.ftruncate(self._lock_fd, 0)  # no holder record outlives the holding
            except OSError:
                pass
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- readers
