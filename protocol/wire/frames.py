"""Frames: the 16-byte header, the frame types, and the compression of bodies.

Layout (all integers big-endian)::

    offset  size  field
    0       2     magic b"DC"
    2       1     version (1)
    3       1     frame type (FrameType)
    4       1     flags: bit 0 = the body is zstandard-compressed; other bits must be 0
    5       3     reserved, must be zero
    8       4     request id (uint32)
    12      4     body length N (uint32; the compressed length if bit 0 is set)
    16      N     body: exactly one CBOR item, a map with short text keys

What a header may say on a given connection (size, direction, request id) is the business of
:mod:`.state` and :mod:`.connection`; this module knows only what holds for every frame.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import zstandard

from ..codes import ErrorCode
from .errors import Invalid

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
#: zstd level of compressed bodies: the engine compresses every reply on its event loop, and
#: on HC1 strings the fastest level loses next to nothing in size against the default
#: (bench/README.md has the comparison).
ZSTD_LEVEL = 1


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


_TYPES = frozenset(int(t) for t in FrameType)
#: The frame types whose bodies are compressed when compression was negotiated.
COMPRESSIBLE = frozenset({FrameType.SIGN_BATCH, FrameType.SIGN_BATCH_RESULT})


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


class HeaderError(Invalid):
    """A header breaks a rule that holds for every frame; ``request_id`` is the id to report
    (0 while the header cannot be trusted to have one)."""

    def __init__(self, message: str, code: ErrorCode, request_id: int) -> None:
        super().__init__(message, code)
        self.request_id = request_id


def read_header(buf: bytearray) -> tuple[int, int, int, int]:
    """The frame type, flags, request id and body length of the header that starts *buf*
    (at least :data:`HEADER_SIZE` bytes).

    Raises:
        HeaderError: bad magic, version, reserved bytes or flag bits (request id 0: nothing
            else in such a header can be believed), or an unknown frame type.
    """
    magic, version, ftype, flags, rid, length = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise HeaderError(
            f"bad magic {bytes(magic)!r}: not a dccsign wire frame", ErrorCode.PROTOCOL, 0
        )
    if version != VERSION:
        raise HeaderError(f"unsupported frame version {version}", ErrorCode.UNSUPPORTED_VERSION, 0)
    if flags & 0x00FFFFFF:
        raise HeaderError("reserved header bytes must be zero", ErrorCode.PROTOCOL, 0)
    flags >>= 24
    if flags & ~FLAG_ZSTD:
        raise HeaderError(f"unknown flag bits 0x{flags:02x}", ErrorCode.PROTOCOL, 0)
    if ftype not in _TYPES:
        raise HeaderError(f"unknown frame type 0x{ftype:02x}", ErrorCode.PROTOCOL, rid)
    return ftype, flags, rid, length


def pack_frame(ftype: int, flags: int, request_id: int, raw: bytes) -> bytes:
    """The frame of body *raw* (compressed already when *flags* says so)."""
    return HEADER.pack(MAGIC, VERSION, ftype, flags << 24, request_id, len(raw)) + raw


def declared_size(raw: bytes) -> int:
    """The decompressed size a compressed body declares; 0 when it declares none or is not a
    zstd frame (decoding says what is wrong with it)."""
    try:
        return max(zstandard.frame_content_size(raw), 0)
    except zstandard.ZstdError:
        return 0


def compress_body(zc: zstandard.ZstdCompressor, raw: bytes) -> tuple[bytes, int]:
    """*raw* compressed with *zc* and :data:`FLAG_ZSTD`, or *raw* and no flags when
    compressing does not make it smaller."""
    packed = zc.compress(raw)
    if len(packed) < len(raw):
        return packed, FLAG_ZSTD
    return raw, 0


def decompress_body(raw: bytes, max_frame: int) -> bytes:
    """The body of a compressed frame: exactly one zstd frame that declares its size, at most
    *max_frame* bytes once decompressed.

    Raises:
        Invalid: any of that is not so (PROTOCOL, or FRAME_TOO_LARGE for the size).
    """
    try:
        size = zstandard.frame_content_size(raw)
    except zstandard.ZstdError:
        raise Invalid("the compressed body is not a zstd frame", ErrorCode.PROTOCOL) from None
    if size < 0:
        raise Invalid("the zstd frame does not declare its content size", ErrorCode.PROTOCOL)
    if size > max_frame:
        raise Invalid(
            f"decompressed body of {size} bytes exceeds max_frame {max_frame}",
            ErrorCode.FRAME_TOO_LARGE,
        )
    # A decompressor per frame: one kept per connection would hold its context and window
    # (megabytes after a large frame) for as long as the connection lives.
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(raw)
    except zstandard.ZstdError as exc:
        raise Invalid(f"bad zstd data: {exc}", ErrorCode.PROTOCOL) from None
    if not dobj.eof or dobj.unused_data or len(out) != size:
        raise Invalid("the compressed body is not exactly one zstd frame", ErrorCode.PROTOCOL)
    return out
