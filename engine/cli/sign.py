"""``dccsign sign`` and ``dccsign verify``: DCCs in, ``HC1:`` strings out, and back."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from .args import add_options, iso_time, keystore_arg, kid, number, open_keystore, tls_client_args
from .exits import (
    EXIT_INVALID_DCC,
    EXIT_INVALID_SIGNATURE,
    EXIT_KEY,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    fail,
)

__all__ = ["add_commands", "parse_dcc_input"]


def _read_input(source: str | None) -> str:
    if source in (None, "-"):
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot read {source}: {exc.strerror}")
    except UnicodeDecodeError:
        fail(EXIT_INVALID_DCC, f"{source} is not UTF-8 text")


def parse_dcc_input(text: str) -> list[Any]:
    """One JSON DCC, a JSON array of DCCs, or JSON lines (one DCC per line).

    Raises:
        ValueError: the text is none of these (the message names the line).
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("no input: expected a JSON DCC, a JSON array or JSON lines")
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise ValueError(
                f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        items = []
        for lineno, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON line {lineno}: {err.msg}") from None
        return items
    return value if isinstance(value, list) else [value]


def _check_qr_path(path: Path | None) -> None:
    from ..dcc.qr import QR_SUFFIXES

    if path is not None and path.suffix.lower() not in QR_SUFFIXES:
        fail(EXIT_USAGE, f"--qr {path}: the file name must end in .png or .svg")


def _input_dccs(source: str | None) -> list[Any]:
    """The DCCs of ``sign``'s input; unparsable input is reported on stderr as JSON (exit 3)."""
    try:
        dccs = parse_dcc_input(_read_input(source))
    except ValueError as exc:
        error = {"path": "$", "rule": "json", "message": str(exc)}
        print(json.dumps([{"index": None, "errors": [error]}]), file=sys.stderr)
        raise CommandFailed(EXIT_INVALID_DCC) from None
    if not dccs:
        fail(EXIT_INVALID_DCC, "the input holds no DCC")
    return dccs


def cmd_sign(args: argparse.Namespace) -> int:
    import getpass

    if args.server is not None:
        return _sign_via_server(args)

    from ..dcc.dsc import DSC
    from ..dcc.issuer import Issuer, SignerKey
    from ..dcc.qr import numbered_paths, write_qr
    from ..errors import InvalidBatchError, KeyProblem, KeystoreError
    from ..keyd.client import KeydError
    from ..keyd.supervisor import KeydSigner, PrivateKeyd
    from ..process import take_environ_secret

    _check_qr_path(args.qr)
    store = open_keystore(args.keystore)
    dccs = _input_dccs(args.input)
    # No signature bypasses keyd and its audit log: this run gets a private keyd that writes
    # to the keystore's audit directory. The CLI itself never decrypts a private key.
    account = f"os-user:{getpass.getuser()}"
    try:
        # nonce_pool=0: a one-shot keyd would spend its idle time filling a pool nobody uses.
        # The passphrase variable, if set, goes to keyd through a pipe and leaves our
        # environment (also what /proc/PID/environ shows). lock_wait: a keyd that is stopping
        # lets go of the audit log within a second; a running engine's keyd would not.
        with (
            PrivateKeyd(
                store.directory, nonce_pool=0, passphrase=take_environ_secret(), lock_wait=3
            ) as keyd,
            keyd.client() as client,
        ):
            keys = [
                SignerKey(
                    DSC.from_bytes(info.dsc),
                    KeydSigner(
                        client, info.kid, info.alg, client_id="dccsign-cli", account=account
                    ),
                    info.state,
                )
                for info in client.describe()
            ]
            issuer = Issuer(keys, issuer_country=store.issuer_country)
            hc1s = issuer.issue(dccs, kid=args.kid, validity=dt.timedelta(days=args.validity_days))
    except InvalidBatchError as exc:
        print(json.dumps(exc.as_json(), ensure_ascii=False), file=sys.stderr)
        print(f"dccsign: {exc}", file=sys.stderr)
        return EXIT_INVALID_DCC
    except (KeyProblem, KeystoreError) as exc:
        fail(EXIT_KEY, str(exc))
    except KeydError as exc:
        fail(EXIT_KEY, f"keyd failed: {exc} (nothing was output; retry)")
    out = sys.stdout
    for text in hc1s:
        out.write(text + "\n")
    out.flush()
    if args.qr is not None:
        for text, path in zip(hc1s, numbered_paths(args.qr, len(hc1s)), strict=True):
            write_qr(text, path)
    return EXIT_OK


def _sign_via_server(args: argparse.Namespace) -> int:
    import getpass

    from ..dcc.qr import numbered_paths, write_qr
    from ..protocol.clients.blocking import Client, ClientError
    from ..protocol.codes import ErrorCode
    from ..protocol.wire import SignItem

    _check_qr_path(args.qr)
    dccs = _input_dccs(args.input)
    account = args.account or f"os-user:{getpass.getuser()}"
    days = max(1, round(args.validity_days))
    items = [SignItem(d, account, args.operator, args.kid, days) for d in dccs]
    try:
        with Client(args.server, cert=args.cert, key=args.key, ca=args.ca) as client:
            results = client.sign_batch(items)
    except ClientError as exc:
        fail(EXIT_KEY, f"{exc} (retry)")
    refused = [
        {"index": i, "code": ErrorCode(r.error).name, "message": r.message}
        for i, r in enumerate(results)
        if not r.ok
    ]
    out = sys.stdout
    for r in results:
        out.write((r.hc1 or "") + "\n")
    out.flush()
    if args.qr is not None:
        ok = [r.hc1 for r in results if r.ok]
        for text, path in zip(ok, numbered_paths(args.qr, len(ok)), strict=True):
            write_qr(text, path)
    if refused:
        print(json.dumps(refused, ensure_ascii=False), file=sys.stderr)
        invalid = all(x["code"] == "INVALID_DCC" for x in refused)
        return EXIT_INVALID_DCC if invalid else EXIT_KEY
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from ..dcc.dsc import DSC
    from ..dcc.verify import verify_hc1

    if args.cert is not None:
        try:
            dscs = [DSC.from_bytes(args.cert.read_bytes())]
        except OSError as exc:
            fail(EXIT_USAGE, f"cannot read {args.cert}: {exc.strerror}")
        except ValueError as exc:
            fail(EXIT_KEY, f"{args.cert}: not a certificate: {exc}")
    else:
        dscs = [e.dsc for e in open_keystore(args.keystore).entries]
    if args.hc1 in (None, "-"):
        text = sys.stdin.read()
    else:
        text = args.hc1
    result = verify_hc1(text.rstrip("\r\n"), dscs, at=args.at)
    print(json.dumps(result.as_json(), ensure_ascii=False, indent=2, default=_json_default))
    return EXIT_OK if result.valid else EXIT_INVALID_SIGNATURE


def _json_default(value: object) -> object:
    """Whatever a foreign certificate's CBOR holds, the JSON output must not fail on it."""
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def add_commands(sub: Any) -> None:
    """Add ``sign`` and ``verify`` to the ``dccsign`` parser's sub-commands *sub*."""
    _add_sign(sub)
    _add_verify(sub)


def _add_sign(sub: Any) -> None:
    p = sub.add_parser(
        "sign",
        help="sign DCCs, print one HC1: line per DCC",
        description="Sign DCCs: a JSON DCC, a JSON array of DCCs, or JSON lines. Prints one "
        "HC1: line per DCC in input order. Every DCC is validated first; if any is invalid, "
        "nothing is signed and the errors go to stderr as JSON (exit 3). Signing runs in a "
        "private keyd for this run, which records every signature in DIR/audit (account "
        "os-user:NAME). The passphrase comes from DCCSIGN_KEYSTORE_PASSPHRASE, "
        "DCCSIGN_KEYSTORE_PASSPHRASE_FILE, or DIR/dev-passphrase.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    keystore_arg(where, required=False, help="sign with a private keyd")
    helps = {
        "--server": "sign through a running engine: unix:PATH or HOST:PORT (TLS). Each DCC gets "
        "its own result: stdout has one line per DCC (the HC1, or an empty line for a refused "
        "one), refusals go to stderr as JSON, and the exit code is 3 or 4 if any was refused",
        "--account": "end-user account the engine records and meters (--server; default "
        "os-user:NAME)",
        "--operator": "who acts under the account's mandate",
        "--kid": "sign with this key (default: the key whose key usage allows the type)",
        "--validity-days": "requested validity from iat (default 365; clamped to the DSC's "
        "notAfter)",
        "--qr": "also write QR codes (.png or .svg; numbered -1, -2, ... for a batch)",
        "input": "input file (default stdin)",
    }
    add_options(where, (("--server", {"metavar": "ADDR"}),), helps)
    tls_client_args(
        p,
        cert="TLS client certificate (--server)",
        key="TLS client key (--server)",
        ca="CA of the engine's TLS certificate",
    )
    add_options(
        p,
        (
            ("--account", {"metavar": "ID"}),
            ("--operator", {"metavar": "ID"}),
            ("--kid", {"type": kid, "metavar": "HEX"}),
            ("--validity-days", number(float, 36_500, 365.0)),
            ("--qr", {"type": Path, "metavar": "PATH"}),
            ("input", {"nargs": "?", "metavar": "FILE|-"}),
        ),
        helps,
    )
    p.set_defaults(func=cmd_sign)


def _add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="decode and verify an HC1 string, print JSON",
        description="Decode and verify one HC1 string. Prints JSON with valid, kid, alg, iss, "
        "iat, exp, type, time_valid, usage_valid, dcc and errors. Exit 0 when the signature "
        "is valid (even if expired: see time_valid), 1 otherwise.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cert", type=Path, metavar="FILE", help="the DSC (PEM or DER)")
    keystore_arg(src, required=False, help="every DSC of a keystore")
    p.add_argument(
        "--at", type=iso_time, metavar="ISO-TIME", help="check time for iat/exp (default now)"
    )
    p.add_argument("hc1", nargs="?", metavar="HC1|-", help="the HC1 string (default stdin)")
    p.set_defaults(func=cmd_verify)
