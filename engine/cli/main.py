"""The ``dccsign`` command line.

Exit codes (stable, scripts rely on them):
    0  success (``verify``: the signature is valid)
    1  ``verify``: the signature is not valid
    2  usage error
    3  invalid DCC input (errors as JSON on stderr; nothing was signed)
    4  key problem (keystore, passphrase, no usable key)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from .args import host_port, iso_time, kid, positive

EXIT_OK = 0
EXIT_INVALID_SIGNATURE = 1
EXIT_USAGE = 2
EXIT_INVALID_DCC = 3
EXIT_KEY = 4


class _Exit(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fail(code: int, message: str) -> NoReturn:
    raise _Exit(code, message)


# ----------------------------------------------------------------------------- helpers


def _read_input(source: str | None) -> str:
    if source in (None, "-"):
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot read {source}: {exc.strerror}")
    except UnicodeDecodeError:
        _fail(EXIT_INVALID_DCC, f"{source} is not UTF-8 text")


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


def _open_keystore(directory: Path):
    from ..errors import KeystoreError
    from ..keys.keystore import Keystore

    try:
        return Keystore.open(directory)
    except KeystoreError as exc:
        _fail(EXIT_KEY, str(exc))


# ----------------------------------------------------------------------------- commands


def cmd_keys_init_dev(args: argparse.Namespace) -> int:
    from ..errors import KeystoreError
    from ..keys.keystore import DEV_PASSPHRASE, init_dev

    try:
        store = init_dev(args.keystore, args.country)
    except KeystoreError as exc:
        _fail(EXIT_KEY, str(exc))
    print(
        f"created development keystore {store.directory} (passphrase in "
        f"{store.directory / DEV_PASSPHRASE})"
    )
    _print_keys(store, as_json=False)
    return EXIT_OK


def _key_rows(store) -> list[dict[str, Any]]:
    from ..dcc.dsc import TYPE_NAMES
    from ..keys.lifecycle import PRIVATE_KEY_USAGE, key_warnings

    return [
        {
            "kid": e.kid.hex(),
            "name": e.name,
            "alg": e.dsc.alg_name,
            "usages": [TYPE_NAMES[t] for t in ("v", "t", "r") if t in e.dsc.usages],
            "restricted": e.dsc.restricted,
            "not_before": e.dsc.not_before.isoformat(),
            "not_after": e.dsc.not_after.isoformat(),
            "private_key_usage_until": (e.dsc.not_before + PRIVATE_KEY_USAGE).isoformat(),
            "state": e.state,
            "subject": e.dsc.subject,
            "warnings": key_warnings(e.dsc) if e.state in ("active", "inactive") else [],
        }
        for e in store.entries
    ] + [{"name": name, "state": "pending", "kid": None} for name in store.pending]


def _print_keys(store, *, as_json: bool) -> None:
    rows = _key_rows(store)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'KID':<16}  {'ALG':<5}  {'STATE':<8}  {'VALID FROM':<10}  {'VALID UNTIL':<10}  USAGES")
    for r in rows:
        if r["kid"] is None:
            print(f"{'-':<16}  {'':<5}  {'pending':<8}  {r['name']} (waiting for its DSC)")
            continue
        usages = ",".join(r["usages"]) + ("" if r["restricted"] else " (no EKU)")
        print(
            f"{r['kid']:<16}  {r['alg']:<5}  {r['state']:<8}  {r['not_before'][:10]:<10}  "
            f"{r['not_after'][:10]:<10}  {usages}"
        )


def cmd_keys_list(args: argparse.Namespace) -> int:
    _print_keys(_open_keystore(args.keystore), as_json=args.json)
    return EXIT_OK


def _lifecycle(fn):
    """Run a lifecycle operation; key problems exit 4 with the message."""
    from ..errors import KeystoreError

    try:
        return fn()
    except KeystoreError as exc:
        _fail(EXIT_KEY, str(exc))


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from ..keys.keystore import resolve_passphrase
    from ..keys.lifecycle import generate

    store = _open_keystore(args.keystore)
    token = None
    given = [args.pkcs11_module, args.token_label, args.pin_file]
    if any(given):
        if not all(given):
            _fail(EXIT_USAGE, "--pkcs11-module, --token-label and --pin-file go together")
        token = {
            "module": args.pkcs11_module,
            "token_label": args.token_label,
            "pin_file": args.pin_file,
        }
    name = _lifecycle(
        lambda: generate(
            store.directory, args.alg, resolve_passphrase(store.directory), pkcs11=token
        )
    )
    print(name)
    return EXIT_OK


def cmd_keys_csr(args: argparse.Namespace) -> int:
    from ..keys.keystore import resolve_passphrase
    from ..keys.lifecycle import make_csr

    store = _open_keystore(args.keystore)
    usages = [u.strip() for u in args.usage.split(",") if u.strip()]
    pem = _lifecycle(
        lambda: make_csr(
            store.directory, args.key, args.subject, usages, resolve_passphrase(store.directory)
        )
    )
    sys.stdout.buffer.write(pem)
    return EXIT_OK


def cmd_keys_import_cert(args: argparse.Namespace) -> int:
    from ..keys.lifecycle import import_cert

    store = _open_keystore(args.keystore)
    try:
        data = args.cert.read_bytes()
    except OSError as exc:
        _fail(EXIT_USAGE, f"cannot read {args.cert}: {exc.strerror}")
    kid = _lifecycle(lambda: import_cert(store.directory, args.key, data))
    print(kid.hex())
    return EXIT_OK


def cmd_keys_state(args: argparse.Namespace) -> int:
    from ..keys.lifecycle import set_state

    store = _open_keystore(args.keystore)
    old = _lifecycle(lambda: set_state(store.directory, args.kid, args.state, args.reason))
    print(f"{args.kid.hex()}: {old} -> {args.state}")
    return EXIT_OK


def cmd_keys_export_cert(args: argparse.Namespace) -> int:
    from ..errors import KeystoreError

    store = _open_keystore(args.keystore)
    try:
        entry = store.find(args.kid)
    except KeystoreError as exc:
        _fail(EXIT_KEY, str(exc))
    if args.der:
        sys.stdout.buffer.write(entry.dsc.der)
    else:
        sys.stdout.buffer.write(entry.dsc.pem())
    sys.stdout.flush()
    return EXIT_OK


def _check_qr_path(path: Path | None) -> None:
    from ..dcc.qr import QR_SUFFIXES

    if path is not None and path.suffix.lower() not in QR_SUFFIXES:
        _fail(EXIT_USAGE, f"--qr {path}: the file name must end in .png or .svg")


def _input_dccs(source: str | None) -> list[Any]:
    """The DCCs of ``sign``'s input; unparsable input is reported on stderr as JSON (exit 3)."""
    try:
        dccs = parse_dcc_input(_read_input(source))
    except ValueError as exc:
        error = {"path": "$", "rule": "json", "message": str(exc)}
        print(json.dumps([{"index": None, "errors": [error]}]), file=sys.stderr)
        raise _Exit(EXIT_INVALID_DCC) from None
    if not dccs:
        _fail(EXIT_INVALID_DCC, "the input holds no DCC")
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
    store = _open_keystore(args.keystore)
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
        _fail(EXIT_KEY, str(exc))
    except KeydError as exc:
        _fail(EXIT_KEY, f"keyd failed: {exc} (nothing was output; retry)")
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
        _fail(EXIT_KEY, f"{exc} (retry)")
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import cmd_serve

    return cmd_serve(args)


def cmd_verify(args: argparse.Namespace) -> int:
    from ..dcc.dsc import DSC
    from ..dcc.verify import verify_hc1

    if args.cert is not None:
        try:
            dscs = [DSC.from_bytes(args.cert.read_bytes())]
        except OSError as exc:
            _fail(EXIT_USAGE, f"cannot read {args.cert}: {exc.strerror}")
        except ValueError as exc:
            _fail(EXIT_KEY, f"{args.cert}: not a certificate: {exc}")
    else:
        dscs = [e.dsc for e in _open_keystore(args.keystore).entries]
    if args.hc1 in (None, "-"):
        text = sys.stdin.read()
    else:
        text = args.hc1
    result = verify_hc1(text.rstrip("\r\n"), dscs, at=args.at)
    print(json.dumps(result.as_json(), ensure_ascii=False, indent=2, default=_json_default))
    return EXIT_OK if result.valid else EXIT_INVALID_SIGNATURE


def _cmd_keyd(args: argparse.Namespace) -> int:
    from ..keyd.service import cmd_keyd

    return cmd_keyd(args)


def _json_default(value: object) -> object:
    """Whatever a foreign certificate's CBOR holds, the JSON output must not fail on it."""
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


# ----------------------------------------------------------------------------- parser


#: keyd's default (engine/keyd/service.py DEFAULT_NONCE_POOL; a test keeps the two equal):
#: not imported here, so that building the parser does not load keyd.
NONCE_POOL_DEFAULT = 1 << 20


def _nonce_pool_entries(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= 1 << 24:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 16777216, not {value!r}")
    return n


def _lock_wait(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0 to 3600 seconds, not {value!r}")
    return seconds


def _socket_mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
        raise argparse.ArgumentTypeError(
            f"must be octal permission bits that include 0600 (e.g. 0600, 0660), not {value!r}"
        )
    return mode


def _group_id(value: str) -> int:
    import grp

    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group: {value!r}") from None


def _user_id(value: str) -> int:
    import pwd

    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {value!r}") from None


def _nonce_pool_option(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument(
        "--nonce-pool",
        type=_nonce_pool_entries,
        default=NONCE_POOL_DEFAULT,
        metavar="N",
        help="precomputed ECDSA nonces per active ES256 software key, 64 bytes each, mlock'ed "
        "where the memlock limit allows (keyd logs it otherwise), refilled at idle priority and "
        "spent by signing, so that a burst signs at "
        f"about 1 us per signature until the pool runs dry (default {NONCE_POOL_DEFAULT:,} = "
        f"{NONCE_POOL_DEFAULT * 64 // 1024 // 1024} MiB per key; 0: no pools; never for token "
        "keys; at most 65,536 with DCCSIGN_PUREPYTHON=1). Size it as signatures/s through one "
        "key during a burst x the burst's seconds: the pool is not refilled while the cores "
        "are busy signing",
    )


def _add_installed_commands(sub: Any) -> None:
    """Command groups that other installed packages bring (the benchmark drivers' ``bench``),
    found through the ``dccsign.commands`` entry points so that the product imports none of
    them. One that cannot be loaded still appears, and running it says why: a broken plugin
    must not take the signer's own commands down with it."""
    for entry in metadata.entry_points(group="dccsign.commands"):
        try:
            entry.load()(sub)
        except Exception as exc:  # any failure of foreign code is reported, not raised
            why = f"the {entry.name!r} commands ({entry.value}) cannot be loaded: {exc}"
            p = sub.add_parser(entry.name, help=f"unavailable: {why}")
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=lambda _args, why=why: _fail(EXIT_USAGE, why))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dccsign",
        description="Sign and verify EU Digital COVID Certificates (HC1).",
        epilog="Exit codes: 0 ok, 1 invalid signature (verify) or a break (audit verify), 2 usage, "
        "3 invalid DCC, "
        "4 key problem.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = sub.add_parser("keys", help="manage the keystore")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    p = ksub.add_parser(
        "init-dev",
        help="create a development keystore (CSCA + four DSCs)",
        description="Create a development keystore: a CSCA and four DSCs (ES256 limited to "
        "vaccination, to test and to recovery; PS256 RSA-2048 without key usage). Subjects say "
        "DEVELOPMENT; the passphrase is written to DIR/dev-passphrase (mode 0600). Refuses a "
        "non-empty directory.",
    )
    p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--country",
        default="NL",
        metavar="CC",
        help="ISO 3166-1 alpha-2 country of the certificates (default NL)",
    )
    p.set_defaults(func=cmd_keys_init_dev)

    p = ksub.add_parser("list", help="list keys: kid, alg, usages, validity, state")
    p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_keys_list)

    p = ksub.add_parser(
        "generate",
        help="generate a software key (state pending); prints its key id",
        description="Generate a key in the keystore, encrypted with the keystore passphrase. It "
        "stays pending until its DSC is imported. Recorded in the key-event journal.",
    )
    p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
    p.add_argument("--alg", choices=("ES256", "PS256"), required=True)
    p.add_argument(
        "--pkcs11-module",
        metavar="SO",
        help="generate inside this PKCS#11 module's token instead (sensitive, never "
        "extractable, sign-only)",
    )
    p.add_argument("--token-label", metavar="L", help="the token's label")
    p.add_argument(
        "--pin-file", metavar="F", help="file holding the user PIN (never on the command line)"
    )
    p.set_defaults(func=cmd_keys_generate)

    p = ksub.add_parser("csr", help="a CSR for the national CSCA, on stdout (PEM)")
    p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
    p.add_argument("--key", required=True, metavar="ID", help="the key id from 'keys generate'")
    p.add_argument("--subject", required=True, help='RFC 4514, e.g. "CN=DSC 1,O=Ministry,C=NL"')
    p.add_argument(
        "--usage",
        required=True,
        metavar="LIST",
        help="the DCC types the DSC may sign: vaccination,test,recovery",
    )
    p.set_defaults(func=cmd_keys_csr)

    p = ksub.add_parser("import-cert", help="attach the DSC issued for a key (state inactive)")
    p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
    p.add_argument("--key", required=True, metavar="ID")
    p.add_argument("cert", type=Path, metavar="CERT", help="the DSC, PEM or DER")
    p.set_defaults(func=cmd_keys_import_cert)

    for state, verb, text in (
        ("active", "activate", "let an inactive key sign"),
        ("retired", "retire", "stop an active key signing (normal end of use)"),
        ("disabled", "disable", "emergency stop: no further signature with this kid (final)"),
    ):
        p = ksub.add_parser(
            verb,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. A running keyd applies "
            "it within a second; recorded in the key-event journal.",
        )
        p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
        p.add_argument("--kid", type=kid, required=True, metavar="HEX")
        p.add_argument("--reason", metavar="TEXT")
        p.set_defaults(func=cmd_keys_state, state=state)

    p = ksub.add_parser("export-cert", help="write a key's DSC to stdout (PEM, or DER)")
    p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
    p.add_argument("--kid", type=kid, required=True, metavar="HEX")
    p.add_argument("--der", action="store_true", help="DER instead of PEM")
    p.set_defaults(func=cmd_keys_export_cert)

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
    where.add_argument("--keystore", type=Path, metavar="DIR", help="sign with a private keyd")
    where.add_argument(
        "--server",
        metavar="ADDR",
        help="sign through a running engine: unix:PATH or HOST:PORT (TLS). Each DCC gets its "
        "own result: stdout has one line per DCC (the HC1, or an empty line for a refused "
        "one), refusals go to stderr as JSON, and the exit code is 3 or 4 if any was refused",
    )
    p.add_argument("--cert", type=Path, metavar="PEM", help="TLS client certificate (--server)")
    p.add_argument("--key", type=Path, metavar="PEM", help="TLS client key (--server)")
    p.add_argument("--ca", type=Path, metavar="PEM", help="CA of the engine's TLS certificate")
    p.add_argument(
        "--account",
        metavar="ID",
        help="end-user account the engine records and meters (--server; default os-user:NAME)",
    )
    p.add_argument("--operator", metavar="ID", help="who acts under the account's mandate")
    p.add_argument(
        "--kid",
        type=kid,
        metavar="HEX",
        help="sign with this key (default: the key whose key usage allows the type)",
    )
    p.add_argument(
        "--validity-days",
        type=positive(float, 36_500),
        default=365.0,
        metavar="N",
        help="requested validity from iat (default 365; clamped to the DSC's notAfter)",
    )
    p.add_argument(
        "--qr",
        type=Path,
        metavar="PATH",
        help="also write QR codes (.png or .svg; numbered -1, -2, ... for a batch)",
    )
    p.add_argument("input", nargs="?", metavar="FILE|-", help="input file (default stdin)")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser(
        "verify",
        help="decode and verify an HC1 string, print JSON",
        description="Decode and verify one HC1 string. Prints JSON with valid, kid, alg, iss, "
        "iat, exp, type, time_valid, usage_valid, dcc and errors. Exit 0 when the signature "
        "is valid (even if expired: see time_valid), 1 otherwise.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cert", type=Path, metavar="FILE", help="the DSC (PEM or DER)")
    src.add_argument("--keystore", type=Path, metavar="DIR", help="every DSC of a keystore")
    p.add_argument(
        "--at", type=iso_time, metavar="ISO-TIME", help="check time for iat/exp (default now)"
    )
    p.add_argument("hc1", nargs="?", metavar="HC1|-", help="the HC1 string (default stdin)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "keyd",
        help="run the key process (the only holder of private keys)",
        description="Run keyd: load the keystore's keys, serve signing requests on a Unix "
        "socket (mode 0600 unless --socket-mode), re-check every payload, and record every "
        "signature in the audit log before releasing it. Stops cleanly on SIGTERM. keyd makes "
        "itself non-dumpable at start (no ptrace, /proc/PID/mem or core dump, even for its own "
        "user). The passphrase comes from --supervised's first input line, "
        "DCCSIGN_KEYSTORE_PASSPHRASE, DCCSIGN_KEYSTORE_PASSPHRASE_FILE, or DIR/dev-passphrase.",
    )
    p.add_argument("--keystore", type=Path, required=True, metavar="DIR")
    p.add_argument("--socket", type=Path, required=True, metavar="PATH")
    p.add_argument(
        "--audit-dir",
        type=Path,
        metavar="DIR",
        help="audit log directory (default DIR/audit of the keystore)",
    )
    p.add_argument(
        "--no-validate-dcc",
        dest="validate_dcc",
        action="store_false",
        help="do not run the full DCC validator (schema, value sets, dates, UVCI) on every "
        "payload, only keyd's structural, time, type, key and size checks. Saves ~2-4 us of "
        "keyd CPU per certificate since the validator is native (it was ~30 us in Python), "
        "but an engine that is compromised or wrong can then have "
        "DCCs with any content signed (bogus codes, missing fields), which verifiers accept "
        "as valid",
    )
    # The default since keyd validates by itself; accepted so that old command lines work.
    p.add_argument(
        "--validate-dcc", dest="validate_dcc", action="store_true", help=argparse.SUPPRESS
    )
    _nonce_pool_option(p)
    p.add_argument(
        "--supervised",
        action="store_true",
        help="for a supervising process (dccsign serve and sign run keyd so): keyd reads the "
        "keystore passphrase from the first line of standard input (an empty line: found as "
        "without this option), and stops as on SIGTERM (final audit checkpoint) when standard "
        "input ends, i.e. when the supervisor is gone, however it ended",
    )
    p.add_argument(
        "--lock-wait",
        type=_lock_wait,
        default=15.0,
        metavar="S",
        help="at start, wait up to S seconds for the audit log's lock while another process "
        "holds it (a keyd that is stopping), logging whom it waits for; then fail with a "
        "message that names the holder (default 15; 0: do not wait)",
    )
    access = p.add_argument_group(
        "socket access (keyd under its own user, used through dccsign serve --keyd-socket)"
    )
    access.add_argument(
        "--socket-mode",
        type=_socket_mode,
        default=0o600,
        metavar="MODE",
        help="permission bits of the socket, octal (default 0600; 0660 with --socket-group "
        "lets that group connect, each connection still subject to --allow-uid)",
    )
    access.add_argument(
        "--socket-group",
        type=_group_id,
        metavar="GROUP",
        help="give the socket to this group, a name or gid (keyd's user must be a member of "
        "it unless keyd runs as root)",
    )
    access.add_argument(
        "--allow-uid",
        type=_user_id,
        action="append",
        metavar="UID",
        help="a uid (or user name) that may connect; repeat for more. keyd checks every "
        "connection's peer uid (SO_PEERCRED), root's too, and closes any other at once, "
        "unserved, with a log line (default: keyd's own uid only)",
    )
    p.set_defaults(func=_cmd_keyd, validate_dcc=True)

    p = sub.add_parser(
        "serve",
        help="run the engine: portal backends sign over TLS or a Unix socket",
        description="Run the signing engine: a supervised keyd for the keystore (restarted if "
        "it dies), the wire protocol (protocol/SPEC.md) on a Unix socket (client identity: "
        "the peer's uid, mapped by the policy file) and/or TCP with TLS and client "
        "certificates (identity: the certificate's common name), per-client policy and "
        "quotas from --policy (re-read within a second), and /metrics and /healthz on "
        "--http. SIGTERM drains: in-flight requests finish, new ones are refused, then exit. "
        "--dev sets up the embedded default (development keystore, TLS material and a "
        "policy for the current user and the development client certificate). The "
        "passphrase (DCCSIGN_KEYSTORE_PASSPHRASE, read once and wiped from the engine's "
        "environment) reaches keyd through a pipe; keyd stops when the engine is gone.",
    )
    p.add_argument(
        "--keystore",
        type=Path,
        metavar="DIR",
        help="the keystore of the engine's keyd (required unless --keyd-socket and --policy "
        "are given)",
    )
    p.add_argument(
        "--keyd-socket",
        type=Path,
        metavar="PATH",
        help="use the keyd that serves this socket instead of starting one, e.g. dccsign keyd "
        "under its own user with --socket-group and --allow-uid for the engine's user: the "
        "engine then reads no private key and no passphrase, and reconnects with backoff when "
        "the connection breaks (/healthz not ready meanwhile). keyd's own options (--audit-dir, "
        "--nonce-pool, --keyd-no-validate-dcc) then go to dccsign keyd",
    )
    p.add_argument(
        "--policy", type=Path, metavar="FILE", help="policy file (default DIR/policy.json)"
    )
    p.add_argument("--unix", type=Path, metavar="PATH", help="listen on this Unix socket")
    p.add_argument("--tcp", type=host_port, metavar="HOST:PORT", help="listen on TCP with TLS")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate (--tcp)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="server key (--tcp)")
    p.add_argument("--client-ca", type=Path, metavar="PEM", help="CA of client certificates")
    p.add_argument("--http", type=host_port, metavar="HOST:PORT", help="/metrics and /healthz")
    p.add_argument(
        "--dev",
        action="store_true",
        help="create what the embedded default needs when missing (development only)",
    )
    p.add_argument(
        "--audit-dir",
        type=Path,
        metavar="DIR",
        help="keyd's audit log directory (default DIR/audit of the keystore)",
    )
    p.add_argument(
        "--keyd-no-validate-dcc",
        action="store_true",
        help="start keyd with --no-validate-dcc: keyd then skips its own full validation of "
        "every DCC (the engine still validates each request). Saves ~2-4 us of keyd CPU per "
        "certificate since the validator is native, but a compromised or faulty engine could then "
        "have DCCs with any content signed (bogus codes, missing fields), and verifiers "
        "would accept them as valid",
    )
    from ..server.batcher import DEFAULT_WINDOW
    from ..server.server import Limits

    lim = Limits()
    tune = p.add_argument_group("capacity and batching")
    tune.add_argument(
        "--max-in-flight",
        type=positive(int, 65_536),
        default=lim.max_in_flight,
        metavar="N",
        help="requests in progress on one connection, or answered and not yet read, before "
        f"BUSY (default {lim.max_in_flight})",
    )
    tune.add_argument(
        "--max-connection-items",
        type=positive(int, 10_000_000),
        default=lim.max_connection_items,
        metavar="N",
        help="certificates in progress on one connection, or answered and not yet read by its "
        f"client, before BUSY (default {lim.max_connection_items})",
    )
    tune.add_argument(
        "--max-client-items",
        type=positive(int, 10_000_000),
        default=lim.max_client_items,
        metavar="N",
        help="certificates in progress for one client over all its connections, or answered "
        f"and not yet read, before BUSY (default {lim.max_client_items})",
    )
    tune.add_argument(
        "--max-connections",
        type=positive(int, 1_000_000),
        default=lim.max_connections,
        metavar="N",
        help="open connections; more are closed at once (default "
        f"{lim.max_connections}; the open-files limit is raised to fit)",
    )
    tune.add_argument(
        "--idle-timeout",
        type=positive(float, 86_400),
        default=lim.idle_timeout,
        metavar="S",
        help="close a connection that has nothing in progress and sends nothing (not even "
        "PING) for S seconds, with GOAWAY, or whose client reads none of its replies for S "
        f"seconds (default {lim.idle_timeout:g}; HELLO must come within "
        f"{lim.hello_timeout:g} s, and each frame arrive whole within {lim.frame_timeout:g} s)",
    )
    tune.add_argument(
        "--max-pending-items",
        type=positive(int, 10_000_000),
        default=lim.max_pending_items,
        metavar="N",
        help="certificates in progress in the whole engine, or answered and not yet read, "
        f"before BUSY (default {lim.max_pending_items}); above 3/4 of it only clients within "
        "their weighted share (policy 'weight') are admitted",
    )
    tune.add_argument(
        "--max-batch",
        type=positive(int, 100_000),
        default=lim.max_batch,
        metavar="N",
        help=f"items per SIGN_BATCH frame, announced in WELCOME (default {lim.max_batch})",
    )
    tune.add_argument(
        "--deadline",
        type=positive(float, 3600),
        default=lim.deadline,
        metavar="S",
        help=f"seconds a request may take before DEADLINE_EXCEEDED (default {lim.deadline:g})",
    )
    tune.add_argument(
        "--queue-target",
        type=float,
        default=lim.queue_target * 1000,
        metavar="MS",
        help="refuse a client's new requests with BUSY while its oldest request in progress "
        f"is older than this, more than {lim.queue_floor} certificates are in progress in "
        "the engine and the client holds at least its weighted share of them, in "
        f"milliseconds; 0 turns it off (default {lim.queue_target * 1000:g})",
    )
    tune.add_argument(
        "--batch-window",
        type=float,
        default=DEFAULT_WINDOW * 1000,
        metavar="MS",
        help="longest a request waits to share a keyd round with others, in milliseconds "
        f"(0..100; default {DEFAULT_WINDOW * 1000:g})",
    )
    _nonce_pool_option(tune)
    tune.add_argument(
        "--keyd-connections",
        type=positive(int, 64),
        default=2,
        metavar="N",
        help="pipelined connections to keyd (keyd serves each on its own thread; default 2)",
    )
    tune.add_argument(
        "--zlib-level",
        type=int,
        choices=range(1, 10),
        default=9,
        metavar="L",
        help="deflate level of the HC1 strings, 1..9 (default 9; every level is a standard "
        "zlib stream)",
    )
    p.set_defaults(func=_cmd_serve)

    from .audit import add_audit_commands

    add_audit_commands(sub)

    _add_installed_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _Exit as exc:
        if exc.message:
            print(f"dccsign: error: {exc.message}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
