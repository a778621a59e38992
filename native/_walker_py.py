"""The request walker: a SIGN / SIGN_BATCH body (after zstd) to flat item spans (reference).

:func:`walk_sign_batch` reads a request body once and returns a :class:`BatchView`: per item,
where its DCC map, ``account``, ``operator``, ``kid`` and ``idempotency_key`` are in the body,
and its ``validity_days``, as one flat column buffer of ``uint32``. No per-item Python object
is built by the native implementation (``_walker.pxi`` over ``src/walker.c``); this reference
is the readable twin: it decodes the body with the codec's own decoder (so every refusal has
the codec's message and code by construction), then reads the spans with a small CBOR reader.

How the engine's dispatch is meant to chain the data plane for one frame (the integration is
the lead's; every step is one call per frame, C per certificate with the GIL released, and
Python only per frame, per distinct account or key, and per refused item)::

    frame = conn.next_frame()                       # header rules; BUSY may refuse here
    view = conn.decode_walked(frame, walk_sign_batch)
        # zstd, then the framing rules (SPEC.md §4.3/§6.4) with the decoder's messages:
        # a broken body is the RemoteProtocolError decode_frame would raise (BodyError inside)
    verdicts = <native DCC validator>(view.data, DCC_OFF/DCC_LEN columns)   # issue 14.2
        # -> per item: DCC type or INVALID_DCC message (refused items leave the pipeline)
    policy: per-client tables over (kid, type, co, is) columns; quotas charged once per
        distinct account of the frame (view.values(i)[1] only for the distinct accounts;
        ACCOUNT_OFF/LEN spans are enough to group them); idempotency lookups only for items
        with KEY_LEN != 0
    prefixes: claims_prefix(iss, iat, exp) once per distinct (kid, validity_days); prefix_of:
        per item its index (NO_PAYLOAD for refused items)
    spliced = splice_payloads(view, prefixes, prefix_of)
        # payload buffer + offsets; max_payload per kid checked over the offsets
    keyd: one columnar message per kid group (spliced.data + offsets + account/operator
        spans of view.data); signatures come back as one buffer + offsets
    body = encode_sign_batch_result(protected_headers, kids, protected_of,
        spliced.data, spliced.offsets, signatures, signature_offsets, refusals)
    out = conn.send_encoded_result(frame.request_id, body, view.count)   # no re-decoding

Contract of the view (both implementations give equal views for equal input):

* ``data``: the body itself, followed by the joined content of any field string that the
  client sent as an indefinite-length string (rare: only then is anything copied). Every
  offset indexes ``data``.
* ``columns``: ``count * NFIELDS`` native-endian ``uint32``; field indices below. A DCC span
  covers the map's whole encoding (head included), exactly as the client sent it; a string
  span covers the content (UTF-8 for text). Absent optional fields are 0 (no valid field can
  be empty or sit at offset 0).
"""

from __future__ import annotations

import array
import io
from dataclasses import dataclass
from typing import Any

import cbor2

from ..protocol import cborlimits, wire
from .layout import (  # the column layout (walker.h), named here for the walker's readers
    ACCOUNT_LEN,
    ACCOUNT_OFF,
    DCC_LEN,
    DCC_OFF,
    FLAG_ACCOUNT_NON_ASCII,
    FLAG_KEY_TEXT,
    FLAG_OPERATOR_NON_ASCII,
    FLAGS,
    KEY_LEN,
    KEY_OFF,
    KID_OFF,
    NFIELDS,
    OPERATOR_LEN,
    OPERATOR_OFF,
    VALIDITY,
)

# The column layout's names (imported above) are layout.py's API, not this module's.
__all__ = ["BatchView", "check_walk_arguments", "walk_sign_batch"]

#: Offsets are uint32 and the view may hold up to twice the body: bodies stay below this.
MAX_BODY = 0x7FFFFFFF


@dataclass(frozen=True, slots=True, eq=True)
class BatchView:
    """The items of one SIGN / SIGN_BATCH body as spans (see the module docstring)."""

    data: bytes
    body_size: int
    count: int
    columns: bytes

    def fields(self, i: int) -> tuple[int, ...]:
        """Item *i*'s NFIELDS column values."""
        if not 0 <= i < self.count:
            raise IndexError(f"item {i} of {self.count}")
        return tuple(memoryview(self.columns).cast("I")[i * NFIELDS : (i + 1) * NFIELDS])

    def dcc_bytes(self, i: int) -> bytes:
        f = self.fields(i)
        return self.data[f[DCC_OFF] : f[DCC_OFF] + f[DCC_LEN]]

    def values(self, i: int) -> tuple[bytes, str, str | None, bytes | None, int | None, Any]:
        """Item *i* as Python values (cold paths and tests): (DCC bytes, account, operator,
        kid, validity_days, idempotency_key) with None for an absent field."""
        f = self.fields(i)
        d = self.data
        account = d[f[ACCOUNT_OFF] : f[ACCOUNT_OFF] + f[ACCOUNT_LEN]].decode()
        operator = None
        if f[OPERATOR_LEN]:
            operator = d[f[OPERATOR_OFF] : f[OPERATOR_OFF] + f[OPERATOR_LEN]].decode()
        kid = d[f[KID_OFF] : f[KID_OFF] + wire.KID_SIZE] if f[KID_OFF] else None
        key: bytes | str | None = None
        if f[KEY_LEN]:
            key = d[f[KEY_OFF] : f[KEY_OFF] + f[KEY_LEN]]
            if f[FLAGS] & FLAG_KEY_TEXT:
                key = key.decode()
        return self.dcc_bytes(i), account, operator, kid, f[VALIDITY] or None, key

    def sign_items(self) -> tuple[wire.SignItem, ...]:
        """The items as the codec's :class:`~dccsign.protocol.wire.SignItem` values (the DCC
        decoded): what ``decode_frame`` gives for the same body. For cold paths and tests."""
        out = []
        for i in range(self.count):
            dcc, account, operator, kid, vd, key = self.values(i)
            out.append(wire.SignItem(cbor2.loads(dcc), account, operator, kid, vd, key))
        return tuple(out)


def check_walk_arguments(body: Any, max_batch: Any) -> None:
    """The argument rules both implementations share (TypeError / ValueError)."""
    if type(body) is not bytes:
        raise TypeError(f"body must be bytes, not {type(body).__name__}")
    if len(body) > MAX_BODY:
        raise ValueError(f"body of {len(body)} bytes is above {MAX_BODY}")
    if type(max_batch) is not int or not 1 <= max_batch <= wire.UINT32_MAX:
        raise ValueError(f"max_batch must be an int in 1..{wire.UINT32_MAX}")


def walk_sign_batch(body: bytes, max_batch: int, *, single: bool = False) -> BatchView:
    """Walk a SIGN_BATCH body (or with *single*, a SIGN body: one item map) after zstd.

    The rules are the codec's, on a connection whose WELCOME announced *max_batch*: the
    body is counted (:func:`~dccsign.protocol.wire.body_item_limit` data items, 16 levels),
    must be strict CBOR (SPEC.md §4.3) and its items must follow §6.4.

    Raises:
        dccsign.protocol.wire.BodyError: the body breaks a rule; message and ``code`` are
            those of ``wire.Connection.decode_frame`` for the same body (e.g. ``BAD_REQUEST``
            "SIGN_BATCH.items[3].account: must be text of 1..256 characters",
            ``BATCH_TOO_LARGE``).
        TypeError, ValueError: bad arguments (body not bytes, max_batch out of range).
    """
    check_walk_arguments(body, max_batch)
    try:
        value = wire.bodies.decode_cbor(body, cborlimits.scan, wire.body_item_limit(max_batch))
        if single:
            wire.bodies.read_sign(0, value, max_batch)
        else:
            wire.bodies.read_sign_batch(0, value, max_batch)
    except wire.errors.Invalid as exc:
        raise wire.BodyError(str(exc), exc.code) from None
    return _spans(body, single)


# ----------------------------------------------------------------------------- spans

_FIELDS = ("dcc", "account", "operator", "kid", "validity_days", "idempotency_key")


class _Reader:
    """Heads and strings of a body already known to be strict, well-formed CBOR."""

    __slots__ = ("_dec", "_fp", "buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self._fp: io.BytesIO | None = None
        self._dec: Any = None

    def head(self) -> tuple[int, int, bool]:
        b = self.buf[self.pos]
        self.pos += 1
        major, info = b >> 5, b & 0x1F
        if info < 24:
            return major, info, False
        if info == 31:
            return major, 0, True
        size = 1 << (info - 24)
        arg = int.from_bytes(self.buf[self.pos : self.pos + size], "big")
        self.pos += size
        return major, arg, False

    def at_break(self) -> bool:
        if self.buf[self.pos] == 0xFF:
            self.pos += 1
            return True
        return False

    def string(self, arg: int, indefinite: bool) -> tuple[int, bytes, bool]:
        """(offset of the content, the content, indefinite) of a string whose head was read."""
        start = self.pos
        if not indefinite:
            self.pos += arg
            return start, self.buf[start : self.pos], False
        parts = []
        while not self.at_break():
            _, size, _ = self.head()
            parts.append(self.buf[self.pos : self.pos + size])
            self.pos += size
        return start, b"".join(parts), True

    def skip(self) -> None:
        """Past one data item: cbor2 finds where it ends (the body is strict CBOR already)."""
        if self._fp is None:
            self._fp = io.BytesIO(self.buf)
            self._dec = cbor2.CBORDecoder(self._fp)
        self._fp.seek(self.pos)
        self._dec.decode()
        self.pos = self._fp.tell()

    def entries(self, arg: int, indefinite: bool):  # type: ignore[no-untyped-def]
        """Yield (key content, key is text, position of the value) of a map; the caller
        leaves pos after the value."""
        k = 0
        while (not self.at_break()) if indefinite else k < arg:
            major, karg, kind = self.head()
            _, key, _ = self.string(karg, kind)
            yield key, major == 3, self.pos
            k += 1


def _spans(body: bytes, single: bool) -> BatchView:
    r = _Reader(body)
    _, arg, indefinite = r.head()  # the body map
    if not single:
        for key, text, _ in r.entries(arg, indefinite):
            if text and key == b"items":
                break
            r.skip()
        _, arg, indefinite = r.head()  # the items array (checked non-empty by the decoder)
        count = arg
        if indefinite:
            probe = _Reader(body, r.pos)
            count = 0
            while not probe.at_break():
                probe.skip()
                count += 1
    else:
        r.pos = 0
        count = 1
    cols = array.array("I")
    extra = bytearray()
    for _ in range(count):
        cols.extend(_item(r, body, extra))
    return BatchView(body + bytes(extra) if extra else body, len(body), count, cols.tobytes())


def _item(r: _Reader, body: bytes, extra: bytearray) -> list[int]:
    _, arg, indefinite = r.head()
    at: dict[str, int] = {}
    dcc_end = 0
    for key, text, pos in r.entries(arg, indefinite):
        r.skip()
        if text and key.decode() in _FIELDS:
            at[key.decode()] = pos
            if key == b"dcc":
                dcc_end = r.pos
    for name in _FIELDS[2:]:
        if name in at and body[at[name]] == 0xF6:  # null is "not given" (SPEC.md §4.3 rule 8)
            del at[name]
    o = [0] * NFIELDS
    o[DCC_OFF], o[DCC_LEN] = at["dcc"], dcc_end - at["dcc"]

    def place(pos: int) -> tuple[int, bytes]:
        v = _Reader(body, pos)
        _, sarg, sind = v.head()
        off, content, joined = v.string(sarg, sind)
        if joined:  # copied after the body: the view's spans stay contiguous
            off = len(body) + len(extra)
            extra.extend(content)
        return off, content

    o[ACCOUNT_OFF], account = place(at["account"])
    o[ACCOUNT_LEN] = len(account)
    if not account.isascii():
        o[FLAGS] |= FLAG_ACCOUNT_NON_ASCII
    if "operator" in at:
        o[OPERATOR_OFF], operator = place(at["operator"])
        o[OPERATOR_LEN] = len(operator)
        if not operator.isascii():
            o[FLAGS] |= FLAG_OPERATOR_NON_ASCII
    if "kid" in at:
        o[KID_OFF], _ = place(at["kid"])
    if "validity_days" in at:
        o[VALIDITY] = _Reader(body, at["validity_days"]).head()[1]
    if "idempotency_key" in at:
        o[KEY_OFF], key = place(at["idempotency_key"])
        o[KEY_LEN] = len(key)
        if body[at["idempotency_key"]] >> 5 == 3:
            o[FLAGS] |= FLAG_KEY_TEXT
    return o
