"""What the benchmark scripts of this directory set up alike: a fresh development engine on
loopback TLS, a development keystore with a batch of real vaccination CWT payloads, threads
timed together, and the dated result file in bench/results/.

Imported by the scripts next to it (``python bench/X.py`` puts this directory on the path);
nothing in the product imports it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DCCSIGN = [sys.executable, "-m", "dccsign"]
RESULTS = Path(__file__).resolve().parent / "results"


def save_result(doc: Any, name: str, path: Path | None = None, *, indent: int = 1) -> Path:
    """Write *doc* as JSON to *path*, by default ``bench/results/NAME-YYYY-MM-DD.json``
    (today's date); returns the path written."""
    path = path or RESULTS / f"{name}-{dt.date.today()}.json"
    path.write_text(json.dumps(doc, indent=indent) + "\n")
    return path


def timed_threads(work: Callable[[int], None], n: int) -> float:
    """Run ``work(0)`` .. ``work(n - 1)`` on *n* threads at once; the wall seconds from the
    first start to the last end."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DevEngine:
    """A running ``dccsign serve --dev`` (see :func:`dev_engine`)."""

    proc: subprocess.Popen[bytes]
    port: int
    http: int
    store: Path

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http}/metrics"

    def load_args(self) -> list[str]:
        """The ``dccsign bench load`` options that reach it: TLS with the development client
        certificate, and its metrics endpoint."""
        tls = self.store / "dev-tls"
        return [
            "--server",
            f"127.0.0.1:{self.port}",
            "--cert",
            str(tls / "client-cert.pem"),
            "--key",
            str(tls / "client-key.pem"),
            "--ca",
            str(tls / "ca.pem"),
            "--metrics",
            self.metrics_url(),
        ]


@contextlib.contextmanager
def dev_engine(work: Path, extra: Sequence[str] = ()) -> Iterator[DevEngine]:
    """``dccsign serve --dev`` in *work* (keystore, TLS and policy created there; its stderr
    in ``work/engine.log``) on free TCP and HTTP ports, once it accepts connections; stopped
    with SIGTERM (killed after 60 s) on leaving.

    Raises:
        SystemExit: the engine exited or did not accept within 60 s (with its log).
    """
    port, http = free_port(), free_port()
    store = work / "keystore"
    with open(work / "engine.log", "wb") as log:
        proc = subprocess.Popen(
            [
                *DCCSIGN,
                "serve",
                "--dev",
                "--keystore",
                str(store),
                "--tcp",
                f"127.0.0.1:{port}",
                "--http",
                f"127.0.0.1:{http}",
                *extra,
            ],
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / "engine.log").read_text()) from None
                time.sleep(0.2)
        yield DevEngine(proc, port, http, store)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Signing:
    """The vaccination key of a development keystore, loaded in this process, and a batch of
    CWT payloads it may sign (see :func:`vaccination_batch`)."""

    store: Any  # dccsign.keys.keystore.Keystore
    entry: Any  # its KeyEntry
    key: Any  # native SigningKey
    protected: bytes
    payloads: list[bytes]

    def load_key(self) -> Any:
        """Another in-process copy of the key (one without a nonce pool, say)."""
        from dccsign import native
        from dccsign.keys.keystore import Keystore, resolve_passphrase

        directory = self.store.directory
        return Keystore.open(directory).load_signing_key(
            self.entry, resolve_passphrase(directory), native
        )


def vaccination_batch(directory: Path, batch: int) -> Signing:
    """A development keystore in *directory*, and *batch* distinct vaccination DCCs as CWT
    payloads (issued an hour ago, valid a day) for its vaccination key."""
    import cbor2

    from dccsign import native
    from dccsign.dcc.issuer import claims_prefix
    from dccsign.keys.keystore import init_dev
    from dccsign.testing.samples import varied_samples

    store = init_dev(directory)
    entry = next(e for e in store.entries if e.dsc.usages == frozenset("v"))
    now = int(time.time())
    prefix = claims_prefix("NL", now - 3600, now + 86400)
    dccs = [d for d in varied_samples(batch * 3) if "v" in d][:batch]
    signing = Signing(
        store,
        entry,
        None,
        native.protected_header(-7, entry.kid),
        [prefix + cbor2.dumps(d) for d in dccs],
    )
    signing.key = signing.load_key()
    return signing
