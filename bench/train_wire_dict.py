"""Would a trained zstd dictionary pay for itself on the portal <-> engine wire?

Trains a dictionary on item bodies built from :func:`dccsign.testing.samples.varied_samples` (one
seed), then measures, on a 100-item SIGN_BATCH and its SIGN_BATCH_RESULT (real HC1 strings
from an ephemeral key; other seeds), the body size and the compress / decompress time per
item: plain CBOR, zstd as the codec sends it, and zstd with the dictionary.

    .venv/bin/python bench/train_wire_dict.py [--items 100] [--train 5000] [--dict-size 16384]
        [--write-dict protocol/data/dcc-v1.zstd-dict]

Nothing in the codec imports this; the dictionary is written only with --write-dict.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import zstandard

from dccsign import native
from dccsign.bench.core import ephemeral_key
from dccsign.dcc.issuer import Issuer
from dccsign.protocol import wire
from dccsign.testing.samples import varied_samples


def item_bodies(n: int, seed: int) -> list[dict[str, Any]]:
    return [
        {
            "dcc": dcc,
            "account": f"uzi:9000{seed % 97:02d}{i:05d}",
            "operator": "uzi:900099999",
            "idempotency_key": f"{seed:04x}-{i:08x}-portal",
        }
        for i, dcc in enumerate(varied_samples(n, seed=seed))
    ]


def per_item_us(fn: Callable[[], object], items: int, min_seconds: float = 0.3) -> float:
    fn()
    rounds, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_seconds:
        fn()
        rounds += 1
    return elapsed / rounds / items * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--dict-size", type=int, default=16384)
    ap.add_argument("--write-dict", type=Path)
    args = ap.parse_args()

    training = [cbor2.dumps(b) for b in item_bodies(args.train, seed=7)]
    dictionary = zstandard.train_dictionary(args.dict_size, training, level=wire.ZSTD_LEVEL)
    if args.write_dict:
        args.write_dict.write_bytes(dictionary.as_bytes())

    impl = "native"
    try:
        native.implementation(impl)
    except ImportError:
        impl = "python"
    key = ephemeral_key(impl)
    issuer = Issuer([key], impl=native.implementation(impl))
    requests = item_bodies(args.items, seed=2024)
    hc1s = issuer.issue([b["dcc"] for b in requests])
    bodies = {
        "SIGN_BATCH": cbor2.dumps({"items": requests}),
        "SIGN_BATCH_RESULT": cbor2.dumps(
            {"results": [{"hc1": h, "kid": key.dsc.kid} for h in hc1s]}
        ),
    }

    plain_c = zstandard.ZstdCompressor(level=wire.ZSTD_LEVEL)
    dict_c = zstandard.ZstdCompressor(level=wire.ZSTD_LEVEL, dict_data=dictionary)
    plain_d = zstandard.ZstdDecompressor()
    dict_d = zstandard.ZstdDecompressor(dict_data=dictionary)
    n = args.items
    print(f"dictionary: {len(dictionary.as_bytes())} bytes, trained on {args.train} items")
    print(f"{'frame body':<18} {'variant':<10} {'bytes':>7} {'B/item':>7} "
          f"{'comp us/item':>13} {'decomp us/item':>15}")  # fmt: skip
    for name, raw in bodies.items():
        print(f"{name:<18} {'cbor':<10} {len(raw):>7} {len(raw) / n:>7.1f}")
        for label, comp, decomp in (
            ("zstd", plain_c, plain_d),
            ("zstd+dict", dict_c, dict_d),
        ):
            packed = comp.compress(raw)
            assert decomp.decompress(packed) == raw
            c_us = per_item_us(lambda c=comp, r=raw: c.compress(r), n)
            d_us = per_item_us(lambda d=decomp, p=packed: d.decompress(p), n)
            print(
                f"{'':<18} {label:<10} {len(packed):>7} {len(packed) / n:>7.1f} "
                f"{c_us:>13.2f} {d_us:>15.2f}"
            )
    one = cbor2.dumps(requests[0])
    print(
        f"one SIGN item: cbor {len(one)} B, zstd {len(plain_c.compress(one))} B, "
        f"zstd+dict {len(dict_c.compress(one))} B"
    )


if __name__ == "__main__":
    main()
