"""The engine's view of keyd's keys (``dccsign.server.engine.Engine._take_keys``): DESCRIBE
runs four times a second, so an unchanged key list must cost nothing, and a change must still
reach the dispatcher at once."""

from __future__ import annotations

from dccsign.dcc.dsc import DSC
from dccsign.keys.keystore import Keystore
from dccsign.protocol.keyd import KeyFacts
from dccsign.server import engine as serve_cli
from engine_process import write_policy


class _Dispatcher:
    def __init__(self):
        self.calls = []

    def set_keys(self, keys):
        self.calls.append(list(keys))


def _infos(keystore, state_of):
    return [
        KeyFacts(e.dsc.kid, e.dsc.alg, tuple(sorted(e.dsc.usages)), state_of(e), e.dsc.der)
        for e in Keystore.open(keystore).entries
        if e.dsc is not None
    ]


def test_unchanged_keys_are_not_parsed_or_handed_over_again(dev_keystore, tmp_path, monkeypatch):
    write_policy(tmp_path / "policy.json")
    engine = serve_cli.Engine(dev_keystore, tmp_path / "policy.json")
    active = _infos(dev_keystore, lambda e: "active")
    again = _infos(dev_keystore, lambda e: "active")
    assert len(active) >= 2
    gone = active[0].kid
    disabled = _infos(dev_keystore, lambda e: "disabled" if e.dsc.kid == gone else "active")
    parsed = []
    real = DSC.from_bytes

    def counting(der):
        parsed.append(der)
        return real(der)

    monkeypatch.setattr(serve_cli.DSC, "from_bytes", staticmethod(counting))
    dispatcher = _Dispatcher()
    engine._take_keys(dispatcher, active)
    assert len(dispatcher.calls) == 1 and len(parsed) == len(active)
    first = dispatcher.calls[0]
    assert [(d.der, s) for d, s in first] == [(k.dsc, "active") for k in active]

    for _ in range(3):  # the same DESCRIBE again: nothing to do
        engine._take_keys(dispatcher, again)
    assert len(dispatcher.calls) == 1 and len(parsed) == len(active)

    # An emergency stop of one key reaches the dispatcher on the next poll, without
    # parsing the DSCs it already knows.
    engine._take_keys(dispatcher, disabled)
    assert len(dispatcher.calls) == 2 and len(parsed) == len(active)
    states = {d.kid: s for d, s in dispatcher.calls[1]}
    assert states[gone] == "disabled"
    assert all(s == "active" for kid, s in states.items() if kid != gone)

    # A key keyd no longer reports is dropped, and its DSC forgotten.
    engine._take_keys(dispatcher, disabled[1:])
    assert [d.kid for d, _s in dispatcher.calls[2]] == [k.kid for k in disabled[1:]]
    assert gone not in {real(der).kid for der in engine._dscs}
