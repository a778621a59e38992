"""The engine as a process (``dccsign serve``): Unix socket and TLS, policy, quotas, kill
switch, idempotent retries, keyd restart after SIGKILL, malformed frames, drain on SIGTERM."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from dccsign.audit import search
from dccsign.devtls import DEV_CLIENT_NAME, ensure_dev_tls
from dccsign.keystore import Keystore
from dccsign.protocol.client import Client, ClientError
from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.wire import SignItem
from dccsign.samples import sample, varied_samples
from independent import node_available, verify_node, verify_pycose

pytestmark = pytest.mark.slow
UID = os.getuid()


def _policy(path, **local):
    doc = {
        "clients": {"local": local or {}, DEV_CLIENT_NAME: {}},
        "unix_uids": {str(UID): "local"},
    }
    path.write_text(json.dumps(doc))
    os.utime(path, ns=(time.time_ns(), time.time_ns()))


class Engine:
    def __init__(self, keystore, tmp_path, *, tcp=True):
        self.keystore = keystore
        self.sock = tmp_path / "engine.sock"
        self.policy = keystore / "policy.json"
        if not self.policy.exists():
            _policy(self.policy)
        self.tls = ensure_dev_tls(keystore / "dev-tls")
        argv = [sys.executable, "-m", "dccsign", "serve", "--keystore", str(keystore)]
        argv += ["--unix", str(self.sock)]
        if tcp:
            self.port = _free_port()
            argv += ["--tcp", f"127.0.0.1:{self.port}", "--tls-cert", str(self.tls["server_cert"])]
            argv += ["--tls-key", str(self.tls["server_key"]), "--client-ca", str(self.tls["ca"])]
        self.log = tmp_path / "engine.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stderr=log)
        deadline = time.monotonic() + 60
        while not _accepts(self.sock):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "engine did not start"
            time.sleep(0.05)

    def client(self, **kw):
        return Client(f"unix:{self.sock}", **kw)

    def tls_client(self, with_cert=True):
        kw = {"ca": self.tls["ca"]}
        if with_cert:
            kw |= {"cert": self.tls["client_cert"], "key": self.tls["client_key"]}
        return Client(f"127.0.0.1:{self.port}", **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(path):
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


@pytest.fixture
def engine(dev_keystore_copy, tmp_path):
    e = Engine(dev_keystore_copy, tmp_path)
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
    _policy(dev_keystore_copy / "policy.json", kids=[other.hex()])
    e = Engine(dev_keystore_copy, tmp_path, tcp=False)
    try:
        with e.client() as c:
            r = c.sign(sample("v"), account="uzi:1")
        assert r.error == ErrorCode.KID_NOT_ALLOWED
        assert list(search(dev_keystore_copy / "audit", account="uzi:1")) == []
    finally:
        e.stop()


def test_account_quota_and_kill_switch(dev_keystore_copy, tmp_path):
    _policy(dev_keystore_copy / "policy.json", account_quota={"per_hour": 2})
    e = Engine(dev_keystore_copy, tmp_path, tcp=False)
    try:
        with e.client(retries=0) as c:
            results = [c.sign(sample("v"), account="uzi:7") for _ in range(3)]
            assert [r.ok for r in results] == [True, True, False]
            assert results[2].error == ErrorCode.QUOTA_ACCOUNT and results[2].retry_after_ms
            assert c.sign(sample("v"), account="uzi:8").ok  # another account
            _policy(dev_keystore_copy / "policy.json", disabled=True)
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
    assert first.ok and again.hc1 == first.hc1
    assert other.error == ErrorCode.IDEMPOTENCY_CONFLICT
    assert len(list(search(engine.keystore / "audit", account="uzi:5"))) == 1


def test_keyd_killed_is_restarted(engine):
    with engine.client() as c:
        assert c.sign(sample("v"), account="uzi:1").ok
        keyd = subprocess.run(
            ["pgrep", "-f", "-P", str(engine.proc.pid), "dccsign keyd"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        os.kill(int(keyd[0]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (r := c.sign(sample("v"), account="uzi:1")).ok:
            assert r.error in (ErrorCode.KEYD_UNAVAILABLE,), r
            assert time.monotonic() < deadline, "keyd was not restarted"
            time.sleep(0.2)
    out = subprocess.run(
        [sys.executable, "-m", "dccsign", "audit", "verify", str(engine.keystore / "audit")],
        capture_output=True, text=True,
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
    e = Engine(dev_keystore_copy, tmp_path, tcp=False)
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
