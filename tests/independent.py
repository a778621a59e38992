"""Independent HC1 verifiers used by the test suite to check dccsign's signed output.

Nothing here imports dccsign: these verifiers exist to catch mistakes that the signer and
its own decoder could share. There are two, in two languages:

* :func:`verify_pycose`: Python. Base45 and the CBOR framing are handled here, zlib by the
  stdlib, the signature check by pycose 1.1.0 (which calls ``cryptography`` for PS256 and
  ``ecdsa`` for ES256), the DSC by ``cryptography``'s X.509 parser.
* :func:`verify_node`: Node.js (``tests/interop/verify_hc1.mjs``): built-in ``crypto``,
  ``zlib`` and ``X509Certificate``, and the npm package ``cbor-x`` for CBOR.

Both apply the same rules, in this order, and the first failure is the ``reason``:

1. ``prefix``: the text starts with exactly ``HC1:``.
2. ``base45``: RFC 9285. Checked in this order: every character is in the 45-symbol alphabet
   (upper case only; nothing is trimmed, space is a symbol), the length is not 1 (mod 3), no
   triplet exceeds 65535 and no final pair exceeds 255.
3. ``zlib``: one complete RFC 1950 stream (header, deflate, Adler-32) with no trailing bytes,
   whose CMF byte is 0x78 (deflate, 32 KiB window). The last rule is stricter than RFC 1950:
   some deployed verifiers only inflate data that starts with 0x78, so our output must too.
4. ``cose``: exactly one CBOR item, no trailing bytes: COSE_Sign1 with tag 18, untagged, or
   CWT tag 61 around tag 18; an array of four (bstr, map, bstr, bstr). The protected bstr is
   ``h''`` or the encoding of one map. A ``crit`` (2) header is refused.
5. ``alg``/``kid``: each is taken from the protected header, else from the unprotected one.
   alg must be -7 (ES256) or -37 (PS256); kid must equal SHA-256(DSC DER)[:8].
6. ``dsc``: the DER parses; its key fits alg (EC P-256 for -7, RSA for -37).
7. ``signature``: over ``["Signature1", protected bytes as sent, h'', payload]``.
   ES256: exactly 64 bytes r||s (never DER). PS256: RSASSA-PSS, SHA-256, MGF1-SHA-256,
   salt length exactly 32.
8. ``cwt``: the payload is one CBOR map, every key an integer, with 1 (iss, text), 4 (exp) and
   6 (iat) as CBOR integers (major type 0/1: ``1.0`` is a float and fails, and so does a tagged
   time), and -260 (hcert) = ``{1: map}`` with nothing else under -260.

A :class:`Verdict` carries kid and alg whenever they could be read, and ``payload`` (the CWT
claims, integer keys) only once the signature has verified.

pycose 1.1.0 quirks met here (see ``shared/reference/dcc-spec-notes.md`` section 4):

* ``Sign1Message.decode`` fails on tagged input with cbor2 >= 6, because cbor2 decodes an
  array inside a tag as a ``tuple`` (and a map as ``frozendict``) and pycose checks for
  ``list``. So the CBOR is decoded here and the message is built from its parts.
* pycose's Sig_structure puts ``h''`` in place of the protected bytes whenever the decoded
  protected map is empty, so a valid signature over a protected ``h'a0'`` fails in stock
  pycose. :class:`_Sign1AsSent` uses the protected bytes exactly as received instead. Our
  signer never emits an empty protected map, so this only matters for hand-made inputs.
* pycose's ``get_attr`` raises when a label sits in both header buckets (kid does in TD
  CO18/CO21/CO22). alg and kid are resolved here (protected wins), and pycose is handed only
  the alg it needs in the unprotected bucket.

No dependency warns on this path today, so no warning filter is installed (pytest runs with
``filterwarnings=error``, which would show a new one at once).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

INTEROP_DIR = Path(__file__).resolve().parent / "interop"
NODE_SCRIPT = INTEROP_DIR / "verify_hc1.mjs"

PREFIX = "HC1:"
ALG_ES256 = -7
ALG_PS256 = -37
ALG_NAMES = {ALG_ES256: "ES256", ALG_PS256: "PS256"}
MAX_INFLATED = 4 * 1024 * 1024  # far above any QR-sized payload; stops a deflate bomb
CLAIM_ISS, CLAIM_EXP, CLAIM_IAT, CLAIM_HCERT = 1, 4, 6, -260
TAG_COSE_SIGN1 = 18
TAG_CWT = 61

_B45_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_B45_VALUE = {ch: i for i, ch in enumerate(_B45_ALPHABET)}


@dataclass
class Verdict:
    ok: bool
    reason: str
    kid: bytes | None
    alg: int | None
    payload: dict | None  # decoded CWT claims (integer keys); set once the signature verified


class _Reject(Exception):
    """Raised inside the verifier to stop at the first failed rule."""


# --------------------------------------------------------------------------- base45


def b45decode(text: str) -> bytes:
    """Strict RFC 9285 decoder. Raises ``ValueError`` with a precise message."""
    for offset, ch in enumerate(text):
        if ch not in _B45_VALUE:
            raise ValueError(f"invalid character {json.dumps(ch)} at offset {offset}")
    if len(text) % 3 == 1:
        raise ValueError(f"length {len(text)} is 1 (mod 3)")
    out = bytearray()
    for start in range(0, len(text), 3):
        chunk = text[start : start + 3]
        digits = [_B45_VALUE[ch] for ch in chunk]
        if len(digits) == 3:
            n = digits[0] + 45 * digits[1] + 45 * 45 * digits[2]
            if n > 0xFFFF:
                raise ValueError(f"triplet {json.dumps(chunk)} at offset {start} exceeds 65535")
            out += n.to_bytes(2, "big")
        else:
            n = digits[0] + 45 * digits[1]
            if n > 0xFF:
                raise ValueError(f"final pair {json.dumps(chunk)} exceeds 255")
            out.append(n)
    return bytes(out)


# --------------------------------------------------------------------------- helpers


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()  # default wbits: RFC 1950 wrapper, header + Adler-32
    try:
        out = inflater.decompress(data, MAX_INFLATED)
    except zlib.error as exc:
        raise _Reject(f"zlib: {exc}") from None
    if inflater.unconsumed_tail:
        raise _Reject(f"zlib: inflated size exceeds {MAX_INFLATED} bytes")
    if not inflater.eof:
        raise _Reject("zlib: stream is incomplete (no final block / Adler-32)")
    if inflater.unused_data:
        raise _Reject(f"zlib: {len(inflater.unused_data)} trailing bytes after the stream")
    if data[0] != 0x78:
        raise _Reject(f"zlib: CMF byte is 0x{data[0]:02x}, not 0x78 (deflate, 32 KiB window)")
    return out


def _cbor_one(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error (cbor2.loads ignores them)."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises CBORDecodeError, EOFError, ValueError, ...
        raise _Reject(f"{what}: not valid CBOR ({type(exc).__name__}: {exc})") from None
    rest = len(data) - stream.tell()
    if rest:
        raise _Reject(f"{what}: trailing bytes after the CBOR item ({rest} bytes)")
    return item


def _thaw(value: Any) -> Any:
    """cbor2 >= 6 returns frozendict/tuple inside tags: give plain dicts and lists back."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass in Python, CBOR keeps them apart


def _cbor_kind(value: Any) -> str:
    """The CBOR kind of a decoded value, worded as the node verifier words it."""
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, str):
        return "a text string"
    if isinstance(value, bytes):
        return "a byte string"
    if isinstance(value, bool) or value is None or isinstance(value, cbor2.CBORSimpleValue):
        return "a simple value"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    return f"a tagged value ({type(value).__name__})"


def _header(label: int, protected: Mapping, unprotected: Mapping) -> Any:
    if label in protected:
        return protected[label]
    return unprotected.get(label)


def _unwrap_cose(item: Any) -> Any:
    if isinstance(item, cbor2.CBORTag):
        if item.tag == TAG_CWT:
            item = item.value
            if not (isinstance(item, cbor2.CBORTag) and item.tag == TAG_COSE_SIGN1):
                raise _Reject("cose: CWT tag 61 does not wrap a COSE_Sign1 (tag 18)")
        if item.tag != TAG_COSE_SIGN1:
            raise _Reject(f"cose: unexpected CBOR tag {item.tag} (want 18, 61(18) or none)")
        item = item.value
    if not isinstance(item, (list, tuple)) or len(item) != 4:
        raise _Reject("cose: not a COSE_Sign1 array of four elements")
    return item


def _check_cwt(claims: Any) -> None:
    if not isinstance(claims, Mapping):
        raise _Reject(f"cwt: payload is {_cbor_kind(claims)}, not a map")
    for key in claims:
        if not _is_int(key):
            raise _Reject(f"cwt: claim key {key} is not an integer")
    for label, name in ((CLAIM_ISS, "iss"), (CLAIM_EXP, "exp"), (CLAIM_IAT, "iat")):
        if label not in claims:
            raise _Reject(f"cwt: claim {label} ({name}) missing")
    if not isinstance(claims[CLAIM_ISS], str):
        raise _Reject("cwt: claim 1 (iss) is not a text string")
    for label, name in ((CLAIM_EXP, "exp"), (CLAIM_IAT, "iat")):
        if not _is_int(claims[label]):
            raise _Reject(f"cwt: claim {label} ({name}) is not an integer")
    hcert = claims.get(CLAIM_HCERT)
    if hcert is None:
        raise _Reject("cwt: claim -260 (hcert) missing")
    if not isinstance(hcert, Mapping):
        raise _Reject("cwt: claim -260 (hcert) is not a map")
    if len(hcert) != 1 or not any(_is_int(k) and k == 1 for k in hcert):
        keys = ", ".join(str(k) for k in hcert)
        raise _Reject(f"cwt: claim -260 must be {{1: map}}, has keys [{keys}]")
    if not isinstance(hcert[1], Mapping):
        raise _Reject("cwt: claim -260 key 1 (eu_dcc_v1) is not a map")


class _Sign1AsSent(Sign1Message):
    """pycose Sign1Message whose Sig_structure uses the protected bytes as received.

    Stock pycose 1.1.0 substitutes ``h''`` whenever the decoded protected map is empty.
    """

    def _base_structure(self, structure: list) -> list:
        structure.append(self.phdr_encoded)
        structure.append(self.external_aad)
        return structure


@functools.lru_cache(maxsize=64)
def _load_dsc(dsc_der: bytes) -> tuple[bytes, Any]:
    """Return (kid, cryptography public key) of a DSC; raises _Reject if it does not parse."""
    try:
        cert = x509.load_der_x509_certificate(dsc_der)
        public_key = cert.public_key()
    except Exception as exc:
        raise _Reject(f"dsc: cannot parse the certificate ({type(exc).__name__}: {exc})") from None
    return hashlib.sha256(dsc_der).digest()[:8], public_key


def _check_key_fits_alg(alg: int, public_key: Any) -> None:
    if alg == ALG_ES256:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise _Reject(f"alg: ES256 (-7) but the DSC key is {_key_desc(public_key)}")
        if public_key.curve.name != "secp256r1":
            raise _Reject(f"alg: ES256 (-7) needs P-256, the DSC key is {_key_desc(public_key)}")
    elif not isinstance(public_key, rsa.RSAPublicKey):
        raise _Reject(f"alg: PS256 (-37) but the DSC key is {_key_desc(public_key)}")


def _key_desc(public_key: Any) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    return type(public_key).__name__


# --------------------------------------------------------------------------- pycose verifier


def verify_pycose(hc1: str, dsc_der: bytes) -> Verdict:
    """Verify one HC1 string against one DSC (DER) with pycose. Never raises for bad input."""
    state: dict[str, Any] = {"kid": None, "alg": None}
    try:
        payload = _verify_pycose(hc1, dsc_der, state)
    except _Reject as exc:
        return Verdict(False, str(exc), state["kid"], state["alg"], None)
    except Exception as exc:  # a harness bug or a dependency surprise: still a verdict
        reason = f"internal: {type(exc).__name__}: {exc}"
        return Verdict(False, reason, state["kid"], state["alg"], None)
    return Verdict(True, "ok", state["kid"], state["alg"], payload)


def _verify_pycose(hc1: str, dsc_der: bytes, state: dict[str, Any]) -> dict:
    if not isinstance(hc1, str):
        raise _Reject(f"input: hc1 is a {type(hc1).__name__}, not str")
    if not isinstance(dsc_der, (bytes, bytearray)):
        raise _Reject(f"input: dsc is a {type(dsc_der).__name__}, not bytes")
    if not hc1.startswith(PREFIX):
        raise _Reject(f"prefix: does not start with 'HC1:' (starts {json.dumps(hc1[:4])})")
    try:
        compressed = b45decode(hc1[len(PREFIX) :])
    except ValueError as exc:
        raise _Reject(f"base45: {exc}") from None
    if not compressed:
        raise _Reject("base45: empty")
    cose_bytes = _inflate(compressed)

    parts = _unwrap_cose(_cbor_one(cose_bytes, "cose"))
    protected_bytes, unprotected, payload_bytes, signature = parts
    if not isinstance(protected_bytes, bytes):
        raise _Reject("cose: protected header is not a byte string")
    if not isinstance(unprotected, Mapping):
        raise _Reject("cose: unprotected header is not a map")
    if not isinstance(payload_bytes, bytes):
        raise _Reject("cose: payload is not a byte string (detached or wrong type)")
    if not isinstance(signature, bytes):
        raise _Reject("cose: signature is not a byte string")
    protected: Mapping = {}
    if protected_bytes:
        protected = _cbor_one(protected_bytes, "cose: protected header")
        if not isinstance(protected, Mapping):
            raise _Reject("cose: protected header does not hold a map")
    if 2 in protected or 2 in unprotected:
        raise _Reject("cose: crit header (2) present; no critical extensions are supported")

    alg = _header(1, protected, unprotected)
    kid = _header(4, protected, unprotected)
    if _is_int(alg):
        state["alg"] = alg
    if isinstance(kid, bytes):
        state["kid"] = kid
    if alg is None:
        raise _Reject("alg: missing from both headers")
    if not _is_int(alg) or alg not in ALG_NAMES:
        raise _Reject(f"alg: {alg!r} is not ES256 (-7) or PS256 (-37)")
    if kid is None:
        raise _Reject("kid: missing from both headers")
    if not isinstance(kid, bytes):
        raise _Reject(f"kid: is {_cbor_kind(kid)}, not a byte string")

    dsc_kid, public_key = _load_dsc(bytes(dsc_der))
    if kid != dsc_kid:
        raise _Reject(f"kid: {kid.hex()} does not match the DSC (SHA-256[:8] = {dsc_kid.hex()})")
    _check_key_fits_alg(alg, public_key)
    if alg == ALG_ES256 and len(signature) != 64:
        raise _Reject(f"signature: ES256 needs 64 bytes r||s, got {len(signature)}")

    message = _Sign1AsSent(
        phdr_encoded=protected_bytes,
        uhdr={} if 1 in protected else {1: alg},
        payload=payload_bytes,
    )
    message.signature = signature
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    message.key = CoseKey.from_pem_public_key(pem.decode("ascii"))
    if not message.verify_signature():
        raise _Reject(f"signature: {ALG_NAMES[alg]} signature does not verify with the DSC key")

    claims = _thaw(_cbor_one(payload_bytes, "cwt"))
    _check_cwt(claims)
    return claims


# --------------------------------------------------------------------------- node verifier


def _node_binary() -> str | None:
    return shutil.which("node") or ("/usr/bin/node" if os.path.exists("/usr/bin/node") else None)


@functools.cache
def node_available() -> bool:
    """True when node (>= 20) runs and ``npm ci --prefix tests/interop`` has been done."""
    node = _node_binary()
    if node is None or not NODE_SCRIPT.exists():
        return False
    if not (INTEROP_DIR / "node_modules" / "cbor-x" / "package.json").exists():
        return False
    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    return major >= 20


def verify_node(items: list[tuple[str, bytes]]) -> list[Verdict]:
    """Verify many (hc1, dsc_der) pairs with ONE node process (JSON lines in and out).

    Raises RuntimeError only when node itself misbehaves (crash, wrong number of lines),
    never because an input is bad.
    """
    if not items:
        return []
    node = _node_binary()
    if node is None:
        raise RuntimeError("node is not installed")
    lines = [
        json.dumps({"hc1": hc1, "dsc": base64.b64encode(bytes(dsc)).decode("ascii")})
        for hc1, dsc in items
    ]
    proc = subprocess.run(
        [node, str(NODE_SCRIPT)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120 + len(items) // 100,
        cwd=INTEROP_DIR,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"node verifier exited {proc.returncode}: {proc.stderr.strip()}")
    out = proc.stdout.splitlines()
    if len(out) != len(items):
        raise RuntimeError(f"node verifier answered {len(out)} lines for {len(items)} inputs")
    return [_verdict_from_json(line) for line in out]


def _verdict_from_json(line: str) -> Verdict:
    obj = json.loads(line)
    payload = obj.get("payload")
    if payload is not None:
        payload = {int(k): v for k, v in payload.items()}  # claim labels come back as strings
        hcert = payload.get(CLAIM_HCERT)
        if isinstance(hcert, dict):
            payload[CLAIM_HCERT] = {int(k): v for k, v in hcert.items()}
    kid = obj.get("kid")
    return Verdict(
        ok=bool(obj["ok"]),
        reason=str(obj["reason"]),
        kid=bytes.fromhex(kid) if kid is not None else None,
        alg=obj.get("alg"),
        payload=payload,
    )
