"""``dccsign keys``: the keystore and the key lifecycle, for security staff."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .args import command_group, keystore_arg, kid, open_keystore
from .exits import EXIT_KEY, EXIT_OK, EXIT_USAGE, fail

__all__ = ["add_commands"]


def cmd_keys_init_dev(args: argparse.Namespace) -> int:
    from ..errors import KeystoreError
    from ..keys.keystore import DEV_PASSPHRASE, init_dev

    try:
        store = init_dev(args.keystore, args.country)
    except KeystoreError as exc:
        fail(EXIT_KEY, str(exc))
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
    _print_keys(open_keystore(args.keystore), as_json=args.json)
    return EXIT_OK


def _lifecycle(fn):
    """Run a lifecycle operation; key problems exit 4 with the message."""
    from ..errors import KeystoreError

    try:
        return fn()
    except KeystoreError as exc:
        fail(EXIT_KEY, str(exc))


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from ..keys.keystore import resolve_passphrase
    from ..keys.lifecycle import generate

    store = open_keystore(args.keystore)
    token = None
    given = [args.pkcs11_module, args.token_label, args.pin_file]
    if any(given):
        if not all(given):
            fail(EXIT_USAGE, "--pkcs11-module, --token-label and --pin-file go together")
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

    store = open_keystore(args.keystore)
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

    store = open_keystore(args.keystore)
    try:
        data = args.cert.read_bytes()
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot read {args.cert}: {exc.strerror}")
    kid = _lifecycle(lambda: import_cert(store.directory, args.key, data))
    print(kid.hex())
    return EXIT_OK


def cmd_keys_state(args: argparse.Namespace) -> int:
    from ..keys.lifecycle import set_state

    store = open_keystore(args.keystore)
    old = _lifecycle(lambda: set_state(store.directory, args.kid, args.state, args.reason))
    print(f"{args.kid.hex()}: {old} -> {args.state}")
    return EXIT_OK


def cmd_keys_export_cert(args: argparse.Namespace) -> int:
    from ..errors import KeystoreError

    store = open_keystore(args.keystore)
    try:
        entry = store.find(args.kid)
    except KeystoreError as exc:
        fail(EXIT_KEY, str(exc))
    if args.der:
        sys.stdout.buffer.write(entry.dsc.der)
    else:
        sys.stdout.buffer.write(entry.dsc.pem())
    sys.stdout.flush()
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """Add the ``keys`` command group to the ``dccsign`` parser's sub-commands *sub*."""
    command_group(sub, "keys", (_add_creation, _add_state_changes), help="manage the keystore")


def _add_creation(ksub: Any) -> None:
    p = ksub.add_parser(
        "init-dev",
        help="create a development keystore (CSCA + four DSCs)",
        description="Create a development keystore: a CSCA and four DSCs (ES256 limited to "
        "vaccination, to test and to recovery; PS256 RSA-2048 without key usage). Subjects say "
        "DEVELOPMENT; the passphrase is written to DIR/dev-passphrase (mode 0600). Refuses a "
        "non-empty directory.",
    )
    keystore_arg(p)
    p.add_argument(
        "--country",
        default="NL",
        metavar="CC",
        help="ISO 3166-1 alpha-2 country of the certificates (default NL)",
    )
    p.set_defaults(func=cmd_keys_init_dev)

    p = ksub.add_parser("list", help="list keys: kid, alg, usages, validity, state")
    keystore_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_keys_list)

    p = ksub.add_parser(
        "generate",
        help="generate a software key (state pending); prints its key id",
        description="Generate a key in the keystore, encrypted with the keystore passphrase. It "
        "stays pending until its DSC is imported. Recorded in the key-event journal.",
    )
    keystore_arg(p)
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
    keystore_arg(p)
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
    keystore_arg(p)
    p.add_argument("--key", required=True, metavar="ID")
    p.add_argument("cert", type=Path, metavar="CERT", help="the DSC, PEM or DER")
    p.set_defaults(func=cmd_keys_import_cert)


def _add_state_changes(ksub: Any) -> None:
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
        keystore_arg(p)
        p.add_argument("--kid", type=kid, required=True, metavar="HEX")
        p.add_argument("--reason", metavar="TEXT")
        p.set_defaults(func=cmd_keys_state, state=state)

    p = ksub.add_parser("export-cert", help="write a key's DSC to stdout (PEM, or DER)")
    keystore_arg(p)
    p.add_argument("--kid", type=kid, required=True, metavar="HEX")
    p.add_argument("--der", action="store_true", help="DER instead of PEM")
    p.set_defaults(func=cmd_keys_export_cert)
