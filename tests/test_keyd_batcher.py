"""The engine's micro-batcher toward keyd: parts of concurrent requests share one SIGN_MANY,
the hold time is bounded by the window, results go back to the right part, failures reach
every part of the micro-batch, and nothing waits forever."""

import hashlib
import time
from array import array

import cbor2
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import example, given
from hypothesis import strategies as st

from dccsign import native
from dccsign.bench.core import ephemeral_certificate
from dccsign.dcc.dsc import DSC
from dccsign.dcc.issuer import claims_prefix
from dccsign.dcc.verify import loads_exact
from dccsign.keyd.client import KeydError
from dccsign.protocol.keyd import ColumnsResult, ItemError, KeydColumns, SignPart
from dccsign.server.batcher import KeydBatcher, _fair_batch
from dccsign.testing.samples import sample, varied_samples

KID = bytes(range(8))
PROTECTED = native.protected_header(-7, KID)


class FakeKeyd:
    """Signs with a real P-256 key; refuses payloads that start with b"X"; can be held (to
    keep its slots busy) or made to fail."""

    def __init__(self, connections=1):
        self.key = ec.generate_private_key(ec.SECP256R1())
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.signer = native.SigningKey.load_pem(pem, None)
        self.connections = connections
        self.calls: list[list] = []
        self.hold = trio.Event()
        self.hold.set()
        self.fail: KeydError | None = None

    async def sign_many(self, kid, parts):
        assert kid == KID
        self.calls.append(list(parts))
        await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        out = []
        for part in parts:
            for p in part.payloads:
                if p.startswith(b"X"):
                    out.append((ItemError.MALFORMED_CWT, "not a CWT"))
                else:
                    out.append(self.signer.sign(PROTECTED, [p])[0])
        return out


def _payload(n):
    now = int(time.time())
    dcc = {**sample("v"), "dob": f"19{n % 90 + 10}"}
    import cbor2

    return claims_prefix("NL", now - 60, now + 86400) + cbor2.dumps(dcc)


async def _until(condition):
    """Poll on trio's clock (the tests that use it run on the autojump clock)."""
    while not condition():  # noqa: ASYNC110 -- the conditions are plain attributes
        await trio.sleep(0.0001)


def _issue(batcher, payloads, account):
    return lambda: batcher.issue(KID, PROTECTED, [SignPart("c", account, tuple(payloads))])


async def _issue_all(batcher, jobs):
    results = {}

    async def one(name, payloads, account):
        results[name] = await batcher.issue(
            KID, PROTECTED, [SignPart("portal", account, tuple(payloads))]
        )

    async with trio.open_nursery() as nursery:
        for name, (payloads, account) in jobs.items():
            nursery.start_soon(one, name, payloads, account)
    return results


def _verify(keyd, text, payload):
    import zlib

    import base45  # PyPI, independent of ours
    import cbor2
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    assert text.startswith("HC1:")
    tag = loads_exact(zlib.decompress(base45.b45decode(text[4:])))
    protected, _unprotected, signed_payload, sig = tag.value
    assert signed_payload == payload
    tbs = cbor2.dumps(["Signature1", protected, b"", signed_payload])
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    keyd.key.public_key().verify(der, tbs, ec.ECDSA(hashes.SHA256()))  # raises if wrong


async def test_concurrent_requests_share_one_sign_many_and_get_their_own_results():
    keyd = FakeKeyd()
    stages: list[tuple[str, float]] = []
    batcher = KeydBatcher(keyd, window=0.05, on_stage=lambda s, t: stages.append((s, t)))
    jobs = {
        "a": ([_payload(1), _payload(2)], "uzi:1"),
        "b": ([b"X-broken", _payload(3)], "uzi:2"),
        "c": ([_payload(4)], "uzi:3"),
    }
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        results = await _issue_all(batcher, jobs)
        nursery.cancel_scope.cancel()
    # All three parts, each under its own account, in one message.
    assert len(keyd.calls) == 1
    # The stage metrics: one observation of each stage for the one micro-batch.
    assert [s for s, _ in stages] == ["batch_wait", "keyd", "encode"]
    assert all(t >= 0 for _, t in stages)
    assert sorted(p.account for p in keyd.calls[0]) == ["uzi:1", "uzi:2", "uzi:3"]
    for name, (payloads, _) in jobs.items():
        assert len(results[name]) == len(payloads)
        for payload, outcome in zip(payloads, results[name], strict=True):
            if payload.startswith(b"X"):
                assert outcome == (ItemError.MALFORMED_CWT, "not a CWT")
            else:
                _verify(keyd, outcome, payload)


async def test_parts_wait_for_a_slot_at_most_the_window(autojump_clock):
    keyd = FakeKeyd(connections=1)
    batcher = KeydBatcher(keyd, window=0.001, max_in_flight=1)
    keyd.hold = trio.Event()  # keyd busy: the first micro-batch does not come back
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        nursery.start_soon(_issue(batcher, [_payload(1)], "a"))
        await trio.sleep(0.0001)
        assert len(keyd.calls) == 1 and batcher.in_flight == 1
        # The only slot is taken: the next parts gather for the window, then go anyway.
        start = trio.current_time()
        for i in range(3):
            nursery.start_soon(_issue(batcher, [_payload(i)], f"b{i}"))
        await _until(lambda: len(keyd.calls) >= 2)
        waited = trio.current_time() - start
        assert 0.0009 <= waited <= 0.0015
        assert len(keyd.calls[1]) == 3
        keyd.hold.set()
        await _until(lambda: not batcher.in_flight)
        nursery.cancel_scope.cancel()
    assert batcher.batches_sent == 2 and batcher.payloads_sent == 4


async def test_max_batch_splits_and_flushes_early(autojump_clock):
    keyd = FakeKeyd()
    batcher = KeydBatcher(keyd, window=10.0, max_batch=4, max_in_flight=1)
    keyd.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        nursery.start_soon(_issue(batcher, [_payload(0)], "a"))
        await trio.sleep(0.001)
        start = trio.current_time()
        for i in range(6):
            nursery.start_soon(_issue(batcher, [_payload(i)] * 2, f"b{i}"))
        await _until(lambda: len(keyd.calls) >= 2)
        # Reaching max_batch flushes at once, not after the (long) window.
        assert trio.current_time() - start < 0.01
        keyd.hold.set()
        await _until(lambda: not (batcher.in_flight or batcher.pending))
        nursery.cancel_scope.cancel()
    assert all(sum(len(p.payloads) for p in call) <= 4 for call in keyd.calls)
    assert sum(len(p.payloads) for call in keyd.calls for p in call) == 13


async def test_keyd_failure_reaches_every_part():
    keyd = FakeKeyd()
    keyd.fail = KeydError("keyd connection failed: reset")
    batcher = KeydBatcher(keyd, window=0.05)
    outcomes = []

    async def one(account):
        with pytest.raises(KeydError, match="reset") as info:
            await batcher.issue(KID, PROTECTED, [SignPart("c", account, (_payload(1),))])
        outcomes.append(info.value.retryable)

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as inner:
            for account in ("a", "b", "c"):
                inner.start_soon(one, account)
        nursery.cancel_scope.cancel()
    assert outcomes == [True, True, True] and len(keyd.calls) == 1


async def test_cancelled_batcher_releases_its_waiters():
    keyd = FakeKeyd()
    keyd.hold = trio.Event()
    batcher = KeydBatcher(keyd)
    failures = []

    async def one():
        try:
            await batcher.issue(KID, PROTECTED, [SignPart("c", "a", (_payload(1),))])
        except KeydError as exc:
            failures.append(exc)

    async with trio.open_nursery() as outer:
        outer.start_soon(one)
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            await _until(lambda: keyd.calls)
            nursery.cancel_scope.cancel()
    assert len(failures) == 1 and not failures[0].retryable


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        KeydBatcher(FakeKeyd(), window=-1)
    with pytest.raises(ValueError):
        KeydBatcher(FakeKeyd(), max_batch=0)


async def test_one_issue_with_several_parts_gets_flat_outcomes_in_order():
    keyd = FakeKeyd()
    batcher = KeydBatcher(keyd)
    parts = [
        SignPart("c", "uzi:1", (_payload(1), b"X-bad")),
        SignPart("c", "uzi:2", ()),
        SignPart("c", "uzi:3", (_payload(3),), "op"),
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        outcomes = await batcher.issue(KID, PROTECTED, parts)
        assert await batcher.issue(KID, PROTECTED, [SignPart("c", "a", ())]) == []
        nursery.cancel_scope.cancel()
    assert [p.account for p in keyd.calls[0]] == ["uzi:1", "uzi:3"]  # empty parts dropped
    assert len(outcomes) == 3 and outcomes[1] == (ItemError.MALFORMED_CWT, "not a CWT")
    _verify(keyd, outcomes[0], parts[0].payloads[0])
    _verify(keyd, outcomes[2], parts[2].payloads[0])


@pytest.mark.parametrize("count", [1, 4, 5, 40])
async def test_encoded_inline_or_in_a_thread_alike(count, monkeypatch):
    """Up to INLINE_ENCODE certificates are encoded on the event loop, more in a worker
    thread: the outcomes are the same either way."""
    from dccsign.server import batcher as keyd_batcher

    threads = []
    real = keyd_batcher.run_native

    async def counted(*args):
        threads.append(args[0])
        return await real(*args)

    monkeypatch.setattr(keyd_batcher, "run_native", counted)
    keyd = FakeKeyd()
    batcher = KeydBatcher(keyd)
    payloads = tuple(_payload(n) for n in range(count))
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        outcomes = await batcher.issue(KID, PROTECTED, [SignPart("c", "a", payloads)])
        nursery.cancel_scope.cancel()
    assert len(threads) == (count > keyd_batcher.INLINE_ENCODE)
    for payload, text in zip(payloads, outcomes, strict=True):
        _verify(keyd, text, payload)


async def test_a_busy_portal_does_not_queue_another_behind_its_backlog(autojump_clock):
    """keyd answers in order: a portal's backlog is held here (keyd gets at most twice
    max_in_flight micro-batches), and micro-batches are filled round-robin by client, so one
    certificate of another portal goes out in the next micro-batch, not after the backlog."""
    keyd = FakeKeyd()
    batcher = KeydBatcher(keyd, window=0.001, max_batch=8, max_in_flight=1)
    keyd.hold = trio.Event()
    payload = _payload(1)

    def issue(client, n):
        return lambda: batcher.issue(KID, PROTECTED, [SignPart(client, "acc", (payload,) * n)])

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for _ in range(40):
            nursery.start_soon(issue("busy", 4))  # 160 payloads: 20 micro-batches
        await _until(lambda: len(keyd.calls) >= 2)
        await trio.sleep(0.01)
        assert len(keyd.calls) == 2 and batcher.pending == 160 - 16  # the rest waits here
        nursery.start_soon(issue("quiet", 1))
        await trio.sleep(0.01)
        keyd.hold.set()
        await _until(lambda: not (batcher.in_flight or batcher.pending))
        nursery.cancel_scope.cancel()
    clients = [[p.client for p in call] for call in keyd.calls]
    # In the first flush after it came: that flush forms two micro-batches at once (two
    # slots free together), and trio may start their sends in either order.
    assert any("quiet" in c for c in clients[2:4]), clients[:5]
    assert sum(len(p.payloads) for call in keyd.calls for p in call) == 161


def test_mixed_waiters_get_strings_or_columns_of_their_own_items():
    """One micro-batch with a request that wants HC1 strings (issue) and one that wants
    keyd's columns (issue_columns): each gets its own items' answers (a mixed batch once
    handed every signature of the batch to the string encoder, and a bug in a micro-batch
    ended the engine)."""

    class Keyd:
        connections = 1

        async def sign_columns(self, kid, columns):
            payloads = columns.payload_list()
            codes = bytes(ItemError.MALFORMED_CWT if p.startswith(b"x") else 0 for p in payloads)
            sigs = [
                hashlib.sha256(p).digest() * 2
                for p, c in zip(payloads, codes, strict=True)
                if not c
            ]
            ends = array("I", range(64, 64 * len(sigs) + 1, 64))
            reasons = tuple("refused" for c in codes if c)
            return ColumnsResult(0, codes, b"".join(sigs), ends, reasons)

    _key, cert = ephemeral_certificate()
    dsc = DSC.from_certificate(cert)
    protected = native.protected_header(dsc.alg, dsc.kid)
    payloads = [cbor2.dumps({1: "NL", -260: {1: d}}) for d in varied_samples(4)]
    mine = KeydColumns.from_parts([SignPart("a", "uzi:1", (b"x1", payloads[0], payloads[1]))])
    theirs = KeydColumns.from_parts([SignPart("b", "uzi:2", (payloads[2], b"x2", payloads[3]))])

    async def main():
        batcher = KeydBatcher(Keyd(), window=0.01)
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            out = {}

            async def strings():
                out["strings"] = await batcher.issue(dsc.kid, protected, mine)

            async def columns():
                out["columns"] = await batcher.issue_columns(dsc.kid, protected, theirs)

            nursery.start_soon(strings)
            nursery.start_soon(columns)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        return out

    out = trio.run(main)
    strings, cols = out["strings"], out["columns"]
    assert strings[0][0] == ItemError.MALFORMED_CWT
    for text, payload in zip(strings[1:], payloads[:2], strict=True):
        parts = native.sign1_decode(native.zlib_decompress(native.b45decode(text[4:])))
        assert parts.payload == payload
        assert parts.signature == hashlib.sha256(payload).digest() * 2
    assert cols.codes == bytes([0, ItemError.MALFORMED_CWT, 0]) and cols.reasons == ("refused",)
    assert cols.signature_list() == [hashlib.sha256(p).digest() * 2 for p in payloads[2:]]


# ------------------------------------------------------------------ the fair micro-batch


def _fair_model(waiting, max_batch):
    """What _fair_batch promises, written plainly: clients in order of their oldest part,
    one part of each in turn; a client whose next part does not fit drops out of this
    batch; the first part is always taken; stop at max_batch payloads."""
    queues = {}
    for w in waiting:
        queues.setdefault(w.client, []).append(w)
    batch, count = [], 0
    while queues and count < max_batch:
        for client in list(queues):
            w = queues[client][0]
            if batch and count + w.count > max_batch:
                del queues[client]
                continue
            batch.append(w)
            count += w.count
            queues[client].pop(0)
            if not queues[client]:
                del queues[client]
            if count >= max_batch:
                break
    return batch, [w for w in waiting if w not in batch]


@given(
    parts=st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 12)), min_size=1, max_size=30),
    max_batch=st.integers(1, 120),
    one_client=st.booleans(),
)
@example(parts=[("a", 2), ("a", 3), ("a", 1)], max_batch=5, one_client=True)  # fills exactly
@example(parts=[("a", 9), ("a", 1)], max_batch=5, one_client=True)  # the first alone, oversized
@example(parts=[("a", 2), ("b", 4), ("a", 2), ("c", 1)], max_batch=5, one_client=False)
def test_fair_batch_takes_what_the_round_robin_rule_says(parts, max_batch, one_client):
    """Both ways through _fair_batch (one client: a prefix found without a loop; several:
    round-robin) against the plain statement of the rule."""

    class Part:
        def __init__(self, client, count):
            self.client, self.count = client, count

    waiting = [Part("a" if one_client else c, n) for c, n in parts]
    want_batch, want_left = _fair_model(list(waiting), max_batch)
    left = list(waiting)
    assert _fair_batch(left, max_batch) == want_batch
    assert left == want_left
