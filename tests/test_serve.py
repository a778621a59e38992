"""The engine as a process (``dccsign serve``): Unix socket and TLS, policy, quotas, kill
switch, idempotent retries, BUSY under overload, micro-batching across connections, keyd
restart after SIGKILL, malformed frames, drain on SIGTERM."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from dccsign.audit.search import search
from dccsign.keys.keystore import Keystore
from dccsign.protocol.clients.blocking import ClientError
from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.wire import SignItem
from dccsign.testing.samples import sample, varied_samples
from engine_process import EngineProcess, write_policy
from independent import node_available, verify_node, verify_pycose

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(dev_keystore_copy, tmp_path):
    e = EngineProcess(dev_keystore_copy, tmp_path)
    yield e
    e.stop()


def _dsc(keystore, kid):
    return next(e.dsc.der for e in Keystore.open(keystore).entries if e.kid == kid)


def test_unix_and_tls_sign_and_independent_verifiers_accept(engine):
    dccs = varied_samples(9)
    with engine.client() as c:
        unix = c.sign_batch([SignItem(d, "uzi:900001", "assistant:7") for d in dccs])
    with engine.tls_client() as c:
        tls = c.sign_batch([SignItem(d, "uzi:900002") for d in dccs])
    results = unix + tls
    assert all(r.ok for r in results), [r.message for r in results if not r.ok]
    items = [(r.hc1, _dsc(engine.keystore, r.kid)) for r in results]
    assert all(verify_pycose(h, d).ok for h, d in items[:3])
    if node_available():
        assert all(v.ok for v in verify_node(items)), verify_node(items)
    elif os.environ.get("CI") == "true":
        pytest.fail("node verifier unavailable under CI")
    records = list(search(engine.keystore / "audit", account="uzi:900001"))
    assert len(records) == 9 and {r["client"] for r in records} == {"local"}
    assert {r["operator"] for r in records} == {"assistant:7"}


def test_tls_without_client_certificate_is_refused(engine):
    with pytest.raises(ClientError):
        with engine.tls_client(with_cert=False) as c:
            c.sign(sample("v"), account="uzi:1")


def test_client_not_allowed_a_kid_signs_nothing(dev_keystore_copy, tmp_path):
    store = Keystore.open(dev_keystore_copy)
    other = next(e.kid for e in store.entries if e.dsc.usages == frozenset("t"))
    write_policy(dev_keystore_copy / "policy.json", kids=[other.hex()])
    e = EngineProcess(dev_keystore_copy, tmp_path, tcp=False)
    try:
        with e.client() as c:
            r = c.sign(sample("v"), account="uzi:1")
        assert r.error == ErrorCode.KID_NOT_ALLOWED
        assert list(search(dev_keystore_copy / "audit", account="uzi:1")) == []
    finally:
        e.stop()


def test_account_quota_and_kill_switch(dev_keystore_copy, tmp_path):
    write_policy(dev_keystore_copy / "policy.json", account_quota={"per_hour": 2})
    e = EngineProcess(dev_keystore_copy, tmp_path, tcp=False)
    try:
        with e.client(retries=0) as c:
            results = [c.sign(sample("v"), account="uzi:7") for _ in range(3)]
            assert [r.ok for r in results] == [True, True, False]
            assert results[2].error == ErrorCode.QUOTA_ACCOUNT and results[2].retry_after_ms
            assert c.sign(sample("v"), account="uzi:8").ok  # another account
            write_policy(dev_keystore_copy / "policy.json", disabled=True)
            deadline = time.monotonic() + 2
            n = 0
            while (r := c.sign(sample("v"), account=f"uzi:9{(n := n + 1)}")).ok:
                assert time.monotonic() < deadline, "kill switch not applied within 2 s"
                time.sleep(0.1)
            assert r.error == ErrorCode.CLIENT_DISABLED
    finally:
        e.stop()


def test_idempotent_retry_returns_the_first_signature(engine):
    with engine.client() as c:
        first = c.sign(sample("v"), account="uzi:5", idempotency_key="req-1")
        again = c.sign(sample("v"), account="uzi:5", idempotency_key="req-1")
        other = c.sign(sample("t"), account="uzi:5", idempotency_key="req-1")
        reordered = dict(reversed(sample("v").items()))
        shuffled = c.sign(reordered, account="uzi:5", idempotency_key="req-1")
    assert first.ok and again.hc1 == first.hc1
    assert other.error == ErrorCode.IDEMPOTENCY_CONFLICT
    assert shuffled.error == ErrorCode.IDEMPOTENCY_CONFLICT  # SPEC.md 10: order sent counts
    assert len(list(search(engine.keystore / "audit", account="uzi:5"))) == 1


def test_keyd_killed_is_restarted(engine):
    with engine.client() as c:
        assert c.sign(sample("v"), account="uzi:1").ok
        keyd = subprocess.run(
            ["pgrep", "-f", "-P", str(engine.proc.pid), "dccsign keyd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        os.kill(int(keyd[0]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (r := c.sign(sample("v"), account="uzi:1")).ok:
            assert r.error in (ErrorCode.KEYD_UNAVAILABLE,), r
            assert time.monotonic() < deadline, "keyd was not restarted"
            time.sleep(0.2)
    out = subprocess.run(
        [sys.executable, "-m", "dccsign", "audit", "verify", str(engine.keystore / "audit")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_malformed_frame_closes_only_that_connection(engine):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(engine.sock))
        s.sendall(b"XX" + b"\x00" * 14)
        s.settimeout(5)
        data = s.recv(4096)
        assert data[:2] == b"DC" and data[3] == 0x7F  # an ERROR frame first
        assert s.recv(4096) in (b"",)  # then the engine closes
    with engine.client() as c:
        assert c.sign(sample("r"), account="uzi:1").ok


def test_sigterm_drains_and_exits(engine):
    with engine.client() as c:
        assert c.sign(sample("v"), account="uzi:1").ok
        assert engine.stop() == 0
        with pytest.raises(ClientError):
            c.sign(sample("v"), account="uzi:1")


def test_unknown_unix_peer_is_refused(dev_keystore_copy, tmp_path):
    (dev_keystore_copy / "policy.json").write_text(json.dumps({"clients": {"x": {}}}))
    e = EngineProcess(dev_keystore_copy, tmp_path, tcp=False)
    try:
        with pytest.raises(ClientError, match="UNAUTHENTICATED"):
            with e.client() as c:
                c.sign(sample("v"), account="uzi:1")
    finally:
        e.stop()


def test_tls_handshake_without_client_certificate_gets_no_service(engine):
    ctx = ssl.create_default_context(cafile=str(engine.tls["ca"]))
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"DC")
                assert s.recv(10) == b""  # TLS 1.3: the refusal arrives after the handshake
        except (ssl.SSLError, ConnectionError):
            pass


def _in_threads(n, fn):
    out, errors = [None] * n, []

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as exc:  # surfaced below, with the thread's index
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


def test_busy_under_overload_signs_nothing_it_refuses(dev_keystore_copy, tmp_path):
    """More certificates in progress than --max-pending-items: the excess gets BUSY at once
    with a retry-after hint, nothing refused is signed or audited, and a client that honours
    the hint gets everything signed afterwards."""
    e = EngineProcess(dev_keystore_copy, tmp_path, tcp=False, extra=["--max-pending-items", "30"])
    try:
        dccs = varied_samples(10)
        with e.client(retries=0) as c:
            batches = _in_threads(
                16, lambda i: c.sign_batch([SignItem(d, f"uzi:busy{i}") for d in dccs])
            )
        results = [r for batch in batches for r in batch]
        busy = [r for r in results if r.error == ErrorCode.BUSY]
        ok = [r for r in results if r.ok]
        assert busy and ok and len(busy) + len(ok) == len(results)
        assert all(r.retry_after_ms and r.retry_after_ms > 0 for r in busy)
        audit = e.keystore / "audit"
        audited = [r for i in range(16) for r in search(audit, account=f"uzi:busy{i}")]
        assert len(audited) == len(ok)
        # The same load from a client that retries after the hint: all signed.
        with e.client(retries=50) as c:
            batches = _in_threads(
                16, lambda i: c.sign_batch([SignItem(d, f"uzi:again{i}") for d in dccs])
            )
        assert all(r.ok for batch in batches for r in batch)
    finally:
        e.stop()


def test_requests_from_many_connections_share_keyd_rounds(dev_keystore_copy, tmp_path):
    """Single requests from 16 connections reach keyd in fewer SIGN_MANY micro-batches than
    requests, and each certificate is still audited under its own account."""
    e = EngineProcess(
        dev_keystore_copy,
        tmp_path,
        tcp=False,
        http=True,
        extra=["--keyd-connections", "1", "--batch-window", "5"],
    )
    try:

        def portal(i):
            with e.client() as c:
                return [c.sign(sample("vtr"[n % 3]), account=f"uzi:mb{i}") for n in range(10)]

        results = [r for rs in _in_threads(16, portal) for r in rs]
        assert all(r.ok for r in results), [r.message for r in results if not r.ok]
        batches = e.metric("dccsign_keyd_batch_payloads_count")
        payloads = e.metric("dccsign_keyd_batch_payloads_sum")
        assert payloads == 160 and batches < 160
        # The stage metrics: start and prepare once per request, the others once per
        # micro-batch.
        stage = {
            name: e.metric(f'dccsign_stage_seconds_count{{stage="{name}"}}')
            for name in ("start", "prepare", "batch_wait", "keyd", "encode")
        }
        assert stage == {
            "start": 160,
            "prepare": 160,
            "batch_wait": batches,
            "keyd": batches,
            "encode": batches,
        }
        for i in range(16):
            assert len(list(search(e.keystore / "audit", account=f"uzi:mb{i}"))) == 10
    finally:
        e.stop()


def test_nonce_pool_level_and_refills_are_exported(dev_keystore_copy, tmp_path):
    """keyd's pools reach /metrics (through DESCRIBE): level, capacity, and the refilled,
    spent and misses counts, per kid; signing spends entries and the refill replaces them."""
    e = EngineProcess(
        dev_keystore_copy, tmp_path, tcp=False, http=True, extra=["--nonce-pool", "500"]
    )
    try:
        kids = [x.kid.hex() for x in Keystore.open(dev_keystore_copy).entries if x.dsc.alg == -7]

        def series(name, kid):
            return e.metric(f'dccsign_keyd_nonce_pool_{name}{{kid="{kid}"}}')

        deadline = time.monotonic() + 60
        while any(series("entries", k) < 500 for k in kids):
            assert time.monotonic() < deadline, "the pools never filled"
            time.sleep(0.1)
        assert all(series("capacity", k) == 500 for k in kids)
        # keyd's own log reaches the engine's: each pool, and whether its memory is locked
        log = e.log.read_text()
        assert all(f"nonce pool for key {k}" in log for k in kids), log
        with e.client() as c:
            results = c.sign_batch([SignItem(sample("v"), "uzi:pool") for _ in range(40)])
        assert all(r.ok for r in results)
        kid = results[0].kid.hex()
        while series("spent_total", kid) < 40:  # DESCRIBE runs every 0.25 s
            assert time.monotonic() < deadline, "spent entries never showed"
            time.sleep(0.05)
        assert series("spent_total", kid) == 40 and series("misses_total", kid) == 0
        # Signed from the pool end to end, and accepted by both independent verifiers.
        items = [(r.hc1, _dsc(dev_keystore_copy, r.kid)) for r in results]
        assert all(verify_pycose(h, d).ok for h, d in items)
        if node_available():
            assert all(v.ok for v in verify_node(items)), verify_node(items)
        elif os.environ.get("CI") == "true":
            pytest.fail("node verifier unavailable under CI")
        while series("refilled_total", kid) < 540:
            assert time.monotonic() < deadline, "the pool was not refilled"
            time.sleep(0.05)
    finally:
        e.stop()


def test_sigterm_finishes_requests_in_progress(dev_keystore_copy, tmp_path):
    engine = EngineProcess(dev_keystore_copy, tmp_path, tcp=False, http=True)
    dccs = varied_samples(50)
    box = []
    try:
        with engine.client() as c:
            worker = threading.Thread(
                target=lambda: box.append(
                    c.sign_batch([SignItem(d, "uzi:drain") for d in dccs * 20])
                )
            )
            worker.start()
            # SIGTERM only once the engine holds the batch of 1,000 (sending it can take a
            # while on a busy machine; a request not yet received is not in progress).
            deadline = time.monotonic() + 30
            while not box and engine.metric("dccsign_pending_items") < 1000:
                assert time.monotonic() < deadline, "the batch never reached the engine"
                time.sleep(0.002)
            assert engine.stop() == 0
            worker.join(30)
    finally:
        engine.stop()
    assert len(box[0]) == 1000 and all(r.ok for r in box[0])
    assert len(list(search(engine.keystore / "audit", account="uzi:drain"))) == 1000


def test_client_pong_is_accepted_and_client_error_ends_the_connection(engine):
    from dccsign.protocol import wire

    def exchange(s, codec, frame):
        s.sendall(frame)
        while (event := codec.next_event()) is wire.NEED_DATA:
            codec.receive_data(s.recv(65536))
        return event

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(engine.sock))
        s.settimeout(10)
        codec = wire.Connection(wire.CLIENT)
        assert isinstance(exchange(s, codec, codec.send(codec.make_hello())), wire.Welcome)
        # An unsolicited PONG (SPEC.md 6.3: either side may ping) is no protocol error.
        s.sendall(codec.send(wire.Pong(request_id=9, data=b"")))
        reply = exchange(s, codec, codec.send(wire.Ping(request_id=1, data=b"still here")))
        assert isinstance(reply, wire.Pong) and reply.data == b"still here"
        # A connection-level ERROR from the client: the engine closes without a word.
        leaving = wire.Error(request_id=0, code=ErrorCode.INTERNAL, message="bye", fatal=True)
        s.sendall(codec.send(leaving))
        assert s.recv(65536) == b""


def test_deadline_answers_early_and_a_retry_gets_the_first_signatures(dev_keystore_copy, tmp_path):
    """A request past its deadline gets DEADLINE_EXCEEDED, but the work already handed to
    keyd is not thrown away: a retry with the same idempotency keys returns those first
    signatures, and the audit log holds each certificate once."""
    e = EngineProcess(dev_keystore_copy, tmp_path, tcp=False, extra=["--deadline", "0.001"])
    try:
        items = [
            SignItem(d, "uzi:late", idempotency_key=f"late-{n}")
            for n, d in enumerate(varied_samples(200))
        ]
        with e.client(retries=0) as c:
            first = c.sign_batch(items)
        assert {r.error for r in first} == {ErrorCode.DEADLINE_EXCEEDED}
        assert all(r.retry_after_ms for r in first)
        with e.client(retries=50) as c:
            again = c.sign_batch(items)
        assert all(r.ok for r in again)
        audited = list(search(e.keystore / "audit", account="uzi:late"))
        assert len(audited) == 200
    finally:
        e.stop()
