"""Micro-batching toward keyd, across portal connections.

Each portal request contributes, per kid, its items in columns
(:class:`~dccsign.protocol.keyd.KeydColumns`: payloads, offsets, per-item client, account and
operator indices; the old list of ``SignPart`` is accepted and converted). Requests that
arrive close together go to keyd as one message -- their columns concatenated per kid, a
fixed number of calls per request and none per item: ``SIGN_KIDS`` with one batch per kid
(a frame mixing DCC types has one kid per type), or ``SIGN_COLUMNS`` when one kid is
pending -- and the HC1 strings a waiter wants are then built per kid in one worker-thread
call (``native.hc1_encode`` releases the GIL). keyd still checks, allows and audits each
item under its own client and account; what is shared is the per-message cost: one frame,
one pass through keyd's signing threads, one audit commit (one fsync), one round trip here.
The engine's client (:class:`~dccsign.keyd.trio_client.TrioKeydClient`) also has ``submit_kids``:
then no task waits for keyd's answer -- the flusher sends, and the client's reader hands the
answer over (:meth:`KeydBatcher._answered`): no task is spawned, and none woken, per
micro-batch. A keyd client without ``sign_kids`` (a test's fake) gets one ``SIGN_COLUMNS``
per kid, and one without ``sign_columns`` the same batches as ``SIGN_MANY`` parts.

When a kid's pending parts are sent:

* at once (after one scheduler checkpoint, so that whatever the event loop has already read
  joins) while keyd has a free slot -- fewer than ``max_in_flight`` micro-batches outstanding.
  At low load this adds no wait;
* otherwise when the oldest part has waited ``window`` seconds (default 1 ms), or as soon as
  ``max_batch`` payloads are pending -- as long as keyd holds fewer than ``2 * max_in_flight``
  micro-batches. Beyond that, parts wait here for a slot.

Under load the slots are busy, so parts accumulate for up to the window and keyd gets fewer,
larger messages -- the batch size follows the load without a tuning knob.

Fairness: keyd answers its micro-batches in order, so what waits at keyd is a queue every
new part joins at the end. Bounding it (above) keeps the backlog of one busy portal here,
where parts are picked round-robin by client: a portal that sends one certificate now and
then goes into the next micro-batch, not behind the thousands another portal has queued.
"""

from __future__ import annotations

import logging
import math
import operator
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate, compress, islice

import trio

from .. import native
from ..keyd.client import KeydError
from ..protocol.keyd import ColumnsResult, ItemError, KeydColumns, SignPart
from .offload import run_native

__all__ = ["DEFAULT_WINDOW", "KeydBatcher", "Outcome"]

#: The longest a part waits here for company (seconds).
DEFAULT_WINDOW = 0.001
#: Payloads per keyd message: beyond this, larger messages only add latency.
DEFAULT_MAX_BATCH = 512

#: Micro-batches of at most this many certificates are HC1-encoded on the event loop; larger
#: ones in a worker thread, where the GIL is released: with single-certificate requests the
#: thread hop cost the loop more than the encoding (bench/README.md).
INLINE_ENCODE = 4

#: Per payload: the HC1 string, or keyd's refusal.
Outcome = str | tuple[ItemError, str]


LOGGER = logging.getLogger("dccsign.serve")


class _Waiting:
    """One :meth:`KeydBatcher.issue` call (or one kid of an ``issue_columns_many`` or
    :meth:`~KeydBatcher.submit_columns` call): its columns, and later their outcomes.
    Settled (:meth:`settle`) once its outcome is set: the task waiting on ``done`` wakes, or
    the callback of its :class:`_Group` runs once the group's last member is settled."""

    __slots__ = ("client", "columns", "count", "done", "group", "outcome", "raw", "since")

    def __init__(
        self, columns: KeydColumns, since: float, raw: bool = False,
        group: _Group | None = None,
    ) -> None:  # fmt: skip
        self.columns = columns
        self.raw = raw  # wants keyd's columns (signatures), not HC1 strings
        self.count = len(columns)
        # fairness is by the first item's client (a request is one portal's)
        self.client = columns.clients[columns.client_ix[0]] if self.count else ""
        self.since = since
        self.group = group
        self.done = trio.Event() if group is None else None
        self.outcome: list[Outcome] | ColumnsResult | KeydError | None = None

    def settle(self) -> None:
        """The outcome is set: wake whoever waits for it (at most once per group member;
        a second call, e.g. from a stopping batcher, changes nothing)."""
        if self.group is None:
            self.done.set()  # type: ignore[union-attr]
        else:
            self.group.settled(self)


class _Group:
    """The waiters of one :meth:`KeydBatcher.submit_columns` call (one frame: one per kid)
    and its callback, run once with every member's outcome when the last one settles."""

    __slots__ = ("deliver", "left", "members", "settled_ids")

    def __init__(self, deliver: Callable[[list[ColumnsResult | KeydError]], None]) -> None:
        self.deliver = deliver
        self.members: list[_Waiting | None] = []
        self.left = 0
        self.settled_ids: set[int] = set()

    def settled(self, waiting: _Waiting) -> None:
        if id(waiting) in self.settled_ids:
            return
        self.settled_ids.add(id(waiting))
        self.left -= 1
        if not self.left:
            self.finish()

    def finish(self) -> None:
        """Every member has its outcome: run the callback with them."""
        out: list[ColumnsResult | KeydError] = []
        for member in self.members:
            if member is None:
                out.append(ColumnsResult(0, b""))
            else:
                assert isinstance(member.outcome, ColumnsResult | KeydError)
                out.append(member.outcome)
        try:
            self.deliver(out)
        except Exception:
            # The callback answers its own failures (the dispatcher's INTERNAL); one that
            # escapes is a bug, and must not stop the batcher or keyd's reader.
            LOGGER.exception("handing keyd's answer to a frame failed")


class _Flight:
    """One micro-batch sent with ``submit_kids`` and not yet answered: its waiters by kid,
    the columns sent and when."""

    __slots__ = ("batches", "everyone", "finished", "kids", "sent")

    def __init__(self, kids: list[tuple[bytes, list[_Waiting]]]) -> None:
        self.kids = kids
        self.everyone = [w for _kid, batch in kids for w in batch]
        self.batches: list[tuple[bytes, KeydColumns]] = []
        self.sent = 0.0
        self.finished = False


_CLIENT = operator.attrgetter("client")
_COUNT = operator.attrgetter("count")


def _fair_batch(waiting: list[_Waiting], max_batch: int) -> list[_Waiting]:
    """Take up to *max_batch* payloads out of *waiting* (oldest first), one request of each
    client in turn; a request alone above *max_batch* is taken alone."""
    if len(set(map(_CLIENT, waiting))) <= 1:
        # One client (a quiet engine, or one busy portal): round-robin is arrival order --
        # the longest prefix that fits (every part holds at least one payload), found
        # without bytecode per part.
        end = max(1, bisect_right(list(accumulate(map(_COUNT, waiting))), max_batch))
        batch = waiting[:end]
        del waiting[:end]
        return batch
    queues: dict[str, list[_Waiting]] = {}
    for w in waiting:
        queues.setdefault(w.client, []).append(w)
    batch: list[_Waiting] = []
    count = 0
    while queues:
        for client in list(queues):
            queue = queues[client]
            w = queue[0]
            if batch and count + w.count > max_batch:
                del queues[client]  # its next part does not fit: the others may
                continue
            batch.append(w)
            count += w.count
            queue.pop(0)
            if not queue:
                del queues[client]
            if count >= max_batch:
                queues.clear()
                break
    taken = {id(w) for w in batch}
    waiting[:] = [w for w in waiting if id(w) not in taken]
    return batch


def _outcomes(codes: bytes, texts: list[str], reasons: tuple[str, ...]) -> list[Outcome]:
    """Per item: its HC1 string (code 0, in order) or ``(ItemError, reason)``."""
    done = iter(texts)
    why = iter(reasons)
    return [next(done) if not code else (ItemError(code), next(why)) for code in codes]


def _reasons(result: ColumnsResult, start: int, end: int) -> tuple[str, ...]:
    """The reasons of the refused items among items start..end-1."""
    before = start - result.codes[:start].count(0)
    return result.reasons[before : before + (end - start) - result.codes[start:end].count(0)]


def _slice_result(result: ColumnsResult, start: int, end: int) -> ColumnsResult:
    """keyd's answer restricted to items start..end-1 (one waiter's), signatures rebased."""
    if not start and end == len(result.codes):
        return result  # the waiter had the micro-batch to itself (for its kid)
    codes = result.codes[start:end]
    first = result.codes[:start].count(0)  # signed items before this waiter's
    signed = codes.count(0)
    ends = result.sig_ends
    lo = ends[first - 1] if first else 0
    hi = ends[first + signed - 1] if signed else lo
    return ColumnsResult(
        0,
        codes,
        result.signatures[lo:hi],
        array("I", map((-lo).__add__, ends[first : first + signed])),
        _reasons(result, start, end),
    )


class KeydBatcher:
    """Collects parts and sends them to keyd in micro-batches (see the module docstring).

    Args:
        keyd: a :class:`~dccsign.keyd.trio_client.TrioKeydClient` (anything with its ``sign_many``
            and ``connections``).
        zlib_level: the deflate level of the HC1 strings.
        window: the longest a part waits for company, in seconds.
        max_batch: payloads per SIGN_MANY.
        max_in_flight: micro-batches outstanding at keyd before parts wait (default: two per
            keyd connection, so keyd always has the next one queued).
        on_batch: called with the payload count of every micro-batch sent (metrics).
        on_stage: called as ``on_stage(stage, seconds)`` for every micro-batch: ``batch_wait``
            (its oldest part's wait before it was sent), ``keyd`` (the round trip: keyd's
            queue, checks, signing and audit commit) and ``encode`` (its HC1 strings).

    :meth:`run` must be running (in a nursery) for :meth:`issue` to make progress.
    """

    def __init__(
        self,
        keyd: object,
        *,
        zlib_level: int = 9,
        window: float = DEFAULT_WINDOW,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_stage: Callable[[str, float], None] | None = None,
    ) -> None:
        if not (window >= 0 and math.isfinite(window)):
            raise ValueError("window must be a finite number of seconds >= 0")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.keyd = keyd
        self.zlib_level = zlib_level
        self.window = window
        self.max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._on_batch = on_batch
        self._on_stage = on_stage
        self._pending: dict[bytes, list[_Waiting]] = {}
        self._protected: dict[bytes, bytes] = {}
        self._size = 0  # payloads pending over all kids
        self._in_flight = 0
        self._flights: set[_Flight] = set()  # sent with submit_kids, not yet answered
        self._wake = trio.Event()  # something is pending
        self._slot = trio.Event()  # a slot freed, or max_batch reached
        self._nursery: trio.Nursery | None = None
        #: Micro-batches sent and payloads in them (for metrics and tests).
        self.batches_sent = 0
        self.payloads_sent = 0

    @property
    def max_in_flight(self) -> int:
        if self._max_in_flight is not None:
            return self._max_in_flight
        return max(1, 2 * getattr(self.keyd, "connections", 1))

    @property
    def pending(self) -> int:
        """Payloads waiting to be sent."""
        return self._size

    @property
    def in_flight(self) -> int:
        """Micro-batches sent and not yet answered."""
        return self._in_flight

    async def issue(
        self, kid: bytes, protected: bytes, parts: KeydColumns | Sequence[SignPart]
    ) -> list[Outcome]:
        """Per item of *parts* (columns, or ``SignPart`` whose payloads run in order over the
        parts), its HC1 string or keyd's ``(ItemError, reason)``.

        *protected* is the kid's COSE protected header (the same for every item of a kid).

        Raises:
            KeydError: keyd could not answer the micro-batch this part went in (nothing of
                it was signed, or nothing released: a retry cannot duplicate a record).
        """
        columns = (
            parts
            if isinstance(parts, KeydColumns)
            else KeydColumns.from_parts([p for p in parts if p.payloads])
        )
        waiting = _Waiting(columns, trio.current_time())
        if not waiting.count:
            return []
        self._protected.setdefault(kid, protected)
        self._pending.setdefault(kid, []).append(waiting)
        self._size += waiting.count
        self._wake.set()
        if self._size >= self.max_batch:
            self._slot.set()
        await waiting.done.wait()
        outcome = waiting.outcome
        if isinstance(outcome, KeydError):
            raise outcome
        assert outcome is not None
        return outcome

    async def issue_columns(
        self, kid: bytes, protected: bytes, columns: KeydColumns
    ) -> ColumnsResult:
        """keyd's answer for *columns* as columns (codes, the signatures of the signed items,
        the reasons of the others), without HC1 strings: for a caller that builds its reply
        body from the signatures itself (``native.encode_sign_batch_result``).

        Raises:
            KeydError: as :meth:`issue`.
        """
        (outcome,) = await self.issue_columns_many([(kid, protected, columns)])
        if isinstance(outcome, KeydError):
            raise outcome
        return outcome

    async def issue_columns_many(
        self, batches: Sequence[tuple[bytes, bytes, KeydColumns]]
    ) -> list[ColumnsResult | KeydError]:
        """:meth:`issue_columns` for several ``(kid, protected, columns)`` at once (one
        frame's kids): all are queued before this waits, so they share a micro-batch
        without a task per kid. Per batch, keyd's answer or the :class:`KeydError` of the
        micro-batch it went in."""
        now = trio.current_time()
        waiters: list[_Waiting | None] = []
        for kid, protected, columns in batches:
            waiting = _Waiting(columns, now, raw=True)
            if not waiting.count:
                waiters.append(None)
                continue
            self._protected.setdefault(kid, protected)
            self._pending.setdefault(kid, []).append(waiting)
            self._size += waiting.count
            waiters.append(waiting)
        if any(waiters):
            self._wake.set()
            if self._size >= self.max_batch:
                self._slot.set()
        out: list[ColumnsResult | KeydError] = []
        for waiting in waiters:
            if waiting is None:
                out.append(ColumnsResult(0, b""))
                continue
            # Usually all went in one micro-batch: once the first is answered, the others
            # are too, and waiting on a set Event would cost a pass of the scheduler each.
            if not waiting.done.is_set():
                await waiting.done.wait()
            assert isinstance(waiting.outcome, ColumnsResult | KeydError)
            out.append(waiting.outcome)
        return out

    def submit_columns(
        self,
        batches: Sequence[tuple[bytes, bytes, KeydColumns]],
        deliver: Callable[[list[ColumnsResult | KeydError]], None],
    ) -> None:
        """:meth:`issue_columns_many` without a task waiting: *batches* are queued now and
        ``deliver(outcomes)`` runs once, on the event loop's thread, when all are answered
        (from the flusher, keyd's reader, or a stopping batcher: never inside this call
        unless nothing was queued). Per batch: keyd's answer, or the :class:`KeydError` of
        the micro-batch it went in. *deliver* must not raise (what escapes is logged)."""
        group = _Group(deliver)
        now = trio.current_time()
        for kid, protected, columns in batches:
            waiting = _Waiting(columns, now, raw=True, group=group)
            if not waiting.count:
                group.members.append(None)
                continue
            self._protected.setdefault(kid, protected)
            self._pending.setdefault(kid, []).append(waiting)
            self._size += waiting.count
            group.members.append(waiting)
            group.left += 1
        if not group.left:  # nothing to sign: answered at once
            group.finish()
            return
        self._wake.set()
        if self._size >= self.max_batch:
            self._slot.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher; runs until cancelled (micro-batches in flight are finished first
        only if the caller's nursery waits for them)."""
        submit = getattr(self.keyd, "submit_kids", None)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._flusher(nursery, submit)
        finally:
            # Stopped (cancelled, or failed): no waiter of a micro-batch keyd has not
            # answered may wait for ever.
            stopping = KeydError("engine stopping", retryable=False)
            for flight in list(self._flights):
                self._fail(flight, stopping)
            # Parts never sent: their waiters get the same (a task waiting on one may
            # outlive this batcher; a frame's callback must run for its reply to go out).
            pending = [w for waiting in self._pending.values() for w in waiting]
            self._pending.clear()
            self._size = 0
            for waiting in pending:
                waiting.outcome = stopping
                waiting.settle()

    async def _flusher(self, nursery: trio.Nursery, submit: object) -> None:
        """Wait for parts and send them (see the module docstring for when): through
        ``submit_kids`` when the keyd client has it (no task per micro-batch: keyd's answer
        is handed over from the client's reader, :meth:`_answered`), else one task per
        micro-batch (:meth:`_flush`)."""
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
            # One checkpoint: tasks that are already runnable (frames already read) join.
            await trio.lowlevel.checkpoint()
            if self._in_flight >= self.max_in_flight:
                oldest = min(w[0].since for w in self._pending.values())
                with trio.move_on_at(oldest + self.window):
                    while self._in_flight >= self.max_in_flight and self._size < self.max_batch:
                        self._slot = trio.Event()
                        await self._slot.wait()
            while self._in_flight >= self.queue_limit:
                self._slot = trio.Event()
                await self._slot.wait()
            if submit is not None:
                while self._pending and self._in_flight < self.queue_limit:
                    await self._submit(self._take_kids())
            else:
                self._flush(nursery)

    @property
    def queue_limit(self) -> int:
        """Micro-batches keyd may hold at once (see "Fairness" in the module docstring)."""
        return 2 * self.max_in_flight

    def _flush(self, nursery: trio.Nursery) -> None:
        """Send micro-batches while keyd's queue has room; what is left waits for the next
        flush. Kids in the order of their oldest part; each kid's batch filled round-robin
        by client (an oversized part goes alone, as the only one). A keyd client that speaks
        SIGN_KIDS gets every kid's batch in one message (one keyd round, one audit commit):
        up to ``max_batch`` payloads over all kids, plus at most one oversized part per kid."""
        if getattr(self.keyd, "sign_kids", None) is not None:
            while self._pending and self._in_flight < self.queue_limit:
                self._start(nursery, self._take_kids())
            return
        for kid in sorted(self._pending, key=lambda k: self._pending[k][0].since):
            waiting = self._pending[kid]
            while waiting and self._in_flight < self.queue_limit:
                batch = _fair_batch(waiting, self.max_batch)
                self._size -= sum(w.count for w in batch)
                self._start(nursery, [(kid, batch)])
            if not waiting:
                del self._pending[kid]

    def _take_kids(self) -> list[tuple[bytes, list[_Waiting]]]:
        """The next SIGN_KIDS micro-batch, taken out of the pending parts: kids in the
        order of their oldest part, each kid's batch filled round-robin by client, up to
        ``max_batch`` payloads over all kids (plus at most one oversized part per kid)."""
        room = self.max_batch
        kids: list[tuple[bytes, list[_Waiting]]] = []
        for kid in sorted(self._pending, key=lambda k: self._pending[k][0].since):
            if room <= 0:
                break
            waiting = self._pending[kid]
            batch = _fair_batch(waiting, room)
            count = sum(w.count for w in batch)
            room -= count
            self._size -= count
            kids.append((kid, batch))
            if not waiting:
                del self._pending[kid]
        return kids

    def _columns_of(
        self, kids: list[tuple[bytes, list[_Waiting]]]
    ) -> list[tuple[bytes, KeydColumns]]:
        """One column set per kid (its waiters' columns, concatenated), counted as one batch
        sent: what every keyd round sends."""
        batches = [(kid, KeydColumns.concat([w.columns for w in batch])) for kid, batch in kids]
        count = sum(len(columns) for _kid, columns in batches)
        self.batches_sent += 1
        self.payloads_sent += count
        if self._on_batch is not None:
            self._on_batch(count)
        return batches

    async def _submit(self, kids: list[tuple[bytes, list[_Waiting]]]) -> None:
        """Send one micro-batch with the keyd client's ``submit_kids``: its answer arrives
        in :meth:`_answered`, from the client's reader task (no task of ours waits)."""
        flight = _Flight(kids)
        self._in_flight += 1
        self._flights.add(flight)
        try:
            batches = self._columns_of(kids)
            flight.batches = batches
            flight.sent = trio.current_time()
            await self.keyd.submit_kids(  # type: ignore[attr-defined]
                batches, lambda answer: self._answered(flight, answer)
            )
        except KeydError as exc:  # no connection to keyd: nothing was sent
            self._fail(flight, exc)
        except Exception as exc:
            LOGGER.exception("a micro-batch of %d requests failed", len(flight.everyone))
            self._fail(flight, KeydError(f"engine failed: {exc!r}", retryable=False))

    def _answered(self, flight: _Flight, answer: list[ColumnsResult] | KeydError) -> None:
        """keyd's answer to *flight* (or the KeydError that ended it): every waiter its
        outcome. Runs in the keyd client's reader task, so it never waits: waiters that
        want HC1 strings (the per-item path) are served by a task of their own."""
        if flight.finished:
            return  # failed already (the engine is stopping)
        if isinstance(answer, KeydError):
            self._fail(flight, answer)
            return
        if not all(w.raw for w in flight.everyone):
            try:
                self._nursery.start_soon(  # type: ignore[union-attr]
                    self._answered_with_strings, flight, answer
                )
            except RuntimeError:  # the batcher has stopped: its nursery takes no task
                self._fail(flight, KeydError("engine stopping", retryable=False))
            return
        try:
            answered = trio.current_time()
            if len(answer) != len(flight.kids):  # the client checks this; a bug otherwise
                raise ValueError(f"{len(answer)} answers for {len(flight.kids)} kids")
            for (_kid, batch), result in zip(flight.kids, answer, strict=True):
                _assign(batch, result, [])
            self._stages(flight, answered)
        except Exception as exc:
            LOGGER.exception("a micro-batch of %d requests failed", len(flight.everyone))
            self._fail(flight, KeydError(f"engine failed: {exc!r}", retryable=False))
            return
        self._finish(flight)

    async def _answered_with_strings(self, flight: _Flight, answer: list[ColumnsResult]) -> None:
        try:
            answered = trio.current_time()
            for (kid, batch), (_kid, columns), result in zip(
                flight.kids, flight.batches, answer, strict=True
            ):
                await self._deliver(kid, batch, columns, result)
            self._stages(flight, answered)
        except Exception as exc:
            LOGGER.exception("a micro-batch of %d requests failed", len(flight.everyone))
            self._fail(flight, KeydError(f"engine failed: {exc!r}", retryable=False))
            return
        except BaseException as exc:
            self._fail(flight, KeydError(f"engine stopping or failed: {exc!r}", retryable=False))
            raise
        self._finish(flight)

    def _stages(self, flight: _Flight, answered: float) -> None:
        if self._on_stage is not None:
            # Per micro-batch, not per item: three observations whatever its size.
            done = trio.current_time()
            self._on_stage("batch_wait", flight.sent - min(w.since for w in flight.everyone))
            self._on_stage("keyd", answered - flight.sent)
            self._on_stage("encode", done - answered)

    def _fail(self, flight: _Flight, exc: KeydError) -> None:
        """*flight*'s waiters that have no outcome yet get *exc*; the flight ends."""
        if flight.finished:
            return
        for waiting in flight.everyone:
            if waiting.outcome is None:
                waiting.outcome = exc
        self._finish(flight)

    def _finish(self, flight: _Flight) -> None:
        flight.finished = True
        self._flights.discard(flight)
        for waiting in flight.everyone:
            waiting.settle()
        self._in_flight -= 1
        self._slot.set()

    async def _sign(self, batches: list[tuple[bytes, KeydColumns]]) -> list[ColumnsResult]:
        """keyd's answers for *batches* (``(kid, columns)``, kids distinct): one SIGN_KIDS
        for several kids, SIGN_COLUMNS for one, or SIGN_MANY parts for a client that only
        speaks that (a test's fake)."""
        if len(batches) > 1:
            return await self.keyd.sign_kids(batches)  # type: ignore[attr-defined,no-any-return]
        kid, columns = batches[0]
        sign_columns = getattr(self.keyd, "sign_columns", None)
        if sign_columns is not None:
            return [await sign_columns(kid, columns)]
        results = await self.keyd.sign_many(kid, list(columns.parts()))  # type: ignore[attr-defined]
        return [ColumnsResult.from_results(0, results)]

    def _start(self, nursery: trio.Nursery, kids: list[tuple[bytes, list[_Waiting]]]) -> None:
        self._in_flight += 1
        nursery.start_soon(self._send, kids)

    async def _send(self, kids: list[tuple[bytes, list[_Waiting]]]) -> None:
        """One keyd round for the waiters of one or more kids, and their outcomes."""
        everyone = [w for _kid, batch in kids for w in batch]
        try:
            batches = self._columns_of(kids)
            sent = trio.current_time()
            try:
                results = await self._sign(batches)
            except KeydError as exc:
                for waiting in everyone:
                    waiting.outcome = exc
                return
            answered = trio.current_time()
            for (kid, batch), (_kid, columns), result in zip(kids, batches, results, strict=True):
                await self._deliver(kid, batch, columns, result)
            if self._on_stage is not None:
                # Per micro-batch, not per item: three observations whatever its size.
                done = trio.current_time()
                self._on_stage("batch_wait", sent - min(w.since for w in everyone))
                self._on_stage("keyd", answered - sent)
                self._on_stage("encode", done - answered)
        except Exception as exc:
            # A bug in the engine's handling of one micro-batch: its waiters get an error
            # (INTERNAL for their items), and the batcher -- the engine -- goes on.
            LOGGER.exception("a micro-batch of %d requests for kid(s) %s failed", len(everyone),
                             ", ".join(kid.hex() for kid, _batch in kids))  # fmt: skip
            for waiting in everyone:
                if waiting.outcome is None:
                    waiting.outcome = KeydError(f"engine failed: {exc!r}", retryable=False)
        except BaseException as exc:
            # Cancelled (engine stopping): no waiter may hang.
            for waiting in everyone:
                if waiting.outcome is None:
                    waiting.outcome = KeydError(
                        f"engine stopping or failed: {exc!r}", retryable=False
                    )
            raise
        finally:
            for waiting in everyone:
                waiting.settle()
            self._in_flight -= 1
            self._slot.set()

    async def _deliver(
        self, kid: bytes, batch: list[_Waiting], columns: KeydColumns, result: ColumnsResult
    ) -> None:
        """Each waiter of *batch* (one kid's) its outcome from keyd's *result*."""
        count = len(columns)
        codes = result.codes
        # HC1 strings only for the waiters that want them (issue); the others (issue_columns)
        # get keyd's columns. Signatures follow the signed items in order, so the
        # signatures of the string-waiters are taken waiter by waiter.
        ok: list[int] = []
        signatures: list[bytes] = []
        if not any(w.raw for w in batch):
            ok = list(compress(range(count), map(operator.not_, codes)))
            signatures = result.signature_list()
        elif not all(w.raw for w in batch):
            start = 0
            for w in batch:
                end = start + w.count
                if not w.raw:
                    ok += compress(range(start, end), map(operator.not_, codes[start:end]))
                    signatures += _slice_result(result, start, end).signature_list()
                start = end
        texts: list[str] = []
        if ok:
            starts = array("I", [0])
            starts += columns.ends[:-1]
            payloads = list(map(columns.payloads.__getitem__,
                                map(slice, map(starts.__getitem__, ok),
                                    map(columns.ends.__getitem__, ok))))  # fmt: skip
            job = (self._protected[kid], payloads, signatures, self.zlib_level)
            if len(ok) <= INLINE_ENCODE:
                # A thread hop costs the event loop more than encoding a few here.
                texts = native.hc1_encode(*job)
            else:
                texts = await run_native(native.hc1_encode, *job)
        _assign(batch, result, texts)


def _assign(batch: list[_Waiting], result: ColumnsResult, texts: list[str]) -> None:
    """Each waiter of *batch* (one kid's, in order) its outcome from keyd's *result*: its
    slice of the columns, or (a waiter that wants strings) its HC1 strings from *texts* (the
    signed items' strings of the waiters that want them, in order) and refusals."""
    codes = result.codes
    start = 0
    done_texts = iter(texts)
    for waiting in batch:
        end = start + waiting.count
        if waiting.raw:
            waiting.outcome = _slice_result(result, start, end)
        else:
            mine = codes[start:end]
            taken = list(islice(done_texts, mine.count(0)))
            waiting.outcome = _outcomes(mine, taken, _reasons(result, start, end))
        start = end
