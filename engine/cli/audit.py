"""``dccsign audit``: verify and search the issuance audit log (see :mod:`dccsign.audit`).

Exit codes, as for the rest of the CLI:
    0  success (``verify``: the log is intact)
    1  a log is broken (``verify`` prints the first break; ``search`` and ``revocations``
       stop at an unreadable segment)
    2  usage error (also: two directories that hold the same log or the same node's, which
       would be counted twice)
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


def _read_keys(paths: list[Path] | None) -> list[bytes] | None:
    """The PEM files of ``--audit-pubkey`` (none given: ``[]``); None after reporting one
    that cannot be read or is not an audit public key (exit 4)."""
    from ..audit.errors import AuditKeyError
    from ..audit.key import PublicKey

    pems = []
    for path in paths or ():
        pem = _read_file(path, "audit public key")
        if pem is None:
            return None
        if len(paths or ()) > 1:  # one key: verify names its file itself, as it always did
            try:
                PublicKey(pem, str(path))
            except AuditKeyError as exc:
                _error(EXIT_FILE, str(exc))
                return None
        pems.append(pem)
    return pems


def cmd_audit_verify(args: argparse.Namespace) -> int:
    pems = _read_keys(args.audit_pubkey)
    if pems is None:
        return EXIT_FILE
    if len(args.directories) > 1:
        if args.witness is not None:
            return _error(EXIT_USAGE, "--witness checks one log: give one directory with it")
        return _verify_logs(args, pems)
    witnesses: list[bytes] = []
    if args.witness is not None:
        data = _read_file(args.witness, "witness file")
        if data is None:
            return EXIT_FILE
        witnesses = [line for line in data.splitlines() if line.strip()]
    return _verify_one(args, args.directories[0], pems, witnesses)


def _verify_one(
    args: argparse.Namespace, directory: Path, pems: list[bytes], witnesses: list[bytes]
) -> int:
    """``audit verify`` of one log, with the audit key among *pems* that it names."""
    from ..audit.errors import AuditError
    from ..audit.logs import open_logs
    from ..audit.verify import key_for, verify

    try:
        pem = key_for(open_logs([directory])[0], pems) if len(pems) > 1 else next(iter(pems), None)
        report = verify(directory, pem, witnesses=witnesses)
    except AuditError as exc:
        return _error(EXIT_FILE, str(exc))
    except ValueError as exc:  # a witness that is not a validly signed checkpoint
        return _error(EXIT_FILE, f"{args.witness}: {exc}")
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        _print_report(str(directory), report)
    return EXIT_OK if report.ok else EXIT_BROKEN


def _verify_logs(args: argparse.Namespace, pems: list[bytes]) -> int:
    """``audit verify`` of several logs (one per node): each on its own, then overall."""
    from ..audit.errors import AuditError
    from ..audit.logs import DuplicateLog
    from ..audit.verify import verify_logs

    try:
        result = verify_logs(args.directories, pems)
    except DuplicateLog as exc:
        return _error(EXIT_USAGE, str(exc))
    except AuditError as exc:
        return _error(EXIT_FILE, str(exc))
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
        return EXIT_OK if result.ok else EXIT_BROKEN
    for source, report in result.logs:
        _print_report(f"node {report.node or 'unknown'} ({source.directory})", report)
    broken = [source.label for source, report in result.logs if not report.ok]
    count = len(result.logs)
    if broken:
        print(f"BROKEN: {len(broken)} of {count} logs ({', '.join(broken)})")
    else:
        print(f"all {count} logs intact: {result.records} records")
    return EXIT_OK if result.ok else EXIT_BROKEN


def _print_report(name: str, report: Any) -> None:
    """The text of one log's :class:`~dccsign.audit.verify.VerifyReport`, its lines
    starting with *name* (the directory; with several logs, the node too)."""
    trust = (
        "pinned audit key"
        if report.key_pinned
        else "audit key stored beside the log (limited trust: pin it with --audit-pubkey)"
    )
    if report.ok:
        print(
            f"{name}: intact: {report.records} records, {report.segments} "
            f"segment{'' if report.segments == 1 else 's'}, "
            f"{report.checkpoints} checkpoints, last sequence {report.last_sequence}"
            + ("" if report.closed_cleanly else " (not closed: in use, or keyd stopped)")
        )
    else:
        brk = report.first_break
        assert brk is not None
        print(f"{name}: BROKEN at segment {brk.segment}, sequence {brk.sequence}: {brk.problem}")
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


def _check_directories(args: argparse.Namespace) -> int | None:
    """Exit 4 (reported) unless every directory given exists."""
    for directory in args.directories:
        if not directory.is_dir():
            return _error(EXIT_FILE, f"{directory}: no such audit log directory")
    return None


def cmd_audit_search(args: argparse.Namespace) -> int:
    from ..audit.errors import AuditLogError
    from ..audit.logs import DuplicateLog

    problem = _check_directories(args)
    if problem is not None:
        return problem
    kinds = ("issue", "key") if args.key_events else ("issue",)
    filters = {
        "client": args.client,
        "account": args.account,
        "kid": args.kid.hex() if args.kid else None,
        "since": args.since,
        "until": args.until,
        "operator": args.operator,
        "kinds": kinds,
    }
    out = sys.stdout
    try:
        count = _print_entries(args, filters, out)
    except DuplicateLog as exc:
        return _error(EXIT_USAGE, str(exc))
    except AuditLogError as exc:
        out.flush()
        return _error(EXIT_BROKEN, str(exc))
    out.flush()
    if not args.json:
        print(
            f"{count} matching entries (not verified: run 'dccsign audit verify')", file=sys.stderr
        )
    return EXIT_OK


def _search_pairs(args: argparse.Namespace, filters: dict[str, Any]) -> tuple[Any, int]:
    """``(source or None, entry)`` for every match -- one log as it always was, several
    merged by time, each with its log (:func:`~dccsign.audit.search.search_logs`) -- and
    the width of the label column (0 for one log).

    Raises:
        DuplicateLog: two directories hold the same log or node's (before any output).
    """
    from ..audit.logs import open_logs
    from ..audit.search import search, search_logs

    if len(args.directories) == 1:
        return ((None, entry) for entry in search(args.directories[0], **filters)), 0
    width = max(len(source.label) for source in open_logs(args.directories))
    return search_logs(args.directories, **filters), width


def _print_entries(args: argparse.Namespace, filters: dict[str, Any], out: Any) -> int:
    """Write the entries that match *filters* (text rows or JSON lines; labelled with their
    node when they come from several logs) and return how many.

    Raises:
        DuplicateLog, AuditLogError: as ``search_logs``.
    """
    pairs, width = _search_pairs(args, filters)
    count = 0
    for source, entry in pairs:
        if args.json:
            shown = entry if source is None else {**entry, **_origin(source)}
            line = json.dumps(shown, sort_keys=True, ensure_ascii=False)
        else:
            line = _row(entry) if source is None else f"{source.label:<{width}}  {_row(entry)}"
        out.write(line + "\n")
        count += 1
    return count


def _origin(source: Any) -> dict[str, Any]:
    """The fields that say which log an entry of several comes from (JSON output)."""
    return {"node": source.node, "log_dir": str(source.directory)}


def cmd_audit_revocations(args: argparse.Namespace) -> int:
    from ..audit.errors import AuditLogError
    from ..audit.logs import DuplicateLog
    from ..audit.search import revocations, revocations_logs

    problem = _check_directories(args)
    if problem is not None:
        return problem
    several = len(args.directories) > 1
    try:
        if several:
            rows = revocations_logs(args.directories, args.account)
        else:
            rows = [(None, r) for r in revocations(args.directories[0], args.account)]
    except DuplicateLog as exc:
        return _error(EXIT_USAGE, str(exc))
    except AuditLogError as exc:
        return _error(EXIT_BROKEN, str(exc))
    if args.json:
        print(json.dumps(_revocations_doc(args.account, rows), indent=2, ensure_ascii=False))
        return EXIT_OK
    _print_revocations(rows, several)
    print(
        f"{len(rows)} DCCs issued by account {args.account} (not verified: run 'dccsign audit "
        "verify')",
        file=sys.stderr,
    )
    return EXIT_OK


def _revocations_doc(account: str, rows: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The JSON of ``audit revocations``; each record names its log when from several."""
    revs = [r for _, r in rows]
    return {
        "account": account,
        "count": len(rows),
        "hashes": {
            "UCI": [r.uci for r in revs],
            "COUNTRYCODEUCI": [r.countrycodeuci for r in revs],
            "SIGNATURE": [r.signature for r in revs],
        },
        "records": [
            r.as_json() if source is None else {**r.as_json(), **_origin(source)}
            for source, r in rows
        ],
    }


def _print_revocations(rows: list[tuple[Any, Any]], several: bool) -> None:
    """The table of ``audit revocations``, with a NODE column for several logs."""
    width = max([4, *(len(source.label) for source, _ in rows)]) if several else 0
    node = f"{'NODE':<{width}}  " if several else ""
    print(f"{node}{'SEQ':>9}  {'KID':<16}  T  {'UCI':<32}  {'COUNTRYCODEUCI':<32}  SIGNATURE")
    for source, r in rows:
        node = f"{source.label:<{width}}  " if several else ""
        print(
            f"{node}{r.sequence:>9}  {r.kid:<16}  {r.dcc_type}  {r.uci}  {r.countrycodeuci}  "
            f"{r.signature}"
        )


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
        "audit key. Each node (engine and keyd) keeps its own log, its node id in every "
        "segment header; given several log directories, these commands answer for all of them "
        "together. They only read the logs.",
        epilog="Exit codes: 0 ok, 1 a log is broken, 2 usage (also: two directories that "
        "hold the same log or the same node's), 4 file or key problem.",
    )


def _log_command(asub: Any, name: str, **texts: str) -> argparse.ArgumentParser:
    """Add the ``audit`` sub-command *name* (``help``, ``description``, ``epilog``: *texts*)
    to *asub* with the argument every one of them takes first, the log directories
    ``DIR [DIR ...]``; returns its parser."""
    p = asub.add_parser(name, **texts)
    p.add_argument(
        "directories",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="an audit log directory; several: the logs of several nodes (one each, "
        "named by the node id in their headers), answered for together",
    )
    return p


def _add_verify(asub: Any) -> None:
    p = _log_command(
        asub,
        "verify",
        help="check the hash chain and the signed checkpoints, report the first break",
        description="Check every segment of the log (plain and .zst) in order: sequence numbers "
        "without gaps, the hash chain across segments, every checkpoint signature, one node id "
        "throughout, and that no segment is truncated or missing. Prints the first break "
        "(segment, sequence, problem) and exits 1, or exits 0 when the log is intact. It cannot "
        "detect a rollback of the newest segment to an earlier checkpoint (whole batches "
        "removed from the end) without --witness, nor a log rebuilt with another audit key "
        "unless --audit-pubkey pins the key. Given several directories (one log per node), "
        "each log is checked on its own and reported under its node id, then a summary line; "
        "exit 1 if any is broken.",
        epilog="Exit codes: 0 intact, 1 break found, 2 usage (also: the same log or node "
        "twice, --witness with several logs), 4 missing directory or unusable key or witness "
        "file.",
    )
    helps = {
        "--audit-pubkey": "the audit public key (PEM) to trust; repeat for nodes with keys "
        "of their own: each log is checked with the one its headers name (if none does, with "
        "the first, and the log is reported broken); default: each DIR/audit-key.pub.pem, "
        "which anyone able to rewrite the log can also replace",
        "--witness": "checkpoint lines kept outside the log (one per line; text before the "
        "first '{' is ignored); each must be present unchanged, which detects a log truncated "
        "or rolled back to before a witnessed checkpoint (one log only: verify each node's log "
        "with its own witnesses)",
        "--json": "print the report as JSON (several logs: {ok, records, logs: [one report "
        "each, with its directory, node and log id]})",
    }
    add_options(
        p,
        (
            ("--audit-pubkey", {"type": Path, "metavar": "FILE", "action": "append"}),
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
        "records) that match every given filter, in log order; from several logs (one per "
        "node), merged by time, each row starting with its node id (its directory for a log "
        "without one). Times are ISO 8601 (no zone means UTC); --since is inclusive, --until "
        "exclusive. The logs are read, not verified.",
        epilog="Exit codes: 0 ok (also when nothing matches), 1 unreadable segment, 2 usage "
        "(also: the same log or node twice), 4 no such directory.",
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
        "--json": "print the stored fields, one JSON object a line (from several logs, "
        "with 'node' and 'log_dir' added)",
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
        "abused, without revoking the whole kid. Given the logs of several nodes, what the "
        "account issued through any of them, merged by time, each with its node id. The logs "
        "are read, not verified.",
        epilog="Exit codes: 0 ok (also when the account issued nothing), 1 unreadable segment, "
        "2 usage (also: the same log or node twice), 4 no such directory.",
    )
    helps = {
        "--account": "end-user account",
        "--json": "print JSON: the hashes grouped by type, and one entry per DCC (from "
        "several logs, with its 'node' and 'log_dir')",
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
