"""keyd answers handed over without a waiting task: ``TrioKeydClient.submit_kids`` (over a
real Unix socket to a scripted keyd) and the batcher's path through it -- the same outcomes
as ``sign_kids``, failures reaching every waiter, nothing left waiting when the batcher stops,
and a fault in handling one answer leaving the connection and the batcher serving."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
import trio.testing
from test_keyd_columns import KidsKeyd, hc1_as_strings, issue_for_three_kids

from dccsign.keyd.client import KeydError
from dccsign.keyd.trio_client import TrioKeydClient
from dccsign.protocol.keyd import (
    NEED_DATA,
    ColumnsResult,
    Connection,
    Failure,
    ItemError,
    KeydColumns,
    KidsResult,
    SignKids,
    SignPart,
)
from dccsign.server.batcher import KeydBatcher

V, T, R = b"v" * 8, b"t" * 8, b"r" * 8


def _cols(account: str, *payloads: bytes) -> KeydColumns:
    return KeydColumns.from_parts([SignPart("p", account, payloads)])


class SubmitKeyd(KidsKeyd):
    """KidsKeyd that also takes ``submit_kids``: it answers from a task of its own, as the
    real client's reader does (or holds the answer while ``hold`` is set, or fails)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__()
        self.nursery = nursery
        self.submitted: list[list[tuple[bytes, int]]] = []
        self.hold: trio.Event | None = None
        self.answer_with: object = None  # a KeydError, or a list of results, instead
        self.refuse: KeydError | None = None  # raised by submit_kids itself
        self.late: list = []  # (deliver, results) of held answers

    async def sign_kids(self, batches):  # the task path must not be taken
        raise AssertionError("sign_kids called although submit_kids is there")

    async def submit_kids(self, batches, deliver):
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append([(kid, len(cols)) for kid, cols in batches])
        results = [await self.sign_columns(kid, cols) for kid, cols in batches]
        answer = self.answer_with if self.answer_with is not None else results

        async def reader() -> None:
            await trio.lowlevel.checkpoint()
            if self.hold is not None:
                self.late.append((deliver, answer))
                return
            deliver(answer)

        self.nursery.start_soon(reader)


async def test_submitted_micro_batches_get_what_sign_kids_gives(nursery, monkeypatch):
    """The scenario of test_keyd_columns' SIGN_KIDS test through submit_kids: one message
    for three kids, strings for the waiters that want them, columns for the others."""
    hc1_as_strings(monkeypatch)
    keyd = SubmitKeyd(nursery)
    batcher = KeydBatcher(keyd, window=0.05)
    out = await issue_for_three_kids(batcher)
    (kids,) = keyd.submitted
    assert sorted(kids) == [(R, 1), (T, 1), (V, 3)]
    assert out["v1"] == ["Pv:a:v1", (ItemError.MALFORMED_CWT, "bad a")]
    assert out["r1"] == ["Pr:d:r1"]
    assert out["t1"].signature_list() == [b"b".ljust(64, b".")]
    assert out["v2"].codes == b"\x00" and out["v2"].signature_list() == [b"c".ljust(64, b".")]
    assert batcher.batches_sent == 1 and batcher.in_flight == 0


async def _run_one_frame(batcher, kids=(V, T)):
    """One frame's kids through issue_columns_many, as the dispatcher sends them."""
    return await batcher.issue_columns_many(
        [(kid, b"P", _cols(f"acc-{kid[:1].decode()}", b"x" + kid[:1])) for kid in kids]
    )


async def test_a_failed_answer_or_no_connection_reaches_every_waiter(nursery):
    keyd = SubmitKeyd(nursery)
    batcher = KeydBatcher(keyd, window=0.05)
    async with trio.open_nursery() as inner:
        await inner.start(batcher.run)
        keyd.answer_with = KeydError("keyd connection failed: gone")
        failed = await _run_one_frame(batcher)
        keyd.answer_with, keyd.refuse = None, KeydError("no connection to keyd")
        refused = await _run_one_frame(batcher)
        keyd.refuse = None
        ok = await _run_one_frame(batcher)  # and the batcher goes on
        inner.cancel_scope.cancel()
    assert [str(e) for e in failed] == ["keyd connection failed: gone"] * 2
    assert [str(e) for e in refused] == ["no connection to keyd"] * 2
    assert all(isinstance(r, ColumnsResult) and r.codes == b"\x00" for r in ok)
    assert batcher.in_flight == 0


async def test_an_answer_that_cannot_be_handled_fails_its_waiters_not_the_batcher(nursery, caplog):
    """keyd's answer does not fit the micro-batch (one result for two kids): its waiters
    get a non-retryable error, it is logged, and the next micro-batch is served."""
    keyd = SubmitKeyd(nursery)
    batcher = KeydBatcher(keyd, window=0.05)
    with caplog.at_level(logging.ERROR, logger="dccsign.serve"):
        async with trio.open_nursery() as inner:
            await inner.start(batcher.run)
            keyd.answer_with = [ColumnsResult(0, b"")]
            broken = await _run_one_frame(batcher)
            keyd.answer_with = None
            ok = await _run_one_frame(batcher)
            inner.cancel_scope.cancel()
    assert all(isinstance(e, KeydError) and not e.retryable for e in broken)
    assert "engine failed" in str(broken[0])
    assert "micro-batch" in caplog.text
    assert all(isinstance(r, ColumnsResult) for r in ok) and batcher.in_flight == 0


async def test_a_stopped_batcher_releases_the_waiters_of_unanswered_micro_batches(nursery):
    """keyd never answers before the batcher stops: its waiters get a non-retryable error
    at once, and the answer that arrives afterwards changes nothing."""
    keyd = SubmitKeyd(nursery)
    keyd.hold = trio.Event()
    batcher = KeydBatcher(keyd, window=0.05)
    got = []

    async def frame():
        got.append(await _run_one_frame(batcher))

    async with trio.open_nursery() as outer:
        outer.start_soon(frame)
        async with trio.open_nursery() as inner:
            await inner.start(batcher.run)
            await trio.testing.wait_all_tasks_blocked()
            assert keyd.submitted and batcher.in_flight == 1
            inner.cancel_scope.cancel()
    ((first, second),) = got
    assert isinstance(first, KeydError) and not first.retryable
    assert str(first) == "engine stopping" and second is first
    for deliver, answer in keyd.late:
        deliver(answer)  # too late: ignored
    assert batcher.in_flight == 0


# ----------------------------------------------------------------------------- the client


class ScriptedKeyd:
    """A keyd on a Unix socket that answers each SIGN_KIDS as ``script`` says, in turn:
    "sign" (every item signed), "error" (an ERROR frame), "short" (one result too few),
    "close" (it closes the connection)."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)

    async def serve(self, stream: trio.SocketStream) -> None:
        codec = Connection()
        async with stream:
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    data = await stream.receive_some(1 << 16)
                    if not data:
                        return
                    codec.receive_data(data)
                    continue
                assert isinstance(event, SignKids)
                step = self.script.pop(0)
                if step == "close":
                    return
                if step == "error":
                    reply = Failure(event.request_id, "keyd is stopping", True)
                else:
                    results = tuple(
                        ColumnsResult.from_results(0, [b"s" * 64] * len(b.columns))
                        for b in event.batches
                    )
                    if step == "short":
                        results = results[:-1]
                    reply = KidsResult(event.request_id, results)
                await stream.send_all(codec.send(reply))


@pytest.fixture
async def keyd_at(tmp_path, nursery):
    """start(script): a ScriptedKeyd on a Unix socket, and a TrioKeydClient connected to it
    with one connection."""

    made: list[tuple[TrioKeydClient, trio.SocketListener]] = []

    async def start(script: list[str]) -> TrioKeydClient:
        path = tmp_path / "keyd.sock"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen()
        listener = trio.SocketListener(sock)
        nursery.start_soon(trio.serve_listeners, ScriptedKeyd(script).serve, [listener])
        client = TrioKeydClient(path, connections=1)
        await client.connect(nursery)
        made.append((client, listener))
        return client

    yield start
    for client, listener in made:
        await client.aclose()
        await listener.aclose()


async def _submitted(client: TrioKeydClient, batches) -> object:
    box: list[object] = []
    done = trio.Event()

    def deliver(answer: object) -> None:
        box.append(answer)
        done.set()

    await client.submit_kids(batches, deliver)
    with trio.fail_after(5):
        await done.wait()
    return box[0]


async def test_the_client_hands_each_answer_to_its_callback(keyd_at):
    client = await keyd_at(["sign", "error", "short", "sign", "close"])
    two = [(V, _cols("a", b"p1", b"p2")), (T, _cols("b", b"p3"))]
    signed = await _submitted(client, two)
    assert [r.signature_list() for r in signed] == [[b"s" * 64] * 2, [b"s" * 64]]
    error = await _submitted(client, two)
    assert isinstance(error, KeydError) and error.retryable and "stopping" in str(error)
    short = await _submitted(client, two)
    assert isinstance(short, KeydError) and "malformed" in str(short)
    assert len(await _submitted(client, two)) == 2
    closed = await _submitted(client, two)
    assert isinstance(closed, KeydError) and closed.retryable
    with pytest.raises(KeydError, match="no connection"):
        await client.submit_kids(two, lambda answer: None)


async def test_a_callback_that_raises_is_logged_and_the_connection_goes_on(keyd_at, caplog):
    client = await keyd_at(["sign", "sign"])
    batches = [(V, _cols("a", b"p1"))]

    def broken(answer: object) -> None:
        raise RuntimeError("a bug in the callback")

    with caplog.at_level(logging.ERROR, logger="dccsign.serve"):
        await client.submit_kids(batches, broken)
        after = await _submitted(client, batches)  # answered in order, after the first
    assert "handling a keyd reply failed" in caplog.text
    assert [r.codes for r in after] == [b"\x00"] and client.connections == 1


# ----------------------------------------------------------------- submit_columns (no task)


def _frame_batches(kids=(V, T), account="acc"):
    return [(kid, b"P", _cols(f"{account}-{kid[:1].decode()}", b"x" + kid[:1])) for kid in kids]


async def test_submit_columns_delivers_once_with_what_issue_columns_many_gives(nursery):
    """One frame's kids without a waiting task: the callback runs once, later (never
    inside the call), with the same outcomes the awaiting method gives; a frame that
    queues nothing is answered at once."""
    keyd = SubmitKeyd(nursery)
    batcher = KeydBatcher(keyd, window=0.05)
    delivered = []
    async with trio.open_nursery() as inner:
        await inner.start(batcher.run)
        batcher.submit_columns(_frame_batches(), delivered.append)
        assert delivered == []  # queued, not answered inside the call
        awaited = await _run_one_frame(batcher)
        await trio.testing.wait_all_tasks_blocked()
        batcher.submit_columns([(R, b"P", _cols("x"))], delivered.append)  # nothing to sign
        inner.cancel_scope.cancel()
    first, empty = delivered
    assert [(r.codes, r.signature_list()) for r in first] == [
        (r.codes, r.signature_list()) for r in awaited
    ]
    assert len(empty) == 1 and empty[0].codes == b""
    assert batcher.in_flight == 0 and batcher.pending == 0


async def test_submit_columns_waits_for_every_micro_batch_its_kids_went_in(nursery):
    """max_batch 1: the frame's two kids go in two micro-batches; the callback runs once,
    after the second answer, with both."""
    keyd = SubmitKeyd(nursery)
    keyd.hold = trio.Event()
    batcher = KeydBatcher(keyd, window=0.05, max_batch=1, max_in_flight=4)
    delivered = []
    async with trio.open_nursery() as inner:
        await inner.start(batcher.run)
        batcher.submit_columns(_frame_batches(), delivered.append)
        await trio.testing.wait_all_tasks_blocked()
        assert len(keyd.submitted) == 2 and batcher.in_flight == 2
        (deliver, answer), second = keyd.late
        deliver(answer)
        assert delivered == []  # one kid answered: not yet
        second[0](second[1])
        inner.cancel_scope.cancel()
    ((v, t),) = delivered
    assert v.codes == t.codes == b"\x00" and batcher.in_flight == 0


async def test_submit_columns_failures_reach_the_callback(nursery):
    keyd = SubmitKeyd(nursery)
    batcher = KeydBatcher(keyd, window=0.05)
    delivered = []
    async with trio.open_nursery() as inner:
        await inner.start(batcher.run)
        keyd.answer_with = KeydError("keyd connection failed: gone")
        batcher.submit_columns(_frame_batches(), delivered.append)
        await trio.testing.wait_all_tasks_blocked()
        keyd.answer_with, keyd.refuse = None, KeydError("no connection to keyd")
        batcher.submit_columns(_frame_batches(), delivered.append)
        await trio.testing.wait_all_tasks_blocked()
        inner.cancel_scope.cancel()
    assert [[str(e) for e in out] for out in delivered] == [
        ["keyd connection failed: gone"] * 2,
        ["no connection to keyd"] * 2,
    ]


async def test_a_stopping_batcher_answers_parts_it_never_sent(nursery):
    """Parts still pending (keyd's queue is full) when the batcher stops: their callbacks
    get "engine stopping" -- a frame without a task must not wait for ever."""
    keyd = SubmitKeyd(nursery)
    keyd.hold = trio.Event()
    batcher = KeydBatcher(keyd, window=0, max_in_flight=1)  # keyd holds 2 at most
    delivered = []
    async with trio.open_nursery() as inner:
        await inner.start(batcher.run)
        for account in "abc":
            batcher.submit_columns(_frame_batches((V,), account), delivered.append)
            await trio.testing.wait_all_tasks_blocked()
        assert batcher.in_flight == 2 and batcher.pending == 1
        inner.cancel_scope.cancel()
    assert len(delivered) == 3
    assert all(str(e) == "engine stopping" and not e.retryable for (e,) in delivered)
    assert batcher.pending == 0 and batcher.in_flight == 0


async def test_a_callback_that_raises_is_logged_and_the_batcher_goes_on(nursery, caplog):
    keyd = SubmitKeyd(nursery)
    batcher = KeydBatcher(keyd, window=0.05)

    def broken(outcomes):
        raise RuntimeError("a bug in the frame's callback")

    with caplog.at_level(logging.ERROR, logger="dccsign.serve"):
        async with trio.open_nursery() as inner:
            await inner.start(batcher.run)
            batcher.submit_columns(_frame_batches(), broken)
            await trio.testing.wait_all_tasks_blocked()
            ok = await _run_one_frame(batcher)
            inner.cancel_scope.cancel()
    assert "handing keyd's answer to a frame failed" in caplog.text
    assert all(isinstance(r, ColumnsResult) for r in ok) and batcher.in_flight == 0
