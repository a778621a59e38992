"""Key lifecycle for security staff: generate, CSR, import the DSC, activate, retire, disable.

States and the only transitions allowed::

    pending --import-cert--> inactive --activate--> active --retire--> retired
       any state except disabled --disable--> disabled        (the emergency stop; final)

A running keyd re-reads the keystore metadata at least every second, so a state change takes
effect there within a second.

Every operation is appended to the key-event journal ``DIR/key-events.jsonl`` (one JSON line,
fsync'd, before the command reports success). keyd copies journal entries into the audit log
-- it is the log's only writer -- at start and whenever the keystore changes.

Software keys are generated here, encrypted at once with the keystore passphrase, and only
ever decrypted again to sign a CSR (here) or certificates (in keyd). PKCS#11 keys are generated
inside the token and never leave it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..dcc.dsc import DSC, EKU_OIDS
from ..errors import KeystoreError
from .keystore import METADATA, Keystore
from .storage import append_journal, atomic_write

__all__ = [
    "TRANSITIONS",
    "generate",
    "import_cert",
    "issue_with_dev_csca",
    "key_warnings",
    "make_csr",
    "set_state",
]

LOCK = ".keystore.lock"
#: target state -> the states it may be reached from
TRANSITIONS = {
    "active": {"inactive"},
    "retired": {"active"},
    "disabled": {"pending", "inactive", "active", "retired"},
}
#: EU guidance: a DSC's private key signs for at most 6 months (then a new key takes over).
PRIVATE_KEY_USAGE = dt.timedelta(days=182)
WARN_BEFORE = dt.timedelta(days=30)
_USAGE_NAMES = {"vaccination": "v", "test": "t", "recovery": "r"}


@contextlib.contextmanager
def _locked_metadata(directory: Path) -> Iterator[dict[str, Any]]:
    """The metadata, under an exclusive lock; written back atomically if the block succeeds."""
    Keystore.open(directory)  # a clear error for a missing or broken keystore
    with open(directory / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = directory / METADATA
        meta = json.loads(path.read_text(encoding="utf-8"))
        before = json.dumps(meta, sort_keys=True)
        yield meta
        if json.dumps(meta, sort_keys=True) != before:
            atomic_write(path, (json.dumps(meta, indent=2) + "\n").encode(), 0o644)


def _find(meta: dict[str, Any], name: str) -> dict[str, Any]:
    for item in meta["keys"]:
        if item["name"] == name:
            return item
    raise KeystoreError(f"no key named {name!r} in the keystore")


def generate(
    directory: str | os.PathLike[str],
    alg: str,
    passphrase: bytes,
    *,
    pkcs11: dict[str, str] | None = None,
) -> str:
    """Generate a key in state ``pending``; return its name.

    Without *pkcs11*: a software key, encrypted at rest with *passphrase*. With *pkcs11*
    (``module``, ``token_label``, ``pin_file``): the key pair is generated inside the token,
    sensitive and never extractable; only its public key and location are recorded (the PIN
    file's path, never the PIN).

    Raises:
        KeystoreError: unknown algorithm, unusable keystore, or a token failure.
    """
    root = Path(directory)
    if alg not in ("ES256", "PS256"):
        raise KeystoreError(f"--alg must be ES256 or PS256, not {alg!r}")
    name = f"{alg.lower()}-{secrets.token_hex(4)}"
    item: dict[str, Any] = {
        "name": name,
        "state": "pending",
        "public_key": f"keys/{name}.pub.pem",
        "certificate": None,
    }
    if pkcs11 is not None:
        from .pkcs11 import Pkcs11Error, Pkcs11Token, read_pin

        if pkcs11["pin_file"].startswith("fd:"):
            # keyd reads the PIN again at every start: it needs a file, not this process's fd.
            raise KeystoreError("--pin-file must name a file (keyd re-reads the PIN at start)")

        try:
            token = Pkcs11Token.open(
                pkcs11["module"], pkcs11["token_label"], read_pin(pkcs11["pin_file"])
            )
            try:
                key_id = token.generate_key(alg, name)
                public_der = token.public_key_der(key_id)
            finally:
                token.close()
        except Pkcs11Error as exc:
            raise KeystoreError(f"PKCS#11 token {pkcs11['token_label']!r}: {exc}") from None
        public_pem = serialization.load_der_public_key(public_der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        item["pkcs11"] = {
            "module": pkcs11["module"],
            "token_label": pkcs11["token_label"],
            "key_id": key_id,
            "pin_file": str(Path(pkcs11["pin_file"]).resolve()),
        }
        private_pem = None
    else:
        key = (
            ec.generate_private_key(ec.SECP256R1())
            if alg == "ES256"
            else rsa.generate_private_key(65537, 2048)
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        item["private_key"] = f"keys/{name}.key.pem"
    with _locked_metadata(root) as meta:
        if private_pem is not None:
            atomic_write(root / item["private_key"], private_pem, 0o600)
        atomic_write(root / item["public_key"], public_pem, 0o644)
        meta["keys"].append(item)
        where = f"{alg} in PKCS#11 token {pkcs11['token_label']}" if pkcs11 else alg
        append_journal(root, "generate", name, None, where)
    return name


def make_csr(
    directory: str | os.PathLike[str],
    name: str,
    subject: str,
    usages: list[str],
    passphrase: bytes,
) -> bytes:
    """A PEM CSR for key *name* (for the national CSCA), with the DCC key-usage OIDs.

    Raises:
        KeystoreError: unknown key, bad subject or usage, wrong passphrase.
    """
    root = Path(directory)
    try:
        name_obj = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        raise KeystoreError(f"--subject {subject!r}: {exc}") from None
    if not usages or any(u not in _USAGE_NAMES for u in usages):
        raise KeystoreError("--usage takes a comma-separated subset of vaccination,test,recovery")
    meta = json.loads((root / METADATA).read_text(encoding="utf-8"))
    item = _find(meta, name)
    oids = {t: oid for oid, t in EKU_OIDS.items() if oid.startswith("1.3.6.1.4.1.1847.")}
    eku_oids = [oids[_USAGE_NAMES[u]] for u in usages]
    if "pkcs11" in item:
        pem = _token_csr(item["pkcs11"], name_obj, eku_oids)
        append_journal(root, "csr", name, None, f"subject={subject}; usage={','.join(usages)}")
        return pem
    path = root / item["private_key"]
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), passphrase)
    except (ValueError, TypeError) as exc:
        raise KeystoreError(f"{path}: cannot decrypt the key (wrong passphrase?): {exc}") from None
    eku = x509.ExtendedKeyUsage([x509.ObjectIdentifier(o) for o in eku_oids])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name_obj)
        .add_extension(eku, critical=False)
        .sign(key, hashes.SHA256())
    )
    append_journal(root, "csr", name, None, f"subject={subject}; usage={','.join(usages)}")
    return csr.public_bytes(serialization.Encoding.PEM)


def _token_csr(info: dict[str, str], subject: x509.Name, eku_oids: list[str]) -> bytes:
    from .pkcs11 import Pkcs11Error, Pkcs11Token, read_pin

    try:
        token = Pkcs11Token.open(info["module"], info["token_label"], read_pin(info["pin_file"]))
        try:
            return token.csr(info["key_id"], subject, eku_oids)
        finally:
            token.close()
    except Pkcs11Error as exc:
        raise KeystoreError(f"PKCS#11 token {info['token_label']!r}: {exc}") from None


def import_cert(directory: str | os.PathLike[str], name: str, cert_bytes: bytes) -> bytes:
    """Attach the DSC issued for key *name*; the key becomes ``inactive``. Returns the kid.

    Raises:
        KeystoreError: not a certificate, a certificate for another key, a kid that collides
            with another key, or a key that is not pending.
    """
    root = Path(directory)
    try:
        dsc = DSC.from_bytes(cert_bytes)
    except ValueError as exc:
        raise KeystoreError(f"not a certificate: {exc}") from None
    with _locked_metadata(root) as meta:
        item = _find(meta, name)
        if item["state"] != "pending":
            raise KeystoreError(f"key {name!r} is {item['state']}; only a pending key takes a DSC")
        public = (root / item["public_key"]).read_bytes()
        mine = serialization.load_pem_public_key(public).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if dsc.public_key_der() != mine:
            raise KeystoreError(f"the certificate's public key is not the public key of {name!r}")
        for e in Keystore.open(root).entries:
            if e.kid == dsc.kid:
                raise KeystoreError(f"kid {dsc.kid.hex()} collides with key {e.name!r}")
        rel = f"certs/{name}.crt.pem"
        atomic_write(root / rel, dsc.pem(), 0o644)
        item["certificate"] = rel
        item["state"] = "inactive"
        append_journal(root, "import-cert", name, dsc.kid, dsc.subject)
    return dsc.kid


def set_state(
    directory: str | os.PathLike[str], kid: bytes, state: str, reason: str | None = None
) -> str:
    """Move the key with *kid* to *state* (see :data:`TRANSITIONS`); returns its old state.

    Raises:
        KeystoreError: unknown kid, or a transition that is not allowed.
    """
    root = Path(directory)
    store = Keystore.open(root)
    entry = store.find(kid)
    with _locked_metadata(root) as meta:
        item = _find(meta, entry.name)
        old = item["state"]
        if old not in TRANSITIONS[state]:
            raise KeystoreError(f"key {kid.hex()} is {old}; it cannot become {state}")
        item["state"] = state
        append_journal(root, state, entry.name, kid, reason)
    return old


def issue_with_dev_csca(
    directory: str | os.PathLike[str], csr_pem: bytes, passphrase: bytes, *, days: int = 730
) -> bytes:
    """Development keystores only: the DSC (PEM) the keystore's own development CSCA issues for
    *csr_pem*, valid from yesterday for *days*, with the extensions the CSR requests.

    It plays the national CSCA in tests, benchmarks and demos; a production keystore has no
    CSCA key.

    Raises:
        KeystoreError: no development CSCA here, a wrong passphrase, or not a CSR.
    """
    root = Path(directory)
    key_path = root / "keys" / "csca.key.pem"
    try:
        ca_key = serialization.load_pem_private_key(key_path.read_bytes(), passphrase)
        ca = x509.load_pem_x509_certificate((root / "certs" / "csca.crt.pem").read_bytes())
    except FileNotFoundError:
        raise KeystoreError(f"{root}: no development CSCA in this keystore") from None
    except (ValueError, TypeError) as exc:
        raise KeystoreError(f"{key_path}: cannot decrypt the CSCA key: {exc}") from None
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise KeystoreError(f"not a CSR: {exc}") from None
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    for ext in csr.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def key_warnings(dsc: DSC, now: dt.datetime | None = None) -> list[str]:
    """Warnings about a DSC's validity and its private key's 6-month usage period."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    if now > dsc.not_after:
        out.append("DSC expired")
    elif dsc.not_after - now < WARN_BEFORE:
        out.append(f"DSC expires in {(dsc.not_after - now).days} days")
    usage_end = dsc.not_before + PRIVATE_KEY_USAGE
    if now > usage_end:
        out.append("private-key usage period (6 months) ended: roll over to a new key")
    elif usage_end - now < WARN_BEFORE:
        out.append(f"private-key usage period ends in {(usage_end - now).days} days")
    return out
