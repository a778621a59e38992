"""A blocking client of keyd over its Unix socket (the engine side of the keyd codec)."""

from __future__ import annotations

import itertools
import os
import socket
import threading
from collections.abc import Sequence

from .. import native
from ..errors import DccSignError
from ..protocol.keyd import (
    NEED_DATA,
    Connection,
    Describe,
    DescribeResult,
    Failure,
    ItemError,
    KeyFacts,
    Signatures,
    SignPayloads,
)

__all__ = ["KeyList", "KeydClient", "KeydError", "check_reply", "keys_of", "results_of"]


class KeyList(list[KeyFacts]):
    """What ``describe()`` returns: keyd's keys (a list, as before) and its audit state.

    Attributes:
        audit: None while keyd's audit log commits; else why it cannot (keyd then refuses
            every payload with AUDIT_UNAVAILABLE until the log works again). Also None from
            a keyd too old to report it.
    """

    audit: str | None = None


class KeydError(DccSignError):
    """keyd could not answer (connection lost, keyd stopping, protocol error).

    Attributes:
        retryable: a retry (after keyd is restarted) may succeed; nothing was signed for
            this request that the caller holds.
    """

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class KeydClient:
    """One connection to keyd; thread-safe (requests are serialised on it).

    Raises:
        KeydError: from every call when keyd is unreachable or the connection breaks.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(os.fspath(path))
        except OSError as exc:
            self._sock.close()
            raise KeydError(f"cannot reach keyd at {path}: {exc.strerror or exc}") from None
        self._codec = Connection(scan=native.cbor_scan)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KeydClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, msg):
        with self._lock:
            try:
                self._sock.sendall(self._codec.send(msg))
                while True:
                    event = self._codec.next_event()
                    if event is None:
                        self._sock.close()
                        raise KeydError("keyd closed the connection")
                    if event is not NEED_DATA:
                        break
                    data = self._sock.recv(1 << 16)
                    self._codec.receive_data(data)
            except OSError as exc:
                # The stream is out of step after a failure: this connection is finished.
                self._sock.close()
                raise KeydError(f"keyd connection failed: {exc}") from None
        check_reply(event)
        if event.request_id != msg.request_id:
            raise KeydError("keyd answered another request", retryable=False)
        return event

    def describe(self) -> KeyList:
        return keys_of(self._call(Describe(next(self._ids))))

    def sign(
        self,
        kid: bytes,
        payloads: Sequence[bytes],
        *,
        client: str,
        account: str,
        operator: str | None = None,
    ) -> list[bytes | tuple[ItemError, str]]:
        """Signatures (or per-item refusals) for *payloads*, in order."""
        reply = self._call(
            SignPayloads(next(self._ids), kid, client, account, tuple(payloads), operator)
        )
        return results_of(reply, len(payloads))


# Reply checks shared with the trio client (keyd_trio.py).


def check_reply(reply: object) -> None:
    """Raise :class:`KeydError` for keyd's ERROR frame."""
    if isinstance(reply, Failure):
        raise KeydError(f"keyd: {reply.message}", reply.retryable)


def keys_of(reply: object) -> KeyList:
    """The keys of a DESCRIBE reply, with keyd's audit state (:class:`KeyList`)."""
    if not isinstance(reply, DescribeResult):
        raise KeydError(f"unexpected reply {type(reply).__name__}", retryable=False)
    keys = KeyList(reply.keys)
    keys.audit = reply.audit
    return keys


def results_of(reply: object, count: int) -> list[bytes | tuple[ItemError, str]]:
    """The per-payload results of a SIGN reply for *count* payloads."""
    if not isinstance(reply, Signatures) or len(reply.results) != count:
        raise KeydError("malformed reply from keyd", retryable=False)
    return list(reply.results)
