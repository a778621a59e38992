"""The keystore directory: creation, opening, passphrases, and every way it can be broken."""

import json
import os
import stat

import pytest

from dccsign import native
from dccsign.errors import KeystoreError
from dccsign.keys.keystore import Keystore, init_dev, resolve_passphrase


@pytest.fixture
def store(dev_keystore_copy):
    return Keystore.open(dev_keystore_copy)


def test_init_dev_contents(store):
    entries = {e.name: e for e in store.entries}
    assert [(e.dsc.alg_name, sorted(e.dsc.usages), e.dsc.restricted) for e in entries.values()] == [
        ("ES256", ["v"], True),
        ("ES256", ["t"], True),
        ("ES256", ["r"], True),
        ("PS256", ["r", "t", "v"], False),
    ]
    for e in store.entries:
        assert "DEVELOPMENT" in e.dsc.subject
        assert e.dsc.country == "NL"
        assert e.state == "active"
        assert stat.S_IMODE(e.key_path.stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in e.key_path.read_bytes()
    assert stat.S_IMODE((store.directory / "dev-passphrase").stat().st_mode) == 0o600
    meta = json.loads((store.directory / "keystore.json").read_text())
    assert "kid" not in json.dumps(meta)  # kids are computed, never configured


def test_keys_load_and_match(store):
    passphrase = resolve_passphrase(store.directory)
    for e in store.entries:
        key = store.load_signing_key(e, passphrase, native)
        assert key.alg == e.dsc.alg


def test_init_dev_refuses_non_empty_directory(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(KeystoreError, match="not empty"):
        init_dev(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something"]


def test_init_dev_country(tmp_path):
    with pytest.raises(KeystoreError, match="alpha-2"):
        init_dev(tmp_path / "ks", "nl")


def test_wrong_passphrase_names_the_file(store, monkeypatch):
    monkeypatch.setenv("DCCSIGN_KEYSTORE_PASSPHRASE", "not it")
    entry = store.entries[0]
    with pytest.raises(KeystoreError, match=str(entry.key_path)):
        store.load_signing_key(entry, resolve_passphrase(store.directory), native)


def test_passphrase_sources(store, tmp_path, monkeypatch):
    dev = (store.directory / "dev-passphrase").read_bytes().strip()
    assert resolve_passphrase(store.directory) == dev
    f = tmp_path / "pw"
    f.write_bytes(b"from-file\n")
    monkeypatch.setenv("DCCSIGN_KEYSTORE_PASSPHRASE_FILE", str(f))
    assert resolve_passphrase(store.directory) == b"from-file"
    monkeypatch.setenv("DCCSIGN_KEYSTORE_PASSPHRASE", "from-env")
    assert resolve_passphrase(store.directory) == b"from-env"
    monkeypatch.delenv("DCCSIGN_KEYSTORE_PASSPHRASE")
    f.write_bytes(b"")
    with pytest.raises(KeystoreError, match="empty"):
        resolve_passphrase(store.directory)
    monkeypatch.delenv("DCCSIGN_KEYSTORE_PASSPHRASE_FILE")
    (store.directory / "dev-passphrase").unlink()
    with pytest.raises(KeystoreError, match="no keystore passphrase"):
        resolve_passphrase(store.directory)


def test_corrupt_key_file(store):
    entry = store.entries[1]
    entry.key_path.write_bytes(entry.key_path.read_bytes()[:200])
    with pytest.raises(KeystoreError, match=str(entry.key_path)):
        store.load_signing_key(entry, resolve_passphrase(store.directory), native)


def test_key_not_matching_its_dsc(store):
    a, b = store.entries[0], store.entries[1]
    b.key_path.write_bytes(a.key_path.read_bytes())
    with pytest.raises(KeystoreError, match="does not match its DSC"):
        store.load_signing_key(b, resolve_passphrase(store.directory), native)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "keystore.json").unlink(), "not a keystore"),
        (lambda d: (d / "keystore.json").write_text("{"), "unreadable"),
        (
            lambda d: (d / "keystore.json").write_text('{"format": 9}'),
            "unsupported keystore format",
        ),
        (
            lambda d: (d / "certs" / "dev-ps256.crt.pem").write_text("junk"),
            "not a valid certificate",
        ),
        (lambda d: (d / "certs" / "dev-ps256.crt.pem").unlink(), "cannot read the DSC"),
        (lambda d: _edit(d, lambda m: m["keys"][0].update(state="paused")), "state 'paused'"),
        (
            lambda d: _edit(
                d, lambda m: m["keys"][1].update(certificate=m["keys"][0]["certificate"])
            ),
            "collides",
        ),
        (lambda d: _edit(d, lambda m: m.update(issuer_country="Netherlands")), "alpha-2"),
    ],
)
def test_open_rejects(dev_keystore_copy, mutate, message):
    mutate(dev_keystore_copy)
    with pytest.raises(KeystoreError, match=message):
        Keystore.open(dev_keystore_copy)


def _edit(directory, change):
    path = directory / "keystore.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_directory_mode(store):
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
