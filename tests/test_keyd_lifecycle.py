"""keyd's life with its supervisor: ``--supervised`` (passphrase line on stdin, stop at end of
stdin), a keyd that dies with a killed engine, a restarted engine that serves within seconds,
and the self-describing audit-log lock (who holds it; waiting for a keyd that is stopping)."""

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from hashlib import sha256
from pathlib import Path

import cbor2
import pytest
from test_keyd_process import kid_for, payload, start_keyd

from dccsign.audit.errors import AuditLogError
from dccsign.audit.key import AuditKey
from dccsign.audit.search import read_entries, search
from dccsign.audit.verify import verify
from dccsign.audit.writer import LOCK_FILE, AuditLog
from dccsign.dcc.verify import decode_hc1
from dccsign.keyd.client import KeydClient
from dccsign.keys.keystore import Keystore
from dccsign.process import process_start
from dccsign.protocol.wire import SignItem
from dccsign.testing.net import accepts_unix
from dccsign.testing.samples import sample
from engine_process import DCCSIGN, EngineProcess, keyd_argv, write_policy


def _state(pid):
    """The process state letter of *pid* ('Z' for a zombie), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2]


def _wait_gone(pid, seconds):
    """True once *pid* has exited (gone, or a zombie nobody reaps) within *seconds*."""
    deadline = time.monotonic() + seconds
    while _state(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _children(pid):
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _start_supervised(keystore, sock, line=b"\n", env=None, extra=()):
    log = sock.with_suffix(".log")
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            keyd_argv(keystore, sock, "--supervised", "--nonce-pool", "0", *extra),
            stdin=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    proc.stdin.write(line)
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while not accepts_unix(sock):
        if proc.poll() is not None:
            proc.stdin.close()
            return proc, log
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, log


@pytest.mark.slow
def test_supervised_keyd_stops_cleanly_when_its_stdin_ends(dev_keystore_copy, tmp_path):
    sock = tmp_path / "keyd.sock"
    proc, log = _start_supervised(dev_keystore_copy, sock)  # empty line: dev-passphrase
    assert proc.poll() is None, log.read_text()
    store = Keystore.open(dev_keystore_copy)
    with KeydClient(sock) as client:
        sigs = client.sign(kid_for(store, "t"), [payload("t")] * 5, client="c", account="a")
    assert all(isinstance(s, bytes) for s in sigs)
    proc.stdin.close()  # the supervisor is gone: no signal, only the end of the pipe
    assert proc.wait(15) == 0, log.read_text()
    assert "supervising process is gone" in log.read_text()
    report = verify(dev_keystore_copy / "audit")
    assert report.ok and report.closed_cleanly  # the final checkpoint was written
    assert (dev_keystore_copy / "audit" / LOCK_FILE).read_bytes() == b""  # no stale record


@pytest.mark.slow
def test_supervised_keyd_takes_its_passphrase_from_the_first_line(dev_keystore_copy, tmp_path):
    passphrase = (dev_keystore_copy / "dev-passphrase").read_bytes().strip()
    (dev_keystore_copy / "dev-passphrase").unlink()  # the pipe is the only source left
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCCSIGN_KEYSTORE_PASS")}
    proc, log = _start_supervised(dev_keystore_copy, tmp_path / "bad.sock", b"wrong\n", env)
    assert proc.wait(30) == 4 and "passphrase" in log.read_text()
    assert "Traceback" not in log.read_text()
    sock = tmp_path / "keyd.sock"
    proc, log = _start_supervised(dev_keystore_copy, sock, passphrase + b"\n", env)
    try:
        assert proc.poll() is None, log.read_text()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert passphrase not in environ
        with KeydClient(sock) as client:
            assert len(client.describe()) == 4
    finally:
        proc.stdin.close()
        assert proc.wait(15) == 0


SUPERVISOR = textwrap.dedent("""
    import sys, threading, time
    from dccsign.keyd.supervisor import PrivateKeyd
    keyd = PrivateKeyd(sys.argv[1], nonce_pool=0)
    # Started from a thread that then ends (as trio's worker threads do): keyd must outlive
    # the thread (PR_SET_PDEATHSIG would kill it here) and die only with this process.
    starter = threading.Thread(target=keyd.__enter__)
    starter.start()
    starter.join()
    print(keyd._proc.pid, flush=True)
    time.sleep(3600)
""")


@pytest.mark.slow
def test_keyd_dies_with_its_killed_supervisor(dev_keystore_copy, tmp_path):
    with open(tmp_path / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, str(dev_keystore_copy)],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        keyd = int(supervisor.stdout.readline())
        time.sleep(1.0)
        assert _state(keyd) not in (None, "Z"), "keyd died with the thread that started it"
        holder = (dev_keystore_copy / "audit" / LOCK_FILE).read_text()
        assert f"pid={keyd} start={process_start(keyd)} " in holder
    finally:
        supervisor.kill()  # SIGKILL: no cleanup code of the supervisor runs
        supervisor.wait()
        supervisor.stdout.close()
    try:
        assert _wait_gone(keyd, 10), "keyd outlived its supervisor"
    finally:
        if _state(keyd) not in (None, "Z"):
            os.kill(keyd, 9)
    report = verify(dev_keystore_copy / "audit")
    assert report.ok and report.closed_cleanly  # a graceful stop: final checkpoint written


@pytest.mark.slow
def test_sign_cli_passes_the_passphrase_variable_through_the_pipe(dev_keystore_copy, tmp_path):
    passphrase = (dev_keystore_copy / "dev-passphrase").read_text().strip()
    (dev_keystore_copy / "dev-passphrase").unlink()
    dcc = tmp_path / "dcc.json"
    dcc.write_text(__import__("json").dumps(sample("v")))
    env = {**os.environ, "DCCSIGN_KEYSTORE_PASSPHRASE": passphrase}
    out = subprocess.run(
        [*DCCSIGN, "sign", "--keystore", str(dev_keystore_copy), str(dcc)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HC1:")


# ----------------------------------------------------------------------------- the lock


@pytest.fixture
def audit_key(tmp_path):
    return AuditKey.create(tmp_path / "audit-key.pem", b"lock tests")


def test_lock_conflict_names_the_live_holder(tmp_path, audit_key):
    directory = tmp_path / "audit"
    with AuditLog.open(directory, audit_key):
        record = (directory / LOCK_FILE).read_text()
        assert record.startswith(f"pid={os.getpid()} start={process_start(os.getpid())} ")
        with pytest.raises(AuditLogError) as err:
            AuditLog.open(directory, audit_key)
        message = str(err.value)
        assert f"held by pid {os.getpid()}, started " in message
        assert "running: " in message and "pytest" in message
        # The failed open left the holder's record alone.
        assert (directory / LOCK_FILE).read_text() == record
    assert (directory / LOCK_FILE).read_bytes() == b""  # emptied by the clean close
    AuditLog.open(directory, audit_key).close()  # and free again


def test_lock_record_of_another_process_is_reported_as_stale(tmp_path, audit_key):
    directory = tmp_path / "audit"
    AuditLog.open(directory, audit_key).close()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, start in ((gone.pid, 12345), (os.getpid(), 1)):  # exited; pid alive, other start
        # A process that holds the flock but did not record itself, over a leftover record.
        (directory / LOCK_FILE).write_text(f"pid={pid} start={start} boot={boot}\n")
        fd = os.open(directory / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with pytest.raises(AuditLogError) as err:
                AuditLog.open(directory, audit_key)
        finally:
            os.close(fd)
        message = str(err.value)
        assert f"names pid {pid}" in message and "stale information" in message, message
        assert "held by pid" not in message


def test_open_waits_for_a_holder_that_lets_go(tmp_path, audit_key, caplog):
    directory = tmp_path / "audit"
    first = AuditLog.open(directory, audit_key)
    timer = threading.Timer(0.5, first.close)
    timer.start()
    try:
        began = time.monotonic()
        with AuditLog.open(directory, audit_key, lock_wait=20) as second:
            assert 0.4 < time.monotonic() - began < 10
            assert second.head[0] >= 1
    finally:
        timer.join()
    assert any("waiting up to" in r.getMessage() for r in caplog.records)
    with AuditLog.open(directory, audit_key):
        began = time.monotonic()
        with pytest.raises(AuditLogError, match=r"held by pid \d+.*\(waited 0\.3 s\)"):
            AuditLog.open(directory, audit_key, lock_wait=0.3)
        assert time.monotonic() - began < 5


@pytest.mark.slow
def test_keyd_waits_for_the_lock_then_fails_with_a_clear_message(dev_keystore_copy, tmp_path):
    sock = tmp_path / "keyd.sock"
    # keyd creates the audit key and log at its first start: start and stop it once.
    proc = start_keyd(dev_keystore_copy, sock)
    proc.send_signal(15)
    assert proc.wait(15) == 0
    lock = os.open(dev_keystore_copy / "audit" / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.ftruncate(lock, 0)
        os.write(
            lock,
            f"pid={os.getpid()} start={process_start(os.getpid())} boot=".encode()
            + Path("/proc/sys/kernel/random/boot_id").read_bytes().strip(),
        )
        began = time.monotonic()
        out = subprocess.run(
            [
                *DCCSIGN,
                "keyd",
                "--keystore",
                str(dev_keystore_copy),
                "--socket",
                str(sock),
                "--nonce-pool",
                "0",
                "--lock-wait",
                "1.5",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - began
    finally:
        os.close(lock)
    assert out.returncode == 4, out.stderr
    assert "waiting up to" in out.stderr
    assert f"already open for writing, held by pid {os.getpid()}, started " in out.stderr
    assert "(waited 1.5 s)" in out.stderr and "Traceback" not in out.stderr
    assert 1.5 <= took < 30


@pytest.mark.slow
def test_serve_reports_a_keyd_that_cannot_start_without_a_traceback(dev_keystore_copy, tmp_path):
    write_policy(dev_keystore_copy / "policy.json")
    env = {**os.environ, "DCCSIGN_KEYSTORE_PASSPHRASE": "wrong"}
    out = subprocess.run(
        [
            *DCCSIGN,
            "serve",
            "--keystore",
            str(dev_keystore_copy),
            "--unix",
            str(tmp_path / "e.sock"),
            "--nonce-pool",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 4, out.stderr
    assert "dccsign serve: error: " in out.stderr and "passphrase" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- the engine


def _signature(hc1):
    return cbor2.loads(decode_hc1(hc1)).value[3]


@pytest.mark.slow
def test_engine_sigkilled_under_load_a_new_engine_serves_within_10_s(dev_keystore_copy, tmp_path):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = EngineProcess(dev_keystore_copy, tmp_path / "first", tcp=False)
    keyd = [
        pid
        for pid in _children(first.proc.pid)
        if b"keyd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(keyd) == 1
    received: list[str] = []
    ended: list[BaseException] = []

    def load():
        try:
            with first.client() as client:
                while True:
                    results = client.sign_batch([SignItem(sample("v"), "uzi:load")] * 20)
                    received.extend(r.hc1 for r in results if r.ok)
        except Exception as exc:  # the engine is gone
            ended.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(received) < 200:
        assert thread.is_alive() and time.monotonic() < deadline, ended
        time.sleep(0.01)
    first.proc.kill()  # SIGKILL to the engine only, not to its process group
    killed = time.monotonic()
    first.proc.wait()
    thread.join(30)
    assert not thread.is_alive() and ended
    held = list(received)  # everything the client got before the kill
    second = None
    try:
        second = EngineProcess(dev_keystore_copy, tmp_path / "second", tcp=False)
        with second.client() as client:
            while not (result := client.sign(sample("v"), account="uzi:after")).ok:
                assert time.monotonic() - killed < 10, result
                time.sleep(0.05)
        restart = time.monotonic() - killed
        print(f"a new engine signed {restart:.2f} s after the SIGKILL")
        assert restart < 10
        assert _wait_gone(keyd[0], max(0.1, killed + 10 - time.monotonic())), "orphan keyd"
    finally:
        if _state(keyd[0]) not in (None, "Z"):
            os.kill(keyd[0], 9)
        if second is not None:
            assert second.stop() == 0, (tmp_path / "second" / "engine.log").read_text()
    out = subprocess.run(
        [*DCCSIGN, "audit", "verify", str(dev_keystore_copy / "audit")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    records = search(dev_keystore_copy / "audit", account="uzi:load")
    logged = {r["rev"]["SIGNATURE"] for r in records}
    assert len(held) >= 200
    assert {sha256(_signature(h)[:32]).hexdigest()[:32] for h in held} <= logged
    # The orphan stopped gracefully (stdin closed): its keyd-stop event and final checkpoint
    # are in the log, so the new keyd had no torn tail to set aside.
    entries = list(read_entries(dev_keystore_copy / "audit"))
    assert [e["t"] for e in entries if e["t"] == "recover"] == []
    assert sum(e.get("action") == "keyd-stop" for e in entries) == 2
