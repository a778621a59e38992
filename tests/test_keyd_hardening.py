"""keyd hardened against its engine's uid: non-dumpable, no passphrase in any
/proc/PID/environ, access to its socket by uid (SO_PEERCRED), an engine that uses an external
keyd (``serve --keyd-socket``), and keyd under its own uid with the engine under another."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from test_keyd_lifecycle import _children, _state

from conftest import IN_CI
from dccsign.audit.search import search
from dccsign.audit.verify import verify
from dccsign.keyd.client import KeydClient, KeydError
from dccsign.protocol.clients.blocking import Client
from dccsign.protocol.codes import ErrorCode
from dccsign.testing.net import free_port
from dccsign.testing.samples import sample
from engine_process import (
    DCCSIGN,
    EngineProcess,
    healthz,
    keyd_args,
    keyd_argv,
    wait_serving,
    write_policy,
)

PASSPHRASE_ENV = "DCCSIGN_KEYSTORE_PASSPHRASE"


def _keyd_of(engine_pid):
    pids = [p for p in _children(engine_pid) if b"keyd" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(pids) == 1, pids
    return pids[0]


def _wait_socket(path, proc, log, seconds=30):
    wait_serving(proc, path, log, seconds)


# ----------------------------------------------------------------------------- in-process


def test_keyd_hardening_makes_the_process_non_dumpable():
    code = textwrap.dedent("""
        from dccsign.process import dumpable, make_non_dumpable
        before = dumpable()
        problem = make_non_dumpable()
        print(before, dumpable(), problem)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0", "None"]


def test_take_environ_secret_wipes_what_proc_environ_shows():
    code = textwrap.dedent("""
        import os, subprocess, sys
        from dccsign.process import take_environ_secret
        del os.environ["OTHER"]  # the usual way: /proc/self/environ still shows it
        value = take_environ_secret("SECRET")
        block = open("/proc/self/environ", "rb").read()
        child = subprocess.run(["env"], capture_output=True).stdout
        print(value.decode(), b"other-value" in block, b"s3cr3t-value" in block,
              b"SECRET" in child, "SECRET" in os.environ)
    """)
    env = {**os.environ, "SECRET": "s3cr3t-value", "OTHER": "other-value"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["s3cr3t-value", "True", "False", "False", "False"]


# ----------------------------------------------------------------------------- passphrase


@pytest.mark.slow
def test_engine_and_keyd_environ_hold_no_passphrase_and_a_restarted_keyd_gets_it(
    dev_keystore_copy, tmp_path, monkeypatch
):
    passphrase = (dev_keystore_copy / "dev-passphrase").read_bytes().strip()
    (dev_keystore_copy / "dev-passphrase").unlink()  # only the engine can give it to keyd now
    monkeypatch.delenv("DCCSIGN_KEYSTORE_PASSPHRASE_FILE", raising=False)
    monkeypatch.setenv(PASSPHRASE_ENV, passphrase.decode())
    engine = EngineProcess(dev_keystore_copy, tmp_path, tcp=False)
    try:
        keyd = _keyd_of(engine.proc.pid)
        for pid in (engine.proc.pid, keyd):
            environ = Path(f"/proc/{pid}/environ").read_bytes()  # root reads any of them
            assert passphrase not in environ, pid
        assert PASSPHRASE_ENV.encode() not in Path(f"/proc/{keyd}/environ").read_bytes()
        with engine.client() as client:
            assert client.sign(sample("v"), account="uzi:1").ok
            os.kill(keyd, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while not (result := client.sign(sample("v"), account="uzi:1")).ok:
                assert result.error == ErrorCode.KEYD_UNAVAILABLE, result
                assert time.monotonic() < deadline, engine.log.read_text()
                time.sleep(0.2)
        again = _keyd_of(engine.proc.pid)
        assert again != keyd
        assert passphrase not in Path(f"/proc/{again}/environ").read_bytes()
    finally:
        assert engine.stop() == 0, engine.log.read_text()


# ----------------------------------------------------------------------------- socket access


def _start_keyd(keystore, sock, *extra, log):
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            keyd_argv(keystore, sock, "--nonce-pool", "0", *extra),
            stderr=err,
        )
    _wait_socket(sock, proc, log)
    return proc


@pytest.mark.slow
def test_keyd_closes_connections_of_uids_not_allowed_root_included(dev_keystore_copy, tmp_path):
    sock, log = tmp_path / "keyd.sock", tmp_path / "keyd.log"
    group = os.getgid() if os.getuid() else 64001
    proc = _start_keyd(
        dev_keystore_copy,
        sock,
        "--allow-uid",
        "64002",
        "--socket-mode",
        "0660",
        "--socket-group",
        str(group),
        log=log,
    )
    try:
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group
        with KeydClient(sock) as client, pytest.raises(KeydError):
            client.describe()  # closed unserved (EOF, or a broken pipe if that came first)
        deadline = time.monotonic() + 10
        while f"refused a connection from uid {os.getuid()}" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def _serve_on_keyd_args(ksock, policy, esock, *extra):
    """The arguments of ``dccsign serve`` on the external keyd at *ksock*, with *policy*,
    listening on the Unix socket *esock*, with *extra* options after it."""
    return ["serve", "--keyd-socket", str(ksock), "--policy", str(policy), "--unix", str(esock),
            *extra]  # fmt: skip


@pytest.mark.slow
def test_engine_on_an_external_keyd_reconnects_after_keyd_restarts(dev_keystore_copy, tmp_path):
    ksock, klog = tmp_path / "keyd.sock", tmp_path / "keyd.log"
    keyd = _start_keyd(dev_keystore_copy, ksock, log=klog)
    policy = tmp_path / "policy.json"  # outside the keystore: the engine never opens that
    write_policy(policy)
    esock, elog, port = tmp_path / "engine.sock", tmp_path / "engine.log", free_port()
    with open(elog, "wb") as err:
        engine = subprocess.Popen(
            [*DCCSIGN, *_serve_on_keyd_args(ksock, policy, esock, "--http", f"127.0.0.1:{port}")],
            stderr=err,
        )
    try:
        _wait_socket(esock, engine, elog)
        assert _children(engine.pid) == []  # no keyd of its own
        with Client(f"unix:{esock}") as client:
            assert client.sign(sample("v"), account="uzi:1").ok
            assert healthz(port, timeout=5)[0] == 200
            keyd.send_signal(signal.SIGTERM)
            assert keyd.wait(20) == 0
            deadline = time.monotonic() + 10
            while (health := healthz(port, timeout=5))[0] != 503:
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
            assert "keyd" in health[1]
            assert client.sign(sample("v"), account="uzi:1").error == ErrorCode.KEYD_UNAVAILABLE
            keyd = _start_keyd(dev_keystore_copy, ksock, log=klog)
            deadline = time.monotonic() + 20
            while not (result := client.sign(sample("v"), account="uzi:1")).ok:
                assert result.error == ErrorCode.KEYD_UNAVAILABLE, result
                assert time.monotonic() < deadline, elog.read_text()
                time.sleep(0.2)
            assert healthz(port, timeout=5) == (200, "ok\n")
        assert "reconnected to keyd" in elog.read_text()
    finally:
        keyd.send_signal(signal.SIGTERM)
        keyd.wait(20)
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(30) == 0, elog.read_text()
    assert len(list(search(dev_keystore_copy / "audit", account="uzi:1"))) == 2


# ----------------------------------------------------------------------------- own uid

KEYD_UID, SOCKET_GID, ENGINE_UID, OTHER_UID = 64000, 64001, 64002, 64003

#: Runs a dccsign command (or, after "-c", Python code) as another user. The interpreter is
#: started as root and imports what it needs first, then drops to the user: this venv's Python
#: may live where other users cannot read (here /root/.pyenv, under /root 0700), and the test
#: must not change permissions outside its own directories. Changing uid leaves a process
#: non-dumpable, which a process exec'd as that user is not: it is made dumpable again, so
#: that keyd's own PR_SET_DUMPABLE is what is tested.
AS_USER = textwrap.dedent("""
    import ctypes, os, sys
    uid, gid = int(sys.argv[1]), int(sys.argv[2])
    groups = [int(g) for g in sys.argv[3].split(",") if g]
    import _strptime, encodings.idna, grp, importlib, json, pkgutil, pwd, resource, signal
    import socket, struct
    import dccsign, dccsign.cli.main, dccsign.native, dccsign.protocol
    # Every module of the product, whatever the layout (not the benchmark drivers, and no
    # __main__, which would run): after the uid change they could not be read any more.
    for package in (dccsign, dccsign.native, dccsign.protocol):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            name = module.name
            if not name.startswith("dccsign.bench") and not name.endswith("__main__"):
                importlib.import_module(name)
    from dccsign.dcc.valuesets import ValueSets
    ValueSets.builtin()
    dccsign.cli.main.build_parser()
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE 1, as after an exec
    if sys.argv[4] == "-c":
        exec(sys.argv[5])
    else:
        sys.exit(dccsign.cli.main.main(sys.argv[4:]))
""")


def _as_user(uid, gid, groups, args, *, cwd, **kw):
    """Popen of ``dccsign ARGS`` (or ``-c CODE``) as *uid*: exec'd as that user when the
    interpreter is reachable for it, else through AS_USER."""
    try:
        direct = (
            subprocess.run(
                [sys.executable, "-c", "import dccsign.keyd.service"],
                user=uid,
                group=gid,
                extra_groups=groups,
                capture_output=True,
                cwd=cwd,
                timeout=60,
            ).returncode
            == 0
        )
    except PermissionError:
        direct = False
    if direct:
        argv = [sys.executable, *args] if args[0] == "-c" else [*DCCSIGN, *args]
        return subprocess.Popen(argv, user=uid, group=gid, extra_groups=groups, cwd=cwd, **kw)
    argv = [sys.executable, "-c", AS_USER, str(uid), str(gid), ",".join(map(str, groups))]
    return subprocess.Popen([*argv, *args], cwd=cwd, **kw)


def _denied(uid, groups, *argv):
    """Run a system tool as *uid*: True when it failed with 'Permission denied'."""
    out = subprocess.run(
        argv, user=uid, group=uid, extra_groups=groups, capture_output=True, text=True, timeout=30
    )
    return out.returncode != 0 and "Permission denied" in out.stderr


PROBE = textwrap.dedent("""
    import json, socket, sys
    from dccsign.protocol.keyd import Connection, Describe
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sys.argv[-1])
    try:  # keyd may close before the request is even sent
        s.sendall(Connection().send(Describe(1)))
        reply = s.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        reply = b""
    print(json.dumps({"connected": True, "reply": reply.hex()}), flush=True)
""")


def _tree(path, uid, gid, dmode, fmode):
    for root, _dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        os.chmod(root, dmode)
        for name in files:
            os.chown(Path(root) / name, uid, gid)
            os.chmod(Path(root) / name, fmode)


@pytest.mark.slow
def test_keyd_under_its_own_uid_serves_only_the_engine_uid(dev_keystore):
    if os.geteuid() != 0:
        message = "needs root: keyd and the engine run as uids 64000 and 64002"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="dccsign-uid-"))
    procs = []
    try:
        os.chmod(base, 0o711)  # the users traverse it, cannot list it
        home = base / "keyd"  # keyd's own, 0700
        shutil.copytree(dev_keystore, home / "ks")
        _tree(home, KEYD_UID, KEYD_UID, 0o700, 0o600)
        run = base / "run"  # keyd's socket: the socket group may traverse
        run.mkdir()
        os.chown(run, KEYD_UID, SOCKET_GID)
        os.chmod(run, 0o750)
        engine_dir = base / "engine"  # the engine's own, 0700
        engine_dir.mkdir()
        policy = engine_dir / "policy.json"
        policy.write_text(json.dumps({"clients": {"local": {}}, "unix_uids": {"0": "local"}}))
        _tree(engine_dir, ENGINE_UID, ENGINE_UID, 0o700, 0o600)
        ksock, esock = run / "keyd.sock", engine_dir / "engine.sock"
        klog, elog = base / "keyd.log", base / "engine.log"

        with open(klog, "wb") as err:
            keyd = _as_user(
                KEYD_UID,
                KEYD_UID,
                [SOCKET_GID],
                keyd_args(
                    home / "ks",
                    ksock,
                    "--nonce-pool",
                    "0",
                    "--socket-mode",
                    "0660",
                    "--socket-group",
                    str(SOCKET_GID),
                    "--allow-uid",
                    str(ENGINE_UID),
                ),
                cwd=home,
                stderr=err,
            )
        procs.append(keyd)
        deadline = time.monotonic() + 30
        while "keyd serving" not in klog.read_text():
            assert keyd.poll() is None and time.monotonic() < deadline, klog.read_text()
            time.sleep(0.05)
        st = ksock.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (KEYD_UID, SOCKET_GID, 0o660)

        with open(elog, "wb") as err:
            engine = _as_user(
                ENGINE_UID,
                ENGINE_UID,
                [SOCKET_GID],
                _serve_on_keyd_args(ksock, policy, esock),
                cwd=engine_dir,
                stderr=err,
            )
        procs.append(engine)
        _wait_socket(esock, engine, elog)
        with Client(f"unix:{esock}") as client:
            result = client.sign(sample("v"), account="uzi:uid")
        assert result.ok, result
        assert len(list(search(home / "ks" / "audit", account="uzi:uid"))) == 1

        uids = {
            pid: next(
                line.split()[1]
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:")
            )
            for pid in (keyd.pid, engine.pid)
        }
        assert uids == {keyd.pid: str(KEYD_UID), engine.pid: str(ENGINE_UID)}
        # keyd is non-dumpable: its /proc files belong to root, even its own uid cannot read
        # its environment; the engine (not hardened) is the control.
        assert os.stat(f"/proc/{keyd.pid}/environ").st_uid == 0
        assert os.stat(f"/proc/{engine.pid}/environ").st_uid == ENGINE_UID
        assert _denied(KEYD_UID, [], "cat", f"/proc/{keyd.pid}/environ")
        assert not _denied(ENGINE_UID, [], "cat", f"/proc/{engine.pid}/environ")
        # The engine's uid reaches neither keyd's keys nor its memory or environment.
        key_file = next((home / "ks" / "keys").glob("*.key.pem"))
        assert _denied(ENGINE_UID, [SOCKET_GID], "cat", str(key_file))
        assert _denied(ENGINE_UID, [SOCKET_GID], "cat", f"/proc/{keyd.pid}/environ")
        assert _denied(
            ENGINE_UID, [SOCKET_GID], "dd", f"if=/proc/{keyd.pid}/mem", "bs=1", "count=0"
        )
        assert not _denied(0, [], "dd", f"if=/proc/{keyd.pid}/mem", "bs=1", "count=0")

        # Another uid with the socket's group may connect, and is closed unserved; so is root.
        probe = _as_user(
            OTHER_UID,
            OTHER_UID,
            [SOCKET_GID],
            ["-c", PROBE, str(ksock)],
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = probe.communicate(timeout=60)
        assert probe.returncode == 0, err.decode()
        assert json.loads(out) == {"connected": True, "reply": ""}
        with KeydClient(ksock) as client, pytest.raises(KeydError):
            client.describe()
        deadline = time.monotonic() + 10
        while "refused a connection from uid 0 " not in (log := klog.read_text()):
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
        assert f"refused a connection from uid {OTHER_UID} " in log

        engine.send_signal(signal.SIGTERM)
        assert engine.wait(30) == 0, elog.read_text()
        keyd.send_signal(signal.SIGTERM)
        assert keyd.wait(30) == 0, klog.read_text()
        report = verify(home / "ks" / "audit")
        assert report.ok and report.closed_cleanly
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(base)
    assert all(_state(p.pid) is None for p in procs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are read from /proc")
def test_threads_are_named_for_per_thread_cpu_figures(dev_keystore_copy, tmp_path):
    """keyd's signing workers and the nonce pool's refill thread carry OS names, so that
    dccsign.bench.cpustat and `top -H` tell them apart; name_this_thread cuts to 15 bytes."""
    import threading

    from dccsign import native
    from dccsign.audit.key import AuditKey
    from dccsign.audit.writer import AuditLog
    from dccsign.keyd.service import Keyd
    from dccsign.keys.keystore import resolve_passphrase
    from dccsign.process import name_this_thread
    from dccsign.protocol.keyd import KeydColumns, SignColumns, SignPart

    def names():
        out = set()
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            try:
                out.add((task / "comm").read_text().strip())
            except OSError:
                pass
        return out

    seen = []
    t = threading.Thread(target=lambda: (name_this_thread("a-very-long-thread-name"),
                                         seen.append(names())))  # fmt: skip
    t.start()
    t.join()
    assert "a-very-long-thr" in seen[0]
    pw = resolve_passphrase(dev_keystore_copy)
    with AuditLog.open(tmp_path / "audit", AuditKey.create(tmp_path / "k.pem", pw)) as log:
        keyd = Keyd(dev_keystore_copy, pw, log, nonce_pool=4096 if native.IMPLEMENTATION ==
                    "native" else 0)  # fmt: skip
        try:
            kid = next(iter(keyd._keys))
            cols = KeydColumns.from_parts([SignPart("p", "a", (b"\xa0",) * 80)])
            keyd.sign_columns(SignColumns(1, kid, cols))  # starts no worker: all refused
            keyd._signers.submit(int).result()  # a worker exists now
            present = names()
        finally:
            keyd.close()
    assert "keyd-sign" in present
    if native.IMPLEMENTATION == "native":
        assert "nonce-refill" in present
