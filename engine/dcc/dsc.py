"""Document Signer Certificates: the facts the signer and verifier need from a DSC.

The kid is derived here and nowhere else: the first 8 bytes of SHA-256 over the DSC's DER
(hcert spec §3.3.3). It is never configured.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = ["DCC_TYPES", "DSC", "EKU_OIDS", "TYPE_NAMES", "eku_oids"]

ES256 = -7
PS256 = -37

#: The three DCC types, by their payload key.
DCC_TYPES = ("v", "t", "r")
TYPE_NAMES = {"v": "vaccination", "t": "test", "r": "recovery"}

# Extended key usage OIDs that limit what a DSC may sign (hcert spec Appendix A.4). Both
# spellings occur in production certificates (spec notes §4.26).
EKU_OIDS: dict[str, str] = {}
for _base in ("1.3.6.1.4.1.1847.2021.1", "1.3.6.1.4.1.0.1847.2021.1"):
    EKU_OIDS[f"{_base}.1"] = "t"
    EKU_OIDS[f"{_base}.2"] = "v"
    EKU_OIDS[f"{_base}.3"] = "r"


class _DER:
    """Just enough DER to walk a TBSCertificate to its extensions."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def next(self) -> tuple[int, int, int]:
        """(tag, start of content, end of content) of the next element; advances past it."""
        d, p = self.data, self.pos
        if p + 2 > self.end:
            raise ValueError("truncated DER")
        tag, length = d[p], d[p + 1]
        p += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or p + n > self.end:
                raise ValueError("bad DER length")
            length = int.from_bytes(d[p : p + n], "big")
            p += n
        if p + length > self.end:
            raise ValueError("DER element longer than its container")
        self.pos = p + length
        return tag, p, p + length

    def more(self) -> bool:
        return self.pos < self.end


def _oid(raw: bytes) -> str:
    parts, value = [], 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    first = min(parts[0] // 40, 2)
    return ".".join(str(x) for x in [first, parts[0] - 40 * first, *parts[1:]])


_EKU_OID = bytes.fromhex("551d25")  # 2.5.29.37


def eku_oids(tbs: bytes) -> list[str]:
    """The extended-key-usage OIDs of a TBSCertificate (DER), or [] without that extension.

    We read the EKU ourselves because production DSCs carry extensions that strict X.509
    parsers refuse -- an EKU with zero OIDs (TD common/CO15), an explicit BasicConstraints
    cA=FALSE (FI) -- and a verifier must still learn what the DSC may sign.

    Raises:
        ValueError: the DER is malformed.
    """
    outer = _DER(tbs)
    _, start, end = outer.next()  # TBSCertificate SEQUENCE
    body = _DER(tbs, start, end)
    while body.more():
        tag, s, e = body.next()
        if tag != 0xA3:  # [3] extensions
            continue
        exts = _DER(tbs, s, e)
        _, s2, e2 = exts.next()  # SEQUENCE OF Extension
        seq = _DER(tbs, s2, e2)
        while seq.more():
            _, s3, e3 = seq.next()
            ext = _DER(tbs, s3, e3)
            _, os_, oe = ext.next()
            if tbs[os_:oe] != _EKU_OID:
                continue
            tag, vs, ve = ext.next()
            if tag == 0x01:  # critical BOOLEAN
                tag, vs, ve = ext.next()
            value = _DER(tbs, vs, ve)
            if not value.more():
                return []
            _, ls, le = value.next()  # SEQUENCE OF KeyPurposeId
            purposes = _DER(tbs, ls, le)
            oids = []
            while purposes.more():
                _, ps, pe = purposes.next()
                oids.append(_oid(tbs[ps:pe]))
            return oids
    return []


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class DSC:
    """One DSC.

    Attributes:
        der: the certificate, DER.
        kid: SHA-256(der)[:8].
        alg: -7 (ES256, EC P-256 key) or -37 (PS256, RSA key); None for other key types.
        usages: the DCC types ("v", "t", "r") this DSC may sign. A DSC without DCC key-usage
            OIDs (no EKU, an empty EKU, or only other OIDs) may sign all three.
        restricted: True when the DSC names DCC key-usage OIDs.
        not_before, not_after: the validity period (UTC).
        country: the subject's country (C) or None.
        subject: the subject as an RFC 4514 string.
    """

    der: bytes
    kid: bytes
    alg: int | None
    usages: frozenset[str]
    restricted: bool
    not_before: dt.datetime
    not_after: dt.datetime
    country: str | None
    subject: str

    @classmethod
    def from_bytes(cls, data: bytes) -> DSC:
        """Parse a PEM or DER certificate.

        Raises:
            ValueError: not a certificate this library can parse.
        """
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        return cls.from_certificate(cert)

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> DSC:
        der = cert.public_bytes(serialization.Encoding.DER)
        key = cert.public_key()
        alg: int | None = None
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            alg = ES256
        elif isinstance(key, rsa.RSAPublicKey):
            alg = PS256
        oids = eku_oids(cert.tbs_certificate_bytes)
        named = {EKU_OIDS[o] for o in oids if o in EKU_OIDS}
        countries = cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)
        return cls(
            der=der,
            kid=hashlib.sha256(der).digest()[:8],
            alg=alg,
            usages=frozenset(named) if named else frozenset(DCC_TYPES),
            restricted=bool(named),
            not_before=_utc(cert.not_valid_before_utc),
            not_after=_utc(cert.not_valid_after_utc),
            country=str(countries[0].value) if countries else None,
            subject=cert.subject.rfc4514_string(),
        )

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    def public_key_der(self) -> bytes:
        return (
            self.certificate()
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def pem(self) -> bytes:
        return self.certificate().public_bytes(serialization.Encoding.PEM)

    def allows(self, dcc_type: str) -> bool:
        """True when this DSC's key usage permits signing a DCC of *dcc_type*."""
        return dcc_type in self.usages

    def valid_at(self, when: dt.datetime) -> bool:
        return self.not_before <= when <= self.not_after

    @property
    def alg_name(self) -> str:
        return {ES256: "ES256", PS256: "PS256"}.get(self.alg, "unsupported")
