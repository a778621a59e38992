"""TLS between two trio tasks on loopback: ``trio.SSLStream`` against
``dccsign.protocol.clients.tls_stream.TLSStream``, CPU per round trip (both ends).

    .venv/bin/python bench/tls_stream_micro.py [--rounds 5] [--trips 3000] [--json FILE]

A round trip is what a frame of 50 certificates costs the engine and a client in TLS: the
client sends a request body (12 KB by default), the server a reply body (30 KB). Both ends
run in one process and one trio run, so ``time.process_time`` per round trip is the TLS and
stream cost of both ends together (encryption included). The two implementations alternate,
round by round, over the development TLS material (a fresh CA, ECDSA P-256 certificates,
TLS 1.3); the report gives each one's median and the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from dccsign.protocol.clients.tls_stream import TLSStream
from dccsign.server.devtls import ensure_dev_tls


def _contexts(tls: dict[str, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls["ca"]))
    server.load_cert_chain(str(tls["server_cert"]), str(tls["server_key"]))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(tls["ca"]))
    client.load_cert_chain(str(tls["client_cert"]), str(tls["client_key"]))
    return server, client


async def _receive(stream: trio.abc.Stream, n: int) -> None:
    got = 0
    while got < n:
        data = await stream.receive_some(1 << 18)
        if not data:
            raise SystemExit("the peer closed")
        got += len(data)


async def _one(kind: str, tls: dict[str, Path], request: int, reply: int, trips: int) -> float:
    """CPU seconds per round trip for *kind* ("sslstream" or "tlsstream")."""
    server_ctx, client_ctx = _contexts(tls)
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    streams: dict[str, trio.abc.Stream] = {}

    async def accept() -> None:
        tcp = await listener.accept()
        if kind == "sslstream":
            stream: trio.abc.Stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        else:
            stream = TLSStream.wrap(tcp, server_ctx, server_side=True)
        await stream.do_handshake()  # type: ignore[attr-defined]
        streams["server"] = stream

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        if kind == "sslstream":
            client: trio.abc.Stream = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1")
        else:
            client = TLSStream.wrap(tcp, client_ctx, server_side=False,
                                    server_hostname="127.0.0.1")  # fmt: skip
        await client.do_handshake()  # type: ignore[attr-defined]
    await listener.aclose()
    server = streams["server"]
    req, rep = os.urandom(request), os.urandom(reply)

    async def serve() -> None:
        for _ in range(trips):
            await _receive(server, request)
            await server.send_all(rep)

    started = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        for _ in range(trips):
            await client.send_all(req)
            await _receive(client, reply)
    cpu = time.process_time() - started
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)
    return cpu / trips


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--trips", type=int, default=3000, help="round trips per round")
    p.add_argument("--request", type=int, default=12_000, help="request bytes (default 12,000)")
    p.add_argument("--reply", type=int, default=30_000, help="reply bytes (default 30,000)")
    p.add_argument("--json", type=Path, metavar="FILE")
    args = p.parse_args()
    kinds = ("sslstream", "tlsstream")
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="dccsign-tls-") as tmp:
        tls = ensure_dev_tls(Path(tmp))
        for r in range(args.rounds):
            for kind in kinds:
                us = trio.run(_one, kind, tls, args.request, args.reply, args.trips) * 1e6
                runs[kind].append(us)
                print(f"round {r}: {kind} {us:.1f} us CPU per round trip", file=sys.stderr)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    for kind in kinds:
        print(f"{kind}: {medians[kind]:.1f} us CPU per round trip (both ends), "
              f"x{medians[kind] / medians['sslstream']:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python bench/tls_stream_micro.py " + " ".join(sys.argv[1:]),
            "request_bytes": args.request, "reply_bytes": args.reply, "trips": args.trips,
            "us_per_round_trip_median": medians, "rounds": runs,
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
