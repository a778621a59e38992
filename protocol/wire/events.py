"""The events of the exchange: what a frame means once its body is decoded.

One frozen dataclass per frame type (``TYPE`` names it), plus the per-item values they carry
(:class:`SignItem`, :class:`ItemResult`, :class:`KeyInfo`). Constructing an event checks
nothing: the body readers (:mod:`.bodies`) check what is received, and
:meth:`Connection.send` runs what is sent through the same readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..codes import RETRYABLE, ErrorCode
from .frames import DEFAULT_MAX_FRAME, SUPPORTED_VERSIONS, VERSION, FrameType

# Everything in __all__ is re-exported as part of the wire package's public API.
__all__ = [
    "Error",
    "Event",
    "GoAway",
    "Hello",
    "ItemResult",
    "KeyInfo",
    "Keys",
    "ListKeys",
    "Ping",
    "Pong",
    "Sign",
    "SignBatch",
    "SignBatchResult",
    "SignItem",
    "SignResult",
    "Welcome",
]


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

#: Each known error code by its number (a code this codec does not know stays a plain int).
CODES: dict[int, ErrorCode] = {int(c): c for c in ErrorCode}


def _retryable(code: int) -> bool:
    known = CODES.get(code)
    if known is not None:
        return known in RETRYABLE
    return 40 <= code < 60  # the class of an unknown code (see codes.py)


#: Every event class: what :meth:`Connection.send` accepts.
EVENT_TYPES = frozenset(
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
