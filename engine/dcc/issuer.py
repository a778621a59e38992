"""The HC1 issuing chain: DCC -> validation -> CWT claims -> CBOR -> COSE -> zlib -> base45.

:class:`Issuer` does everything except the signature arithmetic and byte assembly, which the
native core does for a whole batch at once (the key's ``sign``, then
:func:`dccsign.native.hc1_encode`). All per-batch
work is done once per batch: the claims other than the DCC (iss, iat, exp) are the same for
every certificate signed with one key in one call, so their CBOR is a constant prefix.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import cbor2

from .. import native as _native
from ..errors import InvalidBatchError, KeyProblem
from .dsc import DSC, TYPE_NAMES
from .validate import DCCValidationError, validate
from .valuesets import ValueSets

__all__ = [
    "DEFAULT_BACKDATE",
    "DEFAULT_VALIDITY",
    "MAX_HC1_CHARS",
    "Issuer",
    "SignerKey",
    "claims_prefix",
    "max_payload",
]

#: iat is set this far in the past, so that a verifier whose clock runs slow does not see a
#: certificate "from the future".
DEFAULT_BACKDATE = dt.timedelta(hours=1)
#: Requested validity when the caller gives none (exp is still clamped to the DSC).
DEFAULT_VALIDITY = dt.timedelta(days=365)
#: A version-40 QR code at ECC level Q holds 2,420 alphanumeric characters (ISO/IEC 18004).
MAX_HC1_CHARS = 2420


@dataclass(frozen=True, slots=True)
class SignerKey:
    """A loaded key with its DSC and lifecycle state."""

    dsc: DSC
    key: Any  # anything with SigningKey's sign(protected, payloads): in-process or keyd
    state: str = "active"
    name: str = ""

    @property
    def protected(self) -> bytes:
        return _native.protected_header(self.dsc.alg, self.dsc.kid)


@functools.lru_cache(maxsize=256, typed=True)
def claims_prefix(iss: str, iat: int, exp: int) -> bytes:
    """CBOR of the CWT claims map up to (and including) the key of the DCC itself.

    ``prefix + cbor(dcc)`` equals ``cbor2.dumps({1: iss, 4: exp, 6: iat, -260: {1: dcc}})``:
    integer claim keys, integer NumericDates (spec notes §1.1, §3.2), the hcert map under -260
    with the DCC under key 1.

    Cached: the engine asks once per certificate and (iss, iat, exp) change once a second.
    """
    return b"".join(
        (
            b"\xa4",
            cbor2.dumps(1),
            cbor2.dumps(iss),
            cbor2.dumps(4),
            cbor2.dumps(exp),
            cbor2.dumps(6),
            cbor2.dumps(iat),
            cbor2.dumps(-260),
            b"\xa1\x01",
        )
    )


def max_payload(alg: int) -> int:
    """Largest CWT payload whose HC1 string fits a QR code, whatever deflate does.

    Deflate never emits more than a stored block's framing over its input (zlib falls back to
    stored blocks when they are smaller), so the worst case is COSE + 11 bytes of zlib framing;
    we keep 16. The issuer, the engine and keyd all apply this bound.
    """
    sig = 64 if alg == -7 else 512  # RSA up to 4096 bits
    zlib_max = (MAX_HC1_CHARS - 4) // 3 * 2  # base45: 3 characters per 2 bytes
    cose_overhead = 2 + 1 + 14 + 1 + 3 + 3 + sig
    return zlib_max - 16 - cose_overhead


def nfc_names(dcc: Mapping[str, Any]) -> Mapping[str, Any]:
    """*dcc* with ``nam.fn`` and ``nam.gn`` NFC-normalised (hcert spec §3.3.7): what is signed.
    The same object when they already are (the common case), a shallow copy otherwise."""
    nam = dcc.get("nam")
    if not isinstance(nam, dict):
        return dcc
    changed = {}
    for field in ("fn", "gn"):
        value = nam.get(field)
        if isinstance(value, str) and not unicodedata.is_normalized("NFC", value):
            changed[field] = unicodedata.normalize("NFC", value)
    if not changed:
        return dcc
    return {**dcc, "nam": {**nam, **changed}}


class Claims:
    """What goes around a DCC in its CWT, for the issuer and the engine alike: which key signs
    it, ``iss``, ``iat`` and ``exp``, and how large the payload may be.

    Args:
        keys: the keys that may sign; only ``active`` ones do. Replace the list to change them.
        backdate: how far before now ``iat`` is set.
        issuer_country: the ``iss`` claim; by default the DSC subject's country.
    """

    def __init__(
        self,
        keys: Sequence[SignerKey],
        *,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        issuer_country: str | None = None,
    ) -> None:
        if backdate < dt.timedelta(0):
            raise ValueError("backdate must not be negative")
        self.keys = list(keys)
        self.backdate = int(backdate.total_seconds())
        self.issuer_country = issuer_country

    # -- key choice -------------------------------------------------------------------

    def key_for(self, dcc_type: str, kid: bytes | None = None) -> SignerKey:
        """The key to sign a DCC of *dcc_type* with.

        With *kid*: that key, if it is active and its DSC allows the type. Without: the first
        active key whose DSC names the type in its key usage, else the first active key whose
        DSC is unrestricted.

        Raises:
            KeyProblem: no such key.
        """
        name = TYPE_NAMES[dcc_type]
        if kid is not None:
            for k in self.keys:
                if k.dsc.kid == kid:
                    if k.state != "active":
                        raise KeyProblem(f"key {kid.hex()} is {k.state}; it does not sign")
                    if not k.dsc.allows(dcc_type):
                        allowed = ", ".join(sorted(TYPE_NAMES[t] for t in k.dsc.usages))
                        raise KeyProblem(
                            f"key {kid.hex()} may not sign a {name} DCC: its DSC's extended key "
                            f"usage allows only {allowed}"
                        )
                    return k
            raise KeyProblem(f"no key with kid {kid.hex()}")
        active = [k for k in self.keys if k.state == "active"]
        for k in active:
            if k.dsc.restricted and k.dsc.allows(dcc_type):
                return k
        for k in active:
            if not k.dsc.restricted:
                return k
        raise KeyProblem(f"no active key may sign a {name} DCC")

    def times_for(self, dsc: DSC, validity: dt.timedelta, now: float) -> tuple[int, int]:
        """``(iat, exp)`` for a certificate signed now with *dsc*.

        Raises:
            KeyProblem: the DSC is not valid now, iat would precede its notBefore, or no
                positive validity is left before its notAfter.
        """
        now_i = int(now)
        iat = now_i - self.backdate
        not_before = int(dsc.not_before.timestamp())
        not_after = int(dsc.not_after.timestamp())
        kid = dsc.kid.hex()
        if now_i > not_after:
            raise KeyProblem(f"DSC of key {kid} expired at {dsc.not_after.isoformat()}")
        if iat < not_before:
            raise KeyProblem(
                f"iat {iat} would precede the notBefore of key {kid}'s DSC "
                f"({dsc.not_before.isoformat()}); reduce the backdate or wait"
            )
        # exp must not outlive the DSC (hcert spec §3.3.5; TD PL/1.3.0/6 shows the slip).
        exp = min(iat + int(validity.total_seconds()), not_after)
        if exp <= iat:
            raise KeyProblem(f"no validity left: exp {exp} is not after iat {iat}")
        return iat, exp

    def claims_for(self, key: SignerKey, validity: dt.timedelta, now: float) -> tuple[bytes, int]:
        """``(prefix, max_payload)`` for a certificate signed now with *key*: the CBOR of the
        claims up to the DCC (:func:`claims_prefix`), and the largest payload whose HC1 string
        fits a QR code (:func:`max_payload`). The payload is ``prefix + cbor(dcc)``.

        Raises:
            KeyProblem: as :meth:`times_for`, or the DSC names no country and no
                ``issuer_country`` is configured.
        """
        iat, exp = self.times_for(key.dsc, validity, now)
        iss = self.issuer_country or key.dsc.country
        if iss is None:
            raise KeyProblem(
                f"DSC of key {key.dsc.kid.hex()} names no country; configure issuer_country"
            )
        return claims_prefix(iss, iat, exp), max_payload(key.dsc.alg)


class Issuer:
    """Turns DCCs into signed ``HC1:`` strings with a set of loaded keys (``dccsign sign``; the
    engine does the same steps per frame, with the same :class:`Claims`).

    Args:
        keys: the keys this issuer may use; only ``active`` ones sign.
        impl: the native implementation module (default: the one selected for the process).
        backdate: how far before now ``iat`` is set.
        zlib_level: deflate level, -1..9; every level gives a standard zlib stream.
        issuer_country: the ``iss`` claim; by default the DSC subject's country.
        valuesets: value sets for validation (default: the built-in tables).
        clock: returns the current time in seconds since the epoch.
    """

    def __init__(
        self,
        keys: Sequence[SignerKey],
        *,
        impl: ModuleType | None = None,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        zlib_level: int = 9,
        issuer_country: str | None = None,
        valuesets: ValueSets | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not -1 <= zlib_level <= 9:
            raise ValueError("zlib_level must be -1..9")
        self.claims = Claims(keys, backdate=backdate, issuer_country=issuer_country)
        self.impl = impl or _native
        self.zlib_level = zlib_level
        self.valuesets = valuesets or ValueSets.builtin()
        self.clock = clock

    @property
    def keys(self) -> list[SignerKey]:
        """The keys this issuer may use (those of its :class:`Claims`)."""
        return self.claims.keys

    @keys.setter
    def keys(self, keys: Sequence[SignerKey]) -> None:
        self.claims.keys = list(keys)

    def key_for(self, dcc_type: str, kid: bytes | None = None) -> SignerKey:
        """:meth:`Claims.key_for`."""
        return self.claims.key_for(dcc_type, kid)

    def times_for(self, dsc: DSC, validity: dt.timedelta, now: float) -> tuple[int, int]:
        """:meth:`Claims.times_for`."""
        return self.claims.times_for(dsc, validity, now)

    # -- issuing ----------------------------------------------------------------------

    def issue(
        self,
        dccs: Sequence[Mapping[str, Any]],
        *,
        kid: bytes | None = None,
        validity: dt.timedelta = DEFAULT_VALIDITY,
    ) -> list[str]:
        """Sign every DCC of *dccs*; return their ``HC1:`` strings in input order.

        All-or-nothing: every DCC is validated and given a key before anything is signed.

        Raises:
            InvalidBatchError: one or more DCCs are invalid (each with its JSON path and rule).
            KeyProblem: a DCC has no usable key (see :meth:`key_for`, :meth:`times_for`).
        """
        if validity <= dt.timedelta(0):
            raise ValueError("validity must be positive")
        errors: dict[int, list[dict[str, str]]] = {}
        groups: dict[bytes, tuple[SignerKey, list[int]]] = {}
        items = [nfc_names(d) if isinstance(d, dict) else d for d in dccs]
        chosen: dict[str, SignerKey] = {}
        for i, dcc in enumerate(items):
            try:
                dcc_type = validate(dcc, valuesets=self.valuesets)
            except DCCValidationError as exc:
                errors[i] = exc.as_json()
                continue
            key = chosen.get(dcc_type)
            if key is None:
                key = chosen[dcc_type] = self.key_for(dcc_type, kid)
            group = groups.get(key.dsc.kid)
            if group is None:
                groups[key.dsc.kid] = (key, [i])
            else:
                _key, indices = group
                indices.append(i)
        if errors:
            raise InvalidBatchError(errors)

        now = self.clock()
        results: list[str] = [""] * len(items)
        encoded: list[tuple[SignerKey, list[int], list[bytes]]] = []
        dumps = cbor2.dumps
        for key, indices in groups.values():
            prefix, limit = self.claims.claims_for(key, validity, now)
            payloads = [prefix + dumps(items[i]) for i in indices]
            for i, p in zip(indices, payloads, strict=True):
                if len(p) > limit:
                    errors[i] = [
                        {
                            "path": "$",
                            "rule": "too-large",
                            "message": f"the signed payload would be {len(p)} bytes; at most "
                            f"{limit} fit a QR code ({MAX_HC1_CHARS} characters)",
                        }
                    ]
            encoded.append((key, indices, payloads))
        if errors:
            raise InvalidBatchError(errors)
        for key, indices, payloads in encoded:
            # Two batch calls, both GIL-free in the native core: the signatures may come from
            # an in-process key or from keyd (dccsign.keyd.supervisor.KeydSigner).
            signatures = key.key.sign(key.protected, payloads)
            hc1s = self.impl.hc1_encode(key.protected, payloads, signatures, self.zlib_level)
            for i, text in zip(indices, hc1s, strict=True):
                results[i] = text
        return results
