"""Quota windows and idempotency keys shared by the engines of one deployment, in Redis.

The embedded default keeps both in the engine's memory (:class:`~.policy.QuotaTracker`,
:class:`~.dispatch.IdempotencyCache`). Behind a load balancer that multiplies every quota by
the number of engines and lets a retry that lands on another engine be signed again. With
``dccsign serve --state redis://...`` every engine charges quotas and claims idempotency keys
in one Redis (or Redis Cluster) instead, through :class:`RedisState`.

**One round trip per micro-batch.** A call from an engine to Redis costs ~300 µs of the
engine's CPU through coredis on trio, ~140 µs through :class:`~.resplink.ScriptLink` (which
a single Redis gets; a cluster goes through coredis); one call per frame of 50
certificates would still cost more than the budget per certificate. So every operation is
queued, and one task sends
everything queued as one call of one Lua script (``sharedstate.lua``): the quota charges of
many frames, the units they give back, the idempotency keys they claim, the results they
store and the keys they poll. Redis runs a script atomically, so no other engine's charge
comes between a check and its charge: N units of quota are N in total, whoever asks.

**Failure rules.**

* A call that fails, or does not answer within *timeout*, fails every operation it carried
  with :class:`StateUnavailable` (the client gets STATE_UNAVAILABLE, retryable): a charge
  that was not confirmed signs nothing. The connection is dropped and made again in the
  background (backoff up to a second); meanwhile new operations fail at once, and the first
  call that works again resumes service, no restart needed.
* A charge whose call timed out may have been applied by Redis all the same: those units
  stay counted (they expire with their window). Units given back in a failed call are not
  sent again (a release is not idempotent: sent twice, it would free units that are signed).
  Both errors count too much, never too little: no fault lets a quota be exceeded.
* Results that could not be stored are sent again with the next call (storing is
  idempotent); until then a retry on another engine waits or gets BUSY, never a second
  signature.
* An engine that dies leaves its in-progress idempotency claims behind; they expire after
  *claim_ttl*, after which a retry is signed afresh (the first attempt may then be in its
  node's audit log as well: ``dccsign audit search`` over all nodes' logs shows both).
* Clients without a quota and items without an idempotency key never wait for Redis.

Keys all carry the hash tag ``{dccsign}``, so that one script call's keys are in one Redis
Cluster slot; several deployments sharing one Redis use different databases.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import repeat
from typing import Any, Final

import trio

from ..errors import DccSignError
from ..protocol.wire import ItemResult, SignItem
from .policy import WINDOW_SPANS, WINDOW_WIDTHS, Policy, Refusal, quota_refusal
from .resplink import NoScript, ScriptLink

__all__ = [
    "DEFAULT_CLAIM_TTL",
    "DEFAULT_RESULT_TTL",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WAIT",
    "DEFAULT_WINDOW",
    "Claim",
    "RedisState",
    "StateUnavailable",
    "Verdicts",
    "state_url",
]

LOGGER = logging.getLogger("dccsign.state")

#: Longest wait for Redis to answer one call, in seconds.
DEFAULT_TIMEOUT: Final = 0.5
#: How long the first operation of a call waits for others to join it, in seconds.
DEFAULT_WINDOW: Final = 0.001
#: How long an idempotency claim lasts without its result (its engine may have died).
DEFAULT_CLAIM_TTL: Final = 60.0
#: How long results are kept for retries (protocol/SPEC.md §10: at least 24 hours).
DEFAULT_RESULT_TTL: Final = 24 * 3600.0
#: How long a retry waits for a first attempt in progress elsewhere before BUSY.
DEFAULT_WAIT: Final = 5.0
#: Pause between two polls of a key in progress elsewhere.
POLL_INTERVAL: Final = 0.02
#: Results kept for the next call at most while calls fail (the oldest go first).
MAX_UNSENT: Final = 16384
_BACKOFF_MAX: Final = 1.0

#: Every key's prefix (the script builds the keys): its hash tag puts them all in one slot.
_PREFIX: Final = b"{dccsign}:"

#: Per account of a charge: (units granted, refusal of the rest or None).
Verdicts = list[tuple[int, Refusal | None]]


class StateUnavailable(DccSignError):
    """The shared store did not confirm an operation (unreachable, slow or failing): what
    depended on it is not signed. The message says why, for the client."""


class Claim:
    """What a claim or a poll of an idempotency key found: the states of the in-process
    cache's ``Seen``, plus GONE (a poll found no record: the first attempt failed)."""

    NEW, DONE, IN_PROGRESS, CONFLICT, GONE = range(5)


def state_url(text: str) -> str:
    """*text* if it names a Redis the engine can use (``redis://``, ``unix://`` or
    ``redis+cluster://host:port,host:port``), for argparse. (TLS to Redis, ``rediss://``, is
    not offered: nothing here tests it; run Redis on a private network or a Unix socket.)

    Raises:
        ValueError: any other scheme, or a cluster URL without a host:port.
    """
    if text.startswith(("redis://", "unix://")):
        return text
    if text.startswith("redis+cluster://"):
        _cluster_nodes(text)
        return text
    raise ValueError(
        f"{text!r}: give redis://HOST:PORT[/DB], unix:///PATH or "
        "redis+cluster://HOST:PORT,HOST:PORT"
    )


def _cluster_nodes(url: str) -> list[tuple[str, int]]:
    nodes = []
    for part in url.removeprefix("redis+cluster://").strip("/").split(","):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{url!r}: {part!r} is not HOST:PORT")
        nodes.append((host, int(port)))
    return nodes


def _script() -> str:
    text = resources.files(__package__).joinpath("sharedstate.lua").read_text()
    lua = "{" + ", ".join(map(str, WINDOW_WIDTHS)) + "}"
    return text.replace("@WIDTH@", lua).replace(
        "@SPAN@", "{" + ", ".join(map(str, WINDOW_SPANS)) + "}"
    )


def _limits(quota: Any) -> tuple[int, int, int]:
    if quota is None:
        return (0, 0, 0)
    return (quota.per_minute or 0, quota.per_hour or 0, quota.per_day or 0)


@dataclass(slots=True)
class _Slot:
    """One awaited answer: set once, by the flusher."""

    event: trio.Event = field(default_factory=trio.Event)
    value: Any = None

    def set(self, value: Any) -> None:
        self.value = value
        self.event.set()

    async def get(self) -> Any:
        await self.event.wait()
        if isinstance(self.value, StateUnavailable):
            raise self.value
        return self.value


class _Call:
    """The operations of one script call, by section, and who waits for their answers."""

    __slots__ = ("claims", "ended", "finishes", "groups", "ops", "polls", "releases", "sections")

    def __init__(self) -> None:
        self.sections: tuple[list[Any], ...] = ([], [], [], [], [])  # r, q, c, f, g
        self.groups: list[tuple[Callable[[Any], None], str, Sequence[str], Sequence[int]]] = []
        self.releases: dict[tuple[str, str, int, int], int] = {}
        self.claims: list[_Slot] = []
        self.finishes: list[tuple[bytes, ...]] = []
        self.polls: list[_Slot] = []
        self.ops = 0
        self.ended = trio.Event()  # set once the call has been answered, or has failed


class RedisState:
    """Quotas and idempotency keys in Redis, one script call per micro-batch (see the
    module docstring for the batching and the failure rules).

    Run :meth:`run` in a nursery (it reports started at once and connects in the
    background); call the operations from the same trio loop. *node* labels the claims this
    engine holds (its ``--node-id``); *metrics* (optional) is the engine's
    :class:`~.metrics.Metrics`.
    """

    def __init__(
        self,
        url: str,
        *,
        node: str,
        timeout: float = DEFAULT_TIMEOUT,
        window: float = DEFAULT_WINDOW,
        claim_ttl: float = DEFAULT_CLAIM_TTL,
        result_ttl: float = DEFAULT_RESULT_TTL,
        wait: float = DEFAULT_WAIT,
        metrics: Any = None,
    ) -> None:
        state_url(url)
        self.url = url
        self.node = node.encode()
        self.timeout = timeout
        self.window = window
        self.claim_ttl_ms = math.ceil(claim_ttl * 1000)
        self.result_ttl_ms = math.ceil(result_ttl * 1000)
        self.wait = wait
        self.metrics = metrics
        #: Why the store cannot be used now, or None while it answers.
        self.problem: str | None = "not connected yet"
        self._script = _script()
        self._call = _Call()
        self._wake = trio.Event()
        #: results whose call failed, sent again with the next one
        self._unsent_finishes: list[tuple[bytes, bytes, int, bytes, bytes]] = []

    # ------------------------------------------------------------------ quotas

    def charge_soon(
        self,
        policy: Policy,
        client: str,
        accounts: Sequence[str],
        counts: Sequence[int],
        done: Callable[[Verdicts | StateUnavailable], None],
    ) -> None:
        """Reserve up to ``counts[k]`` units for each distinct account of *client*, as
        :meth:`QuotaTracker.try_reserve_many` does (all of an account's units when they fit,
        else as many as fit), atomically across engines. ``done(verdicts)`` runs later on
        the event loop, or ``done(StateUnavailable)`` -- then nothing was reserved that will
        be signed. *done* must not raise. A client without quotas is answered at once."""
        cp = policy.client(client)
        if cp is None or (cp.quota is None and cp.account_quota is None):
            # Unknown clients never reach this point (refused at HELLO); no quota: no store.
            done([(n, None) for n in counts])
            return
        if not accounts:
            done([])
            return
        if self.problem is not None:
            done(StateUnavailable(self._unavailable()))
            return
        encoded = list(map(str.encode, accounts))
        self._call.sections[1].extend(
            (
                client,
                *_limits(cp.quota),
                *_limits(cp.account_quota),
                len(encoded),
                b"".join(encoded),
                _u32(map(len, encoded)),
                _u32(counts),
            )
        )
        self._call.groups.append((done, client, accounts, counts))
        self._queued(len(accounts))

    async def charge(
        self, policy: Policy, client: str, accounts: Sequence[str], counts: Sequence[int]
    ) -> Verdicts:
        """:meth:`charge_soon`, awaited.

        Raises:
            StateUnavailable: the store did not confirm the charge.
        """
        slot = _Slot()
        self.charge_soon(policy, client, accounts, counts, slot.set)
        return await slot.get()

    def release(self, policy: Policy, client: str, account: str, n: int) -> None:
        """Give back *n* units charged for *account* of *client* that were not signed (sent
        with the next call; lost, never repeated, when that call fails)."""
        cp = policy.client(client)
        if cp is None or (cp.quota is None and cp.account_quota is None) or n < 1:
            return
        slot = (client, account, int(cp.quota is not None), int(cp.account_quota is not None))
        releases = self._call.releases
        if slot not in releases:
            self._queued(1)
        releases[slot] = releases.get(slot, 0) + n

    # ------------------------------------------------------------ idempotency

    async def claim(
        self, client: str, items: Sequence[tuple[SignItem, bytes]]
    ) -> list[tuple[int, ItemResult | None]]:
        """Claim the idempotency key of each ``(item, fingerprint)``: per item ``(Claim.NEW,
        None)`` -- this engine signs it and must :meth:`finish` it; ``(Claim.DONE, result)``;
        ``(Claim.IN_PROGRESS, None)`` -- another attempt holds it (:meth:`wait_for`);
        ``(Claim.CONFLICT, None)``.

        Raises:
            StateUnavailable: nothing was claimed that this engine may sign.
        """
        if not items:
            return []
        if self.problem is not None:
            raise StateUnavailable(self._unavailable())
        call = self._call
        slots = []
        section = call.sections[2]
        for item, fp in items:
            section += (client, item.account, _key_bytes(item), fp)
            slot = _Slot()
            call.claims.append(slot)
            slots.append(slot)
        self._queued(len(items))
        return [await slot.get() for slot in slots]

    async def finish(
        self, client: str, results: Sequence[tuple[SignItem, bytes, ItemResult]]
    ) -> None:
        """Store the results of keys this engine claimed (``(item, fingerprint, result)``
        each): a success for later retries on any engine, a failure by dropping the claim
        (the retry is handled afresh). Returns once the call carrying them has ended: the
        caller replies after that, so that an engine that dies after its reply leaves the
        result behind. When that call fails they are sent again with the next one."""
        ended = self.finish_soon(client, results)
        if ended is not None:
            await ended.wait()

    def finish_soon(
        self, client: str, results: Sequence[tuple[SignItem, bytes, ItemResult]]
    ) -> trio.Event | None:
        """:meth:`finish` without waiting: the event set when the call carrying them ends,
        or None when none will carry them soon (nothing to send, or the store is down:
        they wait for the first call that works)."""
        if not results:
            return None
        call = self._call
        into = call.finishes if self.problem is None else self._unsent_finishes
        for item, fp, result in results:
            ok = 1 if result.ok else 0
            kid = bytes(result.kid) if ok else b""
            hc1 = result.hc1.encode() if ok else b""
            into.append((client, item.account, _key_bytes(item), fp, ok, kid, hc1))
        if self.problem is not None:
            return None
        self._queued(len(results))
        return call.ended

    async def wait_for(self, client: str, item: SignItem, fp: bytes) -> ItemResult | None:
        """The result of a key in progress elsewhere once it is stored: polled every
        POLL_INTERVAL for up to *wait* seconds. None when the first attempt failed or is
        still running at the end (the caller answers a retryable error).

        Raises:
            StateUnavailable: the store stopped answering.
        """
        deadline = trio.current_time() + self.wait
        while trio.current_time() < deadline:
            await trio.sleep(POLL_INTERVAL)
            if self.problem is not None:
                raise StateUnavailable(self._unavailable())
            slot = _Slot()
            call = self._call
            call.sections[4].extend((client, item.account, _key_bytes(item), fp))
            call.polls.append(slot)
            self._queued(1)
            state, result = await slot.get()
            if state == Claim.DONE:
                return result
            if state != Claim.IN_PROGRESS:
                return None
        return None

    # --------------------------------------------------------------- the task

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (again after every failure, with backoff) and send what is queued, one
        call at a time. Reports started at once: the engine serves meanwhile, failing what
        needs the store."""
        task_status.started()
        delay = 0.05
        while True:
            try:
                async with self._client() as client:
                    with trio.fail_after(self.timeout):
                        sha = await client.script_load(self._script)
                    self._up()
                    delay = 0.05
                    await self._serve(client, sha)
            except Exception as exc:  # any store fault: fail closed
                self._down(exc)
            self._fail_queued()
            await trio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _client(self) -> Any:
        """A connection for the calls, as an async context manager: a :class:`ScriptLink` to
        a single Redis, coredis's cluster client (slot routing, failover) to a cluster."""
        if not self.url.startswith("redis+cluster://"):
            return ScriptLink(self.url, self.timeout)
        import coredis
        from coredis.retry import NoRetryPolicy

        return coredis.RedisCluster(
            startup_nodes=[
                coredis.connection.TCPLocation(h, p) for h, p in _cluster_nodes(self.url)
            ],
            decode_responses=False,
            retry_policy=NoRetryPolicy(),
            stream_timeout=self.timeout,
            connect_timeout=self.timeout,
        )

    async def _serve(self, client: Any, sha: bytes | str) -> None:
        from coredis.exceptions import NoScriptError

        no_script = (NoScriptError, NoScript)

        while True:
            await self._wake.wait()
            if self.window:
                await trio.sleep(self.window)
            call, self._call, self._wake = self._call, _Call(), trio.Event()
            keys, args = self._arguments(call)
            started = time.perf_counter()
            try:
                with trio.move_on_after(self.timeout) as scope:
                    try:
                        reply = await client.evalsha(sha, keys, args)
                    except no_script:  # Redis restarted without us noticing
                        sha = await client.script_load(self._script)
                        reply = await client.evalsha(sha, keys, args)
                if scope.cancelled_caught:
                    raise trio.TooSlowError(f"no answer within {self.timeout:g} s")
            except BaseException as exc:
                self._failed(call, exc)
                raise
            finally:
                call.ended.set()
            self._observe(time.perf_counter() - started, call.ops)
            self._answer(call, reply)

    def _arguments(self, call: _Call) -> tuple[list[bytes], list[Any]]:
        # Releases and finishes are filled in now: they carry no waiter.
        section = call.sections[0]
        for (client, account, cq, aq), n in call.releases.items():
            section += (client, account, cq, aq, n)
        call.finishes[:0] = self._unsent_finishes
        self._unsent_finishes = []
        section = call.sections[3]
        for finish in call.finishes:
            section += finish
        head = [len(call.releases), len(call.finishes), len(call.groups), len(call.claims)]
        head += [len(call.polls), self.claim_ttl_ms, self.result_ttl_ms, self.node]
        released, charged, claimed, finished, polled = call.sections
        # What was given back and stored comes first: it was queued before, or together
        # with, the charges and claims that may depend on it.
        return [_PREFIX], head + released + finished + charged + claimed + polled

    def _answer(self, call: _Call, reply: Sequence[Any]) -> None:
        at = 0
        for done, client, accounts, counts in call.groups:
            verdicts: Verdicts = list(zip(counts, repeat(None)))
            refused = reply[at]
            at += 1
            for _ in range(refused):  # only accounts refused something come back
                k, granted, who, kind, limit, ms = reply[at : at + 6]
                at += 6
                name = accounts[k] if who == 2 else None
                verdicts[k] = (granted, quota_refusal(client, name, kind, limit, ms / 1000))
            _call_back(done, verdicts)
        for slots in (call.claims, call.polls):
            for slot in slots:
                state, kid, hc1 = reply[at : at + 3]
                at += 3
                result = ItemResult(hc1=hc1.decode(), kid=kid) if state == Claim.DONE else None
                slot.set((state, result))

    def _failed(self, call: _Call, exc: BaseException) -> None:
        """Everything *call* carried failed: waiters learn it, results wait for the next
        call, released units are lost (counted too much, never too little)."""
        error = StateUnavailable(self._unavailable(exc))
        for done, *_ in call.groups:
            _call_back(done, error)
        for slot in (*call.claims, *call.polls):
            slot.set(error)
        self._unsent_finishes.extend(call.finishes)
        # A claim whose call failed may still have been applied (a call that timed out
        # can run in Redis later): drop it with the next call that works, or the retries
        # would wait for it until --state-claim-ttl. Only our own claim goes (the script
        # checks the node), never another engine's claim of the same item.
        claims = call.sections[2]
        for i in range(0, len(claims), 4):
            self._unsent_finishes.append((*claims[i : i + 4], 0, b"", b""))
        del self._unsent_finishes[:-MAX_UNSENT]
        if call.releases and self.metrics is not None:
            self.metrics.state_lost_releases.inc(sum(call.releases.values()))

    def _fail_queued(self) -> None:
        call, self._call, self._wake = self._call, _Call(), trio.Event()
        self._failed(call, RuntimeError(self.problem or "not connected"))
        call.ended.set()

    def _queued(self, ops: int) -> None:
        self._call.ops += ops
        self._wake.set()

    def _up(self) -> None:
        if self.problem is not None:
            LOGGER.warning("shared state at %s answers: quotas and keys are shared", self.url)
        self.problem = None
        if self.metrics is not None:
            self.metrics.state_up.set(1)
        if self._unsent_finishes:
            self._wake.set()  # what failed meanwhile goes now, not with the next request

    def _down(self, exc: BaseException) -> None:
        why = _why(exc)
        if self.problem is None or self.problem == "not connected yet":
            LOGGER.error("shared state at %s unusable (%s): failing closed", self.url, why)
        self.problem = why
        if self.metrics is not None:
            self.metrics.state_up.set(0)
            self.metrics.state_errors.labels(_why(exc).partition(":")[0]).inc()

    def _unavailable(self, exc: BaseException | None = None) -> str:
        why = _why(exc) if exc is not None else self.problem
        return f"the shared quota and idempotency store is unavailable ({why}); retry"

    def _observe(self, seconds: float, ops: int) -> None:
        if self.metrics is not None:
            self.metrics.state_call.observe(seconds)
            self.metrics.state_ops.observe(ops)


def _key_bytes(item: SignItem) -> bytes:
    # A text key and a byte-string key with the same bytes are the same key (SPEC.md §10).
    key = item.idempotency_key
    return key.encode() if isinstance(key, str) else bytes(key or b"")


def _u32(values: Any) -> bytes:
    """Little-endian u32s (the script reads them with struct.unpack('<I4'))."""
    packed = array("I", values)
    if sys.byteorder != "little":  # pragma: no cover - the engine runs on x86-64 and arm64
        packed.byteswap()
    return packed.tobytes()


def _why(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # coredis's task groups wrap the error that matters
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def _call_back(done: Callable[[Any], None], value: Any) -> None:
    try:
        done(value)
    except Exception:  # a bug in a caller must not stop every other engine request
        LOGGER.exception("a shared-state callback failed")
