"""Who a thread's CPU samples belong to: each ``perf`` sample charged to the first frame of its
stack that is ours or a library's, not the interpreter's.

    perf record --call-graph dwarf,16384 -F 1999 -t TID -o main.data -- sleep 6
    perf script -i main.data -F ip,sym,dso > stacks.txt
    .venv/bin/python bench/perf_owners.py stacks.txt [--top 30]

Walking a sample's stack from the leaf up: interpreter frames (libpython other than the eval
loop), libc, libcrypto/libssl and the kernel are skipped, so that their time goes to whoever
called them; the eval loop (``_PyEval_EvalFrameDefault``) makes the sample "python code"
(the bytecode and the C-API work it called directly); a frame of ``dccsign.native`` is named
by its Cython entry point (``native:walk_sign_batch``); any other library by its file and
symbol (``backend_c:ZSTD_compressBlock_fast``). Inlined frames are skipped (perf prints no
library for them). Samples whose stack has none of these count as "other".
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_LINE = re.compile(r"\s*[0-9a-f]+ (.*) \((.*)\)$")
_CYTHON = re.compile(r"__pyx_p[fw]_7dccsign_6native_7_native_\d+(\w+)")
_PASS_THROUGH = ("libc.so", "libcrypto", "libssl", "[unknown]", "kernel")


def owner(stack: list[str]) -> str:
    """The owner of one sample (its stack, leaf first, as ``perf script`` prints it)."""
    for line in stack:
        m = _LINE.match(line)
        if not m:
            continue
        sym, dso = m.groups()
        if dso == "inlined" or any(p in dso for p in _PASS_THROUGH):
            continue
        if "libpython" in dso:
            if sym.startswith("_PyEval_EvalFrameDefault"):
                return "python code"
            continue
        base = dso.rsplit("/", 1)[-1]
        if "_native" in base:
            c = _CYTHON.search(sym)
            if c is None:
                continue  # C inside the extension: charged to its Cython entry point
            return "native:" + c.group(1)
        return base.split(".")[0] + ":" + sym[:60]
    return "other"


def owners(text: str) -> collections.Counter[str]:
    samples = [s.strip().split("\n") for s in text.split("\n\n") if s.strip()]
    return collections.Counter(map(owner, samples))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stacks", type=Path, help="perf script -F ip,sym,dso output")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    counts = owners(args.stacks.read_text())
    total = sum(counts.values())
    if not total:
        raise SystemExit("no samples in the file")
    for name, n in counts.most_common(args.top):
        print(f"{n / total * 100:6.2f} %  {name}")
    print(f"({total:,} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
