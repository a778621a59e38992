"""The audit key, which signs the checkpoints (:class:`AuditKey`), and its public half, which
verifies them (:class:`PublicKey`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .durable import create_file
from .errors import AuditKeyError

__all__ = ["PUBKEY_FILE", "AuditKey", "PublicKey"]

#: The audit public key, stored beside the log (what verify uses when given no key).
PUBKEY_FILE = "audit-key.pub.pem"


class PublicKey:
    """The public half of an audit key: checkpoint verification and the fingerprint."""

    __slots__ = ("_key", "fingerprint", "pem")

    def __init__(self, pem: bytes, source: str) -> None:
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise AuditKeyError(f"{source}: not a PEM public key") from None
        if not (
            isinstance(key, Ed25519PublicKey)
            or (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1")
        ):
            raise AuditKeyError(f"{source}: an audit key is Ed25519 or ECDSA P-256")
        self._key = key
        self.pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.fingerprint = hashlib.sha256(der).hexdigest()

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            if isinstance(self._key, Ed25519PublicKey):
                self._key.verify(signature, message)
            else:
                self._key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


class AuditKey:
    """The key that signs checkpoints. It is not a DCC key and should be used for nothing
    else. Files are encrypted PKCS#8 PEM (mode 0600)."""

    __slots__ = ("_private", "path", "public")

    def __init__(self, private_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, path: Path):
        self._private = private_key
        self.path = path
        pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public = PublicKey(pem, str(path))

    def __repr__(self) -> str:
        return f"<AuditKey {self.path} sha256:{self.public.fingerprint[:16]}>"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the public key's DER SubjectPublicKeyInfo, hex."""
        return self.public.fingerprint

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], passphrase: bytes, *, algorithm: str = "Ed25519"
    ) -> AuditKey:
        """Generate a new audit key and write it encrypted with *passphrase*.

        Args:
            algorithm: ``"Ed25519"`` (default) or ``"P-256"``.

        Raises:
            AuditKeyError: the file exists (never overwritten), the passphrase is empty, or the
                file cannot be written (the message names it).
        """
        target = Path(path)
        if not isinstance(passphrase, bytes) or not passphrase:
            raise AuditKeyError(f"{target}: the audit key needs a non-empty passphrase (bytes)")
        if algorithm == "Ed25519":
            private: Ed25519PrivateKey | ec.EllipticCurvePrivateKey = Ed25519PrivateKey.generate()
        elif algorithm == "P-256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unknown audit key algorithm {algorithm!r} (Ed25519 or P-256)")
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        try:
            create_file(target, pem, 0o600)
        except FileExistsError:
            raise AuditKeyError(f"{target}: exists; refusing to overwrite an audit key") from None
        except OSError as exc:
            raise AuditKeyError(f"{target}: cannot write the audit key: {exc.strerror}") from None
        return cls(private, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: bytes) -> AuditKey:
        """Read and decrypt an audit key.

        Raises:
            AuditKeyError: missing or unreadable file, not an encrypted PKCS#8 key, wrong
                passphrase, or a key type other than Ed25519 / P-256 (the message names the
                file).
        """
        source = Path(path)
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            raise AuditKeyError(f"{source}: audit key file not found") from None
        except OSError as exc:
            raise AuditKeyError(f"{source}: cannot read the audit key: {exc.strerror}") from None
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in data:
            raise AuditKeyError(
                f"{source}: not an encrypted PKCS#8 PEM private key (corrupt or wrong file)"
            )
        try:
            private = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise AuditKeyError(
                f"{source}: cannot decrypt the audit key: wrong passphrase or corrupt file"
            ) from None
        if not (
            isinstance(private, Ed25519PrivateKey)
            or (
                isinstance(private, ec.EllipticCurvePrivateKey)
                and private.curve.name == "secp256r1"
            )
        ):
            raise AuditKeyError(f"{source}: an audit key is Ed25519 or ECDSA P-256")
        return cls(private, source)

    def public_key_pem(self) -> bytes:
        return self.public.pem

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._private, Ed25519PrivateKey):
            return self._private.sign(message)
        return self._private.sign(message, ec.ECDSA(hashes.SHA256()))


# ----------------------------------------------------------------------------- the chain check
