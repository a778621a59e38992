"""keyd's per-item work over a batch in columns, pure-Python reference of the native
implementation (native/src/keydcols.c).

A batch is what SIGN_COLUMNS carries (``protocol.keyd.KeydColumns``): one byte string of CWT
payloads with end offsets (``array('I')``), string tables of clients, accounts and operators,
and per item an index into each. Two functions:

* :func:`keyd_check_columns` -- keyd's structural check of every item against the DSC, the
  clock and the client allow-list, as codes (0, or the ``ItemError`` number) and a column of
  packed facts that the audit reads;
* :func:`audit_issue_columns` -- the ``issue`` lines of the signed items (format:
  docs/audit-format.md), built from the string tables: no per-account state to cache.

The native functions take the same arguments, return the same values and raise the same
exceptions with the same messages (both call :func:`check_columns_arguments` and
:func:`check_audit_arguments`).
"""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Sequence
from itertools import islice
from json.encoder import encode_basestring  # type: ignore[attr-defined]

from ._audit_py import audit_issue_groups
from ._cwt_py import UVCI_MAX, _Shape, facts_and_ci
from ._types import ES256, PS256
from .errors import CoseFormatError
from .layout import FACT, unpack_facts

__all__ = [
    "FACT",
    "audit_issue_columns",
    "check_audit_arguments",
    "check_columns_arguments",
    "keyd_check_columns",
    "unpack_facts",
]

_ZERO_FACT = bytes(FACT.size)
MAX_TEXT = 1024

# Item codes (the ItemError numbers of protocol/keyd.py; 0: may be signed).
OK, MALFORMED_CWT, EXP_AFTER_DSC, IAT_BEFORE_DSC, IAT_IN_FUTURE = 0, 1, 2, 3, 4
EXP_NOT_AFTER_IAT, TYPE_NOT_ALLOWED, CLIENT_NOT_ALLOWED, TOO_LARGE_FOR_QR = 5, 6, 8, 12


def _monotone(column: array) -> bool:
    """Every value >= the one before (C-level iteration: no bytecode per item)."""
    return all(map(operator.le, column, islice(column, 1, None)))


def _u32(column: object, what: str) -> array:
    if type(column) is not array or column.typecode != "I":  # type: ignore[attr-defined]
        raise TypeError(f"{what} must be an array('I')")
    return column  # type: ignore[return-value]


def check_columns_arguments(
    payloads: bytes,
    ends: array,
    client_ix: array,
    client_ok: bytes,
    max_payload: int,
    not_before: float,
    not_after: float,
    latest_iat: float,
    allowed: str,
) -> tuple[int, int, int, int]:
    """The argument checks of :func:`keyd_check_columns`, shared by both implementations.

    Returns:
        The integer bounds the rules compare with: max_payload, ceil(not_before),
        floor(not_after), floor(latest_iat) (for integer claims these comparisons equal the
        ones against the float times).
    """
    if type(payloads) is not bytes:
        raise TypeError("payloads must be bytes")
    if type(client_ok) is not bytes:
        raise TypeError("client_ok must be bytes")
    _u32(ends, "ends")
    _u32(client_ix, "client_ix")
    if type(allowed) is not str or not set(allowed) <= set("vtr"):
        raise ValueError("allowed must be a str of v, t and r")
    if type(max_payload) is not int or max_payload < 0:
        raise ValueError("max_payload must be a non-negative int")
    for name, value in (("not_before", not_before), ("not_after", not_after),
                        ("latest_iat", latest_iat)):  # fmt: skip
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number")
    n = len(ends)
    if len(client_ix) != n:
        raise ValueError("ends and client_ix differ in length")
    if n and ends[-1] != len(payloads):
        raise ValueError("the last end offset is not the payloads' length")
    if not _monotone(ends):
        raise ValueError("end offsets must not decrease")
    if n and max(client_ix) >= len(client_ok):
        raise ValueError("a client index is out of range")
    if len(allowed) != len(set(allowed)):
        raise ValueError("allowed must be a str of v, t and r")
    clamp = 2**63 - 1  # the claims are int64: a bound beyond that decides nothing
    return (
        max_payload,
        max(-clamp, min(clamp, math.ceil(not_before))),
        max(-clamp, min(clamp, math.floor(not_after))),
        max(-clamp, min(clamp, math.floor(latest_iat))),
    )


def keyd_check_columns(
    payloads: bytes,
    ends: array,
    client_ix: array,
    client_ok: bytes,
    max_payload: int,
    not_before: float,
    not_after: float,
    latest_iat: float,
    allowed: str,
) -> tuple[bytearray, bytes, dict[int, str]]:
    """keyd's structural check of each item of a batch in columns.

    Item i is ``payloads[ends[i-1]:ends[i]]``. Its code is, by the first rule it breaks:
    CLIENT_NOT_ALLOWED (``client_ok[client_ix[i]]`` is 0), TOO_LARGE_FOR_QR (longer than
    *max_payload*), MALFORMED_CWT (``cwt_facts`` refuses it), EXP_AFTER_DSC (exp after
    *not_after*), IAT_BEFORE_DSC (iat before *not_before*), EXP_NOT_AFTER_IAT,
    IAT_IN_FUTURE (iat after *latest_iat*), TYPE_NOT_ALLOWED (its type not in *allowed*),
    else 0.

    Returns:
        The codes (a bytearray, one per item), the packed facts (:data:`FACT` per item) and,
        per MALFORMED_CWT item, the message ``cwt_facts`` gives for it.

    Raises:
        TypeError: payloads or client_ok not bytes; ends or client_ix not ``array('I')``.
        ValueError: columns of different lengths, end offsets that decrease or do not end at
            the payloads' length, a client index beyond client_ok, a bad bound or *allowed*.
    """
    limit, nb, na, latest = check_columns_arguments(
        payloads,
        ends,
        client_ix,
        client_ok,
        max_payload,
        not_before,
        not_after,
        latest_iat,
        allowed,
    )
    n = len(ends)
    codes = bytearray(n)
    facts = bytearray()
    malformed: dict[int, str] = {}
    start = 0
    for i, end in enumerate(ends):
        payload = payloads[start:end]
        start = end
        if not client_ok[client_ix[i]]:
            codes[i] = CLIENT_NOT_ALLOWED
        elif len(payload) > limit:
            codes[i] = TOO_LARGE_FOR_QR
        else:
            try:
                f, ci_at = facts_and_ci(payload)
            except (CoseFormatError, _Shape) as exc:
                codes[i] = MALFORMED_CWT
                malformed[i] = str(exc)
            else:
                codes[i] = (
                    EXP_AFTER_DSC if f.exp > na
                    else IAT_BEFORE_DSC if f.iat < nb
                    else EXP_NOT_AFTER_IAT if f.exp <= f.iat
                    else IAT_IN_FUTURE if f.iat > latest
                    else TYPE_NOT_ALLOWED if f.dcc_type not in allowed
                    else OK
                )  # fmt: skip
                facts += FACT.pack(
                    f.iss.encode("ascii"),
                    f.dcc_type.encode("ascii"),
                    len(f.uvci),
                    ci_at,
                    f.exp,
                    f.iat,
                )
                continue
        facts += _ZERO_FACT
    return codes, bytes(facts), malformed


#: The messages of a bad table entry (both implementations format these).
TEXT_INVALID = "{name}[{k}] must be a non-empty string of at most " + str(MAX_TEXT) + " characters"
TEXT_NOT_UNICODE = "{name}[{k}] is not valid Unicode text"
NO_FACTS = "selected item {i} has no facts (it was not checked)"
BAD_FACTS = "selected item {i}: its facts do not describe its payload"
ES256_LENGTH = "record {i}: an ES256 signature is 64 bytes (r||s)"


def check_audit_arguments(
    time: bytes,
    alg: int,
    kid: bytes,
    clients: Sequence[str],
    accounts: Sequence[str],
    operators: Sequence[str | None],
    client_ix: array,
    account_ix: array,
    operator_ix: array,
    payloads: bytes,
    ends: array,
    facts: bytes,
    selected: array,
    signatures: bytes,
    sig_ends: array,
    seq: int,
    prev: str,
) -> None:
    """The argument checks of :func:`audit_issue_columns` that do not look at single table
    entries or selected items, shared by both implementations (a fixed number of C-level
    passes). The per-entry and per-item rules are each implementation's own, with the
    messages :data:`TEXT_INVALID`, :data:`TEXT_NOT_UNICODE`, :data:`NO_FACTS`,
    :data:`BAD_FACTS` and :data:`ES256_LENGTH`."""
    if type(time) is not bytes or type(payloads) is not bytes or type(facts) is not bytes:
        raise TypeError("time, payloads and facts must be bytes")
    if type(signatures) is not bytes:
        raise TypeError("signatures must be bytes")
    for name, column in (("client_ix", client_ix), ("account_ix", account_ix),
                         ("operator_ix", operator_ix), ("ends", ends), ("selected", selected),
                         ("sig_ends", sig_ends)):  # fmt: skip
        _u32(column, name)
    for name, table in (("clients", clients), ("accounts", accounts), ("operators", operators)):
        if type(table) is not tuple:
            raise TypeError(f"{name} must be a tuple")
    if not time.isascii():
        raise ValueError("time must be ASCII")
    if type(alg) is not int or alg not in (ES256, PS256):
        raise ValueError("alg must be -7 (ES256) or -37 (PS256)")
    if type(kid) is not bytes or len(kid) != 8:
        raise ValueError("kid must be 8 bytes")
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise ValueError("seq must be a non-negative 64-bit integer")
    if type(prev) is not str or len(prev) != 64 or not set(prev) <= set("0123456789abcdef"):
        raise ValueError("prev must be 64 lower-case hex digits")
    n = len(ends)
    if not len(client_ix) == len(account_ix) == len(operator_ix) == n:
        raise ValueError("ends and the index columns differ in length")
    if len(facts) != n * FACT.size:
        raise ValueError(f"facts must be {FACT.size} bytes per item")
    if (ends[-1] if n else 0) != len(payloads) or not _monotone(ends):
        raise ValueError("end offsets must not decrease and must end at the payloads' length")
    if len(sig_ends) != len(selected):
        raise ValueError("selected and sig_ends differ in length")
    if (sig_ends[-1] if sig_ends else 0) != len(signatures) or not _monotone(sig_ends):
        raise ValueError("signature end offsets must not decrease and must end at their length")
    if selected and max(selected) >= n:
        raise ValueError("a selected item is out of range")
    for name, table, ix in (("clients", clients, client_ix), ("accounts", accounts, account_ix),
                            ("operators", operators, operator_ix)):  # fmt: skip
        if n and max(ix) >= len(table):
            raise ValueError(f"an index into {name} is out of range")


def _literals(name: str, table: Sequence[str | None]) -> list[bytes]:
    """The JSON literals (UTF-8) of a table's entries (``null`` for an operator's None)."""
    out = []
    for k, value in enumerate(table):
        if value is None and name == "operators":
            out.append(b"null")
            continue
        if type(value) is not str or not value or len(value) > MAX_TEXT:
            raise ValueError(TEXT_INVALID.format(name=name, k=k))
        try:
            out.append(encode_basestring(value).encode())
        except UnicodeEncodeError:
            raise ValueError(TEXT_NOT_UNICODE.format(name=name, k=k)) from None
    return out


def audit_issue_columns(
    time: bytes,
    alg: int,
    kid: bytes,
    clients: Sequence[str],
    accounts: Sequence[str],
    operators: Sequence[str | None],
    client_ix: array,
    account_ix: array,
    operator_ix: array,
    payloads: bytes,
    ends: array,
    facts: bytes,
    selected: array,
    signatures: bytes,
    sig_ends: array,
    seq: int,
    prev: str,
) -> tuple[bytes, str]:
    """The ``issue`` lines of the items *selected* (in that order) of a batch in columns.

    Item i's line is the one :func:`audit_issue_lines` writes for its client, account and
    operator (the tables' entries at its indices), its facts (:func:`keyd_check_columns`),
    its payload and the signature ``signatures[sig_ends[k-1]:sig_ends[k]]`` of selected
    item k; sequence numbers run from *seq*, the first line chains to *prev*.

    Returns:
        The lines joined by ``\\n`` (none after the last; empty for no item) and the SHA-256
        hex of the last line (*prev* when there is none).

    Raises:
        TypeError: a bytes argument not bytes, a column not ``array('I')``.
        ValueError: a bad time, alg, kid, seq or prev; columns of different lengths; offsets
            that decrease or miss their buffer's end; an index beyond its table; a table
            entry that is not 1..1024 characters of valid Unicode (``accounts[3] ...``); a
            selected item without facts; an ES256 signature not 64 bytes.
    """
    check_audit_arguments(
        time,
        alg,
        kid,
        clients,
        accounts,
        operators,
        client_ix,
        account_ix,
        operator_ix,
        payloads,
        ends,
        facts,
        selected,
        signatures,
        sig_ends,
        seq,
        prev,
    )
    literals = [
        _literals(name, table)
        for name, table in (("clients", clients), ("accounts", accounts), ("operators", operators))
    ]
    _check_selected(alg, facts, ends, selected, sig_ends)
    if not selected:
        return b"", prev
    heads, middles = _record_prefixes(
        alg, kid, literals, client_ix, account_ix, operator_ix, selected
    )
    isses, uvcis, types, chosen = _selected_records(facts, payloads, ends, selected)
    signatures_list = [signatures[a:b] for a, b in zip([0, *sig_ends[:-1]], sig_ends,
                                                        strict=True)]  # fmt: skip
    ones = [1] * len(heads)
    # one group per item: the per-group lines are the format's one source (_audit_py)
    lines, prev = audit_issue_groups(
        heads, middles, ones, time, alg, isses, uvcis, types, chosen, signatures_list, seq, prev
    )
    return b"\n".join(lines), prev


def _record_prefixes(
    alg: int,
    kid: bytes,
    literals: list[list[bytes]],
    client_ix: array,
    account_ix: array,
    operator_ix: array,
    selected: array,
) -> tuple[list[bytes], list[bytes]]:
    """The head and the middle (:func:`audit_issue_lines`) of each selected item's line, from
    the JSON literals of the clients, accounts and operators."""
    cl, al, ol = literals
    kid_hex = kid.hex().encode()
    heads = [
        b'{"account":%s,"alg":%d,"client":%s,"iss":' % (al[account_ix[i]], alg, cl[client_ix[i]])
        for i in selected
    ]
    middles = [
        b',"kid":"%s","operator":%s,"payload_sha256":"' % (kid_hex, ol[operator_ix[i]])
        for i in selected
    ]
    return heads, middles


def _check_selected(alg: int, facts: bytes, ends: array, selected: array, sig_ends: array) -> None:
    """The rules on each selected item: it has facts, they describe its payload, and an ES256
    signature is r||s."""
    for k, i in enumerate(selected):
        if facts[i * FACT.size + 2] not in b"vtr" or not facts[i * FACT.size + 3]:
            raise ValueError(NO_FACTS.format(i=i))
        # facts are keyd_check_columns' output; checked anyway (they steer reads)
        iss, _t, ci_len, ci_off, _exp, _iat = unpack_facts(facts, i)
        size = ends[i] - (ends[i - 1] if i else 0)
        capitals = iss.isascii() and iss.isalpha() and iss.isupper()
        if not capitals or ci_len > UVCI_MAX or ci_off + ci_len > size:
            raise ValueError(BAD_FACTS.format(i=i))
        if alg == ES256 and (sig_ends[k] - (sig_ends[k - 1] if k else 0)) != 64:
            raise ValueError(ES256_LENGTH.format(i=i))


def _selected_records(
    facts: bytes, payloads: bytes, ends: array, selected: array
) -> tuple[list[str], list[str], str, list[bytes]]:
    """The isses, UVCIs, types (one letter each) and payloads of the selected items (their
    facts are checked)."""
    isses: list[str] = []
    uvcis: list[str] = []
    types: list[str] = []
    chosen: list[bytes] = []
    for i in selected:
        iss, dcc_type, ci_len, ci_off, _exp, _iat = unpack_facts(facts, i)
        payload = payloads[ends[i - 1] if i else 0 : ends[i]]
        isses.append(iss)
        uvcis.append(payload[ci_off : ci_off + ci_len].decode("ascii"))
        types.append(dcc_type)
        chosen.append(payload)
    return isses, uvcis, "".join(types), chosen
