"""DCC validation on CBOR bytes: the pure-Python reference of the native validator.

The native validator (``native/src/dccvalidate.c``) decides on the bytes what
:func:`dccsign.dcc.validate.validate` decides on the object a decoder makes of them. This
module is that definition, written out: decode, then validate. Two decoders, as in the product:

* ``strict=True`` (the engine): :func:`dccsign.protocol.cborlimits.decode` with
  :data:`STRICT_MAX_ITEMS` and :data:`STRICT_MAX_DEPTH`: no tags, no duplicate map keys, map
  keys text or bytes only. A DCC cut out of a request body that decoded always fits.
* ``strict=False`` (keyd): :func:`dccsign.dcc.verify.loads_exact`, cbor2 with its defaults (tags
  become dates, bignums, sets...; a repeated key keeps its last value).

Results per item: the type (``"v"``, ``"t"``, ``"r"``); a
:class:`~dccsign.dcc.validate.DCCValidationError` (the DCC breaks rules; exactly the issues of
:func:`~dccsign.dcc.validate.validate`); or a
:class:`~dccsign.native.errors.DCCDecodeError` (the decoder refuses the bytes; its message).

The native implementation answers the valid case in C. Every other item takes the slow path
of :func:`_settle` below, which runs this reference on the item, so errors and their messages
are the Python ones by construction, and checks that C found the same issues (path and rule,
in order). If the two ever disagree the item is refused and the disagreement counted
(:func:`dcc_validator_stats`); the tests and ``bench/validator_diff.py`` assert they never do.

The modules this needs are imported on first use: :mod:`dccsign.dcc.verify` imports
:mod:`dccsign.native`, which imports this module.
"""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Sequence
from datetime import date
from typing import Any

import cbor2

from ..protocol import cborlimits
from .errors import DCCDecodeError

__all__ = [
    "STRICT_MAX_DEPTH",
    "STRICT_MAX_ITEMS",
    "DccRules",
    "composition_seconds",
    "dcc_validator_stats",
    "validate_cwt_batch",
    "validate_dcc_batch",
    "validate_dcc_cbor",
]

#: The strict decoder's limits (the C side has the same: DV_STRICT_MAX_*). wire.MAX_DEPTH is
#: 16 for a whole request body, so a DCC that came out of one always fits.
STRICT_MAX_ITEMS = 65536
STRICT_MAX_DEPTH = 16

# cbor2's own errors are not ValueErrors; everything a decoder may raise on hostile bytes.
_DECODE_ERRORS = (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, EOFError)
_NO_CWT_DCC = "the payload is not a CWT map whose claim -260 is a map holding the DCC under key 1"


class DccRules:
    """What the validator needs besides the DCC, compiled once: the value-set tables.

    Build one at start and one on every value-set reload (a :class:`ValueSets` is immutable,
    and so is this). Shareable between threads.

    Args:
        valuesets: the code tables; default :meth:`ValueSets.builtin`.

    Raises:
        TypeError: ``valuesets`` is not a :class:`~dccsign.dcc.valuesets.ValueSets`.
    """

    __slots__ = ("valuesets",)

    def __init__(self, valuesets: Any = None) -> None:
        self.valuesets = _valuesets(valuesets)

    def __repr__(self) -> str:
        return f"<DccRules {self.valuesets!r} (python)>"


def _valuesets(valuesets: Any) -> Any:
    from ..dcc.valuesets import ValueSets

    if valuesets is None:
        return ValueSets.builtin()
    if not isinstance(valuesets, ValueSets):
        raise TypeError(f"valuesets must be a ValueSets, not {type(valuesets).__name__}")
    return valuesets


def _check_today(today: object) -> None:
    if today is not None and not isinstance(today, date):
        raise TypeError(f"today must be a datetime.date, not {type(today).__name__}")


def _decode(data: bytes, strict: bool, nfc_names: bool = False) -> Any:
    """The decoder of the engine (strict) or of keyd; DCCDecodeError when it refuses. With
    nfc_names, fn and gn come out NFC-normalised, as the engine validates them
    (:func:`dccsign.dcc.issuer.nfc_names`)."""
    if nfc_names:
        from ..dcc.issuer import nfc_names as normalised

        obj = _decode(data, strict)
        return normalised(obj) if isinstance(obj, dict) else obj
    try:
        if strict:
            return cborlimits.decode(
                data,
                scan=cborlimits.scan,
                max_items=STRICT_MAX_ITEMS,
                max_depth=STRICT_MAX_DEPTH,
            )
        from ..dcc.verify import loads_exact

        return loads_exact(data)
    except _DECODE_ERRORS as exc:
        raise DCCDecodeError(f"the DCC is not CBOR this decoder accepts: {exc}") from None


def _cwt_dcc(payload: bytes) -> Any:
    """``loads_exact(payload)[-260][1]``, keyd's way to the DCC, or DCCDecodeError."""
    try:
        from ..dcc.verify import loads_exact

        claims = loads_exact(payload)
    except _DECODE_ERRORS as exc:
        raise DCCDecodeError(f"the payload is not CBOR keyd accepts: {exc}") from None
    hcert = claims.get(-260) if type(claims) is dict else None
    if type(hcert) is not dict or 1 not in hcert:
        raise DCCDecodeError(_NO_CWT_DCC)
    return hcert[1]


def _verdict(obj_of: Any, arg: Any, rules: Any, today: date | None) -> Any:
    """The reference answer for one item: a type, or the exception (returned, not raised)."""
    from ..dcc.validate import DCCValidationError, validate

    try:
        return validate(obj_of(arg), valuesets=rules.valuesets, today=today)
    except (DCCValidationError, DCCDecodeError) as exc:
        return exc


def validate_dcc_cbor(
    rules: DccRules,
    data: bytes,
    today: date | None = None,
    *,
    strict: bool = True,
    nfc_names: bool = False,
) -> str:
    """Validate one DCC given as CBOR (the map under CWT claim -260/1).

    Args:
        rules: the compiled value sets (:class:`DccRules` of this implementation).
        data: exactly one CBOR item (bytes-like).
        today: the date ``dob`` must not be after; default today in UTC.
        strict: decode as the engine does (True) or as keyd does (False); see the module.
        nfc_names: validate ``nam.fn``/``nam.gn`` NFC-normalised, as the engine does before
            it signs (:func:`dccsign.dcc.issuer.nfc_names`). The native implementation hands a name
            it cannot prove NFC (a code point past U+2FFF or one NFC may change) to this
            reference.

    Returns:
        ``"v"``, ``"t"`` or ``"r"``.

    Raises:
        DCCValidationError: the DCC breaks rules (all issues, as
            :func:`dccsign.dcc.validate.validate`).
        DCCDecodeError: the decoder refuses the bytes.
        TypeError: a wrong argument type (a caller bug).
    """
    if not isinstance(rules, DccRules):
        raise TypeError(f"rules must be a DccRules, not {type(rules).__name__}")
    _check_today(today)
    data = bytes(data)
    result = _verdict(lambda d: _decode(d, strict, nfc_names), data, rules, today)
    _STATS.count(1, 0)
    if isinstance(result, Exception):
        raise result
    return result


def _spans(size: int, offsets: Sequence[int], ends: Sequence[int] | None) -> list[tuple[int, int]]:
    """(start, end) per item from N+1 boundaries, or from N starts and N ends."""
    offs = [int(o) for o in offsets]
    if ends is None:
        if not offs:
            raise ValueError("offsets must hold N+1 boundaries (at least one)")
        pairs = list(itertools.pairwise(offs))
    else:
        stops = [int(e) for e in ends]
        if len(stops) != len(offs):
            raise ValueError("offsets and ends must have the same length")
        pairs = list(zip(offs, stops, strict=True))
    for start, end in pairs:
        if not 0 <= start <= end <= size:
            raise ValueError(f"span {start}:{end} is not inside the {size}-byte buffer")
    return pairs


def validate_dcc_batch(
    rules: DccRules,
    buf: bytes,
    offsets: Sequence[int],
    today: date | None = None,
    *,
    ends: Sequence[int] | None = None,
    strict: bool = True,
    nfc_names: bool = False,
) -> list[Any]:
    """Validate many DCCs held in one buffer; one result per DCC, in order.

    Item ``i`` is ``buf[offsets[i]:offsets[i + 1]]`` (``offsets`` has N+1 boundaries), or,
    when ``ends`` is given, ``buf[offsets[i]:ends[i]]`` (N starts, N ends: spans inside a
    request body). Each result is ``"v"``/``"t"``/``"r"``, a DCCValidationError or a
    DCCDecodeError (returned, not raised). Nothing per item is raised. ``strict`` and
    ``nfc_names`` as for :func:`validate_dcc_cbor` (the engine's call: both True).

    Raises:
        TypeError, ValueError: bad arguments (spans outside the buffer, ...).
    """
    if not isinstance(rules, DccRules):
        raise TypeError(f"rules must be a DccRules, not {type(rules).__name__}")
    _check_today(today)
    data = bytes(buf)
    pairs = _spans(len(data), offsets, ends)
    out = [
        _verdict(lambda d: _decode(d, strict, nfc_names), data[start:end], rules, today)
        for start, end in pairs
    ]
    _STATS.count(len(out), 0)
    return out


def validate_cwt_batch(
    rules: DccRules, payloads: Sequence[bytes], today: date | None = None
) -> list[Any]:
    """keyd's form: validate the DCC inside each CWT payload (decoded the keyd way).

    Per payload ``"v"``/``"t"``/``"r"``, a DCCValidationError, or a DCCDecodeError when the
    payload does not decode or has no map under claim -260 holding key 1.

    Raises:
        TypeError: a payload is not bytes, or a wrong argument type.
    """
    if not isinstance(rules, DccRules):
        raise TypeError(f"rules must be a DccRules, not {type(rules).__name__}")
    _check_today(today)
    items = tuple(payloads)
    for i, p in enumerate(items):
        if type(p) is not bytes:
            raise TypeError(f"payload {i} must be bytes, not {type(p).__name__}")
    out = [_verdict(_cwt_dcc, p, rules, today) for p in items]
    _STATS.count(len(out), 0)
    return out


# ---------------------------------------------------------------------------------------------
# The native implementation's slow path (shared here so that it is written once).


class _Stats:
    """Per-process counters of a validator implementation (read by dcc_validator_stats)."""

    _FIELDS = ("items", "fast", "invalid", "undecodable", "punted", "disagreements")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = dict.fromkeys(self._FIELDS, 0)

    def count(self, items: int, fast: int) -> None:
        with self._lock:
            self._c["items"] += items
            self._c["fast"] += fast

    def bump(self, name: str) -> None:
        with self._lock:
            self._c[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


_STATS = _Stats()


def dcc_validator_stats() -> dict[str, int]:
    """Counters of this process: ``items`` validated; ``fast`` decided in C (0 here);
    ``invalid``/``undecodable``: items C refused, re-derived by the Python reference;
    ``punted``: items C left to the reference (rare CBOR, see dccvalidate.h);
    ``disagreements``: items where the two differed (refused; must stay 0)."""
    return _STATS.snapshot()


_NFC_INERT: bytes | None = None


def composition_seconds() -> set[int]:
    """The code points that are the second of a canonical composition pair in this Python's
    unicodedata, Hangul vowel and trailing jamo included (they compose with what precedes
    them algorithmically): a text holding one may change under NFC. Also used by
    scripts/gen_nfc_table.py."""
    import unicodedata

    seconds = set()
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                seconds.add(int(parts[1], 16))
    seconds.update(range(0x1161, 0x1176), range(0x11A8, 0x11C3))
    return seconds


def _nfc_inert_bitmap() -> bytes:
    """Bit c set when code point c (below U+3000) is NFC-inert: canonical combining class 0,
    NFC of itself, and never the second character of a canonical composition (so it neither
    changes nor combines with what precedes it). A text of such characters is NFC. Built
    once per process from this Python's unicodedata (the one dccsign.dcc.issuer.nfc_names uses)."""
    global _NFC_INERT
    if _NFC_INERT is None:
        import unicodedata

        limit = 0x3000
        seconds = composition_seconds()
        bits = bytearray(limit // 8)
        for cp in range(limit):
            ch = chr(cp)
            if (
                0xD800 <= cp < 0xE000
                or cp in seconds
                or unicodedata.combining(ch)
                or unicodedata.normalize("NFC", ch) != ch
            ):
                continue
            bits[cp >> 3] |= 1 << (cp & 7)
        _NFC_INERT = bytes(bits)
    return _NFC_INERT


def _render(prefix: str, buf: bytes, key_off: int) -> str:
    """:func:`dccsign.dcc.validate.child_path` of the map key whose CBOR item starts at key_off
    (slow path only)."""
    from ..dcc.validate import child_path

    key = cbor2.CBORDecoder(io.BytesIO(buf[key_off:])).decode(immutable=True)
    return child_path(prefix, key)


def _settle(
    stats: _Stats,
    outcome: int,
    c_issues: list[tuple[str, str]] | None,
    reference: Any,
) -> Any:
    """The result of an item C did not find valid. outcome: 3 invalid (c_issues: its (path,
    rule) list, None when it overflowed), 4 undecodable, 5 punted. reference: this module's
    answer for the item. Refuses (and counts) when the two disagree."""
    from ..dcc.validate import DCCValidationError, Issue

    if outcome == 5:
        stats.bump("punted")
        return reference
    if outcome == 4:
        stats.bump("undecodable")
        agree = isinstance(reference, DCCDecodeError)
    else:
        stats.bump("invalid")
        agree = isinstance(reference, DCCValidationError) and (
            c_issues is None or c_issues == [(i.path, i.rule) for i in reference.issues]
        )
    if agree:
        return reference
    stats.bump("disagreements")
    if isinstance(reference, Exception):
        return reference  # the reference refuses too: its error says why
    return DCCValidationError(
        (
            Issue(
                "$",
                "internal",
                "the native and the reference validator disagree on this DCC; refused",
            ),
        )
    )
