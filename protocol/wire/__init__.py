"""The portal <-> engine codec (sans-IO: no sockets, no trio, no engine imports).

A portal backend (the client) connects to the engine (the server) over TCP+TLS or a Unix
socket, says HELLO, gets WELCOME, and then sends DCCs to be signed; the engine answers with
``HC1:`` strings. This module turns bytes into events and events into bytes, and enforces
everything about the exchange that can be checked without knowing the engine: the framing,
the handshake, which side may send what, request-id order, compression, and the types and
limits of every body field. ``protocol/SPEC.md`` is the normative description (written so a
client can be built from it alone); this docstring is the summary.

The package is split the h11 way: :mod:`.frames` (the 16-byte header, frame types,
compression), :mod:`.events` (one dataclass per frame type), :mod:`.bodies` (each body's
reader and writer, in one table), :mod:`.state` (who may send what when: the rules and the
state they move) and :mod:`.connection` (the object that ties them to a byte stream).

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

from ..codes import RETRYABLE, ErrorCode
from ..sentinels import NEED_DATA
from . import events
from .bodies import (
    DCC_MAX_DEPTH,
    INT64_MAX,
    INT64_MIN,
    ITEMS_BASE,
    ITEMS_PER_BATCH_ENTRY,
    ITEMS_PER_KEY,
    KID_SIZE,
    MAX_ALG_NAME,
    MAX_DEPTH,
    MAX_DSC,
    MAX_HC1,
    MAX_IDEMPOTENCY_KEY,
    MAX_KEYS,
    MAX_LIST,
    MAX_MESSAGE,
    MAX_PING_DATA,
    MAX_STATE,
    MAX_TEXT,
    MAX_VALIDITY_DAYS,
    body_item_limit,
)
from .connection import Connection
from .errors import BodyError, LocalProtocolError, RemoteProtocolError, WireProtocolError
from .events import *  # noqa: F403 -- the events' __all__ is part of this API
from .frames import (
    COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME,
    FLAG_ZSTD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MIN_MAX_FRAME,
    SUPPORTED_COMPRESSION,
    SUPPORTED_VERSIONS,
    UINT32_MAX,
    VERSION,
    ZSTD_LEVEL,
    Frame,
    FrameType,
)
from .state import CLIENT, SERVER, Role, State

__all__ = [
    "CLIENT",
    "COMPRESS_THRESHOLD",
    "DCC_MAX_DEPTH",
    "DEFAULT_MAX_FRAME",
    "FLAG_ZSTD",
    "HEADER",
    "HEADER_SIZE",
    "INT64_MAX",
    "INT64_MIN",
    "ITEMS_BASE",
    "ITEMS_PER_BATCH_ENTRY",
    "ITEMS_PER_KEY",
    "KID_SIZE",
    "MAGIC",
    "MAX_ALG_NAME",
    "MAX_DEPTH",
    "MAX_DSC",
    "MAX_HC1",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_KEYS",
    "MAX_LIST",
    "MAX_MESSAGE",
    "MAX_PING_DATA",
    "MAX_STATE",
    "MAX_TEXT",
    "MAX_VALIDITY_DAYS",
    "MIN_MAX_FRAME",
    "NEED_DATA",
    "RETRYABLE",
    "SERVER",
    "SUPPORTED_COMPRESSION",
    "SUPPORTED_VERSIONS",
    "UINT32_MAX",
    "VERSION",
    "ZSTD_LEVEL",
    "BodyError",
    "Connection",
    "ErrorCode",
    "Frame",
    "FrameType",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Role",
    "State",
    "WireProtocolError",
    "body_item_limit",
    *events.__all__,
]
