"""The PKCS#11 key backend against a SoftHSM2 token created for this test session.

The token lives in a temporary directory (``SOFTHSM2_CONF`` points at a generated config).
Without ``softhsm2-util`` or the SoftHSM2 module the tests skip, except under ``CI=true``,
where that is a failure: CI must exercise the HSM path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import cbor2
import pkcs11 as p11
import pkcs11.exceptions as p11e
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from conftest import IN_CI
from dccsign import native
from dccsign.dcc.dsc import DSC
from dccsign.dcc.verify import verify_hc1
from dccsign.keys.pkcs11 import Pkcs11Error, Pkcs11SigningKey, Pkcs11Token, read_pin
from dccsign.testing.samples import varied_samples

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
PIN = b"8152-dcc-user"
SO_PIN = "90817263"
WRONG_PIN = b"wrong-pin-93517"
LABEL = "dcc-test"
PIN_LABEL = "dcc-pin"  # a second token, never left logged in: for PIN and lifecycle tests
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
PSS_32 = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(f"{message} (required under CI=true)")
    pytest.skip(message)


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hsm(tmp_path_factory):
    """A SoftHSM2 config with two fresh tokens; SOFTHSM2_CONF is set for the session."""
    util = shutil.which("softhsm2-util")
    if util is None:
        _unavailable("softhsm2-util not found (Debian package softhsm2)")
    env_module = os.environ.get("DCCSIGN_PKCS11_MODULE")
    candidates = (env_module,) if env_module else MODULE_CANDIDATES
    module = next((m for m in candidates if os.path.isfile(m)), None)
    if module is None:
        _unavailable(f"SoftHSM2 PKCS#11 module not found (looked for {', '.join(candidates)})")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
        "library.reset_on_fork = true\n"
    )
    saved = os.environ.get("SOFTHSM2_CONF")
    # Set before the module is first loaded: SoftHSM2 reads it in C_Initialize. Worker
    # processes started by the tests inherit it.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in (LABEL, PIN_LABEL):
        init = ["--init-token", "--free", "--label", label, "--so-pin", SO_PIN]
        subprocess.run(
            [util, *init, "--pin", PIN.decode()],
            check=True,
            capture_output=True,
        )
    pin_file = root / "pin"
    pin_file.write_bytes(PIN + b"\n")
    pin_file.chmod(0o600)
    yield SimpleNamespace(module=module, conf=conf, root=root, pin_file=pin_file)
    if saved is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = saved


@pytest.fixture(scope="session")
def token(hsm):
    tok = Pkcs11Token.open(hsm.module, LABEL, PIN)
    yield tok
    tok.close()


@pytest.fixture(scope="session")
def key_ids(token):
    return {alg: token.generate_key(alg, f"dsc-{alg.lower()}") for alg in ("ES256", "PS256")}


@pytest.fixture(scope="session")
def ca():
    """A throw-away CSCA key: the token keys sign nothing but DCCs."""
    return ec.generate_private_key(ec.SECP256R1())


def issue_dsc(ca_key, public_key_der: bytes) -> DSC:
    """A DSC for *public_key_der*, issued by *ca_key*, valid from yesterday for a year."""
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "NL"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "DSC test (SoftHSM2)"),
                ]
            )
        )
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CSCA test")]))
        .public_key(serialization.load_der_public_key(public_key_der))
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )
    return DSC.from_certificate(cert)


@pytest.fixture(scope="session")
def dscs(token, key_ids, ca):
    return {alg: issue_dsc(ca, token.public_key_der(kid)) for alg, kid in key_ids.items()}


@pytest.fixture(scope="session")
def keys(token, key_ids, dscs):
    return {alg: token.signing_key(key_ids[alg], dscs[alg].public_key_der()) for alg in key_ids}


def cwt(dcc: dict) -> bytes:
    now = int(time.time())
    return cbor2.dumps({1: "NL", 4: now + 86400, 6: now - 60, -260: {1: dcc}})


def verify_es256(public_key, tbs: bytes, sig: bytes) -> None:
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    public_key.verify(der, tbs, ec.ECDSA(hashes.SHA256()))


def verify_any(key: Pkcs11SigningKey, protected: bytes, payload: bytes, sig: bytes) -> None:
    public_key = serialization.load_der_public_key(key.public_key_der())
    tbs = native.sig_structure(protected, payload)
    if key.alg == native.ES256:
        verify_es256(public_key, tbs, sig)
    else:
        public_key.verify(sig, tbs, PSS_32, hashes.SHA256())


def raw_keypair(token: Pkcs11Token, **private_overrides: bool) -> str:
    """An EC P-256 pair made straight through python-pkcs11, bypassing generate_key's template.

    Deliberately weak keys for the refusal tests; returns the key id.
    """
    key_id = os.urandom(16)
    private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True}
    private.update({getattr(Attribute, k.upper()): v for k, v in private_overrides.items()})
    with token._module.lock:
        token._session.generate_keypair(
            KeyType.EC,
            id=key_id,
            label="weak",
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")},
            private_template=private,
        )
    return key_id.hex()


def private_object(token: Pkcs11Token, key_id: str):
    with token._module.lock:
        return token._find(ObjectClass.PRIVATE_KEY, bytes.fromhex(key_id), key_id)


# ---- key generation and attributes -----------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "PS256"])
def test_generated_key_is_protected_and_sign_only(token, key_ids, alg):
    key_id = key_ids[alg]
    assert len(key_id) == 32 and bytes.fromhex(key_id)
    priv = private_object(token, key_id)
    with token._module.lock:
        attrs = {a: priv[a] for a in (
            Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE, Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL, Attribute.SIGN,
            Attribute.SIGN_RECOVER, Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE,
            Attribute.MODIFIABLE, Attribute.COPYABLE,
        )}  # fmt: skip
        secret = Attribute.VALUE if alg == "ES256" else Attribute.PRIVATE_EXPONENT
        with pytest.raises(p11e.AttributeSensitive):
            priv[secret]
        # Not modifiable: a usage cannot be switched on afterwards.
        with pytest.raises(p11e.PKCS11Error):
            priv[Attribute.DECRYPT] = True
    assert attrs == {
        Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
        Attribute.ALWAYS_SENSITIVE: True, Attribute.EXTRACTABLE: False,
        Attribute.NEVER_EXTRACTABLE: True, Attribute.LOCAL: True, Attribute.SIGN: True,
        Attribute.SIGN_RECOVER: False, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
        Attribute.DERIVE: False, Attribute.MODIFIABLE: False, Attribute.COPYABLE: False,
    }  # fmt: skip
    public = serialization.load_der_public_key(token.public_key_der(key_id))
    if alg == "ES256":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
    else:
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048


def test_signing_key_has_the_software_key_interface(keys):
    for key in keys.values():
        for name in ("alg", "public_key_der", "sign"):
            assert hasattr(key, name)
        assert not any(
            word in name.lower() for name in dir(key) for word in ("private", "export", "value")
        )
        with pytest.raises(TypeError):
            pickle.dumps(key)
    assert keys["ES256"].alg == native.ES256 and keys["PS256"].alg == native.PS256
    with pytest.raises(TypeError):
        Pkcs11SigningKey()
    with pytest.raises(TypeError):
        Pkcs11Token()


def test_generate_key_rejects_bad_arguments(token):
    with pytest.raises(Pkcs11Error, match="unknown algorithm"):
        token.generate_key("ES384", "x")
    with pytest.raises(Pkcs11Error, match="label"):
        token.generate_key("ES256", "")
    with pytest.raises(Pkcs11Error, match="malformed key id"):
        token.public_key_der("not-hex")
    with pytest.raises(Pkcs11Error, match="no public key with id"):
        token.public_key_der("00" * 16)


# ---- signatures -------------------------------------------------------------------------------


def test_es256_raw_64_bytes_low_s_and_verify(token, keys, dscs):
    key = keys["ES256"]
    public = serialization.load_der_public_key(key.public_key_der())
    protected = native.protected_header(native.ES256, dscs["ES256"].kid)
    payloads = [b"payload %d " % i * 7 for i in range(520)]
    sigs = key.sign(protected, payloads[:500]) + [
        key.sign(protected, [p])[0] for p in payloads[500:]
    ]
    assert len(sigs) == len(payloads)
    for payload, sig in zip(payloads, sigs, strict=True):
        assert len(sig) == 64
        assert 0 < int.from_bytes(sig[32:], "big") <= N // 2
        verify_es256(public, native.sig_structure(protected, payload), sig)
    # The token itself does not normalise: about half of its raw signatures are high-S, so
    # the all-low result above is the backend's work.
    priv = private_object(token, token_key_id(token, key))
    with token._module.lock:
        raw = [priv.sign(os.urandom(32), mechanism=Mechanism.ECDSA) for _ in range(64)]
    assert any(int.from_bytes(r[32:], "big") > N // 2 for r in raw)


def token_key_id(token, key: Pkcs11SigningKey) -> str:
    with token._module.lock:
        return key._key[Attribute.ID].hex()


def test_ps256_uses_salt_32(keys, dscs):
    key = keys["PS256"]
    public = serialization.load_der_public_key(key.public_key_der())
    protected = native.protected_header(native.PS256, dscs["PS256"].kid)
    payloads = [b"ps256 %d" % i for i in range(8)]
    for payload, sig in zip(payloads, key.sign(protected, payloads), strict=True):
        assert len(sig) == 256
        tbs = native.sig_structure(protected, payload)
        public.verify(sig, tbs, PSS_32, hashes.SHA256())
        # A verifier that demands the maximum salt length (222 bytes here; what cryptography
        # suggests for signing, and what DCC verifiers reject) refuses it: the salt really is
        # 32 bytes. (cryptography's PSS.MAX_LENGTH *auto-detects* on verify, so spell it out.)
        longest = padding.calculate_max_pss_salt_length(public, hashes.SHA256())
        assert longest == 222
        max_salt = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=longest)
        with pytest.raises(InvalidSignature):
            public.verify(sig, tbs, max_salt, hashes.SHA256())


@pytest.mark.parametrize("alg", ["ES256", "PS256"])
def test_hc1_from_token_signatures_verifies(keys, dscs, alg):
    key, dsc = keys[alg], dscs[alg]
    protected = native.protected_header(key.alg, dsc.kid)
    payloads = [cwt(dcc) for dcc in varied_samples(12)]
    texts = native.hc1_encode(protected, payloads, key.sign(protected, payloads))
    for text in texts:
        result = verify_hc1(text, [dsc])
        assert result.valid, result.errors
        assert result.alg == alg and result.kid == dsc.kid.hex()
    # ... and not under the other algorithm's DSC (another key, another kid).
    other = dscs["PS256" if alg == "ES256" else "ES256"]
    assert not verify_hc1(texts[0], [other]).valid


def test_non_canonical_protected_header_is_refused(keys, dscs):
    es, ps = keys["ES256"], keys["PS256"]
    kid = dscs["ES256"].kid
    good = native.protected_header(native.ES256, kid)
    for protected in (
        native.protected_header(native.PS256, kid),  # another algorithm
        b"",
        good[:-1],
        good + b"\x00",
        cbor2.dumps({1: -7, 4: kid, 3: "application/cwt"}),
        bytearray(good),
    ):
        with pytest.raises(ValueError, match="canonical"):
            es.sign(protected, [b"x"])
    with pytest.raises(ValueError, match="canonical"):
        ps.sign(good, [b"x"])
    with pytest.raises(TypeError, match="payload 1 must be bytes"):
        es.sign(good, [b"x", "y"])


# ---- refusals -----------------------------------------------------------------------------------


def test_dsc_with_another_public_key_is_refused(token, key_ids, dscs, ca):
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    other_der = stranger.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for kid, dsc_der in (
        (key_ids["ES256"], issue_dsc(ca, other_der).public_key_der()),
        (key_ids["ES256"], dscs["PS256"].public_key_der()),
        (key_ids["PS256"], dscs["ES256"].public_key_der()),
    ):
        with pytest.raises(Pkcs11Error, match="not the DSC's public key"):
            token.signing_key(kid, dsc_der)
    with pytest.raises(Pkcs11Error, match="not a DER SubjectPublicKeyInfo"):
        token.signing_key(key_ids["ES256"], b"\x30\x03garbage")
    with pytest.raises(Pkcs11Error, match="no private key with id"):
        token.signing_key("ab" * 16, dscs["ES256"].public_key_der())


def _flip(token, key_id: str, attr: Attribute, value: bool) -> None:
    priv = private_object(token, key_id)
    with token._module.lock:
        priv[attr] = value


@pytest.mark.parametrize(
    ("overrides", "after", "reasons"),
    [
        ({"extractable": True}, None, ["CKA_EXTRACTABLE is true", "NEVER_EXTRACTABLE is false"]),
        # One-way attributes: made non-extractable later, it is still not NEVER_EXTRACTABLE.
        ({"extractable": True}, (Attribute.EXTRACTABLE, False), ["NEVER_EXTRACTABLE is false"]),
        ({"sensitive": False}, None, ["CKA_SENSITIVE is false", "ALWAYS_SENSITIVE is false"]),
        ({"sensitive": False}, (Attribute.SENSITIVE, True), ["ALWAYS_SENSITIVE is false"]),
        ({"derive": True}, None, ["CKA_DERIVE is true"]),
        ({"private": False}, None, ["CKA_PRIVATE is false"]),
    ],
)
def test_unprotected_keys_are_refused(token, ca, overrides, after, reasons):
    key_id = raw_keypair(token, **overrides)
    if after is not None:
        _flip(token, key_id, *after)
    dsc = issue_dsc(ca, token.public_key_der(key_id))  # the right DSC: refused for protection
    with pytest.raises(Pkcs11Error, match="refused") as info:
        token.signing_key(key_id, dsc.public_key_der())
    for reason in reasons:
        assert reason in str(info.value)


def test_an_extractable_key_really_is_readable_which_is_why_it_is_refused(token):
    key_id = raw_keypair(token, extractable=True, sensitive=False)
    priv = private_object(token, key_id)
    with token._module.lock:
        value = priv[Attribute.VALUE]
    # The P-256 private scalar, big-endian; SoftHSM2 drops leading zero bytes (1 key in 256
    # has a shorter value), so the length alone is not the test.
    p256_order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    assert len(value) <= 32 and 0 < int.from_bytes(value, "big") < p256_order


# ---- opening, PINs, lifecycle -------------------------------------------------------------------


def test_wrong_pin_is_a_clear_error_without_the_pin(hsm, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Pkcs11Error, match=f"wrong PIN for token '{PIN_LABEL}'") as info:
        Pkcs11Token.open(hsm.module, PIN_LABEL, WRONG_PIN)
    shown = "".join(traceback.format_exception(info.value)) + repr(info.value) + caplog.text
    for secret in (WRONG_PIN, PIN):
        assert secret.decode() not in shown
    with pytest.raises(Pkcs11Error, match="not valid UTF-8"):
        Pkcs11Token.open(hsm.module, PIN_LABEL, b"\xff\xfe")
    with pytest.raises(Pkcs11Error, match="empty PIN"):
        Pkcs11Token.open(hsm.module, PIN_LABEL, b"")
    # The right PIN still works afterwards.
    Pkcs11Token.open(hsm.module, PIN_LABEL, PIN).close()


def test_open_errors_name_the_problem(hsm, token, tmp_path):
    with pytest.raises(Pkcs11Error, match="module not found"):
        Pkcs11Token.open(str(tmp_path / "missing.so"), LABEL, PIN)
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(Pkcs11Error, match="cannot load PKCS#11 module"):
        Pkcs11Token.open(str(bogus), LABEL, PIN)
    with pytest.raises(Pkcs11Error, match=r"no token labelled 'nope'.*dcc-test"):
        Pkcs11Token.open(hsm.module, "nope", PIN)
    with pytest.raises(Pkcs11Error, match="already open in this process"):
        Pkcs11Token.open(hsm.module, LABEL, PIN)


def test_read_only_session_signs_but_cannot_generate_and_close_stops_signing(hsm, ca):
    with Pkcs11Token.open(hsm.module, PIN_LABEL, PIN) as rw:
        key_id = rw.generate_key("ES256", "lifecycle")
        dsc = issue_dsc(ca, rw.public_key_der(key_id))
    ro = Pkcs11Token.open(hsm.module, PIN_LABEL, read_pin(str(hsm.pin_file)), read_only=True)
    with pytest.raises(Pkcs11Error, match="read-only"):
        ro.generate_key("ES256", "nope")
    key = ro.signing_key(key_id, dsc.public_key_der())
    protected = native.protected_header(key.alg, dsc.kid)
    payload = cwt(varied_samples(1)[0])
    (text,) = native.hc1_encode(protected, [payload], key.sign(protected, [payload]))
    assert verify_hc1(text, [dsc]).valid
    ro.close()
    ro.close()  # idempotent
    with pytest.raises(Pkcs11Error, match="closed"):
        key.sign(protected, [payload])
    with pytest.raises(Pkcs11Error, match="closed"):
        ro.public_key_der(key_id)


# Logs in and out of a token in a loop, as another keyd worker (re)starting would. The PIN
# comes on stdin, not argv. Errors are counted, not raised: the race is symmetric.
HAMMER = """
import sys, time, pkcs11
lib = pkcs11.lib(sys.argv[1])
pin = sys.stdin.readline().strip()
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[3])
done = failed = 0
while time.monotonic() < end:
    try:
        lib.get_token(token_label=sys.argv[2]).open(user_pin=pin).close()
        done += 1
        time.sleep(0.005)
    except pkcs11.PKCS11Error:
        failed += 1
print(done, failed, flush=True)
"""


def test_open_survives_another_process_logging_in_and_out(hsm):
    """SoftHSM2 rewrites token state on login/logout; a concurrent open in another process
    may read it half-written (CKR_GENERAL_ERROR). open() retries that; without the retry this
    test fails within a few iterations."""
    with subprocess.Popen(
        [sys.executable, "-c", HAMMER, hsm.module, PIN_LABEL, "1.5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as hammer:
        assert hammer.stdin is not None and hammer.stdout is not None
        hammer.stdin.write(PIN.decode() + "\n")
        hammer.stdin.close()
        assert hammer.stdout.readline().strip() == "ready"
        opened = 0
        while hammer.poll() is None:
            Pkcs11Token.open(hsm.module, PIN_LABEL, PIN).close()
            opened += 1
        done, _failed = map(int, hammer.stdout.read().split())
    assert hammer.returncode == 0
    assert opened > 5 and done > 5, (opened, done)


def test_read_pin_from_files(tmp_path):
    pin = tmp_path / "pin"
    for content, expected in (
        (b"1234\n", b"1234"),
        (b"1234\r\n", b"1234"),
        (b"1234", b"1234"),
        (b"12 34\n\n", b"12 34\n"),  # only one newline is removed
    ):
        pin.write_bytes(content)
        assert read_pin(str(pin)) == expected
        assert read_pin(f"file:{pin}") == expected
    pin.write_bytes(b"\n")
    with pytest.raises(Pkcs11Error, match="is empty"):
        read_pin(str(pin))
    pin.write_bytes(b"x" * 5000)
    with pytest.raises(Pkcs11Error, match="not a PIN"):
        read_pin(str(pin))
    with pytest.raises(Pkcs11Error, match="No such file"):
        read_pin(str(tmp_path / "absent"))
    # A bare word that is not a file might be a PIN typed by mistake: never echoed.
    with pytest.raises(Pkcs11Error) as info:
        read_pin("4711")
    assert "4711" not in str(info.value)
    for source in ("env:DCC_PIN", "pass:4711"):
        with pytest.raises(Pkcs11Error, match="not supported") as info:
            read_pin(source)
        assert "DCC_PIN" not in str(info.value) and "4711" not in str(info.value)


def test_read_pin_from_a_file_descriptor():
    r, w = os.pipe()
    os.write(w, b"5678\n")
    os.close(w)
    assert read_pin(f"fd:{r}") == b"5678"
    with pytest.raises(OSError):
        os.fstat(r)  # read once, then closed
    with pytest.raises(Pkcs11Error, match="file descriptor number"):
        read_pin("fd:x")
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(Pkcs11Error, match=r"file descriptor \d+ is empty"):
        read_pin(f"fd:{r}")


# ---- concurrency ----------------------------------------------------------------------------


def test_four_threads_sign_concurrently_on_two_sessions(hsm, token, keys, dscs, ca):
    """Four threads, two token sessions, both algorithms, plus object searches meanwhile.

    python-pkcs11 serialises operations within one session, but not across sessions, and
    SoftHSM2 initialised without locking flags aborts ("double free") when two sessions are
    used at once. The backend's per-module lock is what keeps this process alive.
    """
    second = Pkcs11Token.open(hsm.module, PIN_LABEL, PIN)
    try:
        other_id = second.generate_key("ES256", "concurrency")
        other_dsc = issue_dsc(ca, second.public_key_der(other_id))
        plan = [
            (keys["ES256"], dscs["ES256"], token, None),
            (keys["ES256"], dscs["ES256"], token, None),
            (keys["PS256"], dscs["PS256"], token, None),
            (second.signing_key(other_id, other_dsc.public_key_der()), other_dsc, second, other_id),
        ]
        deadline = time.monotonic() + 2.5
        results: list[list[tuple[Pkcs11SigningKey, bytes, bytes, bytes]]] = [[] for _ in plan]
        errors: list[BaseException] = []
        start = threading.Barrier(len(plan))

        def worker(index: int) -> None:
            key, dsc, tok, key_id = plan[index]
            protected = native.protected_header(key.alg, dsc.kid)
            n = 0
            try:
                start.wait()
                while time.monotonic() < deadline:
                    batch = [b"t%d-%d-%d" % (index, n, j) for j in range(1 + n % 5)]
                    n += 1
                    for payload, sig in zip(batch, key.sign(protected, batch), strict=True):
                        results[index].append((key, protected, payload, sig))
                    if key_id is not None:  # a search and attribute reads between signs
                        assert tok.public_key_der(key_id) == key.public_key_der()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plan))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        second.close()
    assert not errors, errors
    assert all(len(r) > 20 for r in results), [len(r) for r in results]
    for per_thread in results:
        for key, protected, payload, sig in per_thread:
            verify_any(key, protected, payload, sig)


# ---- one session per worker process -------------------------------------------------------


def _worker_sign(module: str, pin_source: str, key_id: str, dsc_der: bytes, payloads):
    """Runs in a worker process: its own token session, PIN read there from the PIN file."""
    with Pkcs11Token.open(module, LABEL, read_pin(pin_source), read_only=True) as token:
        key = token.signing_key(key_id, dsc_der)
        protected = native.protected_header(key.alg, hashlib.sha256(b"k").digest()[:8])
        return protected, key.sign(protected, payloads), os.getpid()


def test_spawned_worker_processes_each_open_their_own_session(hsm, token, key_ids, keys, dscs):
    ctx = multiprocessing.get_context("spawn")
    dsc_der = dscs["ES256"].public_key_der()
    payloads = [b"worker payload %d" % i for i in range(50)]
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = [
            pool.submit(
                _worker_sign, hsm.module, f"file:{hsm.pin_file}", key_ids["ES256"], dsc_der,
                payloads,
            )
            for _ in range(2)
        ]  # fmt: skip
        outcomes = [f.result(timeout=60) for f in futures]
    for protected, sigs, pid in outcomes:
        assert pid != os.getpid()
        for payload, sig in zip(payloads, sigs, strict=True):
            verify_any(keys["ES256"], protected, payload, sig)


def _forked_child(key: Pkcs11SigningKey, module: str, pin_source: str, key_id: str, dsc_der, q):
    protected = native.protected_header(key.alg, bytes(8))
    try:
        key.sign(protected, [b"x"])
        q.put("inherited key signed")
        return
    except Pkcs11Error as exc:
        inherited = str(exc)
    try:
        q.put((inherited, _worker_sign(module, pin_source, key_id, dsc_der, [b"forked"])))
    except BaseException as exc:  # report, or the parent waits for nothing
        q.put(repr(exc))


def test_forked_child_refuses_inherited_session_and_reopens(hsm, token, key_ids, keys, dscs):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    args = (keys["ES256"], hsm.module, str(hsm.pin_file), key_ids["ES256"])
    child = ctx.Process(target=_forked_child, args=(*args, dscs["ES256"].public_key_der(), q))
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a process with threads; none of ours are running.
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    outcome = q.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert isinstance(outcome, tuple), outcome
    inherited, (protected, (sig,), pid) = outcome
    assert "another process" in inherited
    assert pid == child.pid
    verify_any(keys["ES256"], protected, b"forked", sig)
    # The parent's session is untouched by the child's re-initialisation.
    protected = native.protected_header(native.ES256, dscs["ES256"].kid)
    verify_any(keys["ES256"], protected, b"p", keys["ES256"].sign(protected, [b"p"])[0])


def test_python_pkcs11_still_initialises_without_locking_flags():
    """The reason for the module lock. If python-pkcs11 ever passes CKF_OS_LOCKING_OK, this
    fails and the lock (and its cost) can be reconsidered."""
    source = os.path.join(os.path.dirname(p11.__file__), "_pkcs11.pyx")
    if not os.path.exists(source):
        pytest.skip("python-pkcs11 installed without its .pyx source")
    with open(source, encoding="utf-8") as f:
        text = f.read()
    assert "C_Initialize(NULL)" in text
