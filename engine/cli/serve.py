"""``dccsign serve``: the command that runs the engine (:mod:`dccsign.server.engine`) --
its options, the embedded default (``--dev``), and the process around it (logging, signals,
file descriptors)."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import ssl
from pathlib import Path
from typing import Any

import trio

from ..server.batcher import DEFAULT_WINDOW
from ..server.engine import Engine, tls_server_context
from ..server.server import Limits
from ..server.sharedstate import (
    DEFAULT_CLAIM_TTL,
    DEFAULT_RESULT_TTL,
    DEFAULT_WAIT,
    state_url,
)
from ..server.sharedstate import DEFAULT_TIMEOUT as DEFAULT_STATE_TIMEOUT
from ..server.sharedstate import DEFAULT_WINDOW as DEFAULT_STATE_WINDOW
from .args import OptionRow, add_options, host_port, keystore_arg, number
from .exits import error_exit
from .keyd import node_id_option, nonce_pool_option

__all__ = ["add_commands", "cmd_serve"]

LOGGER = logging.getLogger("dccsign.serve")


#: The fields of :class:`Limits` that options of the same name (``--max-in-flight`` sets
#: ``max_in_flight``) bound to a number of this kind, greater than zero and at most this, in
#: the order of ``--help``.
_LIMIT_BOUNDS: tuple[tuple[str, type[int] | type[float], float], ...] = (
    ("max_in_flight", int, 65_536),
    ("max_connection_items", int, 10_000_000),
    ("max_client_items", int, 10_000_000),
    ("max_connections", int, 1_000_000),
    ("idle_timeout", float, 86_400),
    ("max_pending_items", int, 10_000_000),
    ("max_batch", int, 100_000),
    ("deadline", float, 3600),
)


class _Usage(Exception):
    """A combination of options ``dccsign serve`` cannot run with (exit 2)."""


def cmd_serve(args: Any) -> int:
    """``dccsign serve``; returns the exit code."""
    from ..process import take_environ_secret

    # Read once, kept for every keyd this engine starts (sent through a pipe), and wiped from
    # this process's environment, also from what /proc/PID/environ shows. First, while no
    # other thread runs.
    passphrase = take_environ_secret()
    logging.basicConfig(level=logging.INFO, format="dccsign serve: %(levelname)s %(message)s")
    from ..errors import DccSignError

    keyd_socket = getattr(args, "keyd_socket", None)
    try:
        _check_options(args, keyd_socket)
        if keyd_socket is not None and passphrase is not None:
            LOGGER.warning(
                "DCCSIGN_KEYSTORE_PASSPHRASE is not used with --keyd-socket (keyd has its own); "
                "it was removed from this process's environment"
            )
            passphrase = None
        policy = args.policy or args.keystore / "policy.json"
        if args.dev:
            _dev_setup(args.keystore, policy)
        ssl_context = _tls_context(args)
        limits = _limits(args)
        _raise_fd_limit(limits.max_connections)
        engine = Engine(
            args.keystore,
            policy,
            limits=limits,
            keyd_connections=args.keyd_connections,
            batch_window=args.batch_window / 1000,
            zlib_level=args.zlib_level,
            nonce_pool=args.nonce_pool,
            audit_dir=args.audit_dir,
            keyd_validate_dcc=not args.keyd_no_validate_dcc,
            passphrase=passphrase,
            keyd_socket=keyd_socket,
            state=args.state,
            state_options=_state_options(args),
            node_id=args.node_id,
        )
    except _Usage as exc:
        return error_exit("dccsign serve", 2, exc)
    except (DccSignError, OSError, ssl.SSLError) as exc:
        return error_exit("dccsign serve", 4, exc)
    return _run(engine, args, ssl_context)


def _check_options(args: Any, keyd_socket: Path | None) -> None:
    """Raise :class:`_Usage` for options that cannot work together, before anything is
    created."""
    if args.keystore is None and (keyd_socket is None or args.policy is None or args.dev):
        raise _Usage("give --keystore DIR (or --keyd-socket PATH and --policy FILE)")
    if args.unix is None and args.tcp is None:
        raise _Usage("give --unix PATH and/or --tcp HOST:PORT")
    if (
        args.tcp is not None
        and not args.dev
        and None in (args.tls_cert, args.tls_key, args.client_ca)
    ):
        raise _Usage("--tcp needs --tls-cert, --tls-key and --client-ca (or --dev)")
    if not 0 <= args.batch_window <= 100:
        raise _Usage("--batch-window must be 0..100 ms")
    if not 0 <= args.queue_target <= 60_000:
        raise _Usage("--queue-target must be 0..60000 ms")
    if not 0 <= args.state_window <= 100:
        raise _Usage("--state-window must be 0..100 ms")


def _state_options(args: Any) -> dict[str, Any]:
    """:class:`RedisState`'s keyword arguments from the ``--state-*`` options (and the
    node id, which labels the idempotency keys this engine claims)."""
    return {
        "node": args.node_id,
        "timeout": args.state_timeout,
        "window": args.state_window / 1000,
        "claim_ttl": args.state_claim_ttl,
        "result_ttl": args.state_retention,
        "wait": args.state_wait,
    }


def _tls_context(args: Any) -> ssl.SSLContext | None:
    """The server's TLS context for ``--tcp`` (the development material with ``--dev`` and
    no ``--tls-cert``); None without ``--tcp``."""
    from ..server.devtls import ensure_dev_tls

    if args.tcp is None:
        return None
    if args.tls_cert is None and args.dev:
        paths = ensure_dev_tls(args.keystore / "dev-tls")
        LOGGER.info("TLS: development CA and certificates in %s", paths["ca"].parent)
        return tls_server_context(paths["server_cert"], paths["server_key"], paths["ca"])
    if None in (args.tls_cert, args.tls_key, args.client_ca):
        raise _Usage("--tcp needs --tls-cert, --tls-key and --client-ca (or --dev)")
    return tls_server_context(args.tls_cert, args.tls_key, args.client_ca)


def _limits(args: Any) -> Limits:
    """The engine's :class:`Limits` from the options named after its fields (the queue target
    given in milliseconds)."""
    bounds = {name: getattr(args, name) for name, _kind, _maximum in _LIMIT_BOUNDS}
    return Limits(**bounds, queue_target=args.queue_target / 1000)


def _run(engine: Engine, args: Any, ssl_context: ssl.SSLContext | None) -> int:
    """Run *engine* until SIGTERM or SIGINT, then drain; the exit code."""
    from ..errors import DccSignError

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: engine.run(
                    unix=args.unix,
                    tcp=args.tcp,
                    ssl_context=ssl_context,
                    http=args.http,
                    task_status=task_status,
                )
            )
            for name, where in bound.items():
                LOGGER.info("listening (%s) on %s", name, where)
            # What start-up built (code, tables, the keyd link, the dispatcher) lives as long
            # as the process: out of the cyclic GC's full collections, which then pause the
            # event loop about a quarter as long (measured under load: bench/README.md).
            gc.freeze()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    LOGGER.info("draining: finishing requests in progress")
                    await engine.drain()
                    break

    try:
        trio.run(main)
    except DccSignError as exc:  # KeydError among them
        return error_exit("dccsign serve", 4, exc)
    except BaseExceptionGroup as group:  # trio's nurseries wrap what keyd's start raised
        known, other = group.split(DccSignError)
        if known is None or other is not None:
            raise
        while isinstance(known, BaseExceptionGroup):
            known = known.exceptions[0]
        return error_exit("dccsign serve", 4, known)
    return 0


def _raise_fd_limit(connections: int) -> None:
    """Let the process hold *connections* sockets besides its files: the soft limit on open
    files is often 1,024, below --max-connections, and an accept that fails with EMFILE
    stalls every new connection rather than refusing the excess with a clear count."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            LOGGER.warning(
                "the open-files limit is %d (hard): fewer than --max-connections %d can be served",
                hard,
                connections,
            )


def _dev_setup(keystore: Path, policy: Path) -> None:
    """The embedded default: a development keystore, and a policy that lets the current user
    (Unix socket) and the development client certificate (TLS) sign."""
    import json
    import os

    from ..keys.keystore import init_dev
    from ..server.devtls import DEV_CLIENT_NAME, ensure_dev_tls
    from ..server.policy import CN_PREFIX

    if not (keystore / "keystore.json").exists():
        init_dev(keystore)
        LOGGER.info("created a development keystore in %s", keystore)
    ensure_dev_tls(keystore / "dev-tls")
    if not policy.exists():
        quota = {"per_hour": 100_000_000}
        document = {
            "clients": {
                "dev-local": {"quota": quota},
                CN_PREFIX + DEV_CLIENT_NAME: {"quota": quota},
            },
            "unix_uids": {str(os.getuid()): "dev-local"},
            "default_account_quota": {"per_hour": 100_000_000},
        }
        policy.write_text(json.dumps(document, indent=2) + "\n")
        LOGGER.info("created a development policy in %s", policy)


def add_commands(sub: Any) -> None:
    """Add ``serve`` to the ``dccsign`` parser's sub-commands *sub*."""
    p = _add_serve(sub)
    _add_limits(p)
    _add_state(p)
    p.set_defaults(func=cmd_serve)


def _add_serve(sub: Any) -> Any:
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
    keystore_arg(
        p,
        required=False,
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
    node_id_option(
        p,
        extra=". Passed to the keyd this engine starts; with --keyd-socket, give that keyd "
        "the same --node-id",
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
    return p


def _add_state(p: Any) -> None:
    """The options of the store that the engines of one deployment share."""
    group = p.add_argument_group(
        "shared state (several engines behind a load balancer: docs/scale-out.md)"
    )
    rows: tuple[OptionRow, ...] = (
        ("--state", {"type": _state_arg, "metavar": "URL"}),
        ("--state-timeout", number(float, 60, DEFAULT_STATE_TIMEOUT, "S")),
        (
            "--state-window",
            {"type": float, "default": DEFAULT_STATE_WINDOW * 1000, "metavar": "MS"},
        ),
        ("--state-claim-ttl", number(float, 86_400, DEFAULT_CLAIM_TTL, "S")),
        ("--state-retention", number(float, 30 * 86_400, DEFAULT_RESULT_TTL, "S")),
        ("--state-wait", number(float, 3600, DEFAULT_WAIT, "S")),
    )
    add_options(group, rows, _state_helps())


def _state_arg(text: str) -> str:
    try:
        return state_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _state_helps() -> dict[str, str]:
    return {
        "--state": "where quota windows and idempotency keys live: in this process (the "
        "default), or in a Redis that every engine of a deployment shares, so that a quota "
        "of N is N in total and a retry on another engine gets the first signature: "
        "redis://[:PASSWORD@]HOST:PORT[/DB], unix:///PATH[?db=N] or "
        "redis+cluster://HOST:PORT,HOST:PORT. Requests that need it (a client with a quota, "
        "an item with an idempotency key) then fail with STATE_UNAVAILABLE (retryable), "
        "nothing signed, while Redis cannot be reached or does not answer in time; "
        "the engine reconnects by itself",
        "--state-timeout": "longest wait for one call to --state, in seconds (default "
        f"{DEFAULT_STATE_TIMEOUT:g})",
        "--state-window": "longest an operation waits to share a call to --state with "
        f"others, in milliseconds (default {DEFAULT_STATE_WINDOW * 1000:g})",
        "--state-claim-ttl": "seconds an idempotency key stays claimed by an engine that has "
        "not stored its result (it may have died); a retry after that is signed afresh "
        f"(default {DEFAULT_CLAIM_TTL:g})",
        "--state-retention": "seconds a result is kept in --state for retries (default "
        f"{DEFAULT_RESULT_TTL:g}: 24 hours, as protocol/SPEC.md asks at least)",
        "--state-wait": "seconds a retry waits for a first attempt in progress on another "
        f"engine before BUSY (default {DEFAULT_WAIT:g})",
    }


def _add_limits(p: Any) -> None:
    lim = Limits()
    tune = p.add_argument_group("capacity and batching")
    rows: list[OptionRow] = []
    for name, kind, maximum in _LIMIT_BOUNDS:
        metavar = "N" if kind is int else "S"
        rows.append((_flag(name), number(kind, maximum, getattr(lim, name), metavar)))
    add_options(tune, rows, _limit_helps(lim))
    _add_batching(tune, lim)


def _flag(field: str) -> str:
    """The option that sets the :class:`Limits` field *field*."""
    return "--" + field.replace("_", "-")


def _limit_helps(lim: Limits) -> dict[str, str]:
    """The help texts of the options that set *lim*'s bounds, by flag."""
    return {
        "--max-in-flight": "requests in progress on one connection, or answered and not yet "
        f"read, before BUSY (default {lim.max_in_flight})",
        "--max-connection-items": "certificates in progress on one connection, or answered and "
        f"not yet read by its client, before BUSY (default {lim.max_connection_items})",
        "--max-client-items": "certificates in progress for one client over all its "
        "connections, or answered and not yet read, before BUSY (default "
        f"{lim.max_client_items})",
        "--max-connections": "open connections; more are closed at once (default "
        f"{lim.max_connections}; the open-files limit is raised to fit)",
        "--idle-timeout": "close a connection that has nothing in progress and sends nothing "
        "(not even PING) for S seconds, with GOAWAY, or whose client reads none of its replies "
        f"for S seconds (default {lim.idle_timeout:g}; HELLO must come within "
        f"{lim.hello_timeout:g} s, and each frame arrive whole within {lim.frame_timeout:g} s)",
        "--max-pending-items": "certificates in progress in the whole engine, or answered and "
        f"not yet read, before BUSY (default {lim.max_pending_items}); above 3/4 of it only "
        "clients within their weighted share (policy 'weight') are admitted",
        "--max-batch": "items per SIGN_BATCH frame, announced in WELCOME (default "
        f"{lim.max_batch})",
        "--deadline": "seconds a request may take before DEADLINE_EXCEEDED (default "
        f"{lim.deadline:g})",
    }


def _add_batching(tune: Any, lim: Limits) -> None:
    """The options of batching and of the keyd link, after the capacity bounds of *lim*."""
    helps = _batching_helps(lim)
    ms = {"type": float, "metavar": "MS"}
    windows: tuple[OptionRow, ...] = (
        ("--queue-target", {**ms, "default": lim.queue_target * 1000}),
        ("--batch-window", {**ms, "default": DEFAULT_WINDOW * 1000}),
    )
    add_options(tune, windows, helps)
    nonce_pool_option(tune)
    zlib_level = {"type": int, "choices": range(1, 10), "default": 9, "metavar": "L"}
    add_options(
        tune,
        (("--keyd-connections", number(int, 64, 2)), ("--zlib-level", zlib_level)),
        helps,
    )


def _batching_helps(lim: Limits) -> dict[str, str]:
    """The help texts of :func:`_add_batching`'s options, by flag."""
    return {
        "--queue-target": "refuse a client's new requests with BUSY while its oldest request in "
        f"progress is older than this, more than {lim.queue_floor} certificates are in progress "
        "in the engine and the client holds at least its weighted share of them, in "
        f"milliseconds; 0 turns it off (default {lim.queue_target * 1000:g})",
        "--batch-window": "longest a request waits to share a keyd round with others, in "
        f"milliseconds (0..100; default {DEFAULT_WINDOW * 1000:g})",
        "--keyd-connections": "pipelined connections to keyd (keyd serves each on its own "
        "thread; default 2)",
        "--zlib-level": "deflate level of the HC1 strings, 1..9 (default 9; every level is a "
        "standard zlib stream)",
    }
