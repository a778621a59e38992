"""The engine process (``dccsign serve``): keyd supervision, listeners, metrics, drain.

The engine starts keyd as its child (``PrivateKeyd``: a private socket directory, audit log in
the keystore's ``audit`` directory), talks to it over a few pipelined connections, and
restarts it when it dies: requests in flight then fail with KEYD_UNAVAILABLE (retryable), and
since keyd releases a signature only after its audit record is durable, no client holds a
certificate the log lacks.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from ..dcc.dsc import DSC
from ..keyd.client import KeydError, KeyList
from ..keyd.supervisor import PrivateKeyd
from ..keyd.trio_client import TrioKeydClient
from .batcher import DEFAULT_WINDOW, KeydBatcher
from .dispatch import Dispatcher
from .metrics import Metrics, serve_http
from .policy import PolicyFile, QuotaTracker
from .server import Limits, Server
from .sharedstate import RedisState

__all__ = ["Engine", "tls_server_context"]

LOGGER = logging.getLogger("dccsign.serve")
#: How often the engine checks that keyd is alive and its key states are current.
KEYD_POLL = 0.25
#: With --keyd-socket: how long the engine waits at start for keyd, and the longest pause
#: between two attempts to reach it (the pause doubles from KEYD_POLL after each failure).
KEYD_STARTUP = 60.0
KEYD_BACKOFF_MAX = 5.0


def tls_server_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context that requires a client certificate issued by *client_ca*."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Engine:
    """keyd (supervised), the dispatcher and the server, wired together."""

    def __init__(
        self,
        keystore: Path | None,
        policy_path: Path,
        *,
        limits: Limits | None = None,
        keyd_connections: int = 2,
        batch_window: float = DEFAULT_WINDOW,
        zlib_level: int = 9,
        nonce_pool: int | None = None,
        audit_dir: Path | None = None,
        keyd_validate_dcc: bool = True,
        passphrase: bytes | None = None,
        keyd_socket: Path | None = None,
        state: str | None = None,
        state_options: Mapping[str, Any] | None = None,
        node_id: str | None = None,
    ) -> None:
        """*state*: the URL of the store shared by the engines of a deployment (Redis:
        sharedstate.py), with :class:`RedisState`'s keyword arguments *state_options*
        (``node`` among them); None keeps quotas and idempotency keys in this process."""
        if keystore is None and keyd_socket is None:
            raise ValueError("the engine needs a keystore (its own keyd) or keyd_socket")
        self.keystore = keystore
        #: kept for every keyd this engine starts (a restarted one too); sent over a pipe
        self.passphrase = passphrase
        #: an external keyd's socket (``--keyd-socket``): no keyd child, reconnect only
        self.keyd_socket = keyd_socket
        self.nonce_pool = nonce_pool
        self.audit_dir = audit_dir
        #: this node's id (``--node-id``), for its keyd's audit log; None: keyd's default
        self.node_id = node_id
        self.keyd_validate_dcc = keyd_validate_dcc
        # Re-read by _watch_policy in a worker thread, never on the event loop; a broken
        # policy file stops the start, with its message.
        self.policy = PolicyFile(policy_path, reload_inline=False)
        self.metrics = Metrics()
        self.limits = limits or Limits()
        self.keyd_connections = keyd_connections
        self.batch_window = batch_window
        self.zlib_level = zlib_level
        self.keyd: PrivateKeyd | None = None
        self.client: TrioKeydClient | None = None
        self.server: Server | None = None
        self.keyd_problem: str | None = "keyd is starting"
        #: keyd's keys as last handed to the dispatcher ((DSC DER, state) each), and their
        #: parsed DSCs by DER (_take_keys)
        self._keys_seen: tuple[tuple[bytes, str], ...] | None = None
        self._dscs: dict[bytes, DSC] = {}
        #: Why keyd's audit log cannot commit (keyd signs nothing meanwhile), or None.
        self.keyd_audit: str | None = None
        self.metrics.keyd_audit_ok.set_function(
            lambda: float(self.keyd_problem is None and self.keyd_audit is None)
        )
        self.shared: RedisState | None = None
        if state is not None:
            self.shared = RedisState(state, metrics=self.metrics, **(state_options or {}))

    def health(self) -> str | None:
        if self.server is not None and self.server.draining.is_set():
            return "draining"
        if self.keyd_problem is None and self.keyd_audit is not None:
            return f"audit log cannot commit: {self.keyd_audit}"
        return self.keyd_problem

    def _take_keys(self, dispatcher: Dispatcher, keys: Sequence[Any]) -> None:
        """Hand keyd's keys (a DESCRIBE reply) to *dispatcher* when they changed.

        DESCRIBE runs four times a second: parsing every DSC each time, and replacing the
        dispatcher's key objects, cost the event loop ~5 % of its time under load, for a
        list that changes a few times a year. A DSC is parsed once per DER.
        """
        seen = tuple((k.dsc, k.state) for k in keys)
        if seen == self._keys_seen:
            return
        parsed = {der: self._dscs.get(der) or DSC.from_bytes(der) for der, _state in seen}
        dispatcher.set_keys([(parsed[der], state) for der, state in seen])
        self._dscs = parsed  # only the current keys' DSCs are kept
        self._keys_seen = seen

    def _note_audit(self, audit: str | None) -> None:
        """Take keyd's audit state from a DESCRIBE reply (log and count the changes)."""
        if audit is not None and self.keyd_audit is None:
            self.metrics.keyd_audit_outages.inc()
            LOGGER.error("keyd cannot sign: %s (it retries by itself)", audit)
        elif audit is None and self.keyd_audit is not None:
            LOGGER.warning("keyd's audit log commits again: signing resumed")
        self.keyd_audit = audit

    async def run(
        self,
        *,
        unix: Path | None = None,
        tcp: tuple[str, int] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        http: tuple[str, int] | None = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until :meth:`drain` finishes. Reports a dict of bound addresses when ready."""
        keyd = await self._start_own_keyd()
        try:
            async with trio.open_nursery() as nursery:
                keys = await self._connect_keyd(nursery, keyd)
                self.metrics.nonce_pools.update(keys)
                if self.shared is not None:
                    await nursery.start(self.shared.run)
                dispatcher = await self._start_dispatcher(nursery, keys)
                self.server = Server(dispatcher, limits=self.limits, metrics=self.metrics)
                self.keyd_problem = None
                self.metrics.keyd_up.set(1)
                bound = await self._listen(nursery, unix, tcp, ssl_context, http)
                supervisor = trio.CancelScope()
                nursery.start_soon(self._supervise, dispatcher, supervisor)
                nursery.start_soon(self._watch_policy)
                task_status.started(bound)
                await self.server.draining.wait()
                await self.server.drain()
                supervisor.cancel()
                nursery.cancel_scope.cancel()
        finally:
            if self.client is not None:
                with trio.CancelScope(shield=True):
                    await self.client.aclose()
            if keyd is not None:
                await trio.to_thread.run_sync(keyd.__exit__, None, None, None)

    async def _start_own_keyd(self) -> PrivateKeyd | None:
        """Start this engine's keyd child, or None with ``--keyd-socket`` (an external one)."""
        if self.keyd_socket is not None:
            return None
        assert self.keystore is not None
        keyd = PrivateKeyd(
            self.keystore,
            nonce_pool=self.nonce_pool,
            relay_log=True,
            audit_dir=self.audit_dir,
            validate_dcc=self.keyd_validate_dcc,
            passphrase=self.passphrase,
            node_id=self.node_id,
        )
        await trio.to_thread.run_sync(keyd.__enter__)
        self.keyd = keyd
        return keyd

    async def _connect_keyd(self, nursery: trio.Nursery, keyd: PrivateKeyd | None) -> KeyList:
        """Connect ``self.client`` to our keyd child, or to the external one (*keyd* None,
        retried while it starts), and return its keys."""
        if keyd is None:
            assert self.keyd_socket is not None
            self.client = TrioKeydClient(self.keyd_socket, self.keyd_connections)
            return await self._reach_keyd(nursery)
        assert keyd.socket_path is not None
        self.client = TrioKeydClient(keyd.socket_path, self.keyd_connections)
        await self.client.connect(nursery)
        return await self.client.describe()

    async def _start_dispatcher(self, nursery: trio.Nursery, keys: KeyList) -> Dispatcher:
        """Start the keyd batcher in *nursery*; the dispatcher that feeds it, with *keys*."""
        assert self.client is not None
        batcher = KeydBatcher(
            self.client,
            zlib_level=self.zlib_level,
            window=self.batch_window,
            on_batch=self.metrics.keyd_batch.observe,
            on_stage=self.metrics.observe_stage,
        )
        self.metrics.keyd_in_flight.set_function(lambda: batcher.in_flight)
        await nursery.start(batcher.run)
        return Dispatcher(
            batcher,
            [(DSC.from_bytes(k.dsc), k.state) for k in keys],
            self.policy,
            QuotaTracker(),
            on_stage=self.metrics.observe_stage,
            shared=self.shared,
        )

    async def _listen(
        self,
        nursery: trio.Nursery,
        unix: Path | None,
        tcp: tuple[str, int] | None,
        ssl_context: ssl.SSLContext | None,
        http: tuple[str, int] | None,
    ) -> dict[str, Any]:
        """Start the listeners asked for; their bound addresses by kind.

        Raises:
            ValueError: *tcp* without *ssl_context*.
        """
        assert self.server is not None
        bound: dict[str, Any] = {}
        if unix is not None:
            bound["unix"] = await nursery.start(self.server.serve_unix, unix)
        if tcp is not None:
            if ssl_context is None:
                raise ValueError("TCP needs TLS: give a server certificate and client CA")
            bound["tcp"] = await nursery.start(self.server.serve_tcp, tcp[0], tcp[1], ssl_context)
        if http is not None:
            bound["http"] = await nursery.start(
                serve_http, self.metrics.registry, self.health, http[0], http[1]
            )
        return bound

    async def _reach_keyd(self, nursery: trio.Nursery) -> KeyList:
        """Connect to the external keyd (``--keyd-socket``) and DESCRIBE, retrying with
        backoff for up to KEYD_STARTUP seconds (keyd may be starting too)."""
        assert self.client is not None
        deadline = trio.current_time() + KEYD_STARTUP
        delay, said = KEYD_POLL, None
        while True:
            try:
                await self.client.connect(nursery)
                return await self.client.describe()
            except KeydError as exc:
                await self.client.aclose()
                if trio.current_time() + delay > deadline:
                    raise KeydError(
                        f"no usable keyd at {self.keyd_socket} after {KEYD_STARTUP:g} s: {exc}",
                        retryable=False,
                    ) from None
                if str(exc) != said:
                    said = str(exc)
                    LOGGER.warning("waiting for keyd at %s: %s", self.keyd_socket, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, KEYD_BACKOFF_MAX)

    async def _reconnect_external(self) -> None:
        """--keyd-socket: every connection to keyd broke. Reconnect (and DESCRIBE, so that a
        keyd that accepts and closes counts as a failure) with backoff until that works;
        /healthz reports why meanwhile and requests fail with KEYD_UNAVAILABLE."""
        assert self.client is not None
        self.metrics.keyd_up.set(0)
        self.keyd_problem = f"keyd at {self.keyd_socket} unreachable; reconnecting"
        LOGGER.error("lost the connection to keyd at %s; reconnecting", self.keyd_socket)
        delay, said = KEYD_POLL, None
        while True:
            try:
                await self.client.reconnect()
                await self.client.describe()
                break
            except KeydError as exc:
                self.keyd_problem = f"keyd at {self.keyd_socket} unreachable ({exc}); reconnecting"
                if str(exc) != said:
                    said = str(exc)
                    LOGGER.warning("keyd at %s: %s; retrying", self.keyd_socket, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, KEYD_BACKOFF_MAX)
        LOGGER.warning("reconnected to keyd at %s", self.keyd_socket)
        self.metrics.keyd_up.set(1)
        self.keyd_problem = None

    async def drain(self) -> None:
        """Begin a graceful stop (SIGTERM): the run returns once in-flight work is done."""
        if self.server is not None:
            self.server.draining.set()

    async def _watch_policy(self) -> None:
        """Re-read the policy file when it changes, in a worker thread: a large file must not
        stall the event loop (PolicyFile refuses files over MAX_POLICY_BYTES)."""
        while True:
            await trio.sleep(self.policy.interval)
            await trio.to_thread.run_sync(self.policy.refresh)

    async def _supervise(self, dispatcher: Dispatcher, scope: trio.CancelScope) -> None:
        assert self.client is not None
        with scope:
            while True:
                await trio.sleep(KEYD_POLL)
                if (self.keyd is None or self.keyd.running) and not self.client.broken:
                    try:
                        keys = await self.client.describe()
                    except KeydError as exc:
                        self.keyd_problem = f"keyd: {exc}"
                        continue
                    self._take_keys(dispatcher, keys)
                    self.metrics.nonce_pools.update(keys)
                    self._note_audit(keys.audit)
                    self.keyd_problem = None  # it answers again (after a failed DESCRIBE)
                    continue
                if self.keyd is None:  # --keyd-socket: keyd is not ours to restart
                    await self._reconnect_external()
                    continue
                self.keyd_problem = "keyd died; restarting it"
                self.metrics.keyd_up.set(0)
                LOGGER.error("keyd is gone (exit %s); restarting it", self.keyd.exit_code)
                try:
                    await trio.to_thread.run_sync(self.keyd.ensure_running)
                    await self.client.reconnect()
                except Exception as exc:  # keep trying: the engine must not die with keyd
                    self.keyd_problem = f"keyd cannot be restarted: {exc}"
                    LOGGER.error("%s", self.keyd_problem)
                    await trio.sleep(1.0)
                    continue
                self.metrics.keyd_restarts.inc()
                self.metrics.keyd_up.set(1)
                self.keyd_problem = None
