"""The reply body: COSE_Sign1 + deflate + base45 + the SIGN_BATCH_RESULT CBOR in one call per
frame, from columns (reference).

Today a frame's results go ``hc1_encode`` (one string per item) -> ``ItemResult`` objects ->
``wire.Connection.send``, which builds a dict per result, runs the decoder's checks over them
and ``cbor2.dumps`` the body. :func:`encode_sign_batch_result` produces the same body bytes
from the columns the signing path already has (payloads and signatures as one buffer plus
offsets each, the frame's distinct protected headers and their kids); only refused items come
as Python values (their message is text a person will read). The native implementation
writes the HC1 strings straight into the body, GIL released;
:meth:`dccsign.protocol.wire.Connection.send_encoded_result` frames it without decoding it
again.

The checks are ``send``'s: a refused item's code, message and retry_after_ms, and an HC1 of
at most 8192 characters, with ``send``'s messages (as :class:`~dccsign.protocol.wire.BodyError`);
the results' count against ``max_batch`` and the body's size against ``max_frame`` are the
connection's, checked by ``send_encoded_result``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cbor2

from ..protocol import wire
from ._hc1_py import hc1_encode
from ._zlib_py import _check_level as check_level

__all__ = ["NO_RESULT", "Refusal", "check_reply_arguments", "encode_sign_batch_result"]

#: ``protected_of`` value of a refused item.
NO_RESULT = 0xFFFFFFFF

#: (error code, message, retry_after_ms or None) of a refused item.
Refusal = tuple[int, str, "int | None"]


def _u32(buf: Any, what: str) -> memoryview:
    try:
        return memoryview(buf).cast("B").cast("I")
    except TypeError:
        raise TypeError(f"{what} must be a buffer of uint32 (array('I'))") from None


def check_reply_arguments(
    protected: Any,
    kids: Any,
    protected_of: Any,
    payloads: Any,
    payload_offsets: Any,
    signatures: Any,
    signature_offsets: Any,
    refusals: Any,
    level: Any,
    single: bool,
    per_item: bool = True,
) -> tuple[tuple[bytes, ...], tuple[bytes, ...], memoryview, memoryview, memoryview]:
    """The argument rules both implementations share (TypeError / ValueError); returns the
    protected headers, kids and the three uint32 columns. With *per_item* false the per-item
    rules are left to the caller (the native loop checks them without Python and calls this
    again, per item, to name the first offender)."""
    check_level(level)
    protected = tuple(protected)
    kids = tuple(kids)
    if len(kids) != len(protected):
        raise ValueError(f"{len(kids)} kids for {len(protected)} protected headers")
    for i, (p, k) in enumerate(zip(protected, kids, strict=True)):
        if type(p) is not bytes:
            raise TypeError(f"protected header {i} must be bytes")
        if type(k) is not bytes or len(k) != wire.KID_SIZE:
            raise ValueError(f"kid {i} must be {wire.KID_SIZE} bytes")
    if type(payloads) is not bytes or type(signatures) is not bytes:
        raise TypeError("payloads and signatures must be bytes")
    if not isinstance(refusals, Mapping):
        raise TypeError("refusals must be a mapping of item index to (code, message, retry)")
    idx = _u32(protected_of, "protected_of")
    count = len(idx)
    if count < 1 or (single and count != 1):
        raise ValueError("one result for SIGN_RESULT, at least one for SIGN_BATCH_RESULT")
    pay_off = _u32(payload_offsets, "payload_offsets")
    sig_off = _u32(signature_offsets, "signature_offsets")
    for name, off, buf in (("payload", pay_off, payloads), ("signature", sig_off, signatures)):
        if len(off) != count + 1:
            raise ValueError(f"{name}_offsets must hold {count + 1} entries")
        rising = all(off[i] <= off[i + 1] for i in range(count if per_item else 0))
        if off[0] != 0 or off[count] > len(buf) or not rising:
            raise ValueError(f"{name}_offsets must rise from 0 to at most the buffer's length")
    for i in refusals:
        if type(i) is not int or not 0 <= i < count:
            raise ValueError(f"refusal for item {i!r}, which does not exist")
    for i in range(count if per_item else 0):
        if idx[i] == NO_RESULT:
            if i not in refusals:
                raise ValueError(f"item {i} is neither signed nor refused")
        elif idx[i] >= len(protected):
            raise ValueError(f"protected_of[{i}] = {idx[i]} names no protected header")
        elif i in refusals:
            raise ValueError(f"item {i} is both signed and refused")
    return protected, kids, idx, pay_off, sig_off


def refusal_map(refusal: Any) -> dict[str, Any]:
    """The result map of a refused item, as ``send`` builds it (wire ``_result_body``)."""
    code, message, retry = refusal
    body: dict[str, Any] = {"error": wire.bodies.code_out(code), "message": message}
    if retry is not None:
        body["retry_after_ms"] = retry
    return body


def first_bad_refusal(refusals: Mapping[int, Any], single: bool) -> tuple[int, str] | None:
    """(index, send's message) of the first refused item ``send`` would refuse to send."""
    for i in sorted(refusals):
        try:
            wire.bodies.read_result(refusal_map(refusals[i]))
        except wire.errors.Invalid as exc:
            where = "SIGN_RESULT" if single else f"SIGN_BATCH_RESULT.results[{i}]"
            return i, str(wire.bodies.located(exc, where))
    return None


def hc1_too_long(i: int, single: bool) -> str:
    where = "SIGN_RESULT" if single else f"SIGN_BATCH_RESULT.results[{i}]"
    what = f'hc1: must be text starting "HC1:", at most {wire.MAX_HC1} characters'
    return f"{where}.{what}"


def encode_sign_batch_result(
    protected: Sequence[bytes],
    kids: Sequence[bytes],
    protected_of: Any,
    payloads: bytes,
    payload_offsets: Any,
    signatures: bytes,
    signature_offsets: Any,
    refusals: Mapping[int, Refusal],
    level: int = 9,
    *,
    single: bool = False,
) -> bytes:
    """The SIGN_BATCH_RESULT body (with *single*: the SIGN_RESULT body) of one frame.

    Args:
        protected: the frame's distinct COSE protected headers; ``kids[k]`` is the kid of
            ``protected[k]``.
        protected_of: per item (uint32), the index of its protected header, or
            :data:`NO_RESULT` for a refused item.
        payloads, payload_offsets: payload *i* is ``payloads[off[i]:off[i + 1]]`` (the
            columns of :func:`~dccsign.native.splice_payloads`); the same for signatures.
        refusals: item index -> (error code, message, retry_after_ms or None), for exactly
            the refused items.
        level: the deflate level (as ``hc1_encode``).

    Returns:
        The body ``cbor2.dumps`` gives today for the same ``SignBatchResult`` (``SignResult``).

    Raises:
        dccsign.protocol.wire.BodyError: a result ``send`` would refuse (a bad error code or
            retry, a message above 1024 characters, an HC1 above 8192 characters): the first
            such item, with ``send``'s message.
        TypeError, ValueError: inconsistent columns.
    """
    protected, kids, idx, pay_off, sig_off = check_reply_arguments(
        protected, kids, protected_of, payloads, payload_offsets, signatures,
        signature_offsets, refusals, level, single,
    )  # fmt: skip
    bad = first_bad_refusal(refusals, single)
    results = []
    for i in range(len(idx)):
        if bad is not None and i == bad[0]:
            raise wire.BodyError(bad[1])
        p = idx[i]
        if p == NO_RESULT:
            results.append(refusal_map(refusals[i]))
            continue
        payload = payloads[pay_off[i] : pay_off[i + 1]]
        signature = signatures[sig_off[i] : sig_off[i + 1]]
        hc1 = hc1_encode(protected[p], [payload], [signature], level)[0]
        if len(hc1) > wire.MAX_HC1:
            raise wire.BodyError(hc1_too_long(i, single))
        results.append({"hc1": hc1, "kid": kids[p]})
    return cbor2.dumps(results[0] if single else {"results": results})
