"""The base of the engine's exceptions, and those that more than one room raises. The CLI maps
them to exit codes (3 invalid DCC, 4 key problem).

Every exception the ``dccsign`` package raises on purpose derives from :class:`DccSignError`
(``tests/test_errors.py``); each room's own live beside its code, named for who caused it:
the request (:class:`InvalidBatchError`, ``dcc.validate.DCCValidationError``, the policy's
``PolicyError`` for its file), the keys (:class:`KeystoreError`, :class:`KeyProblem`,
``keys.pkcs11.Pkcs11Error``), keyd (``keyd.client.KeydError``) or the audit log
(``audit.errors.AuditError``). The sans-IO protocol and the native core, which import nothing of
the engine, have their own bases (``protocol.wire.WireProtocolError``,
``native.errors.NativeError``).
"""

from __future__ import annotations

__all__ = ["DccSignError", "InvalidBatchError", "KeyProblem", "KeystoreError"]


class DccSignError(Exception):
    """Base class of the engine's own errors."""


class KeystoreError(DccSignError):
    """The keystore cannot be used: missing or corrupt file, wrong passphrase, mismatched key.

    The message names the file concerned.
    """


class KeyProblem(DccSignError):
    """No usable key for a request: unknown or inactive kid, DSC not valid now, or the DSC's
    extended key usage does not allow the DCC's type."""


class InvalidBatchError(DccSignError):
    """One or more DCCs of a batch are invalid; nothing of the batch was signed.

    Attributes:
        errors: ``{index: [issue dicts]}`` for every refused item (index in input order).
    """

    def __init__(self, errors: dict[int, list[dict[str, str]]]) -> None:
        self.errors = errors
        count = len(errors)
        first = min(errors)
        super().__init__(
            f"{count} invalid DCC{'s' if count > 1 else ''} (first at index {first}); "
            "nothing was signed"
        )

    def as_json(self) -> list[dict[str, object]]:
        return [{"index": i, "errors": self.errors[i]} for i in sorted(self.errors)]
