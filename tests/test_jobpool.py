"""ReplyPool (native: src/jobpool.c, threads that never take the GIL; reference:
_jobpool_py.py): the same bodies and errors as ``encode_sign_batch_result``, a readable
file descriptor while finished jobs wait, and a clean close."""

from __future__ import annotations

import copy
import os
import random
import select
import threading

import pytest
from test_reply import KIDS, _frame, _protected

from dccsign.protocol import wire


def _collect_all(pool, n, timeout=10.0):
    done = []
    while len(done) < n:
        ready, _, _ = select.select([pool], [], [], timeout)
        assert ready, f"only {len(done)} of {n} jobs came back"
        done += pool.collect()
    return done


def test_bodies_equal_the_direct_call(impl):
    rng = random.Random(3)
    protected = _protected(impl)
    frames = [_frame(rng, rng.randrange(1, 60)) for _ in range(60)]
    want = [impl.encode_sign_batch_result(protected, KIDS, *cols) for cols in frames]
    singles = [_frame(rng, 1, refused_share=0.5) for _ in range(10)]
    want_single = [
        impl.encode_sign_batch_result(protected, KIDS, *cols, single=True) for cols in singles
    ]
    pool = impl.ReplyPool(3)
    try:
        jobs = [pool.submit_encode(protected, KIDS, *cols) for cols in frames]
        jobs += [pool.submit_encode(protected, KIDS, *c, single=True) for c in singles]
        assert pool.pending == len(jobs)
        done = _collect_all(pool, len(jobs))
        assert pool.pending == 0
        assert {id(j) for j in done} == {id(j) for j in jobs}
        assert [j.result() for j in jobs] == want + want_single
    finally:
        pool.close()


def test_the_fd_is_readable_only_while_finished_jobs_wait(impl):
    protected = _protected(impl)
    pool = impl.ReplyPool(1)
    try:
        assert select.select([pool], [], [], 0)[0] == []
        assert pool.collect() == []
        cols = _frame(random.Random(1), 5)
        job = pool.submit_encode(protected, KIDS, *cols)
        assert _collect_all(pool, 1) == [job]
        assert select.select([pool], [], [], 0.05)[0] == []  # collected: quiet again
        assert pool.collect() == []
    finally:
        pool.close()


def test_errors_at_submit_and_at_result_as_the_direct_call(impl):
    protected = _protected(impl)
    cols = list(_frame(random.Random(1), 3, refused_share=0.0))
    pool = impl.ReplyPool(2)
    try:
        with pytest.raises(ValueError) as want:
            impl.encode_sign_batch_result(protected, KIDS[:1], *cols)
        with pytest.raises(ValueError) as got:
            pool.submit_encode(protected, KIDS[:1], *cols)
        assert str(got.value) == str(want.value)
        with pytest.raises(ValueError):
            pool.submit_encode(protected, KIDS, *cols, level=12)
        assert pool.pending == 0  # refused calls leave nothing behind
        # An HC1 over 8192 characters: the body is refused when its job is looked at.
        big = os.urandom(6000)
        prot_of, _payloads, _off, sigs, _sig_off, _refusals = cols
        long_cols = (prot_of[:1], big, type(prot_of)("I", [0, len(big)]), sigs[:64],
                     type(prot_of)("I", [0, 64]), {})  # fmt: skip
        with pytest.raises(wire.BodyError) as want:
            impl.encode_sign_batch_result(protected, KIDS, *long_cols)
        job = pool.submit_encode(protected, KIDS, *long_cols)
        (done,) = _collect_all(pool, 1)
        with pytest.raises(wire.BodyError) as got:
            done.result()
        assert str(got.value) == str(want.value)
        assert job is done
    finally:
        pool.close()


def test_a_result_is_not_there_before_the_job_ran():
    # The reference, whose one thread can be held; a native thread takes the job at once.
    from dccsign.native import implementation

    impl = implementation("python")
    gate = threading.Event()
    pool = impl.ReplyPool(1)
    pool._jobs.put(_Blocker(gate))  # the only thread waits on the gate
    try:
        job = pool.submit_encode(_protected(impl), KIDS, *_frame(random.Random(2), 2))
        with pytest.raises(RuntimeError):
            job.result()
    finally:
        gate.set()
        pool.close()


class _Blocker:
    def __init__(self, gate):
        self.gate = gate

    def _run(self):
        self.gate.wait(10)


@pytest.mark.parametrize("threads", [0, 65, 2.0, "2", None])
def test_thread_counts(impl, threads):
    with pytest.raises(ValueError):
        impl.ReplyPool(threads)


def test_close_finishes_the_work_drops_the_rest_and_is_final(impl):
    protected = _protected(impl)
    rng = random.Random(4)
    pool = impl.ReplyPool(2)
    for _ in range(20):
        pool.submit_encode(protected, KIDS, *_frame(rng, 40))
    pool.close()  # waits for the 20, then drops them uncollected
    assert pool.pending == 0
    pool.close()  # idempotent
    for call in (pool.fileno, pool.collect):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        pool.submit_encode(protected, KIDS, *_frame(rng, 2))


def test_native_inputs_stay_alive_while_the_job_runs(impl):
    """The caller may drop its references at once: the job holds what its threads read."""
    protected = _protected(impl)
    rng = random.Random(6)
    frames = [_frame(rng, 50) for _ in range(30)]
    want = [impl.encode_sign_batch_result(protected, KIDS, *cols) for cols in frames]
    pool = impl.ReplyPool(2)
    try:
        jobs = []
        for cols in frames:
            # Fresh objects whose only references are the job's once this loop moves on.
            fresh = [bytes(bytearray(c)) if isinstance(c, bytes) else copy.copy(c) for c in cols]
            heads = [bytes(bytearray(p)) for p in protected]
            kids = [bytes(bytearray(k)) for k in KIDS]
            jobs.append(pool.submit_encode(heads, kids, *fresh))
            del fresh
        _collect_all(pool, len(jobs))
        assert [j.result() for j in jobs] == want
    finally:
        pool.close()
