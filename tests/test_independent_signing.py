"""Our signed output, verified by implementations that share no code with us.

2,400 fresh certificates per implementation (every dev key: ES256 for each type, PS256) go
through the Node.js verifier (Node crypto + cbor-x); a sample also goes through pycose. At
this count the one-in-128 short-r padding bug cannot hide.
"""

import os

import pytest

from conftest import IN_CI
from dccsign.dcc.issuer import Issuer, SignerKey
from dccsign.keys.keystore import Keystore, resolve_passphrase
from dccsign.testing.samples import varied_samples
from independent import node_available, verify_node, verify_pycose

COUNT = 2400


@pytest.fixture(scope="module")
def issued(dev_keystore, impl):
    store = Keystore.open(dev_keystore)
    pw = resolve_passphrase(store.directory)
    keys = [SignerKey(e.dsc, store.load_signing_key(e, pw, impl), e.state) for e in store.entries]
    issuer = Issuer(keys, impl=impl)
    dccs = varied_samples(COUNT, seed=int.from_bytes(os.urandom(4), "big"))
    ps256 = next(k for k in keys if not k.dsc.restricted)
    # Three quarters with the EKU-limited ES256 keys, one quarter with the PS256 key.
    cut = COUNT * 3 // 4
    texts = issuer.issue(dccs[:cut]) + issuer.issue(dccs[cut:], kid=ps256.dsc.kid)
    by_kid = {k.dsc.kid.hex(): k.dsc.der for k in keys}
    return dccs, texts, by_kid


def test_node_verifies_every_certificate(issued):
    if not node_available():
        if IN_CI:
            pytest.fail("the Node.js verifier is required in CI (npm ci --prefix tests/interop)")
        pytest.skip(
            "Node.js verifier not installed: run 'make test' (npm ci --prefix tests/interop)"
        )
    _, texts, by_kid = issued
    # The verifier gets every DSC we have, in the kid's place; it must pick by kid itself.
    from dccsign import native

    items = []
    for text in texts:
        parts = native.sign1_decode(native.zlib_decompress(native.b45decode(text[4:])))
        items.append((text, by_kid[parts.protected[-8:].hex()]))
    verdicts = verify_node(items)
    bad = [(i, v.reason) for i, v in enumerate(verdicts) if not v.ok]
    assert bad == []
    algs = [v.alg for v in verdicts]
    assert algs.count(-37) == COUNT - COUNT * 3 // 4 and algs.count(-7) == COUNT * 3 // 4
    assert all(v.payload is not None for v in verdicts)


def test_pycose_verifies_a_sample(issued):
    dccs, texts, by_kid = issued
    from dccsign import native

    step = 12  # pycose verifies ES256 in pure Python: 200 of each implementation's output
    for dcc, text in list(zip(dccs, texts, strict=True))[::step]:
        parts = native.sign1_decode(native.zlib_decompress(native.b45decode(text[4:])))
        verdict = verify_pycose(text, by_kid[parts.protected[-8:].hex()])
        assert verdict.ok, verdict.reason
        assert verdict.payload[-260][1] == dcc
