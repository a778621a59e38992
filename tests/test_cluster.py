"""Two engines behind HAProxy (deploy/haproxy.cfg) sharing Redis (``serve --state``), as
processes on loopback (cluster_harness.py): a quota exact over both nodes, an idempotent retry
on the other node, a node killed under load, Redis stopped under load, a node drained.

Each test starts its own cluster (Redis, two engines with their own keyd and audit log, HAProxy)
in its tmp dir; they skip when redis-server or haproxy is missing (a failure under CI=true)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
from cluster_harness import (
    ACCOUNT,
    Portal,
    assert_logs_verify,
    audit_records,
    client,
    cluster_starter,
    items,
    join_portals,
    logged_signatures,
    redis_available_again,
    require_cluster_tools,
    run_portals,
    signature_hash,
    start_portals,
)

from dccsign.audit.search import read_entries
from dccsign.keys.keystore import Keystore
from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.wire import SignItem
from dccsign.testing.cluster import HAPROXY_CFG
from dccsign.testing.net import free_port
from dccsign.testing.samples import sample, varied_samples
from independent import verify_pycose

slow = pytest.mark.slow


@pytest.fixture
def start_cluster(tmp_path):
    with cluster_starter(tmp_path) as start:
        yield start


def _dccsign(*args, **kw):
    """``dccsign ARGS`` in a child process (this interpreter), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dccsign", *args], capture_output=True, text=True, **kw
    )


def _wait(condition, what, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.05)


def _signed_count(portals):
    return sum(len(p.signed) for p in portals)


def _audit_total(cluster, **filters):
    return sum(len(r) for r in audit_records(cluster, **filters).values())


def _dsc(cluster, kid):
    """The DSC (DER) of *kid* in the keystore every node copied."""
    store = Keystore.open(cluster.nodes[0].keystore)
    return next(e.dsc.der for e in store.entries if e.kid == kid)


@slow
def test_account_quota_is_exact_over_both_nodes(start_cluster):
    quota = 120
    cluster = start_cluster(account_quota={"per_hour": quota})
    dccs = varied_samples(40)
    # 8 connections through HAProxy (leastconn: 4 on each node), opened before any of them
    # sends, then 320 items fired at once for one account whose quota is 120
    barrier = threading.Barrier(8)
    portals = [
        Portal(cluster, items(dccs, tag=f"p{k}:"), batch=5, barrier=barrier) for k in range(8)
    ]
    run_portals(portals)
    results = [r for p in portals for r in p.results]
    assert None not in results
    assert _signed_count(portals) == quota
    refusals = {ErrorCode(r.error) for r in results if not r.ok}
    assert refusals == {ErrorCode.QUOTA_ACCOUNT}
    per_node = {name: len(r) for name, r in audit_records(cluster, account=ACCOUNT).items()}
    assert sum(per_node.values()) == quota
    assert all(per_node.values()), f"one node signed nothing: {per_node}"
    logged = logged_signatures(cluster, account=ACCOUNT)
    assert {signature_hash(h) for p in portals for h in p.signed} == set(logged)
    # each node's log names the node that wrote it (serve --node-id, in the header)
    for node in cluster.nodes:
        header = next(read_entries(node.audit_dir))
        assert header["t"] == "header" and header.get("node") == node.name, header


@slow
def test_retry_on_the_other_node_returns_the_first_signature(start_cluster):
    cluster = start_cluster()
    node_a, node_b = cluster.nodes
    item = SignItem(sample("v"), ACCOUNT, idempotency_key="retry-1")
    with client(cluster, node_a.address) as a:
        first = a.sign_batch([item])[0]
    with client(cluster, node_b.address) as b:
        again = b.sign_batch([item])[0]
        changed = b.sign_batch([SignItem(sample("r"), ACCOUNT, idempotency_key="retry-1")])[0]
    assert first.ok and again.ok, (first, again)
    assert again.hc1 == first.hc1
    assert changed.error == ErrorCode.IDEMPOTENCY_CONFLICT
    # The same key sent to both nodes at the same moment: one claims it and signs, the other
    # answers with that signature.
    racing = SignItem(sample("t"), ACCOUNT, idempotency_key="race-1")
    answers = {}
    barrier = threading.Barrier(2)

    def send(node):
        with client(cluster, node.address) as c:
            barrier.wait(60)
            answers[node.name] = c.sign_batch([racing])[0]

    threads = [threading.Thread(target=send, args=(n,)) for n in cluster.nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r.ok for r in answers.values()), answers
    assert len({r.hc1 for r in answers.values()}) == 1
    # the audit logs of both nodes together hold exactly one record for each
    records = audit_records(cluster, account=ACCOUNT)
    assert sum(len(r) for r in records.values()) == 2, records
    logged = logged_signatures(cluster, account=ACCOUNT)
    assert set(logged) == {signature_hash(first.hc1), signature_hash(answers["node1"].hc1)}
    for result in (first, answers["node2"]):
        assert verify_pycose(result.hc1, _dsc(cluster, result.kid)).ok


@slow
def test_a_node_killed_under_load(start_cluster):
    quota = 2000
    # node1's claims on items it held when it died expire after 10 s (the default is 60)
    cluster = start_cluster(
        account_quota={"per_hour": quota}, engine_args=("--state-claim-ttl", "10")
    )
    dccs = varied_samples(50)
    portals = [
        Portal(cluster, items(dccs * 6, tag=f"k{k}:"), batch=10, pause=0.01) for k in range(6)
    ]
    threads = start_portals(portals)
    node1 = cluster.nodes[0]
    _wait(lambda: len(audit_records(cluster)["node1"]) >= 100, "node1 signed 100")
    node1.service.send(signal.SIGKILL)
    node1.service.wait(30)
    join_portals(threads)
    # every portal finished: each item signed once from its point of view
    assert all(r is not None and r.ok for p in portals for r in p.results), [
        r for p in portals for r in p.results if r is None or not r.ok
    ][:5]
    assert sum(p.reconnects for p in portals) >= 1, "no portal lost its connection"
    # every HC1 a portal holds is in one of the audit logs, and both logs verify
    received = {signature_hash(h) for p in portals for h in p.signed}
    logged = logged_signatures(cluster, account=ACCOUNT)
    assert received <= set(logged), len(received - set(logged))
    assert_logs_verify(cluster)
    # Quota counts stay exact: what is left of the quota is what the logs did not use, except
    # units node1 reserved for items it held when it died (at most one frame per portal).
    in_flight = sum(p.batch for p in portals)
    used = len(logged)
    assert used <= quota
    rest = Portal(cluster, items(varied_samples(50) * 10, tag="rest:"), batch=50)
    rest.run()
    more = len(rest.signed)
    assert rest.refused(ErrorCode.QUOTA_ACCOUNT) == 500 - more
    assert quota - in_flight <= used + more <= quota, (used, more)
    assert _audit_total(cluster, account=ACCOUNT) == used + more
    # the audit commands read both nodes' logs at once
    dirs = [str(n.audit_dir) for n in cluster.nodes]
    verified = _dccsign("audit", "verify", *dirs)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    revoke = _dccsign("audit", "revocations", "--account", ACCOUNT, "--json", *dirs)
    assert revoke.returncode == 0, revoke.stderr
    assert set(json.loads(revoke.stdout)["hashes"]["SIGNATURE"]) == set(
        logged_signatures(cluster, account=ACCOUNT)
    )
    signed = [h for p in portals for h in p.signed[:2]]
    kids = [r.kid for p in portals for r in p.results[:2]]
    assert all(verify_pycose(h, _dsc(cluster, k)).ok for h, k in zip(signed, kids, strict=True))


@slow
def test_redis_stopped_under_load(start_cluster):
    quota = 1000
    # claims whose call failed as Redis stopped expire after 10 s (the default is 60)
    cluster = start_cluster(
        account_quota={"per_hour": quota}, engine_args=("--state-claim-ttl", "10")
    )
    pids = [n.service.pid for n in cluster.nodes]
    dccs = varied_samples(50)
    # retries=0: each STATE_UNAVAILABLE reaches the portal (counted in .seen), which resends
    portals = [
        Portal(cluster, items(dccs * 8, tag=f"r{k}:"), batch=5, retries=0, pause=0.02)
        for k in range(4)
    ]
    threads = start_portals(portals)
    _wait(lambda: _signed_count(portals) >= 100, "100 signed before Redis stops")
    cluster.redis.stop()
    unavailable = ErrorCode.STATE_UNAVAILABLE
    _wait(lambda: sum(p.seen[unavailable] for p in portals) >= 20, "STATE_UNAVAILABLE")
    during = _audit_total(cluster, account=ACCOUNT)
    time.sleep(1)  # still down: nothing more is signed
    assert _audit_total(cluster, account=ACCOUNT) == during
    redis_available_again(cluster)
    join_portals(threads)
    assert [n.service.pid for n in cluster.nodes] == pids and all(
        n.service.running for n in cluster.nodes
    ), "an engine was restarted"
    results = [r for p in portals for r in p.results]
    assert None not in results
    assert {ErrorCode(r.error) for r in results if not r.ok} == {ErrorCode.QUOTA_ACCOUNT}
    logged = logged_signatures(cluster, account=ACCOUNT)
    assert len(logged) > during, "nothing was signed after Redis returned"
    # nothing signed uncounted: the logs never exceed the quota, and hold every HC1 received
    # (a unit whose reservation Redis made but could not acknowledge as it stopped may stay
    # counted: at most the frames in flight then)
    assert quota - sum(p.batch for p in portals) <= len(logged) <= quota
    assert {signature_hash(h) for p in portals for h in p.signed} <= set(logged)
    assert_logs_verify(cluster)


@slow
def test_a_draining_node_stops_being_chosen(start_cluster):
    # no queue target and frames of up to 5,000: one big request keeps node1 draining for a while
    cluster = start_cluster(engine_args=("--queue-target", "0", "--max-batch", "5000"))
    node1, node2 = cluster.nodes
    dccs = varied_samples(50)
    portals = [
        Portal(cluster, items(dccs * 40, tag=f"d{k}:"), batch=10, pause=0.01) for k in range(4)
    ]
    threads = start_portals(portals)
    _wait(lambda: all(audit_records(cluster).values()), "both nodes sign")
    big = []
    with client(cluster, node1.address) as direct:
        worker = threading.Thread(
            target=lambda: big.extend(
                direct.sign_batch(items(dccs * 80, account="uzi:900000099", tag="big:"))
            )
        )
        worker.start()
        _wait(lambda: big or node1.metric("dccsign_pending_items") >= 4000, "4,000 in node1")
        health = []
        poller = threading.Thread(target=lambda: _poll_health(node1, health), daemon=True)
        poller.start()
        node1.service.send(signal.SIGTERM)
        cluster.wait_lb_sees("node1", "DOWN")
        worker.join(120)
    assert node1.service.wait(60) == 0
    poller.join(10)
    join_portals(threads)
    assert (503, "draining") in health, health[-5:]
    # what node1 had accepted was finished; every portal finished on node2
    assert len(big) == 4000 and all(r.ok for r in big)
    assert all(r is not None and r.ok for p in portals for r in p.results)
    assert sum(p.reconnects for p in portals) >= 1, "no portal was moved off node1"
    # a new connection through HAProxy lands on node2
    with client(cluster) as after:
        fresh = after.sign_batch(items(varied_samples(5), account="uzi:900000098"))
    assert all(r.ok for r in fresh)
    on = logged_signatures(cluster, account="uzi:900000098")
    assert {on[signature_hash(r.hc1)] for r in fresh} == {node2.name}
    assert_logs_verify(cluster)


def _poll_health(node, seen):
    """Record node's /healthz answers (status, first line) until it stops answering."""
    while True:
        status, body = node.healthz(timeout=1)
        if status == 0:
            return
        seen.append((status, body.strip().splitlines()[0] if body.strip() else ""))
        time.sleep(0.005)


@slow
def test_redis_that_does_not_answer_fails_closed_in_bounded_time(start_cluster):
    # claims left by calls that timed out expire after 10 s (serve --state-claim-ttl)
    cluster = start_cluster(
        account_quota={"per_hour": 1000}, engine_args=("--state-claim-ttl", "10")
    )
    before = items(varied_samples(5), tag="before:")
    stalled = items(varied_samples(5), tag="stalled:")
    # timeout 30: an engine that waited for a frozen Redis without bound would show as a
    # ClientError here, not as the retryable refusal the clients act on
    with client(cluster, retries=0, timeout=30) as c:
        assert all(r.ok for r in c.sign_batch(before))
        cluster.redis.send(signal.SIGSTOP)
        try:
            refused = c.sign_batch(stalled)
        finally:
            cluster.redis.send(signal.SIGCONT)
    assert {ErrorCode(r.error) for r in refused} == {ErrorCode.STATE_UNAVAILABLE}
    assert _audit_total(cluster, account=ACCOUNT) == 5
    # Redis answers again: new items are signed without an engine restart, and the refused
    # ones, resent with the same keys, once (Redis may have run the timed-out call's claims
    # after all: those keys are then signed once the claims expire)
    fresh = Portal(cluster, items(varied_samples(5), tag="after:"), seconds=60)
    fresh.run()
    assert all(r is not None and r.ok for r in fresh.results), fresh.seen
    again = Portal(cluster, stalled, seconds=120)
    again.run()
    assert all(r is not None and r.ok for r in again.results), again.seen
    logged = logged_signatures(cluster, account=ACCOUNT)
    assert len(logged) == 15
    assert {signature_hash(h) for h in again.signed + fresh.signed} <= set(logged)


@slow
def test_the_printed_sign_command_signs_through_haproxy(start_cluster, tmp_path):
    cluster = start_cluster()
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(d) + "\n" for d in varied_samples(3)))
    command = shlex.split(cluster.sign_command(str(samples)))
    assert command[:2] == ["dccsign", "sign"]
    signed = _dccsign(*command[1:], timeout=120)
    assert signed.returncode == 0, signed.stderr
    hc1s = signed.stdout.splitlines()
    assert len(hc1s) == 3 and all(h.startswith("HC1:") for h in hc1s)
    assert {signature_hash(h) for h in hc1s} <= set(logged_signatures(cluster))


def test_haproxy_config_is_valid_with_defaults_and_with_ports_from_the_environment():
    require_cluster_tools()
    checked = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True)
    assert checked.returncode == 0, checked.stderr
    names = ["LB_PORT", "LB_STATS_PORT", "NODE1_PORT", "NODE1_HTTP", "NODE2_PORT", "NODE2_HTTP"]
    env = dict(os.environ) | {f"DCCSIGN_{name}": str(free_port()) for name in names}
    env["DCCSIGN_LB_PORT"] = "not-a-port"  # proves the file reads the variables
    broken = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, env=env, text=True
    )
    assert broken.returncode != 0 and "not-a-port" in broken.stdout + broken.stderr
    env["DCCSIGN_LB_PORT"] = str(free_port())
    ported = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, env=env)
    assert ported.returncode == 0, ported.stderr
