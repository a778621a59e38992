"""A client and a server wire codec already through the handshake, for tests and benchmarks
that need frames encoded, checked and compressed exactly as on a real connection."""

from __future__ import annotations

from ..protocol import wire

__all__ = ["open_pair"]


def open_pair(
    *, max_batch: int = 64, max_in_flight: int = 4, server: str = "t"
) -> tuple[wire.Connection, wire.Connection]:
    """Return ``(client, server)`` codecs in state OPEN (default compression negotiated).

    The server's WELCOME offers *max_batch*, *max_in_flight* and the name *server*.
    """
    client_codec = wire.Connection(wire.CLIENT)
    server_codec = wire.Connection(wire.SERVER)
    server_codec.receive_data(client_codec.send(client_codec.make_hello()))
    server_codec.next_event()
    welcome = server_codec.make_welcome(
        max_batch=max_batch, max_in_flight=max_in_flight, server=server
    )
    client_codec.receive_data(server_codec.send(welcome))
    client_codec.next_event()
    return client_codec, server_codec
