"""Signing with a SoftHSM2 token key: through keyd vs the token called directly, same run.

The target of issue 3: through keyd, at least 80 % of what the token does when called
directly. "Directly" is python-pkcs11 ``CKM_ECDSA`` on a precomputed digest, one call per
signature, in this process; "through keyd" is a batch of CWT payloads sent to a private keyd
that holds the same token key (it re-checks, hashes, signs in the token, audits, answers).

Usage::

    .venv/bin/python bench/keyd_pkcs11_compare.py [--batch 100] [--seconds 3] [--rounds 3]

Needs SoftHSM2 (Debian softhsm2). Everything (token, keystore, audit log) lives in a
temporary directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2
from keyd_compare import rate_two_connections  # bench/ is this script's directory

from dccsign.dcc.issuer import claims_prefix
from dccsign.keyd.supervisor import PrivateKeyd
from dccsign.keys.keystore import init_dev, resolve_passphrase
from dccsign.keys.lifecycle import issue_with_dev_csca
from dccsign.testing.cli import csr_argv, token_generate_argv
from dccsign.testing.samples import varied_samples

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "135790"


def _cli(*argv: object) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dccsign", *map(str, argv)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out.stdout.decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "tokens").mkdir()
        conf = root / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                "bench",
                "--so-pin",
                "24681357",
                "--pin",
                PIN,
            ],
            check=True,
            capture_output=True,
        )
        pin = root / "pin"
        pin.write_text(PIN + "\n")
        store = init_dev(root / "ks")
        ks = store.directory
        name = _cli(*token_generate_argv(ks, module=MODULE, label="bench", pin_file=pin))
        csr_pem = _cli(*csr_argv(ks, name, subject="CN=bench,C=NL", usage="vaccination")).encode()
        dsc = issue_with_dev_csca(ks, csr_pem, resolve_passphrase(ks), days=30)
        (root / "dsc.pem").write_bytes(dsc)
        kid = bytes.fromhex(
            _cli("keys", "import-cert", "--keystore", ks, "--key", name, root / "dsc.pem")
        )
        _cli("keys", "activate", "--keystore", ks, "--kid", kid.hex())
        key_id = bytes.fromhex(
            next(
                k
                for k in __import__("json").loads((ks / "keystore.json").read_text())["keys"]
                if k["name"] == name
            )["pkcs11"]["key_id"]
        )

        prefix = claims_prefix("NL", int(time.time()) - 3600, int(time.time()) + 86400)
        payloads = [prefix + cbor2.dumps(d) for d in varied_samples(args.batch * 3) if "v" in d][
            : args.batch
        ]

        rows = []
        with PrivateKeyd(ks) as keyd, keyd.client() as client:
            # Direct: in a child process, so that this one holds no token session of its own
            # while keyd holds one (SoftHSM keeps per-process state).
            direct_code = (
                "import pkcs11,sys,time,hashlib;"
                f"lib=pkcs11.lib({MODULE!r});tok=lib.get_token(token_label='bench');"
                f"s=tok.open(user_pin={PIN!r});"
                f"k=next(s.get_objects({{pkcs11.Attribute.CLASS:pkcs11.ObjectClass.PRIVATE_KEY,"
                f"pkcs11.Attribute.ID:{key_id!r}}}));"
                "d=hashlib.sha256(b'x').digest();n=0;t=time.perf_counter()\n"
                f"while time.perf_counter()-t<{args.seconds}:\n"
                " k.sign(d,mechanism=pkcs11.Mechanism.ECDSA);n+=1\n"
                "print(n/(time.perf_counter()-t))"
            )
            for r in range(args.rounds):
                direct = float(
                    subprocess.run(
                        [sys.executable, "-c", direct_code],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                )
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    out = client.sign(kid, payloads, client="bench", account="bench")
                    assert all(isinstance(s, bytes) for s in out)
                    done += len(payloads)
                through = done / (time.perf_counter() - t0)
                through2 = rate_two_connections(keyd, kid, payloads, args.seconds)
                rows.append((direct, through, through / direct, through2 / direct))
                print(
                    f"round {r}: token direct {direct:,.0f}/s, through keyd {through:,.0f}/s "
                    f"(ratio {through / direct:.2f}), with 2 connections {through2:,.0f}/s "
                    f"(ratio {through2 / direct:.2f})"
                )

        one = statistics.median(r[2] for r in rows)
        two = statistics.median(r[3] for r in rows)
        print(
            f"median ratio: 1 connection {one:.2f}, 2 connections {two:.2f}; target 0.80: "
            f"{'PASS' if max(one, two) >= 0.8 else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
