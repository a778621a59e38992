"""The keyd process: open the keystore and the audit log, load the keys, serve until told to
stop (:func:`run`), and what ``dccsign keyd --supervised`` reads from its supervisor (the
passphrase line, then end of file when the supervisor is gone)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Collection
from pathlib import Path

from .. import native
from ..audit.records import KeyEvent
from ..audit.writer import AuditLog
from ..keys.keystore import Keystore
from .service import DEFAULT_NONCE_POOL, Keyd
from .transport import serve_unix

__all__ = [
    "AUDIT_DIR",
    "AUDIT_KEY_FILE",
    "DEFAULT_LOCK_WAIT",
    "read_passphrase_line",
    "run",
    "watch_supervisor",
]

LOGGER = logging.getLogger("dccsign.keyd")

AUDIT_KEY_FILE = "audit-key.pem"
AUDIT_DIR = "audit"
#: How long keyd waits at start for the audit log lock of a keyd that is stopping (seconds).
DEFAULT_LOCK_WAIT = 15.0
#: The longest passphrase line keyd reads from its supervisor.
MAX_PASSPHRASE = 64 * 1024


def run(
    keystore: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    audit_dir: str | os.PathLike[str] | None = None,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    validate_dcc: bool = True,
    nonce_pool: int = DEFAULT_NONCE_POOL,
    passphrase: bytes | None = None,
    lock_wait: float = 0.0,
    socket_mode: int = 0o600,
    socket_group: int | None = None,
    allow_uids: Collection[int] | None = None,
    freeze_gc: bool = False,
    node_id: str | None = None,
) -> None:
    """Run keyd until *stop* is set (the CLI sets it on SIGTERM/SIGINT, and with
    ``--supervised`` when its supervisor is gone).

    *validate_dcc*: run the full DCC validator on every payload (the default; see the module
    docstring). *nonce_pool*: entries per active ES256 software key (0: no pools).
    *passphrase*: the keystore passphrase; None: ``keystore.resolve_passphrase``.
    *lock_wait*: seconds to wait for the audit log's lock while another process (a keyd that
    is stopping) still holds it. *socket_mode*, *socket_group*, *allow_uids*: see
    :func:`serve_unix`. *freeze_gc*: once loaded, take everything built so far out of the
    cyclic GC (``gc.freeze``: the keys, tables and validator live as long as the process;
    a full collection then pauses the signing threads less). For a process that is keyd
    only: ``dccsign keyd`` sets it. *node_id*: the node the audit log belongs to, written
    into its segment headers (:meth:`AuditLog.open`'s *node*; None: what the log names).

    The audit log lives in ``KEYSTORE/audit`` unless *audit_dir* is given; its checkpoint key
    is ``KEYSTORE/audit-key.pem`` (created on first start, encrypted with the keystore
    passphrase).

    Raises:
        KeystoreError: keystore, passphrase or audit key unusable (nothing was started).
        AuditLogError, AuditUnavailable: the audit log is broken, another node's, or cannot
            be written.
    """
    from ..audit.key import AuditKey
    from ..keys.keystore import resolve_passphrase

    root = Path(keystore)
    store = Keystore.open(root)
    if passphrase is None:
        passphrase = resolve_passphrase(root)
    # Every private key is decrypted before anything is created: a wrong passphrase must not
    # leave an audit key (or log) behind that was made with it.
    loaded = {e.kid: store.load_signing_key(e, passphrase, native) for e in store.entries}
    key_path = root / AUDIT_KEY_FILE
    audit_key = (
        AuditKey.load(key_path, passphrase)
        if key_path.exists()
        else AuditKey.create(key_path, passphrase)
    )
    audit_root = Path(audit_dir) if audit_dir else root / AUDIT_DIR
    with AuditLog.open(audit_root, audit_key, lock_wait=lock_wait, node=node_id) as log:
        keyd = Keyd(
            root,
            passphrase,
            log,
            preloaded=loaded,
            validate_dcc=validate_dcc,
            nonce_pool=nonce_pool,
        )
        keys = len(keyd.describe())
        if freeze_gc:
            gc.freeze()
        try:
            serve_unix(
                keyd,
                socket_path,
                ready=ready,
                # Logged once the socket listens: a reader of the log may connect at once.
                on_listening=lambda: LOGGER.info("keyd serving %d keys on %s", keys, socket_path),
                stop=stop,
                mode=socket_mode,
                group=socket_group,
                allow_uids=allow_uids,
            )
        finally:
            keyd.close()
            log.append_key_event(KeyEvent("keyd-stop", None, None, "keyd", None))


def read_passphrase_line(fd: int = 0) -> bytes | None:
    """The first line of *fd* without its newline (read byte by byte: nothing after it is
    consumed); None at end of file before a newline."""
    line = bytearray()
    while len(line) <= MAX_PASSPHRASE:
        byte = os.read(fd, 1)
        if not byte:
            return None
        if byte == b"\n":
            return bytes(line)
        line += byte
    raise ValueError(f"the passphrase line is longer than {MAX_PASSPHRASE} bytes")


def watch_supervisor(stop: threading.Event, fd: int = 0) -> None:
    """Block on *fd* (a pipe whose write end the supervisor holds); at end of file (the
    supervisor is gone, however it ended) set *stop*: keyd then stops as on SIGTERM."""
    try:
        while os.read(fd, 4096):
            pass  # the supervisor sends nothing after the passphrase line; ignore it if it does
    except OSError:
        pass
    if not stop.is_set():
        LOGGER.warning("standard input closed: the supervising process is gone; stopping")
        stop.set()
