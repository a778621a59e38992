"""engine/dispatch.py: a request's items in, one result per item out (fake keyd batcher)."""

import trio
import trio.lowlevel

from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.wire import SignItem
from dccsign.samples import varied_samples
from fakes import FakeBatcher, dispatcher_for


def _uvci(dcc):
    return next(dcc[g][0]["ci"] for g in ("v", "t", "r") if g in dcc)


def test_every_item_gets_its_own_result_in_order(tmp_path):
    """One keyd call for the request's valid items (one kid); an invalid DCC in the middle is
    refused by itself, and every other item gets the certificate of its own DCC."""
    batcher = FakeBatcher()
    d = dispatcher_for(tmp_path, batcher)
    items = [SignItem(dcc, f"uzi:{i % 7}") for i, dcc in enumerate(varied_samples(100))]
    items[40] = SignItem({"ver": "1.3.0"}, "uzi:1")
    types = [""] * len(items)

    async def main():
        return await d.sign("portal", items, types)

    results = trio.run(main)
    assert len(batcher.calls) == 1 and sum(batcher.calls[0]) == 99
    assert len(batcher.calls[0]) == 7  # one part per account
    for i, (item, result) in enumerate(zip(items, results, strict=True)):
        if i == 40:
            assert result.error == ErrorCode.INVALID_DCC and types[i] == ""
        else:
            assert result.ok and result.hc1 == "HC1:" + _uvci(item.dcc)
            assert types[i] in ("v", "t", "r")


def test_one_account_is_one_part(tmp_path):
    batcher = FakeBatcher()
    d = dispatcher_for(tmp_path, batcher)
    items = [SignItem(dcc, "uzi:1") for dcc in varied_samples(32)]

    async def main():
        return await d.sign("portal", items)

    results = trio.run(main)
    assert batcher.calls == [[32]]
    assert [r.hc1 for r in results] == ["HC1:" + _uvci(i.dcc) for i in items]
