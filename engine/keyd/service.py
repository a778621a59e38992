"""keyd: the isolated key process, the only holder of private keys.

keyd signs one thing: DCC CWT payloads that pass its own checks, for a named client and
end-user account, and only after their audit records are durable. It re-checks every payload
itself rather than trusting the engine (an engine can be compromised, or simply wrong):

* a well-formed CWT: one CBOR item, a map of exactly the claims 1 (iss, a country code),
  4 (exp) and 6 (iat) as integers, and -260 holding ``{1: DCC}``; the DCC holds exactly one
  of v, t, r with one entry and its UVCI (``native.cwt_facts`` states the exact shape);
* exp <= the DSC's notAfter, iat >= its notBefore, exp > iat, and iat not later than keyd's
  clock plus a small skew;
* the DCC type allowed by the DSC's extended key usage;
* the kid active, and the client allowed to use it (the key's optional ``clients`` list in the
  keystore metadata; without one, every client may);
* a payload short enough for its HC1 string to fit a QR code (``chain.max_payload``, the
  bound the issuer and the engine apply too);
* the DCC itself: the full validator (schema, value sets, dates, UVCI), as the issuer runs it.

Each refused payload gets an :class:`~dccsign.protocol.keyd.ItemError`; the others are signed.

The engine's micro-batch arrives as ``SIGN_COLUMNS`` (:meth:`Keyd.sign_columns`): payloads in
one buffer with end offsets and, per item, indices into string tables of clients, accounts
and operators. The checks above (``native.keyd_check_columns``), the audit lines
(``native.audit_issue_columns``, built from the string tables) and the commit run once per
message over the columns; Python runs per refused item (its reason), per item handed to the
signing key, and in the DCC validation (:meth:`Keyd._validate_columns`, the one place to
swap in a native batch validator). ``SIGN`` and ``SIGN_MANY`` become columns and take the
same path.
There is no operation that signs a digest, and none that exports a key.

The full DCC validation is keyd's default: an engine is not trusted to have validated (a
compromised one could otherwise have ``{"v":[{"ci":"x"}]}`` or bogus codes signed, and
verifiers would call them valid). ``validate_dcc=False`` (``dccsign keyd --no-validate-dcc``)
leaves only the structural checks above, for a deployment that trusts its issuing host with
the DCC content; that saves the validator's cost (Python, holding the GIL: measured in
bench/README.md). What no check can do is tell a fraudulent but valid DCC from a real one:
against an abused account, the controls are policy and quotas in front of keyd, and this
audit log.

Nonce pools (``nonce_pool=N``, ``dccsign keyd --nonce-pool N``): every active ES256 software
key gets a pool of N precomputed nonces (64 bytes each, mlock'ed where the memlock limit
allows, logged otherwise), kept full by its own native refill thread at SCHED_IDLE, and
spent by signing (see native/src/noncepool.h for the rules; DEFAULT_NONCE_POOL for the
sizing rule). A key that stops being active has its pool wiped at once; keyd wipes them all
when it stops. Token (PKCS#11) keys never have one: their nonces are the token's.

Audit before release: the signatures of a batch are computed, their records appended to the
audit log with one fsync (group commit), and only then returned. If the log cannot be
written, keyd refuses to sign (``AUDIT_UNAVAILABLE``) and says why, rather than sign unaudited;
the signatures of the failed batch are dropped. While stopped, keyd reopens the log by itself
(``AuditLog.reopen``: a torn tail is set aside as at start) when a request or a DESCRIBE
arrives, at most every AUDIT_RETRY_FIRST .. AUDIT_RETRY_MAX seconds (doubling); once that
works it records an ``audit-resumed`` key event and signs again. DESCRIBE reports the state
(``DescribeResult.audit``), so the engine can say it is not ready meanwhile.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate, compress, repeat
from pathlib import Path
from typing import Any, NamedTuple

from .. import native
from ..audit.errors import AuditError, AuditUnavailable
from ..audit.records import KeyEvent
from ..audit.writer import AuditLog
from ..dcc.dsc import DSC, TYPE_NAMES
from ..dcc.issuer import MAX_HC1_CHARS, max_payload
from ..dcc.validate import DCCValidationError, validate
from ..dcc.valuesets import ValueSets
from ..dcc.verify import loads_exact
from ..keys.keystore import Keystore
from ..keys.storage import JOURNAL, atomic_write, journal_events
from ..native import CwtFacts, Spans
from ..native.layout import unpack_facts
from ..process import name_this_thread
from ..protocol.keyd import (
    ColumnsResult,
    Describe,
    DescribeResult,
    Failure,
    ItemError,
    KeydColumns,
    KeydProtocolError,
    KeyFacts,
    KidsResult,
    PoolStatus,
    Signatures,
    SignColumns,
    SignKids,
    SignMany,
    SignPart,
    SignPayloads,
)

__all__ = [
    "DEFAULT_NONCE_POOL",
    "DEFAULT_SKEW",
    "Keyd",
    "LoadedKey",
    "check_payloads",
]

LOGGER = logging.getLogger("dccsign.keyd")

#: How far in the future an iat may be (clock skew between engine and keyd).
DEFAULT_SKEW = 60
#: How often keyd looks at the keystore metadata for state changes (emergency disable must
#: take effect within a second).
RELOAD_INTERVAL = 0.5
#: The fewest payloads per signing task: a batch is split over the signing workers (one
#: chunk each), but not into chunks smaller than this, whose hand-off would cost more than
#: the parallel signing saves.
SIGN_CHUNK = 32
#: Nonce pool entries per active ES256 software key: 2^20 x 64 bytes = 64 MiB. The sizing
#: rule: entries = signatures/s through the key during a burst x the burst's seconds, since the
#: refill adds next to nothing meanwhile (it yields to live signing, at idle priority, and a
#: burst leaves no core idle). The burst target on the 2-vCPU machines this was sized on is 10 s
#: at 0.75-1.0 x `openssl speed -multi 2 ecdsap256` (~110-120 k/s): 0.8-1.2 M signatures, all of
#: them through one key when one DCC type dominates. This covers 10 s at up to ~105 k/s. An
#: entry costs a fraction of a signature to make (bench/pool_refill.py and its results), so
#: a pool fills in seconds of one idle core. mlock of 64 MiB needs CAP_IPC_LOCK or a memlock
#: limit above the default 8 MiB; without either the pool works unlocked and keyd says so
#: (_log_pool).
DEFAULT_NONCE_POOL = 1 << 20
#: The largest pool keyd gives a key when it runs on the pure-Python reference (the size the
#: default was before the native refill got cheap; see Keyd._pool_size).
PURE_PYTHON_NONCE_POOL = 1 << 16
#: The most entries a pool may have (native/src/noncepool.c and its twin refuse more).
POOL_MAX_ENTRIES = 1 << 24
JOURNAL_OFFSET = "key-events.offset"
#: After an audit failure, keyd first tries to reopen the log this many seconds later, then
#: doubles the wait after each failed attempt, up to AUDIT_RETRY_MAX.
AUDIT_RETRY_FIRST = 0.5
AUDIT_RETRY_MAX = 5.0


#: Finds the refused items in a codes column (C-level scan: Python runs per refused item only).
_REFUSED = re.compile(rb"[^\x00]")


def _columns_result(
    rid: int,
    codes: bytearray,
    signatures: list[bytes],
    reasons: dict[int, str],
    blob: bytes | None = None,
    sig_ends: array | None = None,
) -> ColumnsResult:
    """The result columns: the signatures are those of the items whose code is 0, in order."""
    if blob is None:
        blob = b"".join(signatures)
    if sig_ends is None:
        sig_ends = array("I", accumulate(map(len, signatures)))
    ordered = tuple(reasons[i] for i in sorted(reasons))
    return ColumnsResult(rid, bytes(codes), blob, sig_ends, ordered)


def _refuse_selected(
    rid: int,
    codes: bytearray,
    selected: array,
    reasons: dict[int, str],
    code: ItemError,
    why: str,
) -> ColumnsResult:
    """Every selected item (all would have been signed) refused with *code*."""
    for i in selected:
        codes[i] = code
        reasons[i] = why
    return _columns_result(rid, codes, [], reasons)


class _SignJob(NamedTuple):
    """One chunk of a batch for one signing call: its item numbers, the key, the payloads
    (read in place) and whether the key's nonce pool covers every one of them."""

    chunk: array
    key: LoadedKey
    payloads: Spans
    pooled: bool


@dataclass(eq=False)
class _Batch:
    """One kid's batch inside :meth:`Keyd.sign_columns` / :meth:`Keyd.sign_kids`: checked,
    its signing ``jobs`` (chunk, key, payloads, pooled), then signing (``pending``), then
    signed and waiting for the audit commit; ``result`` once it is answered."""

    rid: int
    cols: KeydColumns
    result: ColumnsResult | None
    dsc: Any = None
    codes: bytearray = field(default_factory=bytearray)
    facts: bytes = b""
    reasons: dict[int, str] = field(default_factory=dict)
    jobs: list[_SignJob] = field(default_factory=list)
    pending: list[tuple[array, Future[list[bytes]]]] = field(default_factory=list)
    selected: array = field(default_factory=lambda: array("I"))
    signatures: list[bytes] = field(default_factory=list)
    blob: bytes = b""
    sig_ends: array = field(default_factory=lambda: array("I"))

    def refuse_selected(self, code: ItemError, why: str) -> ColumnsResult:
        return _refuse_selected(self.rid, self.codes, self.selected, self.reasons, code, why)


@dataclass
class LoadedKey:
    """A key keyd holds: its DSC, the signing key object, its state and allowed clients."""

    dsc: DSC
    key: Any  # native SigningKey or a PKCS#11 key with the same interface
    state: str
    name: str
    clients: frozenset[str] | None = None  # None: every client

    @property
    def protected(self) -> bytes:
        return native.protected_header(self.dsc.alg, self.dsc.kid)


def check_payloads(
    payloads: Sequence[bytes],
    dsc: DSC,
    now: float,
    *,
    skew: int = DEFAULT_SKEW,
    impl: Any = native,
    valuesets: ValueSets | None = None,
) -> list[CwtFacts | tuple[ItemError, str]]:
    """keyd's own check of CWT payloads for *dsc*.

    Per payload its :class:`~dccsign.native.CwtFacts` when it may be signed, else
    ``(ItemError, reason)``. A payload too long for a QR code is refused first
    (``TOO_LARGE_FOR_QR``); the structural part is ``impl.cwt_facts`` (native: no GIL, ~1.5
    µs); given *valuesets*, each DCC is also fully validated (``INVALID_DCC``; ~20 µs more
    per item, holding the GIL). Never raises for any payload bytes.
    """
    out: list[CwtFacts | tuple[ItemError, str]] = []
    not_before, not_after = dsc.not_before.timestamp(), dsc.not_after.timestamp()
    latest_iat = now + skew
    limit = max_payload(dsc.alg)
    for payload, facts in zip(payloads, impl.cwt_facts(payloads), strict=True):
        if len(payload) > limit:
            out.append(
                (
                    ItemError.TOO_LARGE_FOR_QR,
                    f"the payload is {len(payload)} bytes; at most {limit} fit a QR code "
                    f"({MAX_HC1_CHARS} characters)",
                )
            )
        elif type(facts) is str:
            out.append((ItemError.MALFORMED_CWT, facts))
        elif facts.exp > not_after:
            out.append((ItemError.EXP_AFTER_DSC, f"exp {facts.exp} is after the DSC's notAfter"))
        elif facts.iat < not_before:
            out.append((ItemError.IAT_BEFORE_DSC, f"iat {facts.iat} is before the DSC's notBefore"))
        elif facts.exp <= facts.iat:
            out.append((ItemError.EXP_NOT_AFTER_IAT, "exp must be after iat"))
        elif facts.iat > latest_iat:
            out.append(
                (ItemError.IAT_IN_FUTURE, f"iat {facts.iat} is more than {skew} s in the future")
            )
        elif not dsc.allows(facts.dcc_type):
            out.append(
                (
                    ItemError.TYPE_NOT_ALLOWED,
                    f"the DSC's extended key usage does not allow a "
                    f"{TYPE_NAMES[facts.dcc_type]} DCC",
                )
            )
        elif valuesets is not None and (problem := _dcc_problem(payload, valuesets)):
            out.append((ItemError.INVALID_DCC, problem))
        else:
            out.append(facts)
    return out


def _poolable(key: Any) -> bool:
    """A software ES256 key (token keys have no pool API: their nonces are the token's)."""
    return getattr(key, "alg", None) == native.ES256 and hasattr(key, "enable_nonce_pool")


def _pool_status(key: Any) -> PoolStatus | None:
    info = key.nonce_pool_info() if _poolable(key) else None
    if info is None:
        return None
    return PoolStatus(info.capacity, info.level, info.refilled, info.spent, info.misses)


def _close_pool(loaded: LoadedKey, why: str | None) -> None:
    if not _poolable(loaded.key) or loaded.key.nonce_pool_info() is None:
        return
    loaded.key.close_nonce_pool()
    if why is not None:
        LOGGER.info(
            "key %s (%s) %s: its nonce pool is wiped", loaded.dsc.kid.hex(), loaded.name, why
        )


def _log_pool(loaded: LoadedKey, info: native.NoncePoolInfo) -> None:
    what = (
        f"nonce pool for key {loaded.dsc.kid.hex()} ({loaded.name}): up to {info.capacity:,} "
        f"entries ({info.capacity * 64 // 1024:,} KiB), refilled by a "
        f"{info.refill_thread or 'low-priority'} thread"
    )
    if info.locked:
        LOGGER.info("%s, in locked memory", what)
    else:
        # The rule is "locked where the limit allows": keyd says so rather than refuse to run.
        LOGGER.warning(
            "%s; mlock failed (%s): the entries may be swapped to disk. Raise the memlock "
            "limit (ulimit -l, or LimitMEMLOCK= for a systemd unit) to at least %s KiB per key, "
            "or lower --nonce-pool",
            what,
            info.lock_error,
            f"{info.capacity * 64 // 1024:,}",
        )
    if not info.dontdump:
        LOGGER.warning("%s: MADV_DONTDUMP failed; a core dump of keyd would include them", what)


def _dcc_problem(payload: bytes, valuesets: ValueSets) -> str | None:
    """The first validation issue of the DCC in a structurally checked payload, or None."""
    try:
        validate(loads_exact(payload)[-260][1], valuesets=valuesets)
    except DCCValidationError as exc:
        first = exc.issues[0]
        return f"invalid DCC: {first.path}: {first.message}"
    return None


class Keyd:
    """The signing service of keyd, independent of any transport.

    Args:
        keystore: the keystore directory; key states are re-read when its metadata changes.
        passphrase: the keystore passphrase (private keys are decrypted once, at start).
        audit: the open audit log every signature is recorded in before release.
        impl: the native implementation whose ``SigningKey`` holds the software keys.
        clock: seconds since the epoch.

    Raises:
        KeystoreError: at start, a corrupt keystore file or a wrong passphrase (the message
            names the file). keyd does not start half-way.
    """

    def __init__(
        self,
        keystore: str | os.PathLike[str],
        passphrase: bytes,
        audit: AuditLog,
        *,
        impl=native,
        clock: Callable[[], float] = time.time,
        skew: int = DEFAULT_SKEW,
        preloaded: dict[bytes, Any] | None = None,
        validate_dcc: bool = True,
        nonce_pool: int = 0,
    ) -> None:
        if type(nonce_pool) is not int or nonce_pool < 0:
            raise ValueError("nonce_pool must be an int >= 0 (0: no pools)")
        self.nonce_pool = nonce_pool
        self.directory = Path(keystore)
        self._preloaded = dict(preloaded or {})
        self.audit = audit
        self.clock = clock
        self.skew = skew
        # Value sets for the optional full validation; None: structural checks only.
        self.valuesets = ValueSets.builtin() if validate_dcc else None
        self._passphrase = passphrase
        self._impl = impl
        # The native validator's tables (compiled once; valuesets never change in keyd).
        self._rules = None if self.valuesets is None else impl.DccRules(self.valuesets)
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        # Signing workers, one per core: every connection's chunks share them.
        self._workers = os.cpu_count() or 2
        self._signers = ThreadPoolExecutor(
            max_workers=self._workers,
            thread_name_prefix="keyd-sign",
            initializer=name_this_thread,
            initargs=("keyd-sign",),
        )
        self._keys: dict[bytes, LoadedKey] = {}
        self._meta_stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        #: Why signing is stopped (the audit log cannot commit), or None.
        self.audit_failure: str | None = None
        self._audit_state = threading.Lock()  # audit_failure and the retry schedule below
        self._audit_retry = threading.Lock()  # held by the one thread reopening the log
        self._audit_down_since = 0.0
        self._audit_cause = ""  # what stopped signing (audit_failure may say more since)
        self._audit_retry_at = 0.0
        self._audit_backoff = AUDIT_RETRY_FIRST
        self._audit_next_log = 0.0
        # Key events not yet in the log (the log failed while keyd recorded them).
        self._unrecorded: list[KeyEvent] = []
        self._load(initial=True)

    # -- keys ---------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = (self.directory / "keystore.json").stat()
        except OSError:
            return None
        try:
            journal = (self.directory / JOURNAL).stat().st_size
        except OSError:
            journal = 0
        return st.st_mtime_ns, st.st_size, journal

    def _ingest_journal(self) -> None:
        """Copy new key-event journal lines into the audit log (keyd is its only writer).

        The position is saved after the events are durable in the log: a crash in between
        copies them again at the next start (each event carries its journal id), never loses
        them.
        """
        offset_path = self.directory / JOURNAL_OFFSET
        try:
            offset = int(offset_path.read_text())
        except (OSError, ValueError):
            offset = 0
        events, end = journal_events(self.directory, offset)
        for ev in events:
            kid = bytes.fromhex(ev["kid"]) if ev.get("kid") else None
            reason = "; ".join(x for x in (ev.get("reason"), f"journal {ev['id']}") if x)
            self.audit.append_key_event(KeyEvent(ev["action"], kid, ev["key"], ev["actor"], reason))
        if end != offset:
            atomic_write(offset_path, str(end).encode(), 0o600)

    def _load(self, *, initial: bool = False) -> None:
        stamp = self._stamp()
        store = Keystore.open(self.directory)
        keys: dict[bytes, LoadedKey] = {}
        changes: list[KeyEvent] = []
        for entry in store.entries:
            old = self._keys.get(entry.kid)
            if old is not None:
                key = old.key
            elif entry.kid in self._preloaded:
                key = self._preloaded.pop(entry.kid)
            else:
                key = store.load_signing_key(entry, self._passphrase, self._impl)
            keys[entry.kid] = LoadedKey(entry.dsc, key, entry.state, entry.name, entry.clients)
            if old is not None and old.state != entry.state:
                LOGGER.warning(
                    "key %s (%s): %s -> %s", entry.kid.hex(), entry.name, old.state, entry.state
                )
                changes.append(
                    KeyEvent(f"state:{entry.state}", entry.kid, entry.name, "keyd", None)
                )
        # The new states apply first: an emergency disable must take effect even when the
        # audit log cannot record it (keyd then stops signing altogether, below).
        with self._lock:
            gone = [k for kid, k in self._keys.items() if kid not in keys]
            self._keys = keys
            self._meta_stamp = stamp
        self._sync_pools(list(keys.values()), gone)
        if initial:
            changes.insert(0, KeyEvent("keyd-start", None, None, "keyd", None))
        self._unrecorded += changes
        reopens = self.audit.reopens
        try:
            self._record_key_events()
        except AuditUnavailable as exc:
            if initial:
                raise
            self._audit_failed(exc, reopens)

    def _record_key_events(self) -> None:
        """Append the key events not yet recorded, then the journal's new lines (the caller
        holds ``_reload_lock``, or is ``__init__``)."""
        while self._unrecorded:
            self.audit.append_key_event(self._unrecorded[0])
            del self._unrecorded[0]
        self._ingest_journal()

    # -- audit failures -----------------------------------------------------------------

    def _audit_failed(self, exc: AuditError, reopens: int) -> str:
        """Stop signing: an append (begun when the log had been reopened *reopens* times)
        failed. A failure of a log that a retry has reopened since is not a new outage.
        Returns the reason given to the callers."""
        why = f"audit log unavailable: {exc}"
        with self._audit_state:
            if self.audit.reopens != reopens:
                return why
            if self.audit_failure is None:
                now = time.monotonic()
                self._audit_down_since, self._audit_cause = now, why
                self._audit_backoff = AUDIT_RETRY_FIRST
                self._audit_retry_at = now + AUDIT_RETRY_FIRST
                self._audit_next_log = now + 30.0
                LOGGER.error(
                    "%s; signing stopped (keyd retries the log by itself, first in %.1f s)",
                    why,
                    AUDIT_RETRY_FIRST,
                )
            self.audit_failure = why
        return why

    def _retry_audit(self) -> None:
        """While signing is stopped and a retry is due: reopen the audit log (in place) and,
        once it commits again, record what it missed and resume signing. Called by requests
        and DESCRIBE; never blocks on another thread's retry."""
        if self.audit_failure is None or time.monotonic() < self._audit_retry_at:
            return
        if not self._audit_retry.acquire(blocking=False):
            return
        try:
            with self._audit_state:
                if self.audit_failure is None or time.monotonic() < self._audit_retry_at:
                    return
                reason, since = self._audit_cause, self._audit_down_since
            try:
                self.audit.reopen()
                with self._reload_lock:
                    stopped = time.monotonic() - since
                    self.audit.append_key_event(
                        KeyEvent(
                            "audit-resumed",
                            None,
                            None,
                            "keyd",
                            f"signing was stopped for {stopped:.1f} s: {reason}",
                        )
                    )
                    self._record_key_events()
            except Exception as exc:  # AuditError above all; keyd must keep serving
                now = time.monotonic()
                with self._audit_state:
                    self._audit_backoff = min(self._audit_backoff * 2, AUDIT_RETRY_MAX)
                    self._audit_retry_at = now + self._audit_backoff
                    why = f"audit log unavailable: {exc}"
                    changed, self.audit_failure = why != self.audit_failure, why
                    if changed or now >= self._audit_next_log:
                        self._audit_next_log = now + 30.0
                        LOGGER.error(
                            "%s; signing still stopped after %.0f s (next attempt in %.1f s)",
                            why,
                            now - since,
                            self._audit_backoff,
                        )
                return
            with self._audit_state:
                self.audit_failure = None
            torn = self.audit.recovered
            LOGGER.warning(
                "audit log %s commits again: signing resumed after %.1f s stopped (%s)%s",
                self.audit.directory,
                time.monotonic() - since,
                reason,
                f"; a torn write of {torn['discarded_bytes']} bytes after sequence "
                f"{torn['after_sequence']} was set aside in {torn['evidence']}"
                if torn and torn["evidence"]
                else "",
            )
        finally:
            self._audit_retry.release()

    def _sync_pools(self, keys: list[LoadedKey], gone: list[LoadedKey]) -> None:
        """Pools for the active ES256 software keys; any other key's pool is wiped."""
        for loaded in gone:
            _close_pool(loaded, "left the keystore")
        for loaded in keys:
            if not _poolable(loaded.key):
                continue
            if loaded.state != "active":
                _close_pool(loaded, f"is {loaded.state}")
            elif self.nonce_pool and loaded.key.nonce_pool_info() is None:
                try:
                    info = loaded.key.enable_nonce_pool(self._pool_size(), background=True)
                except (native.SigningError, ValueError, OSError) as exc:
                    # The pool only makes bursts faster: without it the key signs as before.
                    LOGGER.warning(
                        "key %s (%s): no nonce pool (%s); signing without one",
                        loaded.dsc.kid.hex(),
                        loaded.name,
                        exc,
                    )
                    continue
                _log_pool(loaded, info)

    def _pool_size(self) -> int:
        """Entries per pool: ``nonce_pool``, at most PURE_PYTHON_NONCE_POOL with the pure-Python
        reference (its refill thread runs Python holding the GIL: preempted at idle priority,
        it would stall keyd's other threads, for minutes with a pool sized for the native
        burst)."""
        size = self.nonce_pool
        # (A size the pool refuses anyway is passed on, so that keyd says why.)
        # impl is the dccsign.native facade (IMPLEMENTATION says which it bound) or a module.
        python = getattr(self._impl, "IMPLEMENTATION", None) == "python" or (
            self._impl.__name__ == "dccsign.native._reference"
        )
        if python and size <= POOL_MAX_ENTRIES:
            return min(size, PURE_PYTHON_NONCE_POOL)
        return size

    def refresh(self) -> None:
        """Pick up key state changes (activate, retire, disable) from the keystore metadata."""
        now = time.monotonic()
        if now < self._next_check or not self._reload_lock.acquire(blocking=False):
            return  # not due yet, or another connection's thread is reloading right now
        try:
            self._next_check = now + RELOAD_INTERVAL
            if self._stamp() != self._meta_stamp:
                try:
                    self._load()
                except Exception:
                    # A half-written or broken metadata file must not stop signing with the
                    # states we know; it is retried at the next interval.
                    LOGGER.exception("keystore reload failed; keeping the previous key states")
        finally:
            self._reload_lock.release()

    def describe(self) -> list[KeyFacts]:
        self.refresh()
        self._retry_audit()
        with self._lock:
            keys = list(self._keys.values())
        return [
            KeyFacts(
                k.dsc.kid,
                k.dsc.alg,
                tuple(t for t in "vtr" if t in k.dsc.usages),
                k.state,
                k.dsc.der,
                _pool_status(k.key),
            )
            for k in keys
        ]

    # -- signing ------------------------------------------------------------------------

    def sign(self, req: SignPayloads) -> Signatures:
        """Check, sign, audit, then release: see the module docstring."""
        part = SignPart(req.client, req.account, req.payloads, req.operator)
        return self.sign_many(SignMany(req.request_id, req.kid, (part,)))

    def sign_many(self, req: SignMany) -> Signatures:
        """:meth:`sign` for several parts at once (the old form of the micro-batch): the
        parts become columns and go through :meth:`sign_columns`."""
        columns = KeydColumns.from_parts([p for p in req.parts if p.payloads])
        n = sum(len(p.payloads) for p in req.parts)
        if len(columns) != n:  # pragma: no cover - from_parts keeps every payload
            raise AssertionError("parts and columns disagree")
        try:
            columns.check("SIGN_MANY")
        except KeydProtocolError as exc:  # a name the columns refuse (empty, too long)
            return Signatures(req.request_id, ((ItemError.INTERNAL, str(exc)),) * n)
        done = self.sign_columns(SignColumns(req.request_id, req.kid, columns))
        return Signatures(req.request_id, tuple(done.results()))

    def sign_columns(self, req: SignColumns) -> ColumnsResult:
        """Check, sign, audit, then release a batch in columns (SIGN_COLUMNS): each item is
        allowed, checked and audited under its own client, account and operator; the checks
        (``native.keyd_check_columns``), the DCC validation (``native.validate_cwt_batch``),
        the signing passes and the audit lines (``native.audit_issue_columns``) and commit
        (one fsync) run over the whole batch. Python work per item is limited to the refused
        items' reasons and handing payloads to the signing key. Results are columns in item
        order."""
        self.refresh()
        self._retry_audit()
        batch = self._start(req.request_id, req.kid, req.columns)
        self._sign([batch])
        self._finish([batch])
        assert batch.result is not None
        return batch.result

    def sign_kids(self, req: SignKids) -> KidsResult:
        """:meth:`sign_columns` for several kids' batches at once (SIGN_KIDS): each batch is
        answered as it would be alone, the signing of all of them overlaps, and their audit
        records are made durable in one commit (one fsync, one checkpoint) before any
        signature leaves. If that commit fails, no batch's signatures leave."""
        self.refresh()
        self._retry_audit()
        batches = [self._start(0, b.kid, b.columns) for b in req.batches]
        self._sign(batches)
        self._finish(batches)
        return KidsResult(req.request_id, tuple(b.result for b in batches))  # type: ignore[misc]

    def _start(self, rid: int, kid: bytes, cols: KeydColumns) -> _Batch:
        """A batch checked and validated, its signing jobs ready (:meth:`_sign` runs them),
        or already answered (``result`` set)."""
        n = len(cols)
        with self._lock:
            key = self._keys.get(kid)
        if key is None or key.state != "active":
            why = "unknown kid" if key is None else f"key is {key.state}"
            return _Batch(rid, cols, ColumnsResult.refuse_all(rid, n, ItemError.KID_NOT_ACTIVE,
                                                              why))  # fmt: skip
        if self.audit_failure is not None:
            return _Batch(rid, cols, ColumnsResult.refuse_all(
                rid, n, ItemError.AUDIT_UNAVAILABLE, self.audit_failure))  # fmt: skip
        if not n:
            return _Batch(rid, cols, ColumnsResult(rid, b""))
        dsc = key.dsc
        now = self.clock()
        limit = max_payload(dsc.alg)
        # Per client-table entry (a handful per message), not per item.
        client_ok = bytes(key.clients is None or c in key.clients for c in cols.clients)
        codes, facts, malformed = self._impl.keyd_check_columns(
            cols.payloads, cols.ends, cols.client_ix, client_ok, limit,
            dsc.not_before.timestamp(), dsc.not_after.timestamp(), now + self.skew,
            "".join(t for t in "vtr" if dsc.allows(t)),
        )  # fmt: skip
        batch = _Batch(rid, cols, None, dsc, codes, facts)
        batch.reasons = self._reasons(cols, codes, facts, malformed, limit)
        # Start offsets, once: payload k of a chunk is payloads[starts[i]:ends[i]].
        starts = array("I", [0])
        starts += cols.ends[:-1]
        ok = array("I", compress(range(n), map(operator.not_, codes)))
        if self.valuesets is not None and ok:
            problems = self._validate_columns(cols.payloads, starts, cols.ends, ok)
            if problems:
                for i, problem in problems.items():
                    codes[i] = ItemError.INVALID_DCC
                    batch.reasons[i] = problem
                ok = array("I", (i for i in ok if i not in problems))
        # One chunk per signing thread: each chunk costs a hand-off to a worker and back.
        # Unless the key's nonce pool holds a nonce for every item: then a signature costs
        # less than the hand-off, and the whole batch is signed in this thread.
        info = key.key.nonce_pool_info() if ok and _poolable(key.key) else None
        pooled = info is not None and info.level >= len(ok)
        step = len(ok) if pooled else max(SIGN_CHUNK, -(-len(ok) // self._workers))
        for at in range(0, len(ok), step):
            chunk = ok[at : at + step]
            # The payloads read in place by the signer: no bytes object per item.
            payloads = Spans(cols.payloads, starts, cols.ends, chunk)
            batch.jobs.append(_SignJob(chunk, key, payloads, pooled))
        if not batch.jobs:
            batch.result = _columns_result(rid, codes, [], batch.reasons)
        return batch

    def _sign(self, batches: list[_Batch]) -> None:
        """Run the signing jobs of *batches*: the pooled ones (cheaper than a hand-off) and
        the last of the others in this thread (which would otherwise only wait), the rest in
        the signing workers. Each job's outcome lands in its batch's ``pending`` as a done or
        pending future."""
        jobs = [(b, job) for b in batches for job in b.jobs]
        slow = [(b, job) for b, job in jobs if not job.pooled]
        for b, job in slow[:-1]:
            b.pending.append((job.chunk, self._signers.submit(job.key.key.sign, job.key.protected,
                                                              job.payloads)))  # fmt: skip
        _, last = slow[-1] if slow else (None, None)
        for b, job in jobs:
            if job.pooled or job is last:
                here: Future[list[bytes]] = Future()
                try:
                    here.set_result(job.key.key.sign(job.key.protected, job.payloads))
                except Exception as exc:  # as a worker's failure: answered INTERNAL
                    here.set_exception(exc)
                b.pending.append((job.chunk, here))
        for b in batches:
            b.jobs.clear()

    def _finish(self, batches: list[_Batch]) -> None:
        """Wait for the batches' signatures, make their audit records durable in one commit,
        and set every batch's ``result``: the signatures only once the commit succeeded."""
        signed: list[_Batch] = []
        for b in batches:
            if b.result is not None:
                continue
            failure: BaseException | None = None
            signatures: list[bytes] = []
            for chunk, future in b.pending:
                try:
                    signatures += future.result()
                except Exception as exc:  # wait for every chunk before answering
                    failure = failure or exc
                b.selected += chunk
            b.pending.clear()
            if failure is not None:
                LOGGER.error("signing failed for kid %s: %r", b.dsc.kid.hex(), failure)
                why = f"signing failed: {type(failure).__name__}"
                b.result = b.refuse_selected(ItemError.INTERNAL, why)
                continue
            b.signatures = signatures
            b.blob = b"".join(signatures)
            b.sig_ends = array("I", accumulate(map(len, signatures)))
            signed.append(b)
        if not signed:
            return
        reopens = self.audit.reopens
        try:
            self.audit.append_columns_many([
                (b.dsc.kid, b.dsc.alg, b.cols, b.facts, b.selected, b.blob, b.sig_ends)
                for b in signed
            ])  # fmt: skip
        except AuditUnavailable as exc:
            # The signatures are dropped: nothing leaves keyd that the log does not know.
            why = self._audit_failed(exc, reopens)
            for b in signed:
                b.result = b.refuse_selected(ItemError.AUDIT_UNAVAILABLE, why)
            return
        except (ValueError, TypeError) as exc:
            # Nothing was written (the codec's rules make this unreachable from the wire).
            kids = ", ".join(b.dsc.kid.hex() for b in signed)
            LOGGER.error("the audit log refused a batch for kid %s: %s", kids, exc)
            why = f"the audit log refused the batch: {exc}"
            for b in signed:
                b.result = b.refuse_selected(ItemError.INTERNAL, why)
            return
        for b in signed:
            b.result = _columns_result(b.rid, b.codes, b.signatures, b.reasons, b.blob,
                                       b.sig_ends)  # fmt: skip

    def _reasons(
        self,
        cols: KeydColumns,
        codes: bytearray,
        facts: bytes,
        malformed: dict[int, str],
        limit: int,
    ) -> dict[int, str]:
        """The reason of every item the structural check refused (Python per refused item
        only: C finds them). The texts are those of :func:`check_payloads`."""
        reasons: dict[int, str] = {}
        ends = cols.ends
        for match in _REFUSED.finditer(codes):
            i = match.start()
            code = codes[i]
            if code == ItemError.CLIENT_NOT_ALLOWED:
                client = cols.clients[cols.client_ix[i]]
                reasons[i] = f"client {client!r} may not use this kid"
            elif code == ItemError.TOO_LARGE_FOR_QR:
                size = ends[i] - (ends[i - 1] if i else 0)
                reasons[i] = (
                    f"the payload is {size} bytes; at most {limit} fit a QR code "
                    f"({MAX_HC1_CHARS} characters)"
                )
            elif code == ItemError.MALFORMED_CWT:
                reasons[i] = malformed[i]
            else:
                _iss, dcc_type, _n, _at, exp, iat = unpack_facts(facts, i)
                reasons[i] = (
                    f"exp {exp} is after the DSC's notAfter" if code == ItemError.EXP_AFTER_DSC
                    else f"iat {iat} is before the DSC's notBefore"
                    if code == ItemError.IAT_BEFORE_DSC
                    else "exp must be after iat" if code == ItemError.EXP_NOT_AFTER_IAT
                    else f"iat {iat} is more than {self.skew} s in the future"
                    if code == ItemError.IAT_IN_FUTURE
                    else "the DSC's extended key usage does not allow a "
                    f"{TYPE_NAMES[dcc_type]} DCC"
                )  # fmt: skip
        return reasons

    def _validate_columns(
        self, payloads: bytes, starts: array, ends: array, items: array
    ) -> dict[int, str]:
        """The full DCC validation of *items* (item numbers, ``array('I')``) of a batch whose
        payloads are structurally checked: the item numbers that fail, with their reasons
        (``invalid DCC: <path>: <message>``).

        One native batch call (``native.validate_cwt_batch``: the DCC decoded the keyd way,
        the verdicts and messages of :func:`dccsign.dcc.validate.validate`); Python runs per refused
        item only."""
        verdicts = self._impl.validate_cwt_batch(self._rules, Spans(payloads, starts, ends, items))
        if len(verdicts) != len(items):
            raise AssertionError("one verdict per payload")  # pragma: no cover
        problems: dict[int, str] = {}
        # Only the refused items are visited (found in C: no interpreter per item).
        refused = map(operator.is_not, map(type, verdicts), repeat(str))
        for k in compress(range(len(items)), refused):
            i, verdict = items[k], verdicts[k]
            if isinstance(verdict, DCCValidationError):
                first = verdict.issues[0]
                problems[i] = f"invalid DCC: {first.path}: {first.message}"
            else:  # the structural check passed it, so this is not expected: refuse
                problems[i] = f"invalid DCC: {verdict}"
        return problems

    def close(self) -> None:
        """Stop the signing workers (after the requests in progress), then wipe and free
        every nonce pool."""
        self._signers.shutdown(wait=True)
        with self._lock:
            keys = list(self._keys.values())
        for loaded in keys:
            _close_pool(loaded, None)

    def handle(self, msg: object) -> object:
        """The reply to one request message."""
        if isinstance(msg, SignPayloads):
            return self.sign(msg)
        if isinstance(msg, SignColumns):
            return self.sign_columns(msg)
        if isinstance(msg, SignKids):
            return self.sign_kids(msg)
        if isinstance(msg, SignMany):
            return self.sign_many(msg)
        if isinstance(msg, Describe):
            return DescribeResult(msg.request_id, tuple(self.describe()), self.audit_failure)
        rid = getattr(msg, "request_id", 0)
        return Failure(rid, f"keyd does not accept {type(msg).__name__} messages", False)
