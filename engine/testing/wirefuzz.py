"""Hostile portal sessions for fuzzing a live engine (tests/test_attacks.py, bench/fuzz_live.py).

:class:`SessionFuzzer` turns a seed into sessions: the byte chunks one connection sends. Most
start with a valid HELLO (so the fuzz reaches the frames behind the handshake); then come
frames that are valid, mutated (bit flips, truncations, spliced garbage, rewritten header
fields), or built to hurt (random CBOR of hostile shapes, compressed bombs, deep nesting,
lengths past max_frame, request ids out of order). The same seed gives the same sessions, so
a crash found by a campaign can be replayed.

:func:`run_session` plays one session against an engine's Unix socket, reads whatever comes
back until the engine closes or a short time passes, and closes (sometimes with a reset).
The engine must survive every session; what it answers is not checked here.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass, field

import cbor2
import zstandard

from ..protocol import wire
from ..protocol.codes import ErrorCode
from .samples import varied_samples

__all__ = ["SessionFuzzer", "SessionResult", "run_session"]

_KID = bytes(range(8))


def _valid_frames(codec: wire.Connection) -> list[bytes]:
    """Frames a well-behaved client could send on an open connection, in order."""
    dccs = varied_samples(12)
    items = [
        wire.SignItem(d, f"uzi:{9000 + i}", operator="op:1", validity_days=30,
                      idempotency_key=f"fuzz-{i}")
        for i, d in enumerate(dccs)
    ]  # fmt: skip
    return [
        codec.send(wire.Sign(request_id=2, item=items[0])),
        codec.send(wire.SignBatch(request_id=3, items=tuple(items))),  # compressed (zstd)
        codec.send(wire.ListKeys(request_id=4)),
        codec.send(wire.Ping(request_id=5, data=b"fuzz")),
        codec.send(wire.Pong(request_id=6, data=b"")),
        codec.send(wire.SignBatch(request_id=7, items=tuple(items[:3]))),
        codec.send(wire.Sign(request_id=8, item=wire.SignItem(dccs[1], "uzi:1", kid=_KID))),
        codec.send(wire.Error(request_id=0, code=ErrorCode.PROTOCOL, message="bye", fatal=True)),
    ]


def _opened_client() -> tuple[wire.Connection, bytes]:
    client = wire.Connection(wire.CLIENT)
    server = wire.Connection(wire.SERVER)
    hello = client.send(client.make_hello("fuzz"))
    server.receive_data(hello)
    server.next_event()
    client.receive_data(
        server.send(server.make_welcome(max_batch=1000, max_in_flight=32, server="fuzz"))
    )
    client.next_event()
    return client, hello


def _header(ftype: int, rid: int, length: int, flags: int = 0) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, ftype, flags << 24, rid, length)


@dataclass
class SessionResult:
    """What one session did: bytes sent, whether the engine closed on it, what it sent back."""

    sent: int = 0
    closed_by_engine: bool = False
    replies: list[bytes] = field(default_factory=list)


class SessionFuzzer:
    """Sessions of hostile frames from *seed* (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        codec, self.hello = _opened_client()
        self.valid = _valid_frames(codec)
        self._zc = zstandard.ZstdCompressor(level=19)
        # One bomb per size class, made once: compressing megabytes per frame would make
        # the fuzzer, not the engine, the bottleneck.
        self.bombs = [
            self._zc.compress(self._bomb_body(size)) for size in (4096, 300_000, 4_000_000)
        ]

    # -- bodies -----------------------------------------------------------------------

    @staticmethod
    def _bomb_body(size: int) -> bytes:
        """{"items": [{}, {}, ...]}: one object per byte."""
        n = size - 11
        return b"\xa1\x65items\x9a" + n.to_bytes(4, "big") + b"\xa0" * n

    def _cbor_value(self, depth: int = 0) -> object:
        r = self.rng
        kind = r.randrange(12 if depth < 24 else 6)
        if kind == 0:
            return r.randrange(-(2**64), 2**64)
        if kind == 1:
            return r.random() * 10 ** r.randrange(-5, 300)
        if kind == 2:
            return r.randbytes(r.randrange(0, 40))
        if kind == 3:
            return "".join(chr(r.randrange(32, 0x3000)) for _ in range(r.randrange(0, 30)))
        if kind == 4:
            return r.choice([None, True, False, float("nan"), float("inf"), ""])
        if kind == 5:
            return r.choice(["items", "dcc", "account", "kid", "hc1", "max_frame", "versions"])
        if kind in (6, 7):
            return [self._cbor_value(depth + 1) for _ in range(r.randrange(0, 6))]
        if kind in (8, 9):
            return {
                self.rng.choice(
                    ["items", "dcc", "account", "kid", "ver", "v", "nam", "x"]
                ): self._cbor_value(depth + 1)
                for _ in range(r.randrange(0, 6))
            }
        if kind == 10:
            tag = r.choice([0, 1, 2, 24, 55799, 1 << 40])
            return cbor2.CBORTag(tag, self._cbor_value(depth + 1))
        return {"items": [{"dcc": self._cbor_value(depth + 1), "account": "uzi:1"}]}

    def _random_body(self) -> bytes:
        r = self.rng
        choice = r.randrange(6)
        if choice == 0:
            return r.randbytes(r.randrange(0, 200))
        if choice == 1:  # deep nesting
            depth = r.randrange(10, 5000)
            return b"\x81" * depth + b"\xa0"
        if choice == 2:  # a container that claims more than the frame holds
            return b"\xa1\x65items\x9b" + r.randbytes(8)
        if choice == 3:  # indefinite lengths, never closed or closed wrongly
            return b"\xbf\x65items\x9f" + b"\xa0" * r.randrange(0, 50) + r.choice([b"", b"\xff"])
        try:
            return cbor2.dumps(self._cbor_value())
        except (ValueError, TypeError, OverflowError):
            return b"\xa0"

    # -- frames -----------------------------------------------------------------------

    def _mutate(self, frame: bytes) -> bytes:
        r = self.rng
        data = bytearray(frame)
        how = r.randrange(7)
        if how == 0:  # bit flips anywhere
            for _ in range(r.randrange(1, 8)):
                i = r.randrange(len(data))
                data[i] ^= 1 << r.randrange(8)
        elif how == 1:  # cut short
            del data[r.randrange(1, len(data)) :]
        elif how == 2:  # garbage spliced in
            i = r.randrange(len(data))
            data[i:i] = r.randbytes(r.randrange(1, 64))
        elif how == 3:  # a header field rewritten
            field_at = r.choice([2, 3, 4, 5, 8, 12])
            width = 4 if field_at >= 8 else 1
            data[field_at : field_at + width] = r.randbytes(width)
        elif how == 4:  # the body's length past max_frame, or near it
            data[12:16] = struct.pack(">I", r.choice([2**32 - 1, wire.DEFAULT_MAX_FRAME + 1, 0]))
        elif how == 5:  # the request id of an earlier request
            data[8:12] = struct.pack(">I", r.choice([0, 1, 2]))
        else:  # the compressed flag on an uncompressed body (or off on a compressed one)
            data[4] ^= 1
        return bytes(data)

    def _frame(self) -> bytes:
        r = self.rng
        kind = r.randrange(10)
        if kind <= 2:
            return r.choice(self.valid)
        if kind <= 5:
            return self._mutate(r.choice(self.valid))
        if kind == 6:
            body = self._random_body()
            ftype = r.choice([*wire.FrameType, r.randrange(256)])
            return _header(int(ftype), r.randrange(2**32), len(body)) + body
        if kind == 7:
            bomb = r.choice(self.bombs)
            return _header(wire.FrameType.SIGN_BATCH, r.randrange(9, 2**32), len(bomb), 1) + bomb
        if kind == 8:  # a frame announced in full, sent in part (the rest never comes)
            return _header(wire.FrameType.SIGN_BATCH, 9, r.randrange(1, 2**20)) + r.randbytes(64)
        return r.randbytes(r.randrange(1, 64))

    def session(self) -> tuple[list[bytes], int]:
        """The chunks one connection sends, in order (its frames split at random points),
        and the number of frames in them."""
        r = self.rng
        frames = [self.hello] if r.random() < 0.85 else []
        frames += [self._frame() for _ in range(r.randrange(1, 6))]
        data = b"".join(frames)
        chunks, i = [], 0
        while i < len(data):
            n = r.choice([len(data), r.randrange(1, 64), r.randrange(1, 4096)])
            chunks.append(data[i : i + n])
            i += n
        return chunks, len(frames)


def run_session(path: str, chunks: list[bytes], *, wait: float = 0.05) -> SessionResult:
    """Send *chunks* on a new connection to the Unix socket *path*, read what comes back for
    up to *wait* seconds after the last chunk (or until the engine closes), then close -- with
    a reset every other time. Raises OSError only when the connection cannot be opened."""
    result = SessionResult()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.settimeout(wait)
        try:
            for chunk in chunks:
                s.sendall(chunk)
                result.sent += len(chunk)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                data = s.recv(1 << 16)
                if not data:
                    result.closed_by_engine = True
                    break
                result.replies.append(data)
        except (TimeoutError, ConnectionError, BrokenPipeError):
            pass
        if len(chunks) % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return result
