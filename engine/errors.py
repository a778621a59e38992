"""Engine exceptions. The CLI maps them to exit codes (3 invalid DCC, 4 key problem)."""

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
