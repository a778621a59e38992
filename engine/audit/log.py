"""The issuance audit log: one append-only, tamper-evident record per signature.

keyd is the only writer (:class:`AuditLog`: entries and a signed checkpoint per batch, one
``write`` and one ``fsync``, torn writes recovered on open); security staff read the log with
:func:`verify`, :func:`search` and :func:`revocations` (``dccsign audit ...``). The log holds
no clear personal data: no names, no dates of birth, no UVCI (only hashes of it).

The format (segments, entries and their hash chain, checkpoints), the order of the steps that
make a write durable, and what :func:`verify` can and cannot detect are specified in
``docs/audit-format.md``; this module implements that page.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any, NoReturn

import zstandard
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import native
from ..errors import DccSignError, KeystoreError
from ..process import name_this_thread

__all__ = [
    "FORMAT",
    "AuditError",
    "AuditKey",
    "AuditKeyError",
    "AuditLog",
    "AuditLogError",
    "AuditUnavailable",
    "Break",
    "IssuanceBatch",
    "IssuanceRecord",
    "KeyEvent",
    "Revocation",
    "VerifyReport",
    "revocation_hashes",
    "revocations",
    "search",
    "verify",
]

LOGGER = logging.getLogger("dccsign.audit")

FORMAT = "dccsign-audit/1"
GENESIS = "0" * 64
PUBKEY_FILE = "audit-key.pub.pem"
LOCK_FILE = "lock"
ES256, PS256 = -7, -37
DCC_TYPES = ("v", "t", "r")
CHECKPOINT_ENDS = (None, "segment", "close")
_MAX_TEXT = 1024  # client, account, operator, ... : identifiers, not documents
#: Entries of each of the writer's literal caches (client/account/operator JSON literals, and
#: record heads). Sized above the working set of a busy engine (10k+ accounts) so that it does
#: not churn; when full, the oldest entry goes (first in, first out): memory stays bounded
#: (~16k x ~0.3 KB). keyd's columns path (:meth:`AuditLog.append_columns`) uses no cache: it
#: builds the literals from each message's string tables, natively.
CACHE_ENTRIES = 16_384
_SEGMENT_RE = re.compile(r"segment-(\d{6,})\.log(\.zst)?")
#: zstd level of closed segments. On keyd's segments level 1 is both smaller and faster than
#: 3 (measured on a full segment: bench/README.md); the compression thread's CPU comes out of
#: the cores that sign.
_ZSTD_LEVEL = 1
#: An fsync this slow (seconds) is counted and logged (see ``AuditLog._note_fsync``).
SLOW_FSYNC = 0.1
#: :meth:`AuditLog.reopen` touches the log only once the directory takes this many bytes more
#: (probe file, written, fsynced and removed): room for the recovery and the next batches.
REOPEN_HEADROOM = 1 << 20
PROBE_FILE = "reopen-probe.tmp"
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


# ----------------------------------------------------------------------------- errors


class AuditError(DccSignError):
    """Base class of the audit log's errors."""


class AuditKeyError(AuditError, KeystoreError):
    """The audit key (or a public key given to verify) cannot be used. The message names the
    file. Also a :exc:`KeystoreError`, so the CLI reports it as a key problem (exit 4)."""


class AuditLogError(AuditError):
    """The log on disk is broken or cannot be used (another process holds it, a segment is
    missing or altered). The message names the file, segment and sequence number."""


class AuditUnavailable(AuditError):
    """The log cannot be written durably (``ENOSPC``, ``EIO``, a read-only file system, ...).

    keyd must stop signing. The log refuses every further append until it is reopened.
    """


# ----------------------------------------------------------------------------- records


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


@dataclass(frozen=True, slots=True)
class Break:
    """The first place where the log is not intact."""

    segment: int
    sequence: int
    problem: str

    def as_json(self) -> dict[str, Any]:
        return {"segment": self.segment, "sequence": self.sequence, "problem": self.problem}


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


# ----------------------------------------------------------------------------- helpers


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _format_time(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time_bound(value: dt.datetime | str | None) -> str | None:
    """A search bound in the log's time format (naive datetimes are UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _checkpoint_message(seq: int, segment: int, head: str, when: str, end: str | None) -> bytes:
    return (
        f"{FORMAT} checkpoint\nseq={seq}\nsegment={segment}\nhead={head}\n"
        f"time={when}\nend={end or '-'}\n"
    ).encode()


def _segment_name(number: int, compressed: bool = False) -> str:
    return f"segment-{number:06d}.log" + (".zst" if compressed else "")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # not expected from a regular file; never loop forever
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


#: Bytes written between flushes when a large file is created or shrunk (see the module
#: docstring: the commits' fsyncs wait for at most one step's writeback).
FLUSH_STEP = 1 << 20
#: Bytes a discarded plain segment is shrunk by per step before it is unlinked.
SHRINK_STEP = 8 << 20


def _create_file(path: Path, data: bytes, mode: int, *, step: int | None = None) -> None:
    """Create *path* (never overwriting), write *data*, fsync the file and its directory.
    With *step*, the data is written and flushed (``fdatasync``) *step* bytes at a time
    first, so that no single flush holds the file system's other fsyncs for long."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        if step is None:
            _write_all(fd, data)
        else:
            view = memoryview(data)
            for at in range(0, len(data), step):
                _write_all(fd, view[at : at + step])
                os.fdatasync(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fsync_dir(path.parent)


def _discard(plain: Path) -> None:
    """Remove a plain segment whose ``.zst`` is durable: renamed out of the segment names
    first (``.log.del``: from then on the segment is the ``.zst`` alone, whatever happens
    next), then shrunk SHRINK_STEP bytes at a time and unlinked (freeing tens of megabytes
    at once stalls the file system's other fsyncs)."""
    doomed = plain.with_name(plain.name + ".del")
    os.rename(plain, doomed)
    _fsync_dir(plain.parent)
    fd = os.open(doomed, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        while size > 0:
            size = max(0, size - SHRINK_STEP)
            os.ftruncate(fd, size)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    os.unlink(doomed)
    _fsync_dir(plain.parent)


def _decompress(data: bytes) -> bytes:
    """Decompress one complete zstandard frame with nothing after it.

    Raises:
        ValueError: truncated, corrupt (checksum) or followed by other bytes.
    """
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt zstandard data ({exc})") from None
    if not dobj.eof:
        raise ValueError("the zstandard frame is truncated")
    if dobj.unused_data:
        raise ValueError(f"{len(dobj.unused_data)} bytes follow the zstandard frame")
    return out


def _list_segments(root: Path) -> list[tuple[int, Path | None, Path | None]]:
    """``[(number, plain path or None, compressed path or None)]`` in number order."""
    found: dict[int, list[Path | None]] = {}
    for entry in os.scandir(root):
        match = _SEGMENT_RE.fullmatch(entry.name)
        if match:
            slot = found.setdefault(int(match.group(1)), [None, None])
            slot[1 if match.group(2) else 0] = Path(entry.path)
    return [(n, found[n][0], found[n][1]) for n in sorted(found)]


class _PublicKey:
    """The public half of an audit key: checkpoint verification and the fingerprint."""

    __slots__ = ("_key", "fingerprint", "pem")

    def __init__(self, pem: bytes, source: str) -> None:
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise AuditKeyError(f"{source}: not a PEM public key") from None
        if not (
            isinstance(key, Ed25519PublicKey)
            or (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1")
        ):
            raise AuditKeyError(f"{source}: an audit key is Ed25519 or ECDSA P-256")
        self._key = key
        self.pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.fingerprint = hashlib.sha256(der).hexdigest()

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            if isinstance(self._key, Ed25519PublicKey):
                self._key.verify(signature, message)
            else:
                self._key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


# ----------------------------------------------------------------------------- audit key


class AuditKey:
    """The key that signs checkpoints. It is not a DCC key and should be used for nothing
    else. Files are encrypted PKCS#8 PEM (mode 0600)."""

    __slots__ = ("_private", "path", "public")

    def __init__(self, private_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, path: Path):
        self._private = private_key
        self.path = path
        pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public = _PublicKey(pem, str(path))

    def __repr__(self) -> str:
        return f"<AuditKey {self.path} sha256:{self.public.fingerprint[:16]}>"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the public key's DER SubjectPublicKeyInfo, hex."""
        return self.public.fingerprint

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], passphrase: bytes, *, algorithm: str = "Ed25519"
    ) -> AuditKey:
        """Generate a new audit key and write it encrypted with *passphrase*.

        Args:
            algorithm: ``"Ed25519"`` (default) or ``"P-256"``.

        Raises:
            AuditKeyError: the file exists (never overwritten), the passphrase is empty, or the
                file cannot be written (the message names it).
        """
        target = Path(path)
        if not isinstance(passphrase, bytes) or not passphrase:
            raise AuditKeyError(f"{target}: the audit key needs a non-empty passphrase (bytes)")
        if algorithm == "Ed25519":
            private: Ed25519PrivateKey | ec.EllipticCurvePrivateKey = Ed25519PrivateKey.generate()
        elif algorithm == "P-256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unknown audit key algorithm {algorithm!r} (Ed25519 or P-256)")
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        try:
            _create_file(target, pem, 0o600)
        except FileExistsError:
            raise AuditKeyError(f"{target}: exists; refusing to overwrite an audit key") from None
        except OSError as exc:
            raise AuditKeyError(f"{target}: cannot write the audit key: {exc.strerror}") from None
        return cls(private, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: bytes) -> AuditKey:
        """Read and decrypt an audit key.

        Raises:
            AuditKeyError: missing or unreadable file, not an encrypted PKCS#8 key, wrong
                passphrase, or a key type other than Ed25519 / P-256 (the message names the
                file).
        """
        source = Path(path)
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            raise AuditKeyError(f"{source}: audit key file not found") from None
        except OSError as exc:
            raise AuditKeyError(f"{source}: cannot read the audit key: {exc.strerror}") from None
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in data:
            raise AuditKeyError(
                f"{source}: not an encrypted PKCS#8 PEM private key (corrupt or wrong file)"
            )
        try:
            private = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise AuditKeyError(
                f"{source}: cannot decrypt the audit key: wrong passphrase or corrupt file"
            ) from None
        if not (
            isinstance(private, Ed25519PrivateKey)
            or (
                isinstance(private, ec.EllipticCurvePrivateKey)
                and private.curve.name == "secp256r1"
            )
        ):
            raise AuditKeyError(f"{source}: an audit key is Ed25519 or ECDSA P-256")
        return cls(private, source)

    def public_key_pem(self) -> bytes:
        return self.public.pem

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._private, Ed25519PrivateKey):
            return self._private.sign(message)
        return self._private.sign(message, ec.ECDSA(hashes.SHA256()))


# ----------------------------------------------------------------------------- the chain check


class _BreakFound(Exception):
    def __init__(self, brk: Break) -> None:
        super().__init__(brk.problem)
        self.brk = brk


@dataclass(slots=True)
class _Tail:
    """How the last segment checked ends."""

    covered_end: int  # offset just after the last checkpoint line (0: none in this segment)
    uncovered: int  # complete entries after that checkpoint
    partial: int  # bytes of an incomplete last line
    last_end: str | None  # ``end`` of the last entry when it is a checkpoint
    ends_with_checkpoint: bool


@dataclass(slots=True)
class _State:
    next_seq: int = 1
    prev: str = GENESIS
    prev_segment: int = 1
    segment_records: int = 0
    last_checkpoint: bytes = b""


class _Chain:
    """Checks entries in order: sequence numbers, hash chain, headers, checkpoint signatures.

    Raises :exc:`_BreakFound` at the first break. Used by :func:`verify` over the whole log and
    by :meth:`AuditLog.open` over the newest segment.
    """

    def __init__(self, public: _PublicKey, witnesses: dict[int, dict[str, Any]] | None = None):
        self.public = public
        self.witnesses = witnesses or {}
        self.state = _State()
        self.at_checkpoint = _State()  # the state just after the last checkpoint
        self.log_id: str | None = None
        self.entries = 0
        self.records = 0
        self.checkpoints = 0
        self.recoveries: list[dict[str, Any]] = []

    @staticmethod
    def fail(segment: int, sequence: int, problem: str) -> NoReturn:
        raise _BreakFound(Break(segment, sequence, problem))

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
        self.state = _State(seq + 1, hashlib.sha256(last).hexdigest(), segment, 0, last)
        self.at_checkpoint = dataclasses.replace(self.state)

    def segment(self, number: int, data: bytes, *, final: bool) -> _Tail:
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
            if type(seq) is not int:
                self.fail(number, expected, "the entry has no sequence number")
            if seq != expected:
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
            if entry.get("prev") != state.prev:
                if expected == 1:
                    self.fail(number, 1, "entry 1 does not start the chain (prev is not zeros)")
                self.fail(
                    state.prev_segment,
                    expected - 1,
                    f"entry {expected - 1} does not match the hash recorded in entry {expected}: "
                    f"entry {expected - 1} (or the prev field of entry {expected}) was edited",
                )
            if index == 0 and kind != "header":
                self.fail(number, seq, f"segment {number} does not start with its header")
            if last_end == "segment":
                self.fail(number, seq, "an entry follows the checkpoint that closed the segment")
            if kind == "issue" or kind == "key":
                self.records += 1
                state.segment_records += 1
            elif kind == "checkpoint":
                self._check_checkpoint(number, entry)
                if _canonical(entry) != raw:  # the newest line has no successor to pin it
                    self.fail(number, seq, "the checkpoint line is not in canonical form")
            elif kind == "header":
                if index != 0:
                    self.fail(number, seq, "a segment header in the middle of a segment")
                self._check_header(number, entry)
            elif kind == "recover":
                self.recoveries.append({k: entry.get(k) for k in _RECOVER_FIELDS})
            else:
                self.fail(number, seq, f"unknown entry type {kind!r}")
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
        tail = _Tail(covered_end, uncovered, size - pos, last_end, last_kind == "checkpoint")
        if not final:
            first_uncovered = self.at_checkpoint.next_seq
            if size == 0:
                self.fail(number, state.next_seq, f"segment {number} is empty")
            if tail.partial or tail.uncovered:
                self.fail(
                    number,
                    first_uncovered,
                    f"segment {number} is truncated: it ends "
                    + ("in an incomplete entry" if tail.partial else "without a checkpoint"),
                )
            if last_end != "segment":
                self.fail(
                    number,
                    state.next_seq,
                    f"segment {number} is truncated: its last checkpoint (entry "
                    f"{state.next_seq - 1}) does not close the segment",
                )
        return tail

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
        if entry.get("audit_key") != self.public.fingerprint:
            self.fail(
                number,
                seq,
                f"segment {number} names audit key {str(entry.get('audit_key'))[:16]}..., not "
                f"the key used to verify ({self.public.fingerprint[:16]}...)",
            )

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
        if not self.public.verify(signature, _checkpoint_message(seq, number, prev, when, end)):
            self.fail(number, seq, "the checkpoint signature is not valid (forged or edited)")
        witness = self.witnesses.get(seq)
        if witness is not None and (witness["prev"], witness["sig"]) != (prev, sig):
            self.fail(number, seq, "the checkpoint differs from the witnessed one: log rewritten")
        self.checkpoints += 1


def _parse_witnesses(items: Iterable[bytes | str], public: _PublicKey) -> dict[int, dict]:
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
            _Chain(public)._check_checkpoint(entry.get("segment"), entry)  # type: ignore[arg-type]
        except _BreakFound:
            raise ValueError(
                f"witness checkpoint {entry.get('seq')!r}: not validly signed by the audit key"
            ) from None
        found[entry["seq"]] = entry
    return found


# ----------------------------------------------------------------------------- writer


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
        self._last_checkpoint = b""
        self._broken: str | None = None
        self._closed = False
        self._texts: dict[str, str] = {}
        self._heads: dict[tuple[object, ...], bytes] = {}
        #: Commits whose fsync took SLOW_FSYNC seconds or more, since the log was opened.
        self.slow_fsyncs = 0
        self._slow_pending = 0
        self._slow_worst = 0.0
        self._slow_next_log = 0.0
        self._kids: dict[bytes, str] = {}
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

        Raises:
            AuditLogError: the log is broken (the message says where), belongs to another audit
                key, or another process has it open.
            AuditUnavailable: the directory or its files cannot be written.
        """
        from ..process import lock_holder, record_holder

        if segment_records < 1:
            raise ValueError("segment_records must be at least 1")
        root = Path(directory)
        log = cls(root, audit_key, segment_records, clock)
        try:
            if not root.is_dir():
                root.mkdir(mode=0o700, parents=True)
                _fsync_dir(root.parent)
            lock_fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditUnavailable(
                f"{root}: cannot use the audit directory: {exc.strerror}"
            ) from exc
        try:  # until the flock is ours, the record in the file is the holder's: never touch it
            deadline = time.monotonic() + lock_wait
            next_note = 0.0
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
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
        segments = _list_segments(root)
        have_public_key = self._check_public_key()
        if not segments:
            if not have_public_key:
                _create_file(root / PUBKEY_FILE, self._key.public_key_pem(), 0o644)
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
        chain = _Chain(self._key.public)
        data = plain.read_bytes()
        try:
            if number > 1:
                chain.seed(number - 1, *self._edges(segments[-2]))
            tail = chain.segment(number, data, final=True)
        except _BreakFound as exc:
            brk = exc.brk
            raise AuditLogError(
                f"{root}: the audit log is broken in segment {brk.segment} at sequence "
                f"{brk.sequence}: {brk.problem} (run 'dccsign audit verify {root}')"
            ) from None
        if not have_public_key and chain.log_id is not None:
            # lost beside an existing log: the newest header named this key, so restore it
            _create_file(root / PUBKEY_FILE, self._key.public_key_pem(), 0o644)
        self._log_id = chain.log_id or ""
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
        for path in pending:
            self._compress_later(path)

    def _check_public_key(self) -> bool:
        """False when ``DIR/audit-key.pub.pem`` does not exist; an error when it names
        another key than the one given."""
        path = self.directory / PUBKEY_FILE
        try:
            stored = _PublicKey(path.read_bytes(), str(path))
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
            data = _read_segment(self.directory, number, plain, zst)
        except (ValueError, _Raced) as exc:
            raise AuditLogError(f"{self.directory}: segment {number}: {exc}") from None
        if not data.endswith(b"\n"):
            raise AuditLogError(f"{self.directory}: segment {number} is truncated")
        return data.split(b"\n", 1)[0], data[:-1].rsplit(b"\n", 1)[-1]

    def _finish_compression(self, number: int, plain: Path, zst: Path) -> None:
        """A crash between renaming the .zst into place and unlinking the plain file."""
        try:
            same = _decompress(zst.read_bytes()) == plain.read_bytes()
        except ValueError:
            same = False
        if not same:
            raise AuditLogError(
                f"{zst}: segment {number} exists both plain and compressed, with different contents"
            )
        plain.unlink()
        _fsync_dir(self.directory)

    def _adopt(self, state: _State) -> None:
        self._seq = state.next_seq
        self._prev = state.prev
        self._records_in_segment = state.segment_records
        self._last_checkpoint = state.last_checkpoint

    def _recover(self, number: int, path: Path, data: bytes, tail: _Tail, chain: _Chain) -> None:
        """Set aside a torn tail (entries after the last checkpoint that chain correctly,
        and/or an incomplete line), then record that in the chain."""
        # without any checkpoint in this segment (stopped while creating it), this is the
        # state after the previous segment's closing checkpoint (or the empty log)
        state = chain.at_checkpoint
        discarded = data[tail.covered_end :]
        evidence = self._evidence_path(number, state.next_seq)
        if discarded:
            _create_file(evidence, discarded, 0o600)
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
        now = _format_time(self._clock())
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
        return self._entry_line(
            {
                "t": "header",
                "format": FORMAT,
                "log": self._log_id,
                "segment": self._segment,
                "audit_key": self._key.fingerprint,
            },
            now,
        )

    def _entry_line(self, fields: dict[str, Any], now: str) -> bytes:
        """Serialise one entry, giving it the next sequence number and chaining it."""
        line = _canonical({**fields, "seq": self._seq, "prev": self._prev, "time": now})
        self._seq += 1
        self._prev = hashlib.sha256(line).hexdigest()
        return line

    def _checkpoint_line(self, now: str, end: str | None) -> bytes:
        message = _checkpoint_message(self._seq, self._segment, self._prev, now, end)
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
        path = self.directory / _segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._segment = number
        self._path = path
        self._records_in_segment = 0
        now = _format_time(self._clock())
        self._commit([self._header_line(now), self._checkpoint_line(now, None)])
        _fsync_dir(self.directory)

    def _commit(self, lines: list[bytes]) -> None:
        """One write and one fsync. The caller has already advanced the in-memory chain; on
        failure the log is marked unusable (reopening re-reads the file)."""
        try:
            _write_all(self._fd, b"\n".join(lines) + b"\n")
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

    def _text(self, value: object, what: str, index: int) -> str:
        """JSON string literal of an identifier (cached: clients and accounts repeat)."""
        cached = self._texts.get(value)  # type: ignore[arg-type]
        if cached is not None:
            return cached
        if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
            raise ValueError(
                f"record {index}: {what} must be a non-empty string of at most "
                f"{_MAX_TEXT} characters"
            )
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"record {index}: {what} is not valid Unicode text") from None
        literal = encode_basestring(value)
        if len(self._texts) >= CACHE_ENTRIES:
            del self._texts[next(iter(self._texts))]  # the oldest: no clear-and-refill churn
        self._texts[value] = literal
        return literal

    def _head(self, r: IssuanceBatch, index: int) -> bytes:
        """``{"account":A,"alg":N,"client":C,"iss":`` of a batch (cached like :meth:`_text`)."""
        slot = (r.account, r.alg, type(r.alg), r.client)
        try:
            cached = self._heads.get(slot)
        except TypeError:  # an unhashable field: _text names it below
            cached = None
        if cached is not None:
            return cached
        if type(r.alg) is not int or r.alg not in (ES256, PS256):
            raise ValueError(f"record {index}: alg must be -7 (ES256) or -37 (PS256)")
        account = self._text(r.account, "account", index)
        client = self._text(r.client, "client", index)
        head = f'{{"account":{account},"alg":{r.alg},"client":{client},"iss":'.encode()
        if len(self._heads) >= CACHE_ENTRIES:
            del self._heads[next(iter(self._heads))]
        self._heads[slot] = head
        return head

    def _middle(self, r: IssuanceBatch, index: int) -> bytes:
        """``,"kid":"K","operator":O,"payload_sha256":"`` of a batch."""
        kid = self._kids.get(r.kid)
        if kid is None:
            if not isinstance(r.kid, bytes) or len(r.kid) != 8:
                raise ValueError(f"record {index}: kid must be 8 bytes")
            kid = self._kids[r.kid] = r.kid.hex()
        operator = "null" if r.operator is None else self._text(r.operator, "operator", index)
        return f',"kid":"{kid}","operator":{operator},"payload_sha256":"'.encode()

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
        # Each run of records that share kid, alg, client, account and operator is one batch.
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
        return self.append_batches(batches)

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
            now = _format_time(self._clock())
            when = now.encode()
            seq, prev = self._seq, self._prev
            lines: list[bytes] = []
            # Hashing and formatting in one native call for each run of batches that share an
            # alg (keyd's micro-batch is one run whatever its number of parts), without the GIL
            # when native: a call per part cost more than the part's own lines.
            for alg, same_alg in itertools.groupby(batches, key=lambda b: b.alg):
                run = list(same_alg)
                heads: list[bytes] = []
                middles: list[bytes] = []
                sizes: list[int] = []
                isses: list[str] = []
                uvcis: list[str] = []
                payloads: list[bytes] = []
                signatures: list[bytes] = []
                index = len(lines)
                for b in run:
                    # Each batch's columns must agree on their own: concatenated, a short one
                    # would shift records into the next batch's group.
                    if type(b.dcc_types) is not str:
                        raise TypeError("dcc_types must be a str")
                    n = len(b.payloads)
                    if not (
                        len(b.isses) == n
                        and len(b.uvcis) == n
                        and len(b.dcc_types) == n
                        and len(b.signatures) == n
                    ):
                        raise ValueError(
                            f"record {index}: isses, uvcis, dcc_types, payloads and signatures "
                            "of a batch differ in length"
                        )
                    heads.append(self._head(b, index))
                    middles.append(self._middle(b, index))
                    sizes.append(n)
                    index += n
                    isses += b.isses
                    uvcis += b.uvcis
                    payloads += b.payloads
                    signatures += b.signatures
                group, prev = native.audit_issue_groups(
                    heads,
                    middles,
                    sizes,
                    when,
                    alg,
                    isses,
                    uvcis,
                    "".join(b.dcc_types for b in run),
                    payloads,
                    signatures,
                    seq,
                    prev,
                    len(lines),
                )
                lines += group
                seq += len(group)
            first_seq = self._seq
            count = len(lines)
            closing = self._records_in_segment + count >= self._segment_records
            saved = (self._seq, self._prev, self._last_checkpoint)
            self._seq, self._prev = seq, prev
            lines.append(self._checkpoint_line(now, "segment" if closing else None))
            try:
                self._commit(lines)
            except AuditUnavailable:
                self._seq, self._prev, self._last_checkpoint = saved
                raise
            self._records_in_segment += count
            if closing:
                self._rotate()
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
            saved = (self._seq, self._prev, self._last_checkpoint)
            now = _format_time(self._clock())
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
            closing = self._records_in_segment + count >= self._segment_records
            self._seq, self._prev = seq, prev
            # each batch's issue lines arrive joined by newlines: one element of the commit
            try:
                self._commit([*blobs, self._checkpoint_line(now, "segment" if closing else None)])
            except AuditUnavailable:
                self._seq, self._prev, self._last_checkpoint = saved
                raise
            self._records_in_segment += count
            if closing:
                self._rotate()
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
            now = _format_time(self._clock())
            saved = (self._seq, self._prev, self._last_checkpoint)
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
            closing = self._records_in_segment + 1 >= self._segment_records
            checkpoint = self._checkpoint_line(now, "segment" if closing else None)
            try:
                self._commit([line, checkpoint])
            except AuditUnavailable:
                self._seq, self._prev, self._last_checkpoint = saved
                raise
            self._records_in_segment += 1
            if closing:
                self._rotate()
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
                self._compress(plain)
            except (OSError, ValueError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) else str(exc)
                self._compress_error = f"cannot compress {plain.name}: {detail}"
                LOGGER.error("audit log %s: %s", self.directory, self._compress_error)

    def _compress(self, plain: Path) -> None:
        """``.zst.tmp`` written and fsynced, renamed, directory fsynced, plain unlinked."""
        data = plain.read_bytes()
        packed = zstandard.ZstdCompressor(
            level=_ZSTD_LEVEL, write_checksum=True, write_content_size=True
        ).compress(data)
        if _decompress(packed) != data:
            raise ValueError("the compressed copy does not decompress to the segment")
        target = plain.with_name(plain.name + ".zst")
        temporary = plain.with_name(plain.name + ".zst.tmp")
        temporary.unlink(missing_ok=True)
        _create_file(temporary, packed, 0o600, step=FLUSH_STEP)
        os.rename(temporary, target)
        _fsync_dir(self.directory)
        _discard(plain)

    # -- state and closing

    @property
    def head(self) -> tuple[int, str]:
        """``(sequence number, hash)`` of the last entry written."""
        return self._seq - 1, self._prev

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
                self.directory, self._key, segment_records=self._segment_records, clock=self._clock
            )
            if fresh._compressor is not None:  # finish what the fresh log queued (FIFO)
                assert fresh._compress_queue is not None
                fresh._compress_queue.put(None)
                fresh._compressor.join()
                fresh._compressor = fresh._compress_queue = None
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
                _write_all(fd, bytes(REOPEN_HEADROOM))
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
                        self._commit([self._checkpoint_line(_format_time(self._clock()), "close")])
                    except AuditUnavailable:
                        self._seq, self._prev = saved
                        raise
            finally:
                self._closed = True
                self._release()

    def _release(self) -> None:
        if self._compressor is not None:
            assert self._compress_queue is not None
            self._compress_queue.put(None)
            self._compressor.join()
            self._compressor = None
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


class _Raced(Exception):
    """The log changed under the reader (a live log): read again."""


def _read_segment(root: Path, number: int, plain: Path | None, zst: Path | None) -> bytes:
    """The content of a segment; a plain file that vanishes (compressed meanwhile) is read
    from its .zst.

    Raises:
        ValueError: the .zst is damaged.
        _Raced: the segment vanished altogether.
    """
    if zst is None and plain is not None:
        try:
            return plain.read_bytes()
        except FileNotFoundError:
            zst = root / _segment_name(number, compressed=True)
    try:
        packed = zst.read_bytes()  # type: ignore[union-attr]
    except FileNotFoundError:
        raise _Raced from None
    return _decompress(packed)


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
        witnesses: checkpoint lines kept outside the log (:attr:`AuditLog.last_checkpoint`);
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
        public = _PublicKey(pem, str(source))
    else:
        public = _PublicKey(public_key_pem, "the given audit public key")
    witnessed = _parse_witnesses(witnesses, public)
    for attempt in range(3):
        try:
            return _verify_once(root, public, public_key_pem is not None, witnessed, attempt == 2)
        except _Raced:
            time.sleep(0.05)
    raise AuditLogError(f"{root}: the log keeps changing while it is read; try again")


def _verify_once(
    root: Path, public: _PublicKey, pinned: bool, witnessed: dict[int, dict], last_try: bool
) -> VerifyReport:
    chain = _Chain(public, witnessed)
    segments = _list_segments(root)
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
                data = _read_segment(root, number, plain, zst)
                if plain is not None and zst is not None and plain.read_bytes() != data:
                    chain.fail(number, chain.state.next_seq, "plain and .zst copies differ")
            except ValueError as exc:
                chain.fail(number, chain.state.next_seq, f"segment {number}: {exc}")
            except FileNotFoundError:
                pass  # the plain copy was unlinked after the .zst was read: fine
            tail = chain.segment(number, data, final=final)
            if final:
                problem = None
                if not data:
                    problem = f"segment {number} is empty (created when keyd stopped?)"
                elif tail.partial:
                    problem = (
                        f"the log ends in an incomplete entry ({tail.partial} bytes after entry "
                        f"{chain.state.next_seq - 1}): a torn write, or the file was truncated"
                    )
                elif tail.uncovered:
                    problem = (
                        f"{tail.uncovered} entries after the last checkpoint are not covered "
                        "by a signature: a torn write, the checkpoint removed, or entries added"
                    )
                elif tail.last_end == "segment":
                    problem = (
                        f"segment {number + 1} is missing: segment {number} was closed (deleted, "
                        "or keyd stopped while rotating and has not been restarted since)"
                    )
                if problem is not None:
                    grown = plain is not None and zst is None and _size(plain) != len(data)
                    if not last_try and (grown or _list_segments(root) != segments):
                        raise _Raced
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
    except _BreakFound as exc:
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
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _entries(root: Path, needles: Sequence[bytes] = ()) -> Iterator[dict[str, Any]]:
    """Every complete entry in order (no verification); lines lacking any of *needles* (byte
    strings) are skipped without parsing."""
    if not root.is_dir():
        raise AuditLogError(f"{root}: no such audit log directory")
    for number, plain, zst in _list_segments(root):
        try:
            data = _read_segment(root, number, plain, zst)
        except ValueError as exc:
            raise AuditLogError(f"{zst}: segment {number}: {exc}") from None
        except _Raced:
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
                    f"{root / _segment_name(number)}: line {lineno} is not JSON; run "
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
    :func:`verify` for that.

    Raises:
        AuditLogError: no such directory, or an unreadable segment.
    """
    kid_hex = kid.hex() if isinstance(kid, bytes) else (kid.lower() if kid else None)
    low, high = _time_bound(since), _time_bound(until)
    wanted = {"client": client, "account": account, "operator": operator, "kid": kid_hex}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    # canonical JSON lets a byte search skip most lines before parsing them
    needles = [f'"{k}":{encode_basestring(v)}'.encode() for k, v in wanted.items()]
    for entry in _entries(Path(directory), needles):
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
    return [
        Revocation(
            e["seq"],
            e["time"],
            e["kid"],
            e["type"],
            e["rev"]["UCI"],
            e["rev"]["COUNTRYCODEUCI"],
            e["rev"]["SIGNATURE"],
        )
        for e in search(directory, account=account)
    ]
