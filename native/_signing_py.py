"""ES256/PS256 signing of COSE Sig_structures, pure-Python reference (pyca/cryptography).

This is hazmat: a :class:`SigningKey` holds a private key. It offers no way to read the key
back, and it signs only COSE_Sign1 Sig_structures built here from a protected header that
matches the key's algorithm -- never a caller's digest.

An ES256 key may hold a **nonce pool** (DESIGN.md, "Nonce pool"): entries (k^-1, r) computed
ahead, so that a signature costs s = k^-1 (z + r d) mod n. This module is the readable twin of
native/src/noncepool.c, entry layout and all, and it refills in chunks the same way: the k^-1
of a chunk come from one blinded batch inversion (:func:`_batch_inverse`). What it cannot do
is lock or wipe memory for real, or keep time constant: its bytearray slots are zeroed when
spent, but the Python ints of the arithmetic are left to the garbage collector. keyd uses the
native pool.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ._cose_py import check_protected, sig_structure
from ._types import ES256, PS256, NoncePoolInfo
from .errors import KeyLoadError, SigningError

__all__ = ["SigningKey"]

_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: The prime of P-256's field (the native refill batch-inverts Z^2 modulo it).
_P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
#: The Montgomery radix of the native pool's arithmetic: entries hold k^-1 * R mod n.
_R = 1 << 256
_R_INV = pow(_R, -1, _P256_N)
#: Bytes per pool entry: k^-1 * R mod n, then r, 32 bytes each, big-endian.
POOL_ENTRY_SIZE = 64
POOL_MAX_ENTRIES = 1 << 24
#: Entries computed together (one batch inversion) and inserted under one taking of the lock;
#: the background thread refills one chunk at a time (noncepool.h DCC_POOL_REFILL_CHUNK and
#: DCC_POOL_BACKGROUND_CHUNK).
POOL_REFILL_CHUNK = 64
# RFC 8230 §2: MGF1-SHA-256 and a 32-byte salt. PSS.MAX_LENGTH (222 bytes for RSA-2048) is
# what cryptography suggests, and what DCC verifiers reject.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class SigningKey:
    """A private signing key for ES256 (P-256) or PS256 (RSA 2048-4096).

    Attributes:
        alg: the COSE algorithm this key signs with (-7 ES256, -37 PS256).
    """

    __slots__ = ("_key", "_pool", "alg")

    def __init__(self) -> None:
        raise TypeError("use SigningKey.load_pem()")

    def __reduce__(self):
        raise TypeError("a SigningKey cannot be pickled or copied out of its process")

    @classmethod
    def load_pem(cls, pem: bytes, passphrase: bytes | None) -> SigningKey:
        """Load a PEM private key (PKCS#8, normally encrypted with *passphrase*).

        Raises:
            KeyLoadError: wrong or missing passphrase, corrupt PEM, or a key that is neither
                EC P-256 nor RSA of 2048 to 4096 bits.
        """
        try:
            key = serialization.load_pem_private_key(bytes(pem), password=passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            what = (
                "cannot decrypt or parse the private key (wrong passphrase or corrupt file)"
                if passphrase is not None
                else "cannot parse the private key (encrypted keys need a passphrase)"
            )
            raise KeyLoadError(f"{what}: {exc}") from None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise KeyLoadError(
                    f"EC key on curve {key.curve.name}: ES256 needs P-256 (prime256v1)"
                )
            alg = ES256
        elif isinstance(key, rsa.RSAPrivateKey):
            if not 2048 <= key.key_size <= 4096:
                raise KeyLoadError(f"RSA key of {key.key_size} bits: PS256 needs 2048 to 4096 bits")
            alg = PS256
        else:
            raise KeyLoadError("unsupported key type: only EC P-256 (ES256) and RSA (PS256)")
        self = object.__new__(cls)
        self._key = key
        self._pool = None
        self.alg = alg
        return self

    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (to match it against a DSC)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, protected: bytes, payloads: Sequence[bytes]) -> list[bytes]:
        """Sign the Sig_structure of each payload under *protected*.

        Returns one signature per payload: ES256 as 64-byte raw ``r || s`` (each half
        left-padded, s in the low half), PS256 as the RSA-PSS signature.

        Raises:
            ValueError: *protected* is not the canonical header for this key's algorithm.
            TypeError: a payload is not ``bytes``.
        """
        check_protected(self.alg, protected)
        items = _check_payloads(payloads)
        if self.alg == ES256:
            pool = self._pool
            out = []
            # The background refill waits until this batch is done; a forked child signs
            # without the pool.
            if pool is not None and not pool.enter():
                pool = None
            try:
                for p in items:
                    tbs = sig_structure(protected, p)
                    sig = pool.sign(hashlib.sha256(tbs).digest()) if pool is not None else None
                    out.append(sig if sig is not None else self._sign_es256(tbs))
            finally:
                if pool is not None:
                    pool.leave()
            return out
        return [self._key.sign(sig_structure(protected, p), _PSS, hashes.SHA256()) for p in items]

    def _sign_es256(self, tbs: bytes) -> bytes:
        r, s = decode_dss_signature(self._key.sign(tbs, ec.ECDSA(hashes.SHA256())))
        if s > _P256_N // 2:
            s = _P256_N - s  # low-S: (r, n - s) verifies too and removes malleability
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    # -- the nonce pool (ES256 only) -------------------------------------------------------

    def enable_nonce_pool(self, capacity: int, *, background: bool = False) -> NoncePoolInfo:
        """Give this key an empty pool of *capacity* entries; :meth:`sign` spends it, one
        entry per signature, and signs the ordinary way whenever it is empty.

        *background*: start the pool's own refill thread, at the lowest priority the system
        grants (SCHED_IDLE, else nice 19; ``NoncePoolInfo.refill_thread`` says which), which
        keeps it full until :meth:`close_nonce_pool`. Without it the caller refills.

        Raises:
            TypeError: *capacity* is not an int.
            ValueError: not an ES256 key, a pool already exists, or *capacity* is not in
                1..16777216.
        """
        if type(capacity) is not int:
            raise TypeError("capacity must be an int")
        if self._pool is not None:
            raise ValueError("this key already has a nonce pool")
        if self.alg != ES256:
            raise ValueError("a nonce pool needs an ES256 key")
        if not 1 <= capacity <= POOL_MAX_ENTRIES:
            raise ValueError("nonce pool capacity must be 1 to 16777216 entries")
        self._pool = _Pool(self._key.private_numbers().private_value, capacity)
        if background:
            self._pool.start_refill()
        return self._pool.info()

    def refill_nonce_pool(self, max_entries: int = 64) -> int:
        """Compute up to *max_entries* entries from fresh randomness (at most what fits) and
        add them; returns how many were added (0 when full, or in a forked child).

        Raises:
            ValueError: no pool, or *max_entries* is not an int >= 0.
            SigningError: the entropy source or the arithmetic failed.
        """
        if type(max_entries) is not int or max_entries < 0:
            raise ValueError("max_entries must be an int >= 0")
        if self._pool is None:
            raise ValueError("this key has no nonce pool")
        return self._pool.refill(max_entries)

    def nonce_pool_info(self) -> NoncePoolInfo | None:
        """The pool's counts and memory protections (None without a pool)."""
        return None if self._pool is None else self._pool.info()

    def clear_nonce_pool(self) -> None:
        """Wipe every entry (a disabled key, a shutdown); the pool stays refillable."""
        if self._pool is not None:
            self._pool.clear()

    def close_nonce_pool(self) -> None:
        """Wipe every entry and drop the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop_refill()
            pool.clear()

    def _nonce_pool_residue(self) -> int:
        """Test support: bytes outside the live entries that are not zero (always 0 when every
        spent or cleared slot was wiped)."""
        if self._pool is None:
            raise ValueError("this key has no nonce pool")
        return self._pool.residue()


class _Pool:
    """Entries in one bytearray, live ones first: the newest is taken (and its slot zeroed)
    first, so everything past ``level`` entries must read as zeros."""

    def __init__(self, d: int, capacity: int) -> None:
        self._d = d  # plain: only the entries keep the C code's layout (k^-1 in Montgomery form)
        self._mem = bytearray(capacity * POOL_ENTRY_SIZE)
        self._capacity = capacity
        self._level = 0
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._orphan = False
        self._counts = {"refilled": 0, "spent": 0, "misses": 0, "discarded": 0}
        self._room = threading.Condition(self._lock)  # an entry was taken
        self._thread: threading.Thread | None = None
        self._policy: str | None = None
        self._stopping = False
        self._signing = 0  # batches in progress: the background refill yields to them

    def enter(self) -> bool:
        """A batch begins; False in a forked child (the pid check, once per batch: a batch
        runs on one thread, and a child holds only the thread that forked)."""
        if self._orphaned():
            return False
        with self._lock:
            self._signing += 1
        return True

    def leave(self) -> None:
        with self._lock:
            self._signing -= 1
            if self._signing == 0:
                self._room.notify()

    def start_refill(self) -> None:
        self._thread = threading.Thread(target=self._refill_main, name="nonce-pool", daemon=True)
        self._thread.start()

    def stop_refill(self) -> None:
        if self._thread is None or self._orphaned():  # a forked child has no such thread
            self._thread = None
            return
        with self._lock:
            self._stopping = True
            self._room.notify_all()
        self._thread.join()
        self._thread = None

    def _refill_main(self) -> None:
        try:  # on Linux, pid 0 is the calling thread
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            policy = "SCHED_IDLE"
        except (AttributeError, OSError):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                policy = "nice 19"
            except OSError:
                policy = "normal priority"
        with self._lock:
            self._policy = policy
        while True:
            with self._lock:
                while not self._stopping and (self._level == self._capacity or self._signing > 0):
                    self._room.wait()
                if self._stopping:
                    return
            self.refill(POOL_REFILL_CHUNK)

    def _orphaned(self) -> bool:
        # A forked child never spends its parent's entries: it wipes its copy instead.
        if self._orphan:
            return True
        if os.getpid() == self._owner:
            return False
        self._mem[:] = bytes(len(self._mem))
        self._counts["discarded"] += self._level
        self._level = 0
        self._orphan = True
        return True

    @staticmethod
    def _chunk(count: int) -> bytes:
        """*count* entries, packed (fewer only if some r was 0: probability ~2^-256 each)."""
        # k and kG from OpenSSL through cryptography: a fresh key pair is exactly a nonce and
        # its point (k uniform in [1, n-1]). The native refill reads kG before its affine
        # conversion and batch-inverts the Z too; cryptography only gives the affine x.
        ks, rs = [], []
        for _ in range(count):
            nonce = ec.generate_private_key(ec.SECP256R1())
            ks.append(nonce.private_numbers().private_value)
            rs.append(nonce.public_key().public_numbers().x % _P256_N)
        out = bytearray()
        for kinv, r in zip(_batch_inverse(ks, _P256_N), rs, strict=True):
            if kinv is None or r == 0:  # never, for k in [1, n-1]; ~2^-256 for r
                continue
            kinv_mont = kinv * _R % _P256_N
            out += kinv_mont.to_bytes(32, "big") + r.to_bytes(32, "big")
        return bytes(out)

    def refill(self, max_new: int) -> int:
        added = 0
        if self._orphaned():
            return 0
        while added < max_new:
            with self._lock:
                want = min(POOL_REFILL_CHUNK, max_new - added, self._capacity - self._level)
            if want <= 0:
                break
            chunk = self._chunk(want)
            made = len(chunk) // POOL_ENTRY_SIZE
            if made == 0:  # every r of a chunk 0: something is broken
                if added:
                    break
                raise SigningError("OpenSSL failed to compute nonce pool entries")
            with self._lock:
                if self._orphaned():
                    break
                put = min(made, self._capacity - self._level)
                at = self._level * POOL_ENTRY_SIZE
                self._mem[at : at + put * POOL_ENTRY_SIZE] = chunk[: put * POOL_ENTRY_SIZE]
                self._level += put
                self._counts["refilled"] += put
            added += put
            if put < made:
                break
        return added

    def _take(self) -> bytes | None:  # inside a batch: enter() made the pid check
        with self._lock:
            if self._level == 0:
                self._counts["misses"] += 1
                return None
            self._level -= 1
            self._room.notify()
            at = self._level * POOL_ENTRY_SIZE
            entry = bytes(self._mem[at : at + POOL_ENTRY_SIZE])
            self._mem[at : at + POOL_ENTRY_SIZE] = bytes(POOL_ENTRY_SIZE)
            self._counts["spent"] += 1
            return entry

    def sign(self, digest: bytes) -> bytes | None:
        """r || s with one entry (low S), or None when the pool is empty."""
        n = _P256_N
        z = int.from_bytes(digest, "big") % n  # the whole digest: P-256 is 256 bits
        while (entry := self._take()) is not None:
            kinv = int.from_bytes(entry[:32], "big") * _R_INV % n
            r = int.from_bytes(entry[32:], "big")
            s = kinv * (z + r * self._d) % n
            if s == 0:  # this entry cannot sign z (probability ~2^-256)
                with self._lock:
                    self._counts["discarded"] += 1
                continue
            if s > n // 2:
                s = n - s  # low-S, as for every ES256 signature here
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return None

    def clear(self) -> None:
        if self._orphaned():
            return
        with self._lock:
            self._mem[: self._level * POOL_ENTRY_SIZE] = bytes(self._level * POOL_ENTRY_SIZE)
            self._counts["discarded"] += self._level
            self._level = 0

    def residue(self) -> int:
        if self._orphaned():  # no lock: the parent may have held it at fork time
            return len(self._mem) - self._mem.count(0)
        with self._lock:
            tail = self._mem[self._level * POOL_ENTRY_SIZE :]
            return len(tail) - tail.count(0)

    def info(self) -> NoncePoolInfo:
        orphan = self._orphaned()
        c = self._counts
        return NoncePoolInfo(
            self._capacity,
            self._level,
            c["refilled"],
            c["spent"],
            c["misses"],
            c["discarded"],
            False,
            "the pure-Python reference cannot lock memory",
            False,
            False,
            orphan,
            self._policy if self._thread is not None else None,
        )


def _batch_inverse(values: Sequence[int], m: int) -> list[int | None]:
    """Montgomery's trick: the inverse mod the prime *m* of every value, with one modular
    inversion for all of them (None for a value that is 0 mod m: it is left out of the product,
    so it cannot spoil the others).

    With running products c_i = v_0 ... v_i: 1/v_i = c_(i-1) / c_i, and 1/c_(i-1) = v_i / c_i,
    from the last to the first. The product is blinded: the inversion sees c * b for a fresh
    random b in [1, m-1], uniform and independent of the values (the native code inverts in
    constant time as well; Python's pow does not).
    """
    running = []
    c = 1
    for v in values:
        if v % m:
            c = c * v % m
        running.append(c)
    b = secrets.randbelow(m - 1) + 1
    inv = pow(c * b % m, m - 2, m) * b % m  # 1 / c
    out: list[int | None] = [None] * len(running)
    for i in range(len(running) - 1, -1, -1):
        if values[i] % m == 0:
            continue
        out[i] = inv * (running[i - 1] if i else 1) % m
        inv = inv * values[i] % m
    return out


def _nonce_batch_inverse(values: Sequence[int], *, field: bool = False) -> list[int | None]:
    """Test support: the batch inversion of a nonce pool refill chunk, on the caller's values.

    Returns the inverse of each value modulo P-256's group order n (or its field prime p when
    *field*), None for a value of 0 (no inverse; the others are still right).

    Raises:
        TypeError: a value is not an int.
        ValueError: not 1 to 64 values, or a value not in [0, modulus).
    """
    items = tuple(values)
    m = _P256_P if field else _P256_N
    if not 1 <= len(items) <= POOL_REFILL_CHUNK:
        raise ValueError(f"_nonce_batch_inverse takes 1 to {POOL_REFILL_CHUNK} values")
    for i, v in enumerate(items):
        if type(v) is not int:
            raise TypeError(f"value {i} must be an int, not {type(v).__name__}")
        if not 0 <= v < m:
            raise ValueError(f"value {i} is not in [0, {'p' if field else 'n'})")
    return _batch_inverse(items, m)


def _check_payloads(payloads: Sequence[bytes]) -> tuple[bytes, ...]:
    items = tuple(payloads)
    for i, p in enumerate(items):
        if type(p) is not bytes:
            raise TypeError(f"payload {i} must be bytes, not {type(p).__name__}")
    return items
