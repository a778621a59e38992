"""The portal <-> engine codec (sans-IO: no sockets, no trio, no engine imports).

A portal backend (the client) connects to the engine (the server) over TCP+TLS or a Unix
socket, says HELLO, gets WELCOME, and then sends DCCs to be signed; the engine answers with
``HC1:`` strings. This module turns bytes into events and events into bytes, and enforces
everything about the exchange that can be checked without knowing the engine: the framing,
the handshake, which side may send what, request-id order, compression, and the types and
limits of every body field. ``protocol/SPEC.md`` is the normative description (written so a
client can be built from it alone); this docstring is the summary.

Frame layout (all integers big-endian)::

    offset  size  field
    0       2     magic b"DC"
    2       1     version (1)
    3       1     frame type (FrameType)
    4       1     flags: bit 0 = the body is zstandard-compressed; other bits must be 0
    5       3     reserved, must be zero
    8       4     request id (uint32): a reply carries its request's id; 0 only on
                  connection-level frames (HELLO, WELCOME, GOAWAY, connection-level ERROR)
    12      4     body length N (uint32; the compressed length if bit 0 is set)
    16      N     body: exactly one CBOR item, a map with short text keys

A header announcing more than :attr:`Connection.max_frame` bytes is refused as soon as its 16
bytes are parsed, before the body arrives. A compressed body must declare its decompressed
size, which must not exceed ``max_frame`` either.

Usage (h11 style)::

    conn = Connection(SERVER)
    conn.receive_data(data)                  # b"" when the peer closed
    while (event := conn.next_event()) is not NEED_DATA:
        if event is None:                    # the peer closed cleanly
            break
        ...
        out = conn.send(reply_event)         # bytes to write

Bad bytes from the peer raise :class:`RemoteProtocolError` (the connection is then in state
ERROR and :meth:`Connection.error_frame` gives a last ERROR frame to send before closing);
sending something invalid raises :class:`LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cbor2
import zstandard

from . import cborlimits
from .codes import RETRYABLE, ErrorCode
from .sentinels import NEED_DATA, NeedData

__all__ = [
    "CLIENT",
    "COMPRESS_THRESHOLD",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "MIN_MAX_FRAME",
    "NEED_DATA",
    "RETRYABLE",
    "SERVER",
    "SUPPORTED_COMPRESSION",
    "SUPPORTED_VERSIONS",
    "BodyError",
    "Connection",
    "Error",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameType",
    "GoAway",
    "Hello",
    "ItemResult",
    "KeyInfo",
    "Keys",
    "ListKeys",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "RemoteProtocolError",
    "Role",
    "Sign",
    "SignBatch",
    "SignBatchResult",
    "SignItem",
    "SignResult",
    "State",
    "Welcome",
    "WireProtocolError",
    "body_item_limit",
]

MAGIC = b"DC"
VERSION = 1
#: Protocol versions this codec speaks (HELLO ``versions``, WELCOME ``version``).
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
#: Compression algorithms this codec implements (HELLO ``compression``).
SUPPORTED_COMPRESSION: tuple[str, ...] = ("zstd",)

#: magic, version, type, flags (top byte) + reserved (low 3 bytes), request id, body length
HEADER = struct.Struct(">2sBBIII")
HEADER_SIZE = HEADER.size  # 16
FLAG_ZSTD = 0x01

#: The smallest max_frame either side may offer, and the limit until the handshake is done.
MIN_MAX_FRAME = 64 * 1024
#: What :meth:`Connection.make_hello` offers and a server accepts unless told otherwise.
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
UINT32_MAX = 0xFFFFFFFF
#: SIGN_BATCH / SIGN_BATCH_RESULT bodies longer than this are sent compressed (if negotiated).
COMPRESS_THRESHOLD = 1024
#: zstd level of compressed bodies. Level 1: on a SIGN_BATCH_RESULT of 50 HC1s it is within
#: 1 % of level 3's size at about 0.6 of its CPU (bench/README.md), and the engine
#: compresses every reply on its event loop.
ZSTD_LEVEL = 1
#: Containers nested in one body (the body map counts); deeper bodies are refused.
MAX_DEPTH = 16
#: Containers nested in one DCC (its own map counts); what a client checks before sending.
DCC_MAX_DEPTH = 12
#: CBOR data items one SIGN_BATCH item or result may account for in a body (a DCC item holds
#: about 40-60: every key, value and container counts). See :func:`body_item_limit`.
ITEMS_PER_BATCH_ENTRY = 256
#: ... and one KEYS entry (a key map holds 15).
ITEMS_PER_KEY = 16
#: ... and everything else in a body (HELLO, the body map, ERROR fields).
ITEMS_BASE = 64

MAX_TEXT = 256  # account, operator, agent, server
MAX_MESSAGE = 1024  # ERROR message, result message, GOAWAY reason
MAX_HC1 = 8192
MAX_IDEMPOTENCY_KEY = 64  # bytes (UTF-8 bytes for a text key)
MAX_VALIDITY_DAYS = 3650
MAX_PING_DATA = 64
MAX_DSC = 65536
MAX_KEYS = 1024
MAX_STATE = 32
MAX_LIST = 16  # HELLO versions and compression entries
MAX_ALG_NAME = 32
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
KID_SIZE = 8


# ----------------------------------------------------------------------------- errors


class WireProtocolError(Exception):
    """The exchange broke the protocol. ``code`` is the :class:`ErrorCode` to report.

    ``request_id`` is the id of the frame concerned when there is one (else 0). Only its two
    kinds are raised, which say who broke it (as in h11): :class:`LocalProtocolError` (we) and
    :class:`RemoteProtocolError` (the peer); catch this class to handle both.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL, request_id: int = 0):
        if type(self) is WireProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not the base")
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class LocalProtocolError(WireProtocolError):
    """We tried to send something invalid, or used the API wrongly. Nothing was sent."""


class RemoteProtocolError(WireProtocolError):
    """The peer sent bytes that break the protocol. The connection is now unusable."""


class _Invalid(Exception):
    """A body check failed; turned into the Local or Remote error by the caller."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


class BodyError(_Invalid):
    """A request body broke a framing rule, found by a body walker that reads the bytes
    without decoding them (``dccsign.native.walk_sign_batch``): the same message and
    :class:`ErrorCode` (``code``) as :meth:`Connection.decode_frame` would give, without the
    request id. :meth:`Connection.decode_walked` turns it into the RemoteProtocolError."""


def _bad(where: str, what: str) -> _Invalid:
    return _Invalid(f"{where}: {what}")


# ----------------------------------------------------------------------------- enums


class FrameType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    PING = 0x03
    PONG = 0x04
    SIGN = 0x10
    SIGN_BATCH = 0x11
    SIGN_RESULT = 0x12
    SIGN_BATCH_RESULT = 0x13
    LIST_KEYS = 0x20
    KEYS = 0x21
    GOAWAY = 0x30
    ERROR = 0x7F


class Role(enum.Enum):
    CLIENT = "client"  # the portal backend
    SERVER = "server"  # the engine


CLIENT = Role.CLIENT
SERVER = Role.SERVER


class State(enum.Enum):
    IDLE = "idle"  # client: HELLO not sent yet; server: HELLO not received yet
    AWAIT_WELCOME = "await-welcome"  # client: HELLO sent, waiting for WELCOME
    SEND_WELCOME = "send-welcome"  # server: HELLO received, WELCOME (or ERROR) to send
    OPEN = "open"  # handshake done
    CLOSED = "closed"  # the peer ended the stream cleanly (we may still send)
    ERROR = "error"  # the peer broke the protocol, or a fatal ERROR was produced


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame whose header passed the connection's rules; its body is not decoded
    yet (:meth:`Connection.next_frame`, then :meth:`Connection.decode_frame`).

    ``size`` is what decoding will have to handle: the body's length, or for a compressed
    body the decompressed size its zstd frame declares (0 when it declares none, which
    decoding refuses). A receiver can use it to decide where to decode (a worker thread for
    large bodies) before spending anything on it.
    """

    type: int
    request_id: int
    compressed: bool
    body: bytes
    size: int


def body_item_limit(max_batch: int) -> int:
    """The most CBOR data items a body may hold on a connection whose WELCOME announced
    *max_batch* (0 before the handshake): enough for the largest legitimate SIGN_BATCH,
    SIGN_BATCH_RESULT or KEYS body with room to spare (SPEC.md §13). Bodies are counted
    before they are decoded (:mod:`cborlimits`), so a small frame that would expand into
    millions of objects costs nothing but the count."""
    return ITEMS_BASE + max(ITEMS_PER_BATCH_ENTRY * max_batch, ITEMS_PER_KEY * MAX_KEYS)


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server, the first frame. Offers versions, a frame limit and compression."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    request_id: ClassVar[int] = 0
    max_frame: int = DEFAULT_MAX_FRAME
    compression: tuple[str, ...] = ("zstd",)
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server -> client, the server's first frame: what was negotiated, and the server's limits."""

    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    request_id: ClassVar[int] = 0
    max_frame: int
    max_batch: int
    max_in_flight: int
    server: str
    compression: str | None = None
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Ping:
    """Either side; the peer answers with a :class:`Pong` with the same id and data."""

    TYPE: ClassVar[FrameType] = FrameType.PING
    request_id: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[FrameType] = FrameType.PONG
    request_id: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class SignItem:
    """One DCC to sign for an end-user *account* (acting under its mandate: *operator*)."""

    dcc: dict[str, Any] = field(repr=False)  # health data: kept out of logs
    account: str
    operator: str | None = None
    kid: bytes | None = None
    validity_days: int | None = None
    idempotency_key: bytes | str | None = None


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item's outcome: ``hc1`` and ``kid`` when it was signed, else ``error`` and
    ``message`` (and possibly ``retry_after_ms``).

    ``error`` is an :class:`ErrorCode`, or a plain int for a code this codec does not know.
    """

    hc1: str | None = field(default=None, repr=False)
    kid: bytes | None = None
    error: ErrorCode | int | None = None
    message: str | None = None
    retry_after_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Sign:
    """Client -> server: sign one DCC."""

    TYPE: ClassVar[FrameType] = FrameType.SIGN
    request_id: int
    item: SignItem


@dataclass(frozen=True, slots=True)
class SignBatch:
    """Client -> server: sign 1..max_batch DCCs; each gets its own result."""

    TYPE: ClassVar[FrameType] = FrameType.SIGN_BATCH
    request_id: int
    items: tuple[SignItem, ...]


@dataclass(frozen=True, slots=True)
class SignResult:
    """Server -> client: the result of a :class:`Sign`."""

    TYPE: ClassVar[FrameType] = FrameType.SIGN_RESULT
    request_id: int
    result: ItemResult


@dataclass(frozen=True, slots=True)
class SignBatchResult:
    """Server -> client: the results of a :class:`SignBatch`, in item order."""

    TYPE: ClassVar[FrameType] = FrameType.SIGN_BATCH_RESULT
    request_id: int
    results: tuple[ItemResult, ...]


@dataclass(frozen=True, slots=True)
class ListKeys:
    """Client -> server: which signing keys may this client use?"""

    TYPE: ClassVar[FrameType] = FrameType.LIST_KEYS
    request_id: int


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Public facts of one signing key (never private material)."""

    kid: bytes
    alg: int  # COSE: -7 ES256, -37 PS256
    types: str  # the DCC types it may sign: a subset of "vtr"
    state: str  # e.g. "active", "retired"
    dsc: bytes = field(repr=False)  # the DER X.509 certificate
    not_before: int  # epoch seconds
    not_after: int


@dataclass(frozen=True, slots=True)
class Keys:
    """Server -> client: the answer to :class:`ListKeys`."""

    TYPE: ClassVar[FrameType] = FrameType.KEYS
    request_id: int
    keys: tuple[KeyInfo, ...]


@dataclass(frozen=True, slots=True)
class GoAway:
    """Server -> client: draining. Requests with ids above *last_request_id* were not processed
    and will not be; the connection closes once the others are answered."""

    TYPE: ClassVar[FrameType] = FrameType.GOAWAY
    request_id: ClassVar[int] = 0
    last_request_id: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Error:
    """A request failed as a whole (request id = its id) or the connection failed (id 0).

    *fatal*: the sender closes the connection after this frame. A connection-level error
    (id 0) is always fatal. *code* is a plain int if this codec does not know it.
    """

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    request_id: int
    code: ErrorCode | int
    message: str
    retry_after_ms: int | None = None
    fatal: bool = False

    @property
    def retryable(self) -> bool:
        return _retryable(self.code)


Event = (
    Hello
    | Welcome
    | Ping
    | Pong
    | Sign
    | SignBatch
    | SignResult
    | SignBatchResult
    | ListKeys
    | Keys
    | GoAway
    | Error
)

_CODES: dict[int, ErrorCode] = {int(c): c for c in ErrorCode}


def _retryable(code: int) -> bool:
    known = _CODES.get(code)
    if known is not None:
        return known in RETRYABLE
    return 40 <= code < 60  # the class of an unknown code (see codes.py)


# Fast construction of the two per-item value types (the decoder builds thousands a second):
# a frozen dataclass's __init__ goes through object.__setattr__ once per field; setting the
# slots directly halves that. The checks in the decoder are what make the values valid.
_new = object.__new__
_si_dcc, _si_acc, _si_op, _si_kid, _si_vd, _si_key = (
    SignItem.__dict__[n].__set__
    for n in ("dcc", "account", "operator", "kid", "validity_days", "idempotency_key")
)
_ir_hc1, _ir_kid, _ir_err, _ir_msg, _ir_retry = (
    ItemResult.__dict__[n].__set__ for n in ("hc1", "kid", "error", "message", "retry_after_ms")
)


def _make_item(dcc: Any, account: Any, operator: Any, kid: Any, vd: Any, key: Any) -> SignItem:
    o = _new(SignItem)
    _si_dcc(o, dcc)
    _si_acc(o, account)
    _si_op(o, operator)
    _si_kid(o, kid)
    _si_vd(o, vd)
    _si_key(o, key)
    return o


def _make_result(hc1: Any, kid: Any, error: Any, message: Any, retry: Any) -> ItemResult:
    o = _new(ItemResult)
    _ir_hc1(o, hc1)
    _ir_kid(o, kid)
    _ir_err(o, error)
    _ir_msg(o, message)
    _ir_retry(o, retry)
    return o


# ----------------------------------------------------------------------------- body checks
#
# Each decoder takes the body map (already known to be a dict) and returns the event, or
# raises _Invalid naming the field. Optional fields may also be present as null. Unknown keys
# are ignored (later minor revisions may add optional fields). The same decoders check what
# we send: send() builds the body map and runs it through them.


def _uint(v: Any, where: str, lo: int = 0, hi: int = UINT32_MAX) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(where, f"must be an unsigned integer in {lo}..{hi}")
    return v


def _int64(v: Any, where: str) -> int:
    if type(v) is not int or not INT64_MIN <= v <= INT64_MAX:
        raise _bad(where, "must be an integer in the int64 range")
    return v


def _text(v: Any, where: str, lo: int, hi: int) -> str:
    if type(v) is not str or not lo <= len(v) <= hi:
        raise _bad(where, f"must be text of {lo}..{hi} characters")
    return v


def _opt_uint(v: Any, where: str) -> int | None:
    return None if v is None else _uint(v, where)


def _kid(v: Any, where: str) -> bytes:
    if type(v) is not bytes or len(v) != KID_SIZE:
        raise _bad(where, f"must be a byte string of {KID_SIZE} bytes")
    return v


def _code(v: Any, where: str) -> ErrorCode | int:
    if type(v) is not int or not 0 < v <= UINT32_MAX:
        raise _bad(where, "must be an error code (unsigned integer, not 0)")
    return _CODES.get(v, v)


def _map(v: Any, where: str) -> dict[Any, Any]:
    if type(v) is not dict:
        raise _bad(where, "must be a map")
    return v


def _array(v: Any, where: str, lo: int, hi: int) -> list[Any]:
    if type(v) is not list or not lo <= len(v) <= hi:
        raise _bad(where, f"must be an array of {lo}..{hi} entries")
    return v


def _dec_hello(rid: int, b: dict[Any, Any], limit: int) -> Hello:
    versions = _array(b.get("versions"), "HELLO.versions", 1, MAX_LIST)
    for v in versions:
        _uint(v, "HELLO.versions[]", 1, 255)
    compression = _array(b.get("compression"), "HELLO.compression", 0, MAX_LIST)
    for c in compression:
        _text(c, "HELLO.compression[]", 1, MAX_ALG_NAME)
    agent = b.get("agent")
    if agent is not None:
        _text(agent, "HELLO.agent", 0, MAX_TEXT)
    return Hello(
        max_frame=_uint(b.get("max_frame"), "HELLO.max_frame", MIN_MAX_FRAME),
        compression=tuple(compression),
        versions=tuple(versions),
        agent=agent,
    )


def _dec_welcome(rid: int, b: dict[Any, Any], limit: int) -> Welcome:
    compression = b.get("compression")
    if compression is not None:
        _text(compression, "WELCOME.compression", 1, MAX_ALG_NAME)
    return Welcome(
        max_frame=_uint(b.get("max_frame"), "WELCOME.max_frame", MIN_MAX_FRAME),
        max_batch=_uint(b.get("max_batch"), "WELCOME.max_batch", 1),
        max_in_flight=_uint(b.get("max_in_flight"), "WELCOME.max_in_flight", 1),
        server=_text(b.get("server"), "WELCOME.server", 0, MAX_TEXT),
        compression=compression,
        version=_uint(b.get("version"), "WELCOME.version", 1, 255),
    )


def _ping_data(b: dict[Any, Any], where: str) -> bytes:
    data = b.get("data")
    if type(data) is not bytes or len(data) > MAX_PING_DATA:
        raise _bad(where, f"must be a byte string of at most {MAX_PING_DATA} bytes")
    return data


def _dec_ping(rid: int, b: dict[Any, Any], limit: int) -> Ping:
    return Ping(rid, _ping_data(b, "PING.data"))


def _dec_pong(rid: int, b: dict[Any, Any], limit: int) -> Pong:
    return Pong(rid, _ping_data(b, "PONG.data"))


def _item(m: Any) -> SignItem:
    # The hot path: one call per DCC. Plain type checks, no helper calls on the valid path.
    if type(m) is not dict:
        raise _Invalid("is not a map")
    dcc = m.get("dcc")
    if type(dcc) is not dict:
        raise _Invalid("dcc: must be a map (the DCC JSON object)")
    account = m.get("account")
    if type(account) is not str or not 0 < len(account) <= MAX_TEXT:
        raise _Invalid(f"account: must be text of 1..{MAX_TEXT} characters")
    operator = m.get("operator")
    if operator is not None and (type(operator) is not str or not 0 < len(operator) <= MAX_TEXT):
        raise _Invalid(f"operator: must be text of 1..{MAX_TEXT} characters")
    kid = m.get("kid")
    if kid is not None and (type(kid) is not bytes or len(kid) != KID_SIZE):
        raise _Invalid(f"kid: must be a byte string of {KID_SIZE} bytes")
    vd = m.get("validity_days")
    if vd is not None and (type(vd) is not int or not 0 < vd <= MAX_VALIDITY_DAYS):
        raise _Invalid(f"validity_days: must be an integer in 1..{MAX_VALIDITY_DAYS}")
    key = m.get("idempotency_key")
    if key is not None:
        kt = type(key)
        if kt is bytes:
            n = len(key)
        elif kt is str:
            n = len(key) if key.isascii() else len(key.encode())
        else:
            n = 0
        if not 0 < n <= MAX_IDEMPOTENCY_KEY:
            raise _Invalid(
                f"idempotency_key: must be a byte string or text of 1..{MAX_IDEMPOTENCY_KEY} bytes"
            )
    return _make_item(dcc, account, operator, kid, vd, key)


_FIELD_FIRST = re.compile(r"[a-z_][a-z0-9_]*: ")


def _located(exc: _Invalid, where: str) -> _Invalid:
    """Prefix a message about part of a body with where that part is."""
    message = str(exc)
    sep = "." if _FIELD_FIRST.match(message) else " "
    return _Invalid(f"{where}{sep}{message}", exc.code)


def _dec_sign(rid: int, b: dict[Any, Any], limit: int) -> Sign:
    try:
        return Sign(rid, _item(b))
    except _Invalid as exc:
        raise _located(exc, "SIGN") from None


def _dec_sign_batch(rid: int, b: dict[Any, Any], limit: int) -> SignBatch:
    items = b.get("items")
    if type(items) is not list or not items:
        raise _bad("SIGN_BATCH.items", "must be a non-empty array of items")
    if len(items) > limit:
        raise _Invalid(
            f"SIGN_BATCH has {len(items)} items; max_batch is {limit}", ErrorCode.BATCH_TOO_LARGE
        )
    try:
        return SignBatch(rid, tuple([_item(m) for m in items]))
    except _Invalid:
        pass
    for i, m in enumerate(items):  # the cold path: name the first bad item
        try:
            _item(m)
        except _Invalid as exc:
            raise _located(exc, f"SIGN_BATCH.items[{i}]") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _result(m: Any) -> ItemResult:
    if type(m) is not dict:
        raise _Invalid("is not a map")
    hc1 = m.get("hc1")
    error = m.get("error")
    if hc1 is not None:
        if type(hc1) is not str or not 4 < len(hc1) <= MAX_HC1 or not hc1.startswith("HC1:"):
            raise _Invalid(f'hc1: must be text starting "HC1:", at most {MAX_HC1} characters')
        kid = m.get("kid")
        if type(kid) is not bytes or len(kid) != KID_SIZE:
            raise _Invalid(f"kid: must be a byte string of {KID_SIZE} bytes")
        if error is not None:
            raise _Invalid("has both hc1 and error")
        return _make_result(hc1, kid, None, None, None)
    if error is None:
        raise _Invalid("has neither hc1 nor error")
    code = _code(error, "error")
    message = m.get("message")
    if type(message) is not str or len(message) > MAX_MESSAGE:
        raise _Invalid(f"message: must be text of at most {MAX_MESSAGE} characters")
    retry = m.get("retry_after_ms")
    if retry is not None:
        _uint(retry, "retry_after_ms")
    return _make_result(None, None, code, message, retry)


def _dec_sign_result(rid: int, b: dict[Any, Any], limit: int) -> SignResult:
    try:
        return SignResult(rid, _result(b))
    except _Invalid as exc:
        raise _located(exc, "SIGN_RESULT") from None


def _dec_sign_batch_result(rid: int, b: dict[Any, Any], limit: int) -> SignBatchResult:
    results = b.get("results")
    if type(results) is not list or not 0 < len(results) <= limit:
        raise _bad("SIGN_BATCH_RESULT.results", f"must be an array of 1..{limit} results")
    try:
        return SignBatchResult(rid, tuple([_result(m) for m in results]))
    except _Invalid:
        pass
    for i, m in enumerate(results):
        try:
            _result(m)
        except _Invalid as exc:
            raise _located(exc, f"SIGN_BATCH_RESULT.results[{i}]") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _dec_list_keys(rid: int, b: dict[Any, Any], limit: int) -> ListKeys:
    return ListKeys(rid)


def _key(m: Any, where: str) -> KeyInfo:
    m = _map(m, where)
    types = m.get("types")
    if type(types) is not str or len(types) > 3 or len(set(types)) != len(types):
        raise _bad(f"{where}.types", 'must be text made of distinct letters of "vtr"')
    if not set(types) <= {"v", "t", "r"}:
        raise _bad(f"{where}.types", 'must be text made of distinct letters of "vtr"')
    dsc = m.get("dsc")
    if type(dsc) is not bytes or not 0 < len(dsc) <= MAX_DSC:
        raise _bad(f"{where}.dsc", f"must be a byte string of 1..{MAX_DSC} bytes (DER)")
    return KeyInfo(
        kid=_kid(m.get("kid"), f"{where}.kid"),
        alg=_int64(m.get("alg"), f"{where}.alg"),
        types=types,
        state=_text(m.get("state"), f"{where}.state", 1, MAX_STATE),
        dsc=dsc,
        not_before=_int64(m.get("not_before"), f"{where}.not_before"),
        not_after=_int64(m.get("not_after"), f"{where}.not_after"),
    )


def _dec_keys(rid: int, b: dict[Any, Any], limit: int) -> Keys:
    keys = _array(b.get("keys"), "KEYS.keys", 0, MAX_KEYS)
    return Keys(rid, tuple(_key(k, f"KEYS.keys[{i}]") for i, k in enumerate(keys)))


def _dec_goaway(rid: int, b: dict[Any, Any], limit: int) -> GoAway:
    return GoAway(
        _uint(b.get("last_request_id"), "GOAWAY.last_request_id"),
        _text(b.get("reason"), "GOAWAY.reason", 0, MAX_MESSAGE),
    )


def _dec_error(rid: int, b: dict[Any, Any], limit: int) -> Error:
    fatal = b.get("fatal")
    if fatal is not None and type(fatal) is not bool:
        raise _bad("ERROR.fatal", "must be a boolean")
    return Error(
        rid,
        _code(b.get("code"), "ERROR.code"),
        _text(b.get("message"), "ERROR.message", 0, MAX_MESSAGE),
        _opt_uint(b.get("retry_after_ms"), "ERROR.retry_after_ms"),
        bool(fatal),
    )


_DECODE: dict[int, Callable[[int, dict[Any, Any], int], Any]] = {
    FrameType.HELLO: _dec_hello,
    FrameType.WELCOME: _dec_welcome,
    FrameType.PING: _dec_ping,
    FrameType.PONG: _dec_pong,
    FrameType.SIGN: _dec_sign,
    FrameType.SIGN_BATCH: _dec_sign_batch,
    FrameType.SIGN_RESULT: _dec_sign_result,
    FrameType.SIGN_BATCH_RESULT: _dec_sign_batch_result,
    FrameType.LIST_KEYS: _dec_list_keys,
    FrameType.KEYS: _dec_keys,
    FrameType.GOAWAY: _dec_goaway,
    FrameType.ERROR: _dec_error,
}


# ----------------------------------------------------------------------------- body building


def _json_value(value: Any, where: str) -> None:
    """Check that a DCC is plain JSON data (what we send must decode on the other side)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is dict:
            if depth > DCC_MAX_DEPTH:
                raise _bad(where, f"nests deeper than {DCC_MAX_DEPTH} levels")
            for k, x in v.items():
                if type(k) is not str:
                    raise _bad(where, f"has a map key that is not text: {k!r}")
                stack.append((x, depth + 1))
        elif t is list or t is tuple:
            if depth > DCC_MAX_DEPTH:
                raise _bad(where, f"nests deeper than {DCC_MAX_DEPTH} levels")
            stack.extend((x, depth + 1) for x in v)
        elif t is int:
            if not -(2**64) <= v < 2**64:
                raise _bad(where, "has an integer outside the 64-bit CBOR range")
        elif t is float:
            if not math.isfinite(v):
                raise _bad(where, "has a non-finite number (not JSON)")
        elif not (t is str or t is bool or v is None):
            raise _bad(where, f"holds a {t.__name__}, which is not JSON data")


def _item_body(it: SignItem, check_dcc: bool) -> dict[str, Any]:
    if type(it) is not SignItem:
        raise _Invalid(f"is a {type(it).__name__}, not a SignItem")
    if check_dcc:
        _json_value(it.dcc, "dcc")
    body: dict[str, Any] = {"dcc": it.dcc, "account": it.account}
    if it.operator is not None:
        body["operator"] = it.operator
    if it.kid is not None:
        body["kid"] = it.kid
    if it.validity_days is not None:
        body["validity_days"] = it.validity_days
    if it.idempotency_key is not None:
        body["idempotency_key"] = it.idempotency_key
    return body


def _code_out(code: Any) -> Any:
    # An ErrorCode (or another int subclass) goes out as a plain int; anything else is left
    # for the checks to refuse.
    return int(code) if isinstance(code, int) and not isinstance(code, bool) else code


def _result_body(r: ItemResult) -> dict[str, Any]:
    if type(r) is not ItemResult:
        raise _Invalid(f"is a {type(r).__name__}, not an ItemResult")
    if r.error is None:
        if r.message is not None or r.retry_after_ms is not None:
            raise _Invalid("a success (no error) carries no message or retry_after_ms")
        return {"hc1": r.hc1, "kid": r.kid}
    if r.hc1 is not None or r.kid is not None:
        raise _Invalid("a failure (error set) carries no hc1 or kid")
    body = {"error": _code_out(r.error), "message": r.message}
    if r.retry_after_ms is not None:
        body["retry_after_ms"] = r.retry_after_ms
    return body


def _key_body(k: KeyInfo) -> dict[str, Any]:
    if type(k) is not KeyInfo:
        raise _Invalid(f"is a {type(k).__name__}, not a KeyInfo")
    return {
        "kid": k.kid,
        "alg": k.alg,
        "types": k.types,
        "state": k.state,
        "dsc": k.dsc,
        "not_before": k.not_before,
        "not_after": k.not_after,
    }


def _write_hello(ev: Hello, check_dcc: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "versions": list(ev.versions),
        "max_frame": ev.max_frame,
        "compression": list(ev.compression),
    }
    if ev.agent is not None:
        body["agent"] = ev.agent
    return body


def _write_welcome(ev: Welcome, check_dcc: bool) -> dict[str, Any]:
    return {
        "version": ev.version,
        "max_frame": ev.max_frame,
        "max_batch": ev.max_batch,
        "max_in_flight": ev.max_in_flight,
        "compression": ev.compression,
        "server": ev.server,
    }


def _write_ping(ev: Ping | Pong, check_dcc: bool) -> dict[str, Any]:
    return {"data": ev.data}


def _write_sign(ev: Sign, check_dcc: bool) -> dict[str, Any]:
    try:
        return _item_body(ev.item, check_dcc)
    except _Invalid as exc:
        raise _located(exc, "SIGN") from None


def _write_sign_batch(ev: SignBatch, check_dcc: bool) -> dict[str, Any]:
    items = list(ev.items)
    try:
        return {"items": [_item_body(it, check_dcc) for it in items]}
    except _Invalid:
        for i, it in enumerate(items):  # the fast path failed: find the item to name
            try:
                _item_body(it, check_dcc)
            except _Invalid as exc:
                raise _located(exc, f"SIGN_BATCH.items[{i}]") from None
        raise  # pragma: no cover


def _write_sign_result(ev: SignResult, check_dcc: bool) -> dict[str, Any]:
    try:
        return _result_body(ev.result)
    except _Invalid as exc:
        raise _located(exc, "SIGN_RESULT") from None


def _write_sign_batch_result(ev: SignBatchResult, check_dcc: bool) -> dict[str, Any]:
    results = list(ev.results)
    for i, r in enumerate(results):
        try:
            results[i] = _result_body(r)
        except _Invalid as exc:
            raise _located(exc, f"SIGN_BATCH_RESULT.results[{i}]") from None
    return {"results": results}


def _write_list_keys(ev: ListKeys, check_dcc: bool) -> dict[str, Any]:
    return {}


def _write_keys(ev: Keys, check_dcc: bool) -> dict[str, Any]:
    keys = list(ev.keys)
    for i, k in enumerate(keys):
        try:
            keys[i] = _key_body(k)
        except _Invalid as exc:
            raise _located(exc, f"KEYS.keys[{i}]") from None
    return {"keys": keys}


def _write_goaway(ev: GoAway, check_dcc: bool) -> dict[str, Any]:
    return {"last_request_id": ev.last_request_id, "reason": ev.reason}


def _write_error(ev: Error, check_dcc: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"code": _code_out(ev.code), "message": ev.message}
    if ev.retry_after_ms is not None:
        body["retry_after_ms"] = ev.retry_after_ms
    if ev.fatal is not False:
        body["fatal"] = ev.fatal
    return body


#: The body of each event type as sent: the writers that pair with the readers of _DECODE.
_WRITE: dict[type, Callable[[Any, bool], dict[str, Any]]] = {
    Hello: _write_hello,
    Welcome: _write_welcome,
    Ping: _write_ping,
    Pong: _write_ping,
    Sign: _write_sign,
    SignBatch: _write_sign_batch,
    SignResult: _write_sign_result,
    SignBatchResult: _write_sign_batch_result,
    ListKeys: _write_list_keys,
    Keys: _write_keys,
    GoAway: _write_goaway,
    Error: _write_error,
}


def _body_of(ev: Any, check_dcc: bool) -> dict[str, Any]:
    """The CBOR body of event *ev* (*check_dcc*: a client checks the DCCs it sends)."""
    write = _WRITE.get(type(ev))
    if write is None:
        raise _Invalid(f"not a wire event: {type(ev).__name__}", ErrorCode.PROTOCOL)
    return write(ev, check_dcc)


# ----------------------------------------------------------------------------- CBOR


def _decode_cbor(raw: bytes, scan: cborlimits.Scan, max_items: int) -> Any:
    try:
        value = cborlimits.decode(raw, scan=scan, max_items=max_items, max_depth=MAX_DEPTH)
    except ValueError as exc:
        raise _Invalid(f"the body is not valid CBOR for this protocol: {exc}") from None
    if type(value) is not dict:
        raise _Invalid("the body is not a CBOR map")
    return value


# ----------------------------------------------------------------------------- connection

_CLIENT_SENDS = frozenset(
    {
        FrameType.HELLO,
        FrameType.PING,
        FrameType.PONG,
        FrameType.SIGN,
        FrameType.SIGN_BATCH,
        FrameType.LIST_KEYS,
        FrameType.ERROR,
    }
)
_SERVER_SENDS = frozenset(
    {
        FrameType.WELCOME,
        FrameType.PING,
        FrameType.PONG,
        FrameType.SIGN_RESULT,
        FrameType.SIGN_BATCH_RESULT,
        FrameType.KEYS,
        FrameType.GOAWAY,
        FrameType.ERROR,
    }
)
_REQUESTS = frozenset({FrameType.SIGN, FrameType.SIGN_BATCH, FrameType.LIST_KEYS})
_REPLIES = frozenset({FrameType.SIGN_RESULT, FrameType.SIGN_BATCH_RESULT, FrameType.KEYS})
_COMPRESSIBLE = frozenset({FrameType.SIGN_BATCH, FrameType.SIGN_BATCH_RESULT})
_CONNECTION_LEVEL = frozenset({FrameType.HELLO, FrameType.WELCOME, FrameType.GOAWAY})
_TYPES = frozenset(int(t) for t in FrameType)


def _name(ftype: int) -> str:
    return FrameType(ftype).name


def _who(client: bool) -> str:
    return "client" if client else "server"


def _early(ftype: int) -> _Invalid:
    return _Invalid(f"{_name(ftype)} before the handshake is complete", ErrorCode.PROTOCOL)


class Connection:
    """One end of one portal <-> engine connection: bytes in, events out, and back. No I/O.

    *role* is :data:`CLIENT` (the portal) or :data:`SERVER` (the engine), or the string
    ``"client"`` / ``"server"``. *max_frame* is the largest frame this side accepts (a
    client offers it in HELLO; a server caps the client's offer with it). *compression*
    lists the algorithms this side is willing to use, in order of preference.
    """

    def __init__(
        self,
        role: Role | str,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        compression: tuple[str, ...] = SUPPORTED_COMPRESSION,
        scan: cborlimits.Scan = cborlimits.scan,
    ) -> None:
        self.role = Role(role)
        if type(max_frame) is not int or not MIN_MAX_FRAME <= max_frame <= UINT32_MAX:
            raise ValueError(f"max_frame must be an integer in {MIN_MAX_FRAME}..{UINT32_MAX}")
        unknown = set(compression) - set(SUPPORTED_COMPRESSION)
        if unknown:
            raise ValueError(f"unsupported compression: {sorted(unknown)}")
        self.local_max_frame = max_frame
        self.local_compression = tuple(compression)
        self._client = self.role is Role.CLIENT
        self._state = State.IDLE
        self._max_frame = MIN_MAX_FRAME
        self._compression: str | None = None
        #: The HELLO and WELCOME of this connection, once they have passed.
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self._open = False  # WELCOME has passed
        self._max_batch = 0
        #: The highest request id on this connection (sent by a client, received by a server).
        self.last_request_id = 0
        #: ``last_request_id`` of the latest GOAWAY (None: the server is not draining).
        self.goaway_last_id: int | None = None
        self._fatal_sent = False
        self._fatal_received = False
        self._buf = bytearray()
        self._eof = False
        self._undecoded = False  # next_frame gave a frame that decode_frame has not seen
        # The first violation (message, code, request id): kept as data, not as the exception,
        # whose traceback would keep the frames (and a decoded body) of the failure alive.
        self._error: tuple[str, ErrorCode, int] | None = None
        self._scan = scan
        self._zc: zstandard.ZstdCompressor | None = None

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        return self._state

    @property
    def max_frame(self) -> int:
        """The current frame limit: MIN_MAX_FRAME until the handshake, then the negotiated one."""
        return self._max_frame

    @property
    def compression(self) -> str | None:
        """The negotiated compression (``"zstd"``), or None."""
        return self._compression

    @property
    def max_batch(self) -> int | None:
        """WELCOME's max_batch, once the handshake is done."""
        return self.welcome.max_batch if self.welcome else None

    @property
    def max_in_flight(self) -> int | None:
        return self.welcome.max_in_flight if self.welcome else None

    # ------------------------------------------------------------------ handshake helpers

    def make_hello(self, agent: str | None = None) -> Hello:
        """The HELLO this client offers (its max_frame and compression, every version we speak)."""
        if not self._client:
            raise LocalProtocolError("make_hello: only a client says HELLO")
        return Hello(self.local_max_frame, self.local_compression, SUPPORTED_VERSIONS, agent)

    def make_welcome(self, *, max_batch: int, max_in_flight: int, server: str) -> Welcome:
        """The WELCOME answering the HELLO received: the highest common version, the smaller
        max_frame, the client's most preferred compression that this server also allows."""
        hello = self.hello
        if self._client or hello is None or self._state is not State.SEND_WELCOME:
            raise LocalProtocolError("make_welcome: only a server, after HELLO, before WELCOME")
        version = max(v for v in hello.versions if v in SUPPORTED_VERSIONS)
        compression = next((c for c in hello.compression if c in self.local_compression), None)
        return Welcome(
            max_frame=min(hello.max_frame, self.local_max_frame),
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            server=server,
            compression=compression,
            version=version,
        )

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> None:
        """Store bytes from the peer; ``b""`` means the peer closed the stream."""
        if self._eof:
            raise LocalProtocolError("receive_data after the end of the stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as frames: at most one incomplete frame and the
        start of the next (a receiver bounds what partial frames may hold in total)."""
        return len(self._buf)

    def next_event(self) -> Event | NeedData | None:
        """The next event, :data:`NEED_DATA`, or None once the peer has closed cleanly.

        The same as :meth:`next_frame` followed by :meth:`decode_frame`.

        Raises :class:`RemoteProtocolError` (again on every later call) if the peer broke the
        protocol.
        """
        frame = self.next_frame()
        if type(frame) is not Frame:
            return frame
        return self.decode_frame(frame)

    def next_frame(self) -> Frame | NeedData | None:
        """The next complete frame whose header passes the rules (frame type, direction,
        request id order, size), with its body not yet decoded; :data:`NEED_DATA`; or None
        once the peer has closed cleanly. Pass the frame to :meth:`decode_frame` before asking
        for the next one: the rules for the next header depend on this frame's body.

        Raises:
            RemoteProtocolError: the peer broke the protocol (again on every later call).
            LocalProtocolError: the previous frame has not been decoded yet.
        """
        if self._error is not None:
            raise RemoteProtocolError(*self._error)
        if self._undecoded:
            raise LocalProtocolError("next_frame: decode the previous frame first")
        taken = self._take_frame()
        if type(taken) is tuple:
            raise self._failed(*taken)
        if type(taken) is Frame:
            self._undecoded = True
        return taken

    def decode_frame(self, frame: Frame) -> Event:
        """The event of a frame from :meth:`next_frame`: its body decompressed, counted (no
        more CBOR data items than :func:`body_item_limit` allows, before anything is built),
        decoded and checked; then the connection's state advances.

        Decoding a large body takes time, so this method may run in a worker thread while the
        connection's owner goes on calling :meth:`send` (replies to earlier requests): each
        state change it makes is a single attribute update. It must not run twice at once on
        one connection.

        Raises:
            RemoteProtocolError: the body breaks the protocol (the connection is then in
                state ERROR, as after :meth:`next_event`).
        """
        try:
            event = self._event_of(frame)
            self._passed(event, outgoing=False)
        except _Invalid as exc:
            problem = (str(exc), exc.code, frame.request_id)
        else:
            return event
        finally:
            self._undecoded = False
        # Raised outside the except block, so that the error does not carry the decoded body
        # along as its context (a refused 1,000-item batch would outlive the connection).
        raise self._failed(*problem)

    def refuse_frame(self, frame: Frame) -> None:
        """Take a request frame from :meth:`next_frame` without decoding its body, because the
        receiver answers it with an ERROR from its header alone (a server answering BUSY under
        overload: SPEC.md §8.2). The connection's state advances as :meth:`decode_frame` would
        have advanced it (the request id is taken); the body is never looked at, so nothing in
        it can be a protocol error.

        Raises:
            LocalProtocolError: *frame* is not a request (SIGN, SIGN_BATCH, LIST_KEYS) or is
                not the frame :meth:`next_frame` returned last.
        """
        if not self._undecoded or frame.type not in _REQUESTS:
            raise LocalProtocolError("refuse_frame: only the request frame just taken")
        self.last_request_id = frame.request_id
        self._undecoded = False

    def decode_walked(self, frame: Frame, walk: Callable[..., Any]) -> Any:
        """Like :meth:`decode_frame` for a SIGN or SIGN_BATCH frame, but the body goes to a
        body walker instead of the decoder: ``walk(body, max_batch, single=...)`` (e.g.
        ``dccsign.native.walk_sign_batch``), which applies the same rules without building
        per-item objects and raises :class:`BodyError` with the decoder's message and code.
        Returns what *walk* returns; the connection's state advances as after
        :meth:`decode_frame`.

        Raises:
            RemoteProtocolError: the body breaks the protocol (state ERROR, as after
                :meth:`decode_frame`).
            LocalProtocolError: *frame* is neither SIGN nor SIGN_BATCH (use
                :meth:`decode_frame`; nothing changed).
        """
        if frame.type != FrameType.SIGN and frame.type != FrameType.SIGN_BATCH:
            raise LocalProtocolError(f"decode_walked: {_name(frame.type)} is not a sign request")
        try:
            raw = frame.body
            if frame.compressed:
                raw = self._decompress(raw)
            view = walk(raw, self._max_batch, single=frame.type == FrameType.SIGN)
            self.last_request_id = frame.request_id  # what _passed does for Sign / SignBatch
        except _Invalid as exc:
            problem = (str(exc), exc.code, frame.request_id)
        else:
            return view
        finally:
            self._undecoded = False
        raise self._failed(*problem)

    def _event_of(self, frame: Frame) -> Event:
        # A function of its own: the decoded body lives in its frame only, which a failure
        # leaves behind (decode_frame raises outside the except block).
        raw = frame.body
        if frame.compressed:
            raw = self._decompress(raw)
        body = _decode_cbor(raw, self._scan, body_item_limit(self._max_batch))
        return _DECODE[frame.type](frame.request_id, body, self._max_batch)

    def _failed(self, message: str, code: ErrorCode, rid: int) -> RemoteProtocolError:
        """Enter state ERROR and return the error to raise (later calls raise a new copy)."""
        self._error = (message, code, rid)
        self._state = State.ERROR
        return RemoteProtocolError(message, code, rid)

    def _take_frame(self) -> Frame | tuple[str, ErrorCode, int] | Any | None:
        """A complete frame, NEED_DATA, None at a clean end, or (message, code, request id)
        of the first rule that the buffered bytes break."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            if buf:
                return "the stream ended inside a frame header", ErrorCode.PROTOCOL, 0
            if self._state is not State.ERROR:
                self._state = State.CLOSED
            return None
        magic, version, ftype, flags, rid, length = HEADER.unpack_from(buf)
        if magic != MAGIC:
            return f"bad magic {bytes(magic)!r}: not a dccsign wire frame", ErrorCode.PROTOCOL, 0
        if version != VERSION:
            return f"unsupported frame version {version}", ErrorCode.UNSUPPORTED_VERSION, 0
        if flags & 0x00FFFFFF:
            return "reserved header bytes must be zero", ErrorCode.PROTOCOL, 0
        flags >>= 24
        if flags & ~FLAG_ZSTD:
            return f"unknown flag bits 0x{flags:02x}", ErrorCode.PROTOCOL, 0
        if ftype not in _TYPES:
            return f"unknown frame type 0x{ftype:02x}", ErrorCode.PROTOCOL, rid
        if flags and self._compression is None:
            return "a compressed frame, but no compression was negotiated", ErrorCode.PROTOCOL, rid
        if length > self._max_frame:
            return (
                f"frame of {length} bytes exceeds max_frame {self._max_frame}",
                ErrorCode.FRAME_TOO_LARGE,
                rid,
            )
        try:
            self._admit(ftype, rid, outgoing=False)
        except _Invalid as exc:
            return str(exc), exc.code, rid
        end = HEADER_SIZE + length
        if len(buf) < end:
            if self._eof:
                return "the stream ended inside a frame body", ErrorCode.PROTOCOL, rid
            return NEED_DATA
        with memoryview(buf) as view:
            raw = bytes(view[HEADER_SIZE:end])  # one copy, then the buffer may shrink
        del buf[:end]
        size = length
        if flags:
            try:
                size = max(zstandard.frame_content_size(raw), 0)
            except zstandard.ZstdError:
                size = 0  # decode_frame says what is wrong with it
        return Frame(ftype, rid, bool(flags), raw, size)

    def _decompress(self, raw: bytes) -> bytes:
        try:
            size = zstandard.frame_content_size(raw)
        except zstandard.ZstdError:
            raise _Invalid("the compressed body is not a zstd frame", ErrorCode.PROTOCOL) from None
        if size < 0:
            raise _Invalid("the zstd frame does not declare its content size", ErrorCode.PROTOCOL)
        if size > self._max_frame:
            raise _Invalid(
                f"decompressed body of {size} bytes exceeds max_frame {self._max_frame}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        # A decompressor per frame (a few µs): one kept per connection would hold its context
        # and window (megabytes after a large frame) for as long as the connection lives.
        dobj = zstandard.ZstdDecompressor().decompressobj()
        try:
            out = dobj.decompress(raw)
        except zstandard.ZstdError as exc:
            raise _Invalid(f"bad zstd data: {exc}", ErrorCode.PROTOCOL) from None
        if not dobj.eof or dobj.unused_data or len(out) != size:
            raise _Invalid("the compressed body is not exactly one zstd frame", ErrorCode.PROTOCOL)
        return out

    # ------------------------------------------------------------------ sending

    def note_sent(self, request_id: int) -> None:
        """Record that request frames up to *request_id* went out without :meth:`send` (a
        load generator writes frames it encoded once, with fresh headers): replies are then
        checked against it as after :meth:`send`.

        Raises:
            LocalProtocolError: the id does not rise above the last one, the connection is
                not open, or the server is draining (GOAWAY received).
        """
        if not self._client or not self._open or self._state is State.ERROR:
            raise LocalProtocolError("note_sent: only a client, on an open connection")
        if type(request_id) is not int or not self.last_request_id < request_id <= UINT32_MAX:
            raise LocalProtocolError(
                f"note_sent: request id {request_id} is not above {self.last_request_id}"
            )
        if self.goaway_last_id is not None:
            raise LocalProtocolError("note_sent: the server is draining (GOAWAY received)")
        self.last_request_id = request_id

    def send(self, event: Event) -> bytes:
        """The frame for *event*. Raises :class:`LocalProtocolError` (sending nothing) if the
        event is invalid or not allowed now -- including every send once the connection is
        finished: after a :class:`RemoteProtocolError`, :meth:`error_frame`, or a fatal ERROR
        of our own (replies still being computed then have nowhere to go)."""
        if self._state is State.ERROR or self._fatal_sent:
            raise LocalProtocolError("the connection has failed; nothing more may be sent")
        ftype = getattr(event, "TYPE", None)
        rid = getattr(event, "request_id", None)
        if type(event) not in _EVENT_TYPES or type(rid) is not int:
            raise LocalProtocolError(f"not a wire event: {event!r}")
        try:
            if not 0 <= rid <= UINT32_MAX:
                raise _Invalid(f"request id {rid} does not fit 32 bits", ErrorCode.PROTOCOL)
            self._admit(ftype, rid, outgoing=True)
            body = _body_of(event, check_dcc=self._client)
            # The checks of what we send are those of what we receive.
            _DECODE[ftype](rid, body, self._max_batch)
            try:
                raw = cbor2.dumps(body)
            except (cbor2.CBORError, ValueError, TypeError, OverflowError) as exc:
                raise _Invalid(f"cannot encode the body: {exc}") from None
            if len(raw) > self._max_frame:
                raise _Invalid(
                    f"body of {len(raw)} bytes exceeds max_frame {self._max_frame}",
                    ErrorCode.FRAME_TOO_LARGE,
                )
            self._passed(event, outgoing=True)
        except _Invalid as exc:
            raise LocalProtocolError(str(exc), exc.code, rid) from None
        flags = 0
        compress = self._compression is not None and ftype in _COMPRESSIBLE
        if compress and len(raw) > COMPRESS_THRESHOLD:
            if self._zc is None:
                self._zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            packed = self._zc.compress(raw)
            if len(packed) < len(raw):
                raw, flags = packed, FLAG_ZSTD
        return HEADER.pack(MAGIC, VERSION, ftype, flags << 24, rid, len(raw)) + raw

    def send_encoded_result(
        self, request_id: int, body: bytes, count: int, *, single: bool = False
    ) -> bytes:
        """The frame for a SIGN_BATCH_RESULT body of *count* results (with *single*: a
        SIGN_RESULT body) encoded already, by ``dccsign.native.encode_sign_batch_result``,
        which applies :meth:`send`'s checks to each result; the body is not decoded again.
        Every rule :meth:`send` applies to the frame applies here (state, direction, request
        id, 1..max_batch results, max_frame, compression), with its errors.

        Raises:
            LocalProtocolError: as :meth:`send` (nothing is sent).
        """
        if self._state is State.ERROR or self._fatal_sent:
            raise LocalProtocolError("the connection has failed; nothing more may be sent")
        ftype = FrameType.SIGN_RESULT if single else FrameType.SIGN_BATCH_RESULT
        if type(request_id) is not int or type(body) is not bytes or type(count) is not int:
            raise LocalProtocolError(
                "send_encoded_result: request_id, body, count: int, bytes, int"
            )
        rid = request_id
        try:
            if not 0 <= rid <= UINT32_MAX:
                raise _Invalid(f"request id {rid} does not fit 32 bits", ErrorCode.PROTOCOL)
            self._admit(ftype, rid, outgoing=True)
            limit = self._max_batch
            if single and count != 1:
                raise _Invalid("SIGN_RESULT carries exactly one result")
            if not single and not 0 < count <= limit:
                raise _bad("SIGN_BATCH_RESULT.results", f"must be an array of 1..{limit} results")
            if len(body) > self._max_frame:
                raise _Invalid(
                    f"body of {len(body)} bytes exceeds max_frame {self._max_frame}",
                    ErrorCode.FRAME_TOO_LARGE,
                )
        except _Invalid as exc:
            raise LocalProtocolError(str(exc), exc.code, rid) from None
        raw, flags = body, 0
        if self._compression is not None and not single and len(raw) > COMPRESS_THRESHOLD:
            if self._zc is None:
                self._zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            packed = self._zc.compress(raw)
            if len(packed) < len(raw):
                raw, flags = packed, FLAG_ZSTD
        return HEADER.pack(MAGIC, VERSION, ftype, flags << 24, rid, len(raw)) + raw

    def error_frame(self, exc: BaseException) -> bytes | None:
        """A last, fatal connection-level ERROR frame (request id 0) reporting *exc*, to send
        before closing; None if a fatal ERROR was already produced. Afterwards nothing more
        may be sent (state ERROR).

        A :class:`WireProtocolError` is reported with its code and message; any other
        exception as INTERNAL without details.
        """
        if self._fatal_sent:
            return None
        if isinstance(exc, WireProtocolError):
            code, message = exc.code, str(exc)
            if exc.request_id:
                message = f"request {exc.request_id}: {message}"
        else:
            code, message = ErrorCode.INTERNAL, "internal error"
        raw = cbor2.dumps({"code": int(code), "message": message[:MAX_MESSAGE], "fatal": True})
        self._fatal_sent = True
        self._state = State.ERROR
        return HEADER.pack(MAGIC, VERSION, FrameType.ERROR, 0, 0, len(raw)) + raw

    # ------------------------------------------------------------------ the rules

    def _admit(self, ftype: int, rid: int, outgoing: bool) -> None:
        """May this frame type, with this request id, flow this way now? The header-level
        rules, checked before a body is read (or built)."""
        from_client = self._client == outgoing
        if ftype not in (_CLIENT_SENDS if from_client else _SERVER_SENDS):
            raise _Invalid(f"a {_who(from_client)} may not send {_name(ftype)}", ErrorCode.PROTOCOL)
        if not outgoing and self._fatal_received:
            raise _Invalid(f"{_name(ftype)} after a fatal ERROR", ErrorCode.PROTOCOL)
        if ftype in _REQUESTS:
            if not self._open:
                raise _early(ftype)
            if rid <= self.last_request_id:
                raise _Invalid(
                    f"{_name(ftype)} request id {rid} is not above the previous request id "
                    f"{self.last_request_id}",
                    ErrorCode.PROTOCOL,
                )
            if outgoing and self.goaway_last_id is not None:
                raise _Invalid(
                    "the server is draining (GOAWAY received); use a new connection",
                    ErrorCode.SHUTTING_DOWN,
                )
        elif ftype in _REPLIES or (ftype == FrameType.ERROR and rid != 0):
            if from_client:  # only an ERROR gets here
                raise _Invalid("a client's ERROR must have request id 0", ErrorCode.PROTOCOL)
            if not self._open:
                raise _early(ftype)
            if not 0 < rid <= self.last_request_id:
                raise _Invalid(
                    f"{_name(ftype)} for request id {rid}, which the client never sent",
                    ErrorCode.PROTOCOL,
                )
        elif ftype == FrameType.ERROR:
            pass  # a connection-level ERROR may come at any time, even before the handshake
        elif ftype == FrameType.HELLO:
            if self.hello is not None:
                raise _Invalid("HELLO may be sent only once", ErrorCode.PROTOCOL)
        elif ftype == FrameType.WELCOME:
            if self.hello is None or self._open:
                raise _Invalid("WELCOME must answer the HELLO, once", ErrorCode.PROTOCOL)
        elif not self._open:  # PING, PONG, GOAWAY
            raise _early(ftype)
        if rid and ftype in _CONNECTION_LEVEL:
            raise _Invalid(f"{_name(ftype)} must have request id 0", ErrorCode.PROTOCOL)

    def _passed(self, ev: Any, outgoing: bool) -> None:
        """Body-level rules, then the state change, for an event that passed its checks."""
        t = type(ev)
        if t is Hello:
            if outgoing:
                self._check_own_hello(ev)
            elif not set(ev.versions) & set(SUPPORTED_VERSIONS):
                raise _Invalid(
                    f"no common protocol version: client offers {list(ev.versions)}, "
                    f"server speaks {list(SUPPORTED_VERSIONS)}",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            self.hello = ev
            self._state = State.AWAIT_WELCOME if self._client else State.SEND_WELCOME
        elif t is Welcome:
            self._check_welcome(ev, outgoing)
            self.welcome = ev
            self._open = True
            self._max_frame = ev.max_frame
            self._compression = ev.compression
            self._max_batch = ev.max_batch
            if self._state is not State.CLOSED:
                self._state = State.OPEN
        elif t is Sign or t is SignBatch or t is ListKeys:
            self.last_request_id = ev.request_id
        elif t is GoAway:
            last = ev.last_request_id
            if last > self.last_request_id:
                raise _Invalid(
                    f"GOAWAY last_request_id {last} is above the highest request id "
                    f"{self.last_request_id}",
                    ErrorCode.PROTOCOL,
                )
            if self.goaway_last_id is not None and last > self.goaway_last_id:
                raise _Invalid("GOAWAY last_request_id may not increase", ErrorCode.PROTOCOL)
            self.goaway_last_id = last
        elif t is Error and (ev.fatal or ev.request_id == 0):
            if outgoing:
                self._fatal_sent = True
                self._state = State.ERROR
            else:
                self._fatal_received = True

    def _check_own_hello(self, hello: Hello) -> None:
        for v in hello.versions:
            if v not in SUPPORTED_VERSIONS:
                raise _Invalid(f"HELLO.versions: this codec does not speak version {v}")
        for c in hello.compression:
            if c not in self.local_compression:
                raise _Invalid(f"HELLO.compression: {c!r} is not enabled on this connection")
        if hello.max_frame > self.local_max_frame:
            raise _Invalid(
                f"HELLO.max_frame {hello.max_frame} is above this connection's limit "
                f"{self.local_max_frame}"
            )

    def _check_welcome(self, w: Welcome, outgoing: bool) -> None:
        hello = self.hello
        assert hello is not None  # _admit saw to it
        code = ErrorCode.BAD_REQUEST if outgoing else ErrorCode.PROTOCOL
        if w.version not in hello.versions or w.version not in SUPPORTED_VERSIONS:
            raise _Invalid(f"WELCOME.version {w.version} was not offered", code)
        if w.max_frame > hello.max_frame:
            raise _Invalid(
                f"WELCOME.max_frame {w.max_frame} is above the offered {hello.max_frame}", code
            )
        if outgoing and w.max_frame > self.local_max_frame:
            raise _Invalid(
                f"WELCOME.max_frame {w.max_frame} is above this server's {self.local_max_frame}",
                code,
            )
        if w.compression is not None and (
            w.compression not in hello.compression or w.compression not in self.local_compression
        ):
            raise _Invalid(f"WELCOME.compression {w.compression!r} was not offered", code)


_EVENT_TYPES = frozenset(
    {
        Hello,
        Welcome,
        Ping,
        Pong,
        Sign,
        SignBatch,
        SignResult,
        SignBatchResult,
        ListKeys,
        Keys,
        GoAway,
        Error,
    }
)
