"""Bodies: the reader and the writer of each frame type's CBOR body, in one table.

A reader takes the body map (already known to be a dict), the request id and the
connection's max_batch, and returns the event, or raises :class:`~.errors.Invalid` naming the
field. Optional fields may also be present as null. Unknown keys are ignored (later minor
revisions may add optional fields). A writer builds the body map of an event; what is sent
goes through the reader too (:meth:`Connection.send`), so the checks are written once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import cborlimits
from ..codes import ErrorCode
from .errors import Invalid, bad
from .events import (
    CODES,
    Error,
    GoAway,
    Hello,
    ItemResult,
    KeyInfo,
    Keys,
    ListKeys,
    Ping,
    Pong,
    Sign,
    SignBatch,
    SignBatchResult,
    SignItem,
    SignResult,
    Welcome,
)
from .frames import MIN_MAX_FRAME, UINT32_MAX, FrameType

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


def body_item_limit(max_batch: int) -> int:
    """The most CBOR data items a body may hold on a connection whose WELCOME announced
    *max_batch* (0 before the handshake): enough for the largest legitimate SIGN_BATCH,
    SIGN_BATCH_RESULT or KEYS body with room to spare (SPEC.md §13). Bodies are counted
    before they are decoded (:mod:`cborlimits`), so a small frame that would expand into
    millions of objects costs nothing but the count."""
    return ITEMS_BASE + max(ITEMS_PER_BATCH_ENTRY * max_batch, ITEMS_PER_KEY * MAX_KEYS)


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


# ----------------------------------------------------------------------------- readers


def _uint(v: Any, where: str, lo: int = 0, hi: int = UINT32_MAX) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise bad(where, f"must be an unsigned integer in {lo}..{hi}")
    return v


def _int64(v: Any, where: str) -> int:
    if type(v) is not int or not INT64_MIN <= v <= INT64_MAX:
        raise bad(where, "must be an integer in the int64 range")
    return v


def _text(v: Any, where: str, lo: int, hi: int) -> str:
    if type(v) is not str or not lo <= len(v) <= hi:
        raise bad(where, f"must be text of {lo}..{hi} characters")
    return v


def _opt_uint(v: Any, where: str) -> int | None:
    return None if v is None else _uint(v, where)


def _kid(v: Any, where: str) -> bytes:
    if type(v) is not bytes or len(v) != KID_SIZE:
        raise bad(where, f"must be a byte string of {KID_SIZE} bytes")
    return v


def _code(v: Any, where: str) -> ErrorCode | int:
    if type(v) is not int or not 0 < v <= UINT32_MAX:
        raise bad(where, "must be an error code (unsigned integer, not 0)")
    return CODES.get(v, v)


def _map(v: Any, where: str) -> dict[Any, Any]:
    if type(v) is not dict:
        raise bad(where, "must be a map")
    return v


def _array(v: Any, where: str, lo: int, hi: int) -> list[Any]:
    if type(v) is not list or not lo <= len(v) <= hi:
        raise bad(where, f"must be an array of {lo}..{hi} entries")
    return v


def read_hello(rid: int, b: dict[Any, Any], limit: int) -> Hello:
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


def read_welcome(rid: int, b: dict[Any, Any], limit: int) -> Welcome:
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
        raise bad(where, f"must be a byte string of at most {MAX_PING_DATA} bytes")
    return data


def read_ping(rid: int, b: dict[Any, Any], limit: int) -> Ping:
    return Ping(rid, _ping_data(b, "PING.data"))


def read_pong(rid: int, b: dict[Any, Any], limit: int) -> Pong:
    return Pong(rid, _ping_data(b, "PONG.data"))


def _item(m: Any) -> SignItem:
    # The hot path: one call per DCC. Plain type checks, no helper calls on the valid path.
    if type(m) is not dict:
        raise Invalid("is not a map")
    dcc = m.get("dcc")
    if type(dcc) is not dict:
        raise Invalid("dcc: must be a map (the DCC JSON object)")
    account = m.get("account")
    if type(account) is not str or not 0 < len(account) <= MAX_TEXT:
        raise Invalid(f"account: must be text of 1..{MAX_TEXT} characters")
    operator = m.get("operator")
    if operator is not None and (type(operator) is not str or not 0 < len(operator) <= MAX_TEXT):
        raise Invalid(f"operator: must be text of 1..{MAX_TEXT} characters")
    kid = m.get("kid")
    if kid is not None and (type(kid) is not bytes or len(kid) != KID_SIZE):
        raise Invalid(f"kid: must be a byte string of {KID_SIZE} bytes")
    vd = m.get("validity_days")
    if vd is not None and (type(vd) is not int or not 0 < vd <= MAX_VALIDITY_DAYS):
        raise Invalid(f"validity_days: must be an integer in 1..{MAX_VALIDITY_DAYS}")
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
            raise Invalid(
                f"idempotency_key: must be a byte string or text of 1..{MAX_IDEMPOTENCY_KEY} bytes"
            )
    return _make_item(dcc, account, operator, kid, vd, key)


_FIELD_FIRST = re.compile(r"[a-z_][a-z0-9_]*: ")


def located(exc: Invalid, where: str) -> Invalid:
    """Prefix a message about part of a body with where that part is."""
    message = str(exc)
    sep = "." if _FIELD_FIRST.match(message) else " "
    return Invalid(f"{where}{sep}{message}", exc.code)


def _one(convert: Callable[..., Any], value: Any, where: str, *args: Any) -> Any:
    """``convert(value, *args)``, its failure located at *where* (``"SIGN"``)."""
    try:
        return convert(value, *args)
    except Invalid as exc:
        raise located(exc, where) from None


def _each(convert: Callable[..., Any], values: list[Any], where: str, *args: Any) -> list[Any]:
    """``convert(v, *args)`` for every value; a failure is located at the first bad entry
    (``where[i]``). The valid path is one list comprehension: batches of a thousand items
    come through here, and only a refused one pays for finding its culprit."""
    try:
        return [convert(v, *args) for v in values]
    except Invalid:
        pass
    for i, v in enumerate(values):
        try:
            convert(v, *args)
        except Invalid as exc:
            raise located(exc, f"{where}[{i}]") from None
    raise AssertionError("unreachable")  # pragma: no cover


def read_sign(rid: int, b: dict[Any, Any], limit: int) -> Sign:
    return Sign(rid, _one(_item, b, "SIGN"))


def read_sign_batch(rid: int, b: dict[Any, Any], limit: int) -> SignBatch:
    items = b.get("items")
    if type(items) is not list or not items:
        raise bad("SIGN_BATCH.items", "must be a non-empty array of items")
    if len(items) > limit:
        raise Invalid(
            f"SIGN_BATCH has {len(items)} items; max_batch is {limit}", ErrorCode.BATCH_TOO_LARGE
        )
    return SignBatch(rid, tuple(_each(_item, items, "SIGN_BATCH.items")))


def read_result(m: Any) -> ItemResult:
    if type(m) is not dict:
        raise Invalid("is not a map")
    hc1 = m.get("hc1")
    error = m.get("error")
    if hc1 is not None:
        if type(hc1) is not str or not 4 < len(hc1) <= MAX_HC1 or not hc1.startswith("HC1:"):
            raise Invalid(f'hc1: must be text starting "HC1:", at most {MAX_HC1} characters')
        kid = m.get("kid")
        if type(kid) is not bytes or len(kid) != KID_SIZE:
            raise Invalid(f"kid: must be a byte string of {KID_SIZE} bytes")
        if error is not None:
            raise Invalid("has both hc1 and error")
        return _make_result(hc1, kid, None, None, None)
    if error is None:
        raise Invalid("has neither hc1 nor error")
    code = _code(error, "error")
    message = m.get("message")
    if type(message) is not str or len(message) > MAX_MESSAGE:
        raise Invalid(f"message: must be text of at most {MAX_MESSAGE} characters")
    retry = m.get("retry_after_ms")
    if retry is not None:
        _uint(retry, "retry_after_ms")
    return _make_result(None, None, code, message, retry)


def read_sign_result(rid: int, b: dict[Any, Any], limit: int) -> SignResult:
    return SignResult(rid, _one(read_result, b, "SIGN_RESULT"))


def read_sign_batch_result(rid: int, b: dict[Any, Any], limit: int) -> SignBatchResult:
    results = b.get("results")
    if type(results) is not list or not 0 < len(results) <= limit:
        raise bad("SIGN_BATCH_RESULT.results", f"must be an array of 1..{limit} results")
    return SignBatchResult(rid, tuple(_each(read_result, results, "SIGN_BATCH_RESULT.results")))


def read_list_keys(rid: int, b: dict[Any, Any], limit: int) -> ListKeys:
    return ListKeys(rid)


def _key(m: Any, where: str) -> KeyInfo:
    m = _map(m, where)
    types = m.get("types")
    if type(types) is not str or len(types) > 3 or len(set(types)) != len(types):
        raise bad(f"{where}.types", 'must be text made of distinct letters of "vtr"')
    if not set(types) <= {"v", "t", "r"}:
        raise bad(f"{where}.types", 'must be text made of distinct letters of "vtr"')
    dsc = m.get("dsc")
    if type(dsc) is not bytes or not 0 < len(dsc) <= MAX_DSC:
        raise bad(f"{where}.dsc", f"must be a byte string of 1..{MAX_DSC} bytes (DER)")
    return KeyInfo(
        kid=_kid(m.get("kid"), f"{where}.kid"),
        alg=_int64(m.get("alg"), f"{where}.alg"),
        types=types,
        state=_text(m.get("state"), f"{where}.state", 1, MAX_STATE),
        dsc=dsc,
        not_before=_int64(m.get("not_before"), f"{where}.not_before"),
        not_after=_int64(m.get("not_after"), f"{where}.not_after"),
    )


def read_keys(rid: int, b: dict[Any, Any], limit: int) -> Keys:
    keys = _array(b.get("keys"), "KEYS.keys", 0, MAX_KEYS)
    return Keys(rid, tuple(_key(k, f"KEYS.keys[{i}]") for i, k in enumerate(keys)))


def read_goaway(rid: int, b: dict[Any, Any], limit: int) -> GoAway:
    return GoAway(
        _uint(b.get("last_request_id"), "GOAWAY.last_request_id"),
        _text(b.get("reason"), "GOAWAY.reason", 0, MAX_MESSAGE),
    )


def read_error(rid: int, b: dict[Any, Any], limit: int) -> Error:
    fatal = b.get("fatal")
    if fatal is not None and type(fatal) is not bool:
        raise bad("ERROR.fatal", "must be a boolean")
    return Error(
        rid,
        _code(b.get("code"), "ERROR.code"),
        _text(b.get("message"), "ERROR.message", 0, MAX_MESSAGE),
        _opt_uint(b.get("retry_after_ms"), "ERROR.retry_after_ms"),
        bool(fatal),
    )


# ----------------------------------------------------------------------------- writers


def _json_value(value: Any, where: str) -> None:
    """Check that a DCC is plain JSON data (what we send must decode on the other side)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is dict:
            if depth > DCC_MAX_DEPTH:
                raise bad(where, f"nests deeper than {DCC_MAX_DEPTH} levels")
            for k, x in v.items():
                if type(k) is not str:
                    raise bad(where, f"has a map key that is not text: {k!r}")
                stack.append((x, depth + 1))
        elif t is list or t is tuple:
            if depth > DCC_MAX_DEPTH:
                raise bad(where, f"nests deeper than {DCC_MAX_DEPTH} levels")
            stack.extend((x, depth + 1) for x in v)
        elif t is int:
            if not -(2**64) <= v < 2**64:
                raise bad(where, "has an integer outside the 64-bit CBOR range")
        elif t is float:
            if not math.isfinite(v):
                raise bad(where, "has a non-finite number (not JSON)")
        elif not (t is str or t is bool or v is None):
            raise bad(where, f"holds a {t.__name__}, which is not JSON data")


def _item_body(it: SignItem, check_dcc: bool) -> dict[str, Any]:
    if type(it) is not SignItem:
        raise Invalid(f"is a {type(it).__name__}, not a SignItem")
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


def code_out(code: Any) -> Any:
    # An ErrorCode (or another int subclass) goes out as a plain int; anything else is left
    # for the checks to refuse.
    return int(code) if isinstance(code, int) and not isinstance(code, bool) else code


def _result_body(r: ItemResult) -> dict[str, Any]:
    if type(r) is not ItemResult:
        raise Invalid(f"is a {type(r).__name__}, not an ItemResult")
    if r.error is None:
        if r.message is not None or r.retry_after_ms is not None:
            raise Invalid("a success (no error) carries no message or retry_after_ms")
        return {"hc1": r.hc1, "kid": r.kid}
    if r.hc1 is not None or r.kid is not None:
        raise Invalid("a failure (error set) carries no hc1 or kid")
    body = {"error": code_out(r.error), "message": r.message}
    if r.retry_after_ms is not None:
        body["retry_after_ms"] = r.retry_after_ms
    return body


def _key_body(k: KeyInfo) -> dict[str, Any]:
    if type(k) is not KeyInfo:
        raise Invalid(f"is a {type(k).__name__}, not a KeyInfo")
    return {
        "kid": k.kid,
        "alg": k.alg,
        "types": k.types,
        "state": k.state,
        "dsc": k.dsc,
        "not_before": k.not_before,
        "not_after": k.not_after,
    }


def write_hello(ev: Hello, check_dcc: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "versions": list(ev.versions),
        "max_frame": ev.max_frame,
        "compression": list(ev.compression),
    }
    if ev.agent is not None:
        body["agent"] = ev.agent
    return body


def write_welcome(ev: Welcome, check_dcc: bool) -> dict[str, Any]:
    return {
        "version": ev.version,
        "max_frame": ev.max_frame,
        "max_batch": ev.max_batch,
        "max_in_flight": ev.max_in_flight,
        "compression": ev.compression,
        "server": ev.server,
    }


def write_ping(ev: Ping | Pong, check_dcc: bool) -> dict[str, Any]:
    return {"data": ev.data}


def write_sign(ev: Sign, check_dcc: bool) -> dict[str, Any]:
    return _one(_item_body, ev.item, "SIGN", check_dcc)  # type: ignore[no-any-return]


def write_sign_batch(ev: SignBatch, check_dcc: bool) -> dict[str, Any]:
    return {"items": _each(_item_body, list(ev.items), "SIGN_BATCH.items", check_dcc)}


def write_sign_result(ev: SignResult, check_dcc: bool) -> dict[str, Any]:
    return _one(_result_body, ev.result, "SIGN_RESULT")  # type: ignore[no-any-return]


def write_sign_batch_result(ev: SignBatchResult, check_dcc: bool) -> dict[str, Any]:
    return {"results": _each(_result_body, list(ev.results), "SIGN_BATCH_RESULT.results")}


def write_list_keys(ev: ListKeys, check_dcc: bool) -> dict[str, Any]:
    return {}


def write_keys(ev: Keys, check_dcc: bool) -> dict[str, Any]:
    return {"keys": _each(_key_body, list(ev.keys), "KEYS.keys")}


def write_goaway(ev: GoAway, check_dcc: bool) -> dict[str, Any]:
    return {"last_request_id": ev.last_request_id, "reason": ev.reason}


def write_error(ev: Error, check_dcc: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code_out(ev.code), "message": ev.message}
    if ev.retry_after_ms is not None:
        body["retry_after_ms"] = ev.retry_after_ms
    if ev.fatal is not False:
        body["fatal"] = ev.fatal
    return body


Reader = Callable[[int, dict[Any, Any], int], Any]
Writer = Callable[[Any, bool], dict[str, Any]]


class Body(NamedTuple):
    """How the body of one frame type is read and written. ``read(request_id, body,
    max_batch)`` returns the event; ``write(event, check_dcc)`` returns the body map."""

    event: type
    read: Reader
    write: Writer


#: Every frame type's body: its event class, its reader and its writer, side by side.
BODIES: dict[FrameType, Body] = {
    FrameType.HELLO: Body(Hello, read_hello, write_hello),
    FrameType.WELCOME: Body(Welcome, read_welcome, write_welcome),
    FrameType.PING: Body(Ping, read_ping, write_ping),
    FrameType.PONG: Body(Pong, read_pong, write_ping),
    FrameType.SIGN: Body(Sign, read_sign, write_sign),
    FrameType.SIGN_BATCH: Body(SignBatch, read_sign_batch, write_sign_batch),
    FrameType.SIGN_RESULT: Body(SignResult, read_sign_result, write_sign_result),
    FrameType.SIGN_BATCH_RESULT: Body(
        SignBatchResult, read_sign_batch_result, write_sign_batch_result
    ),
    FrameType.LIST_KEYS: Body(ListKeys, read_list_keys, write_list_keys),
    FrameType.KEYS: Body(Keys, read_keys, write_keys),
    FrameType.GOAWAY: Body(GoAway, read_goaway, write_goaway),
    FrameType.ERROR: Body(Error, read_error, write_error),
}
#: The same, keyed the way the hot paths look them up: readers by frame type number,
#: writers by event class.
READERS: dict[int, Reader] = {int(t): body.read for t, body in BODIES.items()}
WRITERS: dict[type, Writer] = {body.event: body.write for body in BODIES.values()}


def body_of(ev: Any, check_dcc: bool) -> dict[str, Any]:
    """The CBOR body of event *ev* (*check_dcc*: a client checks the DCCs it sends)."""
    write = WRITERS.get(type(ev))
    if write is None:
        raise Invalid(f"not a wire event: {type(ev).__name__}", ErrorCode.PROTOCOL)
    return write(ev, check_dcc)


# ----------------------------------------------------------------------------- CBOR


def decode_cbor(raw: bytes, scan: cborlimits.Scan, max_items: int) -> dict[Any, Any]:
    """The body map of *raw*, after *scan* counted at most *max_items* CBOR data items in it
    (:func:`body_item_limit`) and no deeper nesting than :data:`MAX_DEPTH`.

    Raises:
        Invalid: *raw* is not one CBOR map within those limits (BAD_REQUEST).
    """
    try:
        value = cborlimits.decode(raw, scan=scan, max_items=max_items, max_depth=MAX_DEPTH)
    except ValueError as exc:
        raise Invalid(f"the body is not valid CBOR for this protocol: {exc}") from None
    if type(value) is not dict:
        raise Invalid("the body is not a CBOR map")
    return value
