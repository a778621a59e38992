"""dccsign.server.offload: run_native (a worker thread per call, bounded; results and exceptions
handed back; no cancellation halfway through) and the native reply pool, to a waiting task
(encode_reply) or to a callback (encode_reply_soon)."""

import logging
import random
import threading

import pytest
import trio
import trio.testing
from test_reply import KIDS, _frame, _protected

from dccsign import native
from dccsign.server import offload


async def test_runs_in_a_worker_thread_and_returns_its_result():
    main = threading.get_ident()
    where = await offload.run_native(threading.get_ident)
    assert where != main
    assert await offload.run_native(divmod, 17, 5) == (3, 2)
    assert offload._in_flight == 0


async def test_exceptions_are_raised_in_the_caller():
    with pytest.raises(ZeroDivisionError):
        await offload.run_native(divmod, 1, 0)
    assert offload._in_flight == 0


async def test_past_max_threads_the_call_runs_inline(monkeypatch):
    monkeypatch.setattr(offload, "MAX_THREADS", 0)
    assert await offload.run_native(threading.get_ident) == threading.get_ident()


async def test_many_at_once_use_at_most_max_threads(monkeypatch):
    monkeypatch.setattr(offload, "MAX_THREADS", 3)
    gate = threading.Event()
    seen: set[int] = set()
    peak = []

    def work():
        seen.add(threading.get_ident())
        gate.wait(5)
        return 1

    results = []

    async def one():
        results.append(await offload.run_native(work))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        peak.append(offload._in_flight)
        gate.set()
    assert peak == [3] and results == [1, 1, 1] and offload._in_flight == 0


async def test_a_cancelled_caller_still_waits_for_the_call():
    gate = threading.Event()
    finished = []

    def work():
        gate.wait(5)
        finished.append(True)
        return "done"

    with trio.move_on_after(0.01) as scope:
        threading.Timer(0.1, gate.set).start()
        await offload.run_native(work)
        await trio.lowlevel.checkpoint()  # the deferred cancellation lands here
    assert scope.cancelled_caught and finished == [True] and offload._in_flight == 0


async def test_encode_reply_matches_the_direct_call_from_many_tasks():
    """offload.encode_reply: the native pool's bodies, each back to its own task."""
    rng = random.Random(8)
    protected = _protected(native)
    frames = [_frame(rng, rng.randrange(1, 80)) for _ in range(40)]
    want = [native.encode_sign_batch_result(protected, KIDS, *cols) for cols in frames]
    got: dict[int, bytes] = {}

    async def one(i):
        await trio.sleep(rng.random() / 100)
        got[i] = await offload.encode_reply(protected, KIDS, *frames[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(frames)):
            nursery.start_soon(one, i)
    assert [got[i] for i in range(len(frames))] == want
    with pytest.raises(ValueError):  # argument errors reach the caller
        await offload.encode_reply(protected, KIDS[:1], *frames[0])


async def test_encode_reply_is_not_cancelled_half_way():
    protected = _protected(native)
    cols = _frame(random.Random(9), 60)
    with trio.CancelScope() as scope:
        scope.cancel()
        body = await offload.encode_reply(protected, KIDS, *cols)  # cancelled: still done
    assert body == native.encode_sign_batch_result(protected, KIDS, *cols)


def test_encode_reply_in_successive_runs():
    """A pool per trio run: each run's pool is closed with it and the next makes its own."""
    protected = _protected(native)
    cols = _frame(random.Random(10), 20)
    want = native.encode_sign_batch_result(protected, KIDS, *cols)
    for _ in range(3):
        assert trio.run(offload.encode_reply, protected, KIDS, *cols) == want


async def test_encode_reply_soon_hands_each_body_to_its_callback():
    """offload.encode_reply_soon: the same bodies, each to its own callback, from the
    pool's collector (never inside the call); argument errors raise in the call."""
    rng = random.Random(11)
    protected = _protected(native)
    frames = [_frame(rng, rng.randrange(1, 80)) for _ in range(20)]
    want = [native.encode_sign_batch_result(protected, KIDS, *cols) for cols in frames]
    got: dict[int, bytes] = {}
    done = trio.Event()

    def then(i):
        def deliver(body):
            got[i] = body
            if len(got) == len(frames):
                done.set()

        return deliver

    for i, cols in enumerate(frames):
        offload.encode_reply_soon((protected, KIDS, *cols), False, then(i))
    assert got == {}
    with trio.fail_after(10):
        await done.wait()
    assert [got[i] for i in range(len(frames))] == want
    with pytest.raises(ValueError):
        offload.encode_reply_soon((protected, KIDS[:1], *frames[0]), False, then(0))


async def test_a_raising_reply_callback_is_logged_and_the_collector_goes_on(caplog):
    protected = _protected(native)
    cols = _frame(random.Random(12), 10)

    def broken(body):
        raise RuntimeError("a bug in the callback")

    with caplog.at_level(logging.ERROR, logger="dccsign.serve"):
        offload.encode_reply_soon((protected, KIDS, *cols), False, broken)
        with trio.fail_after(10):
            body = await offload.encode_reply(protected, KIDS, *cols)
            while "handing an encoded reply body over failed" not in caplog.text:  # noqa: ASYNC110
                await trio.sleep(0.01)  # the two jobs may finish in either order
    assert body == native.encode_sign_batch_result(protected, KIDS, *cols)
    assert "handing an encoded reply body over failed" in caplog.text
