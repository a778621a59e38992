"""Throw-away X.509 certificates for tests and benchmarks, built with ``cryptography`` alone.

Nothing here imports the engine, so the independent verifiers' tests may build their DSCs
with it and still share no code with what they check.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

__all__ = ["self_signed_certificate"]


def self_signed_certificate(
    key: CertificateIssuerPrivateKeyTypes, name: x509.Name, *, days: int
) -> x509.Certificate:
    """A certificate for *key*'s public key, subject and issuer *name*, signed by *key* itself
    (SHA-256), valid from a day ago for *days* days, without extensions."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
