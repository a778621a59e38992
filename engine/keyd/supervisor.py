"""Starting, watching and stopping keyd from the signing side.

:class:`PrivateKeyd` runs ``dccsign keyd`` as a child process on a socket in a private
directory (mode 0700), so that only this process's user can reach it, restarts it when it has
died, and stops it with SIGTERM (a final audit checkpoint) when done. keyd runs with
``--supervised``: its standard input is a pipe whose write end this object holds for keyd's
lifetime. The first line is the keystore passphrase when this process has one (given, or
``DCCSIGN_KEYSTORE_PASSPHRASE``, which keyd's environment never gets); when this process is
gone, however it ended, keyd reads end of file and stops as on SIGTERM, releasing the audit
log for the next keyd. (Not PR_SET_PDEATHSIG: it fires when the *thread* that started keyd
exits, and :meth:`PrivateKeyd.start` may run in a worker thread that is retired while keyd
should live on.) keyd's log lines (key state changes, nonce pools, a failed mlock, audit
problems) are relayed to this process's stderr when ``relay_log`` is set, as the engine
does; the last ones also give the reason when keyd refuses to start. :class:`KeydSigner` is
the key object a :class:`~dccsign.dcc.issuer.SignerKey` holds when the private key lives in keyd.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from ..errors import KeyProblem, KeystoreError
from ..process import PASSPHRASE_ENV
from .client import KeydClient, KeydError

__all__ = ["KeydSigner", "PrivateKeyd"]


def _accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class PrivateKeyd:
    """A keyd child process for this process alone (a context manager).

    Raises:
        KeystoreError: keyd refused to start (wrong passphrase, corrupt keystore, broken audit
            log): its own message, which names the file.
        KeydError: keyd did not come up within *startup_timeout* seconds.
    """

    def __init__(
        self,
        keystore: str | os.PathLike[str],
        *,
        audit_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        validate_dcc: bool = True,
        nonce_pool: int | None = None,
        relay_log: bool = False,
        passphrase: bytes | None = None,
        lock_wait: float | None = None,
        node_id: str | None = None,
    ) -> None:
        self.keystore = Path(keystore)
        # Sent to every keyd started (a restarted one too); None: this process's
        # DCCSIGN_KEYSTORE_PASSPHRASE if set, else keyd finds it itself (a file).
        if passphrase is None:
            value = os.environ.get(PASSPHRASE_ENV)
            passphrase = os.fsencode(value) if value else None
        if passphrase is not None and (b"\n" in passphrase or b"\r" in passphrase):
            raise KeystoreError(
                "the keystore passphrase contains a line break: keyd takes it as one line"
            )
        self._passphrase = passphrase
        self.lock_wait = lock_wait  # keyd's --lock-wait; None: keyd's default
        self.node_id = node_id  # keyd's --node-id; None: keyd's default (the host name)
        self.relay_log = relay_log
        self._log_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._relay: threading.Thread | None = None
        self.audit_dir = audit_dir
        self.validate_dcc = validate_dcc
        self.nonce_pool = nonce_pool  # entries per active ES256 key; None: keyd's default
        self.startup_timeout = startup_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.socket_path: Path | None = None

    def __enter__(self) -> PrivateKeyd:
        self._tmp = tempfile.TemporaryDirectory(prefix="dccsign-keyd-")
        os.chmod(self._tmp.name, 0o700)
        self.socket_path = Path(self._tmp.name) / "keyd.sock"
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start(self) -> None:
        """Start keyd (again) and wait until it accepts connections."""
        assert self.socket_path is not None and self._tmp is not None
        argv = [
            sys.executable,
            "-m",
            "dccsign",
            "keyd",
            "--keystore",
            str(self.keystore),
            "--socket",
            str(self.socket_path),
        ]
        if self.audit_dir is not None:
            argv += ["--audit-dir", str(self.audit_dir)]
        if not self.validate_dcc:
            argv.append("--no-validate-dcc")  # keyd validates every DCC unless told not to
        if self.nonce_pool is not None:
            argv += ["--nonce-pool", str(self.nonce_pool)]
        if self.lock_wait is not None:
            argv += ["--lock-wait", f"{self.lock_wait:g}"]
        if self.node_id is not None:
            argv += ["--node-id", self.node_id]
        argv.append("--supervised")
        self._close_stdin()  # of a keyd that died
        env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdin is not None
        try:  # one short line: the pipe takes it without blocking
            self._proc.stdin.write((self._passphrase or b"") + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # keyd died at once: the loop below reports why
        self._log_tail.clear()
        self._relay = threading.Thread(
            target=_relay_lines,
            args=(self._proc.stderr, self._log_tail, sys.stderr if self.relay_log else None),
            name="keyd-log",
            daemon=True,
        )
        self._relay.start()
        deadline = time.monotonic() + self.startup_timeout
        # A keyd that was killed leaves its socket file: readiness is a successful connect.
        while not _accepts(self.socket_path):
            if self._proc.poll() is not None:
                self._relay.join(5)  # the pipe ends with the process: every line is in
                message = [line for line in self._log_tail if line.strip()]
                text = message[-1] if message else f"keyd exited with {self._proc.returncode}"
                raise KeystoreError(text.strip().removeprefix("dccsign keyd: error: "))
            if time.monotonic() > deadline:
                self._proc.kill()
                self._proc.wait()
                raise KeydError("keyd did not start in time")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        """keyd's process is alive (it may still be starting)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit status of keyd's process once it has ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def ensure_running(self) -> None:
        """Restart keyd if it has died (requests in flight then failed with KeydError)."""
        if not self.running:
            self.start()

    def client(self) -> KeydClient:
        assert self.socket_path is not None
        return KeydClient(self.socket_path)

    def _close_stdin(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()  # keyd, if alive, stops at this end of file
            except OSError:
                pass

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self._close_stdin()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _relay_lines(stream, tail: collections.deque[str], out) -> None:
    """Copy keyd's stderr line by line into *tail* (and to *out*) until keyd closes it."""
    with stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            tail.append(line)
            if out is not None:
                try:
                    print(line, file=out, flush=True)
                except (OSError, ValueError):  # our stderr is gone: keep draining the pipe
                    out = None


# eq=False: signers compare (and hash) by identity; two alike are still two signers.
@dataclass(slots=True, eq=False)
class KeydSigner:
    """The signing half of a key held by keyd, for one client and end-user account.

    Same ``sign(protected, payloads)`` contract as the native ``SigningKey``, except that the
    signature comes from keyd (which re-checks and audits each payload first). ``client`` is
    the keyd connection; ``client_id``, ``account`` and ``operator`` are what keyd is told
    each payload is for.

    Raises (from :meth:`sign`):
        KeyProblem: keyd refused one or more payloads (each named with keyd's reason). Any
            other payloads of the batch were signed and audited, but are not handed out.
        KeydError: keyd is unreachable (retryable).
    """

    client: KeydClient
    kid: bytes
    alg: int
    _: KW_ONLY
    client_id: str
    account: str
    operator: str | None = None

    def sign(self, protected: bytes, payloads: Sequence[bytes]) -> list[bytes]:
        results = self.client.sign(
            self.kid, payloads, client=self.client_id, account=self.account, operator=self.operator
        )
        refused = [(i, r) for i, r in enumerate(results) if not isinstance(r, bytes)]
        if refused:
            detail = "; ".join(
                f"item {i}: {code.name.lower()}: {why}" for i, (code, why) in refused[:5]
            )
            raise KeyProblem(f"keyd refused {len(refused)} of {len(results)} payloads: {detail}")
        return results  # type: ignore[return-value]
