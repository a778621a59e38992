"""keyd as a process: start and stop, SIGKILL under load, and the isolation proof."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from hashlib import sha256

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import kid_for
from dccsign.audit.search import search
from dccsign.audit.verify import verify
from dccsign.dcc.issuer import claims_prefix
from dccsign.keyd.client import KeydClient, KeydError
from dccsign.keys.keystore import Keystore, resolve_passphrase
from dccsign.testing.net import accepts_unix
from dccsign.testing.samples import sample
from engine_process import keyd_argv


def start_keyd(keystore, sock, env=None):
    """Start ``dccsign keyd``; its stderr goes to a log file beside the socket."""
    log_path = sock.with_suffix(".log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            keyd_argv(keystore, sock),
            stderr=log,
            env=env,
        )
    deadline = time.monotonic() + 20
    # A killed keyd leaves its socket file behind: readiness is a successful connect.
    while not accepts_unix(sock):
        if proc.poll() is not None:
            raise AssertionError(f"keyd exited {proc.returncode}: {log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("keyd did not create its socket")
        time.sleep(0.05)
    return proc


def payload(t="v"):
    now = int(time.time())
    return claims_prefix("NL", now - 3600, now + 86400) + cbor2.dumps(sample(t))


def test_start_sign_and_clean_stop(dev_keystore_copy, tmp_path):
    sock = tmp_path / "keyd.sock"
    proc = start_keyd(dev_keystore_copy, sock)
    try:
        store = Keystore.open(dev_keystore_copy)
        with KeydClient(sock) as client:
            assert len(client.describe()) == 4
            sigs = client.sign(kid_for(store, "t"), [payload("t")] * 20, client="c", account="a")
            assert all(isinstance(s, bytes) for s in sigs)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    report = verify(dev_keystore_copy / "audit")
    assert report.ok and report.closed_cleanly
    assert len(list(search(dev_keystore_copy / "audit"))) == 20
    assert not sock.exists()


def test_wrong_passphrase_names_the_file_and_starts_nothing(dev_keystore_copy, tmp_path):
    sock = tmp_path / "keyd.sock"
    env = {**os.environ, "DCCSIGN_KEYSTORE_PASSPHRASE": "wrong"}
    proc = subprocess.run(
        keyd_argv(dev_keystore_copy, sock),
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 4
    assert b".key.pem" in proc.stderr and b"passphrase" in proc.stderr
    assert not sock.exists()
    # Nothing was created with the wrong passphrase (no audit key, no audit log).
    assert not (dev_keystore_copy / "audit-key.pem").exists()
    assert not (dev_keystore_copy / "audit").exists()


def test_sigkill_under_load_loses_no_issued_certificate(dev_keystore_copy, tmp_path):
    sock = tmp_path / "keyd.sock"
    store = Keystore.open(dev_keystore_copy)
    kid = kid_for(store, "v")
    received: list[bytes] = []
    proc = start_keyd(dev_keystore_copy, sock)
    failures = 0
    try:
        client = KeydClient(sock)
        killed_at = time.monotonic() + 1.0
        while True:
            try:
                out = client.sign(kid, [payload()] * 64, client="c", account="load")
                received += [s for s in out if isinstance(s, bytes)]
            except KeydError as exc:
                assert exc.retryable
                failures += 1
                break
            if time.monotonic() > killed_at and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # Restart: the log is reopened (a torn tail is set aside and recorded), signing resumes.
        proc = start_keyd(dev_keystore_copy, sock)
        with KeydClient(sock) as again:
            out = again.sign(kid, [payload()] * 8, client="c", account="load")
            received += out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert failures == 1 and len(received) > 64
    audit = dev_keystore_copy / "audit"
    assert verify(audit).ok
    # Every signature a client holds is in the log (SIGNATURE hash: SHA-256 of r, 16 bytes).
    logged = {r["rev"]["SIGNATURE"] for r in search(audit, account="load")}
    assert {sha256(s[:32]).hexdigest()[:32] for s in received} <= logged


ENGINE = textwrap.dedent("""
    import sys, time, cbor2
    from dccsign.keyd.client import KeydClient
    from dccsign.dcc.issuer import claims_prefix
    from dccsign.testing.samples import sample
    now = int(time.time())
    with KeydClient(sys.argv[1]) as c:
        kids = [k.kid for k in c.describe()]
        for k, t in zip(kids, "vtrv"):
            p = claims_prefix("NL", now - 3600, now + 86400) + cbor2.dumps(sample(t))
            assert all(isinstance(s, bytes) for s in c.sign(k, [p] * 4, client="e", account="a"))
        print("signed", flush=True)
        sys.stdin.read()  # stay alive until the test has scanned our memory
""")


def _scan(pid, needles):
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found |= {n for n in needles if n in chunk}
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs /proc/PID/mem")
def test_private_keys_live_only_in_keyd(dev_keystore_copy, tmp_path):
    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    needles = {}
    for e in store.entries:
        key = serialization.load_pem_private_key(e.key_path.read_bytes(), pw)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            d = key.private_numbers().private_value.to_bytes(32, "big")
        else:
            d = key.private_numbers().d.to_bytes(256, "big")[:64]  # a 64-byte run of d
        # OpenSSL keeps big numbers as little-endian limbs: search both byte orders.
        needles[e.name] = (d, d[::-1])
    sock = tmp_path / "keyd.sock"
    keyd = start_keyd(dev_keystore_copy, sock)
    engine = subprocess.Popen(
        [sys.executable, "-c", ENGINE, str(sock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert engine.stdout.readline() == b"signed\n"
        flat = {n for pair in needles.values() for n in pair}
        in_engine = _scan(engine.pid, flat)
        in_keyd = _scan(keyd.pid, flat)
    finally:
        engine.stdin.close()
        engine.wait(10)
        engine.stdout.close()
        keyd.send_signal(signal.SIGTERM)
        keyd.wait(20)
    assert in_engine == set()
    for name, (be, le) in needles.items():
        assert be in in_keyd or le in in_keyd, f"control failed: {name} not found in keyd"
