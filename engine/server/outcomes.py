"""What the engine answers for an item it does not sign: one table from each source of a
refusal -- the policy (:class:`~dccsign.server.policy.RefusalCode`) and keyd
(:class:`~dccsign.protocol.keyd.ItemError`) -- to the wire's
:class:`~dccsign.protocol.codes.ErrorCode`, and the :class:`ItemResult` that carries it.

Every member of both enums has its row (``tests/test_outcomes.py``): a code added to either
must be given its wire code here, not fall through to a default.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..protocol.codes import ErrorCode
from ..protocol.keyd import RETRYABLE as KEYD_RETRYABLE
from ..protocol.keyd import ItemError
from ..protocol.wire import ItemResult
from .policy import Refusal, RefusalCode

__all__ = ["FROM_KEYD", "FROM_POLICY", "failure", "keyd_failure", "refused"]

#: The policy's refusals, as the client sees them.
FROM_POLICY: Mapping[RefusalCode, ErrorCode] = {
    RefusalCode.CLIENT_UNKNOWN: ErrorCode.UNAUTHENTICATED,
    RefusalCode.CLIENT_DISABLED: ErrorCode.CLIENT_DISABLED,
    RefusalCode.KID_NOT_ALLOWED: ErrorCode.KID_NOT_ALLOWED,
    RefusalCode.TYPE_NOT_ALLOWED: ErrorCode.TYPE_NOT_ALLOWED,
    RefusalCode.COUNTRY_NOT_ALLOWED: ErrorCode.COUNTRY_NOT_ALLOWED,
    RefusalCode.ISSUER_NOT_ALLOWED: ErrorCode.ISSUER_NOT_ALLOWED,
    RefusalCode.QUOTA_CLIENT: ErrorCode.QUOTA_CLIENT,
    RefusalCode.QUOTA_ACCOUNT: ErrorCode.QUOTA_ACCOUNT,
}

#: keyd's refusals of one payload, as the client sees them: keyd's own trouble is retryable
#: (KEYD_UNAVAILABLE); a payload too large for a QR code is the client's, as when the engine
#: finds it first; every other check keyd makes is KEYD_REFUSED (the message names it).
FROM_KEYD: Mapping[ItemError, ErrorCode] = {
    ItemError.MALFORMED_CWT: ErrorCode.KEYD_REFUSED,
    ItemError.EXP_AFTER_DSC: ErrorCode.KEYD_REFUSED,
    ItemError.IAT_BEFORE_DSC: ErrorCode.KEYD_REFUSED,
    ItemError.IAT_IN_FUTURE: ErrorCode.KEYD_REFUSED,
    ItemError.EXP_NOT_AFTER_IAT: ErrorCode.KEYD_REFUSED,
    ItemError.TYPE_NOT_ALLOWED: ErrorCode.KEYD_REFUSED,
    ItemError.KID_NOT_ACTIVE: ErrorCode.KEYD_REFUSED,
    ItemError.CLIENT_NOT_ALLOWED: ErrorCode.KEYD_REFUSED,
    ItemError.AUDIT_UNAVAILABLE: ErrorCode.KEYD_UNAVAILABLE,
    ItemError.INTERNAL: ErrorCode.KEYD_UNAVAILABLE,
    ItemError.INVALID_DCC: ErrorCode.KEYD_REFUSED,
    ItemError.TOO_LARGE_FOR_QR: ErrorCode.TOO_LARGE_FOR_QR,
}


def failure(code: ErrorCode, message: str, retry_after_s: float | None = None) -> ItemResult:
    """An item's failure; *retry_after_s* becomes whole milliseconds, at least 1."""
    retry = None if retry_after_s is None else max(1, int(retry_after_s * 1000))
    return ItemResult(error=code, message=message, retry_after_ms=retry)


def refused(refusal: Refusal) -> ItemResult:
    """The failure for an item the policy refuses."""
    return failure(FROM_POLICY[refusal.code], refusal.message, refusal.retry_after_s)


def keyd_failure(outcome: tuple[int, str]) -> ItemResult:
    """The failure for an item keyd refused: *outcome* is keyd's ``(code, reason)``."""
    code, reason = outcome
    item_error = ItemError(code)
    retryable = item_error in KEYD_RETRYABLE
    return failure(
        FROM_KEYD[item_error],
        f"keyd refused ({item_error.name}): {reason}",
        retry_after_s=1.0 if retryable else None,
    )
