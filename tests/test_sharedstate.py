"""Quotas and idempotency keys shared by several engines in one Redis (``serve --state``):
two in-process engines (real servers and dispatchers, keyd faked) on one real
``redis-server``. The process-level cluster (HAProxy, keyd, audit logs) is
tests/test_cluster.py's."""

from __future__ import annotations

import collections
import math

import pytest
import trio

from conftest import need_redis
from dccsign.protocol import wire
from dccsign.protocol.codes import RETRYABLE, ErrorCode
from dccsign.protocol.wire import SignItem
from dccsign.server.policy import Policy, QuotaTracker
from dccsign.server.sharedstate import Claim, RedisState, StateUnavailable, state_url
from dccsign.testing.cluster import Redis
from dccsign.testing.net import free_port_with_bus
from dccsign.testing.samples import varied_samples
from server_harness import UID, Engine


def restart(redis):
    redis.start()
    redis.wait_ready(60)


def policy(account_quota=None, quota=None):
    client = {}
    if quota is not None:
        client["quota"] = quota
    if account_quota is not None:
        client["account_quota"] = account_quota
    return {"clients": {"portal": client}, "unix_uids": {str(UID): "portal"}}


async def until(condition):
    """Wait until *condition()* holds (plain attributes of other tasks' objects)."""
    with trio.fail_after(15):
        while not condition():  # noqa: ASYNC110 -- polling plain attributes
            await trio.sleep(0.01)


class Node:
    """One engine of the deployment: a server over a fake keyd, and its RedisState."""

    def __init__(self, tmp_path, name, url, document, **options):
        self.state = RedisState(url, node=name, **options)
        (tmp_path / name).mkdir()
        self.engine = Engine(tmp_path / name, document, shared=self.state)

    async def start(self, nursery):
        await nursery.start(self.state.run)
        await until(lambda: self.state.problem is None)

    async def client(self, nursery):
        raw = self.engine.connect_memory(nursery)
        await raw.hello()
        return raw

    @property
    def signed(self):
        return self.engine.batcher.signed


async def nodes(nursery, tmp_path, redis, document, n=2, **options):
    out = [Node(tmp_path, f"node-{i}", redis.url, document, **options) for i in range(n)]
    for node in out:
        await node.start(nursery)
    return out


async def pair(nursery, tmp_path, redis, document, **options):
    """Two engines and a connected client of each: ``(a, b, client of a, client of b)``."""
    a, b = await nodes(nursery, tmp_path, redis, document, **options)
    return a, b, await a.client(nursery), await b.client(nursery)


def codes(results):
    return collections.Counter("ok" if r.ok else ErrorCode(r.error).name for r in results)


DCCS = varied_samples(200, seed=16)


async def test_an_account_quota_is_exact_over_two_engines_fired_concurrently(tmp_path, redis):
    limit = 37
    document = policy(account_quota={"per_hour": limit})
    results = []
    async with trio.open_nursery() as nursery:
        a, b = await nodes(nursery, tmp_path, redis, document)
        clients = [await node.client(nursery) for node in (a, b) for _ in range(4)]

        async def fire(raw, dccs):
            for dcc in dccs:  # single items and small batches, as portals send them
                reply = await raw.sign([SignItem(d, "uzi:gp-1") for d in dcc])
                results.extend(reply.results)

        async with trio.open_nursery() as firing:
            for k, raw in enumerate(clients):  # 8 clients x 8 requests of 1 to 3 items
                starts = [(k * 24 + j * 3) % 190 for j in range(8)]
                firing.start_soon(
                    fire, raw, [DCCS[s : s + 1 + j % 3] for j, s in enumerate(starts)]
                )
        nursery.cancel_scope.cancel()
    counted = codes(results)
    assert counted["ok"] == limit, counted
    assert counted["QUOTA_ACCOUNT"] == len(results) - limit
    assert a.signed + b.signed == limit
    assert a.signed and b.signed  # both engines signed a share


async def test_a_client_quota_is_exact_with_many_accounts_and_refusals_say_when(tmp_path, redis):
    document = policy(quota={"per_minute": 50}, account_quota={"per_hour": 3})
    async with trio.open_nursery() as nursery:
        a, b, ra, rb = await pair(nursery, tmp_path, redis, document)
        items = [SignItem(d, f"uzi:{i % 30}") for i, d in enumerate(DCCS[:120])]
        replies = []

        async def send(raw, part):
            replies.append(await raw.sign(part))

        async with trio.open_nursery() as firing:
            firing.start_soon(send, ra, items[:60])
            firing.start_soon(send, rb, items[60:])
        nursery.cancel_scope.cancel()
    results = [r for reply in replies for r in reply.results]
    counted = codes(results)
    assert counted["ok"] == 50, counted
    assert a.signed + b.signed == 50
    refused = [r for r in results if not r.ok]
    assert {ErrorCode(r.error) for r in refused} <= {
        ErrorCode.QUOTA_CLIENT,
        ErrorCode.QUOTA_ACCOUNT,
    }
    # The client's minute frees up within a minute, an account's hour within the hour.
    for r in refused:
        bound = 61_000 if r.error == ErrorCode.QUOTA_CLIENT else 3_660_000
        assert 0 < r.retry_after_ms <= bound, r
        assert "quota of" in r.message and "retry in" in r.message


async def test_a_retry_on_the_other_engine_gets_the_first_signature(tmp_path, redis):
    document = policy(account_quota={"per_hour": 100})
    dcc = DCCS[0]
    async with trio.open_nursery() as nursery:
        a, b, ra, rb = await pair(nursery, tmp_path, redis, document)
        item = SignItem(dcc, "uzi:gp-1", idempotency_key=b"k-1")
        first = (await ra.sign([item, SignItem(DCCS[1], "uzi:gp-1")])).results
        again = (await rb.sign([item])).results
        other = (await rb.sign([SignItem(DCCS[2], "uzi:gp-1", idempotency_key=b"k-1")])).results
        text_key = (await rb.sign([SignItem(dcc, "uzi:gp-1", idempotency_key="k-1")])).results
        nursery.cancel_scope.cancel()
    assert first[0].ok and again[0].ok and text_key[0].ok
    assert again[0].hc1 == first[0].hc1 == text_key[0].hc1 and again[0].kid == first[0].kid
    assert other[0].error == ErrorCode.IDEMPOTENCY_CONFLICT
    assert a.signed == 2 and b.signed == 0  # nothing signed twice, no quota spent twice


async def test_a_retry_waits_for_a_first_attempt_in_progress_on_the_other_engine(tmp_path, redis):
    document = policy(account_quota={"per_hour": 100})
    item = SignItem(DCCS[3], "uzi:gp-1", idempotency_key=b"slow")
    async with trio.open_nursery() as nursery:
        a, b, ra, rb = await pair(nursery, tmp_path, redis, document)
        a.engine.batcher.gate = trio.Event()  # A's keyd holds the first attempt
        replies = {}

        async def send(name, raw):
            replies[name] = (await raw.sign([item])).results[0]

        nursery.start_soon(send, "a", ra)
        await until(lambda: a.engine.batcher.calls)
        nursery.start_soon(send, "b", rb)
        await trio.sleep(0.2)
        assert "b" not in replies  # B waits rather than signing it again
        a.engine.batcher.gate.set()
        await until(lambda: len(replies) == 2)
        nursery.cancel_scope.cancel()
    assert replies["a"].ok and replies["b"].hc1 == replies["a"].hc1
    assert a.signed == 1 and b.signed == 0


async def test_a_failed_first_attempt_frees_its_key_and_quota_for_the_retry(tmp_path, redis):
    document = policy(account_quota={"per_hour": 1})
    item = SignItem(DCCS[4], "uzi:gp-1", idempotency_key=b"refused-first")
    async with trio.open_nursery() as nursery:
        a, b, ra, rb = await pair(nursery, tmp_path, redis, document)
        a.engine.batcher.refuse = True  # keyd refuses every payload on A
        first = (await ra.sign([item])).results[0]
        retry = (await rb.sign([item])).results[0]
        nursery.cancel_scope.cancel()
    assert first.error == ErrorCode.KEYD_REFUSED
    assert retry.ok  # the claim was dropped and the unit given back: B signs it
    assert b.signed == 1


async def test_redis_gone_fails_closed_and_service_resumes_when_it_returns(tmp_path, redis):
    document = policy(account_quota={"per_hour": 1000})
    free_client = {"clients": {"portal": {}}, "unix_uids": {str(UID): "portal"}}
    async with trio.open_nursery() as nursery:
        (a,) = await nodes(nursery, tmp_path, redis, document, n=1, timeout=0.3)
        (free,) = [Node(tmp_path, "free", redis.url, free_client, timeout=0.3)]
        await free.start(nursery)
        ra, rf = await a.client(nursery), await free.client(nursery)
        ok = await ra.sign([SignItem(DCCS[5], "uzi:gp-1")])
        assert ok.results[0].ok
        await trio.to_thread.run_sync(redis.stop)
        down = []
        for i in range(6):  # while Redis is down: retryable refusals, nothing signed
            down.extend((await ra.sign([SignItem(DCCS[6 + i], "uzi:gp-1")])).results)
        keyed = (await rf.sign([SignItem(DCCS[20], "uzi:x", idempotency_key=b"k")])).results
        unkeyed = (await rf.sign([SignItem(DCCS[21], "uzi:x")])).results
        assert a.signed == 1
        await trio.to_thread.run_sync(restart, redis)
        await until(lambda: a.state.problem is None)
        back = (await ra.sign([SignItem(DCCS[30], "uzi:gp-1")])).results
        nursery.cancel_scope.cancel()
    assert {r.error for r in down} == {ErrorCode.STATE_UNAVAILABLE}
    assert all(r.error in RETRYABLE and r.retry_after_ms for r in down)
    assert "unavailable" in down[0].message
    assert keyed[0].error == ErrorCode.STATE_UNAVAILABLE  # a key it cannot claim: not signed
    assert unkeyed[0].ok  # a client without quotas does not need the store
    assert back[0].ok and a.signed == 2


async def test_a_slow_redis_times_out_into_the_retryable_error(tmp_path, redis):
    document = policy(account_quota={"per_hour": 1000})
    async with trio.open_nursery() as nursery:
        (a,) = await nodes(nursery, tmp_path, redis, document, n=1, timeout=0.2)
        ra = await a.client(nursery)
        await trio.to_thread.run_sync(_pause_redis, redis, 1000)  # Redis blocks for 1 s
        slow = (await ra.sign([SignItem(DCCS[7], "uzi:gp-1")])).results[0]
        assert a.signed == 0
        await trio.sleep(1.2)
        with trio.fail_after(15):
            while True:  # reconnected: it signs again without a restart
                again = (await ra.sign([SignItem(DCCS[8], "uzi:gp-1")])).results[0]
                if again.ok:
                    break
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert slow.error == ErrorCode.STATE_UNAVAILABLE and a.signed == 1


def _pause_redis(redis, ms):
    import socket

    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as s:
        s.sendall(b"CLIENT PAUSE %d ALL\r\n" % ms)
        assert s.recv(100).startswith(b"+OK")


async def test_shared_quotas_grant_what_the_in_process_tracker_grants(tmp_path, redis):
    """The same sequence of charges and releases, one store each: the same grants, the
    same kind of refusal, retry-after within a bucket of each other."""
    doc = policy(quota={"per_minute": 40, "per_day": 500}, account_quota={"per_hour": 7})
    pol = Policy.from_dict(doc)
    tracker = QuotaTracker()
    state = RedisState(redis.url, node="diff")
    rng = __import__("random").Random(5)
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        await until(lambda: state.problem is None)
        for _ in range(40):
            accounts = rng.sample([f"a{i}" for i in range(12)], rng.randint(1, 6))
            counts = [rng.randint(1, 5) for _ in accounts]
            local = tracker.try_reserve_many(pol, "portal", accounts, counts)
            shared = await state.charge(pol, "portal", accounts, counts)
            assert [g for g, _ in shared] == [g for g, _ in local]
            for (_, lr), (_, sr) in zip(local, shared, strict=True):
                assert (lr is None) == (sr is None)
                if lr is not None:
                    assert lr.code == sr.code
                    assert math.isclose(lr.retry_after_s, sr.retry_after_s, abs_tol=61)
            if rng.random() < 0.3:
                account = rng.choice(accounts)
                tracker.release("portal", account, 2)
                state.release(pol, "portal", account, 2)
        nursery.cancel_scope.cancel()


async def test_an_operation_on_a_store_that_never_answered_fails_at_once(tmp_path):
    state = RedisState("redis://127.0.0.1:1/0", node="n", timeout=0.1)
    pol = Policy.from_dict(policy(account_quota={"per_hour": 5}))
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        with trio.fail_after(5), pytest.raises(StateUnavailable, match="unavailable"):
            await state.charge(pol, "portal", ["a"], [1])
        with pytest.raises(StateUnavailable):
            await state.claim("portal", [(SignItem({}, "a", idempotency_key=b"k"), b"f" * 32)])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "redis://:pw@h:1/2", "unix:///run/redis.sock?db=1",
     "redis+cluster://a:1,b:2"],
)  # fmt: skip
def test_state_urls_accepted(url):
    assert state_url(url) == url


@pytest.mark.parametrize(
    "url", ["http://x", "rediss://h:1", "redis+cluster://a", "redis+cluster://a:b", ""]
)
def test_state_urls_refused(url):
    with pytest.raises(ValueError):
        state_url(url)


def test_wire_knows_the_new_code():
    assert wire.Error(1, ErrorCode.STATE_UNAVAILABLE, "x").retryable


async def test_a_claim_whose_call_timed_out_does_not_hold_its_key(tmp_path, redis):
    """A call that times out may still run in Redis later (here: after a pause). The claim
    it made is dropped with the next call that works, so a retry on the other engine is
    signed without waiting for the claim to expire."""
    document = policy(account_quota={"per_hour": 100})
    item = SignItem(DCCS[9], "uzi:gp-1", idempotency_key=b"paused")
    async with trio.open_nursery() as nursery:
        a, b, ra, rb = await pair(nursery, tmp_path, redis, document, timeout=0.2, claim_ttl=600)
        await trio.to_thread.run_sync(_pause_redis, redis, 800)
        first = (await ra.sign([item])).results[0]
        await until(lambda: a.state.problem is None and not a.state._unsent_finishes)
        retry = (await rb.sign([item])).results[0]
        nursery.cancel_scope.cancel()
    assert first.error == ErrorCode.STATE_UNAVAILABLE
    assert retry.ok and a.signed == 0 and b.signed == 1


async def test_the_store_reports_its_calls_and_failures_in_the_metrics(tmp_path, redis):
    from dccsign.server.metrics import Metrics

    metrics = Metrics()
    state = RedisState(redis.url, node="m", timeout=0.2, metrics=metrics)
    pol = Policy.from_dict(policy(account_quota={"per_hour": 5}))

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, labels) or 0

    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        await until(lambda: state.problem is None)
        first = await state.charge(pol, "portal", ["a", "b"], [2, 9])
        assert first[0] == (2, None) and first[1][0] == 5
        assert first[1][1].code == "QUOTA_ACCOUNT" and "quota of 5 per hour" in first[1][1].message
        assert sample("dccsign_state_up") == 1
        assert sample("dccsign_state_call_seconds_count") >= 1
        assert sample("dccsign_state_call_operations_sum") >= 2  # two accounts
        await trio.to_thread.run_sync(redis.stop)
        with pytest.raises(StateUnavailable):
            await state.charge(pol, "portal", ["a"], [1])
        await until(lambda: state.problem is not None)
        state.release(pol, "portal", "a", 1)  # queued while down: lost, and counted as such
        await until(lambda: sample("dccsign_state_lost_releases_total") == 1)
        nursery.cancel_scope.cancel()
    assert sample("dccsign_state_up") == 0
    errors = [
        s for m in metrics.registry.collect() for s in m.samples
        if s.name == "dccsign_state_errors_total"
    ]  # fmt: skip
    assert errors and sum(s.value for s in errors) >= 1


class ClusterRedis(Redis):
    """One primary of a Redis Cluster (no persistence)."""

    def argv(self):
        argv = super().argv()
        return [*argv, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]


@pytest.fixture
def redis_cluster(tmp_path):
    import subprocess

    need_redis()
    primaries = [ClusterRedis(tmp_path / f"c{i}", free_port_with_bus()) for i in range(3)]
    try:
        for server in primaries:
            server.start()
        for server in primaries:
            server.wait_ready(60)
        addresses = [f"127.0.0.1:{server.port}" for server in primaries]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for server in primaries:
            _wait_cluster_ok(server.port)
        yield "redis+cluster://" + ",".join(addresses[:2])
    finally:
        for server in primaries:
            server.stop()


def _wait_cluster_ok(port):
    import subprocess
    import time

    deadline = time.monotonic() + 30
    while (
        b"cluster_state:ok"
        not in subprocess.run(
            ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, check=False
        ).stdout
    ):
        assert time.monotonic() < deadline, "the Redis Cluster did not come up"
        time.sleep(0.1)


async def test_a_redis_cluster_serves_the_same_quotas_and_keys(redis_cluster):
    """Through coredis's cluster client: every key of one call is in one slot (one hash
    tag), so the script runs where the slot lives."""
    pol = Policy.from_dict(policy(quota={"per_minute": 10}, account_quota={"per_hour": 3}))
    state = RedisState(redis_cluster, node="c", timeout=2)
    item = SignItem(DCCS[0], "uzi:1", idempotency_key=b"k")
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        await until(lambda: state.problem is None)
        verdicts = await state.charge(pol, "portal", ["a", "b", "c", "d"], [2, 2, 5, 5])
        first = await state.claim("portal", [(item, b"f" * 32)])
        again = await state.claim("portal", [(item, b"f" * 32)])
        nursery.cancel_scope.cancel()
    assert [g for g, _ in verdicts] == [2, 2, 3, 3]  # the client's 10 per minute, in order
    assert verdicts[3][1].code == "QUOTA_ACCOUNT" and verdicts[0][1] is None
    assert first == [(Claim.NEW, None)] and again == [(Claim.IN_PROGRESS, None)]
