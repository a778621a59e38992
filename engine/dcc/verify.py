"""Decoding and verifying ``HC1:`` strings, with a structured result.

Verification accepts what the spec notes say verifiers must accept (untagged COSE_Sign1, tag
61 around tag 18, the kid or alg in the unprotected header, float iat/exp) and nothing else:
no other prefix, no lower-case base45, no trailing bytes at any layer, only ES256 and PS256.

Signature validity, time validity and key-usage validity are reported separately: a
certificate can carry a good signature and be expired.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .. import native
from .dsc import DSC, TYPE_NAMES

__all__ = ["HC1_PREFIX", "VerifyResult", "decode_hc1", "loads_exact", "verify_hc1"]

HC1_PREFIX = "HC1:"
_ALG_NAMES = {-7: "ES256", -37: "PS256"}
# Accepted tag sequences around the COSE_Sign1 array (spec notes §1.2 "Tagging").
_ACCEPTED_TAGS = {(), (18,), (61, 18)}


@dataclass
class VerifyResult:
    """What :func:`verify_hc1` found.

    ``valid`` is the signature's validity alone. ``time_valid`` says whether the check time
    lies inside [iat, exp]; ``usage_valid`` whether the DSC's key usage allows the DCC's type.
    ``errors`` lists ``{"step", "message"}`` for everything that failed, in pipeline order
    (steps: prefix, base45, zlib, cose, header, cwt, key, signature, time, key-usage).
    """

    valid: bool = False
    kid: str | None = None
    alg: str | None = None
    iss: str | None = None
    iat: int | None = None
    exp: int | None = None
    type: str | None = None
    dcc: Any = None
    time_valid: bool | None = None
    usage_valid: bool | None = None
    errors: list[dict[str, str]] = field(default_factory=list)

    def fail(self, step: str, message: str) -> VerifyResult:
        self.errors.append({"step": step, "message": message})
        return self

    def as_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "kid": self.kid,
            "alg": self.alg,
            "iss": self.iss,
            "iat": self.iat,
            "exp": self.exp,
            "type": self.type,
            "time_valid": self.time_valid,
            "usage_valid": self.usage_valid,
            "dcc": self.dcc,
            "errors": self.errors,
        }


def loads_exact(data: bytes) -> Any:
    """Decode one CBOR item; trailing bytes are an error (cbor2.loads ignores them)."""
    stream = io.BytesIO(data)
    value = cbor2.CBORDecoder(stream).decode()
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    return value


def _plain(value: Any) -> Any:
    """Plain JSON-like values from what cbor2 decodes.

    cbor2 6 returns frozendict/tuple inside tags, and turns date-times tagged 0 or 1 into
    ``datetime`` objects; the spec says ``sc`` SHOULD be tagged 0 and verifiers MUST accept
    it (spec notes §2.7), so such values become RFC 3339 text again.
    """
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, cbor2.CBORTag):
        return _plain(value.value)
    return value


def decode_hc1(text: str) -> bytes:
    """``HC1:`` text to COSE bytes (prefix, base45, zlib).

    Only CR and LF are stripped from the end: a space is a base45 symbol (spec notes §4.31).

    Raises:
        ValueError: wrong prefix.
        dccsign.native.Base45DecodeError, dccsign.native.ZlibError: a broken layer.
    """
    text = text.rstrip("\r\n")
    if not text.startswith(HC1_PREFIX):
        raise ValueError("missing 'HC1:' prefix")
    return native.zlib_decompress(native.b45decode(text[len(HC1_PREFIX) :]))


def _verify_signature(dsc: DSC, alg: int, protected: bytes, payload: bytes, sig: bytes) -> str:
    """Empty string when the signature verifies, else the reason."""
    key = dsc.certificate().public_key()
    tbs = native.sig_structure(protected, payload)
    try:
        if alg == -7:
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                key.curve, ec.SECP256R1
            ):
                return "ES256 signature but the DSC key is not EC P-256"
            if len(sig) != 64:
                return f"ES256 signature must be 64 bytes (raw r||s), not {len(sig)}"
            der = encode_dss_signature(
                int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            )
            key.verify(der, tbs, ec.ECDSA(hashes.SHA256()))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                return "PS256 signature but the DSC key is not RSA"
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            key.verify(sig, tbs, pss, hashes.SHA256())
    except InvalidSignature:
        return "signature does not verify"
    return ""


def _header_map(raw: bytes, where: str) -> dict[Any, Any]:
    if raw == b"":
        return {}
    value = _plain(loads_exact(raw))
    if not isinstance(value, dict):
        raise ValueError(f"the {where} header is not a map")
    return value


def verify_hc1(text: str, dscs: Sequence[DSC], *, at: dt.datetime | None = None) -> VerifyResult:
    """Decode *text* and verify it against the candidate DSCs.

    Every DSC whose kid matches is tried (kids are truncated hashes and may collide). The
    check time *at* defaults to now. Never raises for malformed input: each failure is an
    entry in ``errors``.
    """
    result = VerifyResult()
    at = at or dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    parts = _decode_sign1(result, text)
    if parts is None:
        return result
    header = _read_header(result, parts)
    if header is None:
        return result
    alg, kid = header
    times = _read_claims(result, parts)
    if times is None:
        return result
    # Time validity does not depend on the signature: it is reported either way.
    time_errors = _time_errors(result, *times, at.timestamp())
    result.time_valid = not time_errors

    matched = _find_signer(result, dscs, kid, alg, parts)
    for message in time_errors:
        result.fail("time", message)
    if matched is not None and result.type is not None:
        result.usage_valid = matched.allows(result.type)
        if not result.usage_valid:
            result.fail(
                "key-usage",
                f"the DSC's extended key usage does not allow a {TYPE_NAMES[result.type]} DCC",
            )
    return result


def _decode_sign1(result: VerifyResult, text: str) -> native.Sign1Parts | None:
    """The COSE_Sign1 of *text* (prefix, base45, zlib, COSE, tags), or None after recording
    the failing step in *result*."""
    text = text.rstrip("\r\n")
    if not text.startswith(HC1_PREFIX):
        result.fail("prefix", "the text does not start with 'HC1:'")
        return None
    try:
        compressed = native.b45decode(text[len(HC1_PREFIX) :])
    except native.Base45DecodeError as exc:
        result.fail("base45", str(exc))
        return None
    try:
        cose = native.zlib_decompress(compressed)
    except native.ZlibError as exc:
        result.fail("zlib", str(exc))
        return None
    try:
        parts = native.sign1_decode(cose)
    except native.CoseFormatError as exc:
        result.fail("cose", str(exc))
        return None
    if parts.tags not in _ACCEPTED_TAGS:
        result.fail("cose", f"unexpected CBOR tags {list(parts.tags)} around COSE_Sign1")
        return None
    return parts


def _read_header(result: VerifyResult, parts: native.Sign1Parts) -> tuple[int, bytes] | None:
    """(alg, kid) from the headers, also recorded in *result*; None after recording the
    failure."""
    try:
        protected = _header_map(parts.protected, "protected")
        unprotected = _header_map(parts.unprotected, "unprotected")
    except (ValueError, cbor2.CBORDecodeError) as exc:
        result.fail("header", f"malformed header: {exc}")
        return None
    # The protected bucket wins where both hold a label (hcert spec §3.3.3).
    alg = protected.get(1, unprotected.get(1))
    kid = protected.get(4, unprotected.get(4))
    if alg not in _ALG_NAMES:
        result.fail("header", f"algorithm {alg!r} is not ES256 (-7) or PS256 (-37)")
        return None
    result.alg = _ALG_NAMES[alg]
    if not isinstance(kid, bytes) or len(kid) != 8:
        result.fail("header", "kid must be an 8-byte string")
        return None
    result.kid = kid.hex()
    return alg, kid


def _read_claims(result: VerifyResult, parts: native.Sign1Parts) -> tuple[Any, Any] | None:
    """Record the CWT's iss, iat, exp, DCC and type in *result*; return the raw (iat, exp)
    (each None, int or float), or None after recording the failure."""
    try:
        claims = _plain(loads_exact(parts.payload))
    except (ValueError, cbor2.CBORDecodeError) as exc:
        result.fail("cwt", f"payload is not CBOR: {exc}")
        return None
    if not isinstance(claims, dict):
        result.fail("cwt", "the CWT payload is not a map")
        return None
    iss, iat, exp = claims.get(1), claims.get(6), claims.get(4)
    result.iss = iss if isinstance(iss, str) else None
    # Floats occur in the wild (spec notes §4.5): tolerate them, report integers.
    for name, value in (("iat", iat), ("exp", exp)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            result.fail("cwt", f"{name} must be a NumericDate")
            return None
    result.iat = int(iat) if iat is not None else None
    result.exp = int(exp) if exp is not None else None
    hcert = claims.get(-260)
    dcc = hcert.get(1) if isinstance(hcert, dict) else None
    if not isinstance(dcc, dict):
        result.fail("cwt", "no DCC under claim -260 / key 1")
        return None
    result.dcc = dcc
    groups = [t for t in ("v", "t", "r") if t in dcc]
    result.type = groups[0] if len(groups) == 1 else None
    return iat, exp


def _time_errors(result: VerifyResult, iat: Any, exp: Any, now: float) -> list[str]:
    """Why the check time *now* (POSIX seconds) is outside [iat, exp]; empty when inside.

    The raw claims are compared (a float iat stays a float); the messages name the integers
    recorded in *result*.
    """
    time_errors = []
    if result.iat is not None and now < iat:
        time_errors.append(f"not yet valid: iat {result.iat} is after the check time")
    if result.exp is None:
        time_errors.append("no exp claim")
    elif now > exp:
        time_errors.append(f"expired: exp {result.exp} is before the check time")
    return time_errors


def _find_signer(
    result: VerifyResult, dscs: Sequence[DSC], kid: bytes, alg: int, parts: native.Sign1Parts
) -> DSC | None:
    """Try every DSC with this kid; record the outcome in *result*; return the signer."""
    candidates = [d for d in dscs if d.kid == kid]
    if not candidates:
        result.fail("key", f"no DSC with kid {kid.hex()}")
        return None
    reasons = []
    for dsc in candidates:
        reason = _verify_signature(dsc, alg, parts.protected, parts.payload, parts.signature)
        if not reason:
            result.valid = True
            return dsc
        reasons.append(reason)
    result.fail("signature", "; ".join(dict.fromkeys(reasons)))
    return None
