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
  keystore metadata; without one, every client may).

Each refused payload gets an :class:`~dccsign.protocol.keyd.ItemError`; the others are signed.
There is no operation that signs a digest, and none that exports a key.

The content of the DCC (names, dates, codes) is the issuing side's business: the issuer
(``chain.Issuer``) validates every DCC before it asks keyd. ``validate_dcc=True``
(``dccsign keyd --validate-dcc``) makes keyd run the same full validator again, for
deployments that do not trust the issuing host that far; it costs about a third of keyd's
throughput, because the validator is Python and holds the GIL. What it cannot do is tell a
fraudulent but valid DCC from a real one: against an abused account, the controls are
policy and quotas in front of keyd, and this audit log.

Nonce pools (``nonce_pool=N``, ``dccsign keyd --nonce-pool N``): every active ES256 software
key gets a pool of N precomputed nonces (64 bytes each, mlock'ed where the memlock limit
allows, logged otherwise), kept full by its own native refill thread at SCHED_IDLE, and
spent by signing (see native/src/noncepool.h for
the rules). A key that stops being active has its pool wiped at once; keyd wipes them all
when it stops. Token (PKCS#11) keys never have one: their nonces are the token's.

Audit before release: the signatures of a batch are computed, their records appended to the
audit log with one fsync (group commit), and only then returned. If the log cannot be
written, keyd refuses to sign (``AUDIT_UNAVAILABLE``) and says why, rather than sign unaudited.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import native
from .audit import AuditLog, AuditUnavailable, IssuanceBatch, KeyEvent
from .dcc import DCCValidationError, validate
from .dsc import DSC, TYPE_NAMES
from .keystore import Keystore, _atomic_write
from .lifecycle import JOURNAL, journal_events
from .native import CwtFacts
from .protocol.keyd import (
    NEED_DATA,
    Connection,
    Describe,
    DescribeResult,
    Error,
    ItemError,
    KeydProtocolError,
    KeyInfo,
    PoolStatus,
    Sign,
    SignMany,
    SignPart,
    SignResult,
)
from .valuesets import ValueSets
from .verify import loads_exact

__all__ = [
    "DEFAULT_NONCE_POOL",
    "DEFAULT_SKEW",
    "Keyd",
    "LoadedKey",
    "check_payloads",
    "serve_unix",
]

LOGGER = logging.getLogger("dccsign.keyd")

#: How far in the future an iat may be (clock skew between engine and keyd).
DEFAULT_SKEW = 60
#: How often keyd looks at the keystore metadata for state changes (emergency disable must
#: take effect within a second).
RELOAD_INTERVAL = 0.5
#: Payloads per signing task: small enough that checking the next chunk overlaps signing this
#: one, large enough that the per-call cost of the native batch stays negligible.
SIGN_CHUNK = 32
#: Nonce pool entries per active ES256 software key: 65,536 x 64 bytes = 4 MiB, about a
#: second of keyd signing flat out from the pool, refilled in about 2 s of one idle core.
DEFAULT_NONCE_POOL = 65_536
JOURNAL_OFFSET = "key-events.offset"


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
    ``(ItemError, reason)``. The structural part is ``impl.cwt_facts`` (native: no GIL, ~1.5
    µs); given *valuesets*, each DCC is also fully validated (``INVALID_DCC``; ~20 µs more
    per item, holding the GIL). Never raises for any payload bytes.
    """
    out: list[CwtFacts | tuple[ItemError, str]] = []
    not_before, not_after = dsc.not_before.timestamp(), dsc.not_after.timestamp()
    latest_iat = now + skew
    for payload, facts in zip(payloads, impl.cwt_facts(payloads), strict=True):
        if type(facts) is str:
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
        validate_dcc: bool = False,
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
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        # Signing workers, one per core: every connection's chunks share them.
        self._signers = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 2, thread_name_prefix="keyd-sign"
        )
        self._keys: dict[bytes, LoadedKey] = {}
        self._meta_stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self.audit_failure: str | None = None
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
            _atomic_write(offset_path, str(end).encode(), 0o600)

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
        try:
            if initial:
                changes.insert(0, KeyEvent("keyd-start", None, None, "keyd", None))
            for event in changes:
                self.audit.append_key_event(event)
            self._ingest_journal()
        except AuditUnavailable as exc:
            self.audit_failure = f"audit log unavailable: {exc}"
            LOGGER.error("%s; signing stopped", self.audit_failure)
            if initial:
                raise

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
                    info = loaded.key.enable_nonce_pool(self.nonce_pool, background=True)
                except (native.SigningError, ValueError, OSError) as exc:
                    # The pool only makes bursts faster: without it the key signs as before.
                    LOGGER.warning(
                        "key %s (%s): no nonce pool (%s); signing without one",
                        loaded.dsc.kid.hex(), loaded.name, exc,
                    )
                    continue
                _log_pool(loaded, info)

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

    def describe(self) -> list[KeyInfo]:
        self.refresh()
        with self._lock:
            keys = list(self._keys.values())
        return [
            KeyInfo(
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

    def sign(self, req: Sign) -> SignResult:
        """Check, sign, audit, then release: see the module docstring."""
        return self.sign_many(
            SignMany(
                req.request_id,
                req.kid,
                (SignPart(req.client, req.account, req.payloads, req.operator),),
            )
        )

    def sign_many(self, req: SignMany) -> SignResult:
        """:meth:`sign` for several parts at once: each part is allowed, checked and audited
        under its own client, account and operator; the signing passes and the audit commit
        (one fsync) are shared. Results run over the parts' payloads in order."""
        self.refresh()
        n = sum(len(part.payloads) for part in req.parts)
        with self._lock:
            key = self._keys.get(req.kid)
        if key is None or key.state != "active":
            why = "unknown kid" if key is None else f"key is {key.state}"
            return SignResult(req.request_id, ((ItemError.KID_NOT_ACTIVE, why),) * n)
        if self.audit_failure is not None:
            return SignResult(
                req.request_id, ((ItemError.AUDIT_UNAVAILABLE, self.audit_failure),) * n
            )
        now = self.clock()
        results: list[bytes | tuple[ItemError, str]] = [b""] * n
        # The payloads of the parts whose client may use the kid, flat, with their positions
        # in results and their parts: one check call per chunk whatever the number of parts.
        flat: list[bytes] = []
        where: list[int] = []
        owner: list[int] = []
        position = 0
        for number, part in enumerate(req.parts):
            count = len(part.payloads)
            if key.clients is not None and part.client not in key.clients:
                refusal = (
                    ItemError.CLIENT_NOT_ALLOWED,
                    f"client {part.client!r} may not use this kid",
                )
                results[position : position + count] = [refusal] * count
            else:
                flat += part.payloads
                where += range(position, position + count)
                owner += [number] * count
            position += count
        # Per part: the positions, facts and payloads of its accepted payloads.
        taken: dict[int, tuple[list[int], list[CwtFacts], list[bytes]]] = {}
        # Check and sign overlap: each chunk's signing goes to a worker thread (native signing
        # and token calls release the GIL) while this thread checks the next chunk.
        pending: list[Future[list[bytes]]] = []
        for start in range(0, len(flat), SIGN_CHUNK):
            chunk = flat[start : start + SIGN_CHUNK]
            batch: list[bytes] = []
            outcomes = check_payloads(
                chunk, key.dsc, now, skew=self.skew, impl=self._impl, valuesets=self.valuesets
            )
            for i, outcome in enumerate(outcomes, start):
                if isinstance(outcome, CwtFacts):
                    entry = taken.get(owner[i])
                    if entry is None:
                        entry = taken[owner[i]] = ([], [], [])
                    entry[0].append(where[i])
                    entry[1].append(outcome)
                    entry[2].append(flat[i])
                    batch.append(flat[i])
                else:
                    results[where[i]] = outcome
            if batch:
                pending.append(self._signers.submit(key.key.sign, key.protected, batch))
        # Signatures come back in flat order; the audit wants them by part.
        accepted = [(req.parts[number], *taken[number]) for number in sorted(taken)]
        if not accepted:
            return SignResult(req.request_id, tuple(results))
        everyone = [i for _, indexes, _, _ in accepted for i in indexes]
        signatures: list[bytes] = []
        failure: BaseException | None = None
        for future in pending:
            try:
                signatures += future.result()
            except Exception as exc:  # wait for every chunk before answering
                failure = failure or exc
        if failure is not None:
            LOGGER.error("signing failed for kid %s: %r", key.dsc.kid.hex(), failure)
            for i in everyone:
                results[i] = (ItemError.INTERNAL, f"signing failed: {type(failure).__name__}")
            return SignResult(req.request_id, tuple(results))
        records: list[IssuanceBatch] = []
        done = 0
        for part, indexes, facts, payloads in accepted:
            sigs = signatures[done : done + len(indexes)]
            done += len(indexes)
            records.append(
                IssuanceBatch(
                    key.dsc.kid,
                    key.dsc.alg,
                    part.client,
                    part.account,
                    part.operator,
                    "".join(f.dcc_type for f in facts),
                    [f.uvci for f in facts],
                    [f.iss for f in facts],
                    payloads,
                    sigs,
                )
            )
        try:
            self.audit.append_batches(records)
        except AuditUnavailable as exc:
            # The signatures are dropped: nothing leaves keyd that the log does not know.
            self.audit_failure = f"audit log unavailable: {exc}"
            LOGGER.error("%s; signing stopped", self.audit_failure)
            for i in everyone:
                results[i] = (ItemError.AUDIT_UNAVAILABLE, self.audit_failure)
            return SignResult(req.request_id, tuple(results))
        for i, sig in zip(everyone, signatures, strict=True):
            results[i] = sig
        return SignResult(req.request_id, tuple(results))

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
        if isinstance(msg, Sign):
            return self.sign(msg)
        if isinstance(msg, SignMany):
            return self.sign_many(msg)
        if isinstance(msg, Describe):
            return DescribeResult(msg.request_id, tuple(self.describe()))
        rid = getattr(msg, "request_id", 0)
        return Error(rid, f"keyd does not accept {type(msg).__name__} messages", False)


# ----------------------------------------------------------------------------- transport


def _serve_connection(keyd: Keyd, sock: socket.socket) -> None:
    codec = Connection()
    with sock:
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError:
                return
            out: list[bytes] = []
            try:
                codec.receive_data(data)
                while True:
                    event = codec.next_event()
                    if event is NEED_DATA or event is None:
                        break
                    out.append(codec.send(keyd.handle(event)))
                    # A signing reply goes out at once: the engine pipelines micro-batches, and
                    # holding finished signatures until every message of the read is handled
                    # would delay them by the others' signing. Small replies share one write.
                    if isinstance(event, Sign | SignMany) and not _send(sock, out):
                        return
            except KeydProtocolError as exc:
                LOGGER.warning("closing a keyd connection: %s", exc)
                out.append(codec.send(Error(0, f"protocol error: {exc}", False)))
                _send(sock, out)
                return
            if not _send(sock, out) or not data:
                return


def _send(sock: socket.socket, out: list[bytes]) -> bool:
    """Write and clear *out* (one write); False when the peer is gone."""
    if not out:
        return True
    try:
        sock.sendall(b"".join(out))
    except OSError:
        return False
    out.clear()
    return True


def serve_unix(
    keyd: Keyd,
    path: str | os.PathLike[str],
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve *keyd* on a Unix socket created with mode 0600 until *stop* is set.

    Each connection gets a thread; signing releases the GIL, so connections sign in parallel.
    """
    path = Path(path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket exists with mode 0600 from its first instant
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.settimeout(0.2)
    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=_serve_connection, args=(keyd, conn), daemon=True).start()
    finally:
        listener.close()
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- process

AUDIT_KEY_FILE = "audit-key.pem"
AUDIT_DIR = "audit"


def run(
    keystore: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    audit_dir: str | os.PathLike[str] | None = None,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    validate_dcc: bool = False,
    nonce_pool: int = DEFAULT_NONCE_POOL,
) -> None:
    """Run keyd until *stop* is set (the CLI sets it on SIGTERM/SIGINT).

    *validate_dcc*: also run the full DCC validator on every payload (see the module
    docstring). *nonce_pool*: entries per active ES256 software key (0: no pools).

    The audit log lives in ``KEYSTORE/audit`` unless *audit_dir* is given; its checkpoint key
    is ``KEYSTORE/audit-key.pem`` (created on first start, encrypted with the keystore
    passphrase).

    Raises:
        KeystoreError: keystore, passphrase or audit key unusable (nothing was started).
        AuditLogError, AuditUnavailable: the audit log is broken or cannot be written.
    """
    from .audit import AuditKey
    from .keystore import resolve_passphrase

    root = Path(keystore)
    store = Keystore.open(root)
    passphrase = resolve_passphrase(root)
    # Every private key is decrypted before anything is created: a wrong passphrase must not
    # leave an audit key (or log) behind that was made with it.
    loaded = {e.kid: store.load_signing_key(e, passphrase, native) for e in store.entries}
    key_path = root / AUDIT_KEY_FILE
    audit_key = (
        AuditKey.load(key_path, passphrase)
        if key_path.exists()
        else AuditKey.create(key_path, passphrase)
    )
    with AuditLog.open(Path(audit_dir) if audit_dir else root / AUDIT_DIR, audit_key) as log:
        keyd = Keyd(
            root,
            passphrase,
            log,
            preloaded=loaded,
            validate_dcc=validate_dcc,
            nonce_pool=nonce_pool,
        )
        LOGGER.info("keyd serving %d keys on %s", len(keyd.describe()), socket_path)
        try:
            serve_unix(keyd, socket_path, ready=ready, stop=stop)
        finally:
            keyd.close()
            log.append_key_event(KeyEvent("keyd-stop", None, None, "keyd", None))


def cmd_keyd(args) -> int:
    """``dccsign keyd``: returns the exit code (0 after a clean stop, 4 on key problems)."""
    import signal
    import sys

    from .audit import AuditError
    from .errors import KeystoreError

    logging.basicConfig(level=logging.INFO, format="keyd: %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run(
            args.keystore,
            args.socket,
            args.audit_dir,
            stop=stop,
            validate_dcc=args.validate_dcc,
            nonce_pool=args.nonce_pool,
        )
    except (KeystoreError, AuditError) as exc:
        print(f"dccsign keyd: error: {exc}", file=sys.stderr)
        return 4
    return 0
