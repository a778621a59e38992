"""The engine's native floor: the per-certificate CPU of the native stages no engine of this
design can skip, beside ``bench core``'s own pipeline, measured in one run.

    .venv/bin/python bench/engine_floor.py [--rounds 7] [--seconds 0.3] [--json FILE]

DESIGN.md budgets the engine at <= 20 us of CPU per certificate "for this machine class",
set when ``bench core`` cost ~48 us per certificate per core, i.e. 0.42 of a ``bench core``
certificate. This measures, on frames of 50 varied sample DCCs (two kids, DCC types
mixed; ``bench/dataplane_micro.py``'s frames), what the engine's data plane costs per
certificate with no Python per frame at all -- the stages a frame must pass in every design
the issue allows (zstd is the protocol's; the reply body must hold HC1 strings):

* ``tls_server``        -- the server's side of TLS 1.3 for one request and its reply
                           (``ssl.MemoryBIO``, the development certificates);
* ``zstd_request``      -- decompressing the request body (the client compresses at level 1);
* ``walk``              -- ``native.walk_sign_batch``;
* ``validate``          -- ``native.validate_dcc_batch``, as ``dataplane.check_rows`` calls it;
* ``splice``            -- ``native.splice_payloads`` (claims around each DCC's own CBOR);
* ``accounts``          -- ``native.span_table`` over the accounts (quota charging, keyd's table);
* ``reply_body``        -- ``native.encode_sign_batch_result`` (COSE, deflate, base45, CBOR);
* ``zstd_reply``        -- compressing the reply body (level 1, the wire codec's).

and, in the same rounds, one thread of ``bench core``'s pipeline (``Issuer.issue`` on 50
DCCs: validation, claims, ECDSA, COSE, deflate, base45) and its COSE/deflate/base45 share
alone (``hc1_encode``). Rounds interleave the stages (odd rounds reversed) so that the
machine's drift (+-30 % here) falls on all of them; medians are reported. The figure that
carries over between days is ``floor / bench core``, against the budget's 0.42.
"""

from __future__ import annotations

import argparse
import datetime as dt
import operator
import ssl
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

import zstandard
from dataplane_micro import KIDS, Frame

from benchsetup import save_result
from dccsign import native
from dccsign.bench.core import ephemeral_key
from dccsign.dcc.issuer import Issuer
from dccsign.dcc.valuesets import ValueSets
from dccsign.native import _walker_py as W
from dccsign.protocol import wire
from dccsign.server.dataplane import columns_of
from dccsign.server.devtls import ensure_dev_tls
from dccsign.testing.samples import varied_samples

ROOT = Path(__file__).resolve().parents[1]
#: DESIGN.md's engine budget and the ``bench core`` cost per certificate it was set against.
BUDGET_US, BUDGET_CORE_US = 20.0, 48.0


class _Tls:
    """A TLS 1.3 session between two memory BIOs; only the server's work is timed."""

    def __init__(self, tls: dict[str, Path]) -> None:
        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls["ca"]))
        sctx.load_cert_chain(str(tls["server_cert"]), str(tls["server_key"]))
        sctx.verify_mode = ssl.CERT_REQUIRED
        cctx = ssl.create_default_context(cafile=str(tls["ca"]))
        cctx.load_cert_chain(str(tls["client_cert"]), str(tls["client_key"]))
        self.s_in, self.s_out, self.c_in, self.c_out = (ssl.MemoryBIO() for _ in range(4))
        self.server = sctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = cctx.wrap_bio(self.c_in, self.c_out, server_hostname="127.0.0.1")
        for _ in range(20):
            done = 0
            for end in (self.client, self.server):
                try:
                    end.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            self.s_in.write(self.c_out.read())
            self.c_in.write(self.s_out.read())
            if done == 2:
                break
        else:  # pragma: no cover - the development material always completes
            raise SystemExit("TLS handshake did not complete")
        self.client.write(b"x")  # the server's session tickets, the client's first record
        self.s_in.write(self.c_out.read())
        self.server.read(1)

    def server_trip(self, request: bytes, reply: bytes) -> int:
        """One request in, one reply out; returns the server's CPU ns for it."""
        self.client.write(request)
        cipher = self.c_out.read()
        t0 = time.thread_time_ns()
        self.s_in.write(cipher)
        got = 0
        while got < len(request):
            got += len(self.server.read(1 << 20))
        self.server.write(reply)
        out = self.s_out.read()
        spent = time.thread_time_ns() - t0
        self.c_in.write(out)
        got = 0
        while got < len(reply):
            got += len(self.client.read(1 << 20))
        return spent


class Stages:
    """The inputs of every stage for one frame, prepared once; each stage is a method
    returning the CPU ns one frame of it took."""

    def __init__(self, n: int, tls: dict[str, Path]) -> None:
        nat = native.implementation("native")
        self.f = f = Frame(n)
        self.n = n
        self.zbody = zstandard.ZstdCompressor(level=wire.ZSTD_LEVEL).compress(f.body)
        self.zd = zstandard.ZstdDecompressor()
        self.zc = zstandard.ZstdCompressor(level=wire.ZSTD_LEVEL)
        self.rules = nat.DccRules(ValueSets.builtin())
        cols = columns_of(f.view)
        nf = W.NFIELDS
        self.offs = cols[W.DCC_OFF :: nf]
        self.ends = array("I", map(operator.add, self.offs, cols[W.DCC_LEN :: nf]))
        self.rows = array("I", range(n))
        self.reply = nat.encode_sign_batch_result(
            f.protected, KIDS, f.prot_of, f.payload_buf, f.payload_off, f.sig_buf,
            f.sig_off, {},
        )  # fmt: skip
        self.tls = _Tls(tls)
        self.key = ephemeral_key("native")
        self.issuer = Issuer([self.key], impl=nat)
        self.dccs = varied_samples(n, seed=14)
        self.issuer.issue(self.dccs)  # warm-up
        self.nat = nat
        self._check()

    def _check(self) -> None:
        """Each stage does its real work before anything is timed."""
        assert self.zd.decompress(self.zbody) == self.f.body
        verdicts = self.nat.validate_dcc_batch(
            self.rules, self.f.view.data, self.offs, ends=self.ends, strict=True, nfc_names=True
        )
        assert all(isinstance(v, str) for v in verdicts), verdicts
        assert len(self.issuer.issue(self.dccs)) == self.n
        assert wire.ZSTD_LEVEL == 1

    def _time(self, fn, *args) -> int:
        t0 = time.thread_time_ns()
        fn(*args)
        return time.thread_time_ns() - t0

    def tls_server(self) -> int:
        return self.tls.server_trip(self.zbody, self.zc.compress(self.reply))

    def zstd_request(self) -> int:
        return self._time(self.zd.decompress, self.zbody)

    def walk(self) -> int:
        return self._time(self.nat.walk_sign_batch, self.f.body, self.f.max_batch)

    def validate(self) -> int:
        t0 = time.thread_time_ns()
        self.nat.validate_dcc_batch(
            self.rules, self.f.view.data, self.offs, ends=self.ends, strict=True, nfc_names=True
        )
        return time.thread_time_ns() - t0

    def splice(self) -> int:
        return self._time(self.nat.splice_payloads, self.f.view, self.f.prefixes, self.f.prefix_of)

    def accounts(self) -> int:
        v = self.f.view
        return self._time(
            self.nat.span_table, v.data, v.columns, W.NFIELDS, (W.ACCOUNT_OFF, W.ACCOUNT_LEN),
            self.rows,
        )  # fmt: skip

    def reply_body(self) -> int:
        f = self.f
        return self._time(
            self.nat.encode_sign_batch_result, f.protected, KIDS, f.prot_of, f.payload_buf,
            f.payload_off, f.sig_buf, f.sig_off, {},
        )  # fmt: skip

    def zstd_reply(self) -> int:
        return self._time(self.zc.compress, self.reply)

    def bench_core(self) -> int:
        return self._time(self.issuer.issue, self.dccs)

    def bench_core_hc1(self) -> int:
        f = self.f
        return self._time(self.nat.hc1_encode, f.protected[0], f.payloads, f.signatures, 9)


FLOOR = ("tls_server", "zstd_request", "walk", "validate", "splice", "accounts",
         "reply_body", "zstd_reply")  # fmt: skip
ALL = (*FLOOR, "bench_core", "bench_core_hc1")


def run(stages: Stages, rounds: int, seconds: float) -> dict:
    frames = {}
    for name in ALL:  # frames per sample: about `seconds` each
        fn = getattr(stages, name)
        probe = max(sum(fn() for _ in range(3)) / 3, 1000)
        frames[name] = max(3, int(seconds * 1e9 / probe))
    samples: dict[str, list[float]] = {name: [] for name in ALL}
    for r in range(rounds):
        for name in ALL if r % 2 == 0 else ALL[::-1]:
            fn = getattr(stages, name)
            spent = sum(fn() for _ in range(frames[name]))
            samples[name].append(spent / (frames[name] * stages.n) / 1000)
    per_cert = {name: round(statistics.median(v), 3) for name, v in samples.items()}
    # The floor and its ratio to bench core round by round (the same drift in both).
    floors = [sum(samples[s][r] for s in FLOOR) for r in range(rounds)]
    ratio = statistics.median(floors[r] / samples["bench_core"][r] for r in range(rounds))
    return {
        "per_cert_us_median": per_cert,
        "floor_us_median": round(statistics.median(floors), 3),
        "floor_over_bench_core_median": round(ratio, 3),
        "budget_over_bench_core": round(BUDGET_US / BUDGET_CORE_US, 3),
        "budget_us_scaled_to_this_run": round(
            BUDGET_US / BUDGET_CORE_US * per_cert["bench_core"], 3
        ),
        "rounds": rounds,
        "samples_us": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3, help="per stage per round")
    ap.add_argument("--items", type=int, default=50, help="certificates per frame")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if native.IMPLEMENTATION != "native":
        raise SystemExit("the native extension is not built (make build)")
    with tempfile.TemporaryDirectory() as tmp:
        stages = Stages(args.items, ensure_dev_tls(Path(tmp)))
    result = run(stages, args.rounds, args.seconds)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/engine_floor.py " + " ".join(argv or sys.argv[1:]),
        "items_per_frame": args.items,
        "request_body_bytes": [len(stages.f.body), len(stages.zbody)],
        "reply_body_bytes": [len(stages.reply), len(stages.zc.compress(stages.reply))],
        **result,
    }
    per = result["per_cert_us_median"]
    for name in ALL:
        print(f"  {name:16} {per[name]:8.2f} us/cert")
    print(f"floor {result['floor_us_median']:.2f} us/cert = "
          f"{result['floor_over_bench_core_median']:.3f} of a bench core certificate "
          f"(budget: {result['budget_over_bench_core']:.3f}, i.e. "
          f"{result['budget_us_scaled_to_this_run']:.2f} us in this run)")  # fmt: skip
    print(f"wrote {save_result(result, 'engine_floor', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
