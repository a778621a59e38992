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

Items of one request that share kid, account and operator go to keyd as one batch.
An idempotency key makes a retry return the first result instead of a second signature.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import trio

from . import native
from .chain import DEFAULT_BACKDATE, Issuer, SignerKey, _max_payload, _nfc, claims_prefix
from .dcc import DCCValidationError, validate
from .dsc import DSC
from .errors import KeyProblem
from .keyd_client import KeydError
from .policy import PolicyFile, QuotaTracker, Refusal
from .protocol.codes import ErrorCode
from .protocol.keyd import RETRYABLE as KEYD_RETRYABLE
from .protocol.keyd import ItemError
from .protocol.wire import ItemResult, SignItem
from .valuesets import ValueSets

__all__ = ["DEFAULT_VALIDITY_DAYS", "Dispatcher", "IdempotencyCache"]

DEFAULT_VALIDITY_DAYS = 365
_REFUSAL_CODES = {
    "CLIENT_UNKNOWN": ErrorCode.UNAUTHENTICATED,
    "CLIENT_DISABLED": ErrorCode.CLIENT_DISABLED,
    "KID_NOT_ALLOWED": ErrorCode.KID_NOT_ALLOWED,
    "TYPE_NOT_ALLOWED": ErrorCode.TYPE_NOT_ALLOWED,
    "COUNTRY_NOT_ALLOWED": ErrorCode.COUNTRY_NOT_ALLOWED,
    "ISSUER_NOT_ALLOWED": ErrorCode.ISSUER_NOT_ALLOWED,
    "QUOTA_CLIENT": ErrorCode.QUOTA_CLIENT,
    "QUOTA_ACCOUNT": ErrorCode.QUOTA_ACCOUNT,
}


def _failure(code: ErrorCode, message: str, retry_after_s: float | None = None) -> ItemResult:
    retry = None if retry_after_s is None else max(1, int(retry_after_s * 1000))
    return ItemResult(error=code, message=message, retry_after_ms=retry)


def _refused(refusal: Refusal) -> ItemResult:
    return _failure(_REFUSAL_CODES[refusal.code], refusal.message, refusal.retry_after_s)


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
        self._entries: collections.OrderedDict[tuple[str, str, bytes], list[Any]] = (
            collections.OrderedDict()
        )

    @staticmethod
    def fingerprint(item: SignItem) -> bytes:
        body = cbor2.dumps([item.dcc, item.account, item.operator, item.kid, item.validity_days])
        return hashlib.sha256(body).digest()

    def lookup(self, client: str, item: SignItem) -> tuple[str, Any]:
        """("new", None) -- the caller must :meth:`finish`; ("done", result);
        ("wait", event); or ("conflict", None)."""
        key = (client, item.account, _key_bytes(item.idempotency_key))
        entry = self._entries.get(key)
        now = self.clock()
        if entry is not None and now - entry[3] > self.ttl:
            del self._entries[key]
            entry = None
        if entry is None:
            self._entries[key] = [self.fingerprint(item), None, trio.Event(), now]
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return "new", None
        if entry[0] != self.fingerprint(item):
            return "conflict", None
        if entry[1] is not None:
            return "done", entry[1]
        return "wait", entry[2]

    def finish(self, client: str, item: SignItem, result: ItemResult) -> None:
        key = (client, item.account, _key_bytes(item.idempotency_key))
        entry = self._entries.get(key)
        if entry is None:
            return
        if result.ok:
            entry[1] = result
        else:
            del self._entries[key]
        entry[2].set()

    def result(self, client: str, item: SignItem) -> ItemResult | None:
        entry = self._entries.get((client, item.account, _key_bytes(item.idempotency_key)))
        return None if entry is None else entry[1]


def _key_bytes(key: bytes | str | None) -> bytes:
    return key.encode() if isinstance(key, str) else (key or b"")


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
        keyd: a connected :class:`~dccsign.keyd_trio.TrioKeydClient` (or anything with its
            ``sign`` coroutine).
        dscs: the DSCs of the keys keyd holds, with their states (refresh with
            :meth:`set_keys`).
        policy: the reloadable policy file.
        quotas: the quota tracker (state survives policy reloads).
        issuer_country: the ``iss`` claim; default each DSC's subject country.
    """

    def __init__(
        self,
        keyd: Any,
        keys: Sequence[tuple[DSC, str]],
        policy: PolicyFile,
        quotas: QuotaTracker,
        *,
        issuer_country: str | None = None,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        zlib_level: int = 9,
        valuesets: ValueSets | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keyd = keyd
        self.policy = policy
        self.quotas = quotas
        self.zlib_level = zlib_level
        self.valuesets = valuesets or ValueSets.builtin()
        self.clock = clock
        self.idempotency = IdempotencyCache()
        self._issuer = Issuer(
            [],
            backdate=backdate,
            zlib_level=zlib_level,
            issuer_country=issuer_country,
            valuesets=self.valuesets,
            clock=clock,
        )
        self.set_keys(keys)

    def set_keys(self, keys: Sequence[tuple[DSC, str]]) -> None:
        """Replace the known keys (kid, DSC, state), e.g. after keyd reported a change."""
        self._issuer.keys = [SignerKey(dsc, None, state) for dsc, state in keys]

    @property
    def keys(self) -> list[SignerKey]:
        return list(self._issuer.keys)

    async def sign(self, client: str, items: Sequence[SignItem]) -> list[ItemResult]:
        """One result per item, in order. Never raises for anything an item contains."""
        results: list[ItemResult | None] = [None] * len(items)
        fresh: list[int] = []
        waits: list[tuple[int, trio.Event]] = []
        for i, item in enumerate(items):
            if item.idempotency_key is None:
                fresh.append(i)
                continue
            state, value = self.idempotency.lookup(client, item)
            if state == "new":
                fresh.append(i)
            elif state == "done":
                results[i] = value
            elif state == "wait":
                waits.append((i, value))
            else:
                results[i] = _failure(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "this idempotency key was used for a different request",
                )
        if fresh:
            done = await self._sign_fresh(client, [items[i] for i in fresh])
            for i, result in zip(fresh, done, strict=True):
                results[i] = result
                if items[i].idempotency_key is not None:
                    self.idempotency.finish(client, items[i], result)
        for i, event in waits:
            await event.wait()
            first = self.idempotency.result(client, items[i])
            results[i] = first or _failure(
                ErrorCode.INTERNAL, "the first attempt failed; retry", retry_after_s=0.1
            )
        return results  # type: ignore[return-value]

    async def _sign_fresh(self, client: str, items: Sequence[SignItem]) -> list[ItemResult]:
        policy = self.policy.current()
        now = self.clock()
        results: list[ItemResult | None] = [None] * len(items)
        groups: dict[tuple[bytes, str, str | None], list[_Prepared]] = {}
        for i, item in enumerate(items):
            outcome = self._prepare(policy, client, i, item, now)
            if isinstance(outcome, ItemResult):
                results[i] = outcome
                continue
            refusal = self.quotas.try_reserve(policy, client, item.account, 1)
            if refusal is not None:
                results[i] = _refused(refusal)
                continue
            groups.setdefault((outcome.key.dsc.kid, item.account, item.operator), []).append(
                outcome
            )

        async def run(group: list[_Prepared]) -> None:
            for index, result in zip(
                (p.index for p in group), await self._keyd_group(client, group), strict=True
            ):
                results[index] = result

        if len(groups) == 1:
            await run(next(iter(groups.values())))
        elif groups:
            async with trio.open_nursery() as nursery:
                for group in groups.values():
                    nursery.start_soon(run, group)
        return results  # type: ignore[return-value]

    def _prepare(
        self, policy: Any, client: str, index: int, item: SignItem, now: float
    ) -> _Prepared | ItemResult:
        dcc = _nfc(item.dcc) if isinstance(item.dcc, dict) else item.dcc
        try:
            dcc_type = validate(dcc, valuesets=self.valuesets)
        except DCCValidationError as exc:
            first = exc.issues[0]
            more = f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
            return _failure(
                ErrorCode.INVALID_DCC, f"{first.path} [{first.rule}] {first.message}{more}"
            )
        try:
            key = self._issuer.key_for(dcc_type, item.kid)
        except KeyProblem as exc:
            return _failure(ErrorCode.NO_KEY, str(exc))
        refusal = policy.check(client, key.dsc.kid, dcc_type, dcc)
        if refusal is not None:
            return _refused(refusal)
        days = item.validity_days or DEFAULT_VALIDITY_DAYS
        try:
            iat, exp = self._issuer.times_for(key.dsc, dt.timedelta(days=days), now)
        except KeyProblem as exc:
            return _failure(ErrorCode.NO_KEY, str(exc))
        iss = self._issuer.issuer_country or key.dsc.country
        if iss is None:
            return _failure(ErrorCode.NO_KEY, "the DSC names no country; configure one")
        payload = claims_prefix(iss, iat, exp) + cbor2.dumps(dcc)
        if len(payload) > _max_payload(key.dsc.alg):
            return _failure(
                ErrorCode.TOO_LARGE_FOR_QR,
                f"the signed certificate would not fit a QR code ({len(payload)}-byte payload)",
            )
        return _Prepared(index, key, payload, item.account, item.operator)

    async def _keyd_group(self, client: str, group: list[_Prepared]) -> list[ItemResult]:
        key, account, operator = group[0].key, group[0].account, group[0].operator
        payloads = [p.payload for p in group]
        try:
            signed = await self.keyd.sign(
                key.dsc.kid, payloads, client=client, account=account, operator=operator
            )
        except KeydError as exc:
            self.quotas.release(client, account, len(group))
            code = ErrorCode.KEYD_UNAVAILABLE if exc.retryable else ErrorCode.INTERNAL
            return [_failure(code, str(exc), retry_after_s=0.5)] * len(group)
        out: list[ItemResult | None] = [None] * len(group)
        ok = [i for i, s in enumerate(signed) if isinstance(s, bytes)]
        for i, s in enumerate(signed):
            if not isinstance(s, bytes):
                self.quotas.release(client, account, 1)
                code, reason = s
                retryable = code in KEYD_RETRYABLE
                out[i] = _failure(
                    ErrorCode.KEYD_UNAVAILABLE if retryable else ErrorCode.KEYD_REFUSED,
                    f"keyd refused ({ItemError(code).name}): {reason}",
                    retry_after_s=1.0 if retryable else None,
                )
        if ok:
            texts = await trio.to_thread.run_sync(
                native.hc1_encode,
                key.protected,
                [payloads[i] for i in ok],
                [signed[i] for i in ok],
                self.zlib_level,
            )
            for i, text in zip(ok, texts, strict=True):
                out[i] = ItemResult(hc1=text, kid=key.dsc.kid)
        return out  # type: ignore[return-value]
