"""Micro benchmarks, one group per stage of the HC1 chain.

Run them by naming this directory (the main suite only collects ``tests/``)::

    .venv/bin/python -m pytest bench/ -q --benchmark-only

Contenders in every group: ``native`` (the Cython extension), ``python`` (the pure-Python
reference of the same API) and, where one exists, the library a developer would use instead
(marked as the group's baseline). Every contender handles the same batch of BATCH distinct,
real certificates per timed call (built from :func:`dccsign.testing.samples.varied_samples`), and
every contender's output is checked before it is timed: a wrong answer is not a benchmark.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import base45
import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from naive import naive_hc1, naive_signer, naive_times

from dccsign import native
from dccsign.dcc.issuer import Issuer, SignerKey, claims_prefix
from dccsign.dcc.validate import validate
from dccsign.dcc.verify import verify_hc1
from dccsign.testing.samples import varied_samples

BATCH = 64
SHARED = Path(os.environ.get("DCCSIGN_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SCHEMA = SHARED / "testdata" / "dcc-schema" / "1.3.0.json"


def _impl(name: str) -> ModuleType:
    try:
        return native.implementation(name)
    except ImportError as exc:
        pytest.skip(f"{name} implementation not available: {exc}")


class Corpus:
    """One key, BATCH real DCCs and every intermediate form of their HC1 chain."""

    def __init__(self) -> None:
        ref = native.implementation("python")
        self.signer = naive_signer()
        self.pem = self.signer.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.public_key = self.signer.private_key.public_key()
        self.dccs: list[dict[str, Any]] = varied_samples(BATCH)
        self.iss = self.signer.iss
        self.iat, self.exp = naive_times(self.signer, time.time())
        self.kid = self.signer.kid
        self.protected = ref.protected_header(-7, self.kid)
        assert self.protected == cbor2.dumps({1: -7, 4: self.kid})
        prefix = claims_prefix(self.iss, self.iat, self.exp)
        self.payloads = [prefix + cbor2.dumps(d) for d in self.dccs]
        for d, p in zip(self.dccs, self.payloads, strict=True):
            assert p == cbor2.dumps({1: self.iss, 4: self.exp, 6: self.iat, -260: {1: d}})
        self.tbs = [ref.sig_structure(self.protected, p) for p in self.payloads]
        self.signatures = ref.SigningKey.load_pem(self.pem, None).sign(
            self.protected, self.payloads
        )
        self.coses = [
            ref.sign1_encode(self.protected, p, s)
            for p, s in zip(self.payloads, self.signatures, strict=True)
        ]
        self.compressed = [zlib.compress(c, 9) for c in self.coses]

    def verify_raw(self, tbs: bytes, raw: bytes) -> None:
        """Raise unless *raw* (r || s) is a valid ES256 signature of *tbs* by our key."""
        assert len(raw) == 64
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        self.public_key.verify(der, tbs, ec.ECDSA(hashes.SHA256()))

    def verify_hc1s(self, texts: list[str]) -> None:
        assert len(texts) == BATCH
        for dcc, text in zip(self.dccs, texts, strict=True):
            result = verify_hc1(text, [self.signer.dsc])
            assert result.valid and not result.errors, result.errors
            assert result.dcc == dcc


def _each(fn: Callable[[Any], object], items: list) -> Callable[[], None]:
    """A run that calls *fn* on each of *items* in turn (what one round of a contender does)."""

    def run() -> None:
        for item in items:
            fn(item)

    return run


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus()


# -- 1. base45 --------------------------------------------------------------------------


@pytest.mark.benchmark(group="1 base45 encode (zlib output of a signed COSE, ~360 B)")
@pytest.mark.parametrize("contender", ["native", "python", "pypi-base45"])
def test_base45_encode(per_cert, corpus, contender):
    data = corpus.compressed
    if contender == "pypi-base45":
        encode = base45.b45encode
    else:
        encode = _impl(contender).b45encode
        expected = [base45.b45encode(d).decode("ascii") for d in data]
        assert [encode(d) for d in data] == expected

    per_cert(_each(encode, data), items=BATCH, baseline=contender == "pypi-base45")


# -- 2. zlib ----------------------------------------------------------------------------


@pytest.mark.benchmark(group="2 zlib compress level 9 (COSE_Sign1, ~355 B)")
@pytest.mark.parametrize("contender", ["native", "python", "stdlib-zlib"])
def test_zlib_compress(per_cert, corpus, contender):
    data = corpus.coses
    compress = zlib.compress if contender == "stdlib-zlib" else _impl(contender).zlib_compress
    for d in data:
        assert zlib.decompress(compress(d, 9)) == d

    def run():
        for d in data:
            compress(d, 9)

    per_cert(run, items=BATCH, baseline=contender == "stdlib-zlib")


# -- 3. CBOR: Sig_structure + COSE_Sign1 --------------------------------------------------


@pytest.mark.benchmark(group="3 Sig_structure + COSE_Sign1 assembly")
@pytest.mark.parametrize("contender", ["native", "python", "cbor2"])
def test_cose_assembly(per_cert, corpus, contender):
    protected = corpus.protected
    pairs = list(zip(corpus.payloads, corpus.signatures, strict=True))
    if contender == "cbor2":
        dumps, tag = cbor2.dumps, cbor2.CBORTag

        def build(payload: bytes, sig: bytes) -> tuple[bytes, bytes]:
            return (
                dumps(["Signature1", protected, b"", payload]),
                dumps(tag(18, [protected, {}, payload, sig])),
            )
    else:
        impl = _impl(contender)
        sig_structure, sign1_encode = impl.sig_structure, impl.sign1_encode

        def build(payload: bytes, sig: bytes) -> tuple[bytes, bytes]:
            return sig_structure(protected, payload), sign1_encode(protected, payload, sig)

    for (p, s), tbs, cose in zip(pairs, corpus.tbs, corpus.coses, strict=True):
        assert build(p, s) == (tbs, cose)
        assert tbs == cbor2.dumps(["Signature1", protected, b"", p])

    def run():
        for p, s in pairs:
            build(p, s)

    per_cert(run, items=BATCH, baseline=contender == "cbor2")


# -- 4. signature -----------------------------------------------------------------------


@pytest.mark.benchmark(group="4 ES256 signature (SHA-256 + ECDSA P-256, raw r||s)")
@pytest.mark.parametrize(
    "contender", ["native-batch64", "native-1-per-call", "python", "cryptography"]
)
def test_sign(per_cert, corpus, contender):
    protected, payloads = corpus.protected, corpus.payloads
    if contender == "cryptography":
        # The library contender is handed the Sig_structure ready-made (group 3 times it).
        key = corpus.signer.private_key
        algorithm = ec.ECDSA(hashes.SHA256())
        tbs_list = corpus.tbs

        def sign_all() -> list[bytes]:
            out = []
            for tbs in tbs_list:
                r, s = decode_dss_signature(key.sign(tbs, algorithm))
                out.append(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
            return out
    else:
        impl = _impl("native" if contender.startswith("native") else contender)
        skey = impl.SigningKey.load_pem(corpus.pem, None)
        if contender == "native-1-per-call":

            def sign_all() -> list[bytes]:
                return [skey.sign(protected, [p])[0] for p in payloads]
        else:

            def sign_all() -> list[bytes]:
                return skey.sign(protected, payloads)

    for tbs, raw in zip(corpus.tbs, sign_all(), strict=True):
        corpus.verify_raw(tbs, raw)
    per_cert(sign_all, items=BATCH, baseline=contender == "cryptography")


# -- 5. whole HC1 -----------------------------------------------------------------------


@pytest.mark.benchmark(group="5 whole HC1 per certificate (DCC dict -> 'HC1:' string)")
@pytest.mark.parametrize(
    "contender", ["native-hc1_sign", "python-hc1_sign", "naive", "issuer-native+validation"]
)
def test_whole_hc1(per_cert, corpus, contender):
    dccs, protected = corpus.dccs, corpus.protected
    prefix = claims_prefix(corpus.iss, corpus.iat, corpus.exp)
    dumps = cbor2.dumps
    if contender == "naive":
        key, kid, iss, iat, exp = (
            corpus.signer.private_key,
            corpus.kid,
            corpus.iss,
            corpus.iat,
            corpus.exp,
        )

        def issue() -> list[str]:
            return [naive_hc1(key, kid, d, iss, iat, exp) for d in dccs]
    elif contender == "issuer-native+validation":
        impl = _impl("native")
        signer_key = SignerKey(corpus.signer.dsc, impl.SigningKey.load_pem(corpus.pem, None))
        issuer = Issuer([signer_key], impl=impl)

        def issue() -> list[str]:
            return issuer.issue(dccs)
    else:
        impl = _impl(contender.split("-")[0])
        skey = impl.SigningKey.load_pem(corpus.pem, None)
        hc1_sign = impl.hc1_sign

        def issue() -> list[str]:
            return hc1_sign(skey, protected, [prefix + dumps(d) for d in dccs], 9)

    corpus.verify_hc1s(issue())
    per_cert(issue, items=BATCH, baseline=contender == "naive")


# -- 6. validation ----------------------------------------------------------------------


@pytest.mark.benchmark(group="6 DCC validation (schema 1.3.0 DCCs)")
@pytest.mark.parametrize("contender", ["dccsign-validate", "jsonschema-1.3.0"])
def test_validate(per_cert, corpus, contender):
    dccs = corpus.dccs
    if contender == "jsonschema-1.3.0":
        jsonschema = pytest.importorskip("jsonschema")
        if not SCHEMA.exists():
            pytest.skip(f"DCC JSON schema not found at {SCHEMA}")
        validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text("utf-8")))
        for d in dccs:
            validator.validate(d)

        def check() -> None:
            for d in dccs:
                validator.validate(d)
    else:
        for i, d in enumerate(dccs):
            assert validate(d) == "vtr"[i % 3]
        check = _each(validate, dccs)

    per_cert(check, items=BATCH, baseline=contender == "jsonschema-1.3.0")


# -- 7. keyd's per-item work --------------------------------------------------------------


@pytest.mark.benchmark(group="7 keyd CWT check (structure, iss/exp/iat/type/UVCI)")
@pytest.mark.parametrize("contender", ["native", "python", "cbor2-decode"])
def test_cwt_check(per_cert, corpus, contender):
    payloads = corpus.payloads
    if contender == "cbor2-decode":
        # the floor of any check built on a general decoder: decoding alone, no checks
        def check() -> None:
            for p in payloads:
                cbor2.loads(p)
    else:
        facts = _impl(contender).cwt_facts
        for d, f in zip(corpus.dccs, facts(payloads), strict=True):
            kind = next(k for k in "vtr" if k in d)
            assert (f.iss, f.exp, f.iat, f.dcc_type, f.uvci) == (
                corpus.iss,
                corpus.exp,
                corpus.iat,
                kind,
                d[kind][0]["ci"],
            )

        def check() -> None:
            facts(payloads)

    per_cert(check, items=BATCH, baseline=contender == "cbor2-decode")


@pytest.mark.benchmark(group="8 audit issue lines (5 SHA-256 + canonical JSON + chain)")
@pytest.mark.parametrize("contender", ["native", "python"])
def test_audit_lines(per_cert, corpus, contender):
    args = (
        b'{"account":"uzi:900012345","alg":-7,"client":"portal-a","iss":',
        f',"kid":"{corpus.kid.hex()}","operator":null,"payload_sha256":"'.encode(),
        b"2026-11-23T09:12:44.021730Z",
        -7,
        [corpus.iss] * BATCH,
        [next(d[k][0]["ci"] for k in "vtr" if k in d) for d in corpus.dccs],
        "".join(next(k for k in "vtr" if k in d) for d in corpus.dccs),
        corpus.payloads,
        corpus.signatures,
        1,
        "0" * 64,
    )
    lines = _impl(contender).audit_issue_lines
    assert lines(*args) == native.implementation("python").audit_issue_lines(*args)

    per_cert(lambda: lines(*args), items=BATCH, baseline=contender == "python")
