"""Exit codes of the ``dccsign`` command, and how a command stops with one.

Exit codes (stable, scripts rely on them):
    0  success (``verify``: the signature is valid)
    1  ``verify``: the signature is not valid (``audit verify``: a break)
    2  usage error
    3  invalid DCC input (errors as JSON on stderr; nothing was signed)
    4  key problem (keystore, passphrase, no usable key)
"""

from __future__ import annotations

import sys
from typing import NoReturn

from ..errors import DccSignError

__all__ = [
    "EXIT_INVALID_DCC",
    "EXIT_INVALID_SIGNATURE",
    "EXIT_KEY",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandFailed",
    "error_exit",
    "fail",
]

EXIT_OK = 0
EXIT_INVALID_SIGNATURE = 1
EXIT_USAGE = 2
EXIT_INVALID_DCC = 3
EXIT_KEY = 4


class CommandFailed(DccSignError):
    """A command stops with exit *code*; :func:`dccsign.cli.main.main` prints *message*."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code: int, message: str) -> NoReturn:
    """Stop the running command with exit *code* and *message* (``dccsign: error: ...``)."""
    raise CommandFailed(code, message)


def error_exit(command: str, code: int, message: object) -> int:
    """Print ``COMMAND: error: MESSAGE`` on stderr and return *code*: how a command that
    returns its exit code itself (rather than through :func:`fail`) says why it stops."""
    print(f"{command}: error: {message}", file=sys.stderr)
    return code
