"""``dccsign bench load``: an open-loop load generator for a running engine (trio).

Theory of operation
-------------------

**Open loop.** A scheduler task walks the profile's arrival times (:mod:`.loadprofile`) and
releases each request at its *intended* start time into one shared backlog, whatever the
engine is doing. One sender per connection takes the oldest request from the backlog as soon
as that connection has a free in-flight slot (WELCOME's ``max_in_flight``, as a compliant
client must; ``exceed_in_flight`` lifts it, and the engine then answers BUSY) and writes it;
requests are pipelined and replies are matched by request id. **Latency is measured from the
intended start time**, not from when the request was written: if the engine stalls, requests
wait in the backlog and that wait is part of their latency. A closed-loop generator (or an
open-loop one that measures from the write) would send nothing during the stall and so
record only the few requests that were in flight -- coordinated omission, which hides the
stall from every percentile. The same run also keeps the latency from the write ("service
latency") so that the two can be compared.

**Closed loop** (``closed_loop``): each connection keeps ``in_flight`` requests outstanding
and sends the next as soon as one is answered; latency is from the write. A BUSY answer's
``retry_after_ms`` is honoured: that connection sends nothing more until it has passed, as a
compliant client does (resending at once would make the closed loop a busy loop of refusals).
It finds the maximum throughput, and it is what open loop must not be mistaken for.

**The generator's own limits are reported, never hidden.** The scheduler records how late it
released each request (``schedule_lag``: the generator's event loop was busy); the senders
record how long requests waited for a free slot (``send_delay``: back-pressure from the
engine). At most ``max_outstanding`` requests may be waiting or in flight; a request due when
that many are is not sent and counted as ``not_sent_generator_limit``. Requests still waiting
when the run and its drain time are over are ``not_sent_at_end``; requests sent but never
answered are errors ``NO_REPLY``.

**Payloads are prepared before the clock starts** (:func:`build_payloads`): realistic DCCs of
all three types (:func:`dccsign.testing.samples.varied_samples`, non-ASCII names, some compound
names for size), a share made invalid in several ways, spread over many end-user accounts,
encoded and (for SIGN_BATCH) zstd-compressed by the protocol codec itself. Sending a request is
then a 16-byte header and a write. Items carry no idempotency key: the pool is cycled, and a
key would make the engine answer repeats from its idempotency cache instead of signing.

**Replies are counted, not decoded.** A SIGN_RESULT / SIGN_BATCH_RESULT frame is taken
from the stream by its header (the codec's header rules: magic, version, flags, size, a
request id that was sent), its body decompressed and walked once by
:func:`dccsign.native.scan_results` (C, GIL released; a pure-Python twin): the number of
results, and the position and error code of each one not signed -- no object per
certificate. Which items were invalid DCCs is known per frame from the pool
(``Frame.invalid_positions``), so an invalid DCC that comes back signed is still found
without decoding it. Only sampled certificates have their HC1 taken out of the body. Every
other frame (ERROR, GOAWAY, KEYS, PING) goes through the sans-IO codec as before, which
decodes and checks it in full. ``full_decode`` keeps the old path (every reply decoded by
the codec into per-item objects), to measure the difference.

**CPU is accounted per process and thread** (:mod:`.cpustat`): ``/proc`` is read for this
process, and for the processes of ``cpu_pids`` and their children (an engine and its keyd),
just before the clock starts and after the last reply; ``LoadResult.cpu`` gives each one's
microseconds per certificate signed and per certificate sent.

**Wrong answers never count.** Every signed item can be sampled (``verify_sample``); after
the run each sample is verified with :func:`dccsign.dcc.verify.verify_hc1` against the DSCs from
LIST_KEYS, and its DCC compared with the one sent. A failure moves the certificate from "ok"
to the error ``bad_signature``. An invalid DCC that comes back signed is the error
``SIGNED_INVALID``; an invalid DCC refused with INVALID_DCC is the expected answer
(``rejected_as_expected``), not an error.

**The engine's nonce pool is sampled during the run** when ``metrics_url`` is given
(:mod:`.loadpool`): once before the first request, about once a second in a task of its own
(the HTTP GET runs in a worker thread), and once 0.5 s after the last reply (the engine's copy
of keyd's counts lags by up to 0.25 s; that time is after the last reply and in no rate); if
the first sample shows no pool, there are no more. Waiting for a full pool (a profile's
``wait_for_pool``) is done before :func:`run_load`, by
:func:`dccsign.bench.loadpool.wait_for_full_pool`: the run's clock, and so every rate, starts after
it.

**Per phase**, the certificates signed OK are also counted by the profile phase in which their
reply arrived (``phase_ok``; the last entry: after the profile, while draining), so that a
report can give the rate during one phase -- the burst -- next to the whole run's.

Counting: ``ok`` and the latency histograms count *certificates* (a batch frame's latency
applies to each of its certificates); ``busy`` counts BUSY *answers* (a request-level ERROR
BUSY for a whole frame, or one item's BUSY result), ``busy_certs`` the certificates they
refused; ``errors`` counts certificates that failed otherwise (by code, see
:data:`ERROR_NAMES`).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import ssl
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import zstandard

from .. import native
from ..protocol import cborlimits, wire
from ..protocol.clients.tls_stream import open_tls_over_tcp
from ..protocol.codes import ErrorCode
from . import cpustat
from .latency import LatencyHistogram
from .loadpool import PoolSampler, PoolSeries
from .loadprofile import Profile

__all__ = [
    "DEFAULT_SERVER",
    "ERROR_NAMES",
    "Frame",
    "LoadConfig",
    "LoadError",
    "LoadResult",
    "Payloads",
    "build_payloads",
    "payloads_for",
    "run_load",
]

#: The embedded default of ``make serve``.
DEFAULT_SERVER = "unix:var/dccsign.sock"
AGENT = "dccsign-bench-load/0.1"

#: Error names beyond the protocol's :class:`ErrorCode` names.
ERROR_NAMES = {
    "bad_signature": "a sampled HC1 failed verification (signature, kid, time, key usage, or "
    "its DCC differs from the one sent)",
    "SIGNED_INVALID": "an invalid DCC was signed",
    "WRONG_RESULT_COUNT": "a SIGN_BATCH_RESULT with another number of results than items",
    "DUPLICATE_REPLY": "a second reply for a request id already answered",
    "CONNECTION_LOST": "the connection broke with the request unanswered",
    "NOT_PROCESSED_GOAWAY": "sent after the id of a GOAWAY: the engine will not process it",
    "NO_REPLY": "no reply within the drain time after the run",
}
_INVALID_KINDS = ("uvci-check-character", "unknown-country", "impossible-date", "missing-name")
_HEADER = wire.HEADER
_MAGIC = wire.MAGIC
_VERSION = wire.VERSION
_HEADER_SIZE = wire.HEADER_SIZE
_RESULT_TYPES = frozenset({wire.FrameType.SIGN_RESULT, wire.FrameType.SIGN_BATCH_RESULT})
_scan_results = native.scan_results


class LoadError(Exception):
    """The run cannot start or go on: the engine cannot be reached or refused us, or the
    configuration does not fit the engine (e.g. a batch above its max_batch)."""


@dataclass(frozen=True)
class LoadConfig:
    """What to run (``dccsign bench load --help`` documents each field)."""

    profile: Profile
    server: str = DEFAULT_SERVER
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    closed_loop: bool = False
    connections: int = 4
    #: Requests in flight per connection: closed loop default 4; open loop default and cap
    #: WELCOME's max_in_flight (unless exceed_in_flight).
    in_flight: int | None = None
    exceed_in_flight: bool = False
    batch: int = 1
    invalid_share: float = 0.0
    accounts: int = 10_000
    account_prefix: str = "load:"
    verify_sample: float = 0.01
    verify_max: int = 20_000
    max_outstanding: int = 100_000
    drain_timeout: float = 10.0
    compression: bool = True
    seed: int = 2021
    connect_timeout: float = 10.0
    #: The engine's /metrics, to sample the nonce pool during the run (None: not sampled).
    metrics_url: str | None = None
    pool_sample_interval: float = 1.0
    #: Decode every reply with the codec (per-item objects) instead of counting it: the
    #: generator's old path, kept to measure what counting saves.
    full_decode: bool = False
    #: Processes (role, pid) whose CPU is read from /proc at the start and end of the run,
    #: besides the generator's own, with their children (an engine's keyd): ``result.cpu``.
    cpu_pids: tuple[tuple[str, int], ...] = ()


# ----------------------------------------------------------------------------- payloads


@dataclass(frozen=True, slots=True)
class Frame:
    """One prepared request: its frame type, its body plain and as the codec compresses it
    (``packed`` with ``packed_flags``), and which pool items it carries."""

    ftype: int
    raw: bytes
    packed: bytes
    packed_flags: int
    items: tuple[int, ...]
    invalid: int  # how many of its items are invalid DCCs
    #: Positions (in the frame) of its invalid items: a signed result there is SIGNED_INVALID.
    invalid_positions: tuple[int, ...] = ()


@dataclass
class Payloads:
    """The pool of prepared requests, cycled through during a run."""

    batch: int
    dccs: list[dict[str, Any]]
    invalid: list[bool]
    invalid_kind: list[str | None]
    accounts: list[str]
    frames: list[Frame]
    seconds: float = 0.0  # time it took to build

    @property
    def max_raw(self) -> int:
        return max(len(f.raw) for f in self.frames)


# Second names for compound ones (with their ICAO 9303 transliterations), for size variety.
_MORE_SURNAMES = (("García", "GARCIA"), ("Šimić", "SIMIC"), ("Ólafsdóttir", "OLAFSDOTTIR"))
_MORE_GIVEN = (("Maëlle", "MAELLE"), ("Jürgen", "JUERGEN"), ("Zoë", "ZOE"))


def _compound_names(dcc: dict[str, Any], rng: random.Random) -> None:
    """Vary the payload size: some people have two surnames or two given names."""
    nam = dcc["nam"]
    if rng.random() < 0.35:
        fn, fnt = rng.choice(_MORE_SURNAMES)
        nam["fn"], nam["fnt"] = f"{nam['fn']}-{fn}", f"{nam['fnt']}<{fnt}"
    if rng.random() < 0.35:
        gn, gnt = rng.choice(_MORE_GIVEN)
        nam["gn"], nam["gnt"] = f"{nam['gn']} {gn}", f"{nam['gnt']}<{gnt}"


def _make_invalid(dcc: dict[str, Any], kind: str) -> None:
    group = next(g for g in ("v", "t", "r") if g in dcc)
    entry = dcc[group][0]
    if kind == "uvci-check-character":
        ci = entry["ci"]
        head, check = ci[:-1], ci[-1]
        entry["ci"] = head + ("B" if check != "B" else "C")
    elif kind == "unknown-country":
        entry["co"] = "XX"
    elif kind == "impossible-date":
        dcc["dob"] = "1990-13-45"
    elif kind == "missing-name":
        del dcc["nam"]
    else:  # pragma: no cover - the kinds are ours
        raise AssertionError(kind)


def _scratch_client(compression: bool, max_batch: int) -> wire.Connection:
    """A client codec in state OPEN, through a handshake with a scratch server, so that it
    encodes (and checks, and compresses) request frames exactly as on a real connection."""
    client = wire.Connection(wire.CLIENT, compression=("zstd",) if compression else ())
    server = wire.Connection(wire.SERVER)
    server.receive_data(client.send(client.make_hello()))
    server.next_event()
    welcome = server.make_welcome(max_batch=max_batch, max_in_flight=1, server="scratch")
    client.receive_data(server.send(welcome))
    client.next_event()
    return client


def payloads_for(config: LoadConfig) -> Payloads:
    """The request pool :func:`build_payloads` prepares for *config*'s batch, invalid share,
    accounts and seed.

    Raises:
        ValueError: a parameter out of range.
    """
    return build_payloads(
        batch=config.batch,
        invalid_share=config.invalid_share,
        accounts=config.accounts,
        account_prefix=config.account_prefix,
        seed=config.seed,
    )


def build_payloads(
    *,
    batch: int,
    invalid_share: float = 0.0,
    accounts: int = 10_000,
    account_prefix: str = "load:",
    seed: int = 2021,
    pool_items: int | None = None,
) -> Payloads:
    """Prepare the request pool: ``max(accounts, 4096)`` items (or *pool_items*), rounded up
    to whole frames of *batch* items; item *i* belongs to account ``i mod accounts``.

    Every valid DCC is checked with :func:`dccsign.dcc.validate.validate` and every invalid one
    checked to fail it, so that the expected answers are known.

    Raises:
        ValueError: a parameter out of range.
    """
    from ..dcc.validate import DCCValidationError, validate
    from ..testing.samples import varied_samples

    if batch < 1:
        raise ValueError("batch must be at least 1")
    if not 0.0 <= invalid_share <= 1.0:
        raise ValueError("invalid_share must be in 0..1")
    if accounts < 1:
        raise ValueError("accounts must be at least 1")
    started = time.perf_counter()
    n = pool_items if pool_items is not None else max(accounts, 4096)
    n = max(batch, math.ceil(n / batch) * batch)
    rng = random.Random(seed)
    dccs = varied_samples(n, seed)
    for dcc in dccs:
        _compound_names(dcc, rng)
    bad = set(rng.sample(range(n), round(invalid_share * n)))
    invalid = [i in bad for i in range(n)]
    kinds: list[str | None] = [None] * n
    for j, i in enumerate(sorted(bad)):
        kinds[i] = _INVALID_KINDS[j % len(_INVALID_KINDS)]
        _make_invalid(dccs[i], kinds[i])
    for i, dcc in enumerate(dccs):
        try:
            validate(dcc)
            ok = True
        except DCCValidationError:
            ok = False
        if ok == invalid[i]:  # our generator is wrong: the expected answers would be too
            raise AssertionError(f"pool item {i} ({kinds[i] or 'valid'}): validation says {ok}")
    width = len(str(accounts - 1))
    names = [f"{account_prefix}{i % accounts:0{width}d}" for i in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    items = [wire.SignItem(dccs[i], names[i]) for i in range(n)]
    codec = _scratch_client(True, batch)
    unpack = zstandard.ZstdDecompressor()
    frames = []
    for k in range(n // batch):
        idx = tuple(order[k * batch : (k + 1) * batch])
        if batch == 1:
            event: Any = wire.Sign(k + 1, items[idx[0]])
        else:
            event = wire.SignBatch(k + 1, tuple(items[i] for i in idx))
        data = codec.send(event)
        ftype, flags = data[3], data[4]
        body = data[wire.HEADER_SIZE :]
        raw = unpack.decompress(body) if flags & wire.FLAG_ZSTD else body
        bad_at = tuple(pos for pos, i in enumerate(idx) if invalid[i])
        frames.append(Frame(ftype, raw, body, flags, idx, len(bad_at), bad_at))
    return Payloads(
        batch, dccs, invalid, kinds, names, frames, seconds=time.perf_counter() - started
    )


# ----------------------------------------------------------------------------- results


class Bucket:
    """One second of the run (by completion time; ``offered`` by intended time)."""

    __slots__ = ("busy", "errors", "hist", "not_sent", "offered", "ok", "rejected", "sent")

    def __init__(self) -> None:
        self.offered = 0
        self.sent = 0
        self.ok = 0
        self.busy = 0
        self.errors = 0
        self.rejected = 0
        self.not_sent = 0
        self.hist = LatencyHistogram(2)


@dataclass
class LoadResult:
    """Everything a report needs (see :mod:`.loadreport`). Counts are certificates unless
    named ``*_frames`` / ``*_replies``."""

    config: LoadConfig
    profile: Profile
    mode: str
    welcome: dict[str, Any]
    keys: int
    payload_seconds: float
    started_at: float  # wall clock (time.time()) at t0
    duration_s: float  # the profile's (or the closed-loop run's) length
    elapsed_s: float  # t0 to the last reply, at least duration_s
    offered: int = 0
    sent: int = 0
    sent_frames: int = 0
    ok: int = 0
    ok_frames: int = 0
    rejected_as_expected: int = 0
    busy_replies: int = 0
    busy_certs: int = 0
    not_sent_generator_limit: int = 0
    not_sent_at_end: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    service_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    schedule_lag: LatencyHistogram = field(default_factory=LatencyHistogram)
    send_delay: LatencyHistogram = field(default_factory=LatencyHistogram)
    timeline: list[Bucket] = field(default_factory=list)
    connect_failures: int = 0
    last_connect_error: str | None = None
    connection_losses: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    verify: dict[str, Any] = field(default_factory=dict)
    #: Certificates signed OK by the profile phase their reply arrived in; one more entry for
    #: replies after the profile's end. Before verification (like ``timeline``).
    phase_ok: list[int] = field(default_factory=list)
    #: The nonce pool's samples (None: not sampled, no metrics_url).
    nonce_pool: PoolSeries | None = None
    #: CPU per process and thread over the run, per certificate signed OK
    #: (:func:`dccsign.bench.cpustat.delta`; None off Linux).
    cpu: dict[str, Any] | None = None

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    @property
    def certs_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def wrong_answers(self) -> int:
        """Certificates that came back wrong: the run must not pass."""
        codes = self.errors_by_code
        return codes.get("bad_signature", 0) + codes.get("SIGNED_INVALID", 0)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"CODE_{int(code)}"


# ----------------------------------------------------------------------------- connections


def _split_address(address: str) -> tuple[str, int] | str:
    if address.startswith("unix:"):
        if not address[5:]:
            raise LoadError("unix: needs a path, e.g. unix:var/dccsign.sock")
        return address[5:]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise LoadError(f"server address must be unix:PATH or HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def tls_client_context(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    """The client side of the engine's mutual TLS.

    Raises:
        LoadError: a file cannot be read or is not what it should be.
    """
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise LoadError(f"TLS client setup failed: {exc}") from None
    return ctx


async def open_engine_stream(
    address: str, ssl_context: ssl.SSLContext | None = None
) -> trio.abc.Stream:
    """A byte stream to the engine at *address* (``unix:PATH`` or ``HOST:PORT`` with TLS).

    Raises:
        LoadError: the engine cannot be reached or the TLS handshake fails.
    """
    where = _split_address(address)
    try:
        if isinstance(where, str):
            return await trio.open_unix_socket(where)
        if ssl_context is None:
            raise LoadError("a HOST:PORT server needs TLS settings")
        host, port = where
        return await open_tls_over_tcp(host, port, ssl_context)
    except (OSError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ or exc
        raise LoadError(f"cannot connect to {address}: {cause}") from None


class _Conn:
    """One connection: its stream, codec, outstanding requests and in-flight slots."""

    __slots__ = (
        "cap",
        "codec",
        "frames",
        "goaway",
        "hold_until",
        "index",
        "next_rid",
        "pending",
        "send_scope",
        "slots",
        "stream",
        "welcome",
    )

    def __init__(
        self,
        index: int,
        stream: trio.abc.Stream,
        codec: wire.Connection,
        welcome: wire.Welcome,
        cap: int,
    ) -> None:
        self.index = index
        # Closed loop: a BUSY asks the client to wait retry_after_ms; no new request on this
        # connection before then (a compliant client does not hammer a busy engine).
        self.hold_until = 0.0
        self.stream = stream
        self.codec = codec
        self.welcome = welcome
        self.cap = cap
        self.slots = trio.Semaphore(cap)
        #: request id -> (intended start, write time, frame index)
        self.pending: dict[int, tuple[float, float, int]] = {}
        self.next_rid = codec.last_request_id + 1
        self.goaway: int | None = None
        self.send_scope = trio.CancelScope()
        # The body variant to send: compressed bodies only if zstd was negotiated.
        self.frames: list[tuple[int, int, bytes]] = []


async def _handshake(
    stream: trio.abc.Stream, compression: bool, wait_s: float, full_decode: bool = False
) -> tuple[wire.Connection, wire.Welcome]:
    # The codec decodes what is not counted (ERROR -- BUSY under overload --, GOAWAY, KEYS)
    # and counts each body first: natively, except on the old path, which is kept as it was.
    codec = wire.Connection(
        wire.CLIENT,
        compression=("zstd",) if compression else (),
        scan=cborlimits.scan if full_decode else native.cbor_scan,
    )
    with trio.move_on_after(wait_s) as scope:
        await stream.send_all(codec.send(codec.make_hello(AGENT)))
        while True:
            event = codec.next_event()
            if event is wire.NEED_DATA:
                codec.receive_data(await stream.receive_some(1 << 16))
                continue
            if event is None:
                raise LoadError("the engine closed the connection during the handshake")
            if isinstance(event, wire.Welcome):
                return codec, event
            if isinstance(event, wire.Error):
                raise LoadError(
                    f"the engine refused the connection: {_code_name(event.code)}: {event.message}"
                )
    assert scope.cancelled_caught
    raise LoadError(f"no WELCOME within {wait_s:g} s")


async def _request(conn: _Conn, event: Any, wait_s: float) -> Any:
    """One request outside the measured run (LIST_KEYS before it starts); its reply."""
    with trio.move_on_after(wait_s):
        await conn.stream.send_all(conn.codec.send(event))
        conn.next_rid = conn.codec.last_request_id + 1
        while True:
            reply = conn.codec.next_event()
            if reply is wire.NEED_DATA:
                conn.codec.receive_data(await conn.stream.receive_some(1 << 16))
                continue
            if reply is None or (isinstance(reply, wire.Error) and reply.request_id == 0):
                raise LoadError(f"the engine closed the connection: {reply}")
            if getattr(reply, "request_id", 0) == event.request_id:
                return reply
    raise LoadError(f"no reply to {type(event).__name__} within {wait_s:g} s")


# ----------------------------------------------------------------------------- the run


class _Run:
    def __init__(
        self,
        config: LoadConfig,
        payloads: Payloads,
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.config = config
        self.payloads = payloads
        self.progress = progress
        self.profile = config.profile
        self.ssl_context: ssl.SSLContext | None = None
        if not config.server.startswith("unix:"):
            self.ssl_context = tls_client_context(config.cert, config.key, config.ca)
        self.outstanding = 0  # requests in the backlog or in flight
        self.scheduling_done = False
        self.stopping = False
        self.idle = trio.Event()
        self.conns: list[_Conn] = []
        self.backlog_send, self.backlog_recv = trio.open_memory_channel[tuple[float, int]](math.inf)
        self.t0 = 0.0
        self.end = 0.0
        self.last_reply = 0.0
        self.frame_cursor = 0
        self.rng = random.Random(config.seed ^ 0x5A17)
        share = config.verify_sample
        self._log_miss = math.log1p(-share) if 0 < share < 1 else None
        self.sample_gap = self._gap()
        self.samples: list[tuple[str, bytes, int]] = []
        self.keys: list[wire.KeyInfo] = []
        self.sample_candidates = 0
        self.result: LoadResult | None = None
        self.cpu_before: cpustat.Snapshot | None = None
        self.cpu_after: cpustat.Snapshot | None = None
        #: Each phase's end, seconds from t0 (for phase_ok).
        self.phase_ends = list(itertools.accumulate(p.duration for p in self.profile.phases))
        self.sampler = (
            PoolSampler(config.metrics_url, interval_s=config.pool_sample_interval)
            if config.metrics_url
            else None
        )
        # One decompressor for the run's reply bodies (the codec makes one per frame so that
        # a long-lived connection does not keep its window; a run is short).
        self._unzstd = zstandard.ZstdDecompressor()

    # -- helpers -----------------------------------------------------------------------

    def _gap(self) -> float:
        """Signed certificates to skip before the next sample (geometric: each is sampled
        with probability verify_sample, independently)."""
        share = self.config.verify_sample
        if share <= 0:
            return math.inf
        if self._log_miss is None:
            return 0
        return math.floor(math.log(1.0 - self.rng.random()) / self._log_miss)

    def _bucket(self, t: float) -> Bucket:
        i = int(t - self.t0) if t > self.t0 else 0
        timeline = self.r.timeline
        while len(timeline) <= i:
            timeline.append(Bucket())
        return timeline[i]

    @property
    def r(self) -> LoadResult:
        assert self.result is not None
        return self.result

    def _take_frame(self) -> int:
        i = self.frame_cursor
        self.frame_cursor = (i + 1) % len(self.payloads.frames)
        return i

    def _finished_one(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and self.scheduling_done:
            self.idle.set()

    def _error(self, bucket: Bucket, name: str, n: int) -> None:
        codes = self.r.errors_by_code
        codes[name] = codes.get(name, 0) + n
        bucket.errors += n

    def _count_ok(self, bucket: Bucket, now: float, due: float, sent: float, n_ok: int) -> None:
        """*n_ok* certificates of one frame signed OK, answered at *now*: counted, and their
        latency recorded from the intended start *due* and from the write *sent*."""
        r = self.r
        latency = now - due
        r.ok += n_ok
        r.ok_frames += 1
        bucket.ok += n_ok
        r.latency.record(latency, n_ok)
        r.service_latency.record(now - sent, n_ok)
        bucket.hist.record(latency, n_ok)
        r.phase_ok[bisect.bisect_right(self.phase_ends, now - self.t0)] += n_ok

    def _count_refusal(self, bucket: Bucket, code: int, invalid: bool) -> None:
        """One certificate refused with *code*: as expected when the DCC sent was *invalid*
        and the answer INVALID_DCC, else BUSY or an error."""
        r = self.r
        if code == ErrorCode.INVALID_DCC and invalid:
            r.rejected_as_expected += 1
            bucket.rejected += 1
        elif code == ErrorCode.BUSY:
            r.busy_replies += 1
            r.busy_certs += 1
            bucket.busy += 1
        else:
            self._error(bucket, _code_name(code), 1)

    # -- connecting ----------------------------------------------------------------------

    async def open_conn(self, index: int) -> _Conn:
        config = self.config
        with trio.move_on_after(config.connect_timeout) as scope:
            stream = await open_engine_stream(config.server, self.ssl_context)
        if scope.cancelled_caught:
            raise LoadError(f"cannot connect to {config.server}: timed out")
        try:
            codec, welcome = await _handshake(
                stream, config.compression, config.connect_timeout, config.full_decode
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, wire.WireProtocolError) as exc:
            await trio.aclose_forcefully(stream)
            raise LoadError(f"handshake with {config.server} failed: {exc}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if self.payloads.batch > welcome.max_batch:
            await trio.aclose_forcefully(stream)
            raise LoadError(
                f"--batch {self.payloads.batch} is above the engine's max_batch {welcome.max_batch}"
            )
        if self.payloads.max_raw > welcome.max_frame:
            await trio.aclose_forcefully(stream)
            raise LoadError(
                f"a frame of the pool exceeds the engine's max_frame {welcome.max_frame}"
            )
        if config.closed_loop:
            cap = config.in_flight or 4
        elif config.exceed_in_flight:
            cap = config.in_flight or 1 << 30
        else:
            cap = min(config.in_flight or welcome.max_in_flight, welcome.max_in_flight)
        conn = _Conn(index, stream, codec, welcome, cap)
        zstd = codec.compression is not None
        conn.frames = [
            (f.ftype, f.packed_flags, f.packed) if zstd else (f.ftype, 0, f.raw)
            for f in self.payloads.frames
        ]
        return conn

    # -- sending -----------------------------------------------------------------------

    async def _write(self, conn: _Conn, batch: list[tuple[float, int]]) -> None:
        now = trio.current_time()
        if conn.goaway is not None:
            # GOAWAY arrived after this batch was taken: the engine would not process it.
            for _due, _fi in batch:
                self._error(self._bucket(now), "NOT_PROCESSED_GOAWAY", self.payloads.batch)
                self._finished_one()
            return
        parts = []
        n_certs = 0
        size = self.payloads.batch
        for due, fi in batch:
            rid = conn.next_rid
            conn.next_rid = rid + 1
            ftype, flags, body = conn.frames[fi]
            parts.append(_HEADER.pack(_MAGIC, _VERSION, ftype, flags << 24, rid, len(body)))
            parts.append(body)
            conn.pending[rid] = (due, now, fi)
            self.r.send_delay.record(now - due)
            n_certs += size
        # The frames are pre-encoded, so the codec did not see them go out: tell it the
        # highest request id sent, which is what it checks replies against (SPEC.md §8.1).
        conn.codec.note_sent(conn.next_rid - 1)
        r = self.r
        r.sent += n_certs
        r.sent_frames += len(batch)
        self._bucket(now).sent += n_certs
        await conn.stream.send_all(b"".join(parts))

    async def _open_loop_sender(self, conn: _Conn) -> None:
        recv = self.backlog_recv
        slots = conn.slots
        while True:
            await slots.acquire()
            try:
                first = await recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                slots.release()
                return
            batch = [first]
            # Coalesce whatever else is due into the same write, while slots last.
            while len(batch) < 64:
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    break
                try:
                    batch.append(recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    slots.release()
                    break
            await self._write(conn, batch)

    async def _closed_loop_sender(self, conn: _Conn) -> None:
        slots = conn.slots
        while True:
            await slots.acquire()
            if conn.hold_until > trio.current_time():
                await trio.sleep_until(min(conn.hold_until, self.end))
            now = trio.current_time()
            if now >= self.end or self.stopping:
                slots.release()
                return
            batch = [(now, self._take_frame())]
            while True:
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    break
                batch.append((now, self._take_frame()))
            self.outstanding += len(batch)
            offered = len(batch) * self.payloads.batch
            self.r.offered += offered
            self._bucket(now).offered += offered
            await self._write(conn, batch)

    # -- receiving ---------------------------------------------------------------------

    async def _receiver(self, conn: _Conn) -> str:
        """Read replies until the connection ends; returns why it ended."""
        if not self.config.full_decode:
            return await self._counting_receiver(conn)
        stream = conn.stream
        while True:
            try:
                data = await stream.receive_some(1 << 18)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return f"connection broken: {exc.__cause__ or exc}"
            why = self._to_codec(conn, data, end=not data)
            if why:
                return why

    async def _counting_receiver(self, conn: _Conn) -> str:
        """:meth:`_receiver` with result frames counted (see the module docstring): the
        codec sees every other frame, one whole frame at a time, and the bytes of any frame
        whose header it must judge."""
        codec = conn.codec
        stream = conn.stream
        buf = bytearray()
        unpack_header = _HEADER.unpack_from
        results = _RESULT_TYPES
        if codec.buffered:  # came with the handshake's or LIST_KEYS' reply
            why = self._to_codec(conn, b"", end=False)
            if why:
                return why
        while True:
            try:
                data = await stream.receive_some(1 << 18)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return f"connection broken: {exc.__cause__ or exc}"
            if not data:
                # What is left (a partial frame, or nothing) and the end: the codec says
                # whether that is a clean close.
                why = self._to_codec(conn, bytes(buf), end=True)
                return why or "the engine closed the connection"
            buf += data
            while len(buf) >= _HEADER_SIZE:
                magic, version, ftype, flags, rid, length = unpack_header(buf)
                end = _HEADER_SIZE + length
                if (
                    ftype not in results
                    or magic != _MAGIC
                    or version != _VERSION
                    or flags & 0x00FFFFFF
                    or length > codec.max_frame
                    or not 0 < rid <= codec.last_request_id
                    or (flags and (flags >> 24 != wire.FLAG_ZSTD or codec.compression is None))
                ):
                    # Not a result, or a header the codec must judge: a whole frame (or, for
                    # a header it will refuse, everything) goes to the codec.
                    ok_header = magic == _MAGIC and version == _VERSION
                    if ok_header and length <= codec.max_frame and len(buf) < end:
                        break
                    cut = end if ok_header and length <= codec.max_frame else len(buf)
                    chunk = bytes(buf[:cut])
                    del buf[:cut]
                    why = self._to_codec(conn, chunk, end=False)
                    if why:
                        return why
                    continue
                if len(buf) < end:
                    break
                body = bytes(buf[_HEADER_SIZE:end])
                del buf[:end]
                why = self._counted(conn, ftype, rid, flags, body)
                if why:
                    return why
            if conn.goaway is not None and not conn.pending:
                return "GOAWAY"  # all it will answer is answered

    def _to_codec(self, conn: _Conn, data: bytes, *, end: bool) -> str | None:
        """Hand *data* (whole frames, or bytes the codec will refuse) and possibly the end
        of the stream to the codec and act on its events; why the connection ends, if it
        does."""
        codec = conn.codec
        if data:
            codec.receive_data(data)
        if end:
            codec.receive_data(b"")
        try:
            while True:
                event = codec.next_event()
                if event is wire.NEED_DATA:
                    return None
                if event is None:
                    if conn.goaway is not None and not conn.pending:
                        return "GOAWAY"
                    return "the engine closed the connection"
                why = self._on_event(conn, event)
                if why:
                    return why
                if conn.goaway is not None and not conn.pending:
                    return "GOAWAY"  # all it will answer is answered
        except wire.RemoteProtocolError as exc:
            return f"protocol error from the engine: {exc}"

    def _counted(self, conn: _Conn, ftype: int, rid: int, flags: int, body: bytes) -> str | None:
        """A SIGN_RESULT / SIGN_BATCH_RESULT whose header passed: counted without decoding
        (:func:`dccsign.native.scan_results`). Returns why the connection must end (a body
        that breaks the protocol), else None."""
        max_frame = conn.codec.max_frame
        try:
            if flags:
                size = zstandard.frame_content_size(body)
                if not 0 <= size <= max_frame:
                    raise ValueError(
                        "the zstd frame does not declare its content size"
                        if size < 0
                        else f"decompressed body of {size} bytes exceeds max_frame {max_frame}"
                    )
                body = self._unzstd.decompress(body)
                if len(body) != size:
                    raise ValueError("the compressed body is not exactly one zstd frame")
            batch = ftype == wire.FrameType.SIGN_BATCH_RESULT
            n, errors, _ = _scan_results(body, batch, conn.welcome.max_batch if batch else 1)
        except (ValueError, zstandard.ZstdError) as exc:
            return f"protocol error from the engine: {exc}"
        entry = conn.pending.pop(rid, None)
        now = trio.current_time()
        self.last_reply = now
        bucket = self._bucket(now)
        if entry is None:  # the header check knows ids were sent, not that they are open
            self._error(bucket, "DUPLICATE_REPLY", n)
            return None
        conn.slots.release()
        self._finished_one()
        due, sent, fi = entry
        frame = self.payloads.frames[fi]
        size = len(frame.items)
        if n != size:
            self._error(bucket, "WRONG_RESULT_COUNT", size)
            return None
        bad: frozenset[int] | tuple[()] = ()
        n_ok = n
        if errors or frame.invalid:
            failed = {pos: code for pos, code in errors}
            bad = frozenset(failed)
            for pos in frame.invalid_positions:
                if pos not in failed:  # an invalid DCC was signed
                    self._error(bucket, "SIGNED_INVALID", 1)
            bad = bad.union(frame.invalid_positions)
            n_ok = n - len(bad)
            invalid = self.payloads.invalid
            for pos, code in errors:
                self._count_refusal(bucket, code, invalid[frame.items[pos]])
        if n_ok:
            self._count_ok(bucket, now, due, sent, n_ok)
            picks = self._sample_picks(n_ok)
            if picks:
                if bad:
                    ok_positions = [p for p in range(n) if p not in bad]
                    positions = [ok_positions[k] for k in picks]
                else:
                    positions = picks
                _n, _e, got = _scan_results(body, batch, n, positions)
                for pos, hc1_kid in zip(positions, got, strict=True):
                    assert hc1_kid is not None  # a signed result, by construction
                    self._keep_sample((hc1_kid[0], hc1_kid[1], frame.items[pos]))
        return None

    def _sample_picks(self, n_ok: int) -> list[int]:
        """Which of the next *n_ok* signed certificates are sampled (their ranks among
        them); the geometric gaps carry over from frame to frame."""
        gap = self.sample_gap
        if gap >= n_ok:
            self.sample_gap = gap - n_ok
            return []
        picks = []
        k = int(gap)
        while k < n_ok:
            picks.append(k)
            k += 1 + self._gap()
        self.sample_gap = k - n_ok
        return picks

    def _keep_sample(self, sample: tuple[str, bytes, int]) -> None:
        self.sample_candidates += 1
        cap = self.config.verify_max
        if len(self.samples) < cap:
            self.samples.append(sample)
        else:  # reservoir: every candidate has the same chance to be verified
            j = self.rng.randrange(self.sample_candidates)
            if j < cap:
                self.samples[j] = sample

    def _on_event(self, conn: _Conn, event: Any) -> str | None:
        t = type(event)
        if t is wire.SignBatchResult:
            self._completed(conn, event.request_id, event.results)
        elif t is wire.SignResult:
            self._completed(conn, event.request_id, (event.result,))
        elif t is wire.Error:
            if event.request_id == 0:
                return f"connection-level ERROR {_code_name(event.code)}: {event.message}"
            self._refused(conn, event)
        elif t is wire.GoAway:
            conn.goaway = event.last_request_id
            conn.send_scope.cancel()
            now = trio.current_time()
            for rid in [rid for rid in conn.pending if rid > event.last_request_id]:
                del conn.pending[rid]
                self._error(self._bucket(now), "NOT_PROCESSED_GOAWAY", self.payloads.batch)
                self._finished_one()
        return None

    def _completed(self, conn: _Conn, rid: int, results: Sequence[wire.ItemResult]) -> None:
        entry = conn.pending.pop(rid, None)
        now = trio.current_time()
        self.last_reply = now
        bucket = self._bucket(now)
        if entry is None:  # the codec checks ids were sent, not that they are still open
            self._error(bucket, "DUPLICATE_REPLY", len(results))
            return
        conn.slots.release()
        self._finished_one()
        due, sent, fi = entry
        frame = self.payloads.frames[fi]
        n = len(frame.items)
        if len(results) != n:
            self._error(bucket, "WRONG_RESULT_COUNT", n)
            return
        if frame.invalid == 0 and all(x.error is None for x in results):
            ok_positions: Iterable[int] = range(n)
            n_ok = n
        else:
            invalid = self.payloads.invalid
            ok_list = []
            for pos, (item, res) in enumerate(zip(frame.items, results, strict=True)):
                err = res.error
                if err is None:
                    if invalid[item]:
                        self._error(bucket, "SIGNED_INVALID", 1)
                    else:
                        ok_list.append(pos)
                else:
                    self._count_refusal(bucket, err, invalid[item])
            ok_positions, n_ok = ok_list, len(ok_list)
        if n_ok:
            self._count_ok(bucket, now, due, sent, n_ok)
            self._sample(frame, results, ok_positions, n_ok)

    def _sample(
        self,
        frame: Frame,
        results: Sequence[wire.ItemResult],
        ok_positions: Iterable[int],
        n_ok: int,
    ) -> None:
        picks = self._sample_picks(n_ok)
        if not picks:
            return
        positions = list(ok_positions)
        for k in picks:
            pos = positions[k]
            res = results[pos]
            assert res.hc1 is not None and res.kid is not None
            self._keep_sample((res.hc1, res.kid, frame.items[pos]))

    def _refused(self, conn: _Conn, event: wire.Error) -> None:
        entry = conn.pending.pop(event.request_id, None)
        now = trio.current_time()
        self.last_reply = now
        bucket = self._bucket(now)
        n = self.payloads.batch
        if entry is None:
            self._error(bucket, "DUPLICATE_REPLY", n)
            return
        conn.slots.release()
        self._finished_one()
        if event.code == ErrorCode.BUSY:
            if self.config.closed_loop and event.retry_after_ms:
                conn.hold_until = max(conn.hold_until, now + event.retry_after_ms / 1000)
            self.r.busy_replies += 1
            self.r.busy_certs += n
            bucket.busy += n
        else:
            self._error(bucket, _code_name(event.code), n)

    # -- per connection ------------------------------------------------------------------

    async def _converse(self, conn: _Conn) -> str:
        """Send and receive on *conn* until it ends; returns why. Always closes it."""
        why = "stopped"
        try:
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    nonlocal why
                    why = await self._receiver(conn)
                    nursery.cancel_scope.cancel()

                async def send() -> None:
                    nonlocal why
                    with conn.send_scope:
                        try:
                            if self.config.closed_loop:
                                await self._closed_loop_sender(conn)
                            else:
                                await self._open_loop_sender(conn)
                        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                            why = f"connection broken while sending: {exc.__cause__ or exc}"
                            nursery.cancel_scope.cancel()

                nursery.start_soon(receive)
                nursery.start_soon(send)
        finally:
            # Also when the run's end cancels us: a socket left to the garbage collector
            # would warn (ResourceWarning).
            await trio.aclose_forcefully(conn.stream)
        return why

    def _lose_pending(self, conn: _Conn, name: str) -> None:
        if not conn.pending:
            return
        bucket = self._bucket(trio.current_time())
        for _rid in list(conn.pending):
            self._error(bucket, name, self.payloads.batch)
            self._finished_one()
        conn.pending.clear()

    async def _slot(self, conn: _Conn) -> None:
        """Keep connection *conn.index* up for the whole run, reconnecting after a loss."""
        while True:
            self.conns[conn.index] = conn
            why = await self._converse(conn)
            if self.stopping:
                return
            if why != "GOAWAY":
                self.r.connection_losses.append(f"connection {conn.index}: {why}")
            self._lose_pending(conn, "CONNECTION_LOST")
            delay = 0.05
            while True:
                if self.stopping:
                    return
                await trio.sleep(delay)
                try:
                    conn = await self.open_conn(conn.index)
                    break
                except LoadError as exc:
                    self.r.connect_failures += 1
                    self.r.last_connect_error = str(exc)
                    delay = min(delay * 2, 1.0)

    # -- scheduling ----------------------------------------------------------------------

    async def _schedule(self) -> None:
        """Release each request at its intended time (open loop)."""
        r = self.r
        size = self.payloads.batch
        cap = self.config.max_outstanding
        send = self.backlog_send
        t0 = self.t0
        since_yield = 0
        for offset in self.profile.arrival_times(size, self.config.seed):
            due = t0 + offset
            now = trio.current_time()
            if due > now:
                await trio.sleep_until(due)
                now = trio.current_time()
                since_yield = 0
            else:
                since_yield += 1
                if since_yield >= 32:  # catching up: let the senders write meanwhile
                    await trio.lowlevel.checkpoint()
                    since_yield = 0
            r.schedule_lag.record(now - due)
            bucket = self._bucket(due)
            r.offered += size
            bucket.offered += size
            if self.outstanding >= cap:
                r.not_sent_generator_limit += size
                bucket.not_sent += size
                continue
            self.outstanding += 1
            send.send_nowait((due, self._take_frame()))

    async def _report_progress(self) -> None:
        assert self.progress is not None
        r = self.r
        tick = 1
        while True:
            await trio.sleep_until(self.t0 + tick)
            i = tick - 1
            b = r.timeline[i] if i < len(r.timeline) else Bucket()
            ps = b.hist.percentiles((50.0, 99.0))
            self.progress(
                {
                    "t": tick,
                    "duration": self.r.duration_s,
                    "intended": self.profile.cumulative(tick) - self.profile.cumulative(i)
                    if not self.config.closed_loop
                    else None,
                    "offered": b.offered,
                    "ok": b.ok,
                    "busy": b.busy,
                    "errors": b.errors,
                    "p50_ms": ps[50.0] * 1e3,
                    "p99_ms": ps[99.0] * 1e3,
                    "outstanding": self.outstanding,
                    "in_flight": sum(len(c.pending) for c in self.conns),
                    "lag_ms": r.schedule_lag.max_s * 1e3,
                    "pool": self.sampler.latest if self.sampler is not None else None,
                }
            )
            tick += 1

    # -- the whole run -------------------------------------------------------------------

    async def run(self) -> LoadResult:
        """Connect, run the profile, drain, and count what never came back."""
        config = self.config
        first = await self._connect()
        duration = self.profile.duration
        self.result = self._new_result(first.welcome, first.cap)
        sampler = self.sampler
        if sampler is not None:
            await sampler.sample()  # the level before the first request
        self.cpu_before = cpustat.snapshot(dict(config.cpu_pids))
        cpu0 = time.process_time()
        self.t0 = trio.current_time() + 0.05
        self.end = self.t0 + duration
        self.result.started_at = time.time() + 0.05
        await self._drive()
        r = self.result
        r.cpu_s = time.process_time() - cpu0
        self.cpu_after = cpustat.snapshot(dict(config.cpu_pids))
        self._count_unanswered(r)
        r.elapsed_s = max(duration, self.last_reply - self.t0)
        if sampler is not None:
            if sampler.has_pool:
                await sampler.final_sample()  # the level after the last reply
            r.nonce_pool = sampler.series(self.t0)
        return r

    async def _connect(self) -> _Conn:
        """Open every connection and list the engine's keys over the first, which is
        returned; a failure closes those already open and propagates."""
        config = self.config
        first = await self.open_conn(0)
        self.conns = [first]
        try:
            reply = await _request(
                first, wire.ListKeys(first.codec.last_request_id + 1), config.connect_timeout
            )
            self.keys = list(reply.keys) if isinstance(reply, wire.Keys) else []
            for i in range(1, config.connections):
                self.conns.append(await self.open_conn(i))
        except BaseException:
            for c in self.conns:
                await trio.aclose_forcefully(c.stream)
            raise
        return first

    def _new_result(self, w: wire.Welcome, cap: int) -> LoadResult:
        """The result before the run: what the engine announced in WELCOME *w* (and the
        in-flight window *cap* it granted), nothing counted yet."""
        config = self.config
        duration = self.profile.duration
        return LoadResult(
            config=config,
            profile=self.profile,
            mode="closed-loop" if config.closed_loop else "open-loop",
            welcome={
                "server": w.server,
                "max_batch": w.max_batch,
                "max_in_flight": w.max_in_flight,
                "max_frame": w.max_frame,
                "compression": w.compression,
                "in_flight_per_connection": cap if cap < 1 << 30 else None,
            },
            keys=len(self.keys),
            payload_seconds=self.payloads.seconds,
            started_at=0.0,
            duration_s=duration,
            elapsed_s=duration,
            phase_ok=[0] * (len(self.phase_ends) + 1),
        )

    async def _drive(self) -> None:
        """The run proper, from t0: the connections' slots, the schedule (open loop) or
        the clock (closed loop), then the drain of outstanding replies."""
        config = self.config
        sampler = self.sampler
        async with trio.open_nursery() as nursery:
            for conn in self.conns:
                nursery.start_soon(self._slot, conn)
            if self.progress is not None:
                nursery.start_soon(self._report_progress)
            if sampler is not None and sampler.has_pool:
                nursery.start_soon(sampler.run, self.t0)
            if config.closed_loop:
                await trio.sleep_until(self.end)
            else:
                await trio.sleep_until(self.t0)
                await self._schedule()
                self.backlog_send.close()
            self.scheduling_done = True
            if self.outstanding == 0:
                self.idle.set()
            with trio.move_on_at(max(self.end, trio.current_time()) + config.drain_timeout):
                await self.idle.wait()
            self.stopping = True
            nursery.cancel_scope.cancel()

    def _count_unanswered(self, r: LoadResult) -> None:
        """After the drain, into *r*: requests still in the backlog were never sent, those
        still pending never answered (NO_REPLY)."""
        end_bucket = self._bucket(trio.current_time())
        while True:  # requests the engine never let us send
            try:
                self.backlog_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            r.not_sent_at_end += self.payloads.batch
        for conn in self.conns:
            for _ in conn.pending:
                self._error(end_bucket, "NO_REPLY", self.payloads.batch)
            conn.pending.clear()


def verify_samples(
    samples: Sequence[tuple[str, bytes, int]],
    payloads: Payloads,
    keys: Sequence[wire.KeyInfo],
) -> tuple[int, list[str]]:
    """Verify sampled (hc1, kid, pool item) against the DSCs of *keys*; returns the number
    that failed and the first few reasons."""
    from ..dcc.dsc import DSC
    from ..dcc.verify import verify_hc1

    dscs = []
    for k in keys:
        try:
            dscs.append(DSC.from_bytes(k.dsc))
        except ValueError:
            pass
    failed = 0
    reasons: list[str] = []
    for hc1, kid, item in samples:
        why = _check_one(verify_hc1(hc1, dscs), kid, payloads.dccs[item])
        if why:
            failed += 1
            if len(reasons) < 5:
                reasons.append(why)
    return failed, reasons


def _canonical(dcc: Any) -> str:
    # The engine NFC-normalises names; compare the content, not the code-point spelling.
    text = json.dumps(dcc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return unicodedata.normalize("NFC", text)


def _check_one(result: Any, kid: bytes, sent: dict[str, Any]) -> str | None:
    if not result.valid:
        steps = "; ".join(f"{e['step']}: {e['message']}" for e in result.errors)
        return f"not a valid signature ({steps or 'unknown'})"
    if result.kid != kid.hex():
        return f"signed by {result.kid}, but the reply said kid {kid.hex()}"
    if result.time_valid is False:
        return "not valid now (iat/exp)"
    if result.usage_valid is False:
        return "the DSC's key usage does not allow this DCC type"
    if _canonical(result.dcc) != _canonical(sent):
        return "the signed DCC differs from the DCC sent"
    return None


async def run_load(
    config: LoadConfig,
    payloads: Payloads | None = None,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> LoadResult:
    """Run one load test against the engine of *config* (see the module docstring).

    *payloads* default to :func:`payloads_for` the configuration (built before the
    clock starts). *progress*, if given, is called once a second with the last second's
    figures. Sampled HC1s are verified after the run (``result.verify``).

    Raises:
        LoadError: the engine cannot be reached or refuses the first connections, or the
            configuration does not fit it. Later connection losses are counted, not raised.
    """
    if payloads is None:
        payloads = payloads_for(config)
    run = _Run(config, payloads, progress)
    result = await run.run()
    started = time.perf_counter()
    failed, reasons = await trio.to_thread.run_sync(verify_samples, run.samples, payloads, run.keys)
    if failed:
        # Each failed sample was counted as signed: it was a wrong answer instead.
        result.ok -= failed
        result.errors_by_code["bad_signature"] = failed
    if run.cpu_before is not None and run.cpu_after is not None:
        # Per certificate signed OK (after verification): what the run was for.
        result.cpu = cpustat.delta(run.cpu_before, run.cpu_after, result.ok, sent=result.sent)
    result.verify = {
        "share": config.verify_sample,
        "candidates": run.sample_candidates,
        "verified": len(run.samples),
        "failed": failed,
        "reasons": reasons,
        "keys": len(run.keys),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return result
