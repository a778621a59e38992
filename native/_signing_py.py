"""ES256/PS256 signing of COSE Sig_structures, pure-Python reference (pyca/cryptography).

This is hazmat: a :class:`SigningKey` holds a private key. It offers no way to read the key
back, and it signs only COSE_Sign1 Sig_structures built here from a protected header that
matches the key's algorithm -- never a caller's digest.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ._cose_py import check_protected, sig_structure
from ._types import ES256, PS256
from .errors import KeyLoadError

__all__ = ["SigningKey"]

_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# RFC 8230 §2: MGF1-SHA-256 and a 32-byte salt. PSS.MAX_LENGTH (222 bytes for RSA-2048) is
# what cryptography suggests, and what DCC verifiers reject.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class SigningKey:
    """A private signing key for ES256 (P-256) or PS256 (RSA 2048-4096).

    Attributes:
        alg: the COSE algorithm this key signs with (-7 ES256, -37 PS256).
    """

    __slots__ = ("_key", "alg")

    def __init__(self) -> None:
        raise TypeError("use SigningKey.load_pem()")

    def __reduce__(self):
        raise TypeError("a SigningKey cannot be pickled or copied out of its process")

    @classmethod
    def load_pem(cls, pem: bytes, passphrase: bytes | None) -> SigningKey:
        """Load a PEM private key (PKCS#8, normally encrypted with *passphrase*).

        Raises:
            KeyLoadError: wrong or missing passphrase, corrupt PEM, or a key that is neither
                EC P-256 nor RSA of 2048 to 4096 bits.
        """
        try:
            key = serialization.load_pem_private_key(bytes(pem), password=passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            what = (
                "cannot decrypt or parse the private key (wrong passphrase or corrupt file)"
                if passphrase is not None
                else "cannot parse the private key (encrypted keys need a passphrase)"
            )
            raise KeyLoadError(f"{what}: {exc}") from None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise KeyLoadError(
                    f"EC key on curve {key.curve.name}: ES256 needs P-256 (prime256v1)"
                )
            alg = ES256
        elif isinstance(key, rsa.RSAPrivateKey):
            if not 2048 <= key.key_size <= 4096:
                raise KeyLoadError(f"RSA key of {key.key_size} bits: PS256 needs 2048 to 4096 bits")
            alg = PS256
        else:
            raise KeyLoadError("unsupported key type: only EC P-256 (ES256) and RSA (PS256)")
        self = object.__new__(cls)
        self._key = key
        self.alg = alg
        return self

    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (to match it against a DSC)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, protected: bytes, payloads: Sequence[bytes]) -> list[bytes]:
        """Sign the Sig_structure of each payload under *protected*.

        Returns one signature per payload: ES256 as 64-byte raw ``r || s`` (each half
        left-padded, s in the low half), PS256 as the RSA-PSS signature.

        Raises:
            ValueError: *protected* is not the canonical header for this key's algorithm.
            TypeError: a payload is not ``bytes``.
        """
        check_protected(self.alg, protected)
        items = _check_payloads(payloads)
        if self.alg == ES256:
            return [self._sign_es256(sig_structure(protected, p)) for p in items]
        return [self._key.sign(sig_structure(protected, p), _PSS, hashes.SHA256()) for p in items]

    def _sign_es256(self, tbs: bytes) -> bytes:
        r, s = decode_dss_signature(self._key.sign(tbs, ec.ECDSA(hashes.SHA256())))
        if s > _P256_N // 2:
            s = _P256_N - s  # low-S: (r, n - s) verifies too and removes malleability
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _check_payloads(payloads: Sequence[bytes]) -> tuple[bytes, ...]:
    items = tuple(payloads)
    for i, p in enumerate(items):
        if type(p) is not bytes:
            raise TypeError(f"payload {i} must be bytes, not {type(p).__name__}")
    return items
