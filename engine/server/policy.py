"""Per-client policy and quotas: what each portal backend may have signed, and how much.

A *client* is a portal backend, named by its TLS client-certificate identity or, on the Unix
socket, by the uid of the peer (:meth:`Policy.resolve_uid`). An *account* is the end user on
whose behalf a client sends a DCC (one GP's UZI identity, say); accounts are asserted by the
client. The engine asks this module about every item before it is signed:

1. :meth:`Policy.check` -- the static rules: the client is known and not disabled (the kill
   switch), and the kid, the DCC type, the DCC's country (``co``) and issuer (``is``) are among
   the ones the client may use.
2. :meth:`QuotaTracker.try_reserve` -- the quotas: units are reserved against the client's
   quota and the account's quota, in every window, all at once or not at all
   (:meth:`QuotaTracker.try_reserve_many`: the same for the distinct accounts of a frame).
3. :meth:`QuotaTracker.release` -- for each reserved item that was then *not* signed (keyd
   refused it, signing failed): a refused item is not counted against quotas.

The policy file (JSON, format in ``docs/policy.md``) is validated strictly: unknown or
duplicate keys, wrong types and bad values are errors naming their JSON path, because a typo
in a security policy must not silently weaken it. :class:`PolicyFile` re-reads the file when it
changes (checked at most every 0.5 s, so the kill switch acts within a second) and keeps
serving the previous policy when the new file is invalid.

Threads: :class:`Policy` is immutable and may be shared. :class:`QuotaTracker` is not locked:
call it from one thread (the engine's trio thread). :meth:`PolicyFile.current` may be called
from any thread; one caller at a time re-reads the file.

Nothing here knows about sockets or trio; the hot path (``check`` + ``try_reserve``) costs a
few microseconds per item (``bench/policy_bench.py``).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import repeat
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from ..errors import DccSignError
from ..native import quota_add as _add
from ..native import quota_charge_known as _charge_known
from ..native import quota_expire as _expire
from ..native import quota_idle as _quota_idle
from ..native import quota_remove_newest as _remove_newest
from ..native import quota_take_back as _take_back

__all__ = [
    "CN_PREFIX",
    "DEFAULT_MAX_ACCOUNTS",
    "MAX_POLICY_BYTES",
    "MAX_WEIGHT",
    "UID_PREFIX",
    "WINDOW_SPANS",
    "WINDOW_WIDTHS",
    "ClientPolicy",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Quota",
    "QuotaTracker",
    "Refusal",
    "RefusalCode",
    "quota_refusal",
]

LOGGER = logging.getLogger("dccsign.policy")

#: How many accounts a :class:`QuotaTracker` follows at most (see the class for the trade-off).
DEFAULT_MAX_ACCOUNTS: Final = 100_000

DCC_TYPES: Final = ("v", "t", "r")
ISSUER_MAX_LEN: Final = 80  # the DCC schema's maxLength of "is" (1.3.x)
UID_MAX: Final = 2**32 - 1


class _WindowKind(NamedTuple):
    """A quota window kind."""

    key: str  # in the policy file
    seconds: int  # its length
    width: int  # of one bucket, in seconds
    unit: str  # in messages: "quota of N per <unit>"


# The quota window kinds, by kind number (0 minute, 1 hour, 2 day).
_WINDOWS: Final = (
    _WindowKind("per_minute", 60, 1, "minute"),
    _WindowKind("per_hour", 3600, 60, "hour"),
    _WindowKind("per_day", 86400, 3600, "day"),
)
_WINDOW_KEYS: Final = tuple(w.key for w in _WINDOWS)
_WIDTH: Final = tuple(w.width for w in _WINDOWS)
# A window of N buckets counts N + 1 of them (the current, partly elapsed one and N full ones):
# a unit reserved in bucket k counts until the clock enters bucket k + N + 1, so it is counted
# for at least the window's length and at most one bucket width longer. That makes the limit
# hold over *every* span of the window's length (never more than `limit` units admitted in
# any 60 minutes for per_hour), at the price of capacity coming back up to one bucket width
# late (a minute for per_hour, an hour for per_day, a second for per_minute).
_SPAN: Final = tuple(w.seconds // w.width + 1 for w in _WINDOWS)


class PolicyError(DccSignError):
    """A policy cannot be used: the file cannot be read, is not JSON, or breaks the format.

    Attributes:
        source: the file (or the ``source`` given to :meth:`Policy.from_dict`).
        problems: every problem found, each ``"<JSON path>: <what is wrong>"`` (a file that
            cannot be read or parsed has a single problem without a JSON path).
    """

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            shown = "; ".join(self.problems[:20])
            more = len(self.problems) - 20
            text = f"{len(self.problems)} problems: {shown}" + (
                f"; and {more} more" if more > 0 else ""
            )
        super().__init__(f"{source}: {text}")


class RefusalCode(StrEnum):
    """Why the policy refuses an item (a ``str``: compare with the plain names freely)."""

    CLIENT_UNKNOWN = "CLIENT_UNKNOWN"
    CLIENT_DISABLED = "CLIENT_DISABLED"
    KID_NOT_ALLOWED = "KID_NOT_ALLOWED"
    TYPE_NOT_ALLOWED = "TYPE_NOT_ALLOWED"
    COUNTRY_NOT_ALLOWED = "COUNTRY_NOT_ALLOWED"
    ISSUER_NOT_ALLOWED = "ISSUER_NOT_ALLOWED"
    QUOTA_CLIENT = "QUOTA_CLIENT"
    QUOTA_ACCOUNT = "QUOTA_ACCOUNT"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An item the policy does not allow.

    ``message`` is meant for the client (it names the client, the offending value and what
    is allowed). ``retry_after_s`` is set on quota refusals that can succeed later: the
    seconds until enough reserved units expire; ``None`` otherwise (including a request for
    more units than the limit itself, which can never fit).
    """

    code: RefusalCode
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits per rolling window (``None``: no limit in that window); at least one is set."""

    per_minute: int | None = None
    per_hour: int | None = None
    per_day: int | None = None
    # For the tracker: (window index, limit, buckets counted) of each window that is set.
    limits: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = (self.per_minute, self.per_hour, self.per_day)
        for key, value in zip(_WINDOW_KEYS, values, strict=True):
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{key} must be a positive int, not {value!r}")
        limits = tuple((i, v, _SPAN[i]) for i, v in enumerate(values) if v is not None)
        if not limits:
            raise ValueError("a quota needs at least one window")
        object.__setattr__(self, "limits", limits)


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """What one client may do. ``None`` in an allow-list means "any".

    ``account_quota`` is the effective one: the client's own, else the policy's
    ``default_account_quota``, else ``None`` (accounts of this client are not limited).
    """

    name: str
    kids: frozenset[bytes] | None = None
    types: frozenset[str] | None = None
    countries: frozenset[str] | None = None
    issuers: frozenset[str] | None = None
    quota: Quota | None = None
    account_quota: Quota | None = None
    disabled: bool = False
    #: The client's share of the engine under overload, relative to the other clients with
    #: work in progress (the server refuses a client over its weighted share first).
    weight: int = 1


# ----------------------------------------------------------------------------- the policy


class Policy:
    """An immutable, validated policy. Build it with :meth:`load` or :meth:`from_dict`."""

    __slots__ = ("_clients", "_uids", "clients", "default_account_quota", "source")

    def __init__(
        self,
        clients: Mapping[str, ClientPolicy],
        unix_uids: Mapping[int, str] | None = None,
        default_account_quota: Quota | None = None,
        source: str = "<policy>",
    ) -> None:
        """Prefer :meth:`load` / :meth:`from_dict`. The client policies are taken as given
        (their ``account_quota`` already effective); every uid must map to a known client."""
        self._clients: dict[str, ClientPolicy] = dict(clients)
        self._uids: dict[int, str] = dict(unix_uids or {})
        for uid, name in self._uids.items():
            if name not in self._clients:
                raise ValueError(f"uid {uid} maps to unknown client {name!r}")
        #: The clients by name (read-only).
        self.clients: Mapping[str, ClientPolicy] = MappingProxyType(self._clients)
        self.default_account_quota = default_account_quota
        #: Where the policy came from (file name), for messages.
        self.source = source

    def __repr__(self) -> str:
        return f"<Policy {self.source!r}: {len(self._clients)} clients>"

    # -- building --------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and validate a policy file.

        Raises:
            PolicyError: the file cannot be read, is not UTF-8 JSON, or is not a valid policy;
                the message names the file and, for each problem, the JSON path.
        """
        source = os.fspath(path)
        data, _st = _read_limited(source)
        return cls._from_bytes(data, source)

    @classmethod
    def from_dict(cls, obj: Any, source: str = "<dict>") -> Policy:
        """Validate a decoded policy (the JSON object as Python values).

        Raises:
            PolicyError: every problem, each naming its JSON path; ``source`` prefixes the
                message.
        """
        return _Validator(source).policy(obj)

    @classmethod
    def _from_bytes(cls, data: bytes, source: str) -> Policy:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
        try:
            obj = json.loads(
                text, object_pairs_hook=_JsonObject.from_pairs, parse_constant=_no_constant
            )
        except json.JSONDecodeError as exc:
            raise PolicyError(
                source, [f"not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"]
            ) from None
        except ValueError as exc:  # NaN / Infinity, or an integer too long to convert
            raise PolicyError(source, [f"not JSON: {exc}"]) from None
        except RecursionError:
            raise PolicyError(source, ["not JSON: nested too deeply"]) from None
        return cls.from_dict(obj, source)

    # -- questions -------------------------------------------------------------------

    def client(self, name: str) -> ClientPolicy | None:
        """The policy of client *name*, or ``None`` when the policy does not know it (e.g. to
        choose a kid among ``kids`` before calling :meth:`check`)."""
        return self._clients.get(name)

    def resolve_uid(self, uid: int) -> str | None:
        """The client a local peer with Unix uid *uid* is, or ``None`` (then refuse it):
        the client ``unix_uids`` maps it to, else the client named ``uid:<uid>``."""
        name = self.unix_client(uid)
        return name if name in self._clients else None

    def unix_client(self, uid: int) -> str:
        """The client name a local peer with Unix uid *uid* goes by, whether or not the policy
        has such a client: ``unix_uids[uid]``, else ``uid:<uid>``. (A TLS peer goes by
        ``cn:<common name>``; the two name spaces never meet, see docs/policy.md.)"""
        return self._uids.get(uid) or f"uid:{uid}"

    def check(
        self, client: str, kid: bytes | None, dcc_type: str, dcc: Mapping[str, Any]
    ) -> Refusal | None:
        """The static rules for one item: ``None`` when *client* may have it signed.

        *kid* is the 8-byte kid that will sign the item. ``None`` (the request named no kid
        and none has been chosen yet) passes only for a client without a ``kids`` list: the
        engine should pick one of :attr:`ClientPolicy.kids` first. *dcc_type* is "v", "t" or
        "r" and *dcc* the decoded DCC; ``co`` and ``is`` are read from ``dcc[dcc_type][0]``,
        and only when the client has a ``countries`` or ``issuers`` list. The DCC need not
        have been validated: a missing or malformed field is refused like a wrong value,
        never raised. Comparisons are exact (case-sensitive).

        Never raises for any input of the annotated types; the checks run in the order
        CLIENT_UNKNOWN, CLIENT_DISABLED, KID, TYPE, COUNTRY, ISSUER and the first failing one
        is returned.
        """
        cp = self._clients.get(client)
        if cp is None:
            return Refusal(RefusalCode.CLIENT_UNKNOWN, f"unknown client {_show(client)}")
        if cp.disabled:
            return Refusal(RefusalCode.CLIENT_DISABLED, f"client {_show(client)} is disabled")
        kids = cp.kids
        if kids is not None and kid not in kids:
            allowed = ", ".join(sorted(k.hex() for k in kids))
            what = "no kid given" if kid is None else f"kid {_show_kid(kid)} not allowed"
            return Refusal(
                RefusalCode.KID_NOT_ALLOWED,
                f"client {_show(client)}: {what} (allowed: {allowed})",
            )
        types = cp.types
        if types is not None and dcc_type not in types:
            return Refusal(
                RefusalCode.TYPE_NOT_ALLOWED,
                f"client {_show(client)}: DCC type {_show(dcc_type)} not allowed "
                f"(allowed: {_listing(types)})",
            )
        countries = cp.countries
        issuers = cp.issuers
        if countries is None and issuers is None:
            return None
        try:
            entry = dcc[dcc_type][0]
        except (KeyError, IndexError, TypeError):
            entry = None
        if not isinstance(entry, dict):
            entry = {}
        if countries is not None:
            refusal = _field_refusal(
                client, dcc_type, entry, "co", countries, RefusalCode.COUNTRY_NOT_ALLOWED
            )
            if refusal is not None:
                return refusal
        if issuers is not None:
            return _field_refusal(
                client, dcc_type, entry, "is", issuers, RefusalCode.ISSUER_NOT_ALLOWED
            )
        return None


def _field_refusal(
    client: str,
    dcc_type: str,
    entry: dict,
    key: str,
    allowed: frozenset[str],
    code: RefusalCode,
) -> Refusal | None:
    """The refusal (*code*) when field *key* of the DCC's *entry* is not in *allowed*."""
    value = entry.get(key)
    if value.__class__ is str and value in allowed:
        return None
    return Refusal(
        code,
        f"client {_show(client)}: {_field(dcc_type, key, value)} not allowed "
        f"(allowed: {_listing(allowed)})",
    )


def _show(value: object, limit: int = 60) -> str:
    """repr() of a (possibly hostile) value, cut short; containers only by their type."""
    if not isinstance(value, str | int | float | bytes | None):
        return f"<{type(value).__name__}>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_kid(kid: object) -> str:
    return kid.hex() if isinstance(kid, bytes) and len(kid) <= 32 else _show(kid)


def _listing(values: frozenset[str]) -> str:
    return ", ".join(repr(v) for v in sorted(values))


def _field(dcc_type: str, name: str, value: object) -> str:
    group = dcc_type if dcc_type in DCC_TYPES else _show(dcc_type)
    path = f"{group}[0].{name}"
    return f"DCC without {path}" if value is None else f"{path} {_show(value)}"


# ----------------------------------------------------------------------------- validation

_CLIENT_NAME: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_KID_HEX: Final = re.compile(r"[0-9A-Fa-f]{16}")
_COUNTRY: Final = re.compile(r"[A-Z]{2}")
_UID: Final = re.compile(r"0|[1-9][0-9]{0,9}")

#: Client names of the two transports (see :meth:`Policy.unix_client`): a TLS client
#: certificate with common name X is client ``cn:X``; a Unix-socket peer with uid U is
#: ``unix_uids["U"]`` (a plain name), else client ``uid:U``.
CN_PREFIX: Final = "cn:"
UID_PREFIX: Final = "uid:"
#: The largest policy file read (a bigger one is refused like any invalid file).
MAX_POLICY_BYTES: Final = 4 * 1024 * 1024

_TOP_KEYS: Final = ("clients", "unix_uids", "default_account_quota")
_CLIENT_KEYS: Final = (
    "kids",
    "types",
    "countries",
    "issuers",
    "quota",
    "account_quota",
    "disabled",
    "weight",
)
#: The largest ``weight`` a client may have (shares are ratios of small integers).
MAX_WEIGHT: Final = 1000


class _JsonObject(dict[str, Any]):
    """A decoded JSON object that remembers the keys it had more than once."""

    __slots__ = ("duplicates",)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        obj = cls()
        dups = []
        for key, value in pairs:
            if key in obj:
                dups.append(key)
            obj[key] = value
        obj.duplicates = tuple(dups)
        return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {_show(value, 30)}"
    if isinstance(value, str):
        return f"the string {_show(value, 30)}"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Validator:
    """Collects every problem of one policy, then builds it or raises."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def bad(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '(top level)'}: {message}")

    def policy(self, obj: Any) -> Policy:
        top = self.obj(obj, "", _TOP_KEYS)
        clients: dict[str, dict[str, Any]] = {}
        uids: dict[int, str] = {}
        default = None
        if top is not None:
            raw = None
            if "clients" not in top:
                self.bad("clients", "missing (the policy must name its clients)")
            else:
                raw = self.obj(top["clients"], "clients", None)
                for name, value in (raw or {}).items():
                    if not isinstance(name, str):
                        continue  # reported by obj()
                    if not _CLIENT_NAME.fullmatch(name):
                        self.bad(
                            "clients",
                            f"invalid client name {_show(name)} "
                            "(1 to 128 characters of A-Z a-z 0-9 . _ : @ -)",
                        )
                        continue
                    if name.startswith(UID_PREFIX) and not _uid_text(name[len(UID_PREFIX) :]):
                        self.bad(
                            "clients",
                            f"invalid client name {_show(name)}: 'uid:' must be followed by a "
                            f"uid (a decimal number 0 to {UID_MAX})",
                        )
                        continue
                    if name == CN_PREFIX:
                        self.bad("clients", "invalid client name 'cn:': no common name after it")
                        continue
                    clients[name] = self.client(value, f"clients.{name}")
            if "default_account_quota" in top:
                default = self.quota(top["default_account_quota"], "default_account_quota")
            if "unix_uids" in top:
                uids = self.uids(top["unix_uids"], raw)
        if self.problems:
            raise PolicyError(self.source, self.problems)
        built = {}
        for name, fields in clients.items():
            fields.setdefault("account_quota", default)
            built[name] = ClientPolicy(name=name, **fields)
        return Policy(built, uids, default, self.source)

    def obj(self, value: Any, path: str, allowed: Sequence[str] | None) -> Mapping[Any, Any] | None:
        """*value* if it is an object (else None). Reports duplicate keys, keys that are not
        strings and, when *allowed* is given, keys not in it; callers read only the keys
        they know, so validation goes on below an object with bad keys."""
        if not isinstance(value, dict):
            self.bad(path, f"expected an object, got {_json_type(value)}")
            return None
        for key in getattr(value, "duplicates", ()):
            self.bad(_join(path, key), "duplicate key (the object has it more than once)")
        for key in value:
            if not isinstance(key, str):
                self.bad(path, f"key {_show(key)} is not a string")
            elif allowed is not None and key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                did = f"did you mean {hint[0]!r}? " if hint else ""
                self.bad(_join(path, key), f"unknown key ({did}allowed: {', '.join(allowed)})")
        return value

    def client(self, value: Any, path: str) -> dict[str, Any]:
        obj = self.obj(value, path, _CLIENT_KEYS)
        fields: dict[str, Any] = {}
        if obj is None:
            return fields
        if "kids" in obj:
            fields["kids"] = self.array(obj["kids"], f"{path}.kids", self.kid)
        if "types" in obj:
            fields["types"] = self.array(obj["types"], f"{path}.types", self.dcc_type)
        if "countries" in obj:
            fields["countries"] = self.array(obj["countries"], f"{path}.countries", self.country)
        if "issuers" in obj:
            fields["issuers"] = self.array(obj["issuers"], f"{path}.issuers", self.issuer)
        if "quota" in obj:
            fields["quota"] = self.quota(obj["quota"], f"{path}.quota")
        if "account_quota" in obj:
            fields["account_quota"] = self.quota(obj["account_quota"], f"{path}.account_quota")
        if "disabled" in obj:
            disabled = obj["disabled"]
            if isinstance(disabled, bool):
                fields["disabled"] = disabled
            else:
                self.bad(f"{path}.disabled", f"expected true or false, got {_json_type(disabled)}")
        if "weight" in obj:
            weight = obj["weight"]
            if type(weight) is int and 1 <= weight <= MAX_WEIGHT:
                fields["weight"] = weight
            else:
                self.bad(
                    f"{path}.weight",
                    f"expected an integer from 1 to {MAX_WEIGHT}, got {_json_type(weight)}",
                )
        return fields

    def array(self, value: Any, path: str, item: Callable[[Any, str], Any]) -> frozenset[Any]:
        if not isinstance(value, list | tuple):
            self.bad(path, f"expected an array, got {_json_type(value)}")
            return frozenset()
        if not value:
            self.bad(
                path,
                "empty array (omit the key to allow any value; "
                'to stop a client, set "disabled": true)',
            )
        seen: dict[Any, int] = {}
        for i, raw in enumerate(value):
            got = item(raw, f"{path}[{i}]")
            if got is None:
                continue
            if got in seen:
                self.bad(f"{path}[{i}]", f"duplicate of [{seen[got]}]")
            else:
                seen[got] = i
        return frozenset(seen)

    def kid(self, value: Any, path: str) -> bytes | None:
        if not isinstance(value, str):
            self.bad(path, f"expected a string of 16 hex digits, got {_json_type(value)}")
        elif not _KID_HEX.fullmatch(value):
            self.bad(path, f"not 16 hex digits: {_show(value)}")
        else:
            return bytes.fromhex(value)
        return None

    def dcc_type(self, value: Any, path: str) -> str | None:
        if value in DCC_TYPES and isinstance(value, str):
            return value
        self.bad(path, f'not a DCC type: {_show(value)} (one of "v", "t", "r")')
        return None

    def country(self, value: Any, path: str) -> str | None:
        if isinstance(value, str) and _COUNTRY.fullmatch(value):
            return value
        self.bad(path, f"not a two-letter country code in upper case: {_show(value)}")
        return None

    def issuer(self, value: Any, path: str) -> str | None:
        if isinstance(value, str) and 0 < len(value) <= ISSUER_MAX_LEN:
            return value
        self.bad(
            path,
            f"expected a non-empty string of at most {ISSUER_MAX_LEN} characters, "
            f"got {_json_type(value)}",
        )
        return None

    def quota(self, value: Any, path: str) -> Quota | None:
        obj = self.obj(value, path, _WINDOW_KEYS)
        if obj is None:
            return None
        limits = {}
        ok = True
        for key in _WINDOW_KEYS:
            if key in obj:
                limit = obj[key]
                if type(limit) is int and limit >= 1:
                    limits[key] = limit
                else:
                    self.bad(
                        _join(path, key), f"expected a positive integer, got {_json_type(limit)}"
                    )
                    ok = False
        if not obj:  # (keys that are all unknown were reported as such)
            self.bad(path, f"no window (give at least one of {', '.join(_WINDOW_KEYS)})")
        return Quota(**limits) if ok and limits else None

    def uids(self, value: Any, clients: Mapping[str, Any] | None) -> dict[int, str]:
        obj = self.obj(value, "unix_uids", None)
        out: dict[int, str] = {}
        for key, name in (obj or {}).items():
            if not isinstance(key, str):
                continue  # reported by obj()
            path = f"unix_uids.{key}"
            if not _uid_text(key):
                self.bad(path, f"not a uid (a decimal number 0 to {UID_MAX})")
            elif not isinstance(name, str):
                self.bad(path, f"expected a client name, got {_json_type(name)}")
            elif name.startswith((CN_PREFIX, UID_PREFIX)):
                self.bad(
                    path,
                    f"client {_show(name)}: a local client mapped here has a plain name (a "
                    "'cn:' client is a TLS certificate, a 'uid:' client is that uid itself)",
                )
            elif clients is not None and name not in clients:
                self.bad(path, f"unknown client {_show(name)} (not in clients)")
            else:
                out[int(key)] = name
        return out


def _uid_text(text: str) -> bool:
    return bool(_UID.fullmatch(text)) and int(text) <= UID_MAX


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ----------------------------------------------------------------------------- quotas
#
# Each window of one client or account is a flat list ``[total, b0, c0, b1, c1, ...]``: the
# units it counts, then (bucket number, units) pairs for the buckets that hold units, oldest
# first (bucket number = floor(clock / bucket width)). Only buckets with units are stored, so
# an account that signs a few certificates costs a few list slots, and a busy one at most
# _SPAN[kind] pairs. Invariant: no stored bucket holds 0 units, so ``total == 0`` exactly when
# no bucket is stored. One flat list per window rather than objects: this is the per-account
# memory, and there may be DEFAULT_MAX_ACCOUNTS of them. The arithmetic on these lists
# (_add, _take_back, _expire, _remove_newest and the per-account loop of try_reserve_many) is
# dccsign.native's quota_* functions: native/_quota_py.py is the readable reference.

_Window = list[int]
_Usage = list["_Window | None"]  # one slot per window kind: minute, hour, day


class _Violation(NamedTuple):
    """A quota window where more units do not fit."""

    wait: float  # seconds until they fit, or math.inf: never
    kind: int  # the window kind (index into _WINDOWS)
    limit: int


if _WIDTH != (1, 60, 3600):  # pragma: no cover - _buckets() below relies on these widths
    raise AssertionError("bucket widths changed: update _buckets()")


def _buckets(now: float) -> tuple[int, int, int]:
    """The current bucket number of each window kind."""
    sec = math.floor(now)
    return sec, sec // 60, sec // 3600


def _retry_after(w: _Window, kind: int, excess: int, now: float) -> float:
    """Seconds until the oldest *excess* units of *w* have expired (excess <= total)."""
    span = _SPAN[kind]
    width = _WIDTH[kind]
    freed = 0
    for i in range(1, len(w), 2):
        freed += w[i + 1]
        if freed >= excess:
            return (w[i] + span) * width - now
    raise AssertionError("excess larger than the window's total")  # pragma: no cover


def _violation(
    usage: _Usage | None,
    limits: tuple[tuple[int, int, int], ...],
    buckets: tuple[int, int, int],
    now: float,
    n: int,
) -> _Violation | None:
    """The window of *usage* where *n* more units do not fit and that frees up last, or None
    when they fit everywhere. Expires old buckets on the way (that changes no count that
    matters). *usage* None: nothing counted yet."""
    worst = None
    for kind, limit, span in limits:
        w = usage[kind] if usage is not None else None
        if w is None:
            if n > limit:
                return _Violation(math.inf, kind, limit)
            continue
        if w[0] and w[1] <= buckets[kind] - span:
            _expire(w, buckets[kind] - span)
        excess = w[0] + n - limit
        if excess > 0:
            wait = math.inf if n > limit else _retry_after(w, kind, excess, now)
            if worst is None or wait > worst.wait:
                worst = _Violation(wait, kind, limit)
    return worst


def _idle(usage: _Usage, buckets: tuple[int, int, int]) -> bool:
    """True when every unit of *usage* has expired."""
    return _quota_idle(usage, buckets, _SPAN)


class QuotaTracker:
    """Reservations against the client and account quotas of a :class:`Policy`.

    Windows are rolling and counted in aligned buckets: one-second buckets for
    ``per_minute``, one-minute buckets for ``per_hour``, one-hour buckets for ``per_day``. A
    unit counts from its reservation until its bucket is a whole window old, i.e. for between
    the window's length and one bucket width more. So the limit holds over every span of the
    window's length (never more than ``per_hour`` units in any 60 minutes); the price is that
    capacity comes back up to one bucket width late. ``retry_after_s`` is exact for this
    bucketing (a retry after it succeeds, unless other reservations came in between).

    State is keyed by names: the client's name, and (client, account) for accounts -- an
    account is whatever the client says it is, so one client cannot use up the quota of
    another client's accounts. It survives policy reloads; a window that a reload adds starts
    empty, and a lowered limit applies to the units already counted.

    Memory: clients are few (the policy's). Accounts are kept in an LRU table of at most
    *max_accounts* entries (about 550 bytes each with two windows, a short name included;
    ``bench/policy_bench.py`` measures it), and only for clients with an account quota. When
    a new account arrives, idle accounts (all units expired) at the old end are dropped first;
    if the table is still full, its least recently used account is evicted even though it
    still counts units. That is the trade-off of a bounded table: an account evicted while
    live forgets its usage, and if it comes back it can get its quota again within the
    window. Pushing one account out takes *max_accounts* other accounts active after its last
    reservation, and the client quota (never evicted) still caps the client as a whole.
    :attr:`evicted_live` counts such evictions and a warning is logged (at most once a
    minute), so a bound that is too small shows. The default, 100,000 accounts, is about
    55 MB.

    Not thread-safe: use one tracker from one thread.
    """

    __slots__ = (
        "_accounts",
        "_clients",
        "_clock",
        "_next_warning",
        "_warn_pending",
        "evicted_live",
        "max_accounts",
    )

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_accounts: int = DEFAULT_MAX_ACCOUNTS,
    ) -> None:
        """*clock*: seconds, never going back (``time.monotonic``); *max_accounts*: the size
        of the account table (>= 1)."""
        if max_accounts < 1:
            raise ValueError("max_accounts must be at least 1")
        self._clock = clock
        self.max_accounts = max_accounts
        self._clients: dict[str, _Usage] = {}
        self._accounts: OrderedDict[tuple[str, str], _Usage] = OrderedDict()
        #: Accounts evicted by the size bound while they still counted units.
        self.evicted_live = 0
        self._warn_pending = 0
        self._next_warning = -math.inf

    def __len__(self) -> int:
        """The number of accounts tracked."""
        return len(self._accounts)

    def try_reserve(self, policy: Policy, client: str, account: str, n: int = 1) -> Refusal | None:
        """Reserve *n* units for *account* of *client* in every window of the client's
        ``quota`` and ``account_quota``, or refuse and reserve nothing.

        Returns ``None`` when reserved (then call :meth:`release` for every unit that ends up
        not signed), else a :class:`Refusal`: QUOTA_CLIENT or QUOTA_ACCOUNT for the limit
        that frees up last, with ``retry_after_s`` (``None`` when *n* exceeds a limit: it can
        never fit), or CLIENT_UNKNOWN when *policy* does not know *client*. Quotas are the
        only rule applied here: call :meth:`Policy.check` first.

        Raises:
            ValueError: *n* < 1.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n!r}")
        cp = policy._clients.get(client)
        if cp is None:
            return Refusal(RefusalCode.CLIENT_UNKNOWN, f"unknown client {_show(client)}")
        if cp.quota is None and cp.account_quota is None:
            return None
        now = self._clock()
        return self._reserve_at(cp, client, account, n, now, _buckets(now))

    def try_reserve_many(
        self, policy: Policy, client: str, accounts: Sequence[str], counts: Sequence[int]
    ) -> list[tuple[int, Refusal | None]]:
        """Reserve up to ``counts[k]`` units for each of several distinct accounts of
        *client*, in order, at one clock reading: all of an account's units when they fit,
        else one at a time until the first that does not. Per account: ``(granted, None)``
        when all were reserved, else ``(granted, refusal)`` with the refusal of the first
        unit that did not fit (``granted`` may be 0).

        Results and state are those of the single calls in that order -- for each account,
        ``try_reserve(..., counts[k])``, and on a refusal ``try_reserve(..., 1)`` until the
        first refusal -- at that instant. The cost per account is a fraction of a call (a
        frame of a busy portal names ~50 accounts).

        Raises:
            ValueError: *accounts* and *counts* differ in length, or a count < 1.
        """
        if len(accounts) != len(counts):
            raise ValueError("accounts and counts differ in length")
        if counts and min(counts) < 1:
            raise ValueError(f"every count must be at least 1, not {min(counts)!r}")
        if not accounts:
            return []
        cp = policy._clients.get(client)
        if cp is None:
            refusal = Refusal(RefusalCode.CLIENT_UNKNOWN, f"unknown client {_show(client)}")
            return [(0, refusal)] * len(accounts)
        cq = cp.quota
        aq = cp.account_quota
        out: list[tuple[int, Refusal | None]] = list(zip(counts, repeat(None)))
        if cq is None and aq is None:
            return out
        now = self._clock()
        buckets = _buckets(now)
        cu = None
        if cq is not None:
            total = sum(counts)
            cu = self._clients.get(client)
            if cu is None:
                cu = self._clients[client] = [None, None, None]
            if not _add(cu, cq.limits, buckets, total):
                # The client cannot take them all: who gets its last units depends on the
                # order, so go account by account (the rare, refusing path).
                _take_back(cu, cq.limits, total)
                for k, account in enumerate(accounts):
                    out[k] = self._reserve_upto(cp, client, account, counts[k], now, buckets)
                return out
        if aq is None:
            return out
        # The client holds all of them now, which is what the single calls come to: while
        # the total fits, every prefix of it fits, so no unit is refused for the client's
        # sake and an account's refused units are given back to the client at once.
        table = self._accounts
        limits = aq.limits
        k = 0
        while True:
            # Accounts whose units fit, known or new (taken in while the table has room, as
            # _insert would): natively, without the interpreter. It stops at the first
            # other one.
            k, refused = _charge_known(
                table, client, accounts, counts, limits, buckets, k, (_SPAN, self.max_accounts)
            )
            if k == len(accounts):
                return out
            n = counts[k]
            account = accounts[k]
            if not refused:  # a new account
                if _violation(None, limits, buckets, now, n) is None:
                    au = self._insert((client, account), buckets)
                    if _add(au, limits, buckets, n):
                        k += 1
                        continue
                    _take_back(au, limits, n)  # pragma: no cover - _violation said it fits
            if cu is not None:
                _take_back(cu, cq.limits, n)  # type: ignore[union-attr]
            out[k] = self._reserve_upto(cp, client, account, n, now, buckets, whole=False)
            k += 1

    def _reserve_upto(
        self,
        cp: ClientPolicy,
        client: str,
        account: str,
        n: int,
        now: float,
        buckets: tuple[int, int, int],
        *,
        whole: bool = True,
    ) -> tuple[int, Refusal | None]:
        """:meth:`try_reserve_many` for one account, by single reservations: all *n* units
        (*whole*: try that first), else one at a time until the first refusal."""
        if whole and self._reserve_at(cp, client, account, n, now, buckets) is None:
            return n, None
        for granted in range(n):
            refusal = self._reserve_at(cp, client, account, 1, now, buckets)
            if refusal is not None:
                return granted, refusal
        return n, None  # pragma: no cover - all of them fit one by one but not together

    def _reserve_at(
        self,
        cp: ClientPolicy,
        client: str,
        account: str,
        n: int,
        now: float,
        buckets: tuple[int, int, int],
    ) -> Refusal | None:
        """:meth:`try_reserve` for a known client at a given clock reading."""
        cq = cp.quota
        aq = cp.account_quota
        cu = None
        if cq is not None:
            cu = self._clients.get(client)
            if cu is None:
                cu = self._clients[client] = [None, None, None]
            if not _add(cu, cq.limits, buckets, n):
                return self._refusal(cp, client, account, buckets, now, n, cu)
        if aq is not None:
            key = (client, account)
            au = self._accounts.get(key)
            if au is None:
                if _violation(None, aq.limits, buckets, now, n) is not None:
                    return self._refusal(cp, client, account, buckets, now, n, cu)
                au = self._insert(key, buckets)
            else:
                self._accounts.move_to_end(key)
            if not _add(au, aq.limits, buckets, n):
                _take_back(au, aq.limits, n)
                return self._refusal(cp, client, account, buckets, now, n, cu)
        return None

    def _refusal(
        self,
        cp: ClientPolicy,
        client: str,
        account: str,
        buckets: tuple[int, int, int],
        now: float,
        n: int,
        held: _Usage | None = None,
    ) -> Refusal:
        """The refusal for *n* units that do not fit: the limit that frees up last, the
        client's on a tie. *held*: the client's usage, to which the *n* units were added
        already (the client took them, a limit after it did not): they are given back
        first, so that nothing stays reserved."""
        if held is not None:
            _take_back(held, cp.quota.limits, n)  # type: ignore[union-attr]
        bad = None
        if cp.quota is not None:
            bad = _violation(self._clients.get(client), cp.quota.limits, buckets, now, n)
        if cp.account_quota is not None:
            usage = self._accounts.get((client, account))
            acc_bad = _violation(usage, cp.account_quota.limits, buckets, now, n)
            if acc_bad is not None and (bad is None or acc_bad.wait > bad.wait):
                return _quota_refusal(acc_bad, account, client, n)
        if bad is None:  # pragma: no cover - the caller found a window that does not fit
            raise AssertionError("no quota violated")
        return _quota_refusal(bad, None, client, n)

    def release(self, client: str, account: str, n: int = 1) -> None:
        """Give back *n* units reserved by :meth:`try_reserve` for items that were not signed.

        Units are taken from the newest buckets first, never below zero, in every window the
        client and the account have. Releasing what was not reserved (or was evicted, or
        has expired) gives back less, never more.

        Raises:
            ValueError: *n* < 1.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n!r}")
        for usage in (self._clients.get(client), self._accounts.get((client, account))):
            if usage is not None:
                for w in usage:
                    if w is not None:
                        _remove_newest(w, n)

    def usage(self, client: str, account: str | None = None) -> dict[str, int]:
        """Units counted now, by window key (``"per_hour"``...), for *client*, or for one of
        its accounts when *account* is given; ``{}`` when nothing is tracked. For tests,
        metrics and operators."""
        buckets = _buckets(self._clock())
        if account is None:
            usage = self._clients.get(client)
        else:
            usage = self._accounts.get((client, account))
        out = {}
        for kind, w in enumerate(usage or ()):
            if w is not None:
                _expire(w, buckets[kind] - _SPAN[kind])
                out[_WINDOW_KEYS[kind]] = w[0]
        return out

    def _insert(self, key: tuple[str, str], buckets: tuple[int, int, int]) -> _Usage:
        accounts = self._accounts
        # Lazily drop idle accounts from the old end; two per insert outpace the inserts.
        for _ in range(2):
            if not accounts:
                break
            oldest = next(iter(accounts))
            if not _idle(accounts[oldest], buckets):
                break
            del accounts[oldest]
        if len(accounts) >= self.max_accounts:
            _, evicted = accounts.popitem(last=False)
            if not _idle(evicted, buckets):
                self._evicted_live(buckets[0])
        usage: _Usage = [None, None, None]
        accounts[key] = usage
        return usage

    def _evicted_live(self, now: float) -> None:
        self.evicted_live += 1
        self._warn_pending += 1
        if now >= self._next_warning:
            self._next_warning = now + 60.0
            LOGGER.warning(
                "quota tracker full (%d accounts): %d account(s) evicted while still counting "
                "units; their usage is forgotten (raise max_accounts)",
                self.max_accounts,
                self._warn_pending,
            )
            self._warn_pending = 0


def quota_refusal(client: str, account: str | None, kind: int, limit: int, wait: float) -> Refusal:
    """The refusal of one unit by window *kind* (0 minute, 1 hour, 2 day) of *limit* units:
    the client's quota (*account* None) or *account*'s, free again in *wait* seconds. For
    quota stores other than :class:`QuotaTracker` (the shared one), so that a client reads
    the same message whichever store counted."""
    return _quota_refusal(_Violation(max(wait, 0.0), kind, limit), account, client, 1)


#: Bucket widths (seconds) and buckets counted, per window kind: for shared quota stores,
#: which must count exactly as :class:`QuotaTracker` does.
WINDOW_WIDTHS: Final = _WIDTH
WINDOW_SPANS: Final = _SPAN


def _quota_refusal(bad: _Violation, account: str | None, client: str, n: int) -> Refusal:
    wait, kind, limit = bad
    unit = _WINDOWS[kind].unit
    if account is None:
        code = RefusalCode.QUOTA_CLIENT
        who = f"client {_show(client)}"
    else:
        code = RefusalCode.QUOTA_ACCOUNT
        who = f"account {_show(account)} of client {_show(client)}"
    if wait == math.inf:
        return Refusal(
            code, f"{who}: {n} items exceed the quota of {limit} per {unit} (can never fit)"
        )
    return Refusal(
        code, f"{who}: quota of {limit} per {unit} reached (retry in {math.ceil(wait)} s)", wait
    )


# ----------------------------------------------------------------------------- reloading

_Stamp = tuple[int, int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    # ctime too: it changes on every write and on chmod/rename-over even when a same-size
    # rewrite restores the old mtime.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PolicyFile:
    """A policy file that is re-read when it changes.

    :meth:`current` looks at the file at most every *interval_s* seconds (of *clock*) and
    re-reads it when its identity (device, inode, size, mtime, ctime) changed; a kill switch
    therefore applies within ``interval_s`` plus one read. A new file that cannot be read or
    is invalid is not used: the previous policy stays in force, :attr:`last_error` says why
    and an error is logged (once per change of the file). Replace the file atomically
    (write a temporary file, then rename it over the old one) so that a half-written file is
    never seen; if one is, it is refused like any invalid file and re-read when it changes.

    By default the re-read happens inside :meth:`current` (a small local file).
    With ``reload_inline=False``, :meth:`current` never touches the file: the caller runs
    :meth:`refresh` every *interval_s* itself, from a worker thread (the engine does, so that
    a large or slow file never stalls its event loop). Files over
    :data:`MAX_POLICY_BYTES` are refused.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 0.5,
        reload_inline: bool = True,
    ) -> None:
        """Read the file now.

        Raises:
            PolicyError: the file cannot be read or is invalid (there is no previous policy
                to fall back on).
        """
        self.path = os.fspath(path)
        self._clock = clock
        #: Seconds between looks at the file.
        self.interval = interval_s
        self._inline = reload_inline
        self._lock = threading.Lock()
        #: Why the file on disk is not the policy in force (None when it is).
        self.last_error: str | None = None
        policy, stamp = self._read()
        self._policy = policy
        self._stamp: _Stamp | None = stamp
        self._next_check = clock() + interval_s

    def current(self) -> Policy:
        """The policy in force (re-reading the file first when it is due and has changed,
        unless ``reload_inline=False``)."""
        if self._inline and self._clock() >= self._next_check:
            self.refresh()
        return self._policy

    def refresh(self) -> bool:
        """Check the file now, whatever the interval; True when a new policy was loaded.

        Never raises for a bad file (see :attr:`last_error`). When another thread is already
        refreshing, returns False at once.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._next_check = self._clock() + self.interval
            try:
                stamp: _Stamp | None = _stamp(os.stat(self.path))
            except OSError:
                stamp = None
            if stamp == self._stamp:
                return False
            try:
                policy, stamp = self._read()
            except PolicyError as exc:
                self._stamp = stamp
                self.last_error = str(exc)
                LOGGER.error("policy not reloaded, the previous one stays in force: %s", exc)
                return False
            old = self._policy
            self._policy = policy
            self._stamp = stamp
            self.last_error = None
            LOGGER.info("policy reloaded from %s: %d clients", self.path, len(policy.clients))
            _log_changes(old, policy)
            return True
        finally:
            self._lock.release()

    def _read(self) -> tuple[Policy, _Stamp]:
        data, st = _read_limited(self.path)
        return Policy._from_bytes(data, self.path), _stamp(st)


def _read_limited(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes of a policy file and its stat; refused beyond MAX_POLICY_BYTES (a policy of
    thousands of clients is a few hundred KB; parsing 16 MB takes seconds)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(path, [f"cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(
            path, [f"larger than {MAX_POLICY_BYTES // (1024 * 1024)} MiB: refused unread"]
        )
    return data, st


def _log_changes(old: Policy, new: Policy) -> None:
    """Log what an operator most wants confirmed: kill switches and removed clients."""
    for name, cp in new.clients.items():
        before = old.client(name)
        if cp.disabled and (before is None or not before.disabled):
            LOGGER.warning("policy: client %s is disabled", name)
        elif not cp.disabled and before is not None and before.disabled:
            LOGGER.warning("policy: client %s is enabled again", name)
    for name in sorted(old.clients.keys() - new.clients.keys()):
        LOGGER.warning("policy: client %s removed", name)
