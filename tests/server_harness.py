"""The engine's server in process, for tests: a real :class:`Server` and :class:`Dispatcher`
with keyd replaced by ``fakes.FakeBatcher`` (:class:`Engine`), and a client that follows the
protocol only as far as a test says (:class:`Raw`). :class:`Engine` listens on a Unix
socket (:meth:`Engine.start`) or serves a memory stream (:meth:`Engine.connect_memory`)."""

import json
import os

import trio
import trio.testing

from dccsign.bench.core import ephemeral_certificate
from dccsign.dcc.dsc import DSC
from dccsign.protocol import wire
from dccsign.server.dispatch import Dispatcher
from dccsign.server.metrics import Metrics
from dccsign.server.policy import PolicyFile, QuotaTracker
from dccsign.server.server import Limits, Peer, Server
from fakes import FakeBatcher

UID = os.getuid()
QUOTA = {"per_hour": 10**9}


class Engine:
    """A Server with a real Dispatcher over a fake keyd, listening on a Unix socket."""

    def __init__(self, tmp_path, policy=None, *, scan=None, walk=None, shared=None, **limits):
        self.policy_path = tmp_path / "policy.json"
        self.write_policy(
            policy
            or {
                "clients": {"portal": {"quota": QUOTA}},
                "unix_uids": {str(UID): "portal"},
                "default_account_quota": QUOTA,
            }
        )
        self.batcher = FakeBatcher()
        self.keys = [DSC.from_certificate(ephemeral_certificate()[1]) for _ in range(2)]
        self.dispatcher = Dispatcher(
            self.batcher,
            [(dsc, "active") for dsc in self.keys],
            PolicyFile(self.policy_path, interval_s=0),
            QuotaTracker(),
            shared=shared,
        )
        self.metrics = Metrics()
        self.server = Server(
            self.dispatcher,
            limits=Limits(**limits),
            metrics=self.metrics,
            scan=scan,
            walk=walk,
        )
        self.path = tmp_path / "engine.sock"
        self.streams = []  # the tests' client sockets, closed at the end of the test

    async def open(self):
        stream = await trio.open_unix_socket(str(self.path))
        self.streams.append(stream)
        return stream

    def write_policy(self, document):
        self.policy_path.write_text(json.dumps(document))

    async def start(self, nursery):
        await nursery.start(self.server.serve_unix, self.path)

    def connect_memory(self, nursery, peer=None):
        """A :class:`Raw` client on a memory stream that the server serves as a connection
        from *peer* (default: this process's uid, which the default policy knows)."""
        client_side, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(self.server.serve_stream, server_side, peer or Peer("unix", uid=UID))
        return Raw(client_side)

    def metric(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels) or 0


class Raw:
    """A client that follows the protocol only as far as the test says."""

    def __init__(self, stream, compression=("zstd",)):
        self.stream = stream
        self.codec = wire.Connection(wire.CLIENT, compression=compression)
        self.next_id = 1

    @classmethod
    async def connect(cls, engine, **kw):
        return cls(await engine.open(), **kw)

    async def send(self, event):
        await self.stream.send_all(self.codec.send(event))

    async def event(self, within=10):
        """The next event from the engine, or None at EOF."""
        with trio.fail_after(within):
            while (event := self.codec.next_event()) is wire.NEED_DATA:
                try:
                    data = await self.stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    data = b""
                self.codec.receive_data(data)
            return event

    async def hello(self):
        await self.send(self.codec.make_hello())
        welcome = await self.event()
        assert isinstance(welcome, wire.Welcome), welcome
        return welcome

    def rid(self):
        self.next_id += 1
        return self.next_id

    async def sign(self, items):
        await self.send(wire.SignBatch(request_id=self.rid(), items=tuple(items)))
        return await self.event()

    async def close(self):
        await self.stream.aclose()
