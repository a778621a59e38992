"""Two engines behind HAProxy sharing Redis, for the cluster tests (test_cluster.py).

* :func:`require_cluster_tools`: skip when redis-server or haproxy is missing (a failure
  under ``CI=true``, where the Makefile installs them).
* :func:`cluster_starter`: a context with a function that starts a
  :class:`~dccsign.testing.cluster.Cluster` (Redis, two engines, HAProxy with
  deploy/haproxy.cfg, all on free ports in the test's tmp dir), stopped on leaving it.
* :class:`Portal`: a portal backend signing its items in batches through an address,
  reconnecting and resending with the same idempotency keys when its connection breaks.
* :func:`signature_hash` and :func:`audit_records`: which node's audit log holds an HC1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import cbor2
import pytest

from dccsign.audit.search import search
from dccsign.audit.verify import verify
from dccsign.protocol.clients.blocking import Client, ClientError
from dccsign.protocol.codes import RETRYABLE, ErrorCode
from dccsign.protocol.wire import ItemResult, SignItem
from dccsign.testing.cluster import Cluster, missing_tools
from independent import b45decode

IN_CI = os.environ.get("CI") == "true"
ACCOUNT = "uzi:900000042"


def require_cluster_tools() -> None:
    """Skip the calling test when redis-server or haproxy is not installed; fail under CI."""
    missing = missing_tools()
    if missing:
        message = (
            f"not installed: {', '.join(missing)} (the cluster tests need Redis and HAProxy: "
            f"apt-get install {' '.join(missing)}, or run make test as root)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def cluster_starter(tmp_path):
    """A function ``start(account_quota=None, engine_args=())`` that starts a
    :class:`Cluster` in *tmp_path* whose policy lets the development client certificate sign,
    each account limited to *account_quota* (a quota object, e.g. ``{"per_hour": 100}``;
    default unlimited in practice). Every cluster started is stopped on leaving the context,
    and the end of each process's log printed (pytest shows it when the test failed)."""
    require_cluster_tools()
    started: list[Cluster] = []

    def start(account_quota=None, engine_args=()):
        policy = {
            "clients": {"cn:dev-portal": {"account_quota": account_quota or {"per_hour": 10**8}}}
        }
        cluster = Cluster(
            tmp_path / f"cluster{len(started)}",
            policy=policy,
            engine_args=engine_args,
            # every acknowledged quota unit survives a Redis stop (the tests count exactly)
            redis_fsync="always",
        )
        started.append(cluster)
        cluster.start()
        return cluster

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop()
            for part in (cluster.redis, *(n.service for n in cluster.nodes), cluster.haproxy):
                print(f"--- {part.name} ({part.log})\n{part.tail()}")


def client(cluster: Cluster, address: str | None = None, **kw) -> Client:
    """A client with the development certificate, to HAProxy or to *address*."""
    tls = cluster.tls
    return Client(
        address or cluster.haproxy.address,
        cert=tls["client_cert"],
        key=tls["client_key"],
        ca=tls["ca"],
        **kw,
    )


@dataclass
class Portal:
    """A portal backend that signs *items* in frames of *batch* through *address*.

    When the connection breaks (or cannot be opened) it reconnects and resends what has no
    final result, with the same idempotency keys, as SPEC.md §10 asks of clients; items
    refused with a code in *resend* are resent too (after the client's own retries).
    :attr:`results` holds the final result of each item (None: none within *seconds*), and
    :attr:`seen` counts every refusal it got, resent or not, by code. With a *barrier*, the
    portal connects first and waits there before it sends anything (to fire portals at once).
    *pause* seconds between frames keep it busy for a while whatever the machine's speed (a
    test that kills or stops something under load needs the load still running then).
    """

    cluster: Cluster
    items: list[SignItem]
    batch: int = 20
    address: str | None = None
    retries: int = 8
    resend: frozenset[int] = RETRYABLE
    seconds: float = 180
    pause: float = 0.0
    results: list[ItemResult | None] = field(default_factory=list)
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)
    seen: Counter[int] = field(default_factory=Counter)
    barrier: threading.Barrier | None = None
    _client: Client | None = None

    def run(self) -> None:
        self.results = [None] * len(self.items)
        deadline = time.monotonic() + self.seconds
        try:
            if self.barrier is not None:
                self._connection()
                self.barrier.wait(120)
            for start in range(0, len(self.items), self.batch):
                self._sign(range(start, min(start + self.batch, len(self.items))), deadline)
                time.sleep(self.pause)
        finally:
            if self._client is not None:
                self._client.close()

    def _sign(self, indexes: range, deadline: float) -> None:
        todo = list(indexes)
        while todo and time.monotonic() < deadline:
            try:
                connection = self._connection()
                answers = connection.sign_batch([self.items[i] for i in todo])
            except ClientError as exc:
                self._broken(exc)
                continue
            for i, result in zip(todo, answers, strict=True):
                self.results[i] = result
                if not result.ok:
                    self.seen[result.error] += 1
            todo = [i for i, r in zip(todo, answers, strict=True) if _resend(r, self.resend)]
            if todo:
                time.sleep(0.1)

    def _connection(self) -> Client:
        if self._client is None:
            self._client = client(self.cluster, self.address, retries=self.retries, timeout=30)
        return self._client

    def _broken(self, exc: Exception) -> None:
        self.errors.append(str(exc))
        self.reconnects += 1
        if self._client is not None:
            self._client.close()
            self._client = None
        time.sleep(0.1)

    @property
    def signed(self) -> list[str]:
        return [r.hc1 for r in self.results if r is not None and r.ok]

    def refused(self, code: ErrorCode) -> int:
        return sum(1 for r in self.results if r is not None and not r.ok and r.error == code)


def _resend(result: ItemResult, codes: frozenset[int]) -> bool:
    return not result.ok and result.error in codes


def run_portals(portals: list[Portal]) -> None:
    """Run *portals* at once, each in its own thread, until all are done."""
    join_portals(start_portals(portals))


def start_portals(portals: list[Portal]) -> list[threading.Thread]:
    """Start *portals* in threads; join them with :func:`join_portals`."""
    threads = [threading.Thread(target=p.run, daemon=True) for p in portals]
    for t in threads:
        t.start()
    return threads


def join_portals(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(300)
        assert not t.is_alive(), "a portal did not finish in 300 s"


def items(dccs: list[dict], account: str = ACCOUNT, tag: str = "") -> list[SignItem]:
    """*dccs* as items for *account*, each with its own idempotency key."""
    return [SignItem(d, account, idempotency_key=f"{tag}{account}#{i}") for i, d in enumerate(dccs)]


def signature_hash(hc1: str) -> str:
    """The audit log's ``rev.SIGNATURE`` of *hc1* (docs/audit-format.md): the first 16 bytes
    of SHA-256 of r (ES256) or of the signature (PS256), hex; decoded here without dccsign."""
    message = cbor2.loads(zlib.decompress(b45decode(hc1.removeprefix("HC1:"))))
    protected, _unprotected, _payload, signature = getattr(message, "value", message)
    alg = cbor2.loads(protected)[1]
    signed = signature[:32] if alg == -7 else signature
    return hashlib.sha256(signed).hexdigest()[:32]


def audit_records(cluster: Cluster, **filters) -> dict[str, list[dict]]:
    """Each node's issue records that match *filters* (see ``dccsign.audit.search``)."""
    return {
        n.name: list(search(n.audit_dir, **filters)) if n.audit_dir.is_dir() else []
        for n in cluster.nodes
    }


def logged_signatures(cluster: Cluster, **filters) -> dict[str, str]:
    """``rev.SIGNATURE`` -> node name, over every node's audit log."""
    return {
        r["rev"]["SIGNATURE"]: name
        for name, records in audit_records(cluster, **filters).items()
        for r in records
    }


def assert_logs_verify(cluster: Cluster) -> None:
    """Every node's audit log verifies (hash chain, checkpoints)."""
    for node in cluster.nodes:
        report = verify(node.audit_dir)
        assert report.ok, (node.name, report)


def redis_available_again(cluster: Cluster) -> None:
    """Start the cluster's Redis again (same port and files) and wait until it answers."""
    cluster.redis.start()
    cluster.redis.wait_ready(60)
