"""keyd with keys that live in a PKCS#11 token (SoftHSM2): generate in the token, import the
DSC, activate, sign through keyd, verify.

Every token operation runs in a child process: a process holds one token session
(dccsign.keys.pkcs11), and this test process may already hold one (tests/test_pkcs11.py).
"""

import os
import shutil
import subprocess
import sys
import time

import cbor2
import pytest
from cryptography import x509

from conftest import IN_CI
from dccsign import native
from dccsign.audit.search import search
from dccsign.audit.verify import verify
from dccsign.cli.main import main
from dccsign.dcc.dsc import DSC
from dccsign.dcc.issuer import claims_prefix
from dccsign.dcc.verify import verify_hc1
from dccsign.keyd.supervisor import PrivateKeyd
from dccsign.keys.keystore import resolve_passphrase
from dccsign.keys.lifecycle import issue_with_dev_csca
from dccsign.testing.cli import csr_argv, token_generate_argv
from dccsign.testing.samples import sample

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DCCSIGN = [sys.executable, "-m", "dccsign"]


@pytest.fixture
def softhsm(tmp_path, monkeypatch):
    util = shutil.which("softhsm2-util")
    if util is None or not os.path.exists(MODULE):
        if IN_CI:
            pytest.fail("SoftHSM2 is required in CI (Debian package softhsm2)")
        pytest.skip("SoftHSM2 not installed (apt-get install softhsm2)")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\nlibrary.reset_on_fork = true\n"
    )
    # Children (the CLI, keyd) read it; this process's own SoftHSM, if loaded, is unaffected.
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            "dsc-token",
            "--so-pin",
            "87654321",
            "--pin",
            "246810",
        ],
        check=True,
        capture_output=True,
    )
    pin = tmp_path / "pin"
    pin.write_text("246810\n")
    pin.chmod(0o600)
    return pin


def _issue(ks, csr_pem):
    """Play the CSCA: check the CSR and issue the DSC it asks for."""
    assert x509.load_pem_x509_csr(csr_pem).is_signature_valid
    return issue_with_dev_csca(ks, csr_pem, resolve_passphrase(ks), days=90)


def _cli(*argv):
    """dccsign in a child process (the token session is per process)."""
    proc = subprocess.run([*DCCSIGN, *map(str, argv)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


@pytest.mark.parametrize("alg", ["ES256", "PS256"])
def test_token_key_signs_through_keyd(dev_keystore_copy, tmp_path, softhsm, capsys, alg):
    ks = dev_keystore_copy
    name = (
        _cli(*token_generate_argv(ks, module=MODULE, label="dsc-token", pin_file=softhsm, alg=alg))
        .decode()
        .strip()
    )
    assert not (ks / "keys" / f"{name}.key.pem").exists()  # nothing of the key is on disk
    csr_pem = _cli(
        *csr_argv(
            ks,
            name,
            subject="CN=DSC in token,O=dccsign DEVELOPMENT ONLY,C=NL",
            usage="vaccination,test,recovery",
        )
    )
    eku = (
        x509.load_pem_x509_csr(csr_pem)
        .extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        .value
    )
    assert len(list(eku)) == 3
    cert = tmp_path / "dsc.pem"
    cert.write_bytes(_issue(ks, csr_pem))
    assert main(["keys", "import-cert", "--keystore", str(ks), "--key", name, str(cert)]) == 0
    kid = capsys.readouterr().out.strip()
    assert main(["keys", "activate", "--keystore", str(ks), "--kid", kid]) == 0
    now = int(time.time())
    payloads = [
        claims_prefix("NL", now - 3600, now + 86400) + cbor2.dumps(sample(t)) for t in "vtr" * 10
    ]
    with PrivateKeyd(ks) as keyd, keyd.client() as client:
        sigs = client.sign(bytes.fromhex(kid), payloads, client="c", account="token-user")
    assert all(isinstance(s, bytes) for s in sigs)
    dsc = DSC.from_bytes(cert.read_bytes())
    protected = native.protected_header(dsc.alg, dsc.kid)
    for text in native.hc1_encode(protected, payloads, sigs):
        assert verify_hc1(text, [dsc]).valid
    assert len(list(search(ks / "audit", account="token-user"))) == 30
    assert verify(ks / "audit").ok


def test_pin_is_never_in_the_metadata(dev_keystore_copy, softhsm):
    ks = dev_keystore_copy
    subprocess.run(
        [*DCCSIGN, *token_generate_argv(ks, module=MODULE, label="dsc-token", pin_file=softhsm)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert b"246810" not in (ks / "keystore.json").read_bytes()
    assert b"246810" not in (ks / "key-events.jsonl").read_bytes()


def test_wrong_pin_is_a_clear_error(dev_keystore_copy, softhsm, tmp_path):
    bad = tmp_path / "bad-pin"
    bad.write_text("000000\n")
    proc = subprocess.run(
        [
            *DCCSIGN,
            *token_generate_argv(dev_keystore_copy, module=MODULE, label="dsc-token", pin_file=bad),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 4 and b"dsc-token" in proc.stderr and b"000000" not in proc.stderr
