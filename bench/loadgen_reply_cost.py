"""What the load generator spends on one reply, counted or decoded, in instructions.

Wall-clock and even CPU time drift on a shared machine; instruction counts do not. This
script handles N SIGN_BATCH_RESULT frames of 50 signed results (encoded and compressed by
the codec, as the engine's are) in one of three ways:

- ``none``: only build the frames (the baseline to subtract);
- ``full``: the old path, the codec's ``next_event`` (its pure-Python CBOR scan, ``cbor2``,
  one ``ItemResult`` per certificate);
- ``counted``: what ``dccsign bench load`` does now: zstd, then ``native.scan_results``.

Run each under callgrind and divide the difference with ``none`` by N x 50::

    for m in none full counted; do
      valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$m \\
        .venv/bin/python bench/loadgen_reply_cost.py $m 100 2>&1 | grep Collected
    done
"""

from __future__ import annotations

import sys

import zstandard

from dccsign import native
from dccsign.bench.loadfake import CANNED_HC1, CANNED_KID
from dccsign.protocol import wire
from dccsign.testing.wirepair import open_pair


def main() -> int:
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode not in ("none", "full", "counted"):
        raise SystemExit("mode: none, full or counted")
    client, server = open_pair(max_batch=100, server="bench")
    server.last_request_id = n + 1  # the codec answers only ids it has seen
    ok = wire.ItemResult(hc1=CANNED_HC1, kid=CANNED_KID)
    frames = [server.send(wire.SignBatchResult(i + 1, (ok,) * 50)) for i in range(n)]
    client.note_sent(n + 1)
    unzstd = zstandard.ZstdDecompressor()
    for frame in frames if mode != "none" else ():
        if mode == "full":
            client.receive_data(frame)
            assert len(client.next_event().results) == 50
        else:
            body = frame[wire.HEADER_SIZE :]
            if frame[4] & wire.FLAG_ZSTD:
                body = unzstd.decompress(body)
            assert native.scan_results(body, True, 100)[0] == 50
    return 0


if __name__ == "__main__":
    sys.exit(main())
