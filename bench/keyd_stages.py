"""Where keyd's connection thread spends its CPU per certificate, stage by stage (issue 14).

keyd runs in this process (no socket) on a development keystore with a nonce pool, filled
before measuring: ``--messages`` SIGN_COLUMNS messages of ``--batch`` vaccination payloads,
each item another of 10,000 accounts (the engine's load), go through the keyd codec, ``Keyd.handle``
and back through the codec. Each stage is wrapped with a ``time.thread_time`` accumulator:
the codec's decode and encode, ``Keyd._start`` (structural checks, ``keyd_check_columns``, DCC
validation, ``validate_cwt_batch``), ``_sign``, ``_finish`` (``audit.append_columns_many``:
``audit_issue_columns`` and the commit). Stages nest (a parent includes its children); the
first 50 messages warm up and are not counted. Thread CPU, so the numbers move with the
machine: compare stages within one run.

    .venv/bin/python bench/keyd_stages.py [--messages 600] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import functools
import itertools
import json
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchsetup import vaccination_batch
from dccsign import native
from dccsign.audit.key import AuditKey
from dccsign.audit.writer import AuditLog
from dccsign.keyd import service as keyd_module
from dccsign.keys.keystore import resolve_passphrase
from dccsign.protocol import keyd as kp

WARM_UP = 50


def _timed(acc: collections.Counter[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.thread_time() - start

    return wrapper


class _Impl:
    """The native module with some functions timed (keyd calls them as ``self._impl.X``)."""

    def __init__(self, acc: collections.Counter[str]) -> None:
        self._acc = acc

    def __getattr__(self, name: str) -> Any:
        fn = getattr(native, name)
        if name in ("keyd_check_columns", "validate_cwt_batch"):
            return _timed(self._acc, f"{name} (native)", fn)
        return fn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--pool", type=int, default=65536, help="nonce pool entries per key")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    if args.messages <= WARM_UP:
        parser.error(f"--messages must be more than {WARM_UP}")
    acc: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="dccsign-keyd-stages-") as tmp_name:
        tmp = Path(tmp_name)
        signing = vaccination_batch(tmp / "ks", args.batch)
        ends = array("I", itertools.accumulate(map(len, signing.payloads)))
        zeros = array("I", bytes(4 * args.batch))
        encoder = kp.Connection()
        wires = []
        for r in range(args.messages):
            accounts = tuple(f"uzi:{(r * args.batch + j) % 10_000:06d}" for j in range(args.batch))
            columns = kp.KeydColumns(
                b"".join(signing.payloads), ends, ("bench",), accounts, (None,), zeros,
                array("I", range(args.batch)), zeros,
            )  # fmt: skip
            wires.append(encoder.send(kp.SignColumns(r + 1, signing.entry.kid, columns)))
        store = signing.store.directory
        passphrase = resolve_passphrase(store)
        log = AuditLog.open(tmp / "audit", AuditKey.create(tmp / "audit-key.pem", passphrase))
        keyd = keyd_module.Keyd(store, passphrase, log, nonce_pool=args.pool, validate_dcc=True)
        try:
            keyd._impl = _Impl(acc)
            for name in ("_start", "_sign", "_finish", "_validate_columns"):
                setattr(keyd, name, _timed(acc, f"Keyd.{name}", getattr(keyd, name)))
            audit = keyd.audit
            audit.append_columns_many = _timed(
                acc, "audit.append_columns_many", audit.append_columns_many
            )
            audit._commit = _timed(acc, "audit._commit", audit._commit)
            native_lines = native.audit_issue_columns
            sys.modules["dccsign.audit.writer"].native = _LinesTimed(acc, native_lines)
            _wait_for_pools(keyd, args.pool)
            codec = kp.Connection(scan=native.cbor_scan)

            def run(messages: list[bytes]) -> None:
                for wire in messages:
                    start = time.thread_time()
                    codec.receive_data(wire)
                    event = codec.next_event()
                    acc["codec: decode"] += time.thread_time() - start
                    start = time.thread_time()
                    reply = keyd.handle(event)
                    acc["Keyd.handle"] += time.thread_time() - start
                    start = time.thread_time()
                    codec.send(reply)
                    acc["codec: encode the reply"] += time.thread_time() - start

            run(wires[:WARM_UP])
            acc.clear()
            start = time.thread_time()
            run(wires[WARM_UP:])
            total = time.thread_time() - start
        finally:
            keyd.close()
            log.close()
    certs = (args.messages - WARM_UP) * args.batch
    stages = {k: round(1e6 * v / certs, 3) for k, v in acc.most_common()}
    print(f"keyd connection thread: {1e6 * total / certs:.2f} us CPU per certificate")
    for name, us in stages.items():
        print(f"  {us:7.2f}  {name}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python bench/keyd_stages.py " + " ".join(sys.argv[1:]),
            "batch": args.batch, "messages_measured": args.messages - WARM_UP,
            "us_per_cert": round(1e6 * total / certs, 3), "stages_us_per_cert": stages,
        }, indent=1) + "\n")  # fmt: skip
    return 0


class _LinesTimed:
    """``dccsign.native`` as the audit module sees it, with ``audit_issue_columns`` timed."""

    def __init__(self, acc: collections.Counter[str], lines: Callable[..., Any]) -> None:
        self.audit_issue_columns = _timed(acc, "audit_issue_columns (native)", lines)

    def __getattr__(self, name: str) -> Any:
        return getattr(native, name)


def _wait_for_pools(keyd: Any, want: int, timeout: float = 180.0) -> None:
    """Until every pooled key's nonce pool holds *want* entries (or its capacity)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [
            k.key.nonce_pool_info()
            for k in keyd._keys.values()
            if keyd_module._poolable(k.key)
        ]  # fmt: skip
        if infos and all(i is not None and i.level >= min(want, i.capacity) for i in infos):
            return
        time.sleep(0.5)
    raise SystemExit("the nonce pools did not fill in time")


if __name__ == "__main__":
    raise SystemExit(main())
