"""keyd checks the content of every DCC by default, and refuses payloads too long for a QR
code: what a compromised engine that talks to keyd directly can (not) get signed."""

import signal
import subprocess
import sys
import time
from hashlib import sha256
from pathlib import Path

import cbor2
import pytest
import trio

from conftest import kid_for
from dccsign.audit.key import AuditKey
from dccsign.audit.search import search
from dccsign.audit.verify import verify
from dccsign.audit.writer import AuditLog
from dccsign.cli.main import build_parser
from dccsign.dcc.issuer import MAX_HC1_CHARS, claims_prefix, max_payload
from dccsign.keyd.client import KeydClient
from dccsign.keyd.service import Keyd
from dccsign.keyd.supervisor import PrivateKeyd
from dccsign.keys.keystore import Keystore, resolve_passphrase
from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.keyd import ItemError, SignPayloads
from dccsign.protocol.wire import SignItem
from dccsign.testing.samples import sample
from engine_process import EngineProcess, wait_serving


def _payload(dcc, iss="NL"):
    now = int(time.time())
    return claims_prefix(iss, now - 3600, now + 86400) + cbor2.dumps(dcc)


def minimal():
    """(i) valid claims around a DCC that is nothing but a UVCI."""
    return {"v": [{"ci": "x"}]}


def bogus_codes():
    """(ii) a complete, schema-shaped DCC with made-up names and value-set codes."""
    d = sample("v")
    return {
        **d,
        "nam": {"fn": "Fake", "fnt": "FAKE", "gn": "Person", "gnt": "PERSON"},
        "v": [
            {
                **d["v"][0],
                "tg": "999999999",
                "vp": "BOGUS",
                "mp": "EU/1/99/9999",
                "ma": "ORG-000000000",
            }
        ],
    }


def huge():
    """(iii) a ~60 kB DCC: no QR code can hold its HC1 string."""
    d = sample("v")
    return {**d, "nam": {**d["nam"], "fn": "A" * 60_000}}


def start_keyd(keystore, sock, *flags):
    with open(sock.with_suffix(".log"), "ab") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "dccsign", "keyd", "--keystore", str(keystore)),
                *("--socket", str(sock), "--nonce-pool", "0", *flags),
            ],
            stderr=log,
        )
    wait_serving(proc, sock, sock.with_suffix(".log"), 20)
    return proc


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def _segments_text(directory):
    return "".join(p.read_text() for p in sorted(Path(directory).glob("segment-*.log")))


def test_a_compromised_engine_gets_only_the_honest_payload_signed(dev_keystore_copy, tmp_path):
    store = Keystore.open(dev_keystore_copy)
    kid = kid_for(store, "v")
    honest = _payload(sample("v"))
    bad = [_payload(minimal()), _payload(bogus_codes()), _payload(huge())]
    assert len(bad[2]) > 60_000
    sock = tmp_path / "keyd.sock"
    proc = start_keyd(dev_keystore_copy, sock)  # the defaults of `dccsign keyd`
    try:
        with KeydClient(sock) as client:
            out = client.sign(kid, [bad[0], honest, bad[1], bad[2]], client="e", account="a")
    finally:
        _stop(proc)
    assert isinstance(out[1], bytes)
    signed = [
        name
        for name, r in zip(("(i)", "", "(ii)", "(iii)"), out, strict=True)
        if name and isinstance(r, bytes)
    ]
    assert not signed, f"keyd signed {signed}"
    (c0, m0), (c2, m2), (c3, m3) = out[0], out[2], out[3]
    assert c0 == ItemError.INVALID_DCC and "$.ver" in m0
    assert c2 == ItemError.INVALID_DCC and "$.v[0].tg" in m2 and "value set" in m2
    assert c3 == ItemError.TOO_LARGE_FOR_QR
    assert f"{len(bad[2])} bytes; at most {max_payload(-7)} fit a QR code" in m3
    audit = dev_keystore_copy / "audit"
    assert verify(audit).ok
    records = list(search(audit))
    assert [r["payload_sha256"] for r in records] == [sha256(honest).hexdigest()]
    text = _segments_text(audit)
    assert not any(sha256(p).hexdigest() in text for p in bad)


def test_no_validate_dcc_is_the_explicit_opt_out_and_the_size_bound_stays(
    dev_keystore_copy, tmp_path
):
    store = Keystore.open(dev_keystore_copy)
    kid = kid_for(store, "v")
    sock = tmp_path / "keyd.sock"
    proc = start_keyd(dev_keystore_copy, sock, "--no-validate-dcc")
    try:
        with KeydClient(sock) as client:
            payloads = [_payload(minimal()), _payload(bogus_codes()), _payload(huge())]
            out = client.sign(kid, payloads, client="e", account="a")
    finally:
        _stop(proc)
    assert isinstance(out[0], bytes) and isinstance(out[1], bytes)
    assert out[2][0] == ItemError.TOO_LARGE_FOR_QR
    # The old flag still starts keyd (it is the default now).
    sock2 = tmp_path / "keyd2.sock"
    proc = start_keyd(dev_keystore_copy, sock2, "--validate-dcc")
    try:
        with KeydClient(sock2) as client:
            out = client.sign(kid, [_payload(minimal())], client="e", account="a")
    finally:
        _stop(proc)
    assert out[0][0] == ItemError.INVALID_DCC


@pytest.mark.parametrize("alg", [-7, -37])
def test_the_size_bound_is_exactly_the_engines(dev_keystore_copy, tmp_path, alg):
    """keyd refuses one byte more than chain.max_payload, the bound the issuer and the
    engine use; the largest payload it accepts still fits a QR code."""
    store = Keystore.open(dev_keystore_copy)
    pw = resolve_passphrase(store.directory)
    key = AuditKey.create(tmp_path / "audit-key.pem", pw)
    entry = next(e for e in store.entries if e.dsc.alg == alg and "v" in e.dsc.usages)
    limit = max_payload(entry.dsc.alg)

    def sized(n):
        d = sample("v")
        base = len(_payload({**d, "nam": {**d["nam"], "fn": "A" * 300}}))
        p = _payload({**d, "nam": {**d["nam"], "fn": "A" * (300 + n - base)}})
        assert len(p) == n
        return p

    with AuditLog.open(tmp_path / "audit", key) as log:
        keyd = Keyd(store.directory, pw, log, validate_dcc=False)
        try:
            fits, over = sized(limit), sized(limit + 1)
            out = keyd.sign(SignPayloads(1, entry.kid, "e", "a", (fits, over))).results
        finally:
            keyd.close()
    assert isinstance(out[0], bytes)
    assert out[1][0] == ItemError.TOO_LARGE_FOR_QR
    from dccsign import native

    protected = native.protected_header(entry.dsc.alg, entry.kid)
    (hc1,) = native.hc1_encode(protected, [fits], [out[0]])
    assert len(hc1) <= MAX_HC1_CHARS


def test_keyd_and_private_keyd_validate_by_default(dev_keystore_copy, tmp_path):
    store = Keystore.open(dev_keystore_copy)
    kid = kid_for(store, "v")
    pw = resolve_passphrase(store.directory)
    key = AuditKey.create(tmp_path / "audit-key.pem", pw)
    with AuditLog.open(tmp_path / "audit", key) as log:
        keyd = Keyd(store.directory, pw, log)
        try:
            out = keyd.sign(SignPayloads(1, kid, "e", "a", (_payload(minimal()),))).results
        finally:
            keyd.close()
    assert out[0][0] == ItemError.INVALID_DCC
    # What `dccsign serve` and `dccsign sign` start: PrivateKeyd with its defaults.
    with PrivateKeyd(store.directory, nonce_pool=0) as keyd, keyd.client() as client:
        payloads = [_payload(minimal()), _payload(sample("v"))]
        out = client.sign(kid, payloads, client="e", account="a")
    assert out[0][0] == ItemError.INVALID_DCC and isinstance(out[1], bytes)
    with (
        PrivateKeyd(store.directory, nonce_pool=0, validate_dcc=False) as keyd,
        keyd.client() as client,
    ):
        out = client.sign(kid, [_payload(minimal())], client="e", account="a")
    assert isinstance(out[0], bytes)


def test_cli_options():
    parser = build_parser()
    keyd = ["keyd", "--keystore", "k", "--socket", "s"]
    assert parser.parse_args(keyd).validate_dcc is True
    assert parser.parse_args([*keyd, "--no-validate-dcc"]).validate_dcc is False
    assert parser.parse_args([*keyd, "--validate-dcc"]).validate_dcc is True
    serve = parser.parse_args(["serve", "--keystore", "k"])
    assert serve.keyd_no_validate_dcc is False and serve.audit_dir is None
    serve = parser.parse_args(
        ["serve", "--keystore", "k", "--keyd-no-validate-dcc", "--audit-dir", "/a"]
    )
    assert serve.keyd_no_validate_dcc is True and serve.audit_dir == Path("/a")


def test_dispatch_reports_keyds_size_refusal_as_too_large_for_qr(tmp_path):
    from fakes import dispatcher_for

    class Refusing:
        zlib_level = 9

        async def issue(self, kid, protected, parts):
            codes = [ItemError.TOO_LARGE_FOR_QR, ItemError.INVALID_DCC]
            return [(codes[i % 2], "no") for i in range(len(parts))]  # KeydColumns: items

    d = dispatcher_for(tmp_path, Refusing())
    items = [SignItem(sample("v"), "uzi:1"), SignItem(sample("v"), "uzi:1")]
    results = trio.run(d.sign, "portal", items, [""] * 2)
    assert results[0].error == ErrorCode.TOO_LARGE_FOR_QR
    assert results[1].error == ErrorCode.KEYD_REFUSED


def _engine_keyd_socket(engine):
    """The socket of the engine's own keyd (from its command line in /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == engine.proc.pid and "keyd" in argv:
            return argv[argv.index("--socket") + 1], argv
    raise AssertionError("no keyd child")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--keyd-no-validate-dcc",)])
def test_serves_keyd_checks_content_unless_told_not_to(dev_keystore_copy, tmp_path, flags):
    """A compromised engine process (here: the test, on the engine's keyd socket)."""
    engine = EngineProcess(dev_keystore_copy, tmp_path, tcp=False, extra=flags)
    try:
        sock, argv = _engine_keyd_socket(engine)
        kid = kid_for(Keystore.open(dev_keystore_copy), "v")
        with KeydClient(sock) as client:
            out = client.sign(kid, [_payload(minimal()), _payload(huge())], client="x", account="y")
        with engine.client() as c:
            assert c.sign(sample("v"), account="uzi:1").ok
    finally:
        assert engine.stop() == 0
    if flags:
        assert "--no-validate-dcc" in argv and isinstance(out[0], bytes)
    else:
        assert "--no-validate-dcc" not in argv
        assert not isinstance(out[0], bytes) and out[0][0] == ItemError.INVALID_DCC
    assert not isinstance(out[1], bytes) and out[1][0] == ItemError.TOO_LARGE_FOR_QR


def test_serve_help_says_what_the_opt_out_costs_and_risks():
    done = subprocess.run(
        [sys.executable, "-m", "dccsign", "serve", "--help"], capture_output=True, text=True
    )
    text = " ".join(done.stdout.split())
    assert "--keyd-no-validate-dcc" in text and "--audit-dir" in text
    assert "verifiers would accept them as valid" in text
    done = subprocess.run(
        [sys.executable, "-m", "dccsign", "keyd", "--help"], capture_output=True, text=True
    )
    text = " ".join(done.stdout.split())
    assert "--no-validate-dcc" in text and "--validate-dcc " not in text
