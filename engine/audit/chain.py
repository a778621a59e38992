"""The chain check: entries in order, their sequence numbers, the hash chain, segment headers
and checkpoint signatures (:class:`Chain`), shared by :func:`.verify.verify` over the whole
log and by :meth:`.writer.AuditLog.open` over the newest segment."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import AuditError
from .key import PublicKey
from .node import is_node_id
from .records import CHECKPOINT_ENDS, FORMAT, GENESIS, canonical, checkpoint_message

__all__ = ["Break", "BreakFound", "Chain", "ChainState", "Tail", "parse_witnesses"]

#: The fields of a ``recover`` entry that verify reports.
_RECOVER_FIELDS = (
    "seq",
    "time",
    "torn_segment",
    "after_sequence",
    "discarded_bytes",
    "discarded_entries",
    "discarded_sha256",
    "evidence",
)


@dataclass(frozen=True, slots=True)
class Break:
    """The first place where the log is not intact."""

    segment: int
    sequence: int
    problem: str

    def as_json(self) -> dict[str, Any]:
        return {"segment": self.segment, "sequence": self.sequence, "problem": self.problem}


class BreakFound(AuditError):
    """Raised by :class:`Chain` at the first break; *brk* says where. Its callers turn it
    into their answer (a :class:`.verify.VerifyReport`, or the writer's AuditLogError)."""

    def __init__(self, brk: Break) -> None:
        super().__init__(brk.problem)
        self.brk = brk


@dataclass(slots=True)
class Tail:
    """How the last segment checked ends."""

    covered_end: int  # offset just after the last checkpoint line (0: none in this segment)
    uncovered: int  # complete entries after that checkpoint
    partial: int  # bytes of an incomplete last line
    last_end: str | None  # ``end`` of the last entry when it is a checkpoint
    ends_with_checkpoint: bool


@dataclass(slots=True)
class ChainState:
    """Where the chain stands after an entry: what the next one must continue."""

    next_seq: int = 1
    prev: str = GENESIS
    prev_segment: int = 1
    segment_records: int = 0
    last_checkpoint: bytes = b""


class Chain:
    """Checks entries in order: sequence numbers, hash chain, headers, checkpoint signatures.

    Raises :exc:`BreakFound` at the first break. Used by :func:`.verify.verify` over the whole
    log and by :meth:`.writer.AuditLog.open` over the newest segment.
    """

    def __init__(self, public: PublicKey, witnesses: dict[int, dict[str, Any]] | None = None):
        self.public = public
        self.witnesses = witnesses or {}
        self.state = ChainState()
        self.at_checkpoint = ChainState()  # the state just after the last checkpoint
        self.log_id: str | None = None
        #: the node id the headers name (None: none so far, an older log)
        self.node: str | None = None
        self.entries = 0
        self.records = 0
        self.checkpoints = 0
        self.recoveries: list[dict[str, Any]] = []

    @staticmethod
    def fail(segment: int, sequence: int, problem: str) -> NoReturn:
        raise BreakFound(Break(segment, sequence, problem))

    def seed(self, segment: int, header: bytes, last: bytes) -> None:
        """Start after segment *segment*, given its first (header) and last (closing
        checkpoint) lines, without reading the rest of it."""
        entries = []
        for line in (header, last):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or type(entry.get("seq")) is not int:
                self.fail(segment, 0, f"segment {segment} is damaged at its start or end")
            entries.append(entry)
        if entries[0].get("t") != "header":
            self.fail(segment, entries[0]["seq"], f"segment {segment} has no header")
        self._check_header(segment, entries[0])
        if entries[1].get("t") != "checkpoint":
            self.fail(
                segment, entries[1]["seq"], f"segment {segment} does not end with a checkpoint"
            )
        self._check_checkpoint(segment, entries[1])
        if entries[1]["end"] != "segment":
            self.fail(segment, entries[1]["seq"], f"segment {segment} was not closed")
        seq = entries[1]["seq"]
        self.state = ChainState(seq + 1, hashlib.sha256(last).hexdigest(), segment, 0, last)
        self.at_checkpoint = dataclasses.replace(self.state)

    def segment(self, number: int, data: bytes, *, final: bool) -> Tail:
        """Check the entries of segment *number* (*data*, its whole content), continuing from
        those checked so far, and say how it ends.

        Args:
            final: the newest segment, which may end in a torn tail (entries after its last
                checkpoint, an incomplete line: the returned :class:`Tail` says); any other
                segment must end with the checkpoint that closed it.

        Raises:
            BreakFound: at the first entry that breaks the chain.
        """
        # The loop runs once per entry of the log: the common entries (issue, key) are
        # checked inline, the rare kinds and every failure in methods of their own.
        state = self.state
        state.segment_records = 0
        sha256 = hashlib.sha256
        loads = json.loads
        pos = 0
        size = len(data)
        index = 0
        covered_end = 0
        uncovered = 0
        last_kind = None
        last_end: str | None = None
        while pos < size:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            raw = data[pos:nl]
            expected = state.next_seq
            try:
                entry = loads(raw)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                self.fail(number, expected, "the entry is not a JSON object (edited or corrupt)")
            kind = entry.get("t")
            seq = entry.get("seq")
            if type(seq) is not int or seq != expected:
                self._fail_sequence(number, expected, seq)
            if entry.get("prev") != state.prev:
                self._fail_link(number, expected)
            if index == 0 and kind != "header":
                self.fail(number, seq, f"segment {number} does not start with its header")
            if last_end == "segment":
                self.fail(number, seq, "an entry follows the checkpoint that closed the segment")
            if kind == "issue" or kind == "key":
                self.records += 1
                state.segment_records += 1
            else:
                self._check_other_entry(number, index, entry, raw)
            if seq in self.witnesses and kind != "checkpoint":
                self.fail(number, seq, f"the witnessed checkpoint {seq} is not in the log")
            state.prev = sha256(raw).hexdigest()
            state.prev_segment = number
            state.next_seq = seq + 1
            self.entries += 1
            index += 1
            pos = nl + 1
            last_kind = kind
            if kind == "checkpoint":
                last_end = entry["end"]
                covered_end = pos
                uncovered = 0
                state.last_checkpoint = raw
                self.at_checkpoint = dataclasses.replace(state)
            else:
                uncovered += 1
        tail = Tail(covered_end, uncovered, size - pos, last_end, last_kind == "checkpoint")
        if not final:
            self._check_closed(number, size, tail)
        return tail

    def _fail_sequence(self, number: int, expected: int, seq: object) -> NoReturn:
        """The entry where *expected* belongs has sequence number *seq* instead."""
        if type(seq) is not int:
            self.fail(number, expected, "the entry has no sequence number")
        if seq > expected:
            missing = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
            self.fail(
                number,
                expected,
                f"sequence number {seq} follows {expected - 1}: entry {missing} "
                "missing (removed) or out of order",
            )
        self.fail(
            number,
            expected,
            f"entry {seq} appears where entry {expected} belongs: reordered or duplicated",
        )

    def _fail_link(self, number: int, expected: int) -> NoReturn:
        """Entry *expected*'s ``prev`` is not the hash of the entry before it."""
        if expected == 1:
            self.fail(number, 1, "entry 1 does not start the chain (prev is not zeros)")
        self.fail(
            self.state.prev_segment,
            expected - 1,
            f"entry {expected - 1} does not match the hash recorded in entry {expected}: "
            f"entry {expected - 1} (or the prev field of entry {expected}) was edited",
        )

    def _check_other_entry(
        self, number: int, index: int, entry: dict[str, Any], raw: bytes
    ) -> None:
        """Check a checkpoint, header or recover entry (the *index*-th of its segment,
        stored as *raw*); any other kind is a break."""
        kind = entry.get("t")
        seq = entry["seq"]
        if kind == "checkpoint":
            self._check_checkpoint(number, entry)
            if canonical(entry) != raw:  # the newest line has no successor to pin it
                self.fail(number, seq, "the checkpoint line is not in canonical form")
        elif kind == "header":
            if index != 0:
                self.fail(number, seq, "a segment header in the middle of a segment")
            self._check_header(number, entry)
        elif kind == "recover":
            self.recoveries.append({k: entry.get(k) for k in _RECOVER_FIELDS})
        else:
            self.fail(number, seq, f"unknown entry type {kind!r}")

    def _check_closed(self, number: int, size: int, tail: Tail) -> None:
        """A segment before the newest must end with the checkpoint that closed it."""
        state = self.state
        if size == 0:
            self.fail(number, state.next_seq, f"segment {number} is empty")
        if tail.partial or tail.uncovered:
            self.fail(
                number,
                self.at_checkpoint.next_seq,
                f"segment {number} is truncated: it ends "
                + ("in an incomplete entry" if tail.partial else "without a checkpoint"),
            )
        if tail.last_end != "segment":
            self.fail(
                number,
                state.next_seq,
                f"segment {number} is truncated: its last checkpoint (entry "
                f"{state.next_seq - 1}) does not close the segment",
            )

    def _check_header(self, number: int, entry: dict[str, Any]) -> None:
        seq = entry["seq"]
        if entry.get("format") != FORMAT:
            self.fail(number, seq, f"unknown format {entry.get('format')!r} (expected {FORMAT})")
        if entry.get("segment") != number:
            self.fail(
                number, seq, f"the header says segment {entry.get('segment')!r}: file renamed?"
            )
        log_id = entry.get("log")
        if self.log_id is None:
            self.log_id = log_id
        elif log_id != self.log_id:
            self.fail(number, seq, f"segment {number} belongs to another log ({log_id!r})")
        self._check_node(number, seq, entry)
        if entry.get("audit_key") != self.public.fingerprint:
            self.fail(
                number,
                seq,
                f"segment {number} names audit key {str(entry.get('audit_key'))[:16]}..., not "
                f"the key used to verify ({self.public.fingerprint[:16]}...)",
            )

    def _check_node(self, number: int, seq: int, entry: dict[str, Any]) -> None:
        """One log, one node: a header may name a node id only if no earlier header named
        another, and may omit it only while none did (older logs have none; a log upgraded
        gets it from its next segment on)."""
        if "node" not in entry:
            if self.node is not None:
                self.fail(
                    number,
                    seq,
                    f"segment {number} names no node, but the log is node {self.node!r}",
                )
            return
        node = entry["node"]
        if not is_node_id(node):
            self.fail(number, seq, f"segment {number}: malformed node id {str(node)[:70]!r}")
        if self.node is not None and node != self.node:
            self.fail(
                number,
                seq,
                f"segment {number} names node {node!r}, but the log is node {self.node!r} "
                "(one log is one node's)",
            )
        self.node = node

    def _check_checkpoint(self, number: int, entry: dict[str, Any]) -> None:
        seq, prev, when, end, sig = (entry.get(k) for k in ("seq", "prev", "time", "end", "sig"))
        if (
            type(seq) is not int
            or type(entry.get("segment")) is not int
            or not isinstance(prev, str)
            or not isinstance(when, str)
            or end not in CHECKPOINT_ENDS
            or not isinstance(sig, str)
        ):
            self.fail(number, seq, "malformed checkpoint")
        if entry["segment"] != number:
            self.fail(number, seq, f"the checkpoint says segment {entry['segment']}: file renamed?")
        try:
            signature = bytes.fromhex(sig)
        except ValueError:
            self.fail(number, seq, "malformed checkpoint signature")
        if not self.public.verify(signature, checkpoint_message(seq, number, prev, when, end)):
            self.fail(number, seq, "the checkpoint signature is not valid (forged or edited)")
        witness = self.witnesses.get(seq)
        if witness is not None and (witness["prev"], witness["sig"]) != (prev, sig):
            self.fail(number, seq, "the checkpoint differs from the witnessed one: log rewritten")
        self.checkpoints += 1


def parse_witnesses(items: Iterable[bytes | str], public: PublicKey) -> dict[int, dict]:
    """Witnessed checkpoint lines (text before the first ``{`` is ignored, e.g. a syslog
    prefix). Each must be a checkpoint validly signed by the audit key."""
    found: dict[int, dict] = {}
    for item in items:
        text = item.decode() if isinstance(item, bytes) else item
        start = text.find("{")
        try:
            entry = json.loads(text[start:]) if start >= 0 else None
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or entry.get("t") != "checkpoint":
            raise ValueError(f"not a checkpoint line: {text[:60]!r}")
        try:
            Chain(public)._check_checkpoint(entry.get("segment"), entry)  # type: ignore[arg-type]
        except BreakFound:
            raise ValueError(
                f"witness checkpoint {entry.get('seq')!r}: not validly signed by the audit key"
            ) from None
        found[entry["seq"]] = entry
    return found


# ----------------------------------------------------------------------------- writer
