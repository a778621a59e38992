"""Is the engine behind? The overload test behind BUSY's ``queue_target`` (no I/O, no clock).

A request's time in the engine is its service time (checks, keyd, encoding: ~10-20 ms for a
frame of 50 even on an idle engine) plus the time it queued. Only the queue says the engine is
overloaded, and only a queue that persists: Poisson arrivals at half the sustainable rate
make short bursts that drain by themselves. The test used here is CoDel's (RFC 8289): over
the last *interval*, even the *fastest* request took longer than *target*, so every request
waited, and the queue is standing rather than a burst. Refusing new work then (BUSY with a
retry-after hint) keeps the latency of what is accepted bounded; refusing earlier turns bursts
into retries, which is what the previous test (the oldest request in progress older than
*target*) did at half load.

When nothing finished during the last interval, the fastest time is unknown: a stall (a slow
disk under keyd's audit fsync, for one) is then recognised by the oldest request in progress,
once it is older than *stall*.
"""

from __future__ import annotations

import collections
import math

__all__ = ["StandingQueue"]


class StandingQueue:
    """The minimum request time over a sliding window, and the verdict drawn from it.

    Args:
        target: seconds; a window whose fastest request took longer means a standing queue.
        interval: seconds of the window (CoDel's default is 100 ms).
        stall: seconds the oldest request in progress may take while nothing finishes
            (default ten times *target*).

    Raises:
        ValueError: a target, interval or stall that is not a positive finite number.
    """

    def __init__(self, target: float, interval: float = 0.1, stall: float | None = None) -> None:
        stall = 10 * target if stall is None else stall
        for name, value in (("target", target), ("interval", interval), ("stall", stall)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        self.target = target
        self.interval = interval
        self.stall = stall
        # (finished at, took), both rising from left to right: the front is the minimum of
        # the window (a monotonic queue: each sample is pushed and popped once).
        self._window: collections.deque[tuple[float, float]] = collections.deque()

    def finished(self, now: float, took: float) -> None:
        """A request finished at *now* after *took* seconds."""
        window = self._window
        while window and window[-1][1] >= took:
            window.pop()  # a faster, newer request: the older, slower one is never the minimum
        window.append((now, took))

    def fastest(self, now: float) -> float | None:
        """The shortest time of the requests that finished in the last interval, or None."""
        window = self._window
        horizon = now - self.interval
        while window and window[0][0] < horizon:
            window.popleft()
        return window[0][1] if window else None

    def behind(self, now: float, oldest_start: float | None) -> str | None:
        """Why new requests should wait (a standing queue or a stall), or None.

        *oldest_start* is when the oldest request still in progress started (None: none is).
        """
        fastest = self.fastest(now)
        if fastest is not None:
            if fastest > self.target:
                return (
                    f"the engine is behind (every request of the last "
                    f"{self.interval * 1000:.0f} ms took {fastest * 1000:.0f} ms or more)"
                )
            return None
        if oldest_start is not None and now - oldest_start > self.stall:
            return (
                f"the engine is behind (none finished in the last {self.interval * 1000:.0f} "
                f"ms; the oldest in progress for {(now - oldest_start) * 1000:.0f} ms)"
            )
        return None
