"""Stand-ins for keyd in tests of the engine's own code (dispatcher, server)."""

import json

import cbor2
import trio
import trio.lowlevel

from dccsign.benchcore import ephemeral_certificate
from dccsign.dispatch import Dispatcher
from dccsign.dsc import DSC
from dccsign.policy import PolicyFile, QuotaTracker
from dccsign.protocol.keyd import KeydColumns


class FakeBatcher:
    """Answers every payload with "HC1:" + the UVCI inside it; records each call."""

    zlib_level = 9

    def __init__(self):
        self.calls = []
        #: When set to a trio.Event, every call waits for it (work that stays in progress).
        self.gate = None

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
