"""engine/server/dispatch.py: a request's items in, one result per item out (fake keyd batcher)."""

import collections
import copy
import json
import os
import time

import cbor2
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccsign import native
from dccsign.bench.core import ephemeral_certificate
from dccsign.dcc.dsc import DSC
from dccsign.protocol import wire
from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.wire import ItemResult, SignItem
from dccsign.server.dispatch import Dispatcher
from dccsign.server.policy import PolicyFile, QuotaTracker
from dccsign.testing.samples import sample, varied_samples
from fakes import FakeBatcher, dispatcher_for, uvci_of_hc1


def _uvci(dcc):
    return next(dcc[g][0]["ci"] for g in ("v", "t", "r") if g in dcc)


def test_every_item_gets_its_own_result_in_order(tmp_path):
    """One keyd call for the request's valid items (one kid); an invalid DCC in the middle is
    refused by itself, and every other item gets the certificate of its own DCC."""
    batcher = FakeBatcher()
    d = dispatcher_for(tmp_path, batcher)
    items = [SignItem(dcc, f"uzi:{i % 7}") for i, dcc in enumerate(varied_samples(100))]
    items[40] = SignItem({"ver": "1.3.0"}, "uzi:1")
    types = [""] * len(items)

    async def main():
        return await d.sign("portal", items, types)

    results = trio.run(main)
    assert len(batcher.calls) == 1 and sum(batcher.calls[0]) == 99
    assert len(batcher.calls[0]) == 7  # one part per account
    for i, (item, result) in enumerate(zip(items, results, strict=True)):
        if i == 40:
            assert result.error == ErrorCode.INVALID_DCC and types[i] == ""
        else:
            assert result.ok and result.hc1 == "HC1:" + _uvci(item.dcc)
            assert types[i] in ("v", "t", "r")


def test_one_account_is_one_part(tmp_path):
    batcher = FakeBatcher()
    d = dispatcher_for(tmp_path, batcher)
    items = [SignItem(dcc, "uzi:1") for dcc in varied_samples(32)]

    async def main():
        return await d.sign("portal", items)

    results = trio.run(main)
    assert batcher.calls == [[32]]
    assert [r.hc1 for r in results] == ["HC1:" + _uvci(i.dcc) for i in items]


# Any value the wire codec can decode into a DCC (SPEC.md §4.3: no tags, text or bytes keys).
_cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12) | st.just(cbor2.undefined)
    | st.sampled_from([*range(20), *range(32, 256)]).map(cbor2.CBORSimpleValue),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.binary(max_size=4), inner, max_size=4),
    max_leaves=30,
)  # fmt: skip


def _graft(dcc, path, value):
    """*dcc* with *value* put at the place *path* leads to (a copy)."""
    dcc = copy.deepcopy(dcc)
    node = dcc
    for step in path[:-1]:
        if isinstance(node, dict) and node:
            node = node[sorted(node, key=repr)[step % len(node)]]
        elif isinstance(node, list) and node:
            node = node[step % len(node)]
    if isinstance(node, dict) and node:
        node[sorted(node, key=repr)[path[-1] % len(node)]] = value
    elif isinstance(node, list) and node:
        node[path[-1] % len(node)] = value
    return dcc


@settings(
    max_examples=int(os.environ.get("DCCSIGN_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    value=_cbor_values,
    path=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    whole=st.booleans(),
    key=st.none() | st.text(min_size=1, max_size=8),
)
def test_any_decodable_dcc_gets_a_result_never_an_exception(tmp_path_factory, value, path,
                                                           whole, key):  # fmt: skip
    """The dispatcher's contract: one result per item, whatever the item holds -- found by
    the live fuzz campaign, where a CBOR simple value inside a DCC made the idempotency
    fingerprint raise (and the request was answered INTERNAL)."""
    d = dispatcher_for(tmp_path_factory.mktemp("d"), FakeBatcher())
    base = sample("v")
    dcc = value if whole else _graft(base, path, value)
    items = [SignItem(dcc, "uzi:1", idempotency_key=key), SignItem(base, "uzi:2")]

    async def main():
        return await d.sign("portal", items, [""] * 2)

    first, honest = trio.run(main)
    assert honest.ok
    assert first.ok or first.error in (ErrorCode.INVALID_DCC, ErrorCode.NO_KEY), first


def test_quotas_are_charged_per_account_and_a_short_account_gets_what_is_left(tmp_path):
    """An account's items in one request are reserved together; an account with room for
    only some of them gets that many (the first ones, in order) and the rest QUOTA_ACCOUNT;
    another account of the same request is not affected. Refused items are not counted."""
    calls = []

    class Counting(QuotaTracker):
        def try_reserve_many(self, policy, client, accounts, counts):
            calls.append((tuple(accounts), tuple(counts)))
            return super().try_reserve_many(policy, client, accounts, counts)

    path = tmp_path / "policy.json"
    path.write_text('{"clients": {"portal": {"account_quota": {"per_minute": 3}}}}')
    (tmp_path / "unused").mkdir()
    key = dispatcher_for(tmp_path / "unused", FakeBatcher()).keys[0]
    d = Dispatcher(FakeBatcher(), [(key.dsc, "active")], PolicyFile(path), Counting())
    dccs = varied_samples(9)
    items = [SignItem(dcc, "uzi:short" if i % 3 else "uzi:ok") for i, dcc in enumerate(dccs)]
    # uzi:ok holds items 0, 3, 6 (fits exactly); uzi:short holds the six others.

    async def main():
        return await d.sign("portal", items)

    results = trio.run(main)
    short = [i for i in range(9) if i % 3]
    assert [results[i].ok for i in short] == [True, True, True, False, False, False]
    assert all(results[i].error == ErrorCode.QUOTA_ACCOUNT for i in short[3:])
    assert all(results[i].ok for i in (0, 3, 6))
    # One reservation for the request: per distinct account, its count (uzi:short gets as
    # many of its 6 as fit, as one by one until the first no would).
    assert calls == [(("uzi:ok", "uzi:short"), (3, 6))]
    assert d.quotas.usage("portal", "uzi:short") == {"per_minute": 3}


# ------------------------------------------------------------- the walked path (issue 14)


def _frame(dccs, accounts, operators):
    items = []
    for dcc, account, operator in zip(dccs, accounts, operators, strict=True):
        item = {"dcc": dcc, "account": account}
        if operator is not None:
            item["operator"] = operator
        items.append(item)
    return cbor2.dumps({"items": items})


def _twins(tmp_path, policy_doc):
    """Two dispatchers over one key and equal policies: one for sign, one for sign_view."""
    (tmp_path / "unused").mkdir()
    key = dispatcher_for(tmp_path / "unused", FakeBatcher()).keys[0]
    out = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(policy_doc))
        out.append(Dispatcher(FakeBatcher(), [(key.dsc, "active")], PolicyFile(path),
                              QuotaTracker(clock=lambda: 1e6)))  # fmt: skip
    return out


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 60),
    seed=st.integers(0, 2**16),
    accounts=st.integers(1, 8),
    broken=st.sets(st.integers(0, 59), max_size=5),
    policy=st.sampled_from(["open", "quota", "countries", "types"]),
)
def test_sign_view_gives_what_sign_gives(tmp_path_factory, n, seed, accounts, broken, policy):
    """The per-frame path and the per-item path agree on every item: signed, refused as
    invalid, by policy or by quota, with the same messages (FakeBatcher signs "HC1:<uvci>")."""
    tmp_path = tmp_path_factory.mktemp("twins")
    doc = {"clients": {"portal": {}}}
    if policy == "quota":
        doc["clients"]["portal"]["account_quota"] = {"per_minute": 5}
    elif policy == "countries":
        doc["clients"]["portal"]["countries"] = ["BE"]
    elif policy == "types":
        doc["clients"]["portal"]["types"] = ["v"]
    per_item, per_frame = _twins(tmp_path, doc)
    dccs = varied_samples(n, seed=seed)
    for b in broken:
        if b < n:
            dccs[b] = {**dccs[b], "ver": "9.9.9"}
    names = [f"uzi:{(i * 7 + seed) % accounts}" for i in range(n)]
    operators = [None if i % 3 else f"op:{i % 2}" for i in range(n)]
    body = _frame(dccs, names, operators)
    view = native.walk_sign_batch(body, 1000)
    decoded = view.sign_items()

    async def main():
        types_a, types_b = [""] * n, [""] * n
        a = await per_item.sign("portal", list(decoded), types_a)
        b = await per_frame.sign_view("portal", view, types_b)
        return a, b, types_a, types_b

    a, reply, types_a, types_b = trio.run(main)
    assert reply.count == n
    b = wire.bodies.read_sign_batch_result(0, cbor2.loads(reply.body), 1000).results
    b = [ItemResult(hc1=uvci_of_hc1(r.hc1), kid=r.kid) if r.ok else r for r in b]
    assert b == a
    outcomes = collections.Counter()
    for r, t in zip(a, types_a, strict=True):
        outcomes[(r.kid.hex(), t, "ok") if r.ok else ("", t, r.error.name)] += 1
    assert reply.outcomes == dict(outcomes)
    assert types_b == types_a
    # keyd saw the same payloads
    assert per_frame.batcher.signed == per_item.batcher.signed


def _normalised(reply):
    """Results of sign_view, FakeBatcher's real HC1s reduced to "HC1:<uvci>" as sign gives."""
    if isinstance(reply, list):
        results = reply
    else:
        results = wire.bodies.read_sign_batch_result(0, cbor2.loads(reply.body), 1000).results
    return [ItemResult(hc1=uvci_of_hc1(r.hc1), kid=r.kid) if r.ok else r for r in results]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    keyed=st.sets(st.integers(0, 29), max_size=30),
    same_key=st.sets(st.integers(0, 29), max_size=4),
    broken=st.sets(st.integers(0, 29), max_size=3),
)
def test_keyed_items_take_the_frame_path_and_answer_as_sign_does(
    tmp_path_factory, n, seed, keyed, same_key, broken
):
    """Items with idempotency keys: new ones signed with the frame, repeats answered from the
    cache (a retry of the whole frame signs nothing again), a key reused for another DCC
    refused as a conflict, two items of one frame with one key handled one after the other --
    the same results as the item-by-item path, in three rounds."""
    tmp_path = tmp_path_factory.mktemp("keyed")
    per_item, per_frame = _twins(tmp_path, {"clients": {"portal": {}}})
    dccs = varied_samples(n, seed=seed)
    for b in broken:
        if b < n:
            dccs[b] = {**dccs[b], "ver": "9.9.9"}

    def items(dccs):
        out = []
        for i, dcc in enumerate(dccs):
            key = None
            if i in keyed:
                key = b"shared-key" if i in same_key else f"key-{i}".encode()
            item = {"dcc": dcc, "account": f"uzi:{i % 3}"}
            if key:
                item["idempotency_key"] = key
            out.append(item)
        return cbor2.dumps({"items": out})

    other = varied_samples(n, seed=seed + 1)
    rounds = [items(dccs), items(dccs), items(other)]  # first, retry, conflicts

    async def main():
        out = []
        for body in rounds:
            view = native.walk_sign_batch(body, 1000)
            types_a, types_b = [""] * n, [""] * n
            a = await per_item.sign("portal", list(view.sign_items()), types_a)
            b = await per_frame.sign_view("portal", view, types_b)
            out.append((a, b, types_a, types_b))
        return out

    for a, b, types_a, types_b in trio.run(main):
        assert _normalised(b) == a
        assert types_b == types_a
    assert per_frame.batcher.signed == per_item.batcher.signed


def test_a_frame_of_several_kids_goes_to_keyd_in_one_call_without_empty_kids(
    tmp_path, dev_keystore
):
    """With one key per DCC type (the development keystore), a frame mixing types is one
    issue_columns_many call with a batch per kid; a kid whose rows were all refused (here by
    an account's quota) is not in it, and the other kids are signed."""
    from dccsign.keys.keystore import Keystore

    class Recording(FakeBatcher):
        def __init__(self):
            super().__init__()
            self.many = []

        async def issue_columns_many(self, batches):
            self.many.append([(kid, len(columns)) for kid, _protected, columns in batches])
            return await super().issue_columns_many(batches)

    store = Keystore.open(dev_keystore)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"clients": {"portal": {"account_quota": {"per_minute": 2}}}}))
    batcher = Recording()
    d = Dispatcher(batcher, [(e.dsc, "active") for e in store.entries], PolicyFile(path),
                   QuotaTracker(clock=lambda: 1e6))  # fmt: skip
    kid_of = {t: next(e.kid for e in store.entries if e.dsc.usages == frozenset(t)) for t in "vt"}
    dccs = [sample("v"), sample("t"), sample("v"), sample("t")]

    def run(accounts):
        view = native.walk_sign_batch(_frame(dccs, accounts, [None] * 4), 1000)
        return _normalised(trio.run(d.sign_view, "portal", view))

    first = run(["uzi:a", "uzi:t", "uzi:b", "uzi:t"])
    assert all(r.ok for r in first)
    assert sorted(batcher.many[0]) == sorted([(kid_of["v"], 2), (kid_of["t"], 2)])
    # uzi:t has used its 2 per minute: the t kid has no row left and is not sent
    second = run(["uzi:c", "uzi:t", "uzi:d", "uzi:t"])
    assert [r.ok for r in second] == [True, False, True, False]
    assert {second[1].error, second[3].error} == {ErrorCode.QUOTA_ACCOUNT}
    assert batcher.many[1] == [(kid_of["v"], 2)]


def test_a_plain_frame_claims_follow_the_clock_and_a_key_change_at_once(tmp_path):
    """A plain frame's claims (iat/exp) and key are worked out once per clock second: the
    next second's frame gets the next second's iat, and a key disabled by set_keys refuses
    the very next frame, within the same second."""
    import time

    class Recording(FakeBatcher):
        def __init__(self):
            super().__init__()
            self.payloads = []

        async def issue_columns(self, kid, protected, columns):
            self.payloads += columns.payload_list()
            return await super().issue_columns(kid, protected, columns)

    second = float(int(time.time()))
    clock = [second]
    batcher = Recording()
    base = dispatcher_for(tmp_path, FakeBatcher())
    d = Dispatcher(batcher, [(k.dsc, "active") for k in base.keys], base.policy,
                   QuotaTracker(), clock=lambda: clock[0])  # fmt: skip
    body = _frame([sample("v")], ["uzi:1"], [None])

    def iat_at(now):
        clock[0] = now
        before = len(batcher.payloads)
        (result,) = _normalised(trio.run(d.sign_view, "portal", native.walk_sign_batch(body, 10)))
        if not result.ok:
            return result
        (payload,) = batcher.payloads[before:]
        return cbor2.loads(payload)[6]

    backdate = d._claims.backdate
    assert iat_at(second + 0.25) == int(second) - backdate
    assert iat_at(second + 0.75) == int(second) - backdate
    assert iat_at(second + 1.0) == int(second) + 1 - backdate
    d.set_keys([(k.dsc, "disabled") for k in base.keys])
    assert iat_at(second + 1.5).error == ErrorCode.NO_KEY


def test_a_plain_frame_follows_a_policy_reload_at_once(tmp_path):
    """The policy's verdict for a plain frame (client, kid, type) is kept per policy object:
    a reload that restricts the client's types, then one that disables it (the kill
    switch), refuses the very next frame."""
    _key, cert = ephemeral_certificate()
    path = tmp_path / "policy.json"
    quota = {"per_hour": 10**9}

    def write(portal):
        path.write_text(json.dumps({"clients": {"portal": {"quota": quota, **portal}},
                                    "default_account_quota": quota}))  # fmt: skip
        os.utime(path, ns=(time.time_ns(), time.time_ns() + len(json.dumps(portal))))

    write({})
    d = Dispatcher(FakeBatcher(), [(DSC.from_certificate(cert), "active")],
                   PolicyFile(path, interval_s=0), QuotaTracker())  # fmt: skip
    body = _frame([sample("v")], ["uzi:1"], [None])

    def sign():
        (result,) = _normalised(trio.run(d.sign_view, "portal", native.walk_sign_batch(body, 10)))
        return result

    assert sign().ok and sign().ok
    write({"types": ["t"]})
    assert sign().error == ErrorCode.TYPE_NOT_ALLOWED
    write({"disabled": True})
    assert sign().error == ErrorCode.CLIENT_DISABLED
    write({})
    assert sign().ok
