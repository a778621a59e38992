"""keyd's instructions per certificate with many accounts (callgrind: repeatable under load).

keyd handles micro-batches of ``--batch`` payloads whose every item is another of
``--accounts`` accounts, in-process (no socket): frame decode, checks, signing, audit lines and
commit, reply encode; ``--no-validate-dcc`` (the Python validator would dominate). Each case
runs twice under ``valgrind --tool=callgrind``, with 2 and with 8 messages: the difference over
6 messages is the per-message work, setup and start-up cancel out. Cases:

* ``columns`` -- the batch as SIGN_COLUMNS (when the dccsign measured has it);
* ``many``    -- the same batch as SIGN_MANY, one part per account (what the engine sent
  before SIGN_COLUMNS);
* ``sign``    -- only ``SigningKey.sign`` over the same payloads: subtracted, it leaves keyd's
  own work per certificate.

The frames are encoded once beforehand, outside valgrind, by this interpreter. To measure an
older checkout, give its interpreter with ``--python`` (its dccsign is the one imported by the
measured runs)::

    .venv/bin/python bench/keyd_callgrind.py --json bench/results/keyd_callgrind-$(date +%F).json
    .venv/bin/python bench/keyd_callgrind.py --python /path/to/before/.venv/bin/python \\
        --json bench/results/keyd_callgrind-$(date +%F)-before.json

About 1 to 2 minutes per valgrind run (six runs, fewer for an older checkout).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import re
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path

from benchsetup import vaccination_batch

_RUN = r"""
import pickle, sys, tempfile
from pathlib import Path
from dccsign import native
from dccsign.keys.keystore import Keystore, resolve_passphrase
case, n, data = sys.argv[1], int(sys.argv[2]), pickle.load(open(sys.argv[3], "rb"))
ks = Path(data["keystore"])
pw = resolve_passphrase(ks)
if case == "sign":
    store = Keystore.open(ks)
    entry = next(e for e in store.entries if e.kid == data["kid"])
    key = store.load_signing_key(entry, pw, native)
    protected = native.protected_header(entry.dsc.alg, entry.dsc.kid)
    for _ in range(n):
        key.sign(protected, data["payloads"])
    sys.exit(0)
from dccsign.audit.key import AuditKey
from dccsign.audit.writer import AuditLog
from dccsign.keyd.service import Keyd
from dccsign.protocol.keyd import Connection
tmp = Path(tempfile.mkdtemp())
log = AuditLog.open(tmp / "audit", AuditKey.create(tmp / "audit-key.pem", pw))
keyd = Keyd(ks, pw, log, validate_dcc=False, nonce_pool=0)
conn = Connection(scan=native.cbor_scan)
for wire in data["wires"][case][:n]:
    conn.receive_data(wire)
    reply = keyd.handle(conn.next_event())
    conn.send(reply)
    signed = reply.codes.count(0) if hasattr(reply, "codes") else sum(
        isinstance(r, bytes) for r in reply.results)
    assert signed == len(data["payloads"]), reply
keyd.close()
log.close()
"""


def _collected(python: str, case: str, n: int, data: Path, out: Path) -> int:
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            python,
            "-c",
            _RUN,
            case,
            str(n),
            str(data),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode or not match:
        raise SystemExit(f"{case} x{n} failed:\n{proc.stderr[-3000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--python", default=sys.executable, help="the interpreter measured")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    from dccsign.protocol import keyd as kp

    with tempfile.TemporaryDirectory() as tmp:
        signing = vaccination_batch(Path(tmp) / "ks", args.batch)
        payloads, kid = signing.payloads, signing.entry.kid
        names = [f"uzi:{k:06d}" for k in range(args.accounts)]
        conn = kp.Connection()
        wires: dict[str, list[bytes]] = {"many": [], "columns": []}
        ends = array("I", itertools.accumulate(map(len, payloads)))
        zeros = array("I", bytes(4 * len(payloads)))
        for r in range(8):
            accounts = [names[(r * args.batch + j) % args.accounts] for j in range(args.batch)]
            pairs = zip(accounts, payloads, strict=True)
            parts = tuple(kp.SignPart("bench", a, (p,)) for a, p in pairs)
            wires["many"].append(conn.send(kp.SignMany(r + 1, kid, parts)))
            columns = kp.KeydColumns(
                b"".join(payloads),
                ends,
                ("bench",),
                tuple(accounts),
                (None,),
                zeros,
                array("I", range(args.batch)),
                zeros,
            )
            wires["columns"].append(conn.send(kp.SignColumns(r + 1, kid, columns)))
        data = Path(tmp) / "frames.pkl"
        data.write_bytes(
            pickle.dumps(
                {
                    "keystore": str(signing.store.directory),
                    "kid": kid,
                    "payloads": payloads,
                    "wires": wires,
                }
            )
        )
        probe = subprocess.run(
            [
                args.python,
                "-c",
                "import dccsign.protocol.keyd as k; print(hasattr(k, 'SignColumns'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        cases = ["sign", "many"] + (["columns"] if probe.stdout.strip() == "True" else [])
        code = subprocess.run(
            [
                args.python,
                "-c",
                "import dccsign, pathlib; print(pathlib."
                "Path(dccsign.__file__).resolve().parent.parent)",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit = subprocess.run(
            ["git", "-C", code, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        result: dict[str, object] = {
            "batch": args.batch,
            "accounts": args.accounts,
            "code": {"checkout": code, "commit": commit},
        }
        per_cert: dict[str, float] = {}
        for case in cases:
            counts = {
                n: _collected(args.python, case, n, data, Path(tmp) / f"cg.{case}.{n}")
                for n in (2, 8)
            }
            per_cert[case] = (counts[8] - counts[2]) / (6 * args.batch)
            result[case] = {
                "instructions_2": counts[2],
                "instructions_8": counts[8],
                "per_certificate": round(per_cert[case]),
            }
            print(f"{case}: {per_cert[case]:,.0f} instructions per certificate", flush=True)
        for case in cases[1:]:
            own = per_cert[case] - per_cert["sign"]
            result[f"{case}_without_signing"] = round(own)
            print(f"{case} without signing: {own:,.0f} instructions per certificate")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
