"""``dccsign bench core``: the product path, in one process, from parsed DCC to ``HC1:``.

Validation, claims, CBOR, signing, COSE, zlib and base45 all run, exactly as
:class:`~dccsign.dcc.issuer.Issuer` runs them. For this benchmark only, the key is an ephemeral
in-process key (no keystore, no key process), so the figure is the core's ceiling.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import native
from ..dcc.dsc import DSC
from ..dcc.issuer import DEFAULT_VALIDITY, Issuer, SignerKey, claims_prefix
from ..dcc.validate import validate
from ..testing.certs import self_signed_certificate
from ..testing.samples import varied_samples

__all__ = ["ephemeral_certificate", "ephemeral_key", "run"]


def ephemeral_certificate(
    label: str = "dccsign bench EPHEMERAL",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A throw-away P-256 key and a self-signed DSC valid from yesterday for 30 days.

    The DSC has no extended key usage, so it may sign every DCC type.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "NL"),
            x509.NameAttribute(NameOID.COMMON_NAME, label),
        ]
    )
    return key, self_signed_certificate(key, name, days=30)


def ephemeral_key(impl_name: str) -> SignerKey:
    """An :func:`ephemeral_certificate` key, loaded into *impl_name*'s ``SigningKey``."""
    impl = native.implementation(impl_name)
    key, cert = ephemeral_certificate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SignerKey(DSC.from_certificate(cert), impl.SigningKey.load_pem(pem, None))


def _stages(issuer: Issuer, key: SignerKey, dccs: list[dict[str, Any]]) -> dict[str, float]:
    """Microseconds per certificate for each stage, measured one stage at a time."""
    impl = issuer.impl
    n = len(dccs)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for d in dccs:
        validate(d, valuesets=issuer.valuesets)
    out["validate_us"] = (time.perf_counter() - t0) / n * 1e6
    iat, exp = issuer.times_for(key.dsc, DEFAULT_VALIDITY, time.time())
    import cbor2

    t0 = time.perf_counter()
    prefix = claims_prefix(key.dsc.country or "NL", iat, exp)
    payloads = [prefix + cbor2.dumps(d) for d in dccs]
    out["cbor_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    sigs = key.key.sign(key.protected, payloads)
    out["sign_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    impl.hc1_encode(key.protected, payloads, sigs, issuer.zlib_level)
    out["cose_zlib_base45_us"] = (time.perf_counter() - t0) / n * 1e6
    return {k: round(v, 2) for k, v in out.items()}


def run(
    impl_name: str = "native",
    threads: int = 1,
    seconds: float = 5.0,
    batch: int = 64,
    zlib_level: int = 9,
) -> dict[str, Any]:
    """Run the benchmark; return the figures (``certs_per_s`` and per-stage times).

    Each thread repeatedly issues batches of *batch* distinct DCCs through one shared
    :class:`Issuer` (the batch API: the native call releases the GIL for the whole batch).
    """
    if threads < 1 or seconds <= 0 or batch < 1:
        raise ValueError("threads and batch must be >= 1 and seconds > 0")
    key = ephemeral_key(impl_name)
    issuer = Issuer([key], impl=native.implementation(impl_name), zlib_level=zlib_level)
    pool = varied_samples(max(batch * 16, 1024))
    chunks = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)]
    # Warm up (first-use allocations: deflate streams, OpenSSL contexts, caches).
    issuer.issue(chunks[0])
    counts = [0] * threads
    start_barrier = threading.Barrier(threads + 1)
    stop = threading.Event()

    def worker(slot: int) -> None:
        start_barrier.wait()
        i = slot
        done = 0
        while not stop.is_set():
            issuer.issue(chunks[i % len(chunks)])
            done += batch
            i += 1
        counts[slot] = done

    workers = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(threads)]
    for w in workers:
        w.start()
    start_barrier.wait()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    total = sum(counts)
    return {
        "benchmark": "core",
        "impl": impl_name,
        "threads": threads,
        "batch": batch,
        "zlib_level": zlib_level,
        "seconds": round(elapsed, 3),
        "certificates": total,
        "certs_per_s": round(total / elapsed, 1),
        "cpu_cores_used": round(cpu / elapsed, 2),
        "stages": _stages(issuer, key, pool[: min(len(pool), 2000)]),
    }
