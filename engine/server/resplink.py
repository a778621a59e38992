"""A connection to one Redis for the shared state's script calls, speaking RESP2 directly.

The shared state (:mod:`.sharedstate`) sends one command per micro-batch of frames, EVALSHA,
and needs nothing else of a client but SCRIPT LOAD, AUTH and SELECT. Through coredis on trio
a call costs the engine ~300 µs of CPU (its reader and writer tasks, memory streams and
retry layers: measured, ``bench/state_cost.py``); sent here as bytes on the stream and read
back with the small parser below it costs less than half of that, which is what lets the
shared state stay within its budget per certificate at the engines' sustained rate.
Redis Cluster (slot routing, MOVED and ASK) goes through coredis: this link serves
``redis://`` and ``unix://``.

Contract: one request at a time per link (the shared state's flusher is sequential); a
request that is cancelled or fails leaves the link unusable (the caller drops it and opens
another).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from ..errors import DccSignError

__all__ = ["Incomplete", "NoScript", "RespError", "ScriptLink", "encode", "parse"]

#: The longest reply accepted (a reply is per micro-batch: results of a few thousand items).
MAX_REPLY: Final = 64 * 1024 * 1024


class RespError(DccSignError):
    """Redis answered with an error reply (its text is the message), or broke the
    protocol."""


class NoScript(RespError):
    """EVALSHA named a script Redis does not hold (it restarted or flushed its scripts)."""


def encode(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings (str as UTF-8, int in decimal)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class Incomplete(DccSignError):
    """:func:`parse` needs more bytes (not an error: the caller reads on)."""


def parse(buf: bytes | bytearray, at: int = 0) -> tuple[Any, int]:
    """One RESP2 value from *buf* at *at*: ``(value, end)``. Simple strings and bulk strings
    are bytes, integers int, nil None, arrays lists; an error reply is a :class:`RespError`
    value (raised by the caller, so that one inside an array is kept in place).

    Raises:
        Incomplete: *buf* does not hold the whole value yet.
        RespError: bytes that are not RESP2.
    """
    end = buf.find(b"\r\n", at)
    if end < 0:
        raise Incomplete
    kind, line = buf[at : at + 1], bytes(buf[at + 1 : end])
    at = end + 2
    if kind == b":":
        return int(line), at
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, at
        if len(buf) < at + size + 2:
            raise Incomplete
        return bytes(buf[at : at + size]), at + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, at
        items = []
        for _ in range(count):
            item, at = parse(buf, at)
            items.append(item)
        return items, at
    if kind == b"+":
        return line, at
    if kind == b"-":
        text = line.decode(errors="replace")
        return (NoScript if text.startswith("NOSCRIPT") else RespError)(text), at
    raise RespError(f"not a RESP reply: {bytes(buf[at - len(line) - 3 : at])[:40]!r}")


class ScriptLink:
    """One connection to a Redis (``redis://[[user]:password@]host[:port][/db]`` or
    ``unix:///path[?db=N&password=P]``) that loads and calls scripts.

    Use as an async context manager (connects on entry, closes on exit).

    Raises (on entry):
        OSError: Redis cannot be reached.
        trio.TooSlowError: not connected within *timeout*.
        RespError: AUTH or SELECT was refused.
        ValueError: the URL is not one this link serves.
    """

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        """*timeout*: the longest the connection and its AUTH and SELECT may take."""
        self.url = url
        self.timeout = timeout
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.scheme == "redis":
            self._where: tuple[str, Any] = (
                "tcp",
                (parts.hostname or "localhost", parts.port or 6379),
            )
            db = parts.path.strip("/") or "0"
        elif parts.scheme == "unix":
            self._where = ("unix", unquote(parts.path))
            db = query.get("db", ["0"])[0]
        else:
            raise ValueError(f"{url!r}: this link serves redis:// and unix:// only")
        if not db.isdigit():
            raise ValueError(f"{url!r}: the database must be a number, not {db!r}")
        self.db = int(db)
        self.username = unquote(parts.username) if parts.username else None
        password = parts.password or query.get("password", [None])[0]
        self.password = unquote(password) if password else None
        self._stream: trio.abc.Stream | None = None
        self._buf = bytearray()

    async def __aenter__(self) -> ScriptLink:
        kind, where = self._where
        with trio.fail_after(self.timeout):
            if kind == "tcp":
                self._stream = await trio.open_tcp_stream(*where)
            else:
                self._stream = await trio.open_unix_socket(where)
            try:
                if self.password is not None:
                    user = () if self.username is None else (self.username,)
                    await self.call("AUTH", *user, self.password)
                if self.db:
                    await self.call("SELECT", self.db)
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply.

        Raises:
            RespError: Redis answered with an error (NoScript for an unknown script).
            trio.BrokenResourceError, OSError: the connection broke.
        """
        if self._stream is None:
            raise RespError("the link is closed")
        await self._stream.send_all(encode(args))
        buf = self._buf
        while True:
            try:
                value, end = parse(buf)
            except Incomplete:
                data = await self._stream.receive_some(1 << 16)
                if not data:
                    raise trio.BrokenResourceError("Redis closed the connection") from None
                buf += data
                if len(buf) > MAX_REPLY:
                    raise RespError(f"a reply over {MAX_REPLY} bytes") from None
                continue
            del buf[:end]
            if isinstance(value, RespError):
                raise value
            return value

    async def script_load(self, script: str) -> bytes:
        """Load *script*; its SHA1 (hex, as bytes), checked against Redis's answer."""
        sha = hashlib.sha1(script.encode()).hexdigest().encode()
        answer = await self.call("SCRIPT", "LOAD", script)
        if answer != sha:
            raise RespError(f"SCRIPT LOAD answered {answer!r}, not {sha!r}")
        return sha

    async def evalsha(self, sha: bytes, keys: list[bytes], args: list[Any]) -> Any:
        return await self.call("EVALSHA", sha, len(keys), *keys, *args)
