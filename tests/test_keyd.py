"""keyd: its own payload checks, audit before release, key states, and the Unix socket server."""

import json
import os
import stat
import threading
import time

import cbor2
import pytest

from conftest import fail_audit_commits, kid_for
from dccsign import native
from dccsign.audit.errors import AuditUnavailable
from dccsign.audit.key import AuditKey
from dccsign.audit.search import search
from dccsign.audit.verify import verify
from dccsign.audit.writer import AuditLog
from dccsign.dcc.issuer import claims_prefix
from dccsign.dcc.verify import verify_hc1
from dccsign.keyd.client import KeydClient
from dccsign.keyd.service import Keyd
from dccsign.keyd.transport import serve_unix
from dccsign.keys.keystore import Keystore, resolve_passphrase
from dccsign.protocol.keyd import ItemError, SignPayloads
from dccsign.testing.samples import sample


def _payload(dcc, *, iat=None, exp=None, iss="NL"):
    now = int(time.time())
    iat = now - 3600 if iat is None else iat
    exp = now + 86400 if exp is None else exp
    return claims_prefix(iss, iat, exp) + cbor2.dumps(dcc)


def _sign(keyd, kid, payloads, client="portal", account="uzi:900001", operator=None):
    return keyd.sign(SignPayloads(1, kid, client, account, tuple(payloads), operator)).results


def test_signs_audits_and_verifies(keyd_env):
    store, keyd, _log, audit_dir = keyd_env
    kid = kid_for(store, "v")
    payloads = [_payload(sample("v")) for _ in range(5)]
    results = _sign(keyd, kid, payloads, operator="assistant:42")
    assert all(isinstance(r, bytes) and len(r) == 64 for r in results)
    entry = next(e for e in store.entries if e.kid == kid)
    protected = native.protected_header(-7, kid)
    for text in native.hc1_encode(protected, payloads, results):
        assert verify_hc1(text, [entry.dsc]).valid
    records = list(search(audit_dir, account="uzi:900001"))
    assert len(records) == 5
    assert {r["operator"] for r in records} == {"assistant:42"}
    assert verify(audit_dir).ok


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda d: b"\xff", ItemError.MALFORMED_CWT),
        (lambda d: cbor2.dumps({1: "NL", 4: 2, 6: 1}), ItemError.MALFORMED_CWT),
        (lambda d: cbor2.dumps({1: "NL", 4: 2.0, 6: 1, -260: {1: d}}), ItemError.MALFORMED_CWT),
        (lambda d: _payload(d) + b"\x00", ItemError.MALFORMED_CWT),
        (
            lambda d: cbor2.dumps(
                {1: "NL", 4: int(time.time()) + 9, 6: int(time.time()) - 9, -260: {1: d}, 99: 1}
            ),
            ItemError.MALFORMED_CWT,
        ),
        (
            lambda d: _payload({"ver": "1.3.0", "v": [{"ci": "URN:UVCI:01:NL:X"}] * 2}),
            ItemError.MALFORMED_CWT,
        ),
        (lambda d: _payload({**d, "t": d["v"]}), ItemError.MALFORMED_CWT),
        (lambda d: _payload(d, exp=int(time.time()) + 10 * 365 * 86400), ItemError.EXP_AFTER_DSC),
        (lambda d: _payload(d, iat=int(time.time()) - 10 * 86400), ItemError.IAT_BEFORE_DSC),
        (lambda d: _payload(d, iat=int(time.time()) + 600), ItemError.IAT_IN_FUTURE),
        (lambda d: _payload(d, exp=int(time.time()) - 7200), ItemError.EXP_NOT_AFTER_IAT),
        (lambda d: _payload(sample("t")), ItemError.TYPE_NOT_ALLOWED),
    ],
)
def test_refuses_per_item_and_signs_the_rest(keyd_env, make, code):
    store, keyd, _log, audit_dir = keyd_env
    good = _payload(sample("v"))
    results = _sign(keyd, kid_for(store, "v"), [good, make(sample("v")), good])
    assert isinstance(results[0], bytes) and isinstance(results[2], bytes)
    assert results[1][0] == code
    assert len(list(search(audit_dir))) == 2  # the refused item is not audited as issued


def test_full_dcc_validation_is_optional(dev_keystore_copy, tmp_path):
    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    kid = kid_for(store, "v")
    bad = _payload({**sample("v"), "dob": "1999-02-30"})
    key = AuditKey.create(tmp_path / "audit-key.pem", pw)
    for validate_dcc, ok in ((False, True), (True, False)):
        with AuditLog.open(tmp_path / f"audit-{validate_dcc}", key) as log:
            keyd = Keyd(store.directory, pw, log, validate_dcc=validate_dcc)
            try:
                result = _sign(keyd, kid, [bad])[0]
            finally:
                keyd.close()
        if ok:  # structurally sound: the engine's validator is what refuses such a date
            assert isinstance(result, bytes)
        else:
            assert result[0] == ItemError.INVALID_DCC
            assert "dob" in result[1]


def test_key_states_take_effect_within_a_second(keyd_env):
    store, keyd, _log, _audit_dir = keyd_env
    kid = kid_for(store, "v")
    assert isinstance(_sign(keyd, kid, [_payload(sample("v"))])[0], bytes)
    meta_path = store.directory / "keystore.json"
    meta = json.loads(meta_path.read_text())
    name = next(e.name for e in store.entries if e.kid == kid)
    for k in meta["keys"]:
        if k["name"] == name:
            k["state"] = "disabled"
    meta_path.write_text(json.dumps(meta))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        result = _sign(keyd, kid, [_payload(sample("v"))])[0]
        if not isinstance(result, bytes):
            break
        time.sleep(0.05)
    assert result == (ItemError.KID_NOT_ACTIVE, "key is disabled")
    assert _sign(keyd, b"\x00" * 8, [b""])[0][0] == ItemError.KID_NOT_ACTIVE


def test_audit_unavailable_stops_signing(keyd_env, monkeypatch):
    store, keyd, log, _audit_dir = keyd_env
    kid = kid_for(store, "v")
    fail_audit_commits(monkeypatch, log)
    results = _sign(keyd, kid, [_payload(sample("v"))] * 3)
    assert all(r[0] == ItemError.AUDIT_UNAVAILABLE and "No space" in r[1] for r in results)
    monkeypatch.undo()
    # keyd stays stopped: it retries the log only AUDIT_RETRY_FIRST later (resuming is
    # tested in test_audit_recovery.py).
    assert _sign(keyd, kid, [_payload(sample("v"))])[0][0] == ItemError.AUDIT_UNAVAILABLE


def test_client_allow_list(keyd_env):
    store, keyd, *_ = keyd_env
    kid = kid_for(store, "v")
    meta_path = store.directory / "keystore.json"
    meta = json.loads(meta_path.read_text())
    name = next(e.name for e in store.entries if e.kid == kid)
    next(k for k in meta["keys"] if k["name"] == name)["clients"] = ["portal-a"]
    meta_path.write_text(json.dumps(meta))
    keyd._next_check = 0
    assert isinstance(_sign(keyd, kid, [_payload(sample("v"))], client="portal-a")[0], bytes)
    assert _sign(keyd, kid, [_payload(sample("v"))], client="portal-b")[0][0] == (
        ItemError.CLIENT_NOT_ALLOWED
    )


def test_server_socket_and_client(keyd_env):
    store, keyd, _log, audit_dir = keyd_env
    path = audit_dir.parent / "keyd.sock"
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(
        target=serve_unix, args=(keyd, path), kwargs={"ready": ready, "stop": stop}, daemon=True
    )
    server.start()
    assert ready.wait(5)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with KeydClient(path) as client:
            keys = client.describe()
            assert sorted(k.alg for k in keys) == [-37, -7, -7, -7]
            assert all(k.dsc.startswith(b"\x30") for k in keys)
            kid = kid_for(store, "r")
            out = client.sign(kid, [_payload(sample("r"))] * 10, client="portal", account="a1")
            assert all(isinstance(s, bytes) for s in out)

        # Two clients at once, both served.
        def work(results):
            with KeydClient(path) as c:
                results.append(c.sign(kid, [_payload(sample("r"))] * 50, client="p", account="a2"))

        results: list = []
        threads = [threading.Thread(target=work, args=(results,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 2 and all(isinstance(s, bytes) for r in results for s in r)
    finally:
        stop.set()
        server.join(5)
    assert not path.exists()
    assert len(list(search(audit_dir))) == 110
    assert verify(audit_dir).ok


def test_wrong_passphrase_does_not_start(dev_keystore_copy, tmp_path):
    from dccsign.errors import KeystoreError

    store = Keystore.open(dev_keystore_copy)
    key = AuditKey.create(tmp_path / "k.pem", b"pw")
    with (
        AuditLog.open(tmp_path / "audit", key) as log,
        pytest.raises(KeystoreError, match=r"key\.pem"),
    ):
        Keyd(store.directory, b"wrong", log)


def test_no_export_and_no_digest_signing_surface():
    # The codec has exactly these request types; none carries a digest or asks for a key.
    from dccsign.protocol.keyd import MessageType

    assert {m.name for m in MessageType} == {
        "DESCRIBE",
        "DESCRIBE_RESULT",
        "SIGN",
        "SIGN_MANY",
        "SIGN_RESULT",
        "SIGN_COLUMNS",  # CWT payloads in columns, like SIGN_MANY: never a digest
        "SIGN_COLUMNS_RESULT",
        "SIGN_KIDS",  # several SIGN_COLUMNS bodies, one per kid: never a digest
        "SIGN_KIDS_RESULT",
        "ERROR",
    }
    assert not any(n in dir(Keyd) for n in ("export", "sign_digest", "private_key"))


def test_disable_applies_even_when_the_audit_log_fails(keyd_env, monkeypatch):
    store, keyd, log, _ = keyd_env
    vacc, test = kid_for(store, "v"), kid_for(store, "t")

    def broken(event):
        raise AuditUnavailable("Input/output error")

    monkeypatch.setattr(log, "append_key_event", broken)
    meta_path = store.directory / "keystore.json"
    meta = json.loads(meta_path.read_text())
    name = next(e.name for e in store.entries if e.kid == vacc)
    next(k for k in meta["keys"] if k["name"] == name)["state"] = "disabled"
    meta_path.write_text(json.dumps(meta))
    keyd._next_check = 0  # do not wait for the reload interval
    assert _sign(keyd, vacc, [_payload(sample("v"))])[0] == (
        ItemError.KID_NOT_ACTIVE,
        "key is disabled",
    )
    # The log could not record the change: keyd signs nothing more, with any key.
    result = _sign(keyd, test, [_payload(sample("t"))])[0]
    assert result[0] == ItemError.AUDIT_UNAVAILABLE and "Input/output" in result[1]


def test_batches_across_chunks_keep_order(keyd_env):
    from dccsign.keyd.service import SIGN_CHUNK

    store, keyd, _, audit_dir = keyd_env
    kid = kid_for(store, "v")
    n = SIGN_CHUNK * 3 + 5
    payloads = [
        _payload(sample("t"))
        if i % 7 == 3
        else _payload({**sample("v"), "dob": f"19{i % 90 + 10}"})
        for i in range(n)
    ]
    results = _sign(keyd, kid, payloads)
    entry = next(e for e in store.entries if e.kid == kid)
    protected = native.protected_header(-7, kid)
    signed = 0
    for i, (payload, result) in enumerate(zip(payloads, results, strict=True)):
        if i % 7 == 3:
            assert result[0] == ItemError.TYPE_NOT_ALLOWED
            continue
        (text,) = native.hc1_encode(protected, [payload], [result])
        verdict = verify_hc1(text, [entry.dsc])
        assert verdict.valid and verdict.dcc["dob"] == f"19{i % 90 + 10}"
        signed += 1
    assert len(list(search(audit_dir))) == signed


def test_sign_many_checks_allows_and_audits_each_part_alone(keyd_env):
    """SIGN_MANY (the engine's micro-batch): each part under its own client, account and
    operator -- a part whose client may not use the kid is refused while the others are
    signed -- and every record is audited under its own part, in one commit."""
    from dccsign.protocol.keyd import SignMany, SignPart

    store, keyd, log, audit_dir = keyd_env
    kid = kid_for(store, "v")
    meta_path = store.directory / "keystore.json"
    meta = json.loads(meta_path.read_text())
    name = next(e.name for e in store.entries if e.kid == kid)
    next(k for k in meta["keys"] if k["name"] == name)["clients"] = ["portal-a", "portal-c"]
    meta_path.write_text(json.dumps(meta))
    keyd._next_check = 0
    parts = (
        SignPart("portal-a", "uzi:1", tuple(_payload(sample("v")) for _ in range(40)), "op:1"),
        SignPart("portal-b", "uzi:2", (_payload(sample("v")),)),
        SignPart("portal-c", "uzi:3", (_payload(sample("t")), _payload(sample("v")))),
        SignPart("portal-a", "uzi:4", ()),
    )
    commits = []
    real = log.append_columns_many

    def counted(batches):
        commits.extend(len(selected) for _kid, _alg, _cols, _facts, selected, *_ in batches)
        return real(batches)

    log.append_columns_many = counted
    results = keyd.sign_many(SignMany(9, kid, parts)).results
    assert len(results) == 43 and commits == [41]  # one commit for both parts' records
    assert all(isinstance(r, bytes) for r in results[:40])
    assert results[40][0] == ItemError.CLIENT_NOT_ALLOWED
    assert results[41][0] == ItemError.TYPE_NOT_ALLOWED
    entry = next(e for e in store.entries if e.kid == kid)
    protected = native.protected_header(-7, kid)
    flat = [p for part in parts for p in part.payloads]
    for payload, sig in zip(flat[:40] + flat[42:43], results[:40] + results[42:43], strict=True):
        (text,) = native.hc1_encode(protected, [payload], [sig])
        assert verify_hc1(text, [entry.dsc]).valid
    records = list(search(audit_dir))
    by_account = {}
    for r in records:
        by_account.setdefault(r["account"], set()).add((r["client"], r["operator"]))
    assert by_account == {"uzi:1": {("portal-a", "op:1")}, "uzi:3": {("portal-c", None)}}
    assert len(records) == 41 and verify(audit_dir).ok


# ----------------------------------------------------------------------------- nonce pools


@pytest.fixture
def pooled(dev_keystore_copy, tmp_path):
    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    log = AuditLog.open(tmp_path / "audit", AuditKey.create(tmp_path / "audit-key.pem", pw))
    keyd = Keyd(store.directory, pw, log, nonce_pool=300)
    yield store, keyd, tmp_path / "audit"
    keyd.close()
    log.close()


def _pool(keyd, kid):
    return next(k.pool for k in keyd.describe() if k.kid == kid)


def _wait_full(keyd, kid, capacity=300):
    deadline = time.monotonic() + 30
    while (pool := _pool(keyd, kid)).level < capacity:
        assert time.monotonic() < deadline, pool
        time.sleep(0.02)
    return pool


def test_nonce_pools_for_active_es256_keys_only_and_spent_by_signing(pooled):
    store, keyd, audit_dir = pooled
    pools = {k.kid: k.pool for k in keyd.describe()}
    for entry in store.entries:
        if entry.dsc.alg == -7 and entry.state == "active":
            assert pools[entry.kid] is not None and pools[entry.kid].capacity == 300
        else:  # PS256 (and any inactive key): no pool
            assert pools[entry.kid] is None
    kid = kid_for(store, "v")
    before = _wait_full(keyd, kid)
    payloads = [_payload(sample("v")) for _ in range(120)]
    results = _sign(keyd, kid, payloads)
    after = _pool(keyd, kid)
    assert after.spent - before.spent == 120 and after.misses == before.misses
    entry = next(e for e in store.entries if e.kid == kid)
    texts = native.hc1_encode(native.protected_header(-7, kid), payloads, results)
    assert all(verify_hc1(t, [entry.dsc]).valid for t in texts)
    assert len({r[:32] for r in results}) == 120
    assert len(list(search(audit_dir, account="uzi:900001"))) == 120  # audited as any other
    _wait_full(keyd, kid)  # and refilled in the background


def test_disabling_a_key_wipes_its_pool_and_close_wipes_them_all(pooled):
    store, keyd, _ = pooled
    kid = kid_for(store, "v")
    _wait_full(keyd, kid)
    key = keyd._keys[kid].key
    meta_path = store.directory / "keystore.json"
    meta = json.loads(meta_path.read_text())
    name = next(e.name for e in store.entries if e.kid == kid)
    next(k for k in meta["keys"] if k["name"] == name)["state"] = "disabled"
    meta_path.write_text(json.dumps(meta))
    keyd._next_check = 0
    keyd.refresh()
    assert key.nonce_pool_info() is None and _pool(keyd, kid) is None
    others = [k.key for k in keyd._keys.values() if k.key.nonce_pool_info() is not None]
    assert others  # the other ES256 keys keep theirs
    keyd.close()
    assert all(k.nonce_pool_info() is None for k in others)


def test_no_pools_when_disabled(keyd_env):
    _store, keyd, _log, _ = keyd_env  # nonce_pool=0, the Keyd default
    assert all(k.pool is None for k in keyd.describe())


def test_mlock_failure_is_logged_not_fatal(caplog):
    from dccsign.keyd.service import _log_pool

    info = native.NoncePoolInfo(
        65536, 0, 0, 0, 0, 0, False, "Cannot allocate memory", True, True, False, "SCHED_IDLE"
    )

    class Loaded:
        name = "k"

        class dsc:
            kid = b"\x01" * 8

    with caplog.at_level("WARNING", logger="dccsign.keyd"):
        _log_pool(Loaded, info)
    assert "mlock failed (Cannot allocate memory)" in caplog.text
    assert "4,096 KiB" in caplog.text


def test_cli_default_nonce_pool_matches_keyd():
    from dccsign.cli import keyd as cli
    from dccsign.keyd import service as keyd

    assert cli.NONCE_POOL_DEFAULT == keyd.DEFAULT_NONCE_POOL


def test_a_pool_that_cannot_be_made_does_not_stop_keyd(dev_keystore_copy, tmp_path, caplog):
    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    log = AuditLog.open(tmp_path / "audit", AuditKey.create(tmp_path / "audit-key.pem", pw))
    with caplog.at_level("WARNING", logger="dccsign.keyd"):
        keyd = Keyd(store.directory, pw, log, nonce_pool=1 << 25)  # beyond the 16 Mi bound
    try:
        assert "no nonce pool" in caplog.text
        assert all(k.pool is None for k in keyd.describe())
        kid = kid_for(store, "v")
        assert isinstance(_sign(keyd, kid, [_payload(sample("v"))])[0], bytes)
    finally:
        keyd.close()
        log.close()


def test_the_pure_python_reference_gets_a_smaller_pool(dev_keystore_copy, tmp_path):
    """Its refill runs Python holding the GIL: keyd caps its pools (a pool sized for the
    native burst kept keyd's other threads waiting for seconds under load)."""
    from dccsign.keyd import service as keyd_module
    from dccsign.native import implementation

    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    log = AuditLog.open(tmp_path / "audit", AuditKey.create(tmp_path / "audit-key.pem", pw))
    keyd = Keyd(store.directory, pw, log, nonce_pool=1 << 20, impl=implementation("python"))
    try:
        sizes = {k.pool.capacity for k in keyd.describe() if k.pool is not None}
        assert sizes == {keyd_module.PURE_PYTHON_NONCE_POOL}
    finally:
        keyd.close()
        log.close()


def test_keyd_on_the_facade_caps_its_pools_when_the_reference_is_selected(monkeypatch):
    """keyd's default impl is the dccsign.native facade: the cap follows what it bound."""
    from dccsign import native
    from dccsign.keyd import service as keyd_module

    class Facade:
        __name__ = "dccsign.native"
        IMPLEMENTATION = "python"

    k = object.__new__(Keyd)
    k._impl, k.nonce_pool = Facade(), 1 << 20
    assert k._pool_size() == keyd_module.PURE_PYTHON_NONCE_POOL
    k._impl = native
    assert k._pool_size() == (
        keyd_module.PURE_PYTHON_NONCE_POOL if native.IMPLEMENTATION == "python" else 1 << 20
    )


def test_a_pooled_batch_is_signed_in_keyds_own_thread(pooled, monkeypatch):
    """With a nonce for every item in the pool, signing costs ~1 us each: the batch is not
    split over the signing workers (a hand-off costs more). Without enough, it is."""
    store, keyd, _ = pooled
    kid = kid_for(store, "v")
    _wait_full(keyd, kid)
    handed: list[int] = []
    submit = keyd._signers.submit

    def counting(fn, protected, payloads):
        handed.append(len(payloads))
        return submit(fn, protected, payloads)

    monkeypatch.setattr(keyd._signers, "submit", counting)
    payloads = [_payload(sample("v")) for _ in range(200)]
    first = _sign(keyd, kid, payloads)
    assert handed == [] and len(first) == 200
    entry = next(e for e in store.entries if e.kid == kid)
    texts = native.hc1_encode(native.protected_header(-7, kid), payloads, first)
    assert all(verify_hc1(t, [entry.dsc]).valid for t in texts)
    # 400 items against a pool of at most 300: split over the workers as without a pool.
    results = _sign(keyd, kid, [_payload(sample("v")) for _ in range(400)])
    assert handed and sum(handed) < 400 and all(isinstance(r, bytes) for r in results)
