"""Development TLS material for ``dccsign serve``: a CA, a server and a client certificate.

For the embedded default only (``make serve``): the CA key sits next to the certificates,
unencrypted, and every subject says DEVELOPMENT. Production deployments pass their own
``--tls-cert/--tls-key/--client-ca``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEV_CLIENT_NAME", "ensure_dev_tls"]

#: The client identity (certificate common name) of the development client certificate.
DEV_CLIENT_NAME = "dev-portal"
_FILES = ("ca", "server_cert", "server_key", "client_cert", "client_key")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dccsign DEVELOPMENT"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_dev_tls(directory: Path) -> dict[str, Path]:
    """Create (once) and return the paths of the development CA and certificates.

    Keys: ``ca``, ``server_cert``, ``server_key`` (for localhost and 127.0.0.1),
    ``client_cert``, ``client_key`` (common name :data:`DEV_CLIENT_NAME`).
    """
    directory = Path(directory)
    paths = {name: directory / f"{name.replace('_', '-')}.pem" for name in _FILES}
    if all(p.exists() for p in paths.values()):
        return paths
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("dccsign DEVELOPMENT TLS CA"))
        .issuer_name(_name("dccsign DEVELOPMENT TLS CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client, client_key = leaf(DEV_CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pem = serialization.Encoding.PEM
    _write(paths["ca"], ca.public_bytes(pem), 0o644)
    _write(paths["server_cert"], server.public_bytes(pem), 0o644)
    _write(paths["server_key"], _pem_key(server_key), 0o600)
    _write(paths["client_cert"], client.public_bytes(pem), 0o644)
    _write(paths["client_key"], _pem_key(client_key), 0o600)
    _write(directory / "ca-key.pem", _pem_key(ca_key), 0o600)
    return paths
