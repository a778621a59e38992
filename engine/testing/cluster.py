"""Two dccsign engines behind HAProxy, sharing Redis, on loopback: ``make cluster`` (``python
-m dccsign.testing.cluster``) and the cluster tests (tests/cluster_harness.py).

:class:`Cluster` starts, in its own directory:

* ``redis-server`` on a loopback port (AOF in the directory, so that a Redis restarted by a
  test or an operator comes back with the quota windows it had);
* two engines (``dccsign serve``), each on its own copy of one development keystore (the
  same keys, as nodes of one deployment have), with its own keyd, audit log and node id, and
  ``--state`` pointing at the Redis;
* HAProxy with deploy/haproxy.cfg (TLS passed through, health checks on each engine's
  /healthz), its ports given through the environment variables that file reads.

Every child writes its output to ``NAME.log`` in the directory. Everything listens on
127.0.0.1 only: this is development tooling, not a deployment.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .net import free_port

__all__ = [
    "Cluster",
    "Haproxy",
    "Node",
    "Redis",
    "Service",
    "missing_tools",
]

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
#: The system programs a cluster needs (Debian packages redis-server and haproxy).
TOOLS = ("redis-server", "haproxy")
NODE_NAMES = ("node1", "node2")
DEV_CLIENT = "cn:dev-portal"  # devtls.DEV_CLIENT_NAME as a policy client name
#: ``make cluster``'s ports: deploy/haproxy.cfg's defaults, clear of ``make serve``'s
#: (8443, 9464) and of a system Redis (6379).
DEV_PORTS = {
    "lb": 7443, "stats": 7404, "redis": 6380,
    "node1": 7444, "node1_http": 7464, "node2": 7445, "node2_http": 7465,
}  # fmt: skip


def missing_tools() -> list[str]:
    """The programs of :data:`TOOLS` that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


class Service:
    """One child process, its output in *log*; started by :meth:`start`."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def start(self) -> None:
        """Start the process (not waiting for it to be ready: see :meth:`wait_ready`)."""
        assert not self.running, f"{self.name} runs already"
        self.log.parent.mkdir(parents=True, exist_ok=True)  # Redis's --dir too
        with open(self.log, "ab") as out:
            # A session of its own: Ctrl-C in the terminal reaches the cluster script only,
            # which then stops the parts in order (HAProxy first, the engines draining).
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self, seconds: float = 90) -> None:
        """Wait until :meth:`ready`.

        Raises:
            RuntimeError: the process exited first, or took longer than *seconds* (the
                message holds the end of its log).
        """
        deadline = time.monotonic() + seconds
        while not self.ready():
            if not self.running:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {seconds:g} s: {self.tail()}")
            time.sleep(0.05)

    def send(self, sig: int) -> None:
        """Send *sig* to the process if it runs."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, seconds: float) -> int:
        """The exit code, waiting up to *seconds* (subprocess.TimeoutExpired after)."""
        assert self.proc is not None
        return self.proc.wait(seconds)

    def stop(self, seconds: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after *seconds*; the exit code (None if never started)."""
        if self.proc is None:
            return None
        self.send(signal.SIGTERM)
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def tail(self, size: int = 4000) -> str:
        """The end of the process's log."""
        try:
            return self.log.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return "(no log)"


class Redis(Service):
    """``redis-server`` on 127.0.0.1:*port* with its files in *directory*.

    ``fsync="always"`` makes every write durable before it is answered, so that a Redis
    stopped and started again has every quota unit it acknowledged (the tests count exactly);
    ``"everysec"`` is cheaper and enough for development."""

    def __init__(self, directory: Path, port: int, *, fsync: str = "everysec") -> None:
        super().__init__("redis", directory / "redis.log")
        self.directory = directory
        self.port = port
        self.fsync = fsync

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            "redis-server",
            "--bind", HOST, "--port", str(self.port), "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes", "--appendfsync", self.fsync,
            "--daemonize", "no", "--protected-mode", "yes", "--logfile", "",
        ]  # fmt: skip

    def ready(self) -> bool:
        """Whether Redis answers PING (it refuses commands while it loads its AOF)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@dataclass
class Node:
    """One engine: its name (``--node-id``), keystore copy, audit log and ports, and the
    ``--state`` URL (None: the engine keeps quotas and idempotency keys in its memory)."""

    name: str
    directory: Path
    tls_port: int
    http_port: int
    policy: Path
    tls: dict[str, Path]
    state_url: str | None
    extra: Sequence[str] = ()
    service: Service = field(init=False)

    def __post_init__(self) -> None:
        self.service = _NodeService(self)

    @property
    def keystore(self) -> Path:
        return self.directory / "keystore"

    @property
    def audit_dir(self) -> Path:
        return self.directory / "audit"

    @property
    def address(self) -> str:
        """The engine's own TLS address, bypassing HAProxy (``HOST:PORT``)."""
        return f"{HOST}:{self.tls_port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "dccsign", "serve", "--keystore", str(self.keystore)]
        argv += ["--policy", str(self.policy), "--audit-dir", str(self.audit_dir)]
        argv += ["--tcp", self.address, "--http", f"{HOST}:{self.http_port}"]
        argv += ["--tls-cert", str(self.tls["server_cert"]), "--tls-key"]
        argv += [str(self.tls["server_key"]), "--client-ca", str(self.tls["ca"])]
        if self.state_url is not None:  # None: quotas and keys in the engine's memory
            argv += ["--state", self.state_url]
        return [*argv, "--node-id", self.name, *self.extra]

    def healthz(self, timeout: float = 2) -> tuple[int, str]:
        """``(status, body)`` of the engine's GET /healthz; ``(0, why)`` when it does not
        answer at all."""
        return http_get(f"http://{HOST}:{self.http_port}/healthz", timeout)

    def metric(self, name: str) -> float:
        """The value of one unlabelled sample of the engine's /metrics.

        Raises:
            KeyError: no such sample.
        """
        status, body = http_get(f"http://{HOST}:{self.http_port}/metrics", 10)
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(f"{name} (status {status})")


class _NodeService(Service):
    def __init__(self, node: Node) -> None:
        super().__init__(node.name, node.directory / "engine.log")
        self.node = node

    def argv(self) -> list[str]:
        return self.node.argv()

    def ready(self) -> bool:
        return self.node.healthz()[0] == 200


class Haproxy(Service):
    """HAProxy with *config* (deploy/haproxy.cfg), its ports set through the environment."""

    def __init__(self, directory: Path, config: Path, port: int, stats_port: int) -> None:
        super().__init__("haproxy", directory / "haproxy.log")
        self.config = config
        self.port = port
        self.stats_port = stats_port
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def argv(self) -> list[str]:
        # -db: stay in the foreground (this process supervises it); logs go to stderr.
        return ["haproxy", "-db", "-f", str(self.config)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ, DCCSIGN_LB_ADDR=HOST, DCCSIGN_LB_PORT=str(self.port))
        env["DCCSIGN_LB_STATS_PORT"] = str(self.stats_port)
        for number, node in enumerate(self.nodes, 1):
            env[f"DCCSIGN_NODE{number}_ADDR"] = HOST
            env[f"DCCSIGN_NODE{number}_PORT"] = str(node.tls_port)
            env[f"DCCSIGN_NODE{number}_HTTP"] = str(node.http_port)
        return env

    def ready(self) -> bool:
        """Whether the LB answers its /healthz and sees every engine that runs as UP."""
        if http_get(f"http://{HOST}:{self.stats_port}/healthz", 2)[0] != 200:
            return False
        states = self.server_states()
        return all(states.get(n.name) == "UP" for n in self.nodes if n.service.running)

    def server_states(self) -> dict[str, str]:
        """Each engine's state as HAProxy sees it (``UP``, ``DOWN``, ``UP 1/2``, ...), from
        /stats;csv; empty when the LB does not answer."""
        status, body = http_get(f"http://{HOST}:{self.stats_port}/stats;csv", 2)
        if status != 200:
            return {}
        lines = body.lstrip("# ").splitlines()
        header = lines[0].split(",")
        pxname, svname, state = (header.index(k) for k in ("pxname", "svname", "status"))
        rows = (line.split(",") for line in lines[1:] if line)
        summaries = ("FRONTEND", "BACKEND")  # the rows of the proxy as a whole
        return {
            r[svname]: r[state]
            for r in rows
            if r[pxname] == "engines" and r[svname] not in summaries
        }


def http_get(url: str, timeout: float) -> tuple[int, str]:
    """``(status, body)`` of GET *url*, error statuses included; ``(0, why)`` when nothing
    answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, torn
        return 0, str(exc)


def dev_policy(account_quota: dict[str, int] | None = None) -> dict[str, Any]:
    """A policy that lets the development client certificate sign, each of its accounts
    limited by *account_quota* (default: 100 per minute, to see the shared quota at work)."""
    return {
        "clients": {DEV_CLIENT: {"account_quota": account_quota or {"per_minute": 100}}},
    }


class Cluster:
    """Redis, two engines and HAProxy in *directory* (see the module docstring).

    Args:
        directory: created if missing; a keystore already there is reused.
        policy: the policy document both engines read (default :func:`dev_policy`).
        ports: fixed ports (``lb``, ``stats``, ``redis``, ``node1``, ``node1_http``, ...)
            instead of free ones.
        engine_args: more ``dccsign serve`` options for both engines.
        redis_fsync: Redis's appendfsync (see :class:`Redis`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        policy: dict[str, Any] | None = None,
        ports: dict[str, int] | None = None,
        engine_args: Sequence[str] = (),
        redis_fsync: str = "everysec",
        haproxy_config: Path = HAPROXY_CFG,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = dict(ports or {})
        port = lambda name: ports.get(name) or free_port()  # noqa: E731
        self.redis = Redis(self._subdir("redis"), port("redis"), fsync=redis_fsync)
        self.policy = self.directory / "policy.json"
        self.policy.write_text(json.dumps(policy or dev_policy(), indent=2) + "\n")
        template = self._template_keystore()
        from ..server.devtls import ensure_dev_tls

        self.tls = ensure_dev_tls(template / "dev-tls")
        self.nodes = [
            Node(
                name,
                self._node_dir(name, template),
                port(name),
                port(name + "_http"),
                self.policy,
                self.tls,
                self.redis.url,
                engine_args,
            )
            for name in NODE_NAMES
        ]
        self.haproxy = Haproxy(self.directory, haproxy_config, port("lb"), port("stats"))
        self.haproxy.nodes = self.nodes

    def _subdir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(exist_ok=True)
        return path

    def _template_keystore(self) -> Path:
        """The development keystore every node copies (created once)."""
        from ..keys.keystore import init_dev

        template = self.directory / "keystore"
        if not (template / "keystore.json").exists():
            init_dev(template)
        return template

    def _node_dir(self, name: str, template: Path) -> Path:
        """*name*'s directory, with its own copy of *template* (made once; no audit log: the
        node's is ``audit`` beside it)."""
        directory = self._subdir(name)
        if not (directory / "keystore" / "keystore.json").exists():
            shutil.copytree(
                template, directory / "keystore", ignore=shutil.ignore_patterns("audit")
            )
        return directory

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, seconds: float = 120) -> None:
        """Start everything and wait until HAProxy sees both engines UP.

        Raises:
            RuntimeError: a process exited or was not ready within *seconds* (what was
                started is stopped again).
        """
        try:
            self.redis.start()
            self.redis.wait_ready(seconds)
            for node in self.nodes:
                node.service.start()
            for node in self.nodes:
                node.service.wait_ready(seconds)
            self.haproxy.start()
            self.haproxy.wait_ready(seconds)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop HAProxy, the engines (SIGTERM: they drain) and Redis."""
        self.haproxy.stop()
        for node in self.nodes:
            node.service.send(signal.SIGTERM)
        for node in self.nodes:
            node.service.stop()
        self.redis.stop()

    def wait_lb_sees(self, name: str, state: str, seconds: float = 30) -> None:
        """Wait until HAProxy reports engine *name* in *state* (``UP`` or ``DOWN``).

        Raises:
            RuntimeError: not within *seconds*.
        """
        deadline = time.monotonic() + seconds
        while self.haproxy.server_states().get(name) != state:
            if time.monotonic() > deadline:
                states = self.haproxy.server_states()
                raise RuntimeError(f"HAProxy: {name} not {state} in {seconds:g} s: {states}")
            time.sleep(0.05)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for people -----------------------------------------------------------------------

    def sign_command(self, samples: str = "samples.jsonl") -> str:
        """A ``dccsign sign`` command line that signs *samples* through HAProxy."""
        tls = self.tls
        return (
            f"dccsign sign --server {self.haproxy.address} --cert {tls['client_cert']} "
            f"--key {tls['client_key']} --ca {tls['ca']} --account uzi:900000001 {samples}"
        )

    def describe(self) -> str:
        """What runs where, and how to sign through it."""
        lines = [
            f"policy   {self.policy} (shared by both engines, re-read within a second)",
            f"redis    {self.redis.url}  (log {self.redis.log})",
        ]
        for node in self.nodes:
            lines.append(
                f"{node.name}    TLS {node.address}, http://{HOST}:{node.http_port}/healthz, "
                f"audit {node.audit_dir}  (log {node.service.log})"
            )
        lines.append(
            f"haproxy  TLS {self.haproxy.address}, http://{HOST}:{self.haproxy.stats_port}/stats"
            f"  (log {self.haproxy.log})"
        )
        lines += [
            "",
            "sign through HAProxy:",
            "  .venv/bin/python -m dccsign.testing.samples > samples.jsonl",
            "  .venv/bin/" + self.sign_command(),
            "every node's audit log: .venv/bin/dccsign audit search "
            + " ".join(str(n.audit_dir) for n in self.nodes),
        ]
        return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dccsign.testing.cluster",
        description="Run Redis, two dccsign engines (own keystore copies, keyd, audit logs, "
        "shared quotas and idempotency in Redis) and HAProxy (deploy/haproxy.cfg) on "
        "127.0.0.1 until Ctrl-C; print how to sign through it. Development only.",
    )
    p.add_argument("--dir", type=Path, default=Path("var/cluster"), help="state and logs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a cluster until SIGINT or SIGTERM; 1 when it cannot start or a part dies."""
    args = _parse(argv)
    missing = missing_tools()
    if missing:
        tools = ", ".join(missing)
        print(f"cluster: not found: {tools} (apt-get install {' '.join(missing)})", file=sys.stderr)
        return 1
    cluster = Cluster(args.dir, ports=DEV_PORTS)
    # Ctrl-C (even where the shell started us ignoring it) and SIGTERM stop the cluster.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cluster.start()
    except RuntimeError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # start() stopped what it had started
        return 0
    print(cluster.describe() + "\n\nCtrl-C stops everything.", flush=True)
    try:
        return _watch(cluster)
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


def _watch(cluster: Cluster) -> int:
    """Sleep while every part runs; 1 (and which one died) when one stops."""
    parts: list[Service] = [cluster.redis, *(n.service for n in cluster.nodes), cluster.haproxy]
    while True:
        time.sleep(0.5)
        for part in parts:
            if not part.running:
                print(f"cluster: {part.name} stopped: {part.tail(1500)}", file=sys.stderr)
                return 1


if __name__ == "__main__":
    sys.exit(main())
