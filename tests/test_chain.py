"""The issuing chain: validation, key choice, claims, clamping, all-or-nothing batches."""

import datetime as dt
import zlib

import cbor2
import pytest

from dccsign import native
from dccsign.dcc.issuer import Issuer, SignerKey, claims_prefix
from dccsign.dcc.verify import verify_hc1
from dccsign.errors import InvalidBatchError, KeyProblem
from dccsign.keys.keystore import Keystore, resolve_passphrase
from dccsign.testing.samples import sample, varied_samples

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def keys(dev_keystore, impl):
    store = Keystore.open(dev_keystore)
    pw = resolve_passphrase(store.directory)
    return [
        SignerKey(e.dsc, store.load_signing_key(e, pw, impl), e.state, e.name)
        for e in store.entries
    ]


def _issuer(keys, impl, **kw):
    kw.setdefault("clock", lambda: NOW)
    return Issuer(keys, impl=impl, **kw)


def _claims(text):
    parts = native.sign1_decode(zlib.decompress(native.b45decode(text[4:])))
    return parts, cbor2.loads(parts.payload)


def test_claims_prefix_matches_cbor2():
    dcc = sample("v")
    for iss, iat, exp in (("NL", 1, 2), ("DE", 1_600_000_000, 2**33)):
        full = cbor2.dumps({1: iss, 4: exp, 6: iat, -260: {1: dcc}})
        assert claims_prefix(iss, iat, exp) + cbor2.dumps(dcc) == full


def test_issue_each_type_with_its_key(keys, impl):
    issuer = _issuer(keys, impl)
    dccs = [sample("v"), sample("t"), sample("r")]
    texts = issuer.issue(dccs, validity=dt.timedelta(days=30))
    by_type = {k.dsc.usages: k for k in keys if k.dsc.restricted}
    for dcc, text, t in zip(dccs, texts, "vtr", strict=True):
        parts, claims = _claims(text)
        key = by_type[frozenset(t)]
        assert parts.protected == native.protected_header(-7, key.dsc.kid)
        assert claims == {
            1: "NL",
            4: int(NOW) - 3600 + 30 * 86400,
            6: int(NOW) - 3600,
            -260: {1: dcc},
        }
        result = verify_hc1(text, [k.dsc for k in keys], at=dt.datetime.fromtimestamp(NOW, dt.UTC))
        assert result.valid and result.time_valid and result.usage_valid, result.errors


def test_exp_is_clamped_to_the_dsc(keys, impl):
    issuer = _issuer(keys, impl)
    (text,) = issuer.issue([sample("v")], validity=dt.timedelta(days=365 * 10))
    key = next(k for k in keys if k.dsc.usages == frozenset("v"))
    assert _claims(text)[1][4] == int(key.dsc.not_after.timestamp())


def test_refuses_iat_before_not_before(keys, impl):
    key = keys[0]
    early = key.dsc.not_before.timestamp() + 1800  # now - 1 h backdate precedes notBefore
    issuer = _issuer(keys, impl, clock=lambda: early)
    with pytest.raises(KeyProblem, match="precede the notBefore"):
        issuer.issue([sample("v")])
    issuer = _issuer(keys, impl, clock=lambda: early, backdate=dt.timedelta(0))
    assert issuer.issue([sample("v")])


def test_refuses_expired_dsc(keys, impl):
    late = keys[0].dsc.not_after.timestamp() + 1
    with pytest.raises(KeyProblem, match="expired"):
        _issuer(keys, impl, clock=lambda: late).issue([sample("v")])


def test_kid_must_allow_the_type(keys, impl):
    vacc = next(k for k in keys if k.dsc.usages == frozenset("v"))
    issuer = _issuer(keys, impl)
    with pytest.raises(KeyProblem, match="may not sign a test DCC"):
        issuer.issue([sample("t")], kid=vacc.dsc.kid)
    with pytest.raises(KeyProblem, match="no key with kid"):
        issuer.issue([sample("v")], kid=b"\x00" * 8)
    ps = next(k for k in keys if not k.dsc.restricted)
    texts = issuer.issue([sample("t"), sample("r")], kid=ps.dsc.kid)
    assert all(_claims(t)[0].protected == native.protected_header(-37, ps.dsc.kid) for t in texts)


def test_inactive_keys_do_not_sign(keys, impl):
    states = [
        SignerKey(k.dsc, k.key, "retired" if k.dsc.usages == frozenset("v") else k.state)
        for k in keys
    ]
    issuer = _issuer(states, impl)
    ps = next(k for k in keys if not k.dsc.restricted)
    (text,) = issuer.issue([sample("v")])  # falls back to the unrestricted PS256 key
    assert _claims(text)[0].protected[-8:] == ps.dsc.kid
    retired = next(k for k in keys if k.dsc.usages == frozenset("v"))
    with pytest.raises(KeyProblem, match="is retired"):
        issuer.issue([sample("v")], kid=retired.dsc.kid)
    with pytest.raises(KeyProblem, match="no active key"):
        _issuer([k for k in states if k.dsc.restricted], impl).issue([sample("v")])


def test_invalid_batch_signs_nothing(keys, impl):
    calls = []

    class Spy:
        def __getattr__(self, name):
            if name == "hc1_sign":
                calls.append(name)
            return getattr(impl, name)

    bad = sample("v")
    bad["v"][0]["dn"] = "two"
    worse = sample("t")
    del worse["nam"]
    issuer = _issuer(keys, Spy())
    with pytest.raises(InvalidBatchError) as info:
        issuer.issue([sample("v"), bad, sample("r"), worse])
    assert sorted(info.value.errors) == [1, 3]
    assert info.value.errors[1][0]["path"] == "$.v[0].dn"
    assert calls == []


def test_payload_too_large_for_a_qr_code(keys, impl):
    big = sample("v")
    big["v"][0]["is"] = "X" * 80
    big["nam"]["fn"] = "Ж" * 80  # 160 bytes of UTF-8
    issuer = _issuer(keys, impl)
    assert issuer.issue([big])  # large but fits
    huge = sample("t")
    huge["t"][0]["nm"] = "漢" * 80
    huge["t"][0]["tc"] = "漢" * 80
    huge["t"][0]["is"] = "漢" * 80
    huge["nam"] = {"fn": "漢" * 80, "gn": "漢" * 80, "fnt": "X" * 80, "gnt": "Y" * 80}
    with pytest.raises(InvalidBatchError) as info:
        issuer.issue([huge])
    assert info.value.errors[0][0]["rule"] == "too-large"


def test_names_are_nfc_normalised(keys, impl):
    dcc = sample("v")
    dcc["nam"]["fn"] = "Bakker-C\u0327elik"  # C + combining cedilla
    (text,) = _issuer(keys, impl).issue([dcc])
    assert _claims(text)[1][-260][1]["nam"]["fn"] == "Bakker-\u00c7elik"


def test_issuer_country_override(keys, impl):
    (text,) = _issuer(keys, impl, issuer_country="BE").issue([sample("r")])
    assert _claims(text)[1][1] == "BE"


def test_many_varied_in_order(keys, impl):
    dccs = varied_samples(300)
    texts = _issuer(keys, impl).issue(dccs)
    for dcc, text in zip(dccs, texts, strict=True):
        assert _claims(text)[1][-260][1] == dcc


def test_claims_are_the_engines_too(keys, impl):
    # dccsign sign and the engine build the claims with one Claims object each: the same key
    # choice, times and size bound for the same request.
    from dccsign.dcc.issuer import Claims, max_payload
    from dccsign.server.dispatch import Dispatcher

    claims = _issuer(keys, impl, issuer_country="BE").claims
    assert isinstance(claims, Claims)
    key = claims.key_for("t")
    prefix, limit = claims.claims_for(key, dt.timedelta(days=2), NOW)
    iat = int(NOW) - 3600
    assert prefix == claims_prefix("BE", iat, iat + 2 * 86400)
    assert limit == max_payload(key.dsc.alg)

    class _Batcher:
        zlib_level = 9

    engine = Dispatcher(
        _Batcher(), [(k.dsc, k.state) for k in keys], None, None, issuer_country="BE"
    )
    assert engine._signing("t", None, 2, NOW) == (engine.keys[keys.index(key)], (prefix, limit))


def test_claims_without_a_country(keys, impl):
    import dataclasses

    from dccsign.dcc.issuer import Claims

    key = next(k for k in keys if k.state == "active")
    nameless = SignerKey(dataclasses.replace(key.dsc, country=None), key.key, "active")
    with pytest.raises(KeyProblem, match="names no country; configure issuer_country"):
        Claims([nameless]).claims_for(nameless, dt.timedelta(days=1), NOW)
    prefix, _ = Claims([nameless], issuer_country="NL").claims_for(
        nameless, dt.timedelta(days=1), NOW
    )
    assert cbor2.loads(prefix + cbor2.dumps({}))[1] == "NL"
