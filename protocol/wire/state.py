"""The state of one exchange and the rules that move it: who may send which frame when.

:class:`Exchange` holds everything the rules depend on (the handshake's outcome, the request
ids seen, GOAWAY, fatal errors); :data:`RULES` says, for every frame type, who may send it
and which rule admits its header; :data:`TRANSITIONS` says what each event that passed its
checks changes. The :class:`~.connection.Connection` asks :meth:`Exchange.admit` before a
body is read (or built) and tells :meth:`Exchange.passed` once it was.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..codes import ErrorCode
from .errors import Invalid
from .events import Error, GoAway, Hello, ListKeys, Sign, SignBatch, Welcome
from .frames import MIN_MAX_FRAME, SUPPORTED_VERSIONS, FrameType


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


class Kind(enum.Enum):
    """Which admission rule a frame type's header goes through."""

    HELLO = "hello"  # once, first
    WELCOME = "welcome"  # once, answering the HELLO
    REQUEST = "request"  # after the handshake, with a rising request id
    REPLY = "reply"  # after the handshake, for a request id the client sent
    ERROR = "error"  # a reply when it has a request id, else any time
    OPEN = "open"  # any time after the handshake


@dataclass(frozen=True, slots=True)
class Rule:
    senders: frozenset[Role]
    kind: Kind
    #: The frame concerns the connection, not a request: its request id must be 0.
    connection_level: bool = False


_CLIENT_ONLY = frozenset({CLIENT})
_SERVER_ONLY = frozenset({SERVER})
_EITHER = frozenset({CLIENT, SERVER})

#: Every frame type: who may send it, and the rule that admits its header.
RULES: dict[int, Rule] = {
    FrameType.HELLO: Rule(_CLIENT_ONLY, Kind.HELLO, connection_level=True),
    FrameType.WELCOME: Rule(_SERVER_ONLY, Kind.WELCOME, connection_level=True),
    FrameType.PING: Rule(_EITHER, Kind.OPEN),
    FrameType.PONG: Rule(_EITHER, Kind.OPEN),
    FrameType.SIGN: Rule(_CLIENT_ONLY, Kind.REQUEST),
    FrameType.SIGN_BATCH: Rule(_CLIENT_ONLY, Kind.REQUEST),
    FrameType.LIST_KEYS: Rule(_CLIENT_ONLY, Kind.REQUEST),
    FrameType.SIGN_RESULT: Rule(_SERVER_ONLY, Kind.REPLY),
    FrameType.SIGN_BATCH_RESULT: Rule(_SERVER_ONLY, Kind.REPLY),
    FrameType.KEYS: Rule(_SERVER_ONLY, Kind.REPLY),
    FrameType.GOAWAY: Rule(_SERVER_ONLY, Kind.OPEN, connection_level=True),
    FrameType.ERROR: Rule(_EITHER, Kind.ERROR),
}
#: The request frame types (a receiver may refuse one from its header alone).
REQUESTS = frozenset(t for t, rule in RULES.items() if rule.kind is Kind.REQUEST)


def _name(ftype: int) -> str:
    return FrameType(ftype).name


def _early(ftype: int) -> Invalid:
    return Invalid(f"{_name(ftype)} before the handshake is complete", ErrorCode.PROTOCOL)


class Exchange:
    """What one connection's exchange has come to, from this side's point of view.

    *role* is this side; *local_max_frame* and *local_compression* are what this side
    offers (a client) or allows (a server). The attributes are read by the connection and its
    owner; they change only through :meth:`passed` and the three endings
    (:meth:`peer_closed`, :meth:`peer_failed`, :meth:`sent_fatal`).
    """

    def __init__(
        self, role: Role, local_max_frame: int, local_compression: tuple[str, ...]
    ) -> None:
        self.role = role
        self.client = role is CLIENT
        self.local_max_frame = local_max_frame
        self.local_compression = local_compression
        self.state = State.IDLE
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        # The negotiated limits: the pre-handshake ones until WELCOME passes.
        self.max_frame = MIN_MAX_FRAME
        self.compression: str | None = None
        self.max_batch = 0
        #: The highest request id (sent by a client, received by a server).
        self.last_request_id = 0
        #: ``last_request_id`` of the latest GOAWAY (None: the server is not draining).
        self.goaway_last_id: int | None = None
        self.fatal_sent = False
        self.fatal_received = False

    # ------------------------------------------------------------------ endings

    def peer_closed(self) -> None:
        if self.state is not State.ERROR:
            self.state = State.CLOSED

    def peer_failed(self) -> None:
        self.state = State.ERROR

    def sent_fatal(self) -> None:
        self.fatal_sent = True
        self.state = State.ERROR

    # ------------------------------------------------------------------ headers

    def admit(self, ftype: int, rid: int, outgoing: bool) -> None:
        """May a frame of type *ftype* with request id *rid* flow this way now? The
        header-level rules, checked before a body is read (or built).

        Raises:
            Invalid: it may not (PROTOCOL, or SHUTTING_DOWN for a request to a draining
                server).
        """
        rule = RULES[ftype]
        sender = self.role if outgoing else (SERVER if self.client else CLIENT)
        if sender not in rule.senders:
            raise Invalid(f"a {sender.value} may not send {_name(ftype)}", ErrorCode.PROTOCOL)
        if not outgoing and self.fatal_received:
            raise Invalid(f"{_name(ftype)} after a fatal ERROR", ErrorCode.PROTOCOL)
        _ADMIT[rule.kind](self, ftype, rid, sender, outgoing)
        if rid and rule.connection_level:
            raise Invalid(f"{_name(ftype)} must have request id 0", ErrorCode.PROTOCOL)

    def _admit_request(self, ftype: int, rid: int, sender: Role, outgoing: bool) -> None:
        if self.welcome is None:
            raise _early(ftype)
        if rid <= self.last_request_id:
            raise Invalid(
                f"{_name(ftype)} request id {rid} is not above the previous request id "
                f"{self.last_request_id}",
                ErrorCode.PROTOCOL,
            )
        if outgoing and self.goaway_last_id is not None:
            raise Invalid(
                "the server is draining (GOAWAY received); use a new connection",
                ErrorCode.SHUTTING_DOWN,
            )

    def _admit_reply(self, ftype: int, rid: int, sender: Role, outgoing: bool) -> None:
        if self.welcome is None:
            raise _early(ftype)
        if not 0 < rid <= self.last_request_id:
            raise Invalid(
                f"{_name(ftype)} for request id {rid}, which the client never sent",
                ErrorCode.PROTOCOL,
            )

    def _admit_error(self, ftype: int, rid: int, sender: Role, outgoing: bool) -> None:
        # A connection-level ERROR (id 0) may come at any time, even before the handshake;
        # one about a request is a reply.
        if rid != 0:
            if sender is CLIENT:
                raise Invalid("a client's ERROR must have request id 0", ErrorCode.PROTOCOL)
            self._admit_reply(ftype, rid, sender, outgoing)

    def _admit_hello(self, ftype: int, rid: int, sender: Role, outgoing: bool) -> None:
        if self.hello is not None:
            raise Invalid("HELLO may be sent only once", ErrorCode.PROTOCOL)

    def _admit_welcome(self, ftype: int, rid: int, sender: Role, outgoing: bool) -> None:
        if self.hello is None or self.welcome is not None:
            raise Invalid("WELCOME must answer the HELLO, once", ErrorCode.PROTOCOL)

    def _admit_open(self, ftype: int, rid: int, sender: Role, outgoing: bool) -> None:
        if self.welcome is None:
            raise _early(ftype)

    # ------------------------------------------------------------------ events

    def passed(self, event: Any, outgoing: bool) -> None:
        """Apply the body-level rules to *event*, which passed its body's checks, then the
        state change it makes (:data:`TRANSITIONS`; events not named there change nothing).

        Raises:
            Invalid: a body-level rule fails (nothing changed).
        """
        transition = TRANSITIONS.get(type(event))
        if transition is not None:
            transition(self, event, outgoing)

    def _pass_hello(self, hello: Hello, outgoing: bool) -> None:
        if outgoing:
            self._check_own_hello(hello)
        elif not set(hello.versions) & set(SUPPORTED_VERSIONS):
            raise Invalid(
                f"no common protocol version: client offers {list(hello.versions)}, "
                f"server speaks {list(SUPPORTED_VERSIONS)}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        self.hello = hello
        self.state = State.AWAIT_WELCOME if self.client else State.SEND_WELCOME

    def _pass_welcome(self, welcome: Welcome, outgoing: bool) -> None:
        self._check_welcome(welcome, outgoing)
        self.welcome = welcome
        self.max_frame = welcome.max_frame
        self.compression = welcome.compression
        self.max_batch = welcome.max_batch
        if self.state is not State.CLOSED:
            self.state = State.OPEN

    def _pass_request(self, request: Sign | SignBatch | ListKeys, outgoing: bool) -> None:
        self.last_request_id = request.request_id

    def _pass_goaway(self, goaway: GoAway, outgoing: bool) -> None:
        last = goaway.last_request_id
        if last > self.last_request_id:
            raise Invalid(
                f"GOAWAY last_request_id {last} is above the highest request id "
                f"{self.last_request_id}",
                ErrorCode.PROTOCOL,
            )
        if self.goaway_last_id is not None and last > self.goaway_last_id:
            raise Invalid("GOAWAY last_request_id may not increase", ErrorCode.PROTOCOL)
        self.goaway_last_id = last

    def _pass_error(self, error: Error, outgoing: bool) -> None:
        if error.fatal or error.request_id == 0:
            if outgoing:
                self.sent_fatal()
            else:
                self.fatal_received = True

    def _check_own_hello(self, hello: Hello) -> None:
        for v in hello.versions:
            if v not in SUPPORTED_VERSIONS:
                raise Invalid(f"HELLO.versions: this codec does not speak version {v}")
        for c in hello.compression:
            if c not in self.local_compression:
                raise Invalid(f"HELLO.compression: {c!r} is not enabled on this connection")
        if hello.max_frame > self.local_max_frame:
            raise Invalid(
                f"HELLO.max_frame {hello.max_frame} is above this connection's limit "
                f"{self.local_max_frame}"
            )

    def _check_welcome(self, w: Welcome, outgoing: bool) -> None:
        hello = self.hello
        assert hello is not None  # admit saw to it
        code = ErrorCode.BAD_REQUEST if outgoing else ErrorCode.PROTOCOL
        if w.version not in hello.versions or w.version not in SUPPORTED_VERSIONS:
            raise Invalid(f"WELCOME.version {w.version} was not offered", code)
        if w.max_frame > hello.max_frame:
            raise Invalid(
                f"WELCOME.max_frame {w.max_frame} is above the offered {hello.max_frame}", code
            )
        if outgoing and w.max_frame > self.local_max_frame:
            raise Invalid(
                f"WELCOME.max_frame {w.max_frame} is above this server's {self.local_max_frame}",
                code,
            )
        if w.compression is not None and (
            w.compression not in hello.compression or w.compression not in self.local_compression
        ):
            raise Invalid(f"WELCOME.compression {w.compression!r} was not offered", code)


_Admit = Callable[[Exchange, int, int, Role, bool], None]
_ADMIT: dict[Kind, _Admit] = {
    Kind.HELLO: Exchange._admit_hello,
    Kind.WELCOME: Exchange._admit_welcome,
    Kind.REQUEST: Exchange._admit_request,
    Kind.REPLY: Exchange._admit_reply,
    Kind.ERROR: Exchange._admit_error,
    Kind.OPEN: Exchange._admit_open,
}

#: What each event that passed its checks changes (the state-transition table).
TRANSITIONS: dict[type, Callable[[Exchange, Any, bool], None]] = {
    Hello: Exchange._pass_hello,
    Welcome: Exchange._pass_welcome,
    Sign: Exchange._pass_request,
    SignBatch: Exchange._pass_request,
    ListKeys: Exchange._pass_request,
    GoAway: Exchange._pass_goaway,
    Error: Exchange._pass_error,
}
