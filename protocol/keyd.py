"""The engine <-> keyd codec (sans-IO: no sockets, no trio, no engine imports).

keyd is the only holder of private keys. This codec carries the few things the engine may ask
of it -- describe the keys, sign a batch of CWT payloads for one kid on behalf of a client and
an end-user account (``SIGN``), or several such batches for one kid at once (``SIGN_MANY``: the
engine's micro-batch across its portal connections) -- and nothing else: there is no message
that carries a digest to sign or a key to export.

``SIGN_COLUMNS`` (0x23, answered by ``SIGN_COLUMNS_RESULT``, 0x24) is the engine's micro-batch
as columns (:class:`KeydColumns`): all payloads in one byte string with an array of end
offsets, three small string tables (clients, accounts, operators) and per item three indices
into them, however many accounts it mixes. Decoding and encoding it cost a fixed number of
Python operations per message (byte strings and ``array('I')``, no object per payload); keyd's
checks and audit lines run over the columns natively. ``SIGN_MANY`` stays decodable and is
still answered (by ``SIGN_RESULT``): the engine sends ``SIGN_COLUMNS`` since issue 14, part 4;
an engine and keyd of one release always agree.

Bodies of the columns messages (N items; "u32[]" is a byte string of little-endian uint32)::

    SIGN_COLUMNS          kid bstr(8); payloads bstr (all N concatenated); ends u32[N] (end
                          offset of each payload: never decreasing, the last = len(payloads));
                          clients [tstr], accounts [tstr], operators [tstr / null] (each at
                          most max(N, 1) entries, names 1..1024 characters); client_ix,
                          account_ix, operator_ix u32[N] (indices into those tables)
    SIGN_COLUMNS_RESULT   codes bstr(N) (0: signed, else the ItemError); sigs bstr (the signed
                          items' signatures, in item order); sig_ends u32[signed]; reasons
                          [tstr] (one per refused item, in item order)

At most MAX_COLUMN_ITEMS items; a body that breaks any of these rules is refused with a
:class:`KeydProtocolError` naming the field and the rule (:meth:`KeydColumns.check`,
:meth:`ColumnsResult.check`), as is every other malformed frame.

``SIGN_KIDS`` (0x25, answered by ``SIGN_KIDS_RESULT``, 0x26) carries several such batches,
each for another kid, so that a micro-batch mixing DCC types (one kid each) costs keyd one
message and one audit commit rather than one per kid::

    SIGN_KIDS             batches [map] (1..MAX_KID_BATCHES maps, each the body of a
                          SIGN_COLUMNS; kids distinct; at most MAX_COLUMN_ITEMS items in all)
    SIGN_KIDS_RESULT      results [map] (one SIGN_COLUMNS_RESULT body per batch, in order)

keyd answers each batch as it would answer it alone in a SIGN_COLUMNS; the audit records of
all of them become durable in one commit before any signature leaves.

Frame layout (all integers big-endian)::

    offset  size  field
    0       1     magic 0x4B ("K")
    1       1     version (1)
    2       1     message type (MessageType)
    3       1     flags (0; reserved, must be zero)
    4       4     request id: a reply carries the id of its request
    8       4     body length N (at most the connection's max_frame)
    12      N     body: one CBOR map (RFC 8949), keys are short text strings

A frame whose header announces more than ``max_frame`` bytes is refused before its body is
read. Anything malformed raises :class:`KeydProtocolError`; after that the connection is
unusable (the peer closes it).
"""

from __future__ import annotations

import enum
import operator as _op
import struct
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar, NamedTuple

import cbor2

from . import cborlimits
from .sentinels import NEED_DATA, NeedData

__all__ = [
    "DEFAULT_MAX_FRAME",
    "NEED_DATA",
    "ColumnsResult",
    "Connection",
    "Describe",
    "DescribeResult",
    "Failure",
    "ItemError",
    "KeyFacts",
    "KeydColumns",
    "KeydProtocolError",
    "KidsResult",
    "MessageType",
    "PoolStatus",
    "SignColumns",
    "SignKids",
    "SignMany",
    "SignPart",
    "SignPayloads",
    "Signatures",
]

MAGIC = 0x4B
VERSION = 1
HEADER = struct.Struct(">BBBBII")
#: 16 MiB: a micro-batch of 1,000 payloads of the largest size that fits a QR code (~3 KB),
#: five times over. Both sides may lower it.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
#: Containers nested in a body (the body map counts): SIGN_MANY is map, parts, part, payloads.
MAX_DEPTH = 8
#: CBOR data items a body may hold per byte: every message spends several bytes per item (a
#: payload is hundreds), so a body of tiny items is refused after a count, never built.
ITEMS_PER_BYTE = 0.25


class KeydProtocolError(Exception):
    """The bytes on the wire do not follow this codec (or a message is used wrongly)."""


class MessageType(enum.IntEnum):
    DESCRIBE = 0x10
    DESCRIBE_RESULT = 0x11
    SIGN = 0x20
    SIGN_RESULT = 0x21
    SIGN_MANY = 0x22  # answered by SIGN_RESULT: one result per payload, parts in order
    SIGN_COLUMNS = 0x23  # answered by SIGN_COLUMNS_RESULT: one result per item, in order
    SIGN_COLUMNS_RESULT = 0x24
    SIGN_KIDS = 0x25  # answered by SIGN_KIDS_RESULT: one SIGN_COLUMNS batch per kid, in order
    SIGN_KIDS_RESULT = 0x26
    ERROR = 0x7F


class ItemError(enum.IntEnum):
    """Why keyd refused one payload of a batch (it signs the others)."""

    MALFORMED_CWT = 1  # not a CBOR map with the claims 1, 4, 6 and -260 {1: DCC}
    EXP_AFTER_DSC = 2  # exp later than the DSC's notAfter
    IAT_BEFORE_DSC = 3  # iat earlier than the DSC's notBefore
    IAT_IN_FUTURE = 4  # iat later than keyd's clock plus the allowed skew
    EXP_NOT_AFTER_IAT = 5
    TYPE_NOT_ALLOWED = 6  # the DSC's extended key usage does not allow the DCC type
    KID_NOT_ACTIVE = 7  # unknown, retired or disabled kid
    CLIENT_NOT_ALLOWED = 8  # this client may not use this kid
    AUDIT_UNAVAILABLE = 9  # the audit log cannot be written: nothing is signed (retryable)
    INTERNAL = 10
    INVALID_DCC = 11  # the DCC fails full validation (unless keyd runs with --no-validate-dcc)
    TOO_LARGE_FOR_QR = 12  # the payload is too long for its HC1 string to fit a QR code


#: Item errors a caller may retry unchanged (the condition is keyd's, not the request's).
RETRYABLE = frozenset({ItemError.AUDIT_UNAVAILABLE, ItemError.INTERNAL})


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """Counts of a key's nonce pool in keyd (never an entry): what the engine exports."""

    capacity: int
    level: int  # entries ready now
    refilled: int  # entries ever computed and added
    spent: int  # signatures made with an entry
    misses: int  # signatures that found the pool empty (signed the ordinary way)


_POOL_FIELDS = ("capacity", "level", "refilled", "spent", "misses")


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """Public facts of one key (never private material)."""

    kid: bytes
    alg: int
    usages: tuple[str, ...]
    state: str
    dsc: bytes  # DER
    pool: PoolStatus | None = None  # the key has a nonce pool (software ES256 keys only)


@dataclass(frozen=True, slots=True)
class Describe:
    TYPE: ClassVar[MessageType] = MessageType.DESCRIBE
    request_id: int


@dataclass(frozen=True, slots=True)
class DescribeResult:
    """The keys, and whether keyd can sign at all: *audit* is None while its audit log
    commits, else why it cannot (keyd then refuses every payload with AUDIT_UNAVAILABLE and
    retries the log by itself). Optional on the wire (``"audit"``, text, absent when None):
    peers that do not know it ignore it."""

    TYPE: ClassVar[MessageType] = MessageType.DESCRIBE_RESULT
    request_id: int
    keys: tuple[KeyFacts, ...]
    audit: str | None = None


@dataclass(frozen=True, slots=True)
class SignPayloads:
    """Sign each CWT payload with *kid* for *client* / *account* (acting: *operator*)."""

    TYPE: ClassVar[MessageType] = MessageType.SIGN
    request_id: int
    kid: bytes
    client: str
    account: str
    payloads: tuple[bytes, ...]
    operator: str | None = None


@dataclass(frozen=True, slots=True)
class SignPart:
    """The payloads of one client / account / operator inside a :class:`SignMany`."""

    client: str
    account: str
    payloads: tuple[bytes, ...]
    operator: str | None = None


@dataclass(frozen=True, slots=True)
class SignMany:
    """Several :class:`SignPayloads` requests for one *kid* in one message.

    Each part is checked, allowed and audited under its own client / account / operator,
    exactly as if it had come alone; the reply is one :class:`Signatures` whose results run
    over the parts' payloads in order. What it saves is per-message work: one frame, one
    pass through the signing threads, one audit commit (one fsync) for all parts.
    """

    TYPE: ClassVar[MessageType] = MessageType.SIGN_MANY
    request_id: int
    kid: bytes
    parts: tuple[SignPart, ...]


@dataclass(frozen=True, slots=True)
class Signatures:
    """One entry per payload, in order: the signature, or ``(ItemError, reason)``."""

    TYPE: ClassVar[MessageType] = MessageType.SIGN_RESULT
    request_id: int
    results: tuple[bytes | tuple[ItemError, str], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Failure:
    """The whole request failed (e.g. keyd is stopping); ``retryable`` says if a retry may work."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    request_id: int
    message: str
    retryable: bool


# ----------------------------------------------------------------------------- columns

#: Items one SIGN_COLUMNS (or its result) may carry. The engine's micro-batch is 512 by default;
#: the frame limit and the CBOR item count bound a message as well.
MAX_COLUMN_ITEMS = 65_536
#: Longest client, account or operator name (characters): identifiers, not documents (the
#: audit log refuses longer ones too).
MAX_TEXT = 1024
#: Batches (kids) one SIGN_KIDS may carry: a keystore has a key or two per DCC type.
MAX_KID_BATCHES = 64
_U32 = "I"
if array(_U32).itemsize != 4:  # pragma: no cover - every platform CPython supports today
    raise ImportError("array('I') is not 32 bits on this platform")
_SWAP = sys.byteorder != "little"  # the wire is little-endian, like every host we run on
_NONE_TYPE = type(None)


def _u32_from(data: bytes, what: str) -> array:
    """A little-endian uint32 column from the wire (one call, no object per item)."""
    if len(data) % 4:
        raise KeydProtocolError(f"{what}: length {len(data)} is not a multiple of 4")
    out = array(_U32)
    out.frombytes(data)
    if _SWAP:  # pragma: no cover - big-endian hosts
        out.byteswap()
    return out


def _u32_wire(column: array) -> bytes:
    if _SWAP:  # pragma: no cover - big-endian hosts
        column = array(_U32, column)
        column.byteswap()
    return column.tobytes()


def _monotone(column: array) -> bool:
    """Every value >= the one before it (C-level iteration: no bytecode per item)."""
    return all(map(_op.le, column, islice(column, 1, None)))


def _split(buf: bytes, ends: array) -> list[bytes]:
    """The pieces of *buf* that end at *ends* (the first starts at 0)."""
    if not ends:
        return []
    return [buf[: ends[0]], *map(buf.__getitem__, map(slice, ends, islice(ends, 1, None)))]


def _rebased(column: array, base: int) -> array:
    return array(_U32, map(base.__add__, column)) if base else column


@dataclass(frozen=True, slots=True)
class KeydColumns:
    """A batch of CWT payloads for one kid, as columns (what SIGN_COLUMNS carries).

    Item i is ``payloads[ends[i-1]:ends[i]]`` (the first starts at 0), signed for
    ``clients[client_ix[i]]`` / ``accounts[account_ix[i]]``, acting
    ``operators[operator_ix[i]]`` (an entry may be None: no operator). The tables hold each
    name once, however many items use it; the index columns are ``array('I')``.

    Build one with :meth:`from_parts` (or directly), merge several with :meth:`concat`.
    :meth:`check` states the rules every received batch must follow.
    """

    payloads: bytes
    ends: array
    clients: tuple[str, ...]
    accounts: tuple[str, ...]
    operators: tuple[str | None, ...]
    client_ix: array
    account_ix: array
    operator_ix: array

    def __len__(self) -> int:
        return len(self.ends)

    @classmethod
    def from_parts(cls, parts: Sequence[SignPart]) -> KeydColumns:
        """The columns of *parts* (in order; each distinct name once in its table)."""
        tables: tuple[dict[Any, int], dict[Any, int], dict[Any, int]] = ({}, {}, {})
        ixs = (array(_U32), array(_U32), array(_U32))
        ends = array(_U32)
        chunks: list[bytes] = []
        size = 0
        for part in parts:
            n = len(part.payloads)
            for table, ix, name in zip(
                tables, ixs, (part.client, part.account, part.operator), strict=True
            ):
                ix.extend([table.setdefault(name, len(table))] * n)
            for payload in part.payloads:
                size += len(payload)
                ends.append(size)
            chunks += part.payloads
        return cls(
            b"".join(chunks), ends, tuple(tables[0]), tuple(tables[1]), tuple(tables[2]), *ixs
        )

    @classmethod
    def concat(cls, batches: Sequence[KeydColumns]) -> KeydColumns:
        """One batch of *batches* in order: payloads and tables concatenated, offsets and
        indices rebased (a fixed number of calls per batch, none per item)."""
        if len(batches) == 1:
            return batches[0]
        ends, cix, aix, oix = array(_U32), array(_U32), array(_U32), array(_U32)
        clients: list[str] = []
        accounts: list[str] = []
        operators: list[str | None] = []
        size = 0
        for b in batches:
            ends += _rebased(b.ends, size)
            cix += _rebased(b.client_ix, len(clients))
            aix += _rebased(b.account_ix, len(accounts))
            oix += _rebased(b.operator_ix, len(operators))
            clients += b.clients
            accounts += b.accounts
            operators += b.operators
            size += len(b.payloads)
        return cls(
            b"".join(b.payloads for b in batches),
            ends,
            tuple(clients),
            tuple(accounts),
            tuple(operators),
            cix,
            aix,
            oix,
        )

    def payload_list(self) -> list[bytes]:
        """The payloads as separate byte strings (an object per item: for callers that need
        them so, e.g. ``hc1_encode``)."""
        return _split(self.payloads, self.ends)

    def parts(self) -> Iterator[SignPart]:
        """The batch as :class:`SignPart` runs (consecutive items that share client, account
        and operator): the old message's view, for peers and tests that use it."""
        payloads = self.payload_list()
        triples = list(zip(self.client_ix, self.account_ix, self.operator_ix, strict=True))
        start = 0
        while start < len(triples):
            end = start + 1
            while end < len(triples) and triples[end] == triples[start]:
                end += 1
            c, a, o = triples[start]
            yield SignPart(
                self.clients[c], self.accounts[a], tuple(payloads[start:end]), self.operators[o]
            )
            start = end

    def check(self, what: str = "SIGN_COLUMNS") -> None:
        """Raise :class:`KeydProtocolError` naming the first rule this batch breaks: at most
        MAX_COLUMN_ITEMS items; every index column as long as ``ends``; ends monotone, the
        last one the payloads' length; every index within its table; tables no longer than
        the item count (at least one entry allowed), clients and accounts text, operators
        text or null, every name 1..MAX_TEXT characters. A fixed number of C-level passes:
        no bytecode per item."""
        n = len(self.ends)
        if n > MAX_COLUMN_ITEMS:
            raise KeydProtocolError(f"{what}: {n} items; at most {MAX_COLUMN_ITEMS}")
        for name in ("client_ix", "account_ix", "operator_ix"):
            if len(getattr(self, name)) != n:
                raise KeydProtocolError(
                    f"{what}: {name} has {len(getattr(self, name))} entries for {n} items"
                )
        if n:
            if self.ends[-1] != len(self.payloads):
                raise KeydProtocolError(
                    f"{what}: the last end offset {self.ends[-1]} is not the payloads' length "
                    f"{len(self.payloads)}"
                )
            if not _monotone(self.ends):
                raise KeydProtocolError(f"{what}: end offsets must not decrease")
        elif self.payloads:
            raise KeydProtocolError(f"{what}: payload bytes without items")
        for name, table, ix, kinds in (
            ("clients", self.clients, self.client_ix, {str}),
            ("accounts", self.accounts, self.account_ix, {str}),
            ("operators", self.operators, self.operator_ix, {str, _NONE_TYPE}),
        ):
            if len(table) > max(n, 1):
                raise KeydProtocolError(f"{what}: {len(table)} {name} for {n} items")
            if not set(map(type, table)) <= kinds:
                raise KeydProtocolError(
                    f"{what}: {name} must be text" + (" or null" if _NONE_TYPE in kinds else "")
                )
            texts = table if _NONE_TYPE not in kinds else [t for t in table if t is not None]
            if texts and not (min(map(len, texts)) >= 1 and max(map(len, texts)) <= MAX_TEXT):
                raise KeydProtocolError(
                    f"{what}: every name in {name} must be 1 to {MAX_TEXT} characters"
                )
            if n and max(ix) >= len(table):
                raise KeydProtocolError(f"{what}: an index into {name} is out of range")


@dataclass(frozen=True, slots=True)
class SignColumns:
    """Sign the items of *columns* with *kid*; each under its own client, account and
    operator, exactly as if it had come alone in a :class:`SignPayloads`."""

    TYPE: ClassVar[MessageType] = MessageType.SIGN_COLUMNS
    request_id: int
    kid: bytes
    columns: KeydColumns


#: Codes of a columns result: 0 (signed) or an ItemError.
SIGNED = 0
_RESULT_CODES = frozenset({SIGNED, *ItemError})


@dataclass(frozen=True, slots=True)
class ColumnsResult:
    """keyd's answer to :class:`SignColumns`, as columns: per item a code (``SIGNED``, 0, or
    an :class:`ItemError`); the signatures of the signed items concatenated in item order
    with their end offsets; the reasons of the refused items, in item order."""

    TYPE: ClassVar[MessageType] = MessageType.SIGN_COLUMNS_RESULT
    request_id: int
    codes: bytes
    signatures: bytes = b""
    sig_ends: array = field(default_factory=lambda: array(_U32))
    reasons: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.codes)

    @classmethod
    def refuse_all(cls, request_id: int, n: int, code: ItemError, reason: str) -> ColumnsResult:
        return cls(request_id, bytes([code]) * n, reasons=(reason,) * n)

    @classmethod
    def from_results(
        cls, request_id: int, results: Sequence[bytes | tuple[ItemError, str]]
    ) -> ColumnsResult:
        """The columns of per-item results (an object per item: for tests and fakes)."""
        codes = bytearray(len(results))
        sigs: list[bytes] = []
        ends = array(_U32)
        reasons: list[str] = []
        size = 0
        for i, r in enumerate(results):
            if isinstance(r, bytes):
                sigs.append(r)
                size += len(r)
                ends.append(size)
            else:
                codes[i] = int(r[0])
                reasons.append(r[1])
        return cls(request_id, bytes(codes), b"".join(sigs), ends, tuple(reasons))

    def signature_list(self) -> list[bytes]:
        """The signatures of the signed items, in item order."""
        return _split(self.signatures, self.sig_ends)

    def results(self) -> list[bytes | tuple[ItemError, str]]:
        """Per item, in order: its signature or ``(ItemError, reason)`` (an object per item)."""
        sigs = iter(self.signature_list())
        reasons = iter(self.reasons)
        return [
            next(sigs) if code == SIGNED else (ItemError(code), next(reasons))
            for code in self.codes
        ]

    def check(self) -> None:
        """Raise :class:`KeydProtocolError` naming the first rule this result breaks."""
        what = "SIGN_COLUMNS_RESULT"
        n = len(self.codes)
        if n > MAX_COLUMN_ITEMS:
            raise KeydProtocolError(f"{what}: {n} items; at most {MAX_COLUMN_ITEMS}")
        if not set(self.codes) <= _RESULT_CODES:
            raise KeydProtocolError(f"{what}: unknown item error in codes")
        signed = self.codes.count(SIGNED)
        if len(self.sig_ends) != signed:
            raise KeydProtocolError(
                f"{what}: {len(self.sig_ends)} signature ends for {signed} signed items"
            )
        if (self.sig_ends[-1] if signed else 0) != len(self.signatures):
            raise KeydProtocolError(f"{what}: signature ends do not cover the signatures")
        if not _monotone(self.sig_ends):
            raise KeydProtocolError(f"{what}: signature end offsets must not decrease")
        if len(self.reasons) != n - signed:
            raise KeydProtocolError(
                f"{what}: {len(self.reasons)} reasons for {n - signed} refused items"
            )
        if not set(map(type, self.reasons)) <= {str}:
            raise KeydProtocolError(f"{what}: reasons must be text")


@dataclass(frozen=True, slots=True)
class SignKids:
    """Several :class:`SignColumns` batches in one message, each for another kid (their own
    request ids are not sent: 0). keyd answers with :class:`KidsResult`."""

    TYPE: ClassVar[MessageType] = MessageType.SIGN_KIDS
    request_id: int
    batches: tuple[SignColumns, ...]

    def __len__(self) -> int:
        """Items over all batches."""
        return sum(len(b.columns) for b in self.batches)

    def check(self) -> None:
        """Raise :class:`KeydProtocolError` naming the first rule this message breaks: 1 to
        MAX_KID_BATCHES batches, distinct kids of 8 bytes, at most MAX_COLUMN_ITEMS items in
        all, and every batch's own rules (:meth:`KeydColumns.check`)."""
        what = "SIGN_KIDS"
        if not 1 <= len(self.batches) <= MAX_KID_BATCHES:
            raise KeydProtocolError(f"{what}: {len(self.batches)} batches; 1 to {MAX_KID_BATCHES}")
        kids = [b.kid for b in self.batches]
        if not all(type(k) is bytes and len(k) == 8 for k in kids):
            raise KeydProtocolError(f"{what}: kid must be 8 bytes")
        if len(set(kids)) != len(kids):
            raise KeydProtocolError(f"{what}: a kid appears in two batches")
        if len(self) > MAX_COLUMN_ITEMS:
            raise KeydProtocolError(f"{what}: {len(self)} items; at most {MAX_COLUMN_ITEMS}")
        for b in self.batches:
            b.columns.check(what)


@dataclass(frozen=True, slots=True)
class KidsResult:
    """keyd's answer to :class:`SignKids`: one :class:`ColumnsResult` per batch, in order
    (their own request ids are 0)."""

    TYPE: ClassVar[MessageType] = MessageType.SIGN_KIDS_RESULT
    request_id: int
    results: tuple[ColumnsResult, ...]

    def check(self) -> None:
        """Raise :class:`KeydProtocolError` naming the first rule this result breaks."""
        if not 1 <= len(self.results) <= MAX_KID_BATCHES:
            raise KeydProtocolError(
                f"SIGN_KIDS_RESULT: {len(self.results)} results; 1 to {MAX_KID_BATCHES}"
            )
        if sum(map(len, self.results)) > MAX_COLUMN_ITEMS:
            raise KeydProtocolError(f"SIGN_KIDS_RESULT: more than {MAX_COLUMN_ITEMS} items")
        for r in self.results:
            r.check()


Message = (
    Describe
    | DescribeResult
    | SignPayloads
    | SignMany
    | Signatures
    | Failure
    | SignColumns
    | ColumnsResult
    | SignKids
    | KidsResult
)


def _columns_body(kid: bytes, c: KeydColumns) -> dict[str, Any]:
    return {
        "kid": kid,
        "payloads": c.payloads,
        "ends": _u32_wire(c.ends),
        "clients": list(c.clients),
        "accounts": list(c.accounts),
        "operators": list(c.operators),
        "client_ix": _u32_wire(c.client_ix),
        "account_ix": _u32_wire(c.account_ix),
        "operator_ix": _u32_wire(c.operator_ix),
    }


def _result_body(r: ColumnsResult) -> dict[str, Any]:
    return {
        "codes": r.codes,
        "sigs": r.signatures,
        "sig_ends": _u32_wire(r.sig_ends),
        "reasons": list(r.reasons),
    }


def _part_body(client: str, account: str, operator: str | None, payloads: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"client": client, "account": account, "payloads": list(payloads)}
    if operator is not None:
        body["operator"] = operator
    return body


def _write_describe(msg: Describe) -> dict[str, Any]:
    return {}


def _key_body(k: KeyFacts) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kid": k.kid,
        "alg": k.alg,
        "usages": list(k.usages),
        "state": k.state,
        "dsc": k.dsc,
    }
    if k.pool is not None:
        body["pool"] = {f: getattr(k.pool, f) for f in _POOL_FIELDS}
    return body


def _write_describe_result(msg: DescribeResult) -> dict[str, Any]:
    body: dict[str, Any] = {"keys": [_key_body(k) for k in msg.keys]}
    if msg.audit is not None:
        body["audit"] = msg.audit
    return body


def _write_sign(msg: SignPayloads) -> dict[str, Any]:
    return {"kid": msg.kid, **_part_body(msg.client, msg.account, msg.operator, msg.payloads)}


def _write_sign_many(msg: SignMany) -> dict[str, Any]:
    return {
        "kid": msg.kid,
        "parts": [_part_body(p.client, p.account, p.operator, p.payloads) for p in msg.parts],
    }


def _write_sign_columns(msg: SignColumns) -> dict[str, Any]:
    return _columns_body(msg.kid, msg.columns)


def _write_sign_kids(msg: SignKids) -> dict[str, Any]:
    return {"batches": [_columns_body(b.kid, b.columns) for b in msg.batches]}


def _write_kids_result(msg: KidsResult) -> dict[str, Any]:
    return {"results": [_result_body(r) for r in msg.results]}


def _write_sign_result(msg: Signatures) -> dict[str, Any]:
    return {"results": [r if isinstance(r, bytes) else [int(r[0]), r[1]] for r in msg.results]}


def _write_error(msg: Failure) -> dict[str, Any]:
    return {"message": msg.message, "retryable": msg.retryable}


def _want(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise KeydProtocolError(f"{what}: field {key!r} missing or of the wrong type")
    return value


def _kid(body: dict[str, Any], what: str) -> bytes:
    kid = _want(body, "kid", bytes, what)
    if len(kid) != 8:
        raise KeydProtocolError(f"{what}: kid must be 8 bytes")
    return kid


def _parse_part(body: dict[str, Any], what: str) -> SignPart:
    payloads = _want(body, "payloads", list, what)
    if not all(isinstance(p, bytes) for p in payloads):
        raise KeydProtocolError(f"{what}: every payload must be a byte string")
    operator = body.get("operator")
    if operator is not None and not isinstance(operator, str):
        raise KeydProtocolError(f"{what}: operator must be text")
    return SignPart(
        _want(body, "client", str, what),
        _want(body, "account", str, what),
        tuple(payloads),
        operator,
    )


def _parse_columns(body: dict[str, Any], what: str) -> KeydColumns:
    """The columns of a SIGN_COLUMNS body (not yet checked: the caller runs ``check``)."""
    return KeydColumns(
        _want(body, "payloads", bytes, what),
        _u32_from(_want(body, "ends", bytes, what), "ends"),
        tuple(_want(body, "clients", list, what)),
        tuple(_want(body, "accounts", list, what)),
        tuple(_want(body, "operators", list, what)),
        _u32_from(_want(body, "client_ix", bytes, what), "client_ix"),
        _u32_from(_want(body, "account_ix", bytes, what), "account_ix"),
        _u32_from(_want(body, "operator_ix", bytes, what), "operator_ix"),
    )


def _parse_result(request_id: int, body: dict[str, Any], what: str) -> ColumnsResult:
    """A SIGN_COLUMNS_RESULT body (not yet checked)."""
    return ColumnsResult(
        request_id,
        _want(body, "codes", bytes, what),
        _want(body, "sigs", bytes, what),
        _u32_from(_want(body, "sig_ends", bytes, what), "sig_ends"),
        tuple(_want(body, "reasons", list, what)),
    )


def _pool(body: Any) -> PoolStatus | None:
    if body is None:
        return None
    if not isinstance(body, dict):
        raise KeydProtocolError("key: pool must be a map")
    counts = []
    for name in _POOL_FIELDS:
        value = _want(body, name, int, "key pool")
        if value < 0:
            raise KeydProtocolError(f"key pool: {name} must not be negative")
        counts.append(value)
    return PoolStatus(*counts)


def _read_describe(request_id: int, body: dict[str, Any]) -> Describe:
    return Describe(request_id)


def _read_key(item: Any) -> KeyFacts:
    if not isinstance(item, dict):
        raise KeydProtocolError("DESCRIBE_RESULT: a key entry is not a map")
    usages = _want(item, "usages", list, "key")
    if not all(isinstance(u, str) for u in usages):
        raise KeydProtocolError("key: usages must be text")
    return KeyFacts(
        _want(item, "kid", bytes, "key"),
        _want(item, "alg", int, "key"),
        tuple(usages),
        _want(item, "state", str, "key"),
        _want(item, "dsc", bytes, "key"),
        _pool(item.get("pool")),
    )


def _read_describe_result(request_id: int, body: dict[str, Any]) -> DescribeResult:
    keys = tuple(_read_key(item) for item in _want(body, "keys", list, "DESCRIBE_RESULT"))
    audit = body.get("audit")
    if audit is not None and not isinstance(audit, str):
        raise KeydProtocolError("DESCRIBE_RESULT: audit must be text")
    return DescribeResult(request_id, keys, audit)


def _read_sign(request_id: int, body: dict[str, Any]) -> SignPayloads:
    part = _parse_part(body, "SIGN")
    return SignPayloads(
        request_id, _kid(body, "SIGN"), part.client, part.account, part.payloads, part.operator
    )


def _maps(body: dict[str, Any], key: str, what: str, entry: str) -> list[dict[str, Any]]:
    """The list of maps in field *key* (each an *entry*, for the error message)."""
    values = _want(body, key, list, what)
    if not all(isinstance(v, dict) for v in values):
        raise KeydProtocolError(f"{what}: a {entry} is not a map")
    return values  # type: ignore[no-any-return]


def _read_sign_many(request_id: int, body: dict[str, Any]) -> SignMany:
    parts = _maps(body, "parts", "SIGN_MANY", "part")
    return SignMany(
        request_id, _kid(body, "SIGN_MANY"), tuple(_parse_part(p, "SIGN_MANY") for p in parts)
    )


def _read_sign_columns(request_id: int, body: dict[str, Any]) -> SignColumns:
    columns = _parse_columns(body, "SIGN_COLUMNS")
    columns.check("SIGN_COLUMNS")
    return SignColumns(request_id, _kid(body, "SIGN_COLUMNS"), columns)


def _read_columns_result(request_id: int, body: dict[str, Any]) -> ColumnsResult:
    result = _parse_result(request_id, body, "SIGN_COLUMNS_RESULT")
    result.check()
    return result


def _read_sign_kids(request_id: int, body: dict[str, Any]) -> SignKids:
    batches = _maps(body, "batches", "SIGN_KIDS", "batch")
    kids = SignKids(request_id, tuple(
        SignColumns(0, _kid(b, "SIGN_KIDS"), _parse_columns(b, "SIGN_KIDS")) for b in batches
    ))  # fmt: skip
    kids.check()
    return kids


def _read_kids_result(request_id: int, body: dict[str, Any]) -> KidsResult:
    results = _maps(body, "results", "SIGN_KIDS_RESULT", "result")
    answer = KidsResult(request_id, tuple(_parse_result(0, r, "SIGN_KIDS_RESULT") for r in results))
    answer.check()
    return answer


def _read_one_result(r: Any) -> bytes | tuple[ItemError, str]:
    if isinstance(r, bytes):
        return r
    if isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], str):
        try:
            return ItemError(r[0]), r[1]
        except ValueError:
            raise KeydProtocolError(f"SIGN_RESULT: unknown item error {r[0]}") from None
    raise KeydProtocolError("SIGN_RESULT: a result is neither a signature nor an error")


def _read_sign_result(request_id: int, body: dict[str, Any]) -> Signatures:
    results = _want(body, "results", list, "SIGN_RESULT")
    return Signatures(request_id, tuple(_read_one_result(r) for r in results))


def _read_error(request_id: int, body: dict[str, Any]) -> Failure:
    return Failure(
        request_id, _want(body, "message", str, "ERROR"), _want(body, "retryable", bool, "ERROR")
    )


class _Body(NamedTuple):
    """How one message type's body is read and written."""

    message: type
    read: Callable[[int, dict[str, Any]], Message]
    write: Callable[[Any], dict[str, Any]]


#: Every message type's body: its class, its reader and its writer, side by side.
_BODIES: dict[MessageType, _Body] = {
    MessageType.DESCRIBE: _Body(Describe, _read_describe, _write_describe),
    MessageType.DESCRIBE_RESULT: _Body(
        DescribeResult, _read_describe_result, _write_describe_result
    ),
    MessageType.SIGN: _Body(SignPayloads, _read_sign, _write_sign),
    MessageType.SIGN_RESULT: _Body(Signatures, _read_sign_result, _write_sign_result),
    MessageType.SIGN_MANY: _Body(SignMany, _read_sign_many, _write_sign_many),
    MessageType.SIGN_COLUMNS: _Body(SignColumns, _read_sign_columns, _write_sign_columns),
    MessageType.SIGN_COLUMNS_RESULT: _Body(ColumnsResult, _read_columns_result, _result_body),
    MessageType.SIGN_KIDS: _Body(SignKids, _read_sign_kids, _write_sign_kids),
    MessageType.SIGN_KIDS_RESULT: _Body(KidsResult, _read_kids_result, _write_kids_result),
    MessageType.ERROR: _Body(Failure, _read_error, _write_error),
}
_WRITERS = {body.message: body.write for body in _BODIES.values()}


def _body(msg: Message) -> dict[str, Any]:
    write = _WRITERS.get(type(msg))
    if write is None:
        raise KeydProtocolError(f"not a keyd message: {type(msg).__name__}")
    return write(msg)


def _parse(mtype: int, request_id: int, body: Any) -> Message:
    if not isinstance(body, dict):
        raise KeydProtocolError("the body is not a CBOR map")
    try:
        kind = MessageType(mtype)
    except ValueError:
        raise KeydProtocolError(f"unknown message type 0x{mtype:02x}") from None
    return _BODIES[kind].read(request_id, body)


# ----------------------------------------------------------------------------- connection


class Connection:
    """Frames in, messages out, and back: one per peer, no I/O.

    ``receive_data(b"")`` means the peer closed; :meth:`next_event` then raises
    :class:`KeydProtocolError` if a frame was cut off, and returns ``None`` at a clean end.
    """

    def __init__(
        self, max_frame: int = DEFAULT_MAX_FRAME, *, scan: cborlimits.Scan = cborlimits.scan
    ) -> None:
        """*scan* counts a body's data items before it is decoded (``native.cbor_scan`` is
        the fast one; keyd and the engine pass it)."""
        if not 0 < max_frame <= 0xFFFFFFFF:
            raise ValueError("max_frame must be 1..2^32-1")
        self.max_frame = max_frame
        self._scan = scan
        self._buf = bytearray()
        self._closed = False

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            raise KeydProtocolError("data after the end of the stream")
        if not data:
            self._closed = True
        self._buf += data

    def next_event(self) -> Message | NeedData | None:
        buf = self._buf
        if len(buf) < HEADER.size:
            if self._closed:
                if buf:
                    raise KeydProtocolError("the stream ended inside a frame header")
                return None
            return NEED_DATA
        magic, version, mtype, flags, request_id, length = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise KeydProtocolError(f"bad magic 0x{magic:02x}: not a keyd frame")
        if version != VERSION:
            raise KeydProtocolError(f"unsupported keyd protocol version {version}")
        if flags:
            raise KeydProtocolError("reserved flags must be zero")
        if length > self.max_frame:
            # Refused before the body is read (or buffered).
            raise KeydProtocolError(f"frame of {length} bytes exceeds the limit {self.max_frame}")
        end = HEADER.size + length
        if len(buf) < end:
            if self._closed:
                raise KeydProtocolError("the stream ended inside a frame body")
            return NEED_DATA
        raw = bytes(buf[HEADER.size : end])
        del buf[:end]
        try:
            body = cborlimits.decode(
                raw,
                scan=self._scan,
                max_items=64 + int(len(raw) * ITEMS_PER_BYTE),
                max_depth=MAX_DEPTH,
            )
        except ValueError as exc:
            raise KeydProtocolError(f"the body is not valid CBOR for keyd: {exc}") from None
        return _parse(mtype, request_id, body)

    def send(self, msg: Message) -> bytes:
        """The frame for *msg*."""
        if not 0 <= msg.request_id <= 0xFFFFFFFF:
            raise KeydProtocolError("request id must fit 32 bits")
        if isinstance(msg, SignColumns):
            msg.columns.check()  # never send what the peer must refuse
        elif isinstance(msg, ColumnsResult | SignKids | KidsResult):
            msg.check()
        body = cbor2.dumps(_body(msg))
        if len(body) > self.max_frame:
            raise KeydProtocolError(
                f"frame of {len(body)} bytes exceeds the limit {self.max_frame}"
            )
        return HEADER.pack(MAGIC, VERSION, msg.TYPE, 0, msg.request_id, len(body)) + body
