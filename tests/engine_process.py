"""``dccsign serve`` as a process for the tests (test_serve.py, test_loadgen.py), and the
command line of ``dccsign keyd`` for the tests that start keyd on its own."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dccsign.protocol.clients.blocking import Client
from dccsign.server.devtls import DEV_CLIENT_NAME, ensure_dev_tls
from dccsign.testing.net import accepts_tcp, accepts_unix, free_port

UID = os.getuid()
DCCSIGN = [sys.executable, "-m", "dccsign"]


def keyd_args(keystore, sock, *extra):
    """The arguments of ``dccsign keyd`` on *keystore*, listening on *sock*, with *extra*
    options after the socket."""
    return ["keyd", "--keystore", str(keystore), "--socket", str(sock), *extra]


def keyd_argv(keystore, sock, *extra):
    """The command line of ``dccsign keyd`` (see :func:`keyd_args`) in this interpreter."""
    return [*DCCSIGN, *keyd_args(keystore, sock, *extra)]


def write_policy(path, **local):
    """A policy: the current uid is client "local" (with *local* settings), and the
    development client certificate is allowed."""
    doc = {
        "clients": {"local": local or {}, "cn:" + DEV_CLIENT_NAME: {}},
        "unix_uids": {str(UID): "local"},
    }
    path.write_text(json.dumps(doc))
    os.utime(path, ns=(time.time_ns(), time.time_ns()))


class EngineProcess:
    """The engine on a Unix socket (and TLS on a free port unless tcp=False; /metrics with
    http=True), started on *keystore* and waited for; :meth:`stop` sends SIGTERM."""

    def __init__(self, keystore, tmp_path, *, tcp=True, http=False, extra=()):
        self.keystore = keystore
        self.sock = tmp_path / "engine.sock"
        self.policy = keystore / "policy.json"
        if not self.policy.exists():
            write_policy(self.policy)
        self.tls = ensure_dev_tls(keystore / "dev-tls")
        argv = [sys.executable, "-m", "dccsign", "serve", "--keystore", str(keystore)]
        argv += ["--unix", str(self.sock)]
        if tcp:
            self.port = free_port()
            argv += ["--tcp", f"127.0.0.1:{self.port}", "--tls-cert", str(self.tls["server_cert"])]
            argv += ["--tls-key", str(self.tls["server_key"]), "--client-ca", str(self.tls["ca"])]
        if http:
            self.http = free_port()
            argv += ["--http", f"127.0.0.1:{self.http}"]
        argv += list(extra)
        self.log = tmp_path / "engine.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stderr=log)
        wait_serving(self.proc, self.sock, self.log, 60)
        if http:  # bound after the Unix socket: wait for it too before anyone reads /metrics
            deadline = time.monotonic() + 30
            while not accepts_tcp(self.http):
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "no /metrics: " + self.log.read_text()
                time.sleep(0.05)

    def client(self, **kw):
        return Client(f"unix:{self.sock}", **kw)

    def tls_client(self, with_cert=True):
        kw = {"ca": self.tls["ca"]}
        if with_cert:
            kw |= {"cert": self.tls["client_cert"], "key": self.tls["client_key"]}
        return Client(f"127.0.0.1:{self.port}", **kw)

    def metric(self, name):
        """The value of one unlabelled sample from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def healthz(port, *, timeout):
    """``(status, body)`` of GET /healthz on 127.0.0.1:*port*, error statuses included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_serving(proc, sock, log, seconds=30):
    """Wait until *proc* accepts connections on the Unix socket *sock* (a killed process
    leaves its socket file behind: readiness is a successful connect); fail with its *log*
    when it exits first or takes longer than *seconds*."""
    deadline = time.monotonic() + seconds
    while not accepts_unix(sock):
        assert proc.poll() is None, Path(log).read_text()
        assert time.monotonic() < deadline, f"not serving in {seconds} s: {Path(log).read_text()}"
        time.sleep(0.05)
