"""keyd over SIGN_COLUMNS: a batch that mixes many accounts is checked, signed and audited per
item under its own client, account and operator, in one commit; its results are columns in
item order; its audit records equal those of the per-part path; and what keyd cannot audit
it does not release."""

import json
import time
from array import array

import cbor2
import pytest

from dccsign import native
from dccsign.audit import CACHE_ENTRIES, AuditKey, AuditLog, AuditUnavailable, search, verify
from dccsign.chain import claims_prefix
from dccsign.keyd import Keyd
from dccsign.keystore import Keystore, resolve_passphrase
from dccsign.protocol.keyd import (
    ItemError,
    KeydColumns,
    SignColumns,
    SignMany,
    SignPart,
)
from dccsign.samples import sample
from dccsign.verify import verify_hc1


@pytest.fixture
def env(dev_keystore_copy, tmp_path):
    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    key = AuditKey.create(tmp_path / "audit-key.pem", pw)
    log = AuditLog.open(tmp_path / "audit", key)
    keyd = Keyd(store.directory, pw, log)
    yield store, keyd, log, tmp_path / "audit"
    keyd.close()
    log.close()


def _kid(store, usage):
    return next(e.kid for e in store.entries if e.dsc.usages == frozenset(usage))


def _payload(dcc, n=0, *, iat=None, exp=None):
    now = int(time.time())
    group = next(g for g in ("v", "t", "r") if g in dcc)
    dcc = {**dcc, group: [{**dcc[group][0], "ci": f"URN:UVCI:01:NL:KC/{n:06d}"}]}
    return claims_prefix(
        "NL", now - 3600 if iat is None else iat, now + 86400 if exp is None else exp
    ) + cbor2.dumps(dcc)


def _allow(store, keyd, kid, clients):
    meta_path = store.directory / "keystore.json"
    meta = json.loads(meta_path.read_text())
    name = next(e.name for e in store.entries if e.kid == kid)
    next(k for k in meta["keys"] if k["name"] == name)["clients"] = clients
    meta_path.write_text(json.dumps(meta))
    keyd._next_check = 0


def test_a_batch_of_many_accounts_is_one_commit_with_a_record_per_item(env):
    store, keyd, log, audit_dir = env
    kid = _kid(store, "v")
    _allow(store, keyd, kid, ["portal-a", "portal-c"])
    parts = [
        SignPart("portal-a" if i % 5 else "portal-c", f"uzi:{i}", (_payload(sample("v"), i),),
                 None if i % 3 else f"op:{i}")
        for i in range(300)
    ]
    parts[7] = SignPart("portal-b", "uzi:7", (_payload(sample("v"), 7),))  # not allowed
    parts[8] = SignPart("portal-a", "uzi:8", (_payload(sample("t"), 8),))  # wrong type
    parts[9] = SignPart("portal-a", "uzi:9", (b"\xa0",))  # not a CWT
    parts[10] = SignPart("portal-a", "uzi:10", (_payload({**sample("v"), "dob": "1999-02-30"}),))
    cols = KeydColumns.from_parts(parts)
    commits = []
    real = log.append_columns

    def counted(*args):
        commits.append(len(args[4]))
        return real(*args)

    log.append_columns = counted
    result = keyd.sign_columns(SignColumns(3, kid, cols))
    assert commits == [296] and len(result) == 300
    codes = list(result.codes)
    assert codes[7:11] == [ItemError.CLIENT_NOT_ALLOWED, ItemError.TYPE_NOT_ALLOWED,
                           ItemError.MALFORMED_CWT, ItemError.INVALID_DCC]
    assert codes.count(0) == 296 and len(result.reasons) == 4
    assert result.reasons[0] == "client 'portal-b' may not use this kid"
    assert "dob" in result.reasons[3]
    entry = next(e for e in store.entries if e.kid == kid)
    protected = native.protected_header(-7, kid)
    signed = [i for i, c in enumerate(codes) if c == 0]
    texts = native.hc1_encode(
        protected, [cols.payload_list()[i] for i in signed], result.signature_list()
    )
    assert all(verify_hc1(t, [entry.dsc]).valid for t in texts[:20])
    records = list(search(audit_dir))
    assert len(records) == 296 and verify(audit_dir).ok
    expected = {
        (p.client, p.account, p.operator)
        for i, p in enumerate(parts) if i not in (7, 8, 9, 10)
    }
    assert {(r["client"], r["account"], r["operator"]) for r in records} == expected


def test_columns_and_parts_audit_the_same_records(dev_keystore_copy, tmp_path):
    """The same items through SIGN_COLUMNS (native audit lines from the string tables) and
    through the per-part audit path (``append_batches``): the same records, field for field
    except the chain and the time."""
    from dccsign.audit import IssuanceBatch

    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    kid = _kid(store, "v")
    parts = [
        SignPart("portal-a", "uzi:1", (_payload(sample("v"), 1), _payload(sample("v"), 2))),
        SignPart("portal-b", 'uzi:"2"\t\u00e9', (_payload(sample("v"), 3),), "op\\2"),
        SignPart("portal-a", "uzi:1", (_payload(sample("v"), 4),), "op"),
    ]
    key = AuditKey.create(tmp_path / "audit-key.pem", pw)
    with AuditLog.open(tmp_path / "cols", key) as log:
        keyd = Keyd(store.directory, pw, log)
        try:
            result = keyd.sign_columns(SignColumns(1, kid, KeydColumns.from_parts(parts)))
        finally:
            keyd.close()
    sigs = iter(result.signature_list())
    dsc = next(e.dsc for e in store.entries if e.kid == kid)
    batches = []
    for part in parts:
        facts = native.cwt_facts(part.payloads)
        batches.append(IssuanceBatch(
            kid, dsc.alg, part.client, part.account, part.operator,
            "".join(f.dcc_type for f in facts), [f.uvci for f in facts],
            [f.iss for f in facts], part.payloads, [next(sigs) for _ in part.payloads],
        ))
    with AuditLog.open(tmp_path / "parts", key) as log:
        log.append_batches(batches)

    def records(name):
        return [{k: v for k, v in r.items() if k not in ("prev", "seq", "time")}
                for r in search(tmp_path / name)]

    assert records("cols") == records("parts") and len(records("cols")) == 4


def test_sign_many_answers_as_before_through_the_columns(env):
    store, keyd, _log, _ = env
    kid = _kid(store, "v")
    parts = (
        SignPart("portal", "a", (_payload(sample("v"), 1), b"\xa0")),
        SignPart("portal", "b", ()),
        SignPart("portal", "c", (_payload(sample("v"), 2),)),
    )
    results = keyd.sign_many(SignMany(4, kid, parts)).results
    assert isinstance(results[0], bytes) and isinstance(results[2], bytes)
    assert results[1][0] == ItemError.MALFORMED_CWT
    # a name the columns refuse is an item error for every payload, not a crash
    bad = keyd.sign_many(SignMany(5, kid, (SignPart("portal", "", (b"\xa0",)),))).results
    assert bad[0][0] == ItemError.INTERNAL and "1 to 1024 characters" in bad[0][1]


def test_audit_unavailable_releases_nothing(env, monkeypatch):
    store, keyd, log, audit_dir = env
    kid = _kid(store, "v")

    def broken(*args):
        raise AuditUnavailable("No space left on device")

    monkeypatch.setattr(log, "append_columns", broken)
    cols = KeydColumns.from_parts([SignPart("p", f"u{i}", (_payload(sample("v"), i), b"\xa0"))
                                   for i in range(5)])
    result = keyd.sign_columns(SignColumns(1, kid, cols))
    assert not result.signatures and result.codes.count(0) == 0
    assert set(result.codes) == {ItemError.AUDIT_UNAVAILABLE, ItemError.MALFORMED_CWT}
    assert not list(search(audit_dir))


def test_hostile_columns_that_bypass_the_codec_are_refused_not_crashed(env):
    store, keyd, _log, audit_dir = env
    kid = _kid(store, "v")
    good = KeydColumns.from_parts([SignPart("p", "u", (_payload(sample("v")),))])
    bad = KeydColumns(good.payloads, good.ends, good.clients, ("x" * 2000,), good.operators,
                      good.client_ix, good.account_ix, good.operator_ix)
    result = keyd.sign_columns(SignColumns(1, kid, bad))
    assert result.results()[0][0] == ItemError.INTERNAL
    assert "accounts[0] must be a non-empty string" in result.reasons[0]
    assert not list(search(audit_dir))


def test_inactive_kid_and_empty_batches(env):
    store, keyd, *_ = env
    cols = KeydColumns.from_parts([SignPart("p", "u", (b"\xa0", b"\xa1"))])
    result = keyd.sign_columns(SignColumns(1, b"\x00" * 8, cols))
    assert result.results() == [(ItemError.KID_NOT_ACTIVE, "unknown kid")] * 2
    empty = keyd.sign_columns(SignColumns(2, _kid(store, "v"), KeydColumns.from_parts([])))
    assert len(empty) == 0


def test_the_audit_caches_stay_bounded_and_keep_recent_entries(tmp_path, dev_keystore_copy):
    pw = resolve_passphrase(dev_keystore_copy)
    with AuditLog.open(tmp_path / "a", AuditKey.create(tmp_path / "k.pem", pw)) as log:
        for i in range(CACHE_ENTRIES + 500):
            log._text(f"uzi:{i}", "account", 0)
        assert len(log._texts) == CACHE_ENTRIES
        assert f"uzi:{CACHE_ENTRIES + 499}" in log._texts and "uzi:0" not in log._texts


def test_result_columns_hold_signatures_in_item_order(env):
    store, keyd, *_ = env
    kid = _kid(store, "v")
    payloads = [_payload(sample("v"), i) if i % 4 else b"\xa0" for i in range(40)]
    cols = KeydColumns.from_parts(
        [SignPart("p", f"u{i % 7}", (p,)) for i, p in enumerate(payloads)]
    )
    result = keyd.sign_columns(SignColumns(1, kid, cols))
    assert result.sig_ends == array("I", range(64, 64 * 30 + 1, 64))
    entry = next(e for e in store.entries if e.kid == kid)
    protected = native.protected_header(-7, kid)
    for payload, outcome in zip(payloads, result.results(), strict=True):
        if payload == b"\xa0":
            assert outcome[0] == ItemError.MALFORMED_CWT
        else:
            (text,) = native.hc1_encode(protected, [payload], [outcome])
            assert verify_hc1(text, [entry.dsc]).valid


# ----------------------------------------------------------------------------- engine side


class ColumnsKeyd:
    """A keyd client that speaks SIGN_COLUMNS: signs every item whose payload does not start
    with b"X" (a fake signature naming the item's account), records each batch."""

    connections = 1

    def __init__(self):
        self.calls = []

    async def sign_columns(self, kid, columns):
        from dccsign.protocol.keyd import ColumnsResult

        self.calls.append(columns)
        columns.check()
        results = []
        for i, payload in enumerate(columns.payload_list()):
            account = columns.accounts[columns.account_ix[i]]
            if payload.startswith(b"X"):
                results.append((ItemError.MALFORMED_CWT, f"bad {account}"))
            else:
                results.append(account.encode().ljust(64, b"."))
        return ColumnsResult.from_results(0, results)


async def test_the_batcher_concatenates_requests_as_columns(monkeypatch):
    import trio

    from dccsign.keyd_batcher import KeydBatcher

    keyd = ColumnsKeyd()
    batcher = KeydBatcher(keyd, window=0.05)
    encoded = []

    def fake_encode(protected, payloads, signatures, level=9):
        encoded.append(len(payloads))
        return [f"HC1:{s.rstrip(b'.').decode()}:{p.decode()}" for p, s in
                zip(payloads, signatures, strict=True)]

    monkeypatch.setattr(native, "hc1_encode", fake_encode)
    requests = {
        "a": [SignPart("portal-a", f"a{i}", (b"pa%d" % i,)) for i in range(3)],
        "b": [SignPart("portal-b", "b0", (b"pb0", b"X-bad", b"pb2"), "op")],
        "c": KeydColumns.from_parts([SignPart("portal-a", "c0", (b"pc0",))]),
    }
    out = {}

    async def one(name):
        out[name] = await batcher.issue(b"k" * 8, b"prot", requests[name])

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as inner:
            for name in requests:
                inner.start_soon(one, name)
        nursery.cancel_scope.cancel()
    assert len(keyd.calls) == 1 and len(keyd.calls[0]) == 7  # one SIGN_COLUMNS for all
    assert out["a"] == [f"HC1:a{i}:pa{i}" for i in range(3)]
    assert out["b"] == ["HC1:b0:pb0", (ItemError.MALFORMED_CWT, "bad b0"), "HC1:b0:pb2"]
    assert out["c"] == ["HC1:c0:pc0"]
    merged = keyd.calls[0]
    assert {merged.operators[merged.operator_ix[i]] for i in range(7)} == {None, "op"}
