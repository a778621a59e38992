"""Error codes of the portal <-> engine protocol (:mod:`dccsign.protocol.wire`).

One registry serves both places a code can appear: the ``code`` of an ERROR frame (the whole
request, or the whole connection, failed) and the ``error`` of one item's result in a
SIGN_RESULT or SIGN_BATCH_RESULT (that item failed, the others may not have).

The numbers are part of the protocol and never change meaning. The tens digit is the class,
so a client that meets a code it does not know can still act on it:

====  ========================================================  ==========
1-9   the frame or the request is malformed                     not retried
10-19 the client or account may not do this                     not retried
20-29 quota and idempotency                                     not retried
30-39 this DCC cannot be signed                                 not retried
40-49 a transient condition of the engine                       retryable
50-59 an engine fault                                           retryable
60-   (none yet)                                                not retried
====  ========================================================  ==========

``protocol/SPEC.md`` holds the same table; a test keeps the two equal.
"""

from __future__ import annotations

import enum

__all__ = ["RETRYABLE", "ErrorCode"]


class ErrorCode(enum.IntEnum):
    """Why a connection, a request or one item failed."""

    PROTOCOL = 1  # bytes that do not follow the framing or the handshake; connection closed
    UNSUPPORTED_VERSION = 2  # HELLO offers no protocol version the server speaks
    FRAME_TOO_LARGE = 3  # a frame (or its decompressed body) exceeds the negotiated max_frame
    BAD_REQUEST = 4  # a body is not the CBOR map its frame type requires (field named)
    BATCH_TOO_LARGE = 5  # SIGN_BATCH with more items than WELCOME's max_batch
    UNAUTHENTICATED = 10  # the client's identity (TLS certificate, socket peer) is unknown
    CLIENT_DISABLED = 11  # the client is known but switched off by the operator
    KID_NOT_ALLOWED = 12  # the requested kid exists but this client may not use it
    TYPE_NOT_ALLOWED = 13  # this client (or the key's DSC) may not sign this DCC type
    COUNTRY_NOT_ALLOWED = 14  # the DCC's country (co) is not one this client may issue for
    ISSUER_NOT_ALLOWED = 15  # the DCC's issuer (is) is not one this client may issue as
    QUOTA_CLIENT = 20  # the client's signing quota for the current period is used up
    QUOTA_ACCOUNT = 21  # the end-user account's signing quota is used up
    IDEMPOTENCY_CONFLICT = 22  # idempotency key reused with a different item
    INVALID_DCC = 30  # the DCC fails validation (schema, value sets, UVCI, dates)
    NO_KEY = 31  # no active key can sign this DCC now (unknown kid, none for the type)
    KEYD_REFUSED = 32  # the key service refused this payload (its time/type/permission checks)
    TOO_LARGE_FOR_QR = 33  # the signed HC1 string would not fit a QR code
    BUSY = 40  # too many requests in flight or queued; retry after retry_after_ms
    DEADLINE_EXCEEDED = 41  # the engine gave up waiting for a result
    KEYD_UNAVAILABLE = 42  # the key service cannot be reached or is restarting
    SHUTTING_DOWN = 43  # the engine is draining; send this request to another instance
    STATE_UNAVAILABLE = 44  # the shared quota/idempotency store is unreachable or slow
    INTERNAL = 50  # an unexpected engine fault; details are in the engine's log only


#: Codes after which the same request may succeed if sent again unchanged (later, or to
#: another engine instance). Every other code needs a different request.
RETRYABLE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.BUSY,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.KEYD_UNAVAILABLE,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.STATE_UNAVAILABLE,
        ErrorCode.INTERNAL,
    }
)
