"""The data plane of one sign frame: walked item spans in, per-row verdicts and CWT payload
columns out (issue 14; DESIGN.md, "Data plane and control plane").

:meth:`dccsign.server.dispatch.Dispatcher.sign_view` (or, for a frame without idempotency keys,
``sign_frame_soon``, which needs no task) runs a frame that the request walker
(:func:`dccsign.native.walk_sign_batch`) turned into a :class:`~dccsign.native.BatchView`:

1. :func:`plain` -- does the frame take this path? Items with an idempotency key, a ``kid`` or
   a ``validity_days`` of their own go the general way (``Dispatcher.sign``), whole frame.
2. :func:`check_rows` -- every DCC validated; per row its type or why it is refused, and the
   DCC bytes the signature will cover (the request's own, or re-encoded where needed).
3. per DCC type of the frame (at most three): key, claims prefix and policy, once;
4. :func:`splice` -- the CWT payloads of a group of rows, as one buffer and its end offsets;
5. per distinct account: the quota, once (``native.span_table`` finds the accounts);
6. one :class:`~dccsign.protocol.keyd.KeydColumns` per kid to the batcher.

Each step is one call per frame, per DCC type or per kid; the per-certificate work runs in
native batch calls (``validate_dcc_batch``, ``splice_payloads``, ``span_table``, and for the
reply ``encode_sign_batch_result``), with Python per refused row only -- and per row for a
client whose policy lists countries or issuers (those rules read the decoded DCC).
"""

from __future__ import annotations

import collections
import operator
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import Any

import cbor2

from .. import native
from ..dcc.issuer import nfc_names
from ..dcc.validate import DCCValidationError
from ..native import layout as W
from ..native.layout import NO_PAYLOAD
from ..protocol.codes import ErrorCode
from ..protocol.wire import ItemResult
from .offload import encode_reply, run_native

__all__ = [
    "Frame",
    "FrameReply",
    "FrameRows",
    "KidRows",
    "check_rows",
    "columns_of",
    "keyed_rows",
    "plain",
]


def columns_of(view: native.BatchView) -> array:
    """The view's columns as an ``array('I')`` (one copy; slicing it with a step, and
    ``count``, run in C)."""
    cols = array("I")
    cols.frombytes(view.columns)
    return cols


def plain(view: native.BatchView, cols: array) -> bool:
    """Whether no item of the frame asks for a kid or a validity of its own: then every item
    is signed alike but for its DCC, account and operator (and idempotency key)."""
    n = view.count
    nf = W.NFIELDS
    return cols[W.KID_OFF :: nf].count(0) == n and cols[W.VALIDITY :: nf].count(0) == n


def keyed_rows(view: native.BatchView, cols: array) -> array:
    """The items that carry an idempotency key, ascending."""
    return array("I", compress(range(view.count), cols[W.KEY_LEN :: W.NFIELDS]))


@dataclass
class FrameRows:
    """What :func:`check_rows` finds: ``types[i]`` is ``"v"``, ``"t"``, ``"r"`` or ``""``
    (refused: ``failures[i]`` says why, as the dispatcher's INVALID_DCC message);
    ``decoded`` the decoded DCCs of the valid rows when asked for (the policy's country and
    issuer lists need them), else ``None``s."""

    types: list[str]
    failures: dict[int, str] = field(default_factory=dict)
    decoded: list[object] = field(default_factory=list)


def check_rows(
    view: native.BatchView, cols: array, rules: Any, *, decode: bool = False
) -> FrameRows:
    """Validate every DCC of the frame in one native batch call (the dispatcher's rules:
    names NFC-normalised, then :func:`dccsign.dcc.validate.validate`'s verdict, issues and
    messages).
    With *decode* (a client whose policy lists countries or issuers), the valid DCCs are
    also decoded, for :meth:`dccsign.server.policy.Policy.check`."""
    nf = W.NFIELDS
    offs = cols[W.DCC_OFF :: nf]
    ends = array("I", map(operator.add, offs, cols[W.DCC_LEN :: nf]))
    verdicts = native.validate_dcc_batch(
        rules, view.data, offs, ends=ends, strict=True, nfc_names=True
    )
    # The valid rows' verdicts are their types; only the refused rows are visited (the scan
    # for them runs in C: no interpreter per row).
    out = FrameRows(types=list(verdicts), decoded=[None] * view.count)
    refused = compress(range(view.count), map(operator.is_not, map(type, verdicts), repeat(str)))
    for i in refused:
        verdict = verdicts[i]
        out.types[i] = ""
        if isinstance(verdict, DCCValidationError):
            first = verdict.issues[0]
            n = len(verdict.issues)
            more = f" (and {n - 1} more)" if n > 1 else ""
            out.failures[i] = f"{first.path} [{first.rule}] {first.message}{more}"
        else:  # the request decoded, so its DCC does: a bug, refused all the same
            out.failures[i] = f"the DCC cannot be decoded: {verdict}"
    if decode:
        data = view.data
        for i, t in enumerate(out.types):
            if t:
                dcc = cbor2.loads(data[offs[i] : ends[i]])
                out.decoded[i] = nfc_names(dcc) if isinstance(dcc, dict) else dcc
    return out


#: Above this many signed items, a frame's reply body is encoded in a worker thread (the
#: native encoder releases the GIL; a thread hop costs the event loop more than a few items).
INLINE_ENCODE = 16


@dataclass
class KidRows:
    """The rows of a frame that one kid signs: ``rows`` (item numbers, ascending) and the
    claims prefix of each, their spliced payloads (``spliced``; ``ends``: each row's end in
    ``spliced.data``), and after keyd the rows it signed and its answer."""

    key: Any
    max_payload: int
    groups: list[tuple[int, array]] = field(default_factory=list)  # (prefix index, rows)
    rows: array = field(default_factory=lambda: array("I"))
    spliced: Any = None
    ends: array = field(default_factory=lambda: array("I"))
    signed_rows: array = field(default_factory=lambda: array("I"))
    result: Any = None


@dataclass
class FrameReply:
    """A plain frame's answer: its encoded SIGN_BATCH_RESULT (or SIGN_RESULT) body, and per
    (kid hex, DCC type, outcome) how many items had it (for the metrics)."""

    body: bytes
    count: int
    outcomes: dict[tuple[str, str, str], int]
    single: bool = False  # a SIGN_RESULT body (one item), not SIGN_BATCH_RESULT


#: A row's DCC type as one byte of Frame._types ("-": refused), for rows_of's C-level scan.
_TYPE_CODE = {"": ord("-"), "v": ord("v"), "t": ord("t"), "r": ord("r")}


def _type_codes(types: list[str]) -> bytes:
    return bytes(map(_TYPE_CODE.__getitem__, types))


class Frame:
    """One plain frame on its way through the data plane (see the module docstring): what is
    refused so far, and per kid what goes to keyd. Methods are called once per frame, per
    DCC type or per kid; the per-item loops run in native calls."""

    def __init__(self, view: native.BatchView, rows: FrameRows) -> None:
        self.view = view
        self.rows = rows
        self.count = view.count
        #: item -> (error code, message, retry_after_ms or None)
        self.refusals: dict[int, tuple[int, str, int | None]] = {}
        self.kids: list[KidRows] = []
        self._kid_index: dict[bytes, int] = {}
        self.prefixes: list[bytes] = []
        self._types = _type_codes(rows.types)

    def retype(self) -> None:
        """Take changes to ``rows.types`` into account (rows left out of the frame)."""
        self._types = _type_codes(self.rows.types)

    def rows_of(self, dcc_type: str) -> array:
        """The items whose DCC is valid and of *dcc_type*, ascending."""
        ch = ord(dcc_type)
        return array("I", compress(range(self.count), map(ch.__eq__, self._types)))

    def refuse(self, i: int, code: int, message: str, retry_ms: int | None = None) -> None:
        self.refusals[i] = (int(code), message, retry_ms)

    def refuse_result(self, rows: Iterable[int], result: Any) -> None:
        """Refuse *rows* with the failed :class:`~dccsign.protocol.wire.ItemResult`
        *result* (one per frame and reason: the same tuple for every row)."""
        entry = (int(result.error), result.message, result.retry_after_ms)
        self.refusals.update(dict.fromkeys(rows, entry))

    def add(self, key: Any, prefix: bytes, max_payload: int, rows: array) -> None:
        """*rows* go to keyd under *key* with the claims *prefix*."""
        if not rows:
            return
        k = self._kid_index.get(key.dsc.kid)
        if k is None:
            k = self._kid_index[key.dsc.kid] = len(self.kids)
            self.kids.append(KidRows(key, max_payload))
        self.prefixes.append(prefix)
        self.kids[k].groups.append((len(self.prefixes) - 1, rows))

    def splice(self, drop: set[int] | None = None) -> None:
        """Build each kid's payloads (one native splice per kid), leaving out the refused
        rows; a row whose payload would not fit a QR code is refused TOO_LARGE_FOR_QR. With
        *drop*, only the kids that had one of those rows are spliced again."""
        for kid in self.kids:
            if drop is not None and not drop.intersection(kid.rows):
                continue
            while not self._splice(kid):
                pass  # cold: a certificate too large for a QR code was refused; again

    def _splice(self, kid: KidRows) -> bool:
        prefix_of = array("I", b"\xff" * (4 * self.count))
        for p, rows in kid.groups:
            native.fill_rows(prefix_of, rows, p)
        if self.refusals:
            native.fill_rows(prefix_of, array("I", self.refusals), NO_PAYLOAD)
        spliced = native.splice_payloads(self.view, self.prefixes, prefix_of)
        if spliced.longest > kid.max_payload:
            off = array("I")
            off.frombytes(spliced.offsets)
            for i in spliced.rows:
                n = off[i + 1] - off[i]
                if n > kid.max_payload:
                    self.refuse(
                        i,
                        ErrorCode.TOO_LARGE_FOR_QR,
                        f"the signed certificate would not fit a QR code ({n}-byte payload)",
                    )
            return False
        kid.rows = spliced.rows
        kid.spliced = spliced
        kid.ends = spliced.ends
        return True

    def bound_rows(self) -> array:
        """Every row on its way to keyd, ascending."""
        rows = array("I")
        for kid in self.kids:
            rows.extend(kid.rows)
        return array("I", sorted(rows)) if len(self.kids) > 1 else rows

    def signed(self, k: int, rows: array, result: Any) -> None:
        self.kids[k].signed_rows = rows
        self.kids[k].result = result

    async def results(self, level: int) -> list[Any]:
        """One :class:`~dccsign.protocol.wire.ItemResult` per item (for a frame whose reply
        cannot be encoded from columns alone: some items are answered from the idempotency
        cache). The HC1 strings are made per kid in one native call each."""
        out: list[Any] = [None] * self.count
        for kid in self.kids:
            if not kid.signed_rows:
                continue
            result = kid.result
            starts = array("I", [0])
            starts += kid.ends[:-1]
            at = {r: j for j, r in enumerate(kid.rows)}
            data = kid.spliced.data
            payloads = [data[starts[at[r]] : kid.ends[at[r]]] for r in kid.signed_rows]
            job = (kid.key.protected, payloads, result.signature_list(), level)
            if len(payloads) > INLINE_ENCODE:
                texts = await run_native(native.hc1_encode, *job)
            else:
                texts = native.hc1_encode(*job)
            for r, text in zip(kid.signed_rows, texts, strict=True):
                out[r] = ItemResult(hc1=text, kid=kid.key.dsc.kid)
        for i, (code, message, retry) in self.refusals.items():
            out[i] = ItemResult(error=ErrorCode(code), message=message, retry_after_ms=retry)
        return out

    async def encode(self, level: int, single: bool = False) -> FrameReply:
        """The reply body (``native.encode_sign_batch_result``), in the native reply pool
        when it holds many certificates."""
        job, signed = self.encode_job(level)
        if signed > INLINE_ENCODE:
            body = await encode_reply(*job, single=single)
        else:
            body = native.encode_sign_batch_result(*job, single=single)
        return self.reply(body, single)

    def encode_job(self, level: int) -> tuple[tuple[Any, ...], int]:
        """The arguments of ``native.encode_sign_batch_result`` for this frame's reply (all
        but *single*), and how many certificates it signs."""
        n = self.count
        kids = [k for k in self.kids if k.signed_rows]
        protected_of = array("I", b"\xff" * (4 * n))
        for k, kid in enumerate(kids):
            native.fill_rows(protected_of, kid.signed_rows, k)
        if len(kids) == 1:
            payloads, payload_offsets = kids[0].spliced.data, kids[0].spliced.offsets
        else:
            payloads, payload_offsets = native.gather_spans(
                n, [(k.rows, k.spliced.data, k.ends) for k in kids]
            )
        signatures, signature_offsets = native.gather_spans(
            n, [(k.signed_rows, k.result.signatures, k.result.sig_ends) for k in kids]
        )
        job = (
            [k.key.protected for k in kids],
            [k.key.dsc.kid for k in kids],
            protected_of,
            payloads,
            payload_offsets,
            signatures,
            signature_offsets,
            self.refusals,
            level,
        )
        return job, sum(len(k.signed_rows) for k in kids)

    def reply(self, body: bytes, single: bool = False) -> FrameReply:
        """The :class:`FrameReply` of encoded *body*, with per (kid, type, outcome) counts."""
        outcomes: collections.Counter[tuple[str, str, str]] = collections.Counter()
        types = self.rows.types
        for kid in self.kids:
            if not kid.signed_rows:
                continue
            kid_hex = kid.key.dsc.kid.hex()
            for t, c in collections.Counter(map(types.__getitem__, kid.signed_rows)).items():
                outcomes[kid_hex, t, "ok"] += c
        for i, (code, _message, _retry) in self.refusals.items():
            outcomes["", types[i], ErrorCode(code).name] += 1
        return FrameReply(body, self.count, dict(outcomes), single)
