"""engine/admission.py: CoDel's standing-queue test behind BUSY's queue_target."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccsign.admission import StandingQueue


def test_a_burst_with_fast_requests_in_it_is_not_a_standing_queue():
    q = StandingQueue(target=0.020, interval=0.100)
    q.finished(1.000, 0.050)
    q.finished(1.010, 0.012)  # one fast request in the window is enough
    q.finished(1.020, 0.080)
    assert q.fastest(1.050) == 0.012
    assert q.behind(1.050, oldest_start=0.900) is None


def test_every_request_of_the_interval_slow_is_a_standing_queue():
    q = StandingQueue(target=0.020, interval=0.100)
    for i in range(5):
        q.finished(1.0 + i * 0.01, 0.030 + i * 0.001)
    why = q.behind(1.05, oldest_start=1.0)
    assert why is not None and "took 30 ms or more" in why and "last 100 ms" in why


def test_the_window_slides():
    q = StandingQueue(target=0.020, interval=0.100)
    q.finished(1.00, 0.005)  # fast, but it ages out
    q.finished(1.05, 0.040)
    q.finished(1.08, 0.030)
    assert q.behind(1.09, None) is None  # the fast one is still in the window
    assert q.fastest(1.101) == 0.030  # gone now: the slowest recent ones decide
    assert q.behind(1.101, None) is not None
    q.finished(1.12, 0.010)  # the queue drained
    assert q.behind(1.13, None) is None


def test_a_stall_with_nothing_finishing_is_recognised_by_the_oldest_request():
    q = StandingQueue(target=0.020, interval=0.100)  # stall: 10 x target = 200 ms
    assert q.behind(5.0, None) is None
    assert q.behind(5.0, oldest_start=4.85) is None  # 150 ms: a long request, not a stall
    why = q.behind(5.0, oldest_start=4.70)
    assert why is not None and "oldest in progress for 300 ms" in why
    assert StandingQueue(0.02, stall=1.0).behind(5.0, oldest_start=4.70) is None


@pytest.mark.parametrize(
    "kwargs", [{"target": 0}, {"target": -1}, {"target": float("nan")},
               {"target": 0.02, "interval": 0}, {"target": 0.02, "stall": float("inf")}]
)
def test_refuses_nonsense(kwargs):
    with pytest.raises(ValueError, match="must be a positive number of seconds"):
        StandingQueue(**kwargs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.05), st.floats(0, 0.2)), max_size=60))
def test_fastest_is_the_minimum_over_the_window(steps):
    """The monotonic queue gives what a scan over every sample of the window gives."""
    q = StandingQueue(target=0.02, interval=0.1)
    now, seen = 0.0, []
    for gap, took in steps:
        now += gap
        q.finished(now, took)
        seen.append((now, took))
        recent = [t for at, t in seen if at >= now - 0.1]
        assert q.fastest(now) == min(recent)


def test_the_server_refuses_only_on_a_standing_queue_with_enough_in_progress():
    """Server._busy: the standing-queue verdict applies above queue_floor items only, and
    queue_target 0 turns it off."""
    import trio

    from dccsign.server import Limits, Server

    async def main():
        server = Server(object(), limits=Limits(), resolve_uid=lambda uid: None)
        now = trio.current_time()
        server._started[object()] = now - 0.05
        server.pending_items = 300
        assert server._busy(0, 50) is None  # nothing finished yet, no stall
        for i in range(3):
            server._queue.finished(now - 0.01 * i, 0.045)
        assert "the engine is behind" in server._busy(0, 50)
        server.pending_items = 100
        assert server._busy(0, 50) is None  # little in progress: no queue worth refusing
        off = Server(object(), limits=Limits(queue_target=0), resolve_uid=lambda uid: None)
        off.pending_items = 5000
        off._started[object()] = now - 10
        assert off._queue is None and off._busy(0, 50) is None

    trio.run(main)
