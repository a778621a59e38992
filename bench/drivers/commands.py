"""The ``dccsign bench`` command group, which the ``dccsign`` command finds through the
``dccsign.commands`` entry point (pyproject.toml): ``core``, ``load`` and ``compare``.

Building the parser imports none of the drivers' heavy dependencies: ``load`` says by itself
when the ``[bench]`` extra (hdrhistogram) is missing, and ``--plot`` when matplotlib is.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cli.args import SWITCH, add_options, command_group, number
from ..cli.exits import error_exit
from .compare import add_compare_parser
from .loadcli import add_load_parser

EXIT_OK = 0
EXIT_USAGE = 2


def cmd_bench_core(args: argparse.Namespace) -> int:
    from .. import native
    from . import core

    impl = args.impl or native.IMPLEMENTATION
    try:
        result = core.run(impl, args.threads, args.seconds, args.batch, args.zlib_level)
    except ImportError as exc:
        return error_exit(
            "dccsign bench core",
            EXIT_USAGE,
            f"implementation {args.impl!r} is not available: {exc}",
        )
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    print(
        f"dccsign bench core: impl={result['impl']} threads={result['threads']} "
        f"batch={result['batch']} zlib={result['zlib_level']}"
    )
    print(
        f"  {result['certs_per_s']:,.0f} certificates/s ({result['certificates']:,} in "
        f"{result['seconds']} s, {result['cpu_cores_used']} cores busy)"
    )
    print("  per-stage (one thread, us per certificate):")
    for name, value in result["stages"].items():
        print(f"    {name:<22} {value:8.2f}")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add the ``bench`` command group to the ``dccsign`` parser's sub-commands *sub*."""
    command_group(
        sub,
        "bench",
        (_add_core_parser, add_load_parser, add_compare_parser),
        help="benchmarks (the drivers of bench/; `load` and plots need the [bench] extra)",
    )


def _add_core_parser(bsub: Any) -> None:
    """Add ``core`` to the ``bench`` subcommands *bsub*."""
    p = bsub.add_parser(
        "core",
        help="the full product path in one process (in-process key), certificates/s",
        description="Measure the product path from parsed DCC to HC1 string (validation, "
        "claims, CBOR, signing, COSE, zlib, base45) in one process with an ephemeral "
        "in-process key. Prints certificates/s and per-stage times.",
    )
    helps = {
        "--impl": "implementation to measure (default: the one this process selected; "
        "DCCSIGN_PUREPYTHON=1 selects python)",
        "--batch": "certificates per batch call (default 64)",
        "--zlib-level": "deflate level -1..9 (default 9)",
        "--json": "print one JSON object",
    }
    add_options(
        p,
        (
            ("--impl", {"choices": ("native", "python")}),
            ("--threads", number(int, 256, 1)),
            ("--seconds", number(float, 1e6, 5.0)),
            ("--batch", number(int, 1e6, 64)),
            ("--zlib-level", {"type": int, "choices": range(-1, 10), "default": 9, "metavar": "L"}),
            ("--json", SWITCH),
        ),
        helps,
    )
    p.set_defaults(func=cmd_bench_core)
