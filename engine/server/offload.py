"""Native batch calls off the event loop, with the cheapest hand-off trio offers.

The engine's per-frame native calls (the reply body, HC1 strings) release the GIL and take
hundreds of microseconds for a frame of 50 certificates: run on the event loop they would
hold every other connection for that long. ``trio.to_thread.run_sync`` moves them to a
worker thread but costs ~100 us of CPU per call on this machine class (capacity limiter,
context copy, cancellation bookkeeping) -- about 2 us per certificate of a 50-item frame.
:func:`run_native` does the same hand-off with trio's low-level primitives for about half
of that (``bench/README.md``, "Session 3").

What it gives up, on purpose: the call cannot be cancelled or abandoned (neither can
``to_thread.run_sync`` by default), and it carries no ``contextvars`` context into the
thread (the functions it is meant for are native and read none). Threads are bounded: with
``MAX_THREADS`` calls in flight, the next one runs inline on the event loop, so a flood of
frames cannot grow the thread count without limit.

The reply body of a plain frame goes further (:func:`encode_reply`): a Python worker thread
still takes the GIL to start the call and to deliver it, and on two cores that hand-over
cost the event loop more than the encoding it moved. ``native.ReplyPool`` encodes in C
threads that never take the GIL and signals an eventfd; one system task per trio run hands
each finished body back to its waiting task, or to its callback (:func:`encode_reply_soon`:
a frame signed without a task of its own). Its queue is first come, first served; it holds
only what keyd has signed, and encoding runs ~10x faster than keyd signs, so it stays short.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from .. import native

__all__ = ["MAX_THREADS", "REPLY_THREADS", "encode_reply", "encode_reply_soon", "run_native"]

LOGGER = logging.getLogger("dccsign.serve")

T = TypeVar("T")

#: Calls in worker threads at once, per process; more run inline (see the module docstring).
MAX_THREADS = 8

_in_flight = 0  # calls in worker threads now (touched from the trio thread only)


async def run_native(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread (inline once MAX_THREADS are busy); its result, or
    its exception raised here. Not cancellable: a cancelled caller still waits for it."""
    global _in_flight
    if _in_flight >= MAX_THREADS:
        return fn(*args)
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: Any) -> None:  # in the worker thread: the call's outcome.Outcome
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    _in_flight += 1
    try:
        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)
        return await trio.lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED
        )
    finally:
        _in_flight -= 1


#: Threads of the native reply pool (:func:`encode_reply`): one per CPU this process may run
#: on, at most 8 -- the encoding is CPU work, more threads than cores only queue.
REPLY_THREADS = max(1, min(8, len(os.sched_getaffinity(0))))

_REPLY_SERVICE: trio.lowlevel.RunVar[_ReplyService | None] = trio.lowlevel.RunVar(
    "dccsign_reply_service", default=None
)


class _ReplyService:
    """One :class:`native.ReplyPool` per trio run, and the system task that hands each
    finished job back to the task waiting for it."""

    def __init__(self) -> None:
        self.pool = native.ReplyPool(REPLY_THREADS)
        self.waiting: dict[Any, trio.lowlevel.Task] = {}
        self.callbacks: dict[Any, Callable[[Any], None]] = {}

    async def collect(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.pool)
                for job in self.pool.collect():
                    task = self.waiting.pop(job, None)
                    if task is not None:
                        trio.lowlevel.reschedule(task, outcome.Value(job))
                        continue
                    try:
                        self.callbacks.pop(job)(job)
                    except Exception:
                        # A callback answers its own failures; one that escapes is a bug,
                        # and must not end the collector (every later reply would hang).
                        LOGGER.exception("handing an encoded reply body over failed")
        finally:
            # The run is ending: every waiter has been answered (they cannot be cancelled,
            # so no task of the run is left waiting), the threads have nothing left to do.
            self.pool.close()

    async def encode(self, args: tuple[Any, ...], single: bool) -> bytes:
        job = self.pool.submit_encode(*args, single=single)  # argument errors raise here
        self.waiting[job] = trio.lowlevel.current_task()
        done = await trio.lowlevel.wait_task_rescheduled(
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED
        )
        return done.result()  # type: ignore[no-any-return]


def encode_reply_soon(
    args: tuple[Any, ...], single: bool, then: Callable[[bytes | Exception], None]
) -> None:
    """:func:`encode_reply` without a task waiting: ``then(body)`` runs on the event loop's
    thread once the body is encoded, or ``then(exception)`` if encoding failed (an
    argument error raises here instead). Must be called from within a trio run; *then* must
    not raise (what escapes is logged)."""
    service = _service()
    job = service.pool.submit_encode(*args, single=single)

    def done(job: Any) -> None:
        try:
            body = job.result()
        except Exception as exc:
            then(exc)
            return
        then(body)

    service.callbacks[job] = done


def _service() -> _ReplyService:
    service = _REPLY_SERVICE.get()
    if service is None:
        service = _ReplyService()
        _REPLY_SERVICE.set(service)
        trio.lowlevel.spawn_system_task(service.collect, name="dccsign reply pool")
    return service


async def encode_reply(*args: Any, single: bool = False) -> bytes:
    """``native.encode_sign_batch_result(*args, single=single)`` in the native reply pool:
    its threads never take the GIL (``src/jobpool.c``), so unlike :func:`run_native` the
    hand-off costs the event loop no GIL hand-over -- one submit, and one wake-up for
    however many jobs finish together. Its inputs must not change until it returns. Not
    cancellable: a cancelled caller still waits for the body (a fraction of a millisecond
    for a frame of 50 certificates).

    Raises what ``encode_sign_batch_result`` raises for these arguments.
    """
    return await _service().encode(args, single)
