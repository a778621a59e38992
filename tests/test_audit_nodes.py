"""Audit logs across nodes: the node id in every segment header (one log, one node), and
verify/search/revocations over the logs of several nodes at once (docs/audit-format.md,
"Nodes")."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_audit import Clock, batch, read_lines, run_cli, segment_files, write_lines
from test_keyd_process import payload

from dccsign.audit import node as node_ids
from dccsign.audit.errors import AuditLogError
from dccsign.audit.key import AuditKey
from dccsign.audit.logs import DuplicateLog, open_logs
from dccsign.audit.search import revocations_logs, search, search_logs
from dccsign.audit.verify import key_for, verify, verify_logs
from dccsign.audit.writer import AuditLog
from dccsign.keyd.client import KeydClient
from dccsign.keyd.supervisor import PrivateKeyd
from dccsign.keys.keystore import Keystore
from dccsign.testing.net import accepts_unix
from dccsign.testing.samples import sample
from engine_process import EngineProcess, keyd_argv

PASSPHRASE = b"audit nodes passphrase"
ACCOUNT = "uzi:900000001"  # record(i) gives it every third record


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[AuditKey, AuditKey]:
    """Two audit keys: nodes may have keys of their own."""
    root = tmp_path_factory.mktemp("nodekeys")
    return tuple(AuditKey.create(root / f"k{i}.pem", PASSPHRASE) for i in (1, 2))  # type: ignore[return-value]


def write_log(directory: Path, key: AuditKey, node: str | None, *, start=0.0, **kw) -> None:
    """A log of node *node*: two batches of 6 records at 2 s apart from *start* seconds
    after the test clock's origin, rotated every 6 records."""
    clock = Clock(1_714_554_000.0 + start)
    with AuditLog.open(directory, key, clock=clock, segment_records=6, node=node, **kw) as log:
        log.append_issuance(batch(0, 6))
        log.append_issuance(batch(6, 6))


def headers(directory: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in segment_files(directory)
        for line in read_lines(path)
        if json.loads(line)["t"] == "header"
    ]


def two_logs(tmp_path: Path, keys, nodes=("node-a", "node-b")) -> tuple[Path, Path]:
    """Logs of two nodes whose batches interleave in time (b 0.5 s after a)."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_log(a, keys[0], nodes[0])
    write_log(b, keys[1], nodes[1], start=0.5)
    return a, b


# ----------------------------------------------------------------------------- node ids


def test_default_node_id_is_the_host_name_made_valid(monkeypatch):
    for host, expected in (
        ("signer-01.example.nl", "signer-01.example.nl"),
        ("höst name!", "h-st-name"),
        ("x" * 80, "x" * 64),
        ("***", "node"),
    ):
        monkeypatch.setattr(node_ids.socket, "gethostname", lambda h=host: h)
        assert node_ids.default_node_id() == expected
        assert node_ids.is_node_id(node_ids.default_node_id())
    for bad in ("", "a b", "x" * 65, "é", None, 7):
        assert not node_ids.is_node_id(bad)


def test_node_id_is_in_every_header_and_in_the_report(tmp_path, keys):
    directory = tmp_path / "log"
    write_log(directory, keys[0], "node-a")
    found = headers(directory)
    assert len(found) == 3 and {h["node"] for h in found} == {"node-a"}
    report = verify(directory)
    assert report.ok and report.node == "node-a" and report.segments == 3
    with pytest.raises(ValueError, match="not a node id"):
        AuditLog.open(tmp_path / "other", keys[0], node="a b")


def test_edited_node_id_breaks_the_chain(tmp_path, keys):
    directory = tmp_path / "log"
    write_log(directory, keys[0], "node-a")
    # rename the node in every header: the headers are hashed like any entry
    for path in segment_files(directory):
        lines = read_lines(path)
        lines[0] = lines[0].replace(b'"node":"node-a"', b'"node":"node-z"')
        write_lines(path, lines)
    report = verify(directory)
    assert not report.ok
    assert (report.first_break.segment, report.first_break.sequence) == (1, 1)
    assert "edited" in report.first_break.problem


def test_a_node_change_within_a_log_is_a_break(tmp_path, keys):
    directory = tmp_path / "log"
    write_log(directory, keys[0], "node-a")
    # keyd refuses to write another node's log ...
    with pytest.raises(AuditLogError, match="belongs to node 'node-a', not 'node-b'"):
        AuditLog.open(directory, keys[0], node="node-b")
    # ... and a log whose chain and checkpoints are valid but whose node changes is a break
    with AuditLog.open(directory, keys[0], segment_records=1, node="node-a") as log:
        log._node = "node-b"  # what a writer without the check above would do
        log.append_issuance(batch(20, 1))
    report = verify(directory)
    assert not report.ok and report.first_break.segment == 4  # 3 closed, the 4th names b
    assert "names node 'node-b', but the log is node 'node-a'" in report.first_break.problem


def test_an_older_log_without_node_still_works_and_gets_one(tmp_path, keys):
    directory = tmp_path / "log"
    write_log(directory, keys[0], None)
    assert all("node" not in h for h in headers(directory))
    report = verify(directory)
    assert report.ok and report.node is None
    assert open_logs([directory])[0].label == str(directory)
    assert len(list(search(directory))) == 12
    with AuditLog.open(directory, keys[0], node=None) as log:  # kept without one
        assert log.node is None and log.segment == 3
    # opened by a keyd with a node id: the current segment is closed, the next names it
    with AuditLog.open(directory, keys[0], node="node-a") as log:
        assert log.node == "node-a" and log.segment == 4
        log.append_issuance(batch(12, 2))
    assert [h.get("node") for h in headers(directory)] == [None, None, None, "node-a"]
    report = verify(directory)
    assert report.ok and report.node == "node-a" and report.records == 14
    # once named, a later header without a node is a break too
    with AuditLog.open(directory, keys[0], segment_records=1) as log:
        assert log.node == "node-a"  # a writer opened without one keeps the log's
        log._node = None
        log.append_issuance(batch(20, 1))
    report = verify(directory)
    assert not report.ok and "names no node" in report.first_break.problem


# ----------------------------------------------------------------------------- several logs


def test_verify_search_and_revocations_answer_for_several_logs(tmp_path, keys):
    a, b = two_logs(tmp_path, keys)
    result = verify_logs([a, b])
    assert result.ok and result.records == 24
    assert [(s.node, r.node, r.ok) for s, r in result.logs] == [
        ("node-a", "node-a", True),
        ("node-b", "node-b", True),
    ]
    doc = result.as_json()
    assert [(x["node"], x["directory"], x["records"]) for x in doc["logs"]] == [
        ("node-a", str(a), 12),
        ("node-b", str(b), 12),
    ]

    merged = list(search_logs([a, b]))
    assert len(merged) == 24
    times = [e["time"] for _, e in merged]
    assert times == sorted(times)
    # the batches interleave: a, b, a, b (each batch is committed at one time)
    assert [s.node for s, _ in merged[::6]] == ["node-a", "node-b", "node-a", "node-b"]
    for source, entry in merged:  # every entry is labelled with the log it is in
        assert entry in list(search(source.directory, account=entry["account"]))
    mine = list(search_logs([a, b], account=ACCOUNT))
    assert len(mine) == 8 and {s.node for s, _ in mine} == {"node-a", "node-b"}

    revs = revocations_logs([b, a], ACCOUNT)
    assert len(revs) == 8 and {s.node for s, _ in revs} == {"node-a", "node-b"}
    assert [r.time for _, r in revs] == sorted(r.time for _, r in revs)


def test_the_same_log_or_node_twice_is_refused(tmp_path, keys):
    a, b = two_logs(tmp_path, keys)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    same_node = tmp_path / "same-node"
    write_log(same_node, keys[1], "node-a")
    old1, old2 = tmp_path / "old1", tmp_path / "old2"
    write_log(old1, keys[0], None)
    write_log(old2, keys[0], None)
    for dirs, words in (
        ([a, b, a], "the same log"),
        ([a, copy], "the same log"),
        ([a, b, same_node], "same node 'node-a'"),
    ):
        with pytest.raises(DuplicateLog, match=words):
            verify_logs(dirs)
        with pytest.raises(DuplicateLog, match=words):
            search_logs(dirs)  # before anything is read
        with pytest.raises(DuplicateLog):
            revocations_logs(dirs, ACCOUNT)
    # two older logs without node ids are two logs (their log ids differ)
    assert verify_logs([old1, old2]).ok
    assert len(list(search_logs([old1, old2]))) == 24
    with pytest.raises(AuditLogError, match="no such audit log directory"):
        open_logs([a, tmp_path / "nowhere"])


def test_each_log_is_verified_with_the_key_it_names(tmp_path, keys):
    a, b = two_logs(tmp_path, keys)
    pems = [k.public_key_pem() for k in keys]
    sources = open_logs([a, b])
    assert key_for(sources[0], pems[::-1]) == keys[0].public.pem
    assert key_for(sources[1], pems) == keys[1].public.pem
    assert key_for(sources[0], []) is None
    result = verify_logs([a, b], pems[::-1])
    assert result.ok and all(r.key_pinned for _, r in result.logs)
    # only node a's key pinned: node b's log names another key, a break
    result = verify_logs([a, b], pems[:1])
    assert not result.ok
    assert [r.ok for _, r in result.logs] == [True, False]
    assert "names audit key" in result.logs[1][1].first_break.problem


# ----------------------------------------------------------------------------- CLI


def test_cli_verify_several_logs(tmp_path, keys, capsys):
    a, b = two_logs(tmp_path, keys)
    code, out, _ = run_cli(capsys, "audit", "verify", a, b)
    assert code == 0
    assert f"node node-a ({a}): intact: 12 records, 3 segments" in out
    assert f"node node-b ({b}): intact: 12 records" in out
    assert out.rstrip().endswith("all 2 logs intact: 24 records")
    code, out, _ = run_cli(capsys, "audit", "verify", a, b, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["records"] == 24
    assert [x["node"] for x in doc["logs"]] == ["node-a", "node-b"]

    pubs = []
    for i, k in enumerate(keys):
        pubs += ["--audit-pubkey", tmp_path / f"pub{i}.pem"]
        (tmp_path / f"pub{i}.pem").write_bytes(k.public_key_pem())
    code, out, _ = run_cli(capsys, "audit", "verify", a, b, *pubs)
    assert code == 0 and out.count("pinned audit key") == 2
    (tmp_path / "junk.pem").write_bytes(b"junk")
    code, _, err = run_cli(capsys, "audit", "verify", a, b, *pubs, "--audit-pubkey", "junk.pem")
    assert code == 4 and "cannot read" in err
    bad = ["--audit-pubkey", tmp_path / "junk.pem"]
    code, _, err = run_cli(capsys, "audit", "verify", a, b, *pubs, *bad)
    assert code == 4 and "junk.pem: not a PEM public key" in err

    lines = read_lines(segment_files(b)[1])
    write_lines(segment_files(b)[1], lines[:2] + lines[3:])
    code, out, _ = run_cli(capsys, "audit", "verify", a, b)
    assert code == 1 and f"node node-a ({a}): intact" in out
    assert f"node node-b ({b}): BROKEN at segment 2" in out
    assert out.rstrip().endswith("BROKEN: 1 of 2 logs (node-b)")
    code, out, _ = run_cli(capsys, "audit", "verify", a, b, "--json")
    assert code == 1 and [x["ok"] for x in json.loads(out)["logs"]] == [True, False]

    code, _, err = run_cli(capsys, "audit", "verify", a, a)
    assert code == 2 and "the same log" in err
    code, _, err = run_cli(capsys, "audit", "verify", a, b, "--witness", tmp_path / "w")
    assert code == 2 and "--witness checks one log" in err
    code, _, err = run_cli(capsys, "audit", "verify", a, tmp_path / "nowhere")
    assert code == 4 and "no such audit log directory" in err


def test_cli_search_and_revocations_over_several_logs(tmp_path, keys, capsys):
    a, b = two_logs(tmp_path, keys)
    code, out, err = run_cli(capsys, "audit", "search", a, b, "--account", ACCOUNT)
    rows = out.splitlines()
    assert code == 0 and len(rows) == 8 and "8 matching entries" in err
    assert [r.split()[0] for r in rows] == ["node-a", "node-a", "node-b", "node-b"] * 2
    assert all(ACCOUNT in r for r in rows)
    code, out, _ = run_cli(capsys, "audit", "search", b, a, "--json")
    found = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(found) == 24
    assert {(e["node"], e["log_dir"]) for e in found} == {("node-a", str(a)), ("node-b", str(b))}
    assert [e["time"] for e in found] == sorted(e["time"] for e in found)
    # one directory: the output is as it always was, without labels
    code, out, _ = run_cli(capsys, "audit", "search", a, "--json")
    assert code == 0 and all("node" not in json.loads(line) for line in out.splitlines())

    code, out, err = run_cli(capsys, "audit", "revocations", a, b, "--account", ACCOUNT)
    table = out.splitlines()
    assert code == 0 and table[0].split()[:2] == ["NODE", "SEQ"] and len(table) == 9
    assert {r.split()[0] for r in table[1:]} == {"node-a", "node-b"}
    assert "8 DCCs issued by account" in err
    code, out, _ = run_cli(capsys, "audit", "revocations", a, b, "--account", ACCOUNT, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["count"] == 8 and len(doc["hashes"]["UCI"]) == 8
    assert {r["node"] for r in doc["records"]} == {"node-a", "node-b"}
    code, out, _ = run_cli(capsys, "audit", "revocations", a, "--account", ACCOUNT)
    assert code == 0 and out.splitlines()[0].split()[0] == "SEQ"

    shutil.copytree(a, tmp_path / "copy")
    for command in (("search",), ("revocations", "--account", ACCOUNT)):
        code, out, err = run_cli(capsys, "audit", command[0], a, tmp_path / "copy", *command[1:])
        assert code == 2 and out == "" and "the same log" in err


def test_cli_help_names_several_directories(capsys):
    for command in ("verify", "search", "revocations"):
        code, out, _ = run_cli(capsys, "audit", command, "--help")
        assert code == 0 and "DIR [DIR ...]" in out and "node" in out


# ----------------------------------------------------------------------------- keyd


def start_keyd(keystore: Path, sock: Path, *extra: str) -> subprocess.Popen:
    """``dccsign keyd`` with *extra* options, waited for until it serves."""
    log = sock.with_suffix(".log")
    with open(log, "ab") as stream:
        proc = subprocess.Popen(keyd_argv(keystore, sock, *extra), stderr=stream)
    deadline = time.monotonic() + 30
    while not accepts_unix(sock):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def sign_as(sock: Path, keystore: Path, account: str, count: int) -> None:
    kid = next(e.kid for e in Keystore.open(keystore).entries if "v" in e.dsc.usages)
    with KeydClient(sock) as client:
        signed = client.sign(kid, [payload("v")] * count, client="portal", account=account)
    assert all(isinstance(s, bytes) for s in signed)


def test_two_keyd_nodes_and_the_union_of_their_logs(dev_keystore, tmp_path, capsys):
    stores = []
    for name in ("n1", "n2"):
        stores.append(tmp_path / name)
        shutil.copytree(dev_keystore, stores[-1])
    for count, name, store in zip((3, 5), ("node-1", "node-2"), stores, strict=True):
        proc = start_keyd(store, tmp_path / f"{name}.sock", "--node-id", name)
        try:
            sign_as(tmp_path / f"{name}.sock", store, "acct-a", count)
            sign_as(tmp_path / f"{name}.sock", store, "acct-b", 1)
        finally:
            stop(proc)
    logs = [s / "audit" for s in stores]
    assert [h["node"] for log in logs for h in headers(log)] == ["node-1", "node-2"]
    code, out, _ = run_cli(capsys, "audit", "verify", *logs)
    records = sum(verify(log).records for log in logs)  # signatures and key events
    assert code == 0 and f"all 2 logs intact: {records} records" in out
    issued = [(src.node, e["account"]) for src, e in search_logs(logs)]
    assert sorted(issued) == sorted(
        [("node-1", "acct-a")] * 3
        + [("node-1", "acct-b"), ("node-2", "acct-b")]
        + [("node-2", "acct-a")] * 5
    )
    code, out, _ = run_cli(capsys, "audit", "revocations", *logs, "--account", "acct-a", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["count"] == 8
    assert sorted(r["node"] for r in doc["records"]) == ["node-1"] * 3 + ["node-2"] * 5

    # one log, one node: keyd refuses node-1's log under another id, and says why
    sock = tmp_path / "again.sock"
    proc = subprocess.run(
        keyd_argv(stores[0], sock, "--node-id", "node-2", "--lock-wait", "0"),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 4 and b"belongs to node 'node-1', not 'node-2'" in proc.stderr
    bad = subprocess.run(keyd_argv(stores[0], sock, "--node-id", "a/b"), capture_output=True)
    assert bad.returncode == 2 and b"a node id is 1 to 64 characters" in bad.stderr


def test_keyd_and_serve_default_and_pass_the_node_id(dev_keystore, tmp_path):
    store = tmp_path / "ks"
    shutil.copytree(dev_keystore, store)
    with PrivateKeyd(store, audit_dir=tmp_path / "private") as keyd:
        sign_as(keyd.socket_path, store, "acct", 1)
    assert {h["node"] for h in headers(tmp_path / "private")} == {node_ids.default_node_id()}

    engine = EngineProcess(store, tmp_path, tcp=False, extra=("--node-id", "engine-7"))
    try:
        with engine.client() as client:
            assert client.sign(sample("v"), account="uzi:1").ok
    finally:
        assert engine.stop() == 0
    assert {h["node"] for h in headers(store / "audit")} == {"engine-7"}
    assert verify(store / "audit").node == "engine-7"
