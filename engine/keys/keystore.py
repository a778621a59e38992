"""The keystore directory: encrypted private keys, their DSCs, and a small metadata file.

Layout::

    DIR/keystore.json          metadata (format, issuer country override, keys and states)
    DIR/keys/NAME.key.pem      PKCS#8, encrypted with the keystore passphrase (mode 0600)
    DIR/certs/NAME.crt.pem     the DSC of that key
    DIR/certs/csca.crt.pem     the CSCA that issued the DSCs (development keystores)
    DIR/dev-passphrase         development keystores only (mode 0600)

The kid of a key is computed from its DSC when the keystore is opened; the metadata never
holds one. The passphrase comes from ``DCCSIGN_KEYSTORE_PASSPHRASE``, else from the file named
by ``DCCSIGN_KEYSTORE_PASSPHRASE_FILE``, else from ``DIR/dev-passphrase``.

Private keys are decrypted only by :meth:`Keystore.load_signing_key`, straight into the native
core's :class:`SigningKey`, which has no way to give them back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..dcc.dsc import DSC, EKU_OIDS
from ..errors import KeystoreError
from .storage import append_journal, atomic_write

__all__ = [
    "KEY_STATES",
    "KeyEntry",
    "Keystore",
    "init_dev",
    "resolve_passphrase",
]

METADATA = "keystore.json"
FORMAT = 1
KEY_STATES = ("pending", "inactive", "active", "retired", "disabled")
DEV_PASSPHRASE = "dev-passphrase"


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key of the keystore (public facts only)."""

    name: str
    state: str
    key_path: Path | None  # the encrypted PKCS#8 file of a software key
    cert_path: Path
    dsc: DSC
    pkcs11: dict[str, str] | None = None  # module, token_label, key_id, pin_file of a token key
    clients: frozenset[str] | None = None  # clients allowed to sign with it; None: every client

    @property
    def kid(self) -> bytes:
        return self.dsc.kid


def resolve_passphrase(directory: Path) -> bytes:
    """Find the keystore passphrase (see the module docstring for the order).

    Raises:
        KeystoreError: no source provides one, or the named file cannot be read.
    """
    env = os.environ.get("DCCSIGN_KEYSTORE_PASSPHRASE")
    if env:
        return env.encode()
    candidates: list[Path] = []
    if os.environ.get("DCCSIGN_KEYSTORE_PASSPHRASE_FILE"):
        candidates.append(Path(os.environ["DCCSIGN_KEYSTORE_PASSPHRASE_FILE"]))
    else:
        candidates.append(directory / DEV_PASSPHRASE)
    for path in candidates:
        try:
            value = path.read_bytes().rstrip(b"\r\n")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise KeystoreError(
                f"{path}: cannot read the passphrase file: {exc.strerror}"
            ) from None
        if not value:
            raise KeystoreError(f"{path}: the passphrase file is empty")
        return value
    raise KeystoreError(
        f"{directory}: no keystore passphrase: set DCCSIGN_KEYSTORE_PASSPHRASE or "
        "DCCSIGN_KEYSTORE_PASSPHRASE_FILE"
    )


class Keystore:
    """An opened keystore directory (certificates parsed, private keys still encrypted)."""

    def __init__(self, directory: Path, entries: list[KeyEntry], issuer_country: str | None):
        self.directory = directory
        self.entries = entries
        self.issuer_country = issuer_country
        #: names of generated keys still waiting for their DSC
        self.pending: list[str] = []

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Keystore:
        """Read the metadata and every DSC.

        Raises:
            KeystoreError: a missing or malformed file (named in the message), two keys with
                the same kid, or an unknown key state.
        """
        root = Path(directory)
        meta_path = root / METADATA
        meta = _read_metadata(meta_path)
        keys = meta.get("keys")
        if not isinstance(keys, list):
            raise KeystoreError(f"{meta_path}: 'keys' must be a list")
        country = meta.get("issuer_country")
        _check_issuer_country(meta_path, country)
        entries: list[KeyEntry] = []
        seen: dict[bytes, str] = {}
        pending: list[str] = []
        for i, item in enumerate(keys):
            _check_key_item(meta_path, i, item)
            if item.get("certificate") is None:
                # Generated, waiting for its DSC: not usable for anything until import-cert.
                if item["state"] != "pending":
                    raise KeystoreError(
                        f"{meta_path}: keys[{i}] has no certificate but is {item['state']}"
                    )
                pending.append(item["name"])
                continue
            entries.append(_certified_entry(root, meta_path, i, item, seen))
        store = cls(root, entries, country)
        store.pending = pending
        return store

    def find(self, kid: bytes) -> KeyEntry:
        """The entry with this kid.

        Raises:
            KeystoreError: no such kid.
        """
        for entry in self.entries:
            if entry.kid == kid:
                return entry
        raise KeystoreError(f"{self.directory}: no key with kid {kid.hex()}")

    def load_signing_key(self, entry: KeyEntry, passphrase: bytes, impl: ModuleType):
        """*entry*'s signing key: decrypted into *impl*'s ``SigningKey``, or a token key.

        Token keys are checked by :meth:`dccsign.keys.pkcs11.Pkcs11Token.signing_key` (sensitive,
        never extractable, sign-only, matching the DSC); one token session per process.

        Raises:
            KeystoreError: wrong passphrase or corrupt key file (named), a private key that
                does not belong to the DSC, or a token key that fails its checks.
        """
        from ..native import KeyLoadError

        if entry.pkcs11 is not None:
            return self._token_key(entry)
        assert entry.key_path is not None
        try:
            pem = entry.key_path.read_bytes()
        except OSError as exc:
            raise KeystoreError(f"{entry.key_path}: cannot read the key: {exc.strerror}") from None
        try:
            key = impl.SigningKey.load_pem(pem, passphrase)
        except KeyLoadError as exc:
            raise KeystoreError(f"{entry.key_path}: {exc}") from None
        if key.public_key_der() != entry.dsc.public_key_der():
            raise KeystoreError(
                f"{entry.key_path}: the private key does not match its DSC {entry.cert_path}"
            )
        return key

    def _token_key(self, entry: KeyEntry):
        from .pkcs11 import Pkcs11Error, Pkcs11Token, read_pin

        info = entry.pkcs11
        assert info is not None
        where = f"key {entry.name!r} (PKCS#11 token {info['token_label']!r})"
        tokens = self.__dict__.setdefault("_tokens", {})
        try:
            token = tokens.get((info["module"], info["token_label"]))
            if token is None:
                pin = read_pin(info["pin_file"])
                token = Pkcs11Token.open(info["module"], info["token_label"], pin)
                tokens[(info["module"], info["token_label"])] = token
            return token.signing_key(info["key_id"], entry.dsc.public_key_der())
        except Pkcs11Error as exc:
            raise KeystoreError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------- reading


def _read_metadata(meta_path: Path) -> dict:
    """The parsed metadata file, checked for its format.

    Raises:
        KeystoreError: the file is missing, unreadable, not JSON, or of another format.
    """
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeystoreError(
            f"{meta_path}: not a keystore (create one with 'dccsign keys init-dev')"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeystoreError(f"{meta_path}: unreadable keystore metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KeystoreError(f"{meta_path}: unsupported keystore format (expected {FORMAT})")
    return meta


def _check_issuer_country(meta_path: Path, country: object) -> None:
    """Raises KeystoreError unless *country* is None or an ISO 3166-1 alpha-2 code."""
    if country is not None and not (
        isinstance(country, str) and len(country) == 2 and country.isascii() and country.isupper()
    ):
        raise KeystoreError(f"{meta_path}: 'issuer_country' must be an ISO 3166-1 alpha-2 code")


def _check_key_item(meta_path: Path, i: int, item: object) -> None:
    """Check the fields of ``keys[i]`` every key has: name, state, and where its key lives.

    Raises:
        KeystoreError: a missing or mistyped field, or an unknown state.
    """
    if not isinstance(item, dict) or not all(
        isinstance(item.get(k), str) for k in ("name", "state")
    ):
        raise KeystoreError(f"{meta_path}: keys[{i}] needs string fields name, state")
    token = item.get("pkcs11")
    if token is not None:
        if not (
            isinstance(token, dict)
            and all(
                isinstance(token.get(k), str)
                for k in ("module", "token_label", "key_id", "pin_file")
            )
        ):
            raise KeystoreError(
                f"{meta_path}: keys[{i}].pkcs11 needs module, token_label, key_id, pin_file"
            )
    elif not isinstance(item.get("private_key"), str):
        raise KeystoreError(f"{meta_path}: keys[{i}] needs private_key or pkcs11")
    if item["state"] not in KEY_STATES:
        raise KeystoreError(
            f"{meta_path}: keys[{i}] has state {item['state']!r}; expected one of "
            f"{', '.join(KEY_STATES)}"
        )


def _certified_entry(
    root: Path, meta_path: Path, i: int, item: dict, seen: dict[bytes, str]
) -> KeyEntry:
    """The entry of ``keys[i]``, a key that has its DSC; records its kid in *seen*.

    Raises:
        KeystoreError: a pending key with a certificate, an unreadable or invalid DSC, a kid
            already in *seen*, or a malformed client list.
    """
    if not isinstance(item["certificate"], str) or item["state"] == "pending":
        raise KeystoreError(f"{meta_path}: keys[{i}]: a pending key has no certificate")
    cert_path = root / item["certificate"]
    try:
        dsc = DSC.from_bytes(cert_path.read_bytes())
    except OSError as exc:
        raise KeystoreError(f"{cert_path}: cannot read the DSC: {exc.strerror}") from None
    except ValueError as exc:
        raise KeystoreError(f"{cert_path}: not a valid certificate: {exc}") from None
    if dsc.kid in seen:
        # Truncated kids can collide (spec notes §4.28); a signer must not create
        # that ambiguity itself.
        raise KeystoreError(f"{cert_path}: kid {dsc.kid.hex()} collides with key {seen[dsc.kid]!r}")
    seen[dsc.kid] = item["name"]
    clients = item.get("clients")
    if clients is not None and not (
        isinstance(clients, list) and all(isinstance(c, str) for c in clients)
    ):
        raise KeystoreError(f"{meta_path}: keys[{i}].clients must be a list of strings")
    token = item.get("pkcs11")
    key_path = root / item["private_key"] if token is None else None
    return KeyEntry(
        item["name"],
        item["state"],
        key_path,
        cert_path,
        dsc,
        token,
        frozenset(clients) if clients is not None else None,
    )


# ----------------------------------------------------------------------------- creation


def _name(country: str, cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, country),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dccsign DEVELOPMENT ONLY"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _eku_for(types: str) -> list[x509.ObjectIdentifier]:
    by_type = {t: oid for oid, t in EKU_OIDS.items() if oid.startswith("1.3.6.1.4.1.1847.")}
    return [x509.ObjectIdentifier(by_type[t]) for t in types]


# name, algorithm, DCC types the EKU limits it to ("" = no EKU, all types)
DEV_KEYS = (
    ("dev-es256-vaccination", "ES256", "v"),
    ("dev-es256-test", "ES256", "t"),
    ("dev-es256-recovery", "ES256", "r"),
    ("dev-ps256", "PS256", ""),
)


def _dev_csca(
    country: str, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Name, x509.Certificate]:
    """A fresh development CSCA for *country*: its key, its name and its certificate."""
    csca_key = ec.generate_private_key(ec.SECP256R1())
    csca_name = _name(country, f"dccsign DEVELOPMENT CSCA {country}")
    csca = (
        x509.CertificateBuilder()
        .subject_name(csca_name)
        .issuer_name(csca_name)
        .public_key(csca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=4 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csca_key.public_key()), False)
        .sign(csca_key, hashes.SHA256())
    )
    return csca_key, csca_name, csca


def _dev_dsc(
    country: str,
    alg: str,
    types: str,
    csca_key: ec.EllipticCurvePrivateKey,
    csca_name: x509.Name,
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, x509.Certificate]:
    """A fresh development signing key of *alg* and its DSC, issued by the CSCA.

    The DSC's EKU limits it to the DCC *types* ("" = no EKU, all types).
    """
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    key = (
        ec.generate_private_key(ec.SECP256R1())
        if alg == "ES256"
        else (rsa.generate_private_key(65537, 2048))
    )
    label = {"v": "vaccination", "t": "test", "r": "recovery"}.get(types, "all types")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(country, f"dccsign DEVELOPMENT DSC {alg} {label}"))
        .issuer_name(csca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2 * 365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(csca_key.public_key()), False
        )
    )
    if types:
        builder = builder.add_extension(x509.ExtendedKeyUsage(_eku_for(types)), critical=False)
    return key, builder.sign(csca_key, hashes.SHA256())


def _pem_files(
    name: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    cert: x509.Certificate,
    encryption: serialization.KeySerializationEncryption,
) -> dict[str, tuple[bytes, int]]:
    """The certificate and encrypted key files of *name*: relative path -> (bytes, mode)."""
    return {
        f"certs/{name}.crt.pem": (cert.public_bytes(serialization.Encoding.PEM), 0o644),
        f"keys/{name}.key.pem": (
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            ),
            0o600,
        ),
    }


def _prepare_new_directory(root: Path, country: str) -> None:
    """Create *root* (mode 0700) for a new keystore.

    Raises:
        KeystoreError: *country* is not two upper-case letters, or *root* is not empty.
    """
    if not (len(country) == 2 and country.isascii() and country.isalpha() and country.isupper()):
        raise KeystoreError(f"--country must be an ISO 3166-1 alpha-2 code, not {country!r}")
    if root.exists() and any(root.iterdir()):
        raise KeystoreError(f"{root}: directory is not empty; refusing to overwrite it")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)


def _write_dev_keystore(
    root: Path, files: dict[str, tuple[bytes, int]], passphrase: bytes, meta_keys: list[dict]
) -> None:
    """Write the key and certificate *files*, the passphrase, and last the metadata."""
    (root / "keys").mkdir(mode=0o700)
    (root / "certs").mkdir(mode=0o755)
    for rel, (data, mode) in files.items():
        atomic_write(root / rel, data, mode)
    atomic_write(root / DEV_PASSPHRASE, passphrase + b"\n", 0o600)
    meta = {
        "format": FORMAT,
        "issuer_country": None,
        "csca": "certs/csca.crt.pem",
        "keys": meta_keys,
    }
    # The metadata is written last: a keystore interrupted half-way is not openable.
    atomic_write(root / METADATA, (json.dumps(meta, indent=2) + "\n").encode(), 0o644)


def init_dev(
    directory: str | os.PathLike[str], country: str = "NL", *, now: dt.datetime | None = None
) -> Keystore:
    """Create a development keystore: a CSCA and four DSCs (see :data:`DEV_KEYS`).

    Every subject says DEVELOPMENT. DSCs are valid from one day ago for two years, so an
    ``iat`` backdated by the default hour is inside their validity.

    Raises:
        KeystoreError: *directory* already holds a keystore or other files (nothing is
            overwritten), or *country* is not two upper-case letters.
    """
    root = Path(directory)
    _prepare_new_directory(root, country)
    now = now or dt.datetime.now(dt.UTC)
    passphrase = secrets.token_urlsafe(32).encode()
    encryption = serialization.BestAvailableEncryption(passphrase)

    csca_key, csca_name, csca = _dev_csca(country, now)
    files = _pem_files("csca", csca_key, csca, encryption)
    meta_keys = []
    for name, alg, types in DEV_KEYS:
        key, cert = _dev_dsc(country, alg, types, csca_key, csca_name, now)
        files.update(_pem_files(name, key, cert, encryption))
        meta_keys.append(
            {
                "name": name,
                "private_key": f"keys/{name}.key.pem",
                "certificate": f"certs/{name}.crt.pem",
                "state": "active",
            }
        )
    _write_dev_keystore(root, files, passphrase, meta_keys)
    store = Keystore.open(root)
    # Key operations reach the audit log through the journal (dccsign.keys.lifecycle), these too.

    for entry in store.entries:
        append_journal(root, "init-dev", entry.name, entry.kid, f"development key, {entry.state}")
    return store
