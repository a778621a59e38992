"""``dccsign keyd``: the key process as a command -- its options, and what the process does
before keyd runs (non-dumpable, signals, the supervisor's passphrase line). keyd itself
(:mod:`dccsign.keyd.bootstrap`) is loaded only when the command runs."""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import Any

from .args import in_range, keystore_arg
from .exits import error_exit

__all__ = [
    "NONCE_POOL_DEFAULT",
    "add_commands",
    "cmd_keyd",
    "node_id_option",
    "nonce_pool_option",
]

LOGGER = logging.getLogger("dccsign.keyd")

#: keyd's default (engine/keyd/service.py DEFAULT_NONCE_POOL; a test keeps the two equal):
#: not imported here, so that building the parser does not load keyd.
NONCE_POOL_DEFAULT = 1 << 20


def cmd_keyd(args: argparse.Namespace) -> int:
    """``dccsign keyd``: returns the exit code (0 after a clean stop, 4 on key problems)."""
    import signal

    from ..audit.errors import AuditError
    from ..errors import KeystoreError
    from ..keyd.bootstrap import read_passphrase_line, run, watch_supervisor
    from ..process import make_non_dumpable

    logging.basicConfig(level=logging.INFO, format="keyd: %(levelname)s %(message)s")
    # Before any secret enters this process: no ptrace, /proc/PID/mem or core dump of keyd.
    problem = make_non_dumpable()
    if problem is not None:
        LOGGER.warning(
            "%s: other processes of this user may read keyd's memory; run keyd under its own user",
            problem,
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    passphrase: bytes | None = None
    if getattr(args, "supervised", False):
        try:
            line = read_passphrase_line()
        except (OSError, ValueError) as exc:
            return error_exit("dccsign keyd", 4, f"--supervised: standard input: {exc}")
        if line is None:
            return error_exit(
                "dccsign keyd",
                4,
                "--supervised: standard input ended before the passphrase line (the "
                "supervisor is gone)",
            )
        passphrase = line or None  # an empty line: find the passphrase as without a supervisor
        threading.Thread(
            target=watch_supervisor, args=(stop,), name="keyd-supervisor", daemon=True
        ).start()
    try:
        run(
            args.keystore,
            args.socket,
            args.audit_dir,
            stop=stop,
            validate_dcc=args.validate_dcc,
            nonce_pool=args.nonce_pool,
            passphrase=passphrase,
            lock_wait=getattr(args, "lock_wait", 0.0),
            socket_mode=getattr(args, "socket_mode", 0o600),
            socket_group=getattr(args, "socket_group", None),
            allow_uids=getattr(args, "allow_uid", None),
            freeze_gc=True,
            node_id=args.node_id,
        )
    except (KeystoreError, AuditError) as exc:
        return error_exit("dccsign keyd", 4, exc)
    except OSError as exc:  # the socket: its directory, group or mode
        message = exc.strerror or str(exc)
        if str(args.socket) not in message:
            message = f"{args.socket}: {message}"
        return error_exit("dccsign keyd", 4, message)
    return 0


#: Entries of the nonce pool per key: 0 (none) to 2**24.
_nonce_pool_entries = in_range(int, 0, 1 << 24, "an integer from 0 to 16777216")

#: How long keyd waits for the keystore's lock.
_lock_wait = in_range(float, 0, 3600, "0 to 3600 seconds")


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

    return _id_by_name(value, lambda name: grp.getgrnam(name).gr_gid, "group")


def _user_id(value: str) -> int:
    import pwd

    return _id_by_name(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _id_by_name(value: str, lookup: Any, noun: str) -> int:
    """*value* if it is a number, else the id *lookup* finds for the name (a *noun*: group or
    user); an unknown name is refused."""
    if value.isdigit():
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such {noun}: {value!r}") from None


def _node_id(value: str) -> str:
    from ..audit.node import MAX_NODE_ID, is_node_id

    if not is_node_id(value):
        raise argparse.ArgumentTypeError(
            f"a node id is 1 to {MAX_NODE_ID} characters from A-Z a-z 0-9 . _ -, not {value!r}"
        )
    return value


def node_id_option(parser: argparse.ArgumentParser | Any, *, extra: str = "") -> None:
    """Add ``--node-id NAME`` (``args.node_id``, never None) to *parser*; *extra* ends its
    help text."""
    from ..audit.node import default_node_id

    parser.add_argument(
        "--node-id",
        type=_node_id,
        default=default_node_id(),
        metavar="NAME",
        help="this node's id (1-64 characters from A-Z a-z 0-9 . _ -), written into every "
        "segment header of the audit log: one log per node, and keyd refuses to open a log "
        "that names another node. 'dccsign audit' labels each log's records with it when "
        "reading the logs of several nodes together. Default: the host name "
        "(socket.gethostname(); other characters replaced by '-', cut to 64), here "
        f"{default_node_id()!r}; set it where the host name is not stable (containers)" + extra,
    )


def nonce_pool_option(parser: argparse.ArgumentParser | Any) -> None:
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


def add_commands(sub: Any) -> None:
    """Add ``keyd`` to the ``dccsign`` parser's sub-commands *sub*."""
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
    keystore_arg(p)
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
    nonce_pool_option(p)
    node_id_option(p)
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
    _add_access(p)


def _add_access(p: Any) -> None:
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
    p.set_defaults(func=cmd_keyd, validate_dcc=True)
