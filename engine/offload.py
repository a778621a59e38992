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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

__all__ = ["MAX_THREADS", "run_native"]

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
