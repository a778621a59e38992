"""The wire codec's exceptions: who broke the exchange (as in h11), and the body-check failure
that the codec turns into one of them."""

from __future__ import annotations

from ..codes import ErrorCode


class WireProtocolError(Exception):
    """The exchange broke the protocol. ``code`` is the :class:`ErrorCode` to report.

    ``request_id`` is the id of the frame concerned when there is one (else 0). Only its two
    kinds are raised, which say who broke it (as in h11): :class:`LocalProtocolError` (we) and
    :class:`RemoteProtocolError` (the peer); catch this class to handle both.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL, request_id: int = 0):
        if type(self) is WireProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not the base")
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class LocalProtocolError(WireProtocolError):
    """We tried to send something invalid, or used the API wrongly. Nothing was sent."""


class RemoteProtocolError(WireProtocolError):
    """The peer sent bytes that break the protocol. The connection is now unusable."""


class Invalid(Exception):
    """A rule of the exchange failed (a body field, a header, a state rule).

    Raised by the body readers and writers (:mod:`.bodies`) and the state rules
    (:mod:`.state`); the :class:`~.connection.Connection` turns it into the
    :class:`LocalProtocolError` or :class:`RemoteProtocolError` it reports, adding the request
    id. Public for the body walkers and reply encoders of ``dccsign.native``, whose
    pure-Python twins call the readers directly and must fail with the same message and code.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


class BodyError(Invalid):
    """A request body broke a framing rule, found by a body walker that reads the bytes
    without decoding them (``dccsign.native.walk_sign_batch``): the same message and
    :class:`ErrorCode` (``code``) as :meth:`Connection.decode_frame` would give, without the
    request id. :meth:`Connection.decode_walked` turns it into the RemoteProtocolError."""


def bad(where: str, what: str) -> Invalid:
    """The failure of field *where* (``"SIGN_BATCH.items"``), which *what* describes."""
    return Invalid(f"{where}: {what}")
