"""ES256/PS256 signing keys and batch HC1 assembly against both implementations."""

import pickle
import zlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from dccsign.native import KeyLoadError, implementation

KID = bytes.fromhex("a1b2c3d4e5f60718")
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
PASS = b"correct horse battery staple"


def _pem(key, passphrase=PASS):
    enc = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(65537, 2048)


def _verify(pub, alg, tbs, sig):
    if alg == -7:
        assert len(sig) == 64
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        pub.verify(der, tbs, ec.ECDSA(hashes.SHA256()))
    else:
        pub.verify(sig, tbs, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


def test_load_and_public_key(impl, ec_key, rsa_key):
    for key, alg in ((ec_key, -7), (rsa_key, -37)):
        sk = impl.SigningKey.load_pem(_pem(key), PASS)
        assert sk.alg == alg
        assert sk.public_key_der() == key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    assert impl.SigningKey.load_pem(_pem(ec_key, None), None).alg == -7


@pytest.mark.parametrize(
    ("make", "passphrase", "message"),
    [
        (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), b"wrong", "wrong passphrase"),
        (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), None, "need a passphrase"),
        (lambda: _pem(ec.generate_private_key(ec.SECP384R1()), None), None, "P-256"),
        (lambda: _pem(rsa.generate_private_key(65537, 1024), None), None, "2048 to 4096"),
        (lambda: _pem(ed25519.Ed25519PrivateKey.generate(), None), None, "unsupported key type"),
        (
            lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            None,
            "cannot parse",
        ),
        (lambda: b"not a key", b"x", "cannot decrypt or parse"),
    ],
)
def test_load_rejects(impl, make, passphrase, message):
    with pytest.raises(KeyLoadError, match=message):
        impl.SigningKey.load_pem(make(), passphrase)


def test_key_cannot_be_constructed_or_pickled(impl, ec_key):
    with pytest.raises(TypeError):
        impl.SigningKey()
    sk = impl.SigningKey.load_pem(_pem(ec_key), PASS)
    with pytest.raises(TypeError):
        pickle.dumps(sk)
    assert not any("private" in name.lower() or "export" in name.lower() for name in dir(sk))


def test_es256_signatures_verify_are_padded_and_low_s(impl, ec_key):
    sk = impl.SigningKey.load_pem(_pem(ec_key), PASS)
    prot = impl.protected_header(-7, KID)
    # 1,500 signatures: a short r or s (< 2^248) turns up about 1 in 128 per half, so this
    # exercises the left padding a dozen times over.
    payloads = [i.to_bytes(4, "big") * 20 for i in range(1500)]
    sigs = sk.sign(prot, payloads)
    short = 0
    for payload, sig in zip(payloads, sigs, strict=True):
        assert len(sig) == 64
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        assert 0 < s <= N // 2
        short += r < 2**248 or s < 2**248
        _verify(ec_key.public_key(), -7, impl.sig_structure(prot, payload), sig)
    assert short > 0
    assert len(set(sigs)) == len(sigs)


def test_ps256_uses_salt_32(impl, rsa_key):
    sk = impl.SigningKey.load_pem(_pem(rsa_key), PASS)
    prot = impl.protected_header(-37, KID)
    (sig,) = sk.sign(prot, [b"payload"])
    tbs = impl.sig_structure(prot, b"payload")
    assert len(sig) == 256
    _verify(rsa_key.public_key(), -37, tbs, sig)
    with pytest.raises(InvalidSignature):  # a verifier insisting on another salt refuses it
        rsa_key.public_key().verify(
            sig, tbs, padding.PSS(padding.MGF1(hashes.SHA256()), 222), hashes.SHA256()
        )


def test_rsa_3072(impl):
    key = rsa.generate_private_key(65537, 3072)
    sk = impl.SigningKey.load_pem(_pem(key, None), None)
    prot = impl.protected_header(-37, KID)
    (sig,) = sk.sign(prot, [b"x"])
    assert len(sig) == 384
    _verify(key.public_key(), -37, impl.sig_structure(prot, b"x"), sig)


def test_sign_refuses_foreign_protected_header(impl, ec_key, rsa_key):
    sk = impl.SigningKey.load_pem(_pem(ec_key), PASS)
    for bad in (
        impl.protected_header(-37, KID),
        b"\xa0",
        b"",
        b"\xa2\x01\x26\x04\x48" + KID + b"x",
    ):
        with pytest.raises(ValueError, match="canonical"):
            sk.sign(bad, [b"x"])
        with pytest.raises(ValueError, match="canonical"):
            impl.hc1_sign(sk, bad, [b"x"])
    with pytest.raises(TypeError, match="payload 1"):
        sk.sign(impl.protected_header(-7, KID), [b"x", "y"])


def test_hc1_sign_and_encode(impl, ec_key, rsa_key):
    for key, alg in ((ec_key, -7), (rsa_key, -37)):
        sk = impl.SigningKey.load_pem(_pem(key), PASS)
        prot = impl.protected_header(alg, KID)
        payloads = [bytes([i]) * (i * 7) for i in range(40)]  # includes an empty payload
        for level in (9, 0, -1):
            texts = impl.hc1_sign(sk, prot, payloads, level)
            assert len(texts) == len(payloads)
            for payload, text in zip(payloads, texts, strict=True):
                assert text.startswith("HC1:")
                parts = impl.sign1_decode(zlib.decompress(impl.b45decode(text[4:])))
                assert parts.tags == (18,)
                assert (parts.protected, parts.unprotected, parts.payload) == (
                    prot,
                    b"\xa0",
                    payload,
                )
                _verify(key.public_key(), alg, impl.sig_structure(prot, payload), parts.signature)
    assert impl.hc1_sign(sk, prot, []) == []


def test_hc1_encode_is_deterministic_and_implementations_agree(impl):
    reference = implementation("python")
    prot = impl.protected_header(-7, KID)
    payloads = [b"\xa1\x01" + bytes(range(i)) for i in range(0, 200, 7)]
    sigs = [bytes([i]) * 64 for i in range(len(payloads))]
    ours = impl.hc1_encode(prot, payloads, sigs)
    theirs = reference.hc1_encode(prot, payloads, sigs)
    for a, b in zip(ours, theirs, strict=True):
        assert zlib.decompress(impl.b45decode(a[4:])) == zlib.decompress(reference.b45decode(b[4:]))
    with pytest.raises(ValueError, match="2 payloads but 1 signatures"):
        impl.hc1_encode(prot, [b"a", b"b"], [b"s"])
    with pytest.raises(TypeError):
        impl.hc1_encode(prot, [b"a"], ["s"])
    with pytest.raises(ValueError, match="zlib level"):
        impl.hc1_encode(prot, [b"a"], [b"s"], 11)
