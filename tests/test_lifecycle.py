"""Key lifecycle through the CLI: generate, CSR, import the DSC, activate, retire, disable."""

import datetime as dt
import json
import time

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from dccsign.audit.search import search
from dccsign.cli.main import main
from dccsign.dcc.issuer import claims_prefix
from dccsign.keyd.supervisor import PrivateKeyd
from dccsign.keys.keystore import Keystore, resolve_passphrase
from dccsign.keys.lifecycle import issue_with_dev_csca, key_warnings
from dccsign.protocol.keyd import ItemError
from dccsign.testing.cli import csr_argv
from dccsign.testing.samples import sample


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def issue_dsc(ks, csr_pem, days=730):
    """Play the national CSCA: sign the CSR with the development CSCA of the keystore."""
    assert x509.load_pem_x509_csr(csr_pem).is_signature_valid
    return issue_with_dev_csca(ks, csr_pem, resolve_passphrase(ks), days=days)


def test_full_lifecycle(dev_keystore_copy, tmp_path, capsys):
    ks = dev_keystore_copy
    code, out, _ = run(capsys, "keys", "generate", "--keystore", ks, "--alg", "ES256")
    assert code == 0
    name = out.strip()
    assert name in Keystore.open(ks).pending
    code, out, _ = run(capsys, "keys", "list", "--keystore", ks)
    assert f"pending   {name}" in out

    code, csr_pem, _ = run(
        capsys,
        *csr_argv(ks, name, subject="CN=DSC GP portal 1,O=Ministry,C=NL", usage="vaccination,test"),
    )
    assert code == 0
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [o.dotted_string for o in eku] == [
        "1.3.6.1.4.1.1847.2021.1.2",
        "1.3.6.1.4.1.1847.2021.1.1",
    ]
    cert = tmp_path / "dsc.pem"
    cert.write_bytes(issue_dsc(ks, csr_pem.encode()))
    # A certificate for another key is refused.
    other = tmp_path / "other.pem"
    other.write_bytes((ks / "certs" / "dev-ps256.crt.pem").read_bytes())
    code, _, err = run(capsys, "keys", "import-cert", "--keystore", ks, "--key", name, other)
    assert code == 4 and "not the public key" in err
    code, out, _ = run(capsys, "keys", "import-cert", "--keystore", ks, "--key", name, cert)
    assert code == 0
    kid = out.strip()
    entry = Keystore.open(ks).find(bytes.fromhex(kid))
    assert entry.state == "inactive" and entry.dsc.usages == frozenset("vt")

    now = int(time.time())
    payload = claims_prefix("NL", now - 3600, now + 86400) + cbor2.dumps(sample("v"))
    with PrivateKeyd(ks) as keyd, keyd.client() as client:
        sign = lambda: client.sign(bytes.fromhex(kid), [payload], client="c", account="a")[0]  # noqa: E731
        assert sign() == (ItemError.KID_NOT_ACTIVE, "key is inactive")
        assert run(capsys, "keys", "activate", "--keystore", ks, "--kid", kid)[0] == 0
        assert _eventually(lambda: isinstance(sign(), bytes))
        code, _, _ = run(
            capsys, "keys", "disable", "--keystore", ks, "--kid", kid, "--reason", "account abused"
        )
        assert code == 0
        # The emergency stop reaches the running keyd within a second.
        t0 = time.monotonic()
        assert _eventually(lambda: sign() == (ItemError.KID_NOT_ACTIVE, "key is disabled"))
        assert time.monotonic() - t0 < 1.5
    code, _, err = run(capsys, "keys", "activate", "--keystore", ks, "--kid", kid)
    assert code == 4 and "cannot become active" in err
    events = [r for r in search(ks / "audit", kinds=("key",))]
    actions = [e.get("action") for e in events]
    for action in ("init-dev", "generate", "csr", "import-cert", "active", "disabled"):
        assert action in actions, actions
    assert any("account abused" in (e.get("reason") or "") for e in events)


def _eventually(check, timeout=1.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("start", "verb", "ok"),
    [
        ("active", "activate", False),
        ("active", "retire", True),
        ("retired", "activate", False),
        ("retired", "disable", True),
        ("disabled", "activate", False),
        ("disabled", "retire", False),
    ],
)
def test_transitions(dev_keystore_copy, capsys, start, verb, ok):
    ks = dev_keystore_copy
    meta = json.loads((ks / "keystore.json").read_text())
    meta["keys"][0]["state"] = start
    (ks / "keystore.json").write_text(json.dumps(meta))
    kid = Keystore.open(ks).entries[0].kid.hex()
    code, _, _ = run(capsys, "keys", verb, "--keystore", ks, "--kid", kid)
    assert (code == 0) == ok


def test_warnings():
    from dccsign.bench.core import ephemeral_certificate
    from dccsign.dcc.dsc import DSC

    dsc = DSC.from_certificate(ephemeral_certificate()[1])  # notBefore yesterday, 30 days valid
    assert key_warnings(dsc) == [
        f"DSC expires in {(dsc.not_after - dt.datetime.now(dt.UTC)).days} days"
    ]
    later = dsc.not_before + dt.timedelta(days=170)
    assert any("usage period ends in" in w for w in key_warnings(dsc, later))
    assert "DSC expired" in key_warnings(dsc, dsc.not_after + dt.timedelta(seconds=1))


def test_generate_and_csr_errors(dev_keystore_copy, capsys):
    ks = dev_keystore_copy
    name = run(capsys, "keys", "generate", "--keystore", ks, "--alg", "PS256")[1].strip()
    for key, subject, usage, msg in (
        (name, "CN=x", "boosters", "vaccination,test,recovery"),
        (name, "not a dn", "test", "--subject"),
        ("nope", "CN=x", "test", "no key named"),
    ):
        code, _, err = run(capsys, *csr_argv(ks, key, subject=subject, usage=usage))
        assert code == 4 and msg in err


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_hand_built_csr_is_valid_pkcs10(kind):
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    from dccsign.keys.csr import ECDSA_SHA256, RSA_SHA256, build_csr

    if kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
        sign, alg = (lambda info: key.sign(info, ec.ECDSA(hashes.SHA256()))), ECDSA_SHA256
    else:
        key = rsa.generate_private_key(65537, 2048)
        sign, alg = (lambda info: key.sign(info, padding.PKCS1v15(), hashes.SHA256())), RSA_SHA256
    subject = x509.Name.from_rfc4514_string("CN=Ünïcode DSC,O=Ministry,C=NL")
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    oids = ["1.3.6.1.4.1.1847.2021.1.2", "1.3.6.1.4.1.1847.2021.1.3"]
    csr = x509.load_der_x509_csr(build_csr(subject, spki, oids, alg, sign))
    assert csr.is_signature_valid
    assert csr.subject == subject
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert [o.dotted_string for o in eku.value] == oids and not eku.critical
