"""The ``dccsign`` command: the parser, built from the command groups' modules
(:mod:`.keys`, :mod:`.sign`, :mod:`.keyd`, :mod:`.serve`, :mod:`.audit`) and the groups other
installed packages register, and :func:`main`. Exit codes: :mod:`.exits`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from . import audit, keyd, keys, serve, sign
from .exits import EXIT_OK, EXIT_USAGE, CommandFailed, fail

__all__ = ["build_parser", "main"]


def _add_installed_commands(sub: Any) -> None:
    """Command groups that other installed packages bring (the benchmark drivers' ``bench``),
    found through the ``dccsign.commands`` entry points so that the product imports none of
    them. One that cannot be loaded still appears, and running it says why: a broken plugin
    must not take the signer's own commands down with it."""
    for entry in metadata.entry_points(group="dccsign.commands"):
        try:
            entry.load()(sub)
        except Exception as exc:  # any failure of foreign code is reported, not raised
            why = f"the {entry.name!r} commands ({entry.value}) cannot be loaded: {exc}"
            p = sub.add_parser(entry.name, help=f"unavailable: {why}")
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=lambda _args, why=why: fail(EXIT_USAGE, why))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dccsign",
        description="Sign and verify EU Digital COVID Certificates (HC1).",
        epilog="Exit codes: 0 ok, 1 invalid signature (verify) or a break (audit verify), 2 usage, "
        "3 invalid DCC, "
        "4 key problem.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (keys, sign, keyd, serve, audit):
        group.add_commands(sub)
    _add_installed_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandFailed as exc:
        if exc.message:
            print(f"dccsign: error: {exc.message}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
