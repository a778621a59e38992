"""Stand-ins for keyd in tests of the engine's own code (dispatcher, server)."""

import hashlib
import json
from array import array

import cbor2
import trio
import trio.lowlevel

from dccsign import native
from dccsign.bench.core import ephemeral_certificate
from dccsign.dcc.dsc import DSC
from dccsign.protocol.keyd import ColumnsResult, ItemError, KeydColumns
from dccsign.server.dispatch import Dispatcher
from dccsign.server.policy import PolicyFile, QuotaTracker


class FakeBatcher:
    """Answers every payload with "HC1:" + the UVCI inside it; records each call."""

    zlib_level = 9

    def __init__(self):
        self.calls = []
        #: When set to a trio.Event, every call waits for it (work that stays in progress).
        self.gate = None
        #: When true, issue_columns refuses every payload as keyd does a kid it no longer
        #: holds active (nothing signed).
        self.refuse = False

    async def issue(self, kid, protected, parts):
        if isinstance(parts, KeydColumns):  # what the dispatcher sends: its parts' view
            parts = list(parts.parts())
        self.calls.append([len(p.payloads) for p in parts])
        await trio.lowlevel.checkpoint()
        if self.gate is not None:
            await self.gate.wait()
        out = []
        for part in parts:
            for payload in part.payloads:
                dcc = cbor2.loads(payload)[-260][1]
                group = next(g for g in ("v", "t", "r") if g in dcc)
                out.append("HC1:" + dcc[group][0]["ci"])
        return out

    async def issue_columns(self, kid, protected, columns):
        """keyd's columns for *columns*: every payload "signed" with a fake 64-byte signature
        (the SHA-256 of the payload, twice), so that a reply body built from it decodes to
        the payload that was sent (see :func:`uvci_of_hc1`)."""
        payloads = columns.payload_list()
        if not self.refuse:  # calls: what was signed
            self.calls.append([len(p.payloads) for p in columns.parts()])
        await trio.lowlevel.checkpoint()
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse:
            return ColumnsResult.refuse_all(0, len(payloads), ItemError.KID_NOT_ACTIVE, "fake")
        sigs = [hashlib.sha256(p).digest() * 2 for p in payloads]
        ends = array("I", range(64, 64 * len(sigs) + 1, 64))
        return ColumnsResult(0, bytes(len(sigs)), b"".join(sigs), ends, ())

    async def issue_columns_many(self, batches):
        """issue_columns for each ``(kid, protected, columns)``, in turn; a KeydError is
        returned in its batch's place, as the real batcher does."""
        from dccsign.keyd.client import KeydError

        out = []
        for kid, protected, columns in batches:
            try:
                out.append(await self.issue_columns(kid, protected, columns))
            except KeydError as exc:
                out.append(exc)
        return out

    def submit_columns(self, batches, deliver):
        """issue_columns_many with no task of the caller's waiting: the outcomes go to
        ``deliver`` later, from a task of the fake's own, as the real batcher's do."""

        async def answer():
            deliver(await self.issue_columns_many(batches))

        trio.lowlevel.spawn_system_task(answer, name="fake batcher")

    @property
    def signed(self):
        """Payloads answered so far."""
        return sum(sum(call) for call in self.calls)


def dispatcher_for(tmp_path, batcher):
    """A Dispatcher over *batcher* with one key that signs every type (no EKU) and a policy
    of one client, "portal", without practical quotas."""
    _key, cert = ephemeral_certificate()
    policy = tmp_path / "policy.json"
    quota = {"per_hour": 10**9}
    policy.write_text(
        json.dumps({"clients": {"portal": {"quota": quota}}, "default_account_quota": quota})
    )
    return Dispatcher(batcher, [(DSC.from_certificate(cert), "active")], PolicyFile(policy),
                      QuotaTracker())  # fmt: skip


def uvci_of_hc1(hc1):
    """ "HC1:" + the UVCI of the DCC inside a real HC1 string (whatever its signature): what
    FakeBatcher.issue answers, so that both paths' results compare equal."""
    payload = native.sign1_decode(native.zlib_decompress(native.b45decode(hc1[4:]))).payload
    dcc = cbor2.loads(payload)[-260][1]
    group = next(g for g in ("v", "t", "r") if g in dcc)
    return "HC1:" + dcc[group][0]["ci"]
