"""``dccsign audit``: verify and search the issuance audit log (see :mod:`dccsign.audit`).

Exit codes, as for the rest of the CLI:
    0  success (``verify``: the log is intact)
    1  the log is broken (``verify`` prints the first break; ``search`` and ``revocations``
       stop at an unreadable segment)
    2  usage error
    4  key or file problem (no such directory, unreadable or invalid audit public key or
       witness file)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .args import SWITCH, add_options, command_group, iso_time, kid
from .exits import error_exit

__all__ = ["add_commands"]

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2
EXIT_FILE = 4


def _error(code: int, message: str) -> int:
    return error_exit("dccsign", code, message)


def _read_file(path: Path, what: str) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        _error(EXIT_FILE, f"cannot read the {what} {path}: {exc.strerror}")
        return None


# ----------------------------------------------------------------------------- commands


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from ..audit.errors import AuditError
    from ..audit.verify import verify

    pem = None
    if args.audit_pubkey is not None:
        pem = _read_file(args.audit_pubkey, "audit public key")
        if pem is None:
            return EXIT_FILE
    witnesses: list[bytes] = []
    if args.witness is not None:
        data = _read_file(args.witness, "witness file")
        if data is None:
            return EXIT_FILE
        witnesses = [line for line in data.splitlines() if line.strip()]
    try:
        report = verify(args.directory, pem, witnesses=witnesses)
    except AuditError as exc:
        return _error(EXIT_FILE, str(exc))
    except ValueError as exc:  # a witness that is not a validly signed checkpoint
        return _error(EXIT_FILE, f"{args.witness}: {exc}")
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return EXIT_OK if report.ok else EXIT_BROKEN
    trust = (
        "pinned audit key"
        if report.key_pinned
        else "audit key stored beside the log (limited trust: pin it with --audit-pubkey)"
    )
    if report.ok:
        print(
            f"{args.directory}: intact: {report.records} records, {report.segments} "
            f"segment{'' if report.segments == 1 else 's'}, "
            f"{report.checkpoints} checkpoints, last sequence {report.last_sequence}"
            + ("" if report.closed_cleanly else " (not closed: in use, or keyd stopped)")
        )
    else:
        brk = report.first_break
        assert brk is not None
        print(
            f"{args.directory}: BROKEN at segment {brk.segment}, sequence {brk.sequence}: "
            f"{brk.problem}"
        )
        print(
            f"  checked before the break: {report.records} records, {report.segments} complete "
            f"segments, {report.checkpoints} checkpoints"
        )
    print(f"  checkpoints verified with the {trust}, sha256 {report.key_fingerprint}")
    for rec in report.recoveries:
        print(
            f"  note: entry {rec['seq']} ({rec['time']}): a torn write was set aside on reopen: "
            f"{rec['discarded_bytes']} bytes, {rec['discarded_entries']} complete entries "
            f"never acknowledged, after sequence {rec['after_sequence']}"
            + (f", evidence in {rec['evidence']}" if rec.get("evidence") else "")
        )
    return EXIT_OK if report.ok else EXIT_BROKEN


def _row(entry: dict[str, Any]) -> str:
    if entry.get("t") == "key":
        return (
            f"{entry['seq']:>9}  {entry['time']}  key    {entry.get('kid') or '-':<16}  "
            f"{entry['action']} by {entry['actor']}"
            + (f" ({entry['key_id']})" if entry.get("key_id") else "")
            + (f": {entry['reason']}" if entry.get("reason") else "")
        )
    operator = f" via {entry['operator']}" if entry.get("operator") else ""
    return (
        f"{entry['seq']:>9}  {entry['time']}  {entry['type']:<5}  {entry['kid']:<16}  "
        f"{entry['client']}  {entry['account']}{operator}  uvci_hash {entry['uvci_hash'][:16]}"
    )


def cmd_audit_search(args: argparse.Namespace) -> int:
    from ..audit.errors import AuditLogError
    from ..audit.search import search

    if not args.directory.is_dir():
        return _error(EXIT_FILE, f"{args.directory}: no such audit log directory")
    kinds = ("issue", "key") if args.key_events else ("issue",)
    out = sys.stdout
    count = 0
    try:
        for entry in search(
            args.directory,
            client=args.client,
            account=args.account,
            kid=args.kid.hex() if args.kid else None,
            since=args.since,
            until=args.until,
            operator=args.operator,
            kinds=kinds,
        ):
            out.write(
                (
                    json.dumps(entry, sort_keys=True, ensure_ascii=False)
                    if args.json
                    else _row(entry)
                )
                + "\n"
            )
            count += 1
    except AuditLogError as exc:
        out.flush()
        return _error(EXIT_BROKEN, str(exc))
    out.flush()
    if not args.json:
        print(
            f"{count} matching entries (not verified: run 'dccsign audit verify')", file=sys.stderr
        )
    return EXIT_OK


def cmd_audit_revocations(args: argparse.Namespace) -> int:
    from ..audit.errors import AuditLogError
    from ..audit.search import revocations

    if not args.directory.is_dir():
        return _error(EXIT_FILE, f"{args.directory}: no such audit log directory")
    try:
        rows = revocations(args.directory, args.account)
    except AuditLogError as exc:
        return _error(EXIT_BROKEN, str(exc))
    if args.json:
        doc = {
            "account": args.account,
            "count": len(rows),
            "hashes": {
                "UCI": [r.uci for r in rows],
                "COUNTRYCODEUCI": [r.countrycodeuci for r in rows],
                "SIGNATURE": [r.signature for r in rows],
            },
            "records": [r.as_json() for r in rows],
        }
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"{'SEQ':>9}  {'KID':<16}  T  {'UCI':<32}  {'COUNTRYCODEUCI':<32}  SIGNATURE")
    for r in rows:
        print(
            f"{r.sequence:>9}  {r.kid:<16}  {r.dcc_type}  {r.uci}  {r.countrycodeuci}  "
            f"{r.signature}"
        )
    print(
        f"{len(rows)} DCCs issued by account {args.account} (not verified: run 'dccsign audit "
        "verify')",
        file=sys.stderr,
    )
    return EXIT_OK


# ----------------------------------------------------------------------------- parser


def add_commands(subparsers: Any) -> None:
    """Add the ``audit`` command group to the CLI's subparsers (``parser.add_subparsers()``)."""
    command_group(
        subparsers,
        "audit",
        (_add_verify, _add_search, _add_revocations),
        help="verify and search the issuance audit log",
        description="Read the issuance audit log that keyd writes: one record per signature "
        "(hashes only, no clear personal data), hash-chained, with checkpoints signed by the "
        "audit key. These commands only read the log.",
        epilog="Exit codes: 0 ok, 1 the log is broken, 2 usage, 4 file or key problem.",
    )


def _log_command(asub: Any, name: str, **texts: str) -> argparse.ArgumentParser:
    """Add the ``audit`` sub-command *name* (``help``, ``description``, ``epilog``: *texts*)
    to *asub* with the argument every one of them takes first, the log directory ``DIR``;
    returns its parser."""
    p = asub.add_parser(name, **texts)
    p.add_argument("directory", type=Path, metavar="DIR", help="the audit log directory")
    return p


def _add_verify(asub: Any) -> None:
    p = _log_command(
        asub,
        "verify",
        help="check the hash chain and the signed checkpoints, report the first break",
        description="Check every segment of the log (plain and .zst) in order: sequence numbers "
        "without gaps, the hash chain across segments, every checkpoint signature, and that no "
        "segment is truncated or missing. Prints the first break (segment, sequence, problem) "
        "and exits 1, or exits 0 when the log is intact. It cannot detect a rollback of the "
        "newest segment to an earlier checkpoint (whole batches removed from the end) without "
        "--witness, nor a log rebuilt with another audit key unless --audit-pubkey pins the "
        "key.",
        epilog="Exit codes: 0 intact, 1 break found, 2 usage, 4 missing directory or unusable "
        "key or witness file.",
    )
    helps = {
        "--audit-pubkey": "the audit public key (PEM) to trust; default: "
        "DIR/audit-key.pub.pem, which anyone able to rewrite the log can also replace",
        "--witness": "checkpoint lines kept outside the log (one per line; text before the "
        "first '{' is ignored); each must be present unchanged, which detects a log truncated "
        "or rolled back to before a witnessed checkpoint",
        "--json": "print the report as JSON",
    }
    add_options(
        p,
        (
            ("--audit-pubkey", {"type": Path, "metavar": "FILE"}),
            ("--witness", {"type": Path, "metavar": "FILE"}),
            ("--json", SWITCH),
        ),
        helps,
    )
    p.set_defaults(func=cmd_audit_verify)


def _add_search(asub: Any) -> None:
    p = _log_command(
        asub,
        "search",
        help="list issuance records matching all given filters",
        description="List the issuance records (and with --key-events the key lifecycle "
        "records) that match every given filter, in log order. Times are ISO 8601 (no zone "
        "means UTC); --since is inclusive, --until exclusive. The log is read, not verified.",
        epilog="Exit codes: 0 ok (also when nothing matches), 1 unreadable segment, 2 usage, "
        "4 no such directory.",
    )
    helps = {
        "--client": "portal backend identity",
        "--account": "end-user account",
        "--operator": "operator acting under an account's mandate",
        "--kid": "key id (16 hex digits)",
        "--since": "from this time (inclusive)",
        "--until": "before this time (exclusive)",
        "--key-events": "also list key lifecycle records (they match only without "
        "--client/--account/--operator)",
        "--json": "print the stored fields, one JSON object a line",
    }
    add_options(
        p,
        (
            ("--client", {"metavar": "C"}),
            ("--account", {"metavar": "A"}),
            ("--operator", {"metavar": "O"}),
            ("--kid", {"type": kid, "metavar": "HEX"}),
            ("--since", {"type": iso_time, "metavar": "TIME"}),
            ("--until", {"type": iso_time, "metavar": "TIME"}),
            ("--key-events", SWITCH),
            ("--json", SWITCH),
        ),
        helps,
    )
    p.set_defaults(func=cmd_audit_search)


def _add_revocations(asub: Any) -> None:
    p = _log_command(
        asub,
        "revocations",
        help="the EU revocation hashes of everything one account issued",
        description="Print the UCI, COUNTRYCODEUCI and SIGNATURE revocation hashes (hex, "
        "128 bits, as the EU DCC revocation lists use them) of every DCC issued under one "
        "end-user account (as account, not as operator): what to revoke when that account was "
        "abused, without revoking the whole kid. The log is read, not verified.",
        epilog="Exit codes: 0 ok (also when the account issued nothing), 1 unreadable segment, "
        "2 usage, 4 no such directory.",
    )
    helps = {
        "--account": "end-user account",
        "--json": "print JSON: the hashes grouped by type, and one entry per DCC",
    }
    add_options(
        p,
        (
            ("--account", {"required": True, "metavar": "A"}),
            ("--json", SWITCH),
        ),
        helps,
    )
    p.set_defaults(func=cmd_audit_revocations)
