"""PKCS#10 certificate requests (RFC 2986) for keys whose signing happens elsewhere (a token).

``cryptography`` signs a CSR only with a private key object it holds; a token key never
leaves the token. So the request is assembled here in DER and its ``CertificationRequestInfo``
is handed to a signing callback. Callers (:meth:`dccsign.keys.pkcs11.Pkcs11Token.csr`) build the
request themselves from a subject and key usages: the callback is never exposed as a way to
sign arbitrary bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["ECDSA_SHA256", "RSA_SHA256", "build_csr"]


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _len(len(content)) + content


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for value in parts[2:]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


#: AlgorithmIdentifier DER: ecdsa-with-SHA256 (no parameters, RFC 5758 §3.2)
ECDSA_SHA256 = _seq(_oid("1.2.840.10045.4.3.2"))
#: AlgorithmIdentifier DER: sha256WithRSAEncryption with NULL parameters (RFC 4055 §5)
RSA_SHA256 = _seq(_oid("1.2.840.113549.1.1.11"), b"\x05\x00")

_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
_EXTENDED_KEY_USAGE = "2.5.29.37"


def build_csr(
    subject: x509.Name,
    public_key_der: bytes,
    eku_oids: list[str],
    algorithm: bytes,
    sign: Callable[[bytes], bytes],
) -> bytes:
    """A DER CSR for *subject* and *public_key_der* requesting the extended key usages.

    Args:
        subject: the requested subject.
        public_key_der: DER SubjectPublicKeyInfo of the key.
        eku_oids: dotted OIDs for the ExtendedKeyUsage extension request (non-critical).
        algorithm: :data:`ECDSA_SHA256` or :data:`RSA_SHA256`.
        sign: signs the DER ``CertificationRequestInfo`` with SHA-256 and the key, returning
            the signature value (DER ECDSA-Sig-Value, or the RSA PKCS#1 v1.5 signature).
    """
    eku = _seq(*(_oid(o) for o in eku_oids))
    extension = _seq(_oid(_EXTENDED_KEY_USAGE), _tlv(0x04, eku))
    attribute = _seq(_oid(_EXTENSION_REQUEST), _tlv(0x31, _seq(extension)))
    info = _seq(
        b"\x02\x01\x00",  # version 0
        subject.public_bytes(),
        public_key_der,
        _tlv(0xA0, attribute),  # [0] IMPLICIT SET OF Attribute
    )
    signature = sign(info)
    return _seq(info, algorithm, _tlv(0x03, b"\x00" + signature))


def to_pem(der: bytes) -> bytes:
    """PEM of a DER CSR (checked by parsing it)."""
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
