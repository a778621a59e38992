"""The connection: bytes in, events out, and back, for one end of one portal <-> engine
connection. No I/O: the owner feeds received bytes in and writes the returned bytes out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import zstandard

from .. import cborlimits
from ..codes import ErrorCode
from ..sentinels import NEED_DATA, NeedData
from .bodies import MAX_MESSAGE, READERS, bad, body_item_limit, body_of, decode_cbor
from .errors import Invalid, LocalProtocolError, RemoteProtocolError, WireProtocolError
from .events import EVENT_TYPES, Event, Hello, Welcome
from .frames import (
    COMPRESS_THRESHOLD,
    COMPRESSIBLE,
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    MIN_MAX_FRAME,
    SUPPORTED_COMPRESSION,
    SUPPORTED_VERSIONS,
    UINT32_MAX,
    ZSTD_LEVEL,
    Frame,
    FrameType,
    HeaderError,
    compress_body,
    declared_size,
    decompress_body,
    pack_frame,
    read_header,
)
from .state import REQUESTS, Exchange, Role, State


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
        # Everything the protocol's rules depend on lives there; this object holds the bytes.
        self._x = Exchange(self.role, max_frame, self.local_compression)
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
        return self._x.state

    @property
    def hello(self) -> Hello | None:
        """The HELLO of this connection, once it has passed."""
        return self._x.hello

    @property
    def welcome(self) -> Welcome | None:
        """The WELCOME of this connection, once it has passed."""
        return self._x.welcome

    @property
    def last_request_id(self) -> int:
        """The highest request id on this connection (sent by a client, received by a
        server). A load generator that writes pre-encoded frames may raise it (see also
        :meth:`note_sent`)."""
        return self._x.last_request_id

    @last_request_id.setter
    def last_request_id(self, value: int) -> None:
        self._x.last_request_id = value

    @property
    def goaway_last_id(self) -> int | None:
        """``last_request_id`` of the latest GOAWAY (None: the server is not draining)."""
        return self._x.goaway_last_id

    @property
    def max_frame(self) -> int:
        """The current frame limit: MIN_MAX_FRAME until the handshake, then the negotiated one."""
        return self._x.max_frame

    @property
    def compression(self) -> str | None:
        """The negotiated compression (``"zstd"``), or None."""
        return self._x.compression

    @property
    def max_batch(self) -> int | None:
        """WELCOME's max_batch, once the handshake is done."""
        welcome = self._x.welcome
        return welcome.max_batch if welcome else None

    @property
    def max_in_flight(self) -> int | None:
        welcome = self._x.welcome
        return welcome.max_in_flight if welcome else None

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
        if self._client or hello is None or self._x.state is not State.SEND_WELCOME:
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
            self._x.passed(event, outgoing=False)
        except Invalid as exc:
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
        if not self._undecoded or frame.type not in REQUESTS:
            raise LocalProtocolError("refuse_frame: only the request frame just taken")
        self._x.last_request_id = frame.request_id
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
            name = FrameType(frame.type).name
            raise LocalProtocolError(f"decode_walked: {name} is not a sign request")
        x = self._x
        try:
            raw = frame.body
            if frame.compressed:
                raw = decompress_body(raw, x.max_frame)
            view = walk(raw, x.max_batch, single=frame.type == FrameType.SIGN)
            x.last_request_id = frame.request_id  # what passed() does for Sign / SignBatch
        except Invalid as exc:
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
        max_batch = self._x.max_batch
        if frame.compressed:
            raw = decompress_body(raw, self._x.max_frame)
        body = decode_cbor(raw, self._scan, body_item_limit(max_batch))
        return READERS[frame.type](frame.request_id, body, max_batch)  # type: ignore[no-any-return]

    def _failed(self, message: str, code: ErrorCode, rid: int) -> RemoteProtocolError:
        """Enter state ERROR and return the error to raise (later calls raise a new copy)."""
        self._error = (message, code, rid)
        self._x.peer_failed()
        return RemoteProtocolError(message, code, rid)

    def _take_frame(self) -> Frame | tuple[str, ErrorCode, int] | NeedData | None:
        """A complete frame, NEED_DATA, None at a clean end, or (message, code, request id)
        of the first rule that the buffered bytes break."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            if buf:
                return "the stream ended inside a frame header", ErrorCode.PROTOCOL, 0
            self._x.peer_closed()
            return None
        try:
            ftype, flags, rid, length = read_header(buf)
        except HeaderError as exc:
            return str(exc), exc.code, exc.request_id
        try:
            self._admit_header(ftype, flags, rid, length)
        except Invalid as exc:
            return str(exc), exc.code, rid
        end = HEADER_SIZE + length
        if len(buf) < end:
            if self._eof:
                return "the stream ended inside a frame body", ErrorCode.PROTOCOL, rid
            return NEED_DATA
        with memoryview(buf) as view:
            raw = bytes(view[HEADER_SIZE:end])  # one copy, then the buffer may shrink
        del buf[:end]
        return Frame(ftype, rid, bool(flags), raw, declared_size(raw) if flags else length)

    def _admit_header(self, ftype: int, flags: int, rid: int, length: int) -> None:
        """The rules of this connection for a received header: compression, size, and what
        the exchange admits (:meth:`Exchange.admit`)."""
        x = self._x
        if flags and x.compression is None:
            raise Invalid(
                "a compressed frame, but no compression was negotiated", ErrorCode.PROTOCOL
            )
        if length > x.max_frame:
            raise Invalid(
                f"frame of {length} bytes exceeds max_frame {x.max_frame}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        x.admit(ftype, rid, outgoing=False)

    # ------------------------------------------------------------------ sending

    def note_sent(self, request_id: int) -> None:
        """Record that request frames up to *request_id* went out without :meth:`send` (a
        load generator writes frames it encoded once, with fresh headers): replies are then
        checked against it as after :meth:`send`.

        Raises:
            LocalProtocolError: the id does not rise above the last one, the connection is
                not open, or the server is draining (GOAWAY received).
        """
        x = self._x
        if not self._client or x.welcome is None or x.state is State.ERROR:
            raise LocalProtocolError("note_sent: only a client, on an open connection")
        if type(request_id) is not int or not x.last_request_id < request_id <= UINT32_MAX:
            raise LocalProtocolError(
                f"note_sent: request id {request_id} is not above {x.last_request_id}"
            )
        if x.goaway_last_id is not None:
            raise LocalProtocolError("note_sent: the server is draining (GOAWAY received)")
        x.last_request_id = request_id

    def send(self, event: Event) -> bytes:
        """The frame for *event*. Raises :class:`LocalProtocolError` (sending nothing) if the
        event is invalid or not allowed now -- including every send once the connection is
        finished: after a :class:`RemoteProtocolError`, :meth:`error_frame`, or a fatal ERROR
        of our own (replies still being computed then have nowhere to go)."""
        self._check_not_finished()
        ftype = getattr(event, "TYPE", None)
        rid = getattr(event, "request_id", None)
        if type(event) not in EVENT_TYPES or type(rid) is not int:
            raise LocalProtocolError(f"not a wire event: {event!r}")
        x = self._x
        try:
            self._admit_outgoing(ftype, rid)
            body = body_of(event, check_dcc=self._client)
            # The checks of what we send are those of what we receive.
            READERS[ftype](rid, body, x.max_batch)
            try:
                raw = cbor2.dumps(body)
            except (cbor2.CBORError, ValueError, TypeError, OverflowError) as exc:
                raise Invalid(f"cannot encode the body: {exc}") from None
            self._check_body_size(len(raw))
            x.passed(event, outgoing=True)
        except Invalid as exc:
            raise LocalProtocolError(str(exc), exc.code, rid) from None
        return self._frame(ftype, rid, raw, ftype in COMPRESSIBLE)

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
        self._check_not_finished()
        ftype = FrameType.SIGN_RESULT if single else FrameType.SIGN_BATCH_RESULT
        if type(request_id) is not int or type(body) is not bytes or type(count) is not int:
            raise LocalProtocolError(
                "send_encoded_result: request_id, body, count: int, bytes, int"
            )
        rid = request_id
        try:
            self._admit_outgoing(ftype, rid)
            limit = self._x.max_batch
            if single and count != 1:
                raise Invalid("SIGN_RESULT carries exactly one result")
            if not single and not 0 < count <= limit:
                raise bad("SIGN_BATCH_RESULT.results", f"must be an array of 1..{limit} results")
            self._check_body_size(len(body))
        except Invalid as exc:
            raise LocalProtocolError(str(exc), exc.code, rid) from None
        return self._frame(ftype, rid, body, not single)

    def error_frame(self, exc: BaseException) -> bytes | None:
        """A last, fatal connection-level ERROR frame (request id 0) reporting *exc*, to send
        before closing; None if a fatal ERROR was already produced. Afterwards nothing more
        may be sent (state ERROR).

        A :class:`WireProtocolError` is reported with its code and message; any other
        exception as INTERNAL without details.
        """
        if self._x.fatal_sent:
            return None
        if isinstance(exc, WireProtocolError):
            code, message = exc.code, str(exc)
            if exc.request_id:
                message = f"request {exc.request_id}: {message}"
        else:
            code, message = ErrorCode.INTERNAL, "internal error"
        raw = cbor2.dumps({"code": int(code), "message": message[:MAX_MESSAGE], "fatal": True})
        self._x.sent_fatal()
        return pack_frame(FrameType.ERROR, 0, 0, raw)

    def _check_not_finished(self) -> None:
        if self._x.state is State.ERROR or self._x.fatal_sent:
            raise LocalProtocolError("the connection has failed; nothing more may be sent")

    def _admit_outgoing(self, ftype: int, rid: int) -> None:
        if not 0 <= rid <= UINT32_MAX:
            raise Invalid(f"request id {rid} does not fit 32 bits", ErrorCode.PROTOCOL)
        self._x.admit(ftype, rid, outgoing=True)

    def _check_body_size(self, size: int) -> None:
        max_frame = self._x.max_frame
        if size > max_frame:
            raise Invalid(
                f"body of {size} bytes exceeds max_frame {max_frame}", ErrorCode.FRAME_TOO_LARGE
            )

    def _frame(self, ftype: int, rid: int, raw: bytes, compressible: bool) -> bytes:
        """The frame of body *raw*, compressed when that was negotiated, the frame type may
        be, the body is long enough to gain, and compressing does make it smaller."""
        flags = 0
        if compressible and self._x.compression is not None and len(raw) > COMPRESS_THRESHOLD:
            if self._zc is None:
                self._zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            raw, flags = compress_body(self._zc, raw)
        return pack_frame(ftype, flags, rid, raw)
