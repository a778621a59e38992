"""The engine's issuing path for portal requests: policy, validation, claims, quotas, keyd,
then COSE/zlib/base45 -- with one result per item, never an exception per item.

Order of the checks (each refusal leaves nothing behind: not signed, not audited as issued,
not counted against a quota):

1. the DCC is valid (the same validator as ``dccsign sign``) and NFC-normalised;
2. a key: the requested kid, or the key whose DSC allows the DCC's type;
3. the client's policy allows that kid, type, country and issuer (kill switch included);
4. claims: ``iat`` = now - backdate, ``exp`` clamped to the DSC, ``iss`` the DSC's country;
   the HC1 string must fit a QR code;
5. quotas (client and end-user account) are reserved; keyd then re-checks, signs and audits;
   items keyd refuses give their reservation back.

Items of one request that share kid, account and operator form one part, and a request's
parts for one kid go to the :class:`~dccsign.server.batcher.KeydBatcher` together; it sends the
parts of many requests (and connections) to keyd in one message and builds the HC1 strings.
An idempotency key makes a retry return the first result instead of a second signature.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import enum
import hashlib
import operator
import pickle
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, compress, repeat
from operator import itemgetter
from typing import Any

import cbor2
import trio
import trio.lowlevel

from .. import native
from ..dcc.dsc import DSC
from ..dcc.issuer import DEFAULT_BACKDATE, Claims, SignerKey, nfc_names
from ..dcc.validate import DCCValidationError, validate
from ..dcc.valuesets import ValueSets
from ..errors import KeyProblem
from ..keyd.client import KeydError
from ..native import layout as W
from ..protocol.codes import ErrorCode
from ..protocol.keyd import KeydColumns
from ..protocol.wire import ItemResult, SignItem
from . import dataplane
from .batcher import KeydBatcher
from .offload import encode_reply_soon
from .outcomes import failure, keyd_failure, refused
from .policy import PolicyFile, QuotaTracker
from .sharedstate import Claim, RedisState, StateUnavailable, Verdicts

__all__ = ["DEFAULT_VALIDITY_DAYS", "Dispatcher", "IdempotencyCache"]

DEFAULT_VALIDITY_DAYS = 365
#: Items prepared between two yields to the event loop, and requests of one client prepared
#: at once (see Dispatcher._sign_fresh).
PREPARE_SLICE = 32
PREPARE_TURNS = 2
#: Policy verdicts kept per policy object (Dispatcher._plain_allowed), at most.
_ALLOWED_MEMO = 4096


class Seen(enum.Enum):
    """What :meth:`IdempotencyCache.lookup` found for an item's idempotency key."""

    NEW = "new"
    DONE = "done"
    IN_PROGRESS = "in progress"
    CONFLICT = "conflict"


@dataclasses.dataclass(slots=True)
class _Entry:
    """One idempotency key's first attempt."""

    fingerprint: bytes  # of the item it was used for (IdempotencyCache.fingerprint)
    result: ItemResult | None  # its success, once there is one
    ended: trio.Event  # set when the first attempt ends, however
    since: float  # when the key was first seen (the clock's time)


class IdempotencyCache:
    """First results by (client, idempotency key), bounded in size and age.

    Keys are scoped to (client, account), as protocol/SPEC.md says. A retry with the same key
    and the same item gets the first result; with the same key and a different item,
    IDEMPOTENCY_CONFLICT. A retry that arrives while the first is still in progress waits for
    it. Only successes are kept: after a failure the retry runs again.
    """

    def __init__(self, capacity: int = 200_000, ttl: float = 24 * 3600.0, clock=time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        self._entries: collections.OrderedDict[tuple[str, str, bytes], _Entry] = (
            collections.OrderedDict()
        )

    @staticmethod
    def fingerprint(item: SignItem) -> bytes:
        """A digest of what the item asks for. It only has to be stable within this process
        (the cache is in memory): a retry decodes from the same bytes into the same values in
        the same order. pickle costs about half of what CBOR does here (measured when this
        was written; bench/README.md keeps the numbers)."""
        asked = (item.dcc, item.account, item.operator, item.kid, item.validity_days)
        try:
            body = pickle.dumps(asked, 5)
        except (TypeError, pickle.PicklingError):
            # CBOR values that pickle refuses (cbor2's CBORSimpleValue, undefined) are no JSON
            # (the DCC fails validation later); their repr is as stable within the process.
            body = repr(asked).encode()
        return hashlib.sha256(body).digest()

    def lookup(self, client: str, item: SignItem) -> tuple[Seen, Any]:
        """What a keyed item is to the cache: ``(Seen.NEW, None)`` -- the caller signs it and
        must :meth:`finish`; ``(Seen.DONE, result)``; ``(Seen.IN_PROGRESS, event)`` -- set
        when the first attempt ends; or ``(Seen.CONFLICT, None)``: the key was used for a
        different item."""
        key = (client, item.account, _key_bytes(item.idempotency_key))
        entry = self._entries.get(key)
        now = self.clock()
        if entry is not None and now - entry.since > self.ttl:
            del self._entries[key]
            entry = None
        if entry is None:
            self._entries[key] = _Entry(self.fingerprint(item), None, trio.Event(), now)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return Seen.NEW, None
        if entry.fingerprint != self.fingerprint(item):
            return Seen.CONFLICT, None
        if entry.result is not None:
            return Seen.DONE, entry.result
        return Seen.IN_PROGRESS, entry.ended

    def finish(self, client: str, item: SignItem, result: ItemResult) -> None:
        key = (client, item.account, _key_bytes(item.idempotency_key))
        entry = self._entries.get(key)
        if entry is None:
            return
        if result.ok:
            entry.result = result
        else:
            del self._entries[key]
        entry.ended.set()

    def result(self, client: str, item: SignItem) -> ItemResult | None:
        entry = self._entries.get((client, item.account, _key_bytes(item.idempotency_key)))
        return None if entry is None else entry.result


def _key_bytes(key: bytes | str | None) -> bytes:
    return key.encode() if isinstance(key, str) else (key or b"")


#: What :meth:`Dispatcher._signing` works out once per request for each (type, kid, days).
_Signing = tuple[SignerKey | None, tuple[bytes, int] | ItemResult]


@dataclass
class _Prepared:
    index: int
    key: SignerKey
    payload: bytes
    account: str
    operator: str | None


class Dispatcher:
    """Turns the items of portal requests into results (see the module docstring).

    Args:
        batcher: the running :class:`~dccsign.server.batcher.KeydBatcher` in front of keyd
            (it also builds the HC1 strings, at its zlib level).
        dscs: the DSCs of the keys keyd holds, with their states (refresh with
            :meth:`set_keys`).
        policy: the reloadable policy file.
        quotas: the quota tracker (state survives policy reloads).
        shared: the store shared by the engines of a deployment (``--state``), or None:
            quotas and idempotency keys in this process.
        issuer_country: the ``iss`` claim; default each DSC's subject country.
        on_stage: called as ``on_stage("prepare", seconds)`` once per request with the time
            its items took to check and prepare (metrics).
    """

    def __init__(
        self,
        batcher: KeydBatcher,
        keys: Sequence[tuple[DSC, str]],
        policy: PolicyFile,
        quotas: QuotaTracker,
        *,
        issuer_country: str | None = None,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        valuesets: ValueSets | None = None,
        clock: Callable[[], float] = time.time,
        on_stage: Callable[[str, float], None] | None = None,
        shared: RedisState | None = None,
    ) -> None:
        self.batcher = batcher
        self._on_stage = on_stage
        self.policy = policy
        self.quotas = quotas
        #: With ``--state``: quotas and idempotency keys live there, not in *quotas* and
        #: :attr:`idempotency` (see sharedstate.py).
        self.shared = shared
        self.valuesets = valuesets or ValueSets.builtin()
        self._rules = native.DccRules(self.valuesets)  # the native validator's tables
        self.clock = clock
        self.idempotency = IdempotencyCache()
        self._turns: dict[str, trio.Semaphore] = {}
        # The claims around each DCC: the same rules as ``dccsign sign`` (dcc.issuer.Claims).
        self._claims = Claims([], backdate=backdate, issuer_country=issuer_country)
        self.set_keys(keys)

    def set_keys(self, keys: Sequence[tuple[DSC, str]]) -> None:
        """Replace the known keys (kid, DSC, state), e.g. after keyd reported a change."""
        self._claims.keys = [SignerKey(dsc, None, state) for dsc, state in keys]
        # worked out from the old keys: forget it
        self._frame_signing: tuple[int | None, dict[str, _Signing]] = (None, {})
        self._allowed: tuple[object, dict[tuple[str, bytes, str], ItemResult | None]] = (
            None, {},
        )  # fmt: skip

    @property
    def keys(self) -> list[SignerKey]:
        return list(self._claims.keys)

    async def sign(
        self, client: str, items: Sequence[SignItem], types: list[str] | None = None
    ) -> list[ItemResult]:
        """One result per item, in order. Never raises for anything an item contains.

        Given *types* (a list of ``len(items)``), each item's DCC type ("v", "t", "r") is
        stored there, or "" where the DCC was not examined (invalid, or a repeated
        idempotency key) -- for the metrics.
        """
        if types is None:
            types = [""] * len(items)
        if self.shared is not None:
            return await self._sign_shared_keys(client, items, types)
        results: list[ItemResult | None] = [None] * len(items)
        fresh: list[int] = []
        waits: list[tuple[int, trio.Event]] = []
        for i, item in enumerate(items):
            if item.idempotency_key is None:
                fresh.append(i)
                continue
            state, value = self.idempotency.lookup(client, item)
            if state is Seen.NEW:
                fresh.append(i)
            elif state is Seen.DONE:
                results[i] = value
            elif state is Seen.IN_PROGRESS:
                waits.append((i, value))
            else:
                results[i] = failure(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "this idempotency key was used for a different request",
                )
        if fresh:
            fresh_types = [""] * len(fresh)
            done = await self._sign_fresh(client, [items[i] for i in fresh], fresh_types)
            for i, result, dcc_type in zip(fresh, done, fresh_types, strict=True):
                results[i] = result
                types[i] = dcc_type
                if items[i].idempotency_key is not None:
                    self.idempotency.finish(client, items[i], result)
        for i, event in waits:
            await event.wait()
            first = self.idempotency.result(client, items[i])
            results[i] = first or failure(
                ErrorCode.INTERNAL, "the first attempt failed; retry", retry_after_s=0.1
            )
        return results  # type: ignore[return-value]

    async def sign_view(
        self, client: str, view: Any, types: list[str] | None = None, *, single: bool = False
    ) -> list[ItemResult] | dataplane.FrameReply:
        """The reply to a frame walked by :func:`dccsign.native.walk_sign_batch`.

        A plain frame (:func:`dataplane.plain`: no item asks for a kid or validity of its own)
        is handled per frame, per DCC type, per distinct account and per kid. Without
        idempotency keys it is answered with its encoded reply body
        (:class:`dataplane.FrameReply`, built by ``native.encode_sign_batch_result``); with
        keys, each keyed item is looked up in the idempotency cache first (Python per keyed
        item: repeats are answered from the cache, conflicts refused, the new ones signed with
        the rest) and the reply is one :class:`ItemResult` per item. Any other frame goes
        item by item (:meth:`sign`). Both give the same result for every item. *single*: the
        frame is a SIGN (its reply a SIGN_RESULT). Never raises for anything an item holds.
        """
        cols = dataplane.columns_of(view)
        if not dataplane.plain(view, cols):
            return await self.sign(client, view.sign_items(), types)
        keyed = dataplane.keyed_rows(view, cols)
        if keyed and self.shared is not None:
            return await self._sign_view_shared_keys(client, view, cols, keyed, types)
        answered: dict[int, ItemResult] = {}  # from the cache, or refused as a conflict
        waits: list[tuple[int, trio.Event, SignItem]] = []
        fresh: dict[int, SignItem] = {}
        for i in keyed:
            item = _item_of(view, i)
            state, value = self.idempotency.lookup(client, item)
            if state is Seen.NEW:
                fresh[i] = item
            elif state is Seen.DONE:
                answered[i] = value
            elif state is Seen.IN_PROGRESS:
                waits.append((i, value, item))
            else:
                answered[i] = failure(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "this idempotency key was used for a different request",
                )
        try:
            skip = set(answered).union(i for i, _e, _it in waits)
            frame = await self._frame(client, view, cols, skip)
            if not keyed:
                reply = await frame.encode(self.batcher.zlib_level, single)
                if types is not None:
                    types[:] = frame.rows.types
                return reply
            results = await frame.results(self.batcher.zlib_level)
        except BaseException:
            # No key may stay "in progress" for ever: its retries would wait for nothing.
            failed = failure(ErrorCode.INTERNAL, "internal error", retry_after_s=0.1)
            for item in fresh.values():
                self.idempotency.finish(client, item, failed)
            raise
        for i, item in fresh.items():
            self.idempotency.finish(client, item, results[i])
        for i, result in answered.items():
            results[i] = result
        for i, event, item in waits:
            await event.wait()
            first = self.idempotency.result(client, item)
            results[i] = first or failure(
                ErrorCode.INTERNAL, "the first attempt failed; retry", retry_after_s=0.1
            )
        if types is not None:
            types[:] = frame.rows.types
        return results

    async def _sign_shared_keys(
        self, client: str, items: Sequence[SignItem], types: list[str]
    ) -> list[ItemResult]:
        """:meth:`sign` with the idempotency keys in the shared store."""
        keyed = {i: item for i, item in enumerate(items) if item.idempotency_key is not None}
        answered, claimed, waits = await self._claim_keys(client, keyed)
        fresh = [i for i in range(len(items)) if i not in keyed or i in claimed]
        results: list[ItemResult | None] = [None] * len(items)
        if fresh:
            fresh_types = [""] * len(fresh)
            try:
                done = await self._sign_fresh(client, [items[i] for i in fresh], fresh_types)
            except BaseException:
                self._abandon(client, claimed)
                raise
            for i, result, dcc_type in zip(fresh, done, fresh_types, strict=True):
                results[i] = result
                types[i] = dcc_type
        await self._settle_keys(client, results, answered, claimed, waits)
        return results  # type: ignore[return-value]

    async def _sign_view_shared_keys(
        self, client: str, view: Any, cols: array, keyed: Any, types: list[str] | None
    ) -> list[ItemResult]:
        """:meth:`sign_view` for a plain frame with keyed items, the keys in the shared
        store."""
        answered, claimed, waits = await self._claim_keys(
            client, {i: _item_of(view, i) for i in keyed}
        )
        skip = set(answered).union(i for i, _item, _fp in waits)
        try:
            frame = await self._frame(client, view, cols, skip)
            results: list[ItemResult | None] = await frame.results(self.batcher.zlib_level)
        except BaseException:
            self._abandon(client, claimed)
            raise
        await self._settle_keys(client, results, answered, claimed, waits)
        if types is not None:
            types[:] = frame.rows.types
        return results  # type: ignore[return-value]

    async def _claim_keys(
        self, client: str, keyed: dict[int, SignItem]
    ) -> tuple[
        dict[int, ItemResult], dict[int, tuple[SignItem, bytes]], list[tuple[int, SignItem, bytes]]
    ]:
        """Claim the keys of the *keyed* items in the shared store: the items answered
        already (stored results, conflicts; all of them when the store is unavailable),
        those this engine signs (with their fingerprints) and those in progress elsewhere."""
        assert self.shared is not None
        answered: dict[int, ItemResult] = {}
        claimed: dict[int, tuple[SignItem, bytes]] = {}
        waits: list[tuple[int, SignItem, bytes]] = []
        pairs = [(item, IdempotencyCache.fingerprint(item)) for item in keyed.values()]
        try:
            states = await self.shared.claim(client, pairs)
        except StateUnavailable as exc:
            unavailable = failure(ErrorCode.STATE_UNAVAILABLE, str(exc), retry_after_s=0.5)
            return dict.fromkeys(keyed, unavailable), claimed, waits
        for i, (item, fp), (state, stored) in zip(keyed, pairs, states, strict=True):
            if state == Claim.NEW:
                claimed[i] = (item, fp)
            elif state == Claim.DONE:
                answered[i] = stored
            elif state == Claim.IN_PROGRESS:
                waits.append((i, item, fp))
            else:
                answered[i] = failure(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "this idempotency key was used for a different request",
                )
        return answered, claimed, waits

    async def _settle_keys(
        self,
        client: str,
        results: list[ItemResult | None],
        answered: dict[int, ItemResult],
        claimed: dict[int, tuple[SignItem, bytes]],
        waits: list[tuple[int, SignItem, bytes]],
    ) -> None:
        """Store the results of the claimed keys (before the reply leaves), fill in the
        answered items and wait for those in progress elsewhere."""
        assert self.shared is not None
        await self.shared.finish(
            client,
            [(item, fp, results[i]) for i, (item, fp) in claimed.items()],  # type: ignore[misc]
        )
        for i, result in answered.items():
            results[i] = result
        for i, item, fp in waits:
            try:
                first = await self.shared.wait_for(client, item, fp)
            except StateUnavailable as exc:
                results[i] = failure(ErrorCode.STATE_UNAVAILABLE, str(exc), retry_after_s=0.5)
                continue
            results[i] = first or failure(
                ErrorCode.BUSY,
                "the first attempt with this idempotency key failed or is still in progress; retry",
                retry_after_s=0.5,
            )

    def _abandon(self, client: str, claimed: dict[int, tuple[SignItem, bytes]]) -> None:
        """No claimed key may stay "in progress" until it expires: its retries would wait."""
        assert self.shared is not None
        failed = failure(ErrorCode.INTERNAL, "internal error", retry_after_s=0.1)
        self.shared.finish_soon(client, [(item, fp, failed) for item, fp in claimed.values()])

    def sign_frame_soon(
        self,
        client: str,
        view: Any,
        single: bool,
        done: Callable[[dataplane.FrameReply | Exception], None],
    ) -> bool:
        """:meth:`sign_view` for a plain frame without idempotency keys, with no task
        waiting: False (nothing done) for any other frame; else True, and ``done(reply)``
        runs once on the event loop's thread with the frame's :class:`dataplane.FrameReply`
        -- from keyd's answer and the reply pool, or inside this call when nothing goes to
        keyd or the reply is small -- or ``done(exception)`` for an unexpected failure (a
        bug: the caller answers INTERNAL). *done* must not raise.

        Same results, same quota and keyd effects as :meth:`sign_view`; what it saves is
        the request's task: its spawn and its three wake-ups (keyd's answer, the reply
        body, the end) per frame.
        """
        cols = dataplane.columns_of(view)
        if not dataplane.plain(view, cols) or len(dataplane.keyed_rows(view, cols)):
            return False
        try:
            started = trio.current_time()
            frame, policy = self._check_frame(client, view, cols, set())
            charges = self._account_charges(frame)
        except Exception as exc:
            done(exc)
            return True

        def charged(verdicts: Verdicts | StateUnavailable | None) -> None:
            try:
                self._apply_charges(client, frame, charges, verdicts)
                if self._on_stage is not None:
                    self._on_stage("prepare", trio.current_time() - started)
                live, batches, names_of = self._keyd_batches(client, frame)
            except Exception as exc:
                done(exc)
                return
            if not batches:
                self._encode_soon(frame, single, done)
                return

            def answered(outcomes: list[Any]) -> None:
                try:
                    self._keyd_answered(client, frame, live, batches, names_of, outcomes)
                except Exception as exc:
                    done(exc)
                    return
                self._encode_soon(frame, single, done)

            self.batcher.submit_columns(batches, answered)

        self._charge_soon(policy, client, charges, charged)
        return True

    def _encode_soon(
        self,
        frame: dataplane.Frame,
        single: bool,
        done: Callable[[dataplane.FrameReply | Exception], None],
    ) -> None:
        """*frame*'s reply to ``done``: encoded here when it signs few certificates, else
        in the native reply pool (``done`` then runs from its collector)."""

        def encoded(body: bytes | Exception) -> None:
            if not isinstance(body, Exception):
                try:
                    body = frame.reply(body, single)  # type: ignore[assignment]
                except Exception as exc:
                    body = exc
            done(body)  # type: ignore[arg-type]

        try:
            job, signed = frame.encode_job(self.batcher.zlib_level)
            if signed > dataplane.INLINE_ENCODE:
                encode_reply_soon(job, single, encoded)
                return
            body: bytes | Exception = native.encode_sign_batch_result(*job, single=single)
        except Exception as exc:
            body = exc
        encoded(body)

    async def _frame(self, client: str, view: Any, cols: array, skip: set[int]) -> Any:
        """A plain frame prepared and signed (everything but its reply); *skip*: items
        answered otherwise (from the idempotency cache), which are not signed."""
        # No turn to take (unlike _sign_fresh): preparing a frame is one synchronous call
        # (the per-item work is native, ~0.3 ms for 50 items), so it never holds the loop
        # for long and no other frame's preparation can interleave with it anyway.
        started = trio.current_time()
        frame, policy = self._check_frame(client, view, cols, skip)
        charges = self._account_charges(frame)
        verdicts: Verdicts | StateUnavailable | None = None
        if charges is not None:
            names, _rows, _index, counts = charges
            if self.shared is None:
                verdicts = self.quotas.try_reserve_many(policy, client, names, counts)
            else:
                try:
                    verdicts = await self.shared.charge(policy, client, names, counts)
                except StateUnavailable as exc:
                    verdicts = exc
        self._apply_charges(client, frame, charges, verdicts)
        if self._on_stage is not None:
            self._on_stage("prepare", trio.current_time() - started)
        if frame.kids:
            await self._keyd_frame(client, frame)
        return frame

    def _check_frame(
        self, client: str, view: Any, cols: array, skip: set[int]
    ) -> tuple[dataplane.Frame, Any]:
        """Everything before keyd but the quotas: validation, key, claims, policy and size;
        and the policy it applied. The rows in *skip* are left out (held as refusals until
        their answers replace them)."""
        policy = self.policy.current()
        now = self.clock()
        cp = policy.client(client)
        per_item_policy = cp is not None and (cp.countries is not None or cp.issuers is not None)
        frame = dataplane.Frame(
            view, dataplane.check_rows(view, cols, self._rules, decode=per_item_policy)
        )
        for i in skip:
            frame.rows.failures.pop(i, None)
            frame.rows.types[i] = ""
            frame.refuse(i, ErrorCode.INTERNAL, "answered from the idempotency cache")
        frame.retype()
        for i, message in frame.rows.failures.items():
            frame.refuse(i, ErrorCode.INVALID_DCC, message)
        for dcc_type in "vtr":
            group = frame.rows_of(dcc_type)
            if not group:
                continue
            key, claims = self._plain_signing(dcc_type, now)
            failure: ItemResult | None = None
            if key is None or isinstance(claims, ItemResult):
                failure = claims  # type: ignore[assignment]
            elif not per_item_policy:
                failure = self._plain_allowed(policy, client, key.dsc.kid, dcc_type)
            if failure is not None:
                frame.refuse_result(group, failure)
                continue
            assert key is not None
            if per_item_policy:
                kept = array("I")
                for i in group:
                    refusal = policy.check(client, key.dsc.kid, dcc_type, frame.rows.decoded[i])
                    if refusal is None:
                        kept.append(i)
                    else:
                        frame.refuse_result(array("I", [i]), refused(refusal))
                group = kept
            prefix, max_payload = claims  # type: ignore[misc]
            frame.add(key, prefix, max_payload, group)
        frame.splice()
        return frame, policy

    def _account_charges(self, frame: dataplane.Frame) -> _Charges | None:
        """What the frame's rows bound for keyd charge: the distinct accounts, the rows,
        each row's account number and each account's count; None when no row is bound."""
        rows = frame.bound_rows()
        if not rows:
            return None
        view = frame.view
        table, index = native.span_table(
            view.data, view.columns, W.NFIELDS, (W.ACCOUNT_OFF, W.ACCOUNT_LEN), rows
        )
        counts = collections.Counter(index)
        names = list(map(bytes.decode, table))
        return names, rows, index, list(map(counts.__getitem__, range(len(table))))

    def _charge_soon(
        self,
        policy: Any,
        client: str,
        charges: _Charges | None,
        then: Callable[[Verdicts | StateUnavailable | None], None],
    ) -> None:
        """Reserve *charges* (one reservation per distinct account; an account that cannot
        have all of its rows gets as many as fit, in order) and call ``then(verdicts)``:
        at once from the in-process tracker, later from the shared store."""
        if charges is None:
            then(None)
        elif self.shared is None:
            then(self.quotas.try_reserve_many(policy, client, charges[0], charges[3]))
        else:
            self.shared.charge_soon(policy, client, charges[0], charges[3], then)

    def _apply_charges(
        self,
        client: str,
        frame: dataplane.Frame,
        charges: _Charges | None,
        verdicts: Verdicts | StateUnavailable | None,
    ) -> None:
        """Refuse the rows *verdicts* did not grant (all of them when the store could not
        confirm the charge) and take them out of the frame's keyd batches."""
        if charges is None or verdicts is None:
            return
        _names, rows, index, _counts = charges
        if isinstance(verdicts, StateUnavailable):
            frame.refuse_result(
                rows, failure(ErrorCode.STATE_UNAVAILABLE, str(verdicts), retry_after_s=0.5)
            )
            frame.splice(drop=set(rows))
            return
        dropped: set[int] = set()
        # Only the accounts refused something are visited (found in C: no interpreter per
        # account of the frame).
        for k in compress(
            range(len(verdicts)), map(operator.is_not, map(itemgetter(1), verdicts), repeat(None))
        ):
            granted, refusal = verdicts[k]
            mine = array("I", (r for r, j in zip(rows, index, strict=True) if j == k))
            frame.refuse_result(mine[granted:], refused(refusal))
            dropped.update(mine[granted:])
        if dropped:
            frame.splice(drop=dropped)

    async def _keyd_frame(self, client: str, frame: dataplane.Frame) -> None:
        """Sign the frame's rows: one columnar batch per kid, all queued at once (they go to
        keyd together, in one SIGN_KIDS when the batcher sends them so)."""
        live, batches, names_of = self._keyd_batches(client, frame)
        if batches:
            outcomes = await self.batcher.issue_columns_many(batches)
            self._keyd_answered(client, frame, live, batches, names_of, outcomes)

    def _keyd_batches(
        self, client: str, frame: dataplane.Frame
    ) -> tuple[list[int], list[tuple[bytes, bytes, KeydColumns]], list[tuple[str, ...]]]:
        """The frame's keyd batches, one per kid with rows left: the kids' numbers, the
        ``(kid, protected, columns)`` batches and each batch's account names."""
        view = frame.view
        live = [k for k, kid_rows in enumerate(frame.kids) if kid_rows.rows]  # rows left
        batches = []
        names_of = []
        for k in live:
            kid_rows = frame.kids[k]
            rows = kid_rows.rows
            accounts, account_ix = native.span_table(
                view.data, view.columns, W.NFIELDS, (W.ACCOUNT_OFF, W.ACCOUNT_LEN), rows
            )
            operators, operator_ix = native.span_table(
                view.data,
                view.columns,
                W.NFIELDS,
                (W.OPERATOR_OFF, W.OPERATOR_LEN),
                rows,
                base=1,
                absent=0,
            )
            names = tuple(map(bytes.decode, accounts))
            columns = KeydColumns(
                kid_rows.spliced.data,
                kid_rows.ends,
                (client,),
                names,
                (None, *map(bytes.decode, operators)),
                array("I", bytes(4 * len(rows))),
                account_ix,
                operator_ix,
            )
            batches.append((kid_rows.key.dsc.kid, kid_rows.key.protected, columns))
            names_of.append(names)
        return live, batches, names_of

    def _keyd_answered(
        self,
        client: str,
        frame: dataplane.Frame,
        live: list[int],
        batches: list[tuple[bytes, bytes, KeydColumns]],
        names_of: list[tuple[str, ...]],
        outcomes: Sequence[Any],
    ) -> None:
        """keyd's *outcomes* (per batch: its answer or a KeydError) into the frame: signed
        rows recorded, refused ones given their result and their quota units back."""
        for at, (k, result) in enumerate(zip(live, outcomes, strict=True)):
            rows, names, account_ix = frame.kids[k].rows, names_of[at], batches[at][2].account_ix
            if isinstance(result, KeydError):
                for j, count in collections.Counter(account_ix).items():
                    self._release(client, names[j], count)
                code = ErrorCode.KEYD_UNAVAILABLE if result.retryable else ErrorCode.INTERNAL
                frame.refuse_result(rows, failure(code, str(result), retry_after_s=0.5))
                continue
            codes = result.codes
            if codes.count(0) != len(codes):  # keyd refused some: their quota units go back
                reasons = iter(result.reasons)
                for i, j, code in zip(rows, account_ix, codes, strict=True):
                    if code:
                        self._release(client, names[j], 1)
                        frame.refuse_result(array("I", [i]), keyd_failure((code, next(reasons))))
            frame.signed(k, array("I", compress(rows, map(operator.not_, codes))), result)

    async def _sign_fresh(
        self, client: str, items: Sequence[SignItem], types: list[str]
    ) -> list[ItemResult]:
        started = trio.current_time()
        results: list[ItemResult | None] = [None] * len(items)
        # Per kid, per (account, operator): the items keyd signs as one part.
        groups: dict[bytes, dict[tuple[str, str | None], list[_Prepared]]] = {}
        memo: dict[tuple[str, bytes | None, int], _Signing] = {}
        turns = self._turns.get(client)
        if turns is None:
            turns = self._turns[client] = trio.Semaphore(PREPARE_TURNS)
        # The event loop is shared: a portal that pipelines a hundred batches must not make
        # every other portal's request wait for all of them. Each client prepares at most
        # PREPARE_TURNS requests at a time, and yields every PREPARE_SLICE items.
        async with turns:
            policy = self.policy.current()
            now = self.clock()
            accounts: dict[str, list[_Prepared]] = {}
            for i, item in enumerate(items):
                if i and not i % PREPARE_SLICE:
                    await trio.lowlevel.checkpoint()
                outcome = self._prepare(policy, client, i, item, now, types, memo)
                if isinstance(outcome, ItemResult):
                    results[i] = outcome
                    continue
                accounts.setdefault(item.account, []).append(outcome)
            # Quotas are charged once per distinct account of the request, not once per item;
            # an account that cannot have all of its items gets as many as its quota still
            # allows, in order.
            names = list(accounts)
            verdicts = await self._charge(policy, client, names, [len(accounts[a]) for a in names])
            for account, verdict in zip(names, verdicts, strict=True):
                prepared = accounts[account]
                if isinstance(verdict, ItemResult):
                    granted, failed = 0, verdict
                else:
                    granted, refusal = verdict
                    failed = None if refusal is None else refused(refusal)
                for q in prepared[granted:]:
                    results[q.index] = failed
                for p in prepared[:granted]:
                    parts = groups.setdefault(p.key.dsc.kid, {})
                    parts.setdefault((account, p.operator), []).append(p)

        if self._on_stage is not None:
            self._on_stage("prepare", trio.current_time() - started)

        async def run(parts: list[list[_Prepared]]) -> None:
            done = await self._keyd_parts(client, parts)
            for index, result in zip((p.index for g in parts for p in g), done, strict=True):
                results[index] = result

        if len(groups) == 1:
            await run(list(next(iter(groups.values())).values()))
        elif groups:
            async with trio.open_nursery() as nursery:
                for parts in groups.values():
                    nursery.start_soon(run, list(parts.values()))
        return results  # type: ignore[return-value]

    async def _charge(
        self, policy: Any, client: str, accounts: list[str], counts: list[int]
    ) -> list[tuple[int, Any] | ItemResult]:
        """Per distinct account, as :meth:`QuotaTracker.try_reserve_many`: ``(granted,
        refusal)``; or, when the shared store could not confirm the charge, the failure
        every item of the account gets."""
        if self.shared is None:
            return self.quotas.try_reserve_many(policy, client, accounts, counts)  # type: ignore[return-value]
        try:
            return await self.shared.charge(policy, client, accounts, counts)  # type: ignore[return-value]
        except StateUnavailable as exc:
            unavailable = failure(ErrorCode.STATE_UNAVAILABLE, str(exc), retry_after_s=0.5)
            return [unavailable] * len(accounts)

    def _release(self, client: str, account: str, n: int) -> None:
        """Give back *n* units reserved for *account* that were not signed."""
        if self.shared is None:
            self.quotas.release(client, account, n)
        else:
            self.shared.release(self.policy.current(), client, account, n)

    def _prepare(
        self,
        policy: Any,
        client: str,
        index: int,
        item: SignItem,
        now: float,
        types: list[str],
        memo: dict[tuple[str, bytes | None, int], _Signing],
    ) -> _Prepared | ItemResult:
        dcc = nfc_names(item.dcc) if isinstance(item.dcc, dict) else item.dcc
        try:
            dcc_type = types[index] = validate(dcc, valuesets=self.valuesets)
        except DCCValidationError as exc:
            first = exc.issues[0]
            more = f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
            return failure(
                ErrorCode.INVALID_DCC, f"{first.path} [{first.rule}] {first.message}{more}"
            )
        # The key, the claims prefix and the size limit depend only on (type, kid, days) and
        # the time: worked out once per request for each combination, not once per item.
        days = item.validity_days or DEFAULT_VALIDITY_DAYS
        slot = (dcc_type, item.kid, days)
        signing = memo.get(slot)
        if signing is None:
            signing = memo[slot] = self._signing(dcc_type, item.kid, days, now)
        key, claims = signing
        if key is None:
            return claims  # type: ignore[return-value]
        refusal = policy.check(client, key.dsc.kid, dcc_type, dcc)
        if refusal is not None:
            return refused(refusal)
        if isinstance(claims, ItemResult):
            return claims
        prefix, max_payload = claims
        payload = prefix + cbor2.dumps(dcc)
        if len(payload) > max_payload:
            return failure(
                ErrorCode.TOO_LARGE_FOR_QR,
                f"the signed certificate would not fit a QR code ({len(payload)}-byte payload)",
            )
        return _Prepared(index, key, payload, item.account, item.operator)

    def _plain_signing(self, dcc_type: str, now: float) -> _Signing:
        """:meth:`_signing` for a plain frame's items of *dcc_type* (no kid asked for, the
        default validity), kept for the rest of the clock's second: everything it depends
        on besides the keys (which :meth:`set_keys` replaces, dropping it) changes at most
        once a second -- ``iat`` and ``exp`` are whole seconds of *now*."""
        second = int(now)
        at, known = self._frame_signing
        if at != second:
            known = {}
            self._frame_signing = (second, known)
        signing = known.get(dcc_type)
        if signing is None:
            signing = known[dcc_type] = self._signing(dcc_type, None, DEFAULT_VALIDITY_DAYS, now)
        return signing

    def _plain_allowed(
        self, policy: Any, client: str, kid: bytes, dcc_type: str
    ) -> ItemResult | None:
        """``policy.check`` without the DCC (a client without country or issuer lists), as
        the failure its items get, or None: kept while *policy* is the current one (a policy
        is immutable: a reload, a kill switch included, is a new object)."""
        memo_of, memo = self._allowed
        if memo_of is not policy:
            memo = {}
            self._allowed = (policy, memo)
        at = (client, kid, dcc_type)
        try:
            return memo[at]
        except KeyError:
            pass
        refusal = policy.check(client, kid, dcc_type, {})
        failure = None if refusal is None else refused(refusal)
        if len(memo) < _ALLOWED_MEMO:  # clients x kids x types of one policy: bounded anyway
            memo[at] = failure
        return failure

    def _signing(self, dcc_type: str, kid: bytes | None, days: int, now: float) -> _Signing:
        """For a DCC of *dcc_type* asking for *kid* and *days* of validity: the key and either
        (CWT claims prefix, largest payload) or the failure every such item gets; or
        (None, failure) when no key may sign it. The policy is checked between the two (a
        client that may not use the key learns that first)."""
        try:
            key = self._claims.key_for(dcc_type, kid)
        except KeyProblem as exc:
            return None, failure(ErrorCode.NO_KEY, str(exc))
        try:
            return key, self._claims.claims_for(key, dt.timedelta(days=days), now)
        except KeyProblem as exc:
            return key, failure(ErrorCode.NO_KEY, str(exc))

    async def _keyd_parts(self, client: str, parts: list[list[_Prepared]]) -> list[ItemResult]:
        """Sign the items of one kid, grouped in parts by (account, operator); results in
        the order of the parts' items. Items keyd refuses give their quota unit back."""
        key = parts[0][0].key
        kid = key.dsc.kid
        flat = [p for group in parts for p in group]
        payloads = [p.payload for p in flat]
        # Columns for keyd: one client, a table entry per part for the account and operator
        # (the operator table runs parallel to the accounts, so both use the part's number).
        groups = array("I", chain.from_iterable(repeat(k, len(g)) for k, g in enumerate(parts)))
        columns = KeydColumns(
            b"".join(payloads),
            array("I", accumulate(map(len, payloads))),
            (client,),
            tuple(g[0].account for g in parts),
            tuple(g[0].operator for g in parts),
            array("I", bytes(4 * len(flat))),
            groups,
            groups,
        )
        try:
            outcomes = await self.batcher.issue(kid, key.protected, columns)
        except KeydError as exc:
            for group in parts:
                self._release(client, group[0].account, len(group))
            code = ErrorCode.KEYD_UNAVAILABLE if exc.retryable else ErrorCode.INTERNAL
            return [failure(code, str(exc), retry_after_s=0.5)] * len(flat)
        out: list[ItemResult] = []
        for prepared, outcome in zip(flat, outcomes, strict=True):
            if isinstance(outcome, str):
                out.append(ItemResult(hc1=outcome, kid=kid))
                continue
            self._release(client, prepared.account, 1)
            out.append(keyd_failure(outcome))
        return out


#: What a frame's rows bound for keyd charge (Dispatcher._account_charges).
_Charges = tuple[list[str], array, array, list[int]]


def _item_of(view: Any, i: int) -> SignItem:
    """Item *i* of a walked frame as the codec would have decoded it (a keyed item: the
    idempotency cache compares what it asks for)."""
    dcc, account, operator, kid, validity, key = view.values(i)
    return SignItem(cbor2.loads(dcc), account, operator, kid, validity, key)
