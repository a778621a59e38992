"""The naive HC1 pipeline: what a developer writes from off-the-shelf libraries.

This is the *baseline* the benchmarks compare the product against. It is deliberately the
straightforward code (one certificate at a time, every structure rebuilt per call, cbor2 for
all CBOR, pyca/cryptography for ECDSA, stdlib zlib, PyPI ``base45``), and it lives in bench/
only: nothing in the product imports it.

    CWT claims {1: iss, 4: exp, 6: iat, -260: {1: dcc}} -> cbor2
    Sig_structure ["Signature1", protected, h'', payload] -> cbor2 -> ECDSA P-256 / SHA-256
    DER signature -> raw r || s (64 bytes)
    COSE_Sign1 tag 18 [protected, {}, payload, signature] -> cbor2 -> zlib 9 -> base45 -> "HC1:"
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import base45
import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dccsign.bench.core import ephemeral_certificate
from dccsign.dcc.dsc import DSC

__all__ = ["NaiveSigner", "naive_hc1", "naive_signer", "naive_times"]

_ES256 = -7


def naive_hc1(
    private_key: ec.EllipticCurvePrivateKey,
    kid: bytes,
    dcc: dict[str, Any],
    iss: str,
    iat: int,
    exp: int,
) -> str:
    """Sign one DCC and return its ``HC1:`` string, the library way."""
    protected = cbor2.dumps({1: _ES256, 4: kid})
    payload = cbor2.dumps({1: iss, 4: exp, 6: iat, -260: {1: dcc}})
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    der = private_key.sign(to_be_signed, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    cose = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]))
    return "HC1:" + base45.b45encode(zlib.compress(cose, 9)).decode("ascii")


@dataclass(frozen=True)
class NaiveSigner:
    """A cryptography private key with its self-signed DSC, for the naive pipeline."""

    private_key: ec.EllipticCurvePrivateKey
    dsc: DSC

    @property
    def kid(self) -> bytes:
        return self.dsc.kid

    @property
    def iss(self) -> str:
        return self.dsc.country or "NL"


def naive_signer() -> NaiveSigner:
    """A fresh P-256 key and a self-signed certificate valid from yesterday for 30 days."""
    key, cert = ephemeral_certificate("dccsign bench naive baseline")
    return NaiveSigner(key, DSC.from_certificate(cert))


def naive_times(signer: NaiveSigner, now: float) -> tuple[int, int]:
    """``(iat, exp)`` as the product chooses them: iat an hour back, exp clamped to the DSC."""
    iat = int(now) - 3600
    exp = min(iat + 365 * 86400, int(signer.dsc.not_after.timestamp()))
    return iat, exp
