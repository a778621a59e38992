"""protocol/clients/tls_stream.py: TLS with OpenSSL on the socket, under trio's stream contract.

Every test runs a real loopback TCP connection with the development TLS material (a CA, a
server certificate for 127.0.0.1, a client certificate); the peer is this module's stream,
or trio's own ``SSLStream`` where interoperation is the point.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from dccsign.protocol.clients.tls_stream import TLSStream, open_tls_over_tcp
from dccsign.server.devtls import DEV_CLIENT_NAME, ensure_dev_tls


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_dev_tls(tmp_path_factory.mktemp("tls"))


def server_context(files: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca"]))
    ctx.load_cert_chain(str(files["server_cert"]), str(files["server_key"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(files: dict[str, Path], *, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(files["ca"]))
    if cert:
        ctx.load_cert_chain(str(files["client_cert"]), str(files["client_key"]))
    return ctx


class Pair:
    """A connected client stream and the server side's accepted TLSStream."""

    def __init__(self, client: trio.abc.Stream, server: TLSStream) -> None:
        self.client = client
        self.server = server


async def _listen() -> tuple[trio.SocketListener, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener, listener.socket.getsockname()[1]


@pytest.fixture
async def pair(tls_files: dict[str, Path]) -> AsyncIterator[Pair]:
    listener, port = await _listen()
    out: list[TLSStream] = []

    async def accept() -> None:
        stream = await listener.accept()
        tls = TLSStream.wrap(stream, server_context(tls_files), server_side=True)
        await tls.do_handshake()
        out.append(tls)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        client = await open_tls_over_tcp("127.0.0.1", port, client_context(tls_files))
    await listener.aclose()
    p = Pair(client, out[0])
    try:
        yield p
    finally:
        await trio.aclose_forcefully(p.client)
        await trio.aclose_forcefully(p.server)


async def receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(1 << 20)
        assert data, "the peer closed early"
        buf += data
    return bytes(buf)


async def test_bytes_both_ways_small_and_many_records(pair: Pair) -> None:
    small = b"hello"
    big = os.urandom(300_000)  # ~19 TLS records
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.client.send_all, small + big)
        got = await receive_exactly(pair.server, len(small) + len(big))
    assert got == small + big
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.server.send_all, big)
        assert await receive_exactly(pair.client, len(big)) == big


async def test_one_receive_returns_every_record_already_there(pair: Pair) -> None:
    data = os.urandom(40_000)  # three records
    await pair.server.send_all(data)
    await trio.sleep(0.2)  # all of it in the client's socket buffer
    assert await pair.client.receive_some(1 << 20) == data


async def test_receive_size_is_a_bound(pair: Pair) -> None:
    await pair.server.send_all(b"abcdefgh")
    await trio.sleep(0.05)
    assert await pair.client.receive_some(3) == b"abc"
    assert await pair.client.receive_some(100) == b"defgh"
    with pytest.raises(ValueError):
        await pair.client.receive_some(0)


async def test_peer_certificate(pair: Pair) -> None:
    cert = pair.server.getpeercert()
    assert cert is not None
    subject = dict(x[0] for x in cert["subject"])
    assert subject["commonName"] == DEV_CLIENT_NAME
    assert pair.server.version() in ("TLSv1.2", "TLSv1.3")


async def test_close_notify_is_end_of_stream_then_closed_errors(pair: Pair) -> None:
    await pair.client.aclose()
    assert await pair.server.receive_some() == b""
    await pair.client.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await pair.client.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await pair.client.receive_some()


async def test_eof_without_close_notify_is_broken(pair: Pair) -> None:
    # The client's TCP connection ends without TLS's close_notify (a truncation).
    client = pair.client
    assert isinstance(client, TLSStream)
    raw = client._sock  # under TLS, on purpose
    raw.shutdown(socket.SHUT_RDWR)
    with pytest.raises(trio.BrokenResourceError):
        await pair.server.receive_some()
    with pytest.raises(trio.BrokenResourceError):  # and it stays broken
        await pair.server.receive_some()


async def test_close_from_another_task_wakes_a_waiting_receive(pair: Pair) -> None:
    async with trio.open_nursery() as nursery:

        async def closer() -> None:
            await trio.sleep(0.05)
            await pair.server.aclose()

        nursery.start_soon(closer)
        with pytest.raises(trio.ClosedResourceError):
            await pair.server.receive_some()


async def test_concurrent_receives_or_sends_are_refused(pair: Pair) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.server.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await pair.server.receive_some()
        nursery.cancel_scope.cancel()
    # A send that blocks (the peer does not read) holds the send side.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.server.send_all, b"x" * 20_000_000)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await pair.server.send_all(b"y")
        with pytest.raises(trio.BusyResourceError):
            await pair.server.wait_send_all_might_not_block()
        nursery.cancel_scope.cancel()


async def test_a_send_cancelled_part_way_breaks_the_stream(pair: Pair) -> None:
    with trio.move_on_after(0.2) as scope:
        await pair.server.send_all(b"x" * 20_000_000)  # the client does not read
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await pair.server.send_all(b"more")
    with pytest.raises(trio.BrokenResourceError):  # the whole stream, as trio.SSLStream
        await pair.server.receive_some()


async def test_every_call_is_a_checkpoint(pair: Pair) -> None:
    await pair.client.send_all(b"data waiting")
    await trio.sleep(0.05)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await pair.server.receive_some()
        with pytest.raises(trio.Cancelled):
            await pair.server.send_all(b"x")
    # Nothing was consumed by the cancelled receive.
    assert await pair.server.receive_some() == b"data waiting"
    # Calls that complete at once still let other tasks run.
    with trio.testing.assert_checkpoints():
        await pair.server.send_all(b"y")
    with trio.testing.assert_checkpoints():
        await pair.client.receive_some()


async def test_handshake_refused_without_client_certificate(tls_files: dict[str, Path]) -> None:
    listener, port = await _listen()
    errors: list[BaseException] = []

    async def accept() -> None:
        stream = await listener.accept()
        tls = TLSStream.wrap(stream, server_context(tls_files), server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            errors.append(exc)
        finally:
            await tls.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        try:
            client = await open_tls_over_tcp(
                "127.0.0.1", port, client_context(tls_files, cert=False)
            )
        except trio.BrokenResourceError:
            pass  # TLS 1.2 fails here; TLS 1.3 on the first read
        else:
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some()
            await client.aclose()
    await listener.aclose()
    assert len(errors) == 1
    assert isinstance(errors[0].__cause__, ssl.SSLError)


async def test_wrong_server_name_fails_the_client(tls_files: dict[str, Path]) -> None:
    listener, port = await _listen()

    async def accept() -> None:
        stream = await listener.accept()
        tls = TLSStream.wrap(stream, server_context(tls_files), server_side=True)
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
        await tls.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        with pytest.raises(trio.BrokenResourceError) as info:
            await open_tls_over_tcp(
                "127.0.0.1", port, client_context(tls_files), server_hostname="elsewhere.test"
            )
    await listener.aclose()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_interoperates_with_trio_sslstream(tls_files: dict[str, Path]) -> None:
    listener, port = await _listen()
    payload = os.urandom(100_000)

    async def serve() -> None:
        stream = await listener.accept()
        tls = TLSStream.wrap(stream, server_context(tls_files), server_side=True)
        got = await receive_exactly(tls, len(payload))
        await tls.send_all(got[::-1])
        assert await tls.receive_some() == b""  # trio's aclose sends close_notify
        await tls.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=client_context(tls_files), https_compatible=False
        )
        await client.send_all(payload)
        assert await receive_exactly(client, len(payload)) == payload[::-1]
        await client.aclose()
    await listener.aclose()


async def test_the_implicit_handshake_of_the_first_call(tls_files: dict[str, Path]) -> None:
    listener, port = await _listen()

    async def serve() -> None:
        stream = await listener.accept()
        tls = TLSStream.wrap(stream, server_context(tls_files), server_side=True)
        assert tls.getpeercert() is None  # before the handshake
        assert await receive_exactly(tls, 2) == b"hi"  # handshakes first
        assert tls.getpeercert() is not None
        await tls.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = TLSStream.wrap(
            tcp, client_context(tls_files), server_side=False, server_hostname="127.0.0.1"
        )
        await client.send_all(b"hi")
        assert await client.receive_some() == b""
        await client.aclose()
    await listener.aclose()


async def test_send_nowait_sends_what_the_socket_takes_and_owes_the_rest(pair: Pair) -> None:
    """send_nowait: True and delivered when the socket has room; with a peer that does not
    read it fills the socket and says False -- and then the same bytes through send_all
    complete it: the peer reads every byte once, in order (OpenSSL's half-written record
    is continued, not repeated or dropped)."""
    small = os.urandom(3000)
    assert pair.server.send_nowait(small)
    assert await receive_exactly(pair.client, len(small)) == small
    chunk = os.urandom(256 * 1024)
    sent = []
    while pair.server.send_nowait(chunk):  # nobody reads: the socket fills up
        sent.append(chunk)
        assert len(sent) < 400, "a loopback socket never filled up"
    expected = b"".join(sent) + chunk  # the owed chunk goes next, whole

    async def read_all() -> bytes:
        return await receive_exactly(pair.client, len(expected))

    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await read_all())

        nursery.start_soon(reader)
        await pair.server.send_all(chunk)
    assert got == [expected]


async def test_send_nowait_never_sends_beside_a_send_in_progress_or_after_close(
    pair: Pair,
) -> None:
    data = os.urandom(1000)
    async with trio.open_nursery() as nursery:
        blocker = os.urandom(16 << 20)  # far more than the socket holds: send_all waits
        nursery.start_soon(pair.server.send_all, blocker)
        await trio.testing.wait_all_tasks_blocked()
        assert pair.server.send_nowait(data) is False  # nothing sent: send_all owns it
        assert await receive_exactly(pair.client, len(blocker)) == blocker
    await pair.server.aclose()
    assert pair.server.send_nowait(data) is False
