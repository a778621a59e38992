"""What the ``dccsign`` command groups share in their arguments: value types (among them
numbers bounded by :func:`positive` and :func:`in_range`), tables of options
(:func:`add_options`, with the keywords :func:`number` and :data:`SWITCH`), the ``--keystore``
option (declared by :func:`keystore_arg`, opened by :func:`open_keystore`), and the TLS
client's ``--cert``/``--key``/``--ca`` (:func:`tls_client_args`)."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SWITCH",
    "OptionRow",
    "add_options",
    "command_group",
    "host_port",
    "in_range",
    "iso_time",
    "keystore_arg",
    "kid",
    "number",
    "open_keystore",
    "positive",
    "tls_client_args",
]

OptionRow = tuple[str, Mapping[str, Any]]
"""One argument of :func:`add_options`: its flag (or a positional's name) and the keywords of
``add_argument`` but ``help``."""

SWITCH: Mapping[str, Any] = {"action": "store_true"}
"""The keywords of an option that is on when given."""


def kid(value: str) -> bytes:
    """A kid: 16 hex digits (8 bytes)."""
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 8:
        raise argparse.ArgumentTypeError("a kid is 16 hex digits (8 bytes)")
    return raw


def iso_time(value: str) -> dt.datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def positive(kind: type[int] | type[float], maximum: float = 1e6):
    """A number of *kind* greater than zero and at most *maximum* (refuses nan and inf)."""

    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if not 0 < number <= maximum:
            noun = "integer" if kind is int else "number"
            raise argparse.ArgumentTypeError(
                f"must be a positive {noun} up to {maximum:g}, not {value!r}"
            )
        return number

    return parse


def in_range(kind: type[int] | type[float], low: float, high: float, what: str):
    """A number of *kind* from *low* to *high* inclusive (refuses nan); anything else is
    refused with "must be *what*, not 'VALUE'"."""

    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, not {value!r}")
        return number

    return parse


def number(
    kind: type[int] | type[float], maximum: float, default: Any = None, metavar: str = "N"
) -> dict[str, Any]:
    """The keywords of an option taking a number of *kind* greater than zero and at most
    *maximum* (:func:`positive`)."""
    return {"type": positive(kind, maximum), "default": default, "metavar": metavar}


def add_options(parser: Any, rows: Iterable[OptionRow], helps: Mapping[str, str]) -> None:
    """Declare on *parser* (a parser or an argument group), in the order of *rows*, one
    argument per row ``(flag, keywords)`` with the help text ``helps[flag]`` (none if absent).

    A table rather than one ``add_argument`` call each: a command's arguments read as one
    list of flags, types and defaults, and their help texts as another."""
    for flag, keywords in rows:
        parser.add_argument(flag, **keywords, help=helps.get(flag))


def command_group(
    sub: Any, name: str, adders: Iterable[Callable[[Any], object]], **texts: str
) -> argparse.ArgumentParser:
    """Add the command group *name* (``help``, ``description``, ``epilog``: *texts*) to the
    sub-commands *sub* and return its parser. Its own sub-command is required, stored as
    ``<name>_command`` and shown as ``<NAME>_COMMAND``; each of *adders* adds some of them
    to the group's sub-commands."""
    parser = sub.add_parser(name, **texts)
    inner = parser.add_subparsers(
        dest=f"{name}_command", required=True, metavar=f"{name.upper()}_COMMAND"
    )
    for add in adders:
        add(inner)
    return parser


def host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0..65535; ``[::1]:8443`` for IPv6)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def keystore_arg(parser: Any, *, required: bool = True, help: str | None = None) -> None:
    """Declare ``--keystore DIR`` on *parser* (a parser or an argument group)."""
    parser.add_argument("--keystore", type=Path, required=required, metavar="DIR", help=help)


def tls_client_args(parser: Any, *, cert: str, key: str, ca: str) -> None:
    """Declare the TLS client's ``--cert PEM``, ``--key PEM`` and ``--ca PEM`` (paths) on
    *parser* (a parser or an argument group), with the help texts *cert*, *key* and *ca*.

    Every command that talks to an engine over TLS takes these three (``sign --server``,
    ``bench load``, ``bench compare``); each says in its help what it does without them."""
    parser.add_argument("--cert", type=Path, metavar="PEM", help=cert)
    parser.add_argument("--key", type=Path, metavar="PEM", help=key)
    parser.add_argument("--ca", type=Path, metavar="PEM", help=ca)


def open_keystore(directory: Path) -> Any:
    """The keystore in *directory*; a missing or broken one stops the command (exit 4)."""
    from ..errors import KeystoreError
    from ..keys.keystore import Keystore
    from .exits import EXIT_KEY, fail

    try:
        return Keystore.open(directory)
    except KeystoreError as exc:
        fail(EXIT_KEY, str(exc))
