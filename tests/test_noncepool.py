"""The nonce pool of ES256 signing keys (DESIGN.md, "Nonce pool"), against both
implementations: each safety rule of issue 6 has a test here.

Signatures are checked by two verifiers that share no code with the signer's arithmetic:
``cryptography`` (OpenSSL's ECDSA verify) for every signature, and python-ecdsa (pure
Python, its own curve arithmetic) for a sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path

import ecdsa
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
KID = bytes.fromhex("a1b2c3d4e5f60718")

# Payload counts: the pure-Python reference computes each entry in Python.
MANY = {"native": 20_000, "python": 600}
#: Entries per refill chunk, and per chunk of the background thread (noncepool.h).
CHUNK = 64
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF


@pytest.fixture(scope="module")
def ec_private():
    return ec.generate_private_key(ec.SECP256R1())


def _is_reference(impl) -> bool:
    return impl.__name__.endswith("_reference")


def _wait_full(key, capacity: int, deadline: float) -> None:
    """Until the background refill has filled the pool (fails at *deadline*)."""
    while key.nonce_pool_info().level < capacity:
        assert time.monotonic() < deadline, key.nonce_pool_info()
        time.sleep(0.01)


def _key(impl, private):
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return impl.SigningKey.load_pem(pem, None)


def _payloads(n: int, tag: str = "p") -> list[bytes]:
    return [f"{tag} {i}".encode() for i in range(n)]


def _r(sig: bytes) -> int:
    return int.from_bytes(sig[:32], "big")


def _verify_all(impl, private, protected, payloads, sigs, *, sample: int = 200) -> None:
    pub = private.public_key()
    for payload, sig in zip(payloads, sigs, strict=True):
        assert len(sig) == 64
        r, s = _r(sig), int.from_bytes(sig[32:], "big")
        assert 0 < r < N and 0 < s <= N // 2  # low-S, as every ES256 signature here
        pub.verify(
            encode_dss_signature(r, s),
            impl.sig_structure(protected, payload),
            ec.ECDSA(hashes.SHA256()),
        )
    point = pub.public_numbers()
    vk = ecdsa.VerifyingKey.from_public_point(
        ecdsa.ellipticcurve.Point(ecdsa.NIST256p.curve, point.x, point.y),
        curve=ecdsa.NIST256p,
        hashfunc=hashlib.sha256,
    )
    step = max(1, len(sigs) // sample)
    for payload, sig in list(zip(payloads, sigs, strict=True))[::step]:
        assert vk.verify(sig, impl.sig_structure(protected, payload), hashlib.sha256)


def test_pool_signatures_verify_and_never_repeat_r(impl, ec_private):
    """The statistical test: many pool signatures, no r twice, every one valid."""
    n = MANY["python" if _is_reference(impl) else "native"]
    key = _key(impl, ec_private)
    key.enable_nonce_pool(n)
    assert key.refill_nonce_pool(n) == n
    protected = impl.protected_header(-7, KID)
    payloads = _payloads(n)
    sigs = key.sign(protected, payloads)
    info = key.nonce_pool_info()
    assert (info.level, info.spent, info.misses) == (0, n, 0)  # every signature from the pool
    assert len({_r(s) for s in sigs}) == n
    _verify_all(impl, ec_private, protected, payloads, sigs)


def test_each_entry_is_used_once_and_its_slot_wiped(impl, ec_private):
    key = _key(impl, ec_private)
    key.enable_nonce_pool(40)
    assert key.refill_nonce_pool(100) == 40  # never more than the bound
    assert key.refill_nonce_pool(5) == 0  # full
    assert key._nonce_pool_residue() == 0
    protected = impl.protected_header(-7, KID)
    first = key.sign(protected, [b"same payload"] * 25)
    info = key.nonce_pool_info()
    assert (info.level, info.spent, info.refilled) == (15, 25, 40)
    # Every spent slot reads as zeros at once: nothing of a used entry stays behind.
    assert key._nonce_pool_residue() == 0
    rest = key.sign(protected, [b"same payload"] * 20)  # 15 from the pool, then 5 without
    info = key.nonce_pool_info()
    assert (info.level, info.spent, info.misses) == (0, 40, 5)
    rs = [_r(s) for s in first + rest]
    assert len(set(rs)) == 45  # the same message never gets the same nonce twice
    _verify_all(impl, ec_private, protected, [b"same payload"] * 45, first + rest)


def test_empty_pool_falls_back_without_error(impl, ec_private):
    key = _key(impl, ec_private)
    key.enable_nonce_pool(8)  # never refilled
    protected = impl.protected_header(-7, KID)
    payloads = _payloads(6)
    sigs = key.sign(protected, payloads)
    _verify_all(impl, ec_private, protected, payloads, sigs)
    info = key.nonce_pool_info()
    assert (info.spent, info.misses) == (0, 6)


def test_clear_and_close_wipe_every_entry(impl, ec_private):
    key = _key(impl, ec_private)
    key.enable_nonce_pool(30)
    key.refill_nonce_pool(30)
    key.clear_nonce_pool()
    info = key.nonce_pool_info()
    assert (info.level, info.discarded) == (0, 30)
    assert key._nonce_pool_residue() == 0  # the whole mapping reads as zeros
    assert key.refill_nonce_pool(10) == 10  # a cleared pool stays usable
    key.close_nonce_pool()
    assert key.nonce_pool_info() is None
    protected = impl.protected_header(-7, KID)
    _verify_all(impl, ec_private, protected, [b"x"], key.sign(protected, [b"x"]))
    key.enable_nonce_pool(4)  # a new, empty pool after close
    assert key.nonce_pool_info().level == 0


def test_forked_child_never_spends_the_parents_entries(impl, ec_private):
    key = _key(impl, ec_private)
    key.enable_nonce_pool(50)
    key.refill_nonce_pool(50)
    protected = impl.protected_header(-7, KID)
    payloads = _payloads(10, "child")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running any pytest machinery
        code = 1
        try:
            before = key.nonce_pool_info()
            sigs = key.sign(protected, payloads)
            after = key.nonce_pool_info()
            report = {
                "orphaned": before.orphaned,
                "level": before.level,
                "spent_delta": after.spent - before.spent,
                "residue": key._nonce_pool_residue(),
                "refilled": key.refill_nonce_pool(10),
                "sigs": [s.hex() for s in sigs],
            }
            os.write(write, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    child = json.loads(b"".join(chunks))
    assert child["orphaned"] is True
    assert child["level"] == 0  # the child's copy was discarded before any use
    assert child["spent_delta"] == 0  # it signed the ordinary way
    assert child["residue"] == 0  # and its copy of the entries is wiped
    assert child["refilled"] == 0  # nor does it refill a pool that is not its own
    child_sigs = [bytes.fromhex(h) for h in child["sigs"]]
    _verify_all(impl, ec_private, protected, payloads, child_sigs)
    # The parent still holds all 50 and spends them; none of its r is one the child used.
    assert key.nonce_pool_info().level == 50
    parent = key.sign(protected, _payloads(50))
    assert key.nonce_pool_info().spent == 50
    assert not {_r(s) for s in parent} & {_r(s) for s in child_sigs}


@contextlib.contextmanager
def _full_background_pool(impl, private, capacity: int):
    """``(key, deadline)``: a key whose background-refilled nonce pool of *capacity* is full,
    and the time by which the test's waits must end; the pool is closed on exit."""
    key = _key(impl, private)
    key.enable_nonce_pool(capacity, background=True)
    try:
        deadline = time.monotonic() + 60
        _wait_full(key, capacity, deadline)
        yield key, deadline
    finally:
        key.close_nonce_pool()


def test_background_refill_fills_at_low_priority_and_refills_after_use(impl, ec_private):
    capacity = 64 if _is_reference(impl) else 2_000
    with _full_background_pool(impl, ec_private, capacity) as (key, deadline):
        info = key.nonce_pool_info()
        assert info.refill_thread in ("SCHED_IDLE", "nice 19")  # root or not, lowering works
        threads = _threads_named_or_idle()
        assert threads, "no SCHED_IDLE or nice-19 thread found in this process"
        protected = impl.protected_header(-7, KID)
        key.sign(protected, _payloads(capacity // 2))
        _wait_full(key, capacity, deadline)  # spent entries are replaced
        info = key.nonce_pool_info()
        assert info.refilled == capacity + capacity // 2 and info.spent == capacity // 2
    assert key.nonce_pool_info() is None


def test_background_refill_yields_to_live_signing(impl, ec_private):
    """While a batch signs, the refill thread starts no chunk: a batch that drains the pool
    keeps it (nearly) empty until it ends, and the pool fills once it has."""
    import threading

    capacity = 32 if _is_reference(impl) else 500
    with _full_background_pool(impl, ec_private, capacity) as (key, deadline):
        protected = impl.protected_header(-7, KID)
        n = capacity + (300 if _is_reference(impl) else 20_000)
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (key.sign(protected, _payloads(n)), done.set()), daemon=True
        )
        worker.start()
        seen = []  # (misses, refilled) from the moment the batch drained the pool
        while not done.is_set():
            info = key.nonce_pool_info()
            if info.spent >= capacity:  # drained: from here on only misses, no refill
                seen.append((info.misses, info.refilled))
            time.sleep(0.002)
        worker.join()
        # Only what was seen before the batch's last miss was seen while it was signing: once
        # it leaves, the refill starts at once, while sign() still builds its result list.
        last_miss = key.nonce_pool_info().misses
        during = [refilled for misses, refilled in seen if misses < last_miss]
        assert len(during) >= 3, "the batch ended before it drained the pool"
        # Nothing added while the batch went on (entries would be spent at once, so the
        # level alone could not tell), except one chunk already under way.
        assert during[-1] - capacity <= CHUNK, during
        _wait_full(key, capacity, deadline)  # and refilled once signing stopped


def _threads_named_or_idle() -> list[str]:
    """Threads of this process that run at SCHED_IDLE (policy 5) or nice 19, from /proc."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        nice, policy = int(fields[16]), int(fields[38])
        if policy == 5 or nice == 19:
            found.append(tid)
    return found


def test_native_pool_memory_is_locked_undumpable_and_wiped_on_fork(ec_private):
    """The kernel's view of the mapping (/proc/self/smaps VmFlags): lo = mlock'ed, dd = not
    in core dumps, wf = zeroed in a forked child."""
    from conftest import _load_impl  # skips (or fails where the build is mandatory) as impl

    native = _load_impl("native")
    key = _key(native, ec_private)
    capacity = 12_347  # an unusual size, to find the mapping among the others
    info = key.enable_nonce_pool(capacity)
    assert info.dontdump and info.wipeonfork
    size_kb = -(-capacity * 64 // 4096) * 4
    smaps = Path("/proc/self/smaps").read_text()
    blocks = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps)
    flags = [
        re.search(r"VmFlags:(.*)", b).group(1).split()
        for b in blocks
        if re.search(rf"^Size:\s+{size_kb} kB", b, re.M) and "VmFlags" in b
    ]
    assert any("dd" in f and "wf" in f for f in flags), flags
    if info.locked:
        assert any("lo" in f for f in flags), flags
        assert info.lock_error is None
    else:  # RLIMIT_MEMLOCK too small for this process: it says why, and keyd logs it
        assert info.lock_error


def test_pool_api_has_no_way_to_read_an_entry(impl, ec_private):
    """The pool is spent by sign() only: nothing returns entries, and the key cannot be
    pickled or copied out of the process."""
    import pickle

    key = _key(impl, ec_private)
    key.enable_nonce_pool(4)
    key.refill_nonce_pool(4)
    # (The reference's ``_pool`` slot is plain Python, open to introspection like all of it.)
    public = {n for n in dir(type(key)) if "pool" in n and n != "_pool"}
    assert public == {
        "enable_nonce_pool",
        "refill_nonce_pool",
        "nonce_pool_info",
        "clear_nonce_pool",
        "close_nonce_pool",
        "_nonce_pool_residue",
    }
    info = key.nonce_pool_info()
    assert all(isinstance(v, (int, bool, str, type(None))) for v in info)
    assert isinstance(key._nonce_pool_residue(), int)
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_pool_refusals(impl, ec_private):
    key = _key(impl, ec_private)
    with pytest.raises(ValueError, match="no nonce pool"):
        key.refill_nonce_pool(1)
    for bad in (0, -1, 1 << 25):
        with pytest.raises(ValueError, match="capacity"):
            key.enable_nonce_pool(bad)
    with pytest.raises(TypeError):
        key.enable_nonce_pool(2.5)
    key.enable_nonce_pool(2)
    with pytest.raises(ValueError, match="already"):
        key.enable_nonce_pool(2)
    with pytest.raises(ValueError, match="max_entries"):
        key.refill_nonce_pool(-1)
    pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="ES256"):
        impl.SigningKey.load_pem(pem, None).enable_nonce_pool(2)


# ----------------------------------------------------------------------------- batch refill


@pytest.mark.parametrize(
    ("capacity", "asked"),
    [
        (1, 1),  # a chunk of one
        (2, 2),
        (37, 37),  # odd
        (CHUNK, CHUNK),  # one full chunk
        (CHUNK + 37, CHUNK + 37),  # a full chunk, then a partial one
        (3 * CHUNK, 3 * CHUNK),
        (CHUNK + 5, 500),  # the pool's room cuts the last chunk short
    ],
)
def test_batch_refilled_entries_sign_verify_and_differ(impl, ec_private, capacity, asked):
    """Each refill chunk shares one inversion mod n (and natively one mod p): every entry of
    every chunk shape must still carry its own correct k^-1 and r = x(kG)."""
    key = _key(impl, ec_private)
    key.enable_nonce_pool(capacity)
    assert key.refill_nonce_pool(asked) == capacity
    assert key._nonce_pool_residue() == 0
    protected = impl.protected_header(-7, KID)
    payloads = _payloads(capacity, f"chunk {capacity}")
    sigs = key.sign(protected, payloads)
    info = key.nonce_pool_info()
    assert (info.level, info.refilled, info.spent, info.misses) == (0, capacity, capacity, 0)
    assert len({_r(s) for s in sigs}) == capacity  # no entry twice, no nonce twice
    # Both verifiers on every signature: cryptography (OpenSSL), and python-ecdsa (its own
    # curve arithmetic, none shared with the refill) on a sample of up to 200.
    _verify_all(impl, ec_private, protected, payloads, sigs)


def test_refills_of_one_entry_at_a_time_differ(impl, ec_private):
    """Chunks of one, one after another (each its own randomness and its own inversion)."""
    key = _key(impl, ec_private)
    key.enable_nonce_pool(12)
    assert [key.refill_nonce_pool(1) for _ in range(12)] == [1] * 12
    protected = impl.protected_header(-7, KID)
    sigs = key.sign(protected, [b"same"] * 12)
    assert key.nonce_pool_info().misses == 0
    assert len({_r(s) for s in sigs}) == 12
    _verify_all(impl, ec_private, protected, [b"same"] * 12, sigs)


@pytest.mark.parametrize("field", [False, True], ids=["mod n", "mod p"])
@pytest.mark.parametrize("count", [1, 2, 3, 33, CHUNK - 1, CHUNK])
def test_batch_inverse_matches_pow(impl, field, count):
    m = P if field else N
    values = [int.from_bytes(os.urandom(32), "big") % (m - 1) + 1 for _ in range(count)]
    values[0] = 1
    values[-1] = m - 1  # (m - 1)^-1 = m - 1
    out = impl._nonce_batch_inverse(values, field=field)
    assert out == [pow(v, -1, m) for v in values]


@pytest.mark.parametrize("field", [False, True], ids=["mod n", "mod p"])
def test_batch_inverse_a_zero_cannot_poison_the_chunk(impl, field):
    """A value with no inverse (0) is left out of the running product: it gets None and every
    other value still gets its inverse, wherever the zero is and however many there are. (The
    refill never makes one: k is in [1, n-1] by construction; this is its fallback.)"""
    m = P if field else N
    base = [int.from_bytes(os.urandom(32), "big") % (m - 1) + 1 for _ in range(9)]
    for zeros in ({0}, {4}, {8}, {0, 8}, {1, 2, 3}, set(range(9))):
        values = [0 if i in zeros else v for i, v in enumerate(base)]
        out = impl._nonce_batch_inverse(values, field=field)
        assert out == [None if v == 0 else pow(v, -1, m) for v in values], zeros
    assert impl._nonce_batch_inverse([0], field=field) == [None]


def test_batch_inverse_refusals(impl):
    with pytest.raises(ValueError, match="1 to 64 values"):
        impl._nonce_batch_inverse([])
    with pytest.raises(ValueError, match="1 to 64 values"):
        impl._nonce_batch_inverse([1] * (CHUNK + 1))
    with pytest.raises(ValueError, match=r"value 1 is not in \[0, n\)"):
        impl._nonce_batch_inverse([1, N])
    with pytest.raises(ValueError, match=r"value 0 is not in \[0, p\)"):
        impl._nonce_batch_inverse([-1], field=True)
    assert impl._nonce_batch_inverse([N], field=True) == [pow(N, -1, P)]  # N < p
    with pytest.raises(TypeError, match="value 0 must be an int"):
        impl._nonce_batch_inverse([1.0])


def test_reference_refill_drops_an_entry_without_inverse_and_keeps_going(ec_private, monkeypatch):
    """The refill's fallback, where it can be reached: the reference's refill calls the same
    batch inversion as the test above; when it reports an entry without an inverse, that
    entry is dropped, the rest of its chunk is kept, and the refill makes up the count."""
    from conftest import _load_impl
    from dccsign.native import _signing_py

    reference = _load_impl("python")
    real = _signing_py._batch_inverse
    calls = []

    def with_a_hole(values, m):
        out = real(values, m)
        calls.append(len(values))
        if len(out) > 2:
            out[2] = None  # as if the third k had been 0
        return out

    monkeypatch.setattr(_signing_py, "_batch_inverse", with_a_hole)
    key = _key(reference, ec_private)
    key.enable_nonce_pool(10)
    assert key.refill_nonce_pool(10) == 10
    assert calls == [10, 1]  # the chunk gave 9, a chunk of one made up the tenth
    protected = reference.protected_header(-7, KID)
    sigs = key.sign(protected, _payloads(10))
    assert key.nonce_pool_info().misses == 0
    _verify_all(reference, ec_private, protected, _payloads(10), sigs)


def test_unlocked_pool_still_signs_correctly(ec_private, tmp_path):
    """mlock may fail (RLIMIT_MEMLOCK, by default 8 MiB on current kernels, against 64 MiB for
    a pool of a million entries). Then the pool says so (keyd logs it with the limit to set)
    and works the same: refills, signs, wipes; it is still kept out of core dumps and zeroed
    in a forked child. Run in a child process without CAP_IPC_LOCK and with a 64 KiB limit."""
    import shutil
    import subprocess
    import sys

    from conftest import _load_impl

    _load_impl("native")  # skips (or fails where the build is mandatory) as impl
    pem = ec_private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "key.pem").write_bytes(pem)
    code = """
import json, resource, sys
from dccsign.native import _native as native
hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
limit = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
key = native.SigningKey.load_pem(open(sys.argv[1], "rb").read(), None)
info = key.enable_nonce_pool(100_000)  # 6.4 MB: beyond the limit
added = key.refill_nonce_pool(300)
protected = native.protected_header(-7, bytes.fromhex(sys.argv[2]))
sigs = key.sign(protected, [b"p %d" % i for i in range(300)])
after = key.nonce_pool_info()
key.clear_nonce_pool()
print(json.dumps({"locked": info.locked, "lock_error": info.lock_error,
                  "dontdump": info.dontdump, "wipeonfork": info.wipeonfork, "added": added,
                  "spent": after.spent, "misses": after.misses,
                  "residue": key._nonce_pool_residue(), "sigs": [s.hex() for s in sigs]}))
"""
    cmd = [sys.executable, "-c", code, str(tmp_path / "key.pem"), KID.hex()]
    if os.geteuid() == 0:  # root locks whatever the limit: take CAP_IPC_LOCK away first
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop CAP_IPC_LOCK")
        cmd = [setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout)
    assert child["locked"] is False and child["lock_error"], child
    assert child["dontdump"] and child["wipeonfork"]
    assert (child["added"], child["spent"], child["misses"], child["residue"]) == (300, 300, 0, 0)
    sigs = [bytes.fromhex(h) for h in child["sigs"]]
    assert len({_r(s) for s in sigs}) == 300
    payloads = [b"p %d" % i for i in range(300)]
    _verify_all(
        _load_impl("native"),
        ec_private,
        _load_impl("native").protected_header(-7, KID),
        payloads,
        sigs,
    )
