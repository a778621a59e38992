"""Validation of a DCC payload (the JSON object signed under CWT claim -260/1) before signing.

:func:`validate` checks one DCC against the rules of the schema version it names in ``ver``
(1.0.x to 1.3.x) and against the value sets, and returns its type (``"v"``, ``"t"`` or
``"r"``). It is on the signing hot path, so the valid case runs straight through without
allocating anything per field; issues are built only when something is wrong, and then *all*
of them are collected and raised together in one :class:`DCCValidationError`.

The validator is deliberately stricter than the official JSON schemas: it must never pass a
payload that the schema of its ``ver`` rejects, and it refuses some schema-valid junk on
purpose. The differences (each one a rule id below):

* ``one-group`` / ``one-entry``: exactly one of ``v``/``t``/``r`` holding exactly one entry,
  for every version (schemas before 1.3.0 allow several groups, several entries, or none).
* ``unknown-field``: no property the schema does not define, at any level (the schemas allow
  any extra property); ``dr`` only where its version defines it (1.0.x, 1.1.x).
* ``type``: ``null`` is a type error, never "absent"; ``dn``/``sd`` must be JSON integers,
  not ``true`` and not ``1.0`` (the schema's ``integer`` accepts ``1.0``).
* ``range``: ``dn``/``sd`` at most 9 before 1.3.0 (as the schema says) and at most
  :data:`DOSE_MAX` from 1.3.0 (the schema has no bound); ``dob`` not in the future.
* ``date`` / ``date-time``: real calendar dates (no ``1999-02-30``, no month 13 in a partial
  ``dob``); ``sc``/``dr`` strictly RFC 3339 ``YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)``
  (``T`` and ``Z`` in either case, as RFC 3339 allows; at most 9 fractional digits; no leap
  second), where the schema's ``date-time`` format is only an annotation unless a validator
  asserts it. Neither ``+0200``, ``+02`` nor a space separator passes.
* ``date-order``: a recovery's ``du`` is not before its ``df``.
* ``max-length``: also for fields the schema leaves unbounded (``nm`` before 1.3.0, a test's
  ``ma``, a 1.0.0 ``tt``): the version's text limit.
* ``empty``: ``is``, ``tc``, ``nm`` and a test's ``ma`` are not empty when present, and the
  name has at least one non-empty transliterated part (``fnt`` or ``gnt``).
* ``encoding``: text must be encodable as UTF-8 (no lone surrogates), or CBOR cannot carry it.
* ``value-set``: coded fields must hold a known code (the schema only *references* value
  sets). Retired codes (``active: false``) stay valid.
* ``uvci-grammar`` / ``uvci-checksum``: ``ci`` must be a canonical UVCI
  (:mod:`dccsign.dcc.uvci`); the schema only bounds its length.
* ``version``: ``ver`` must be ``1.<0-3>.<patch>`` without leading zeros (the schema's
  pattern accepts any ``\\d+.\\d+.\\d+``). An unknown newer patch is checked by the rules of
  the newest known release of its minor version.

The rule ``internal`` is reserved for inputs that cannot even be inspected (objects whose
methods raise); plain JSON data never produces it.

Strings are counted in code points, as JSON Schema's ``maxLength`` does (and Python's
``len``). Names are not NFC-normalised here: the validator never changes its input.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Final

from ..errors import DccSignError
from .uvci import check_uvci
from .valuesets import ValueSets, _Lookup

__all__ = ["DOSE_MAX", "RULES", "DCCValidationError", "Issue", "child_path", "validate"]

#: Every rule id an :class:`Issue` can carry.
RULES: Final = frozenset(
    {
        "type",
        "required",
        "unknown-field",
        "version",
        "one-group",
        "one-entry",
        "max-length",
        "pattern",
        "empty",
        "encoding",
        "date",
        "date-time",
        "date-order",
        "range",
        "value-set",
        "uvci-grammar",
        "uvci-checksum",
        "internal",
    }
)

#: Upper bound of ``dn``/``sd`` from schema 1.3.0 on (the schema has none). No vaccination
#: series comes near it; the bound keeps absurd integers (and CBOR bignums) out of signed data.
DOSE_MAX: Final = 99

# How many issues str(DCCValidationError) spells out; as_json() always has all of them.
_SUMMARY_ISSUES = 5


@dataclass(frozen=True, slots=True)
class Issue:
    """One rule violation: where (``path``), which rule (``rule``) and a sentence for humans.

    ``path`` is a JSON path into the DCC (``"$"``, ``"$.nam.fnt"``, ``"$.v[0].dn"``);
    ``rule`` is one of :data:`RULES` and is stable API; ``message`` is not.
    """

    path: str
    rule: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """The issue as a JSON-ready dict with keys ``path``, ``rule`` and ``message``."""
        return {"path": self.path, "rule": self.rule, "message": self.message}


class DCCValidationError(DccSignError, ValueError):
    """A DCC was rejected. ``issues`` lists every problem found, in document order."""

    issues: tuple[Issue, ...]

    def __init__(self, issues: tuple[Issue, ...] | list[Issue]) -> None:
        self.issues = tuple(issues)
        n = len(self.issues)
        shown = "; ".join(f"{i.path} [{i.rule}] {i.message}" for i in self.issues[:_SUMMARY_ISSUES])
        more = f"; and {n - _SUMMARY_ISSUES} more" if n > _SUMMARY_ISSUES else ""
        super().__init__(f"DCC rejected ({n} issue{'s' if n != 1 else ''}): {shown}{more}")

    def __reduce__(self) -> tuple[type[DCCValidationError], tuple[tuple[Issue, ...]]]:
        # The default pickling would call __init__ with the summary string.
        return (type(self), (self.issues,))

    def as_json(self) -> list[dict[str, str]]:
        """All issues as a list of ``{"path", "rule", "message"}`` dicts."""
        return [i.as_dict() for i in self.issues]


# ---------------------------------------------------------------------------------------------
# Per-version rules, resolved once at import. Each schema release that changed something a
# signer sees gets one profile (see the "Schema versions compared" table in the spec notes and
# the combined schema files themselves).


class _Profile:
    __slots__ = (
        "dob_empty",
        "dob_forms",
        "dob_re",
        "dose_max",
        "fnt_required",
        "has_dr",
        "max_len",
        "release",
        "tc_required",
        "test_keys",
        "tt_coded",
    )

    def __init__(
        self,
        release: str,
        *,
        max_len: int,
        dose_max: int,
        dob_partial: bool,
        dob_empty: bool,
        tt_coded: bool,
        has_dr: bool,
        tc_required: bool,
        fnt_required: bool,
    ) -> None:
        self.release = release  # the releases these rules cover, for messages
        self.max_len = max_len
        self.dose_max = dose_max
        # ASCII classes, not \d: Python's \d also matches other scripts' digits. fullmatch,
        # not $: Python's $ also matches before a trailing newline.
        self.dob_re = re.compile(
            r"(?:19|20)[0-9]{2}(?:-[0-9]{2}){0,2}"
            if dob_partial
            else r"(?:19|20)[0-9]{2}-[0-9]{2}-[0-9]{2}"
        )
        forms = "YYYY-MM-DD, YYYY-MM or YYYY" if dob_partial else "YYYY-MM-DD"
        self.dob_forms = forms + (' or ""' if dob_empty else "") + " with year 1900-2099"
        self.dob_empty = dob_empty
        self.tt_coded = tt_coded
        self.has_dr = has_dr
        self.tc_required = tc_required
        self.fnt_required = fnt_required
        self.test_keys = _TEST_KEYS | {"dr"} if has_dr else _TEST_KEYS


_TOP_KEYS: Final = frozenset({"ver", "nam", "dob", "v", "t", "r"})
_NAM_KEYS: Final = frozenset({"fn", "fnt", "gn", "gnt"})
_V_KEYS: Final = frozenset({"tg", "vp", "mp", "ma", "dn", "sd", "dt", "co", "is", "ci"})
_TEST_KEYS: Final = frozenset({"tg", "tt", "nm", "ma", "sc", "tr", "tc", "co", "is", "ci"})
_R_KEYS: Final = frozenset({"tg", "fr", "co", "is", "df", "du", "ci"})

# The rules that changed between schema releases, one row per profile (the "Schema versions
# compared" table of the spec notes): the release text for messages, then _Profile's keyword
# arguments in the order of _PROFILE_COLUMNS.
_PROFILE_COLUMNS: Final = (
    "max_len", "dose_max", "dob_partial", "dob_empty", "tt_coded", "has_dr", "tc_required",
    "fnt_required",
)  # fmt: skip
_P100, _P101, _P110, _P120, _P130, _P132 = (
    _Profile(release, **dict(zip(_PROFILE_COLUMNS, rules, strict=True)))
    for release, *rules in (
        # release           max_len dose_max  partial dob_empty tt_coded has_dr tc_req fnt_req
        ("1.0.0",            50,    9,        False,  False,    False,   True,  True,  True),
        ("1.0.1 to 1.0.x",   50,    9,        False,  False,    True,    True,  True,  True),
        ("1.1.x",            50,    9,        True,   False,    True,    True,  True,  True),
        ("1.2.x",            50,    9,        True,   False,    True,    False, True,  True),
        ("1.3.0 to 1.3.1",   80,    DOSE_MAX, True,   True,     True,    False, False, True),
        ("1.3.2 and later",  80,    DOSE_MAX, True,   True,     True,    False, False, False),
    )
)  # fmt: skip

# The known releases, looked up by exact string on the hot path.
_PROFILES: Final = {
    "1.0.0": _P100,
    "1.0.1": _P101,
    "1.1.0": _P110,
    "1.2.0": _P120,
    "1.2.1": _P120,
    "1.3.0": _P130,
    "1.3.1": _P130,
    "1.3.2": _P132,
    "1.3.3": _P132,
}
_NEWEST: Final = _P132
# Semantic version 1.0.x-1.3.x, patch without leading zeros (semver forbids them).
_VER_RE = re.compile(r"1\.([0-3])\.(0|[1-9][0-9]*)")


def _profile_for(ver: str) -> _Profile | None:
    """Rules for a ``ver`` that is not a known release; None if it is not 1.0.x-1.3.x."""
    m = _VER_RE.fullmatch(ver)
    if m is None:
        return None
    minor, patch = m.groups()
    # A later patch of a minor version follows the newest known release of that minor.
    if minor == "0":
        return _P100 if patch == "0" else _P101
    if minor == "3":
        return _P130 if patch in ("0", "1") else _P132
    return _P110 if minor == "1" else _P120


# ---------------------------------------------------------------------------------------------
# Shapes and fast predicates. A regular expression's fullmatch costs several times a str
# method's test, so the hot path prefers str methods where they are exact.

# fnt/gnt alphabet: `not s.strip(_TRANSLIT_CHARS)` is true exactly when every character of s
# is in the set (strip removes them from both ends until it meets any other character).
_TRANSLIT_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ<"
# RFC 3339 date-time; the time fields' ranges are in the expression, the date is checked with
# the calendar afterwards. Leap second 60 is refused (no DCC needs one; Python cannot hold it).
_DATETIME_RE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,9})?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_MISSING: Final = object()


def _is_date(s: str) -> bool:
    """Whether ``s`` is an ISO 8601 complete date YYYY-MM-DD that exists in the calendar.

    Shape first (ten ASCII characters with '-' at 4 and 7), then ``date.fromisoformat``, which
    for exactly that shape accepts nothing but digits and rejects impossible days (tested
    against a regular-expression oracle in the test suite).
    """
    if len(s) != 10 or s[4] != "-" or s[7] != "-" or not s.isascii():
        return False
    try:
        date.fromisoformat(s)
    except ValueError:
        return False
    return True


def _utf8(s: str) -> bool:
    """Whether ``s`` can be encoded as UTF-8, i.e. holds no lone surrogate (which JSON
    escapes such as ``"\\ud800"`` can produce, and which CBOR text cannot carry)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: object) -> str:
    """The JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return f"Python {type(value).__name__}"


def child_path(prefix: str, key: object) -> str:
    """JSON path of ``key`` below ``prefix``: dotted for short identifiers, else a bracket form
    (truncated, so that a huge key cannot make a huge issue)."""
    if isinstance(key, str) and len(key) <= 40 and _IDENT_RE.fullmatch(key):
        return f"{prefix}.{key}"
    if isinstance(key, str):
        shown = key if len(key) <= 40 else key[:40] + "…"
        return prefix + "['" + shown.replace("\\", "\\\\").replace("'", "\\'") + "']"
    return f"{prefix}[{_short(key)}]"


def _short(value: object) -> str:
    """A bounded repr for messages: a huge input must not make a huge error."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not escape validate()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:60] + "…"


# ---------------------------------------------------------------------------------------------
# Slow paths. The entry checks below test each field's valid case inline and call one of these
# only when that quick test fails; each then decides with the full rules (a value the quick
# test was too cautious about is accepted here) and appends the issues it finds.


def _type_issue(path: str, expected: str, value: object) -> Issue:
    return Issue(path, "type", f"must be {expected}, got {_kind(value)}")


def _missing(path: str, key: str) -> Issue:
    return Issue(path, "required", f"{key} is required")


def _unknown_fields(
    obj: dict, allowed: frozenset[str], prefix: str, issues: list[Issue], where: str
) -> None:
    names = ", ".join(sorted(allowed))
    for key in obj:
        if isinstance(key, str) and key in allowed:
            continue
        if key == "dr" and where == "test":
            message = "dr (test result time) exists only in schemas 1.0.x and 1.1.x"
        else:
            message = f"unknown field {_short(key)}: a {where} object may only hold {names}"
        issues.append(Issue(child_path(prefix, key), "unknown-field", message))


def _text(
    value: object,
    prefix: str,
    key: str,
    prof: _Profile,
    issues: list[Issue],
    *,
    required: bool = True,
    nonempty: bool = False,
) -> bool:
    """Free text: a string within the version's length limit, optionally non-empty, and
    encodable as UTF-8. Returns whether it passed."""
    path = prefix + "." + key
    if value is _MISSING:
        if required:
            issues.append(_missing(path, key))
        return False
    if not isinstance(value, str):
        issues.append(_type_issue(path, "a string", value))
        return False
    ok = True
    n = len(value)
    if n > prof.max_len:
        issues.append(
            Issue(
                path,
                "max-length",
                f"{key} must be at most {prof.max_len} "
                f"characters in schema {prof.release}, got {n}",
            )
        )
        ok = False
    elif n == 0 and nonempty:
        issues.append(
            Issue(
                path,
                "empty",
                f"{key} must not be empty (leave an unknown optional field out instead)",
            )
        )
        ok = False
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            issues.append(
                Issue(
                    path,
                    "encoding",
                    f"{key} must be valid Unicode text (it contains a lone surrogate)",
                )
            )
            ok = False
    return ok


def _code(
    value: object, table: frozenset[str], prefix: str, key: str, set_name: str, issues: list[Issue]
) -> None:
    """A coded field: a string from the value set ``set_name``."""
    path = prefix + "." + key
    if value is _MISSING:
        issues.append(_missing(path, key))
    elif not isinstance(value, str):
        issues.append(_type_issue(path, "a string code", value))
    elif value not in table:
        issues.append(
            Issue(path, "value-set", f"{_short(value)} is not a code of the value set {set_name}")
        )


def _date(value: object, prefix: str, key: str, issues: list[Issue]) -> str | None:
    """An ISO 8601 complete date YYYY-MM-DD that exists; returns it when valid."""
    path = prefix + "." + key
    if value is _MISSING:
        issues.append(_missing(path, key))
    elif not isinstance(value, str):
        issues.append(_type_issue(path, "a date string YYYY-MM-DD", value))
    elif _is_date(str(value)):
        return str(value)
    elif (
        len(value) == 10
        and value[4] == "-"
        and value[7] == "-"
        and value.isascii()
        and value.replace("-", "").isdigit()
    ):
        issues.append(Issue(path, "date", f"{_short(value)} is not a real calendar date"))
    else:
        issues.append(
            Issue(path, "date", f"{key} must be a complete date YYYY-MM-DD, got {_short(value)}")
        )
    return None


def _datetime(value: object, prefix: str, key: str, issues: list[Issue]) -> None:
    """An RFC 3339 date-time with a real date (the caller has handled absence)."""
    path = prefix + "." + key
    if not isinstance(value, str):
        issues.append(_type_issue(path, "an RFC 3339 date-time string", value))
        return
    m = _DATETIME_RE.fullmatch(value)
    if m is None:
        issues.append(
            Issue(
                path,
                "date-time",
                f"{key} must be an RFC 3339 date-time "
                "YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM) with at most 9 "
                f"fractional digits, got {_short(value)}",
            )
        )
    elif not _is_date(m.group(1)):
        issues.append(Issue(path, "date-time", f"{_short(value)} has no real calendar date"))


def _dose(value: object, prefix: str, key: str, prof: _Profile, issues: list[Issue]) -> None:
    """dn/sd: a JSON integer (not boolean, not 1.0) from 1 to the version's maximum."""
    path = prefix + "." + key
    if value is _MISSING:
        issues.append(_missing(path, key))
    elif value.__class__ is not int:  # bool and float included
        issues.append(_type_issue(path, "an integer", value))
    elif not 1 <= value <= prof.dose_max:
        bound = "9 before schema 1.3.0" if prof.dose_max == 9 else str(prof.dose_max)
        issues.append(
            Issue(path, "range", f"{key} must be an integer from 1 to {bound}, got {_short(value)}")
        )


def _uvci(value: object, prefix: str, prof: _Profile, issues: list[Issue]) -> None:
    """ci: the version's length limit, then the canonical UVCI grammar and check character."""
    path = prefix + ".ci"
    if value is _MISSING:
        issues.append(_missing(path, "ci"))
    elif not isinstance(value, str):
        issues.append(_type_issue(path, "a UVCI string", value))
    elif len(value) > prof.max_len:
        issues.append(
            Issue(
                path,
                "max-length",
                f"ci must be at most {prof.max_len} characters "
                f"in schema {prof.release}, got {len(value)}",
            )
        )
    else:
        problem = check_uvci(str(value))
        if problem is not None:
            rule, message = problem
            issues.append(Issue(path, rule, message))


def _translit(value: object, key: str, prof: _Profile, issues: list[Issue]) -> bool:
    """fnt/gnt when present: ICAO 9303 letters A-Z and '<' only. Returns whether it passed."""
    if not _text(value, "$.nam", key, prof, issues):
        return False
    if not str(value).strip(_TRANSLIT_CHARS):
        return True
    issues.append(
        Issue(
            "$.nam." + key,
            "pattern",
            f"{key} may only hold the letters A-Z and "
            f"'<' (ICAO 9303 transliteration), got {_short(value)}",
        )
    )
    return False


def _dob(dob: object, prof: _Profile, today: str, issues: list[Issue]) -> None:
    if dob is _MISSING:
        issues.append(_missing("$.dob", "dob"))
        return
    if not isinstance(dob, str):
        issues.append(_type_issue("$.dob", "a date string", dob))
        return
    dob = str(dob)
    if dob == "" and prof.dob_empty:
        return
    if not prof.dob_re.fullmatch(dob):
        issues.append(
            Issue(
                "$.dob",
                "date",
                f"dob must be {prof.dob_forms} in schema {prof.release}, got {_short(dob)}",
            )
        )
        return
    n = len(dob)
    if (n == 10 and not _is_date(dob)) or (n == 7 and not "01" <= dob[5:] <= "12"):
        issues.append(Issue("$.dob", "date", f"{_short(dob)} is not a real calendar date"))
    elif dob > today[:n]:  # same-shaped ISO strings compare like the dates they denote
        issues.append(Issue("$.dob", "range", f"the date of birth {dob} is in the future"))


# ---------------------------------------------------------------------------------------------
# Objects. Each field: fetch, quick test of the valid case, slow path only when it fails.


def _check_nam(nam: object, prof: _Profile, issues: list[Issue]) -> None:
    if not isinstance(nam, dict):
        issues.append(_type_issue("$.nam", "an object", nam))
        return
    if not nam.keys() <= _NAM_KEYS:
        _unknown_fields(nam, _NAM_KEYS, "$.nam", issues, "name")
    ml = prof.max_len
    get = nam.get
    x = get("fn", _MISSING)
    if x is not _MISSING and not (
        x.__class__ is str and len(x) <= ml and (x.isascii() or _utf8(x))
    ):
        _text(x, "$.nam", "fn", prof, issues)
    x = get("gn", _MISSING)
    if x is not _MISSING and not (
        x.__class__ is str and len(x) <= ml and (x.isascii() or _utf8(x))
    ):
        _text(x, "$.nam", "gn", prof, issues)
    fnt = get("fnt", _MISSING)
    gnt = get("gnt", _MISSING)
    if fnt.__class__ is str and len(fnt) <= ml and not fnt.strip(_TRANSLIT_CHARS):
        fnt_ok = True
    else:
        fnt_ok = fnt is not _MISSING and _translit(fnt, "fnt", prof, issues)
    if gnt.__class__ is str and len(gnt) <= ml and not gnt.strip(_TRANSLIT_CHARS):
        gnt_ok = True
    else:
        gnt_ok = gnt is not _MISSING and _translit(gnt, "gnt", prof, issues)
    if fnt_ok and fnt:
        return  # the usual case, valid in every version: a valid, non-empty fnt
    if fnt is _MISSING:
        if prof.fnt_required:
            issues.append(Issue("$.nam.fnt", "required", "fnt is required before schema 1.3.2"))
        elif gnt is _MISSING:
            issues.append(Issue("$.nam", "required", "at least one of fnt and gnt is required"))
    # Stricter than the schema: a certificate must name someone. Reported only when the parts
    # that are present are otherwise valid, so that one mistake gives one issue.
    named = (isinstance(fnt, str) and fnt) or (isinstance(gnt, str) and gnt)
    if (fnt_ok or gnt_ok) and not named:
        issues.append(Issue("$.nam", "empty", "at least one of fnt and gnt must be non-empty"))


def _text_ok(x: object, max_len: int) -> bool:
    """The valid case of a non-empty free-text field, quickly (:func:`_text` says why not)."""
    return x.__class__ is str and 0 < len(x) <= max_len and (x.isascii() or _utf8(x))


def _check_co_is(
    get: Callable[[str, object], object], p: str, prof: _Profile, lk: _Lookup, issues: list[Issue]
) -> None:
    """Country and issuer: every entry type has them."""
    x = get("co", _MISSING)
    if x.__class__ is not str or x not in lk.co:
        _code(x, lk.co, p, "co", "country-2-codes", issues)
    x = get("is", _MISSING)
    if not _text_ok(x, prof.max_len):
        _text(x, p, "is", prof, issues, nonempty=True)


def _check_ci(
    get: Callable[[str, object], object], p: str, prof: _Profile, issues: list[Issue]
) -> None:
    """The certificate identifier (UVCI): every entry type ends with it."""
    x = get("ci", _MISSING)
    if x.__class__ is not str or len(x) > prof.max_len or check_uvci(x) is not None:
        _uvci(x, p, prof, issues)


# The entry fields checked the same way in every entry type, as rows
# (key, kind, attribute of _Lookup holding the codes, value-set name), in the order of their
# issues. Kinds: a code from a value set, a dose number (dn/sd), a complete calendar date.
_CODE: Final = 0
_DOSE: Final = 1
_DATE: Final = 2
_FieldRow = tuple[str, int, str, str]
_TG: Final[_FieldRow] = ("tg", _CODE, "tg", "disease-agent-targeted")
_V_FIELDS: Final[tuple[_FieldRow, ...]] = (
    _TG,
    ("vp", _CODE, "vp", "vaccine-prophylaxis"),
    ("mp", _CODE, "mp", "vaccine-medicinal-product"),
    ("ma", _CODE, "vma", "vaccine-mah-manf"),
    ("dn", _DOSE, "", ""),
    ("sd", _DOSE, "", ""),
    ("dt", _DATE, "", ""),
)
_T_HEAD_FIELDS: Final[tuple[_FieldRow, ...]] = (_TG,)
_T_RESULT_FIELDS: Final[tuple[_FieldRow, ...]] = (("tr", _CODE, "tr", "test-result"),)
_R_FIELDS: Final[tuple[_FieldRow, ...]] = (_TG, ("fr", _DATE, "", ""))


def _check_fields(
    get: Callable[[str, object], object],
    p: str,
    rows: tuple[_FieldRow, ...],
    prof: _Profile,
    lk: _Lookup,
    issues: list[Issue],
) -> None:
    """Check the fields of *rows* (see :data:`_V_FIELDS`) of the entry at *p*, in order:
    a quick test of the valid case, the reasons only when it fails."""
    for key, kind, codes, set_name in rows:
        x = get(key, _MISSING)
        if kind is _CODE:
            table = getattr(lk, codes)
            if x.__class__ is not str or x not in table:
                _code(x, table, p, key, set_name, issues)
        elif kind is _DOSE:
            if x.__class__ is not int or not 1 <= x <= prof.dose_max:
                _dose(x, p, key, prof, issues)
        elif x.__class__ is not str or not _is_date(x):
            _date(x, p, key, issues)


def _open_entry(
    e: object,
    p: str,
    allowed: frozenset[str],
    what: str,
    rows: tuple[_FieldRow, ...],
    prof: _Profile,
    lk: _Lookup,
    issues: list[Issue],
) -> Callable[[str, object], object] | None:
    """The field getter of the *what* entry *e*, after reporting its fields outside
    *allowed* and checking its fields of *rows* (:func:`_check_fields`); None when *e* is
    not an object."""
    if not isinstance(e, dict):
        issues.append(_type_issue(p, f"a {what} entry object", e))
        return None
    if not e.keys() <= allowed:
        _unknown_fields(e, allowed, p, issues, what)
    get = e.get
    _check_fields(get, p, rows, prof, lk, issues)
    return get


def _check_v(e: object, p: str, prof: _Profile, lk: _Lookup, issues: list[Issue]) -> None:
    get = _open_entry(e, p, _V_KEYS, "vaccination", _V_FIELDS, prof, lk, issues)
    if get is None:
        return
    _check_co_is(get, p, prof, lk, issues)
    _check_ci(get, p, prof, issues)


def _check_t(e: object, p: str, prof: _Profile, lk: _Lookup, issues: list[Issue]) -> None:
    get = _open_entry(e, p, prof.test_keys, "test", _T_HEAD_FIELDS, prof, lk, issues)
    if get is None:
        return
    ml = prof.max_len
    x = get("tt", _MISSING)
    if not prof.tt_coded:  # schema 1.0.0: free text
        _text(x, p, "tt", prof, issues, nonempty=True)
    elif x.__class__ is not str or x not in lk.tt:
        _code(x, lk.tt, p, "tt", "test-type", issues)
    x = get("nm", _MISSING)
    if x is not _MISSING and not _text_ok(x, ml):
        _text(x, p, "nm", prof, issues, nonempty=True)
    x = get("ma", _MISSING)
    if x is not _MISSING:
        if lk.test_manf is not None:
            if x.__class__ is not str or x not in lk.test_manf:
                _code(x, lk.test_manf, p, "ma", "test-manf", issues)
        elif not _text_ok(x, ml):
            # No authoritative RAT device list loaded: any non-empty text.
            _text(x, p, "ma", prof, issues, nonempty=True)
    x = get("sc", _MISSING)
    if x is _MISSING:
        issues.append(_missing(p + ".sc", "sc"))
    elif (
        x.__class__ is not str
        or (m := _DATETIME_RE.fullmatch(x)) is None
        or not _is_date(m.group(1))
    ):
        _datetime(x, p, "sc", issues)
    if prof.has_dr:
        x = get("dr", _MISSING)
        if x is not _MISSING:
            _datetime(x, p, "dr", issues)
    _check_fields(get, p, _T_RESULT_FIELDS, prof, lk, issues)
    x = get("tc", _MISSING)
    if (x is not _MISSING or prof.tc_required) and not _text_ok(x, ml):
        _text(x, p, "tc", prof, issues, nonempty=True)
    _check_co_is(get, p, prof, lk, issues)
    _check_ci(get, p, prof, issues)


def _date_field(get: Callable[[str, object], object], p: str, key: str, issues: list[Issue]):
    """The complete date in field *key*, or None after reporting why it is not one."""
    x = get(key, _MISSING)
    if x.__class__ is str and _is_date(x):
        return x
    return _date(x, p, key, issues)


def _check_r(e: object, p: str, prof: _Profile, lk: _Lookup, issues: list[Issue]) -> None:
    get = _open_entry(e, p, _R_KEYS, "recovery", _R_FIELDS, prof, lk, issues)
    if get is None:
        return
    _check_co_is(get, p, prof, lk, issues)
    df = _date_field(get, p, "df", issues)
    du = _date_field(get, p, "du", issues)
    if df is not None and du is not None and du < df:
        issues.append(
            Issue(
                p + ".du",
                "date-order",
                f"du (valid until, {du}) must not be before df (valid from, {df})",
            )
        )
    _check_ci(get, p, prof, issues)


_EntryCheck = Callable[[object, str, _Profile, _Lookup, list[Issue]], None]
_GROUPS: Final[tuple[tuple[str, _EntryCheck], ...]] = (
    ("v", _check_v),
    ("t", _check_t),
    ("r", _check_r),
)


def _check_group(
    key: str, group: object, check: _EntryCheck, prof: _Profile, lk: _Lookup, issues: list[Issue]
) -> None:
    path = "$." + key
    if not isinstance(group, (list, tuple)):
        issues.append(_type_issue(path, "an array", group))
        return
    if len(group) != 1:
        issues.append(
            Issue(path, "one-entry", f"{key} must hold exactly one entry, got {len(group)}")
        )
    for i, entry in enumerate(group):
        check(entry, f"{path}[{i}]", prof, lk, issues)


def _check(dcc: object, lk: _Lookup, today: str, issues: list[Issue]) -> str | None:
    if not isinstance(dcc, dict):
        issues.append(_type_issue("$", "a JSON object (dict)", dcc))
        return None
    if not dcc.keys() <= _TOP_KEYS:
        _unknown_fields(dcc, _TOP_KEYS, "$", issues, "DCC")
    get = dcc.get

    ver = get("ver", _MISSING)
    prof = _PROFILES.get(ver) if ver.__class__ is str else None
    if prof is None:
        # Keep checking the rest under the newest rules, so one call still reports everything.
        if ver is _MISSING:
            issues.append(_missing("$.ver", "ver"))
        elif not isinstance(ver, str):
            issues.append(_type_issue("$.ver", "a version string", ver))
        else:
            prof = _profile_for(str(ver))
            if prof is None:
                issues.append(
                    Issue(
                        "$.ver",
                        "version",
                        "ver must be a schema version 1.0.x, "
                        f"1.1.x, 1.2.x or 1.3.x (e.g. '1.3.0'), got {_short(ver)}",
                    )
                )
        if prof is None:
            prof = _NEWEST

    nam = get("nam", _MISSING)
    if nam is _MISSING:
        issues.append(_missing("$.nam", "nam"))
    else:
        _check_nam(nam, prof, issues)

    # dob: a complete past date with year 19xx/20xx is valid in every version.
    x = get("dob", _MISSING)
    if not (x.__class__ is str and _is_date(x) and x[:2] in ("19", "20") and x <= today):
        _dob(x, prof, today, issues)

    # Exactly one group with exactly one entry, whatever the version says. The common shapes
    # take a direct route; everything else goes through the general loop below.
    v = get("v", _MISSING)
    t = get("t", _MISSING)
    r = get("r", _MISSING)
    if t is _MISSING and r is _MISSING:
        if v.__class__ is list and len(v) == 1:
            _check_v(v[0], "$.v[0]", prof, lk, issues)
            return "v"
    elif v is _MISSING:
        if r is _MISSING and t.__class__ is list and len(t) == 1:
            _check_t(t[0], "$.t[0]", prof, lk, issues)
            return "t"
        if t is _MISSING and r.__class__ is list and len(r) == 1:
            _check_r(r[0], "$.r[0]", prof, lk, issues)
            return "r"
    found = [(k, g, c) for (k, c), g in zip(_GROUPS, (v, t, r), strict=True) if g is not _MISSING]
    if len(found) != 1:
        names = ", ".join(k for k, _, _ in found) or "none"
        issues.append(
            Issue(
                "$",
                "one-group",
                "a DCC must hold exactly one of v (vaccination), "
                f"t (test) or r (recovery); found {names}",
            )
        )
    for key, group, check in found:
        _check_group(key, group, check, prof, lk, issues)
    return found[0][0] if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------
# Entry point.

_default_lookup: _Lookup | None = None
# (ISO date, first second of that UTC day, first second of the next day)
_today_cache: tuple[str, float, float] = ("", 0.0, 0.0)


def _utc_today_iso() -> str:
    """Today's UTC date as YYYY-MM-DD, recomputed only when the day changes."""
    global _today_cache
    iso, start, end = _today_cache
    now = time.time()
    if start <= now < end:
        return iso
    today = datetime.fromtimestamp(now, UTC).date()
    start = datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp()
    # A tuple is replaced atomically, so concurrent callers see a consistent triple.
    _today_cache = (today.isoformat(), start, start + 86400.0)
    return _today_cache[0]


def validate(dcc: object, *, valuesets: ValueSets | None = None, today: date | None = None) -> str:
    """Validate one DCC (the JSON object as a Python dict) and return its type.

    Args:
        dcc: the payload: a dict as decoded from JSON (arrays may also be tuples).
        valuesets: the code tables to check coded fields against; default
            :meth:`ValueSets.builtin`.
        today: the date against which ``dob`` must not lie in the future; default: today in
            UTC. A :class:`~datetime.datetime` counts by its date.

    Returns:
        ``"v"``, ``"t"`` or ``"r"``: the certificate type (the one group present).

    Raises:
        DCCValidationError: the DCC breaks one or more rules; ``issues`` lists them all. This
            is the only exception raised for any ``dcc`` value whatsoever.
        TypeError: ``valuesets`` or ``today`` has the wrong type (a caller bug).
    """
    global _default_lookup
    if valuesets is None:
        lk = _default_lookup
        if lk is None:
            lk = _default_lookup = ValueSets.builtin()._lookup
    elif isinstance(valuesets, ValueSets):
        lk = valuesets._lookup
    else:
        raise TypeError(f"valuesets must be a ValueSets, not {type(valuesets).__name__}")
    if today is None:
        today_iso = _utc_today_iso()
    elif isinstance(today, date):
        today_iso = f"{today.year:04d}-{today.month:02d}-{today.day:02d}"
    else:
        raise TypeError(f"today must be a datetime.date, not {type(today).__name__}")

    issues: list[Issue] = []
    try:
        kind = _check(dcc, lk, today_iso, issues)
    except Exception as exc:
        # Only reachable with hostile objects (dict subclasses or keys whose methods raise):
        # fail closed with a DCCValidationError rather than leak an arbitrary exception.
        issues.append(
            Issue(
                "$",
                "internal",
                f"the DCC could not be inspected ({type(exc).__name__}); send plain JSON data",
            )
        )
        kind = None
    if issues or kind is None:
        if not issues:  # defensive: no type without a reason
            issues.append(Issue("$", "one-group", "a DCC must hold exactly one of v, t or r"))
        raise DCCValidationError(issues)
    return kind
