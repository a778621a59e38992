"""The blocking and the trio client against a scripted engine on a Unix socket: pipelining,
coalescing of concurrent single requests into batch frames, BUSY retries that honour
retry-after and reuse the idempotency key, and failure of everything in flight when the
connection goes."""

import itertools
import threading
import time

import pytest
import trio

from dccsign.protocol.clients.blocking import Client, ClientError
from dccsign.protocol.clients.coalesce import Coalescer
from dccsign.protocol.clients.trio_client import open_client
from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.wire import (
    NEED_DATA,
    SERVER,
    Connection,
    Error,
    GoAway,
    Hello,
    ItemResult,
    ListKeys,
    Ping,
    Pong,
    SignBatch,
    SignBatchResult,
    SignItem,
)

MAX_BATCH = 8


class FakeEngine:
    """Answers SIGN_BATCH with one result per item naming its account and idempotency key
    (so a test sees which key a retry carried); ``busy`` frames are refused with BUSY first;
    ``delay`` holds every reply; ``close_after`` frames, it drops the connection."""

    def __init__(self, *, busy=0, busy_items=False, delay=0.0, close_after=None, goaway=False):
        self.busy = busy
        self.goaway = goaway  # after the first reply, GOAWAY (the connection stays open)
        self.busy_items = busy_items
        self.delay = delay
        self.close_after = close_after
        self.frames: list[tuple[float, list[SignItem]]] = []

    async def handle(self, stream):
        conn = Connection(SERVER)
        async with stream:
            try:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(1 << 16))
                        continue
                    if event is None:
                        return
                    if isinstance(event, Hello):
                        welcome = conn.make_welcome(
                            max_batch=MAX_BATCH, max_in_flight=64, server="fake"
                        )
                        await stream.send_all(conn.send(welcome))
                    elif isinstance(event, Ping):
                        await stream.send_all(conn.send(Pong(event.request_id, event.data)))
                    elif isinstance(event, SignBatch):
                        self.frames.append((time.monotonic(), list(event.items)))
                        if self.close_after is not None and len(self.frames) > self.close_after:
                            return
                        await trio.sleep(self.delay)
                        await stream.send_all(conn.send(self.reply(event)))
                        if self.goaway:
                            await stream.send_all(conn.send(GoAway(event.request_id, "drain")))
                    elif isinstance(event, ListKeys):
                        await stream.send_all(
                            conn.send(Error(event.request_id, ErrorCode.INTERNAL, "no keys"))
                        )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def reply(self, event):
        if self.busy > 0:
            self.busy -= 1
            if not self.busy_items:
                return Error(event.request_id, ErrorCode.BUSY, "busy", retry_after_ms=60)
            busy = ItemResult(error=ErrorCode.BUSY, message="busy", retry_after_ms=60)
            return SignBatchResult(event.request_id, (busy,) * len(event.items))
        return SignBatchResult(
            event.request_id,
            tuple(
                ItemResult(hc1=f"HC1:{i.account}:{_hex(i.idempotency_key)}", kid=b"k" * 8)
                for i in event.items
            ),
        )


def _hex(key):
    return (key.encode() if isinstance(key, str) else key).hex()


async def _serve(engine, path, task_status=trio.TASK_STATUS_IGNORED):
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(64)
    await trio.serve_listeners(engine.handle, [trio.SocketListener(sock)], task_status=task_status)


@pytest.fixture
def threaded_engine(tmp_path):
    """Run a FakeEngine in its own thread (for the blocking client); yields a factory."""
    started = []

    def start(**kw):
        engine = FakeEngine(**kw)
        path = tmp_path / f"e{len(started)}.sock"
        ready = threading.Event()
        token: list = []

        async def main():
            token.append(trio.lowlevel.current_trio_token())
            async with trio.open_nursery() as nursery:
                token.append(nursery.cancel_scope)
                await nursery.start(_serve, engine, path)
                ready.set()

        thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        thread.start()
        assert ready.wait(5)
        started.append((thread, token))
        return engine, f"unix:{path}"

    yield start
    for thread, (trio_token, scope) in started:
        trio.from_thread.run_sync(scope.cancel, trio_token=trio_token)
        thread.join(5)


DCC = {"ver": "1.3.0"}  # the fake engine does not look inside


# ----------------------------------------------------------------------------- the rule


def test_coalescer_rule():
    c = Coalescer(window=0.5, max_batch=3, max_in_flight=1)
    assert c.due(0.0) is None
    c.add("a", 0.0)
    assert c.due(0.0) == 0.0  # nothing outstanding: go now
    assert c.take() == ["a"] and c.in_flight == 1
    c.add("b", 1.0)
    assert c.due(1.0) == 1.5  # one frame outstanding: wait at most the window
    c.add("c", 1.1)
    c.add("d", 1.2)
    assert c.due(1.2) == 1.2  # max_batch queued: go now
    assert c.take() == ["b", "c", "d"] and c.in_flight == 2
    c.answered()
    c.answered()
    c.answered()
    assert c.in_flight == 0
    with pytest.raises(ValueError):
        Coalescer(window=-1)
    with pytest.raises(ValueError):
        Coalescer(max_batch=0)


# ----------------------------------------------------------------------------- blocking


def test_blocking_client_coalesces_concurrent_signs(threaded_engine):
    engine, address = threaded_engine(delay=0.02)
    results = {}
    with Client(address, coalesce_window=0.005) as client:

        def one(n):
            results[n] = client.sign(DCC, account=f"acct-{n}")

        threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(results) == list(range(40))
    for n, result in results.items():
        assert result.ok and result.hc1.startswith(f"HC1:acct-{n}:")
    sizes = [len(items) for _, items in engine.frames]
    assert sum(sizes) == 40 and len(sizes) < 20 and max(sizes) <= MAX_BATCH


def test_blocking_client_lone_sign_does_not_wait_for_the_window(threaded_engine):
    engine, address = threaded_engine()
    with Client(address, coalesce_window=5.0) as client:
        start = time.monotonic()
        assert client.sign(DCC, account="a").ok
        assert client.sign(DCC, account="b").ok
        assert time.monotonic() - start < 2.0  # not two windows of 5 s
    assert [len(items) for _, items in engine.frames] == [1, 1]


@pytest.mark.parametrize("busy_items", [False, True], ids=["busy-frame", "busy-items"])
def test_blocking_client_retries_busy_after_the_hint_with_the_same_key(threaded_engine, busy_items):
    engine, address = threaded_engine(busy=2, busy_items=busy_items)
    with Client(address) as client:
        result = client.sign(DCC, account="a", idempotency_key=b"first-try")
        batch = client.sign_batch([SignItem(DCC, "b"), SignItem(DCC, "c")])
    assert result.ok and result.hc1 == f"HC1:a:{b'first-try'.hex()}"
    assert all(r.ok for r in batch)
    # The single was refused twice, then went through: three frames, one key, spaced by at
    # least the 60 ms hint.
    single = [(t, items) for t, items in engine.frames if items[0].account == "a"]
    assert len(single) == 3
    assert {items[0].idempotency_key for _, items in single} == {b"first-try"}
    assert all(b - a >= 0.055 for (a, _), (b, _) in itertools.pairwise(single))
    # The batch items got distinct random keys.
    assert batch[0].hc1.split(":")[2] != batch[1].hc1.split(":")[2]


def test_blocking_client_gives_up_after_its_retries(threaded_engine):
    engine, address = threaded_engine(busy=10)
    with Client(address, retries=2) as client:
        result = client.sign(DCC, account="a")
    assert result.error == ErrorCode.BUSY and result.retry_after_ms == 60
    assert len(engine.frames) == 3


def test_blocking_client_fails_waiters_when_the_connection_drops(threaded_engine):
    _engine, address = threaded_engine(close_after=0)
    with Client(address) as client:
        with pytest.raises(ClientError, match="closed"):
            client.sign(DCC, account="a")
        with pytest.raises(ClientError):
            client.sign(DCC, account="b")


# ----------------------------------------------------------------------------- trio


@pytest.fixture
async def trio_engine(nursery, tmp_path):
    def start(**kw):
        engine = FakeEngine(**kw)
        path = tmp_path / f"t{id(engine)}.sock"
        return engine, path

    async def started(**kw):
        engine, path = start(**kw)
        await nursery.start(_serve, engine, path)
        return engine, f"unix:{path}"

    return started


async def test_trio_client_coalesces_concurrent_signs(trio_engine):
    engine, address = await trio_engine(delay=0.02)
    results = {}
    async with open_client(address, coalesce_window=0.005) as client:
        assert await client.ping(b"x") >= 0

        async def one(n):
            results[n] = await client.sign(DCC, account=f"acct-{n}")

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(one, n)
    for n, result in results.items():
        assert result.ok and result.hc1.startswith(f"HC1:acct-{n}:")
    sizes = [len(items) for _, items in engine.frames]
    assert len(results) == 40 and sum(sizes) == 40
    assert len(sizes) < 20 and max(sizes) <= MAX_BATCH


async def test_trio_client_batch_is_split_pipelined_and_retried(trio_engine):
    engine, address = await trio_engine(busy=1, delay=0.01)
    items = [SignItem(DCC, f"acct-{n}", idempotency_key=f"k{n}") for n in range(20)]
    async with open_client(address) as client:
        results = await client.sign_batch(items)
    assert [r.hc1 for r in results] == [f"HC1:acct-{n}:{f'k{n}'.encode().hex()}" for n in range(20)]
    # 20 items in frames of at most 8; the first frame was BUSY and its items retried.
    assert all(len(items) <= MAX_BATCH for _, items in engine.frames)
    assert sum(len(items) for _, items in engine.frames) == 20 + len(engine.frames[0][1])


async def test_trio_client_errors(trio_engine):
    _engine, address = await trio_engine(close_after=0)
    async with open_client(address) as client:
        with pytest.raises(ClientError, match="no keys"):
            await client.list_keys()
        with pytest.raises(ClientError, match="closed"):
            await client.sign(DCC, account="a")
    with pytest.raises(ClientError, match="cannot connect"):
        async with open_client("unix:/nonexistent/socket"):
            pass


def test_blocking_client_after_goaway_raises_client_error_shutting_down(threaded_engine):
    _engine, address = threaded_engine(goaway=True)
    with Client(address) as client:
        assert client.sign_batch([SignItem(DCC, "a")])[0].ok
        time.sleep(0.2)  # the GOAWAY after the reply has arrived
        with pytest.raises(ClientError, match="draining") as caught:
            client.sign_batch([SignItem(DCC, "a")])
    assert caught.value.code == ErrorCode.SHUTTING_DOWN


async def test_trio_client_after_goaway_raises_client_error_shutting_down(trio_engine):
    _engine, address = await trio_engine(goaway=True)
    async with open_client(address) as client:
        assert (await client.sign_batch([SignItem(DCC, "a")]))[0].ok
        await trio.sleep(0.2)
        with pytest.raises(ClientError, match="draining") as caught:
            await client.sign_batch([SignItem(DCC, "a")])
    assert caught.value.code == ErrorCode.SHUTTING_DOWN


def test_blocking_client_request_ids_rise_under_concurrency(threaded_engine):
    # The codec refuses a request id that is not above the previous one; many threads
    # sending at once must never put ids on the wire out of order.
    engine, address = threaded_engine()
    out = []
    with Client(address) as client:
        threads = [
            threading.Thread(
                target=lambda n=n: out.append(client.sign_batch([SignItem(DCC, f"a{n}")] * 3))
            )
            for n in range(30)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert len(out) == 30 and all(r.ok for batch in out for r in batch)
    assert len(engine.frames) == 30


def test_blocking_client_close_waits_for_its_reader(threaded_engine):
    """close() returns only once the reader thread is out of recv(): a descriptor closed under
    a reader can be reused at once by the caller's next open(), and the reader's next read
    (OpenSSL keeps the bare number) would consume that file's bytes."""
    _engine, address = threaded_engine()
    for _ in range(20):
        client = Client(address)
        assert client._reader.is_alive()
        client.close()
        assert not client._reader.is_alive()


class _OneAtATime:
    """A socket that records whether two threads were ever inside it at once: the rule
    OpenSSL sets for SSL_read and SSL_write on one connection (see clients/duplex.py)."""

    def __init__(self, sock):
        self._sock = sock
        self._guard = threading.Lock()
        self._inside = 0
        self.overlaps = 0
        self.calls = 0

    def _call(self, method, *args):
        with self._guard:
            self._inside += 1
            self.calls += 1
            self.overlaps += self._inside > 1
        try:
            return method(*args)
        finally:
            with self._guard:
                self._inside -= 1

    def recv(self, n):
        return self._call(self._sock.recv, n)

    def send(self, data):
        return self._call(self._sock.send, data)

    def sendall(self, data):
        return self._call(self._sock.sendall, data)

    def __getattr__(self, name):  # settimeout, fileno, shutdown, close
        return getattr(self._sock, name)


def test_blocking_client_never_reads_and_writes_its_socket_at_once(threaded_engine, monkeypatch):
    # A reader thread blocked in recv() while a sender writes is two threads inside one
    # OpenSSL connection: undefined, and seen as a HELLO that never arrived. The client's
    # socket calls must take turns, with many threads signing while replies stream in.
    from dccsign.protocol.clients import blocking

    _engine, address = threaded_engine(delay=0.001)
    sockets = []
    real_connect = blocking._connect

    def connect(*args):
        sockets.append(_OneAtATime(real_connect(*args)))
        return sockets[-1]

    monkeypatch.setattr(blocking, "_connect", connect)
    out = []
    with Client(address, coalesce_window=None) as client:
        threads = [
            threading.Thread(
                target=lambda n=n: out.extend(
                    client.sign_batch([SignItem(DCC, f"a{n}-{k}")])[0] for k in range(10)
                )
            )
            for n in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(out) == 80 and all(r.ok for r in out)
    assert sockets[0].calls > 80  # every frame went through the wrapper
    assert sockets[0].overlaps == 0
