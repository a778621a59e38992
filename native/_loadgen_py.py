"""Counting SIGN_RESULT / SIGN_BATCH_RESULT bodies without decoding them (pure-Python
reference of the native ``scan_results``).

The load generator (:mod:`dccsign.bench.loadgen`) receives tens of thousands of results a second
on the same cores as the engine it measures. Decoding each result into Python objects (the
codec's ``cbor2`` decode, ~30 objects and an :class:`~dccsign.protocol.wire.ItemResult` per
certificate) costs it more CPU than the target allows, and it needs almost none of it: how
many results, which failed and with which code, and the HC1 of the few sampled for
verification. :func:`scan_results` walks the body once and returns exactly that.

The rules are those of the codec's decode (``protocol/wire/bodies.py`` ``read_result`` and
``read_sign_batch_result``, SPEC.md §6.5) with the same messages, so that a body the codec
refuses is refused here too and a body both accept gives the same counts and codes. Known
differences, all about bodies a conforming engine never sends (its encoder writes definite
lengths and never repeats a key): indefinite-length strings are refused (the codec accepts
them), and a repeated key is found only among the keys read here (``results``, ``hc1``,
``kid``, ``error``, ``message``, ``retry_after_ms``), not among keys the codec ignores.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["RESULT_MAX_DEPTH", "scan_results"]

#: Containers nested in one body, the body's own map included (the codec's MAX_DEPTH).
RESULT_MAX_DEPTH = 16
_UINT32_MAX = 0xFFFFFFFF
_MAX_HC1 = 8192
_MAX_MESSAGE = 1024
_KID_SIZE = 8

# Field slots of one result map, by key.
_HC1, _KID, _ERROR, _MESSAGE, _RETRY = range(5)
_FIELDS = {
    b"hc1": _HC1,
    b"kid": _KID,
    b"error": _ERROR,
    b"message": _MESSAGE,
    b"retry_after_ms": _RETRY,
}
_NAMES = ("hc1", "kid", "error", "message", "retry_after_ms")

# What a field's value is, as far as the rules need to know: (kind, a, b) with kind one of
_NULL, _UINT, _TEXT, _BYTES, _OTHER = range(5)  # a, b: value / (offset, length) / unused


class _Bad(ValueError):
    """A rule of the result is broken; the message is relative to where the caller is."""


class _Malformed(_Bad):
    """The bytes are not CBOR as this protocol allows it; the message is final."""


class _Walk:
    """A cursor over the body; every method raises :class:`_Bad` with the final message."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def fail(self, at: int, why: str) -> _Malformed:
        return _Malformed(f"CBOR at byte {at}: {why}")

    def head(self) -> tuple[int, int, int, bool]:
        """(start, major type, argument, indefinite) of the head at pos; pos moves past it.
        A break (0xff) is returned as major 7, argument 31, indefinite True."""
        buf, start = self.buf, self.pos
        if start >= len(buf):
            raise self.fail(start, "truncated")
        ib = buf[start]
        major, info = ib >> 5, ib & 0x1F
        pos = start + 1
        if info < 24:
            self.pos = pos
            return start, major, info, False
        if info <= 27:
            size = 1 << (info - 24)
            if pos + size > len(buf):
                raise self.fail(start, "truncated")
            self.pos = pos + size
            return start, major, int.from_bytes(buf[pos : pos + size], "big"), False
        if info < 31:
            raise self.fail(start, "reserved additional information")
        if major in (0, 1, 6):
            raise self.fail(start, "indefinite length for this major type")
        if major in (2, 3):
            raise self.fail(start, "indefinite-length strings are not supported")
        self.pos = pos
        return start, major, 31, True

    def string(self, start: int, major: int, length: int) -> tuple[int, int]:
        """The (offset, length) of a definite string whose head ended at pos; pos past it.
        Text must be UTF-8."""
        pos = self.pos
        if length > len(self.buf) - pos:
            raise self.fail(start, "truncated")
        self.pos = pos + length
        if major == 3:
            try:
                self.buf[pos : pos + length].decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(start, "invalid UTF-8 in a text string") from None
        return pos, length

    def skip(self, depth: int) -> None:
        """Walk past one data item nested at *depth* (the body's own item is at 1)."""
        start, major, arg, indef = self.head()
        if major in (2, 3):
            self.string(start, major, arg)
        elif major in (4, 5):
            if depth > RESULT_MAX_DEPTH:
                raise self.fail(start, f"nested more than {RESULT_MAX_DEPTH} levels deep")
            if indef:
                while not self.at_break():
                    if major == 5:
                        self.key()
                    self.skip(depth + 1)
            else:
                for _ in range(arg):
                    if major == 5:
                        self.key()
                    self.skip(depth + 1)
        elif major == 6:
            raise self.fail(start, "tags are not allowed")
        elif major == 7 and indef:
            raise self.fail(start, "unexpected break")

    def at_break(self) -> bool:
        """Whether the next byte ends an indefinite-length container (consumed if so)."""
        if self.pos >= len(self.buf):
            raise self.fail(self.pos, "truncated")
        if self.buf[self.pos] == 0xFF:
            self.pos += 1
            return True
        return False

    def key(self) -> bytes | None:
        """A map key: its text (UTF-8 bytes) if it is text, None if bytes."""
        start, major, arg, _indef = self.head()
        if major not in (2, 3):
            raise self.fail(start, "map keys must be text or byte strings")
        off, n = self.string(start, major, arg)
        return self.buf[off : off + n] if major == 3 else None

    def value(self, depth: int) -> tuple[int, int, int]:
        """A field's value (kind, a, b), walked past."""
        save = self.pos
        start, major, arg, indef = self.head()
        if major == 0:
            return _UINT, arg, 0
        if major in (2, 3):
            off, n = self.string(start, major, arg)
            return (_TEXT if major == 3 else _BYTES), off, n
        if major == 7 and not indef and arg == 22:
            return _NULL, 0, 0
        self.pos = save
        self.skip(depth)
        return _OTHER, 0, 0

    def container(self, want: int) -> tuple[int, int, bool] | None:
        """The head of a map (want 5) or array (want 4): (start, length, indefinite); None
        (pos unchanged) if the next item is something else."""
        save = self.pos
        start, major, arg, indef = self.head()
        if major != want:
            self.pos = save
            return None
        return start, arg, indef


def _chars(buf: bytes, off: int, n: int) -> int:
    """Characters in valid UTF-8 (every byte that does not continue a sequence)."""
    return n - sum(1 for b in buf[off : off + n] if b & 0xC0 == 0x80)


def _result(w: _Walk, depth: int) -> tuple[int, int, int, int]:
    """One result map at pos: (0, hc1 offset, hc1 length, kid offset) if signed, (code, 0,
    0, 0) if not. Raises _Bad whose message is relative to the result (the caller says
    where it is), or _Malformed."""
    head = w.container(5)
    if head is None:
        w.skip(depth)
        raise _Bad("is not a map")
    _start, count, indef = head
    fields: list[tuple[int, int, int] | None] = [None] * 5
    k = 0
    while (not w.at_break()) if indef else k < count:
        k += 1
        key_at = w.pos
        key = w.key()
        slot = _FIELDS.get(key) if key is not None else None
        if slot is None:
            w.skip(depth + 1)
            continue
        if fields[slot] is not None:
            raise w.fail(key_at, f"duplicate key {_NAMES[slot]!r}")
        fields[slot] = w.value(depth + 1)
    buf = w.buf
    null = (_NULL, 0, 0)
    hc1, kid, error, message, retry = (f or null for f in fields)
    if hc1[0] != _NULL:
        if (
            hc1[0] != _TEXT
            or not 4 < _chars(buf, hc1[1], hc1[2]) <= _MAX_HC1
            or buf[hc1[1] : hc1[1] + 4] != b"HC1:"
        ):
            raise _Bad(f'hc1: must be text starting "HC1:", at most {_MAX_HC1} characters')
        if kid[0] != _BYTES or kid[2] != _KID_SIZE:
            raise _Bad(f"kid: must be a byte string of {_KID_SIZE} bytes")
        if error[0] != _NULL:
            raise _Bad("has both hc1 and error")
        return 0, hc1[1], hc1[2], kid[1]
    if error[0] == _NULL:
        raise _Bad("has neither hc1 nor error")
    if error[0] != _UINT or not 0 < error[1] <= _UINT32_MAX:
        raise _Bad("error: must be an error code (unsigned integer, not 0)")
    if message[0] != _TEXT or _chars(buf, message[1], message[2]) > _MAX_MESSAGE:
        raise _Bad(f"message: must be text of at most {_MAX_MESSAGE} characters")
    if retry[0] != _NULL and (retry[0] != _UINT or retry[1] > _UINT32_MAX):
        raise _Bad(f"retry_after_ms: must be an unsigned integer in 0..{_UINT32_MAX}")
    return error[1], 0, 0, 0


def scan_results(
    body: bytes | bytearray | memoryview,
    batch: bool,
    max_results: int,
    want: Sequence[int] = (),
) -> tuple[int, tuple[tuple[int, int], ...], tuple[tuple[str, bytes] | None, ...]]:
    """Count the results in a plain (decompressed) reply body without decoding it.

    *batch* selects the body: a SIGN_BATCH_RESULT map (``{"results": [result, ...]}``, 1 to
    *max_results* results) or a SIGN_RESULT (one result map). *want* lists result positions
    whose HC1 is wanted (the sampled certificates).

    Returns:
        ``(n, errors, picked)``: the number of results; ``(position, error code)`` of each
        result that is not signed, in order (the only per-result objects built); and for each
        position of *want*, ``(hc1, kid)`` if that result is signed, else None (also for a
        position past the end).

    Raises:
        ValueError: the body breaks the codec's rules for this frame type; the message is
            the codec's (``SIGN_BATCH_RESULT.results[3]: has neither hc1 nor error``), or
            ``CBOR at byte N: ...`` for bytes that are not well-formed CBOR as this protocol
            allows it. Also for *max_results* below 1.
    """
    if type(max_results) is not int or max_results < 1:
        raise ValueError("max_results must be a positive int")
    buf = bytes(body)
    w = _Walk(buf)
    errors: list[tuple[int, int]] = []
    spans: dict[int, tuple[int, int, int]] = {}
    wanted = set(want)
    try:
        if batch:
            n = _batch(w, max_results, errors, spans, wanted)
        else:
            n = 1
            if w.container(5) is None:
                w.skip(1)
                raise _Bad("the body is not a CBOR map")
            w.pos = 0
            try:
                code, off, length, kid = _result(w, 1)
            except _Malformed:
                raise
            except _Bad as exc:
                raise _Bad(f"SIGN_RESULT{_sep(exc)}{exc}") from None
            if code:
                errors.append((0, code))
            elif 0 in wanted:
                spans[0] = (off, length, kid)
        if w.pos != len(buf):
            raise _Bad("trailing bytes after the CBOR item")
    except _Bad as exc:
        raise ValueError(str(exc)) from None
    picked = tuple(_pick(w, spans.get(p)) for p in want)
    return n, tuple(errors), picked


def _sep(exc: _Bad) -> str:
    # As the codec words it: "X.field: ..." for a field's rule, "X is not a map".
    return " " if str(exc).startswith(("is ", "has ")) else "."


def _batch(
    w: _Walk,
    limit: int,
    errors: list[tuple[int, int]],
    spans: dict[int, tuple[int, int, int]],
    wanted: set[int],
) -> int:
    head = w.container(5)
    if head is None:
        w.skip(1)
        raise _Bad("the body is not a CBOR map")
    _start, count, indef = head
    n: int | None = None
    k = 0
    bad_results = f"SIGN_BATCH_RESULT.results: must be an array of 1..{limit} results"
    while (not w.at_break()) if indef else k < count:
        k += 1
        key_at = w.pos
        key = w.key()
        if key != b"results":
            w.skip(2)
            continue
        if n is not None:
            raise w.fail(key_at, "duplicate key 'results'")
        arr = w.container(4)
        if arr is None:
            w.skip(2)
            raise _Bad(bad_results)
        _astart, length, aindef = arr
        if not aindef and not 0 < length <= limit:
            raise _Bad(bad_results)
        i = 0
        while (not w.at_break()) if aindef else i < length:
            if i >= limit:
                raise _Bad(bad_results)
            try:
                code, off, size, kid = _result(w, 3)
            except _Malformed:
                raise
            except _Bad as exc:
                where = f"SIGN_BATCH_RESULT.results[{i}]"
                raise _Bad(f"{where}{_sep(exc)}{exc}") from None
            if code:
                errors.append((i, code))
            elif i in wanted:
                spans[i] = (off, size, kid)
            i += 1
        if i == 0:
            raise _Bad(bad_results)
        n = i
    if n is None:
        raise _Bad(bad_results)
    return n


def _pick(w: _Walk, span: tuple[int, int, int] | None) -> tuple[str, bytes] | None:
    """(hc1, kid) of a signed result found at *span* (hc1 offset and length, kid offset)."""
    if span is None:
        return None
    off, n, kid = span
    return w.buf[off : off + n].decode("utf-8"), w.buf[kid : kid + _KID_SIZE]
