"""The data plane of one sign frame: walked item spans in, per-row verdicts and CWT payload
columns out (issue 14; DESIGN.md, "Data plane and control plane").

:meth:`dccsign.dispatch.Dispatcher.sign_view` runs a frame that the request walker
(:func:`dccsign.native.walk_sign_batch`) turned into a :class:`~dccsign.native.BatchView`:

1. :func:`plain` -- does the frame take this path? Items with an idempotency key, a ``kid`` or
   a ``validity_days`` of their own go the general way (``Dispatcher.sign``), whole frame.
2. :func:`check_rows` -- every DCC validated; per row its type or why it is refused, and the
   DCC bytes the signature will cover (the request's own, or re-encoded where needed).
3. per DCC type of the frame (at most three): key, claims prefix and policy, once;
4. :func:`splice` -- the CWT payloads of a group of rows, as one buffer and its end offsets;
5. per distinct account: the quota, once (``native.span_table`` finds the accounts);
6. one :class:`~dccsign.protocol.keyd.KeydColumns` per kid to the batcher.

Each step is one call per frame. :func:`check_rows` and :func:`splice` are still Python per
certificate (decoding each DCC with cbor2 to validate it and to see whether its encoding is the
canonical one): the native validator and splice of issue 14 replace their bodies, not their
contracts.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import cbor2

from . import native
from .chain import _nfc
from .dcc import DCCValidationError, validate
from .native import _walker_py as W
from .valuesets import ValueSets

__all__ = ["FrameRows", "check_rows", "columns_of", "plain", "splice"]


def columns_of(view: native.BatchView) -> array:
    """The view's columns as an ``array('I')`` (one copy; slicing it with a step, and
    ``count``, run in C)."""
    cols = array("I")
    cols.frombytes(view.columns)
    return cols


def plain(view: native.BatchView, cols: array) -> bool:
    """Whether no item of the frame has an idempotency key, a kid or a validity of its own:
    then every item is signed alike but for its DCC, account and operator."""
    n = view.count
    nf = W.NFIELDS
    return (
        cols[W.KEY_LEN :: nf].count(0) == n
        and cols[W.KID_OFF :: nf].count(0) == n
        and cols[W.VALIDITY :: nf].count(0) == n
    )


@dataclass
class FrameRows:
    """What :func:`check_rows` finds: ``types[i]`` is ``"v"``, ``"t"``, ``"r"`` or ``""``
    (refused: ``failures[i]`` says why, as the dispatcher's INVALID_DCC message);
    ``dccs[i]`` the DCC's canonical CBOR (``None`` for a refused row); ``decoded`` the
    decoded DCCs of the rows, kept for the policy's country and issuer lists."""

    types: list[str]
    failures: dict[int, str] = field(default_factory=dict)
    dccs: list[bytes | None] = field(default_factory=list)
    decoded: list[object] = field(default_factory=list)


def check_rows(view: native.BatchView, cols: array, valuesets: ValueSets) -> FrameRows:
    """Validate every DCC of the frame (the dispatcher's rules: NFC names, then
    :func:`dccsign.dcc.validate`)."""
    data = view.data
    nf = W.NFIELDS
    out = FrameRows(types=[""] * view.count, dccs=[None] * view.count, decoded=[None] * view.count)
    for i in range(view.count):
        off, length = cols[i * nf + W.DCC_OFF], cols[i * nf + W.DCC_LEN]
        span = data[off : off + length]
        dcc = cbor2.loads(span)
        if isinstance(dcc, dict):
            dcc = _nfc(dcc)
        try:
            out.types[i] = validate(dcc, valuesets=valuesets)
        except DCCValidationError as exc:
            first = exc.issues[0]
            more = f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
            out.failures[i] = f"{first.path} [{first.rule}] {first.message}{more}"
            continue
        canonical = cbor2.dumps(dcc)
        out.dccs[i] = span if canonical == span else canonical
        out.decoded[i] = dcc
    return out


def splice(prefix: bytes, dccs: list[bytes | None], rows: array) -> tuple[bytes, array]:
    """The CWT payloads ``prefix + dcc`` of *rows*, concatenated, and their end offsets."""
    pieces = []
    for r in rows:
        pieces.append(prefix)
        pieces.append(dccs[r])  # type: ignore[arg-type]
    payloads = b"".join(pieces)
    ends = array("I")
    size = 0
    plen = len(prefix)
    for r in rows:
        size += plen + len(dccs[r])  # type: ignore[arg-type]
        ends.append(size)
    return payloads, ends
