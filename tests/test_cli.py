"""The dccsign command line: forms, outputs and exit codes."""

import json

import pytest

from dccsign.cli.main import main
from dccsign.dcc.qr import make_qr
from dccsign.testing.samples import sample


def run(capsysbinary, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io
        import sys

        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode()), "utf-8"))
    code = main([str(a) for a in argv])
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


@pytest.fixture
def ks(dev_keystore_copy):
    return dev_keystore_copy


def test_keys_list_and_export(ks, capsysbinary):
    code, out, _ = run(capsysbinary, "keys", "list", "--keystore", ks, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["alg"] for r in rows] == ["ES256", "ES256", "ES256", "PS256"]
    assert rows[0]["usages"] == ["vaccination"] and rows[3]["restricted"] is False
    code, out, _ = run(capsysbinary, "keys", "list", "--keystore", ks)
    assert code == 0 and rows[0]["kid"].encode() in out
    code, pem, _ = run(
        capsysbinary, "keys", "export-cert", "--keystore", ks, "--kid", rows[0]["kid"]
    )
    assert code == 0 and pem.startswith(b"-----BEGIN CERTIFICATE-----")
    code, der, _ = run(
        capsysbinary, "keys", "export-cert", "--keystore", ks, "--kid", rows[0]["kid"], "--der"
    )
    assert code == 0 and der[0] == 0x30
    code, _, err = run(capsysbinary, "keys", "export-cert", "--keystore", ks, "--kid", "00" * 8)
    assert code == 4 and "no key with kid" in err


def test_init_dev(tmp_path, capsysbinary):
    code, out, _ = run(
        capsysbinary, "keys", "init-dev", "--keystore", tmp_path / "k", "--country", "BE"
    )
    assert code == 0 and b"dev-passphrase" in out
    code, _, err = run(capsysbinary, "keys", "init-dev", "--keystore", tmp_path / "k")
    assert code == 4 and "not empty" in err


@pytest.mark.parametrize("form", ["object", "array", "lines"])
def test_sign_input_forms_and_verify(ks, tmp_path, capsysbinary, form):
    dccs = [sample("v"), sample("t"), sample("r")]
    text = {
        "object": json.dumps(dccs[0], indent=2),
        "array": json.dumps(dccs),
        "lines": "\n".join(json.dumps(d) for d in dccs) + "\n",
    }[form]
    f = tmp_path / "in.json"
    f.write_text(text, encoding="utf-8")
    code, out, err = run(capsysbinary, "sign", "--keystore", ks, "--validity-days", "2", f)
    assert code == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == (1 if form == "object" else 3)
    # Signed through a private keyd: every certificate is in the keystore's audit log.
    from dccsign.audit.search import search
    from dccsign.audit.verify import verify

    records = list(search(ks / "audit"))
    assert len(records) == len(lines) and verify(ks / "audit").ok
    assert {r["account"] for r in records} == {f"os-user:{__import__('getpass').getuser()}"}
    for line, dcc in zip(lines, dccs, strict=False):
        code, out, _ = run(capsysbinary, "verify", "--keystore", ks, line)
        result = json.loads(out)
        assert code == 0 and result["valid"] and result["time_valid"] and result["dcc"] == dcc
        assert result["exp"] - result["iat"] == 2 * 86400


def test_sign_stdin_qr_and_verify_with_cert(ks, tmp_path, capsysbinary, monkeypatch):
    qr = tmp_path / "code.svg"
    code, out, err = run(
        capsysbinary,
        "sign",
        "--keystore",
        ks,
        "--qr",
        qr,
        "-",
        stdin=json.dumps(sample("r")),
        monkeypatch=monkeypatch,
    )
    assert code == 0, err
    hc1 = out.decode().strip("\n")
    assert qr.read_text().startswith("<?xml")
    q = make_qr(hc1)
    assert q.mode == "alphanumeric" and q.error == "Q"
    kid = json.loads(run(capsysbinary, "verify", "--keystore", ks, hc1)[1])["kid"]
    _, der, _ = run(capsysbinary, "keys", "export-cert", "--keystore", ks, "--kid", kid, "--der")
    cert = tmp_path / "dsc.der"
    cert.write_bytes(der)
    code, out, _ = run(
        capsysbinary, "verify", "--cert", cert, "-", stdin=hc1 + "\r\n", monkeypatch=monkeypatch
    )
    assert code == 0
    code, out, _ = run(capsysbinary, "verify", "--cert", cert, "--at", "2099-01-01T00:00:00Z", hc1)
    result = json.loads(out)
    assert code == 0 and result["valid"] and result["time_valid"] is False
    tampered = hc1[:-6] + ("A" if hc1[-6] != "A" else "B") + hc1[-5:]
    code, out, _ = run(capsysbinary, "verify", "--cert", cert, tampered)
    assert code == 1 and json.loads(out)["valid"] is False


def test_batch_qr_files_are_numbered(ks, tmp_path, capsysbinary):
    f = tmp_path / "in.json"
    f.write_text(json.dumps([sample("v")] * 3))
    code, _, err = run(capsysbinary, "sign", "--keystore", ks, "--qr", tmp_path / "q.png", f)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("q-*.png")) == ["q-1.png", "q-2.png", "q-3.png"]
    assert (tmp_path / "q-1.png").read_bytes().startswith(b"\x89PNG")


def test_sign_exit_codes(ks, tmp_path, capsysbinary, monkeypatch):
    bad = sample("v")
    bad["dob"] = "1999-02-30"
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([sample("v"), bad]))
    code, out, err = run(capsysbinary, "sign", "--keystore", ks, f)
    assert code == 3 and out == b""
    errors = json.loads(err.splitlines()[0])
    assert errors[0]["index"] == 1 and errors[0]["errors"][0]["path"] == "$.dob"
    f.write_text("{not json")
    assert run(capsysbinary, "sign", "--keystore", ks, f)[0] == 3
    f.write_text(json.dumps(sample("t")))
    vacc = json.loads(run(capsysbinary, "keys", "list", "--keystore", ks, "--json")[1])[0]["kid"]
    code, _, err = run(capsysbinary, "sign", "--keystore", ks, "--kid", vacc, f)
    assert code == 4 and "may not sign a test DCC" in err
    monkeypatch.setenv("DCCSIGN_KEYSTORE_PASSPHRASE", "wrong")
    code, _, err = run(capsysbinary, "sign", "--keystore", ks, f)
    assert code == 4 and ".key.pem" in err
    code, _, err = run(capsysbinary, "sign", "--keystore", tmp_path / "nowhere", f)
    assert code == 4 and "not a keystore" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["sign"],
        ["sign", "--keystore", "x", "--kid", "abc"],
        ["sign", "--keystore", "x", "--validity-days", "0"],
        ["sign", "--keystore", "x", "--validity-days", "inf"],
        ["sign", "--keystore", "x", "--validity-days", "nan"],
        ["sign", "--keystore", "x", "--validity-days", "1e12"],
        ["bench", "core", "--threads", "0"],
        ["verify", "HC1:x"],
        ["verify", "--cert", "a", "--keystore", "b"],
        ["bench", "core", "--impl", "rust"],
        ["keys"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_qr_suffix_checked_before_signing(ks, tmp_path, capsysbinary):
    f = tmp_path / "in.json"
    f.write_text(json.dumps(sample("v")))
    code, out, err = run(capsysbinary, "sign", "--keystore", ks, "--qr", tmp_path / "q.gif", f)
    assert code == 2 and out == b"" and ".png or .svg" in err


def test_bench_core_json(capsysbinary):
    code, out, _ = run(capsysbinary, "bench", "core", "--seconds", "0.3", "--json")
    result = json.loads(out)
    assert (
        code == 0
        and result["certs_per_s"] > 0
        and set(result["stages"]) == {"validate_us", "cbor_us", "sign_us", "cose_zlib_base45_us"}
    )
