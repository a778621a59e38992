"""keyd over SIGN_COLUMNS: a batch that mixes many accounts is checked, signed and audited per
item under its own client, account and operator, in one commit; its results are columns in
item order; its audit records equal those of the per-part path; and what keyd cannot audit
it does not release."""

import json
import time
from array import array

import cbor2
import pytest

from conftest import fail_audit_commits, kid_for
from dccsign import native
from dccsign.audit.issue_lines import CACHE_ENTRIES
from dccsign.audit.key import AuditKey
from dccsign.audit.search import search
from dccsign.audit.verify import verify
from dccsign.audit.writer import AuditLog
from dccsign.dcc.issuer import claims_prefix
from dccsign.dcc.verify import verify_hc1
from dccsign.keyd.service import Keyd
from dccsign.keys.keystore import Keystore, resolve_passphrase
from dccsign.protocol.keyd import (
    ItemError,
    KeydColumns,
    KidsResult,
    SignColumns,
    SignKids,
    SignMany,
    SignPart,
)
from dccsign.testing.samples import sample


def _count_commits(log):
    """Record, for each commit of *log* (one ``append_columns_many``), the number of records
    of each of its batches; return that list of lists."""
    commits = []
    real = log.append_columns_many

    def counted(batches):
        commits.append([len(b[4]) for b in batches])
        return real(batches)

    log.append_columns_many = counted
    return commits


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


def test_a_batch_of_many_accounts_is_one_commit_with_a_record_per_item(keyd_env):
    store, keyd, log, audit_dir = keyd_env
    kid = kid_for(store, "v")
    _allow(store, keyd, kid, ["portal-a", "portal-c"])
    parts = [
        SignPart(
            "portal-a" if i % 5 else "portal-c",
            f"uzi:{i}",
            (_payload(sample("v"), i),),
            None if i % 3 else f"op:{i}",
        )
        for i in range(300)
    ]
    parts[7] = SignPart("portal-b", "uzi:7", (_payload(sample("v"), 7),))  # not allowed
    parts[8] = SignPart("portal-a", "uzi:8", (_payload(sample("t"), 8),))  # wrong type
    parts[9] = SignPart("portal-a", "uzi:9", (b"\xa0",))  # not a CWT
    parts[10] = SignPart("portal-a", "uzi:10", (_payload({**sample("v"), "dob": "1999-02-30"}),))
    cols = KeydColumns.from_parts(parts)
    commits = _count_commits(log)
    result = keyd.sign_columns(SignColumns(3, kid, cols))
    assert commits == [[296]] and len(result) == 300
    codes = list(result.codes)
    assert codes[7:11] == [
        ItemError.CLIENT_NOT_ALLOWED,
        ItemError.TYPE_NOT_ALLOWED,
        ItemError.MALFORMED_CWT,
        ItemError.INVALID_DCC,
    ]
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
        (p.client, p.account, p.operator) for i, p in enumerate(parts) if i not in (7, 8, 9, 10)
    }
    assert {(r["client"], r["account"], r["operator"]) for r in records} == expected


def test_columns_and_parts_audit_the_same_records(dev_keystore_copy, tmp_path):
    """The same items through SIGN_COLUMNS (native audit lines from the string tables) and
    through the per-part audit path (``append_batches``): the same records, field for field
    except the chain and the time."""
    from dccsign.audit.records import IssuanceBatch

    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    kid = kid_for(store, "v")
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
        batches.append(
            IssuanceBatch(
                kid,
                dsc.alg,
                part.client,
                part.account,
                part.operator,
                "".join(f.dcc_type for f in facts),
                [f.uvci for f in facts],
                [f.iss for f in facts],
                part.payloads,
                [next(sigs) for _ in part.payloads],
            )
        )
    with AuditLog.open(tmp_path / "parts", key) as log:
        log.append_batches(batches)

    def records(name):
        return [
            {k: v for k, v in r.items() if k not in ("prev", "seq", "time")}
            for r in search(tmp_path / name)
        ]

    assert records("cols") == records("parts") and len(records("cols")) == 4


def test_sign_many_answers_as_before_through_the_columns(keyd_env):
    store, keyd, _log, _ = keyd_env
    kid = kid_for(store, "v")
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


def test_audit_unavailable_releases_nothing(keyd_env, monkeypatch):
    store, keyd, log, audit_dir = keyd_env
    kid = kid_for(store, "v")
    fail_audit_commits(monkeypatch, log)
    cols = KeydColumns.from_parts(
        [SignPart("p", f"u{i}", (_payload(sample("v"), i), b"\xa0")) for i in range(5)]
    )
    result = keyd.sign_columns(SignColumns(1, kid, cols))
    assert not result.signatures and result.codes.count(0) == 0
    assert set(result.codes) == {ItemError.AUDIT_UNAVAILABLE, ItemError.MALFORMED_CWT}
    assert not list(search(audit_dir))


def test_hostile_columns_that_bypass_the_codec_are_refused_not_crashed(keyd_env):
    store, keyd, _log, audit_dir = keyd_env
    kid = kid_for(store, "v")
    good = KeydColumns.from_parts([SignPart("p", "u", (_payload(sample("v")),))])
    bad = KeydColumns(
        good.payloads,
        good.ends,
        good.clients,
        ("x" * 2000,),
        good.operators,
        good.client_ix,
        good.account_ix,
        good.operator_ix,
    )
    result = keyd.sign_columns(SignColumns(1, kid, bad))
    assert result.results()[0][0] == ItemError.INTERNAL
    assert "accounts[0] must be a non-empty string" in result.reasons[0]
    assert not list(search(audit_dir))


def test_inactive_kid_and_empty_batches(keyd_env):
    store, keyd, *_ = keyd_env
    cols = KeydColumns.from_parts([SignPart("p", "u", (b"\xa0", b"\xa1"))])
    result = keyd.sign_columns(SignColumns(1, b"\x00" * 8, cols))
    assert result.results() == [(ItemError.KID_NOT_ACTIVE, "unknown kid")] * 2
    empty = keyd.sign_columns(SignColumns(2, kid_for(store, "v"), KeydColumns.from_parts([])))
    assert len(empty) == 0


def test_the_audit_caches_stay_bounded_and_keep_recent_entries(tmp_path, dev_keystore_copy):
    pw = resolve_passphrase(dev_keystore_copy)
    with AuditLog.open(tmp_path / "a", AuditKey.create(tmp_path / "k.pem", pw)) as log:
        for i in range(CACHE_ENTRIES + 500):
            log._issue_lines.text(f"uzi:{i}", "account", 0)
        assert len(log._issue_lines.texts) == CACHE_ENTRIES
        assert (
            f"uzi:{CACHE_ENTRIES + 499}" in log._issue_lines.texts
            and "uzi:0" not in log._issue_lines.texts
        )


def test_result_columns_hold_signatures_in_item_order(keyd_env):
    store, keyd, *_ = keyd_env
    kid = kid_for(store, "v")
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


# ----------------------------------------------------------------- SIGN_KIDS (several kids)


def _kid_batch(kind, n, start=0, bad=()):
    """Items of one DCC type under a few accounts; the items in *bad* are not CWTs."""
    return KeydColumns.from_parts([
        SignPart("portal-a", f"uzi:{kind}{i % 3}",
                 (b"\xa0" if i in bad else _payload(sample(kind), start + i),))
        for i in range(n)
    ])  # fmt: skip


def test_sign_kids_answers_each_batch_as_alone_in_one_commit(keyd_env):
    """Each kid's batch gets what SIGN_COLUMNS would give it (codes, reasons, valid
    signatures), an unknown kid's batch is refused alone, and the records of all of them are
    one commit; the log verifies."""
    store, keyd, log, audit_dir = keyd_env
    v, t = kid_for(store, "v"), kid_for(store, "t")
    batches = (
        SignColumns(0, v, _kid_batch("v", 7, bad={2})),
        SignColumns(0, b"\x00" * 8, _kid_batch("v", 2, 100)),
        SignColumns(0, t, _kid_batch("t", 5, 200)),
    )
    commits = _count_commits(log)
    answer = keyd.sign_kids(SignKids(4, batches))
    assert isinstance(answer, KidsResult) and answer.request_id == 4
    assert commits == [[6, 5]]
    r_v, r_unknown, r_t = answer.results
    assert [c for c in r_v.codes] == [0, 0, ItemError.MALFORMED_CWT, 0, 0, 0, 0]
    assert r_unknown.results() == [(ItemError.KID_NOT_ACTIVE, "unknown kid")] * 2
    assert r_t.codes == bytes(5)
    for kid, batch, result in ((v, batches[0], r_v), (t, batches[2], r_t)):
        entry = next(e for e in store.entries if e.kid == kid)
        payloads = [p for p, c in zip(batch.columns.payload_list(), result.codes,
                                      strict=True) if c == 0]  # fmt: skip
        texts = native.hc1_encode(native.protected_header(-7, kid), payloads,
                                  result.signature_list())  # fmt: skip
        assert all(verify_hc1(x, [entry.dsc]).valid for x in texts)
    # the same batch alone: the same codes and reasons
    alone = keyd.sign_columns(SignColumns(5, v, batches[0].columns))
    assert (alone.codes, alone.reasons) == (r_v.codes, r_v.reasons)
    records = list(search(audit_dir))
    assert len(records) == 11 + 6 and verify(audit_dir).ok
    assert sorted({r["kid"] for r in records}) == sorted({v.hex(), t.hex()})


def test_sign_kids_releases_nothing_when_the_commit_fails(keyd_env, monkeypatch):
    store, keyd, log, audit_dir = keyd_env
    fail_audit_commits(monkeypatch, log)
    answer = keyd.sign_kids(SignKids(1, (
        SignColumns(0, kid_for(store, "v"), _kid_batch("v", 3, bad={1})),
        SignColumns(0, kid_for(store, "t"), _kid_batch("t", 2)),
    )))  # fmt: skip
    r_v, r_t = answer.results
    assert not r_v.signatures and not r_t.signatures
    assert list(r_v.codes) == [
        ItemError.AUDIT_UNAVAILABLE,
        ItemError.MALFORMED_CWT,
        ItemError.AUDIT_UNAVAILABLE,
    ]
    assert set(r_t.codes) == {ItemError.AUDIT_UNAVAILABLE}
    assert "No space" in r_t.reasons[0]
    assert not list(search(audit_dir))


def test_a_kids_audit_batch_that_fails_its_checks_writes_nothing(keyd_env, tmp_path):
    """append_columns_many refuses a malformed batch before writing any of them."""
    store, keyd, log, audit_dir = keyd_env
    v = kid_for(store, "v")
    good = keyd.sign_columns(SignColumns(1, v, _kid_batch("v", 2)))
    before = len(list(search(audit_dir)))
    cols = _kid_batch("v", 2, 50)
    facts = native.keyd_check_columns(cols.payloads, cols.ends, cols.client_ix, b"\x01", 10_000,
                                      0, 2**40, 2**40, "vtr")[1]  # fmt: skip
    ok = (v, -7, cols, facts, array("I", [0, 1]), good.signatures, good.sig_ends)
    broken = (v, -7, cols, facts, array("I", [0, 1]), good.signatures[:-1], good.sig_ends)
    with pytest.raises(ValueError):
        log.append_columns_many([ok, broken])
    assert len(list(search(audit_dir))) == before and verify(audit_dir).ok
    first, second = log.append_columns_many([ok, ok])
    assert len(first) == len(second) == 2 and first.stop == second.start
    assert len(list(search(audit_dir))) == before + 4 and verify(audit_dir).ok


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

    from dccsign.server.batcher import KeydBatcher

    keyd = ColumnsKeyd()
    batcher = KeydBatcher(keyd, window=0.05)
    encoded = []

    def fake_encode(protected, payloads, signatures, level=9):
        encoded.append(len(payloads))
        return [
            f"HC1:{s.rstrip(b'.').decode()}:{p.decode()}"
            for p, s in zip(payloads, signatures, strict=True)
        ]

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


class KidsKeyd(ColumnsKeyd):
    """ColumnsKeyd that also speaks SIGN_KIDS (records each message's kids)."""

    def __init__(self):
        super().__init__()
        self.kids_calls = []

    async def sign_kids(self, batches):
        self.kids_calls.append([(kid, len(cols)) for kid, cols in batches])
        return [await self.sign_columns(kid, cols) for kid, cols in batches]


def hc1_as_strings(monkeypatch) -> None:
    """Make ``native.hc1_encode`` answer "PROTECTED:SIGNATURE:PAYLOAD" strings."""
    monkeypatch.setattr(native, "hc1_encode", lambda prot, payloads, sigs, level=9: [
        f"{prot.decode()}:{s.rstrip(b'.').decode()}:{p.decode()}"
        for p, s in zip(payloads, sigs, strict=True)
    ])  # fmt: skip


async def issue_for_three_kids(batcher) -> dict:
    """Run *batcher* while four waiters ask at once for three kids (b"v" * 8 twice), two of
    them wanting columns; return each waiter's answer by name (v1, t1, v2, r1)."""
    import trio

    out = {}

    async def one(name, kid, parts, raw=False):
        cols = KeydColumns.from_parts(parts)
        if raw:
            out[name] = await batcher.issue_columns(kid, b"P" + kid[:1], cols)
        else:
            out[name] = await batcher.issue(kid, b"P" + kid[:1], cols)

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as inner:
            inner.start_soon(one, "v1", b"v" * 8, [SignPart("p", "a", (b"v1", b"X1"))])
            inner.start_soon(one, "t1", b"t" * 8, [SignPart("p", "b", (b"t1",))], True)
            inner.start_soon(one, "v2", b"v" * 8, [SignPart("q", "c", (b"v2",))], True)
            inner.start_soon(one, "r1", b"r" * 8, [SignPart("q", "d", (b"r1",))])
        nursery.cancel_scope.cancel()
    return out


async def test_the_batcher_sends_every_pending_kid_in_one_sign_kids(monkeypatch):
    from dccsign.server.batcher import KeydBatcher

    keyd = KidsKeyd()
    batcher = KeydBatcher(keyd, window=0.05)
    hc1_as_strings(monkeypatch)
    out = await issue_for_three_kids(batcher)
    # one message: three kids (in the order their first request came: trio's), each kid's
    # requests concatenated
    (kids,) = keyd.kids_calls
    assert sorted(kids) == [(b"r" * 8, 1), (b"t" * 8, 1), (b"v" * 8, 3)]
    assert out["v1"] == ["Pv:a:v1", (ItemError.MALFORMED_CWT, "bad a")]
    assert out["r1"] == ["Pr:d:r1"]
    assert out["t1"].signature_list() == [b"b".ljust(64, b".")]
    assert out["v2"].codes == b"\x00" and out["v2"].signature_list() == [b"c".ljust(64, b".")]
    assert batcher.batches_sent == 1 and batcher.payloads_sent == 5


async def test_a_failed_sign_kids_fails_every_waiter_of_every_kid():
    import trio

    from dccsign.keyd.client import KeydError
    from dccsign.server.batcher import KeydBatcher

    class Broken(KidsKeyd):
        async def sign_kids(self, batches):
            raise KeydError("keyd connection failed: gone")

    batcher = KeydBatcher(Broken(), window=0.05)
    errors = []

    async def one(kid):
        try:
            await batcher.issue_columns(kid, b"P", KeydColumns.from_parts(
                [SignPart("p", "a", (b"x",))]))  # fmt: skip
        except KeydError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as inner:
            for kid in (b"v" * 8, b"t" * 8):
                inner.start_soon(one, kid)
        nursery.cancel_scope.cancel()
    assert errors == ["keyd connection failed: gone"] * 2


@pytest.mark.parametrize("broken_first", [True, False])
def test_a_kid_whose_signing_fails_is_refused_and_the_others_are_signed(keyd_env, broken_first):
    """A signing failure (in a worker or in keyd's own thread: the last job runs there)
    refuses that kid's items INTERNAL and audits none of them; the message's other kids
    are signed and audited."""
    store, keyd, _log, audit_dir = keyd_env
    v, t = kid_for(store, "v"), kid_for(store, "t")

    class Broken:
        def sign(self, protected, payloads):
            raise RuntimeError("token removed")

    keyd._keys[v].key = Broken()
    batches = [SignColumns(0, v, _kid_batch("v", 3)), SignColumns(0, t, _kid_batch("t", 2))]
    if not broken_first:
        batches.reverse()
    answer = keyd.sign_kids(SignKids(1, tuple(batches)))
    by_kid = {b.kid: r for b, r in zip(batches, answer.results, strict=True)}
    assert by_kid[v].results() == [(ItemError.INTERNAL, "signing failed: RuntimeError")] * 3
    assert by_kid[t].codes == bytes(2)
    assert {r["kid"] for r in search(audit_dir)} == {t.hex()}
