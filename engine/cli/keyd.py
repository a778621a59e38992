"""``dccsign keyd``: the options of the key process. keyd itself is
:mod:`dccsign.keyd.service`, loaded only when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .args import keystore_arg

__all__ = ["NONCE_POOL_DEFAULT", "add_commands", "nonce_pool_option"]

#: keyd's default (engine/keyd/service.py DEFAULT_NONCE_POOL; a test keeps the two equal):
#: not imported here, so that building the parser does not load keyd.
NONCE_POOL_DEFAULT = 1 << 20


def _cmd_keyd(args: argparse.Namespace) -> int:
    from ..keyd.service import cmd_keyd

    return cmd_keyd(args)


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
    p.set_defaults(func=_cmd_keyd, validate_dcc=True)
