"""The issuance audit log: writing, group commit, rotation, tamper detection, failures, CLI."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dccsign.audit import segments
from dccsign.audit.chain import Break
from dccsign.audit.errors import AuditKeyError, AuditLogError, AuditUnavailable
from dccsign.audit.key import AuditKey
from dccsign.audit.records import IssuanceBatch, IssuanceRecord, KeyEvent, canonical
from dccsign.audit.search import revocations, search
from dccsign.audit.verify import verify
from dccsign.audit.writer import SLOW_FSYNC, AuditLog
from dccsign.cli.audit import add_commands as add_audit_commands

PASSPHRASE = b"audit passphrase for tests"
KID = bytes.fromhex("d0ff3fe0ad2e2c1b")
NAME = "Testperson-Ådné"
DOB = "1964-08-12"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auditkey") / "audit.key"
    AuditKey.create(path, PASSPHRASE)
    return path


@pytest.fixture(scope="module")
def key(key_file) -> AuditKey:
    return AuditKey.load(key_file, PASSPHRASE)


class Clock:
    def __init__(self, start: float = 1_714_554_000.0) -> None:  # 2024-05-01T09:00:00Z
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def uvci(i: int) -> str:
    return f"URN:UVCI:01:NL:DCCSIGNTEST{i:08d}#K"


def record(i: int, *, alg: int = -7, account: str | None = None, signature: bytes | None = None):
    payload = json.dumps({"nam": NAME, "dob": DOB, "ci": uvci(i), "n": i}).encode()
    if signature is None:
        signature = hashlib.sha512(b"sig%d" % i).digest() if alg == -7 else bytes(256)
    return IssuanceRecord(
        kid=KID,
        alg=alg,
        client="portal-a" if i % 2 else "portal-b",
        account=account if account is not None else f"uzi:{900000000 + i % 3}",
        operator=None if i % 3 else "uzi:assistant-7",
        dcc_type="vtr"[i % 3],
        uvci=uvci(i),
        iss="NL",
        payload=payload,
        signature=signature,
    )


def batch(start: int, count: int, **kw) -> list[IssuanceRecord]:
    return [record(i, **kw) for i in range(start, start + count)]


def make_log(directory: Path, key: AuditKey, batches=(5, 5, 5), **kw) -> list[int]:
    seqs: list[int] = []
    start = 0
    with AuditLog.open(directory, key, clock=Clock(), **kw) as log:
        for n in batches:
            seqs += log.append_issuance(batch(start, n))
            start += n
    return seqs


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("segment-"))


def read_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if path.suffix == ".zst":
        data = zstandard.ZstdDecompressor().decompress(data)
    return data.split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    if path.suffix == ".zst":
        data = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    path.write_bytes(data)


def index_of(lines: list[bytes], kind: str, nth: int = 0) -> int:
    found = [i for i, line in enumerate(lines) if json.loads(line)["t"] == kind]
    return found[nth]


def seq_of(line: bytes) -> int:
    return json.loads(line)["seq"]


def line_of_seq(lines: list[bytes], seq: int) -> int:
    """The index in lines of the record with sequence number seq."""
    return next(i for i, line in enumerate(lines) if seq_of(line) == seq)


def default_log(tmp_path: Path, key: AuditKey) -> tuple[Path, list[int], Path, list[bytes]]:
    """A default log in tmp_path/"log": its directory, its record sequence numbers,
    its first segment file and that file's lines (to tamper with)."""
    directory = tmp_path / "log"
    seqs = make_log(directory, key)
    path = segment_files(directory)[0]
    return directory, seqs, path, read_lines(path)


def remove_record(path: Path, seq: int) -> None:
    """Rewrite the segment file at path without the record of sequence number seq."""
    write_lines(path, [line for line in read_lines(path) if seq_of(line) != seq])


def assert_break(directory: Path, segment: int, sequence: int, *words: str) -> Break:
    report = verify(directory)
    assert not report.ok
    brk = report.first_break
    assert brk is not None
    assert (brk.segment, brk.sequence) == (segment, sequence), brk
    for word in words:
        assert word in brk.problem, brk
    return brk


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dccsign")
    add_audit_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args([str(a) for a in argv])
        code = args.func(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- writing


def test_round_trip(tmp_path, key):
    directory = tmp_path / "log"
    records = [*batch(0, 4), record(4, alg=-37)]
    with AuditLog.open(directory, key, clock=Clock()) as log:
        seqs = log.append_issuance(records)
        event_seq = log.append_key_event(KeyEvent("disable", KID, "es256-v", "alice", "abuse"))
        head = log.head
    assert seqs == [3, 4, 5, 6, 7]  # 1 header, 2 checkpoint of the new segment
    assert event_seq == 9 and head[0] == 10
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700

    found = list(search(directory))
    assert [e["seq"] for e in found] == seqs
    for rec, entry in zip(records, found, strict=True):
        assert entry["kid"] == KID.hex() and entry["alg"] == rec.alg
        assert entry["client"] == rec.client and entry["account"] == rec.account
        assert entry["operator"] == rec.operator and entry["type"] == rec.dcc_type
        assert entry["iss"] == "NL"
        assert entry["uvci_hash"] == hashlib.sha256(rec.uvci.encode()).hexdigest()
        assert entry["payload_sha256"] == hashlib.sha256(rec.payload).hexdigest()
        assert entry["time"].endswith("Z") and len(entry["time"]) == 27
    events = list(search(directory, kid=KID, kinds=("key",)))
    assert [(e["action"], e["actor"], e["reason"]) for e in events] == [
        ("disable", "alice", "abuse")
    ]

    # the stored lines are canonical JSON and chained over their exact bytes
    lines = read_lines(segment_files(directory)[0])
    prev = "0" * 64
    for line in lines:
        entry = json.loads(line)
        assert canonical(entry) == line
        assert entry["prev"] == prev
        prev = hashlib.sha256(line).hexdigest()
        if entry["seq"] == head[0]:
            assert prev == head[1]
    assert json.loads(lines[-1])["end"] == "close" and seq_of(lines[-1]) == head[0] + 1

    report = verify(directory)
    assert report.ok and report.first_break is None
    assert (report.records, report.segments, report.closed_cleanly) == (6, 1, True)
    assert report.key_pinned is False
    assert verify(directory, key.public_key_pem()).key_pinned is True


def test_search_filters(tmp_path, key):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(6, 6))
    everything = list(search(directory))
    assert len(everything) == 12
    assert {e["client"] for e in search(directory, client="portal-a")} == {"portal-a"}
    mine = list(search(directory, account="uzi:900000001", client="portal-a"))
    assert mine and all(e["account"] == "uzi:900000001" for e in mine)
    assert list(search(directory, operator="uzi:assistant-7"))
    assert len(list(search(directory, kid=KID.hex()))) == 12
    assert list(search(directory, kid=bytes(8))) == []
    # the two batches were committed at different (fake) times
    first, second = everything[0]["time"], everything[6]["time"]
    assert first < second
    assert len(list(search(directory, since=second))) == 6
    assert len(list(search(directory, until=second))) == 6
    assert list(search(directory, since="2030-01-01T00:00:00")) == []


def test_group_commit_is_one_write_and_one_fsync_per_batch(tmp_path, key, monkeypatch):
    with AuditLog.open(tmp_path / "log", key) as log:
        calls = {"write": 0, "fsync": 0}
        real_write, real_fsync = os.write, os.fsync

        def counting_write(fd, data):
            calls["write"] += 1
            return real_write(fd, data)

        def counting_fsync(fd):
            calls["fsync"] += 1
            return real_fsync(fd)

        monkeypatch.setattr(os, "write", counting_write)
        monkeypatch.setattr(os, "fsync", counting_fsync)
        for size in (1, 1000, 37):
            before = dict(calls)
            seqs = log.append_issuance(batch(0, size))
            assert len(seqs) == size
            assert calls["write"] - before["write"] == 1
            assert calls["fsync"] - before["fsync"] == 1
        log.append_key_event(KeyEvent("activate", KID, None, "bob", None))
        assert calls == {"write": 4, "fsync": 4}


def test_slow_fsyncs_are_counted_and_logged_at_most_every_10_s(tmp_path, key, monkeypatch, caplog):
    """Every signature of a batch waits for its commit's fsync: slow ones are counted and
    reported in the log (rate-limited), so a stalling disk is visible to operators."""
    with AuditLog.open(tmp_path / "log", key) as log:
        real_fsync = os.fsync
        slow = {"on": False}

        def fsync(fd):
            real_fsync(fd)
            if slow["on"]:
                import time

                time.sleep(SLOW_FSYNC)

        monkeypatch.setattr(os, "fsync", fsync)
        log.append_issuance(batch(0, 2))
        assert log.slow_fsyncs == 0
        slow["on"] = True
        with caplog.at_level("WARNING", logger="dccsign.audit"):
            log.append_issuance(batch(2, 2))
            log.append_issuance(batch(4, 2))
        assert log.slow_fsyncs == 2
        reports = [r for r in caplog.records if "fsync(s) over" in r.getMessage()]
        assert len(reports) == 1  # the second within 10 s of the first is only counted
        assert "1 fsync(s) over 100 ms" in reports[0].getMessage()


def test_invalid_record_writes_nothing(tmp_path, key):
    with AuditLog.open(tmp_path / "log", key) as log:
        head = log.head
        bad = [*batch(0, 3), record(3, signature=b"short")]
        with pytest.raises(ValueError, match="record 3: an ES256 signature is 64 bytes"):
            log.append_issuance(bad)
        with pytest.raises(ValueError, match="record 0: account"):
            log.append_issuance([record(0, account="")])
        assert log.head == head
        assert log.append_issuance(batch(0, 1)) == [head[0] + 1]
    assert verify(tmp_path / "log").ok


def test_batches_of_many_parts_and_algs_in_one_commit(tmp_path, key):
    """keyd's micro-batch: many batches (one per part) with different accounts and both algs
    go in one commit, in order, each record under its own part; a batch whose columns do not
    agree is refused by index and nothing is written."""
    records = [*batch(0, 4), *batch(4, 3, alg=-37), *batch(7, 2)]
    parts = [
        IssuanceBatch(
            r.kid,
            r.alg,
            r.client,
            r.account,
            r.operator,
            r.dcc_type,
            [r.uvci],
            [r.iss],
            [r.payload],
            [r.signature],
        )
        for r in records
    ]
    with AuditLog.open(tmp_path / "log", key) as log:
        head = log.head
        short = IssuanceBatch(
            KID,
            -7,
            "portal-a",
            "uzi:1",
            None,
            "vv",
            [uvci(98)],
            ["NL"],
            [b"p", b"q"],
            [bytes(64)] * 2,
        )
        with pytest.raises(ValueError, match=r"record 2: .* differ in length"):
            log.append_batches([parts[0], parts[1], short, parts[2]])
        assert log.head == head
        seqs = log.append_batches(parts)
        assert seqs == list(range(head[0] + 1, head[0] + 1 + len(records)))
    result = verify(tmp_path / "log")
    assert result.ok
    found = search(tmp_path / "log")
    issued = [e for e in found if e.get("t") == "issue"]
    assert [(e["account"], e["client"], e["alg"], e["operator"]) for e in issued] == [
        (r.account, r.client, r.alg, r.operator) for r in records
    ]


def test_rotation_compresses_and_verifies_across_segments(tmp_path, key):
    directory = tmp_path / "log"
    with AuditLog.open(directory, key, segment_records=10, clock=Clock()) as log:
        seqs = []
        for start in range(0, 45, 5):
            seqs += log.append_issuance(batch(start, 5))
        log.append_issuance(batch(45, 12))  # a batch is never split: this segment holds 12
    names = [p.name for p in segment_files(directory)]
    assert names == [
        "segment-000001.log.zst",
        "segment-000002.log.zst",
        "segment-000003.log.zst",
        "segment-000004.log.zst",
        "segment-000005.log.zst",
        "segment-000006.log",
    ]
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    first = read_lines(directory / names[0])
    assert json.loads(first[-1])["end"] == "segment"
    assert (
        json.loads(read_lines(directory / names[1])[0])["prev"]
        == hashlib.sha256(first[-1]).hexdigest()
    )
    report = verify(directory, key.public_key_pem())
    assert report.ok, report.first_break
    assert (report.records, report.segments) == (57, 6)
    found = [e["seq"] for e in search(directory)]
    assert len(found) == 57 and found[:45] == seqs


def test_reopen_continues_the_chain(tmp_path, key):
    directory = tmp_path / "log"
    first = make_log(directory, key, batches=(3,), segment_records=4)
    with AuditLog.open(directory, key, segment_records=4, clock=Clock()) as log:
        assert log.head[0] == first[-1] + 2  # the close checkpoint followed the last record
        again = log.append_issuance(batch(3, 3))  # closes segment 1
        assert log.segment == 2
    assert again[0] == first[-1] + 3
    with AuditLog.open(directory, key, segment_records=4, clock=Clock()) as log:
        log.append_key_event(KeyEvent("keyd-start", None, None, "keyd", None))
    report = verify(directory)
    assert report.ok, report.first_break
    assert (report.records, report.segments) == (7, 2)


def test_second_writer_and_other_audit_key_are_refused(tmp_path, key):
    directory = tmp_path / "log"
    with AuditLog.open(directory, key):
        with pytest.raises(AuditLogError, match="already open for writing"):
            AuditLog.open(directory, key)
    other = AuditKey.create(tmp_path / "other.key", PASSPHRASE)
    with pytest.raises(AuditLogError, match="signed by another audit key"):
        AuditLog.open(directory, other)
    stored = directory / "audit-key.pub.pem"
    stored.unlink()  # lost: a different key is still refused, and the file is not replaced
    with pytest.raises(AuditLogError, match="names audit key"):
        AuditLog.open(directory, other)
    assert not stored.exists()
    with AuditLog.open(directory, key):  # the right key restores it
        pass
    assert stored.read_bytes() == key.public_key_pem()
    # pinning the other key makes verify refuse the log at its first entry
    brk = verify(directory, other.public_key_pem()).first_break
    assert brk is not None and (brk.segment, brk.sequence) == (1, 1) and "audit key" in brk.problem


# ----------------------------------------------------------------------------- tampering


def test_edited_record_is_detected(tmp_path, key):
    directory, seqs, path, lines = default_log(tmp_path, key)
    i = line_of_seq(lines, seqs[6])
    lines[i] = lines[i].replace(b'"account":"uzi:', b'"account":"uzX:')
    write_lines(path, lines)
    assert_break(directory, 1, seqs[6], "was edited")


def test_edited_newest_line_is_detected(tmp_path, key):
    directory, seqs, path, lines = default_log(tmp_path, key)
    lines[-1] = lines[-1].replace(b'"end":"close"', b'"end": "close"')  # same fields
    write_lines(path, lines)
    assert_break(directory, 1, seqs[-1] + 2, "canonical")
    lines[-1] = lines[-1].replace(b'"end": "close"', b'"end":null')
    write_lines(path, lines)
    assert_break(directory, 1, seqs[-1] + 2, "signature is not valid")


def test_edited_record_with_rewritten_chain_is_detected(tmp_path, key):
    directory, seqs, path, lines = default_log(tmp_path, key)
    i = line_of_seq(lines, seqs[2])
    lines[i] = lines[i].replace(b'"type":"', b'"type":"x')
    for j in range(i + 1, len(lines)):  # recompute every later prev: the signature still fails
        entry = json.loads(lines[j])
        entry["prev"] = hashlib.sha256(lines[j - 1]).hexdigest()
        lines[j] = canonical(entry)
    write_lines(path, lines)
    next_checkpoint = next(
        seq_of(line) for line in lines[i:] if json.loads(line)["t"] == "checkpoint"
    )
    assert_break(directory, 1, next_checkpoint, "signature is not valid")


def test_removed_record_is_detected(tmp_path, key):
    directory, seqs, path, _ = default_log(tmp_path, key)
    remove_record(path, seqs[7])
    assert_break(directory, 1, seqs[7], "missing (removed)")


def test_reordered_record_is_detected(tmp_path, key):
    directory, seqs, path, lines = default_log(tmp_path, key)
    i = line_of_seq(lines, seqs[3])
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    write_lines(path, lines)
    assert_break(directory, 1, seqs[3], "out of order")


def test_truncated_closed_segment_is_detected(tmp_path, key):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(4, 4, 4, 4), segment_records=8)
    path = directory / "segment-000001.log.zst"
    lines = read_lines(path)
    cut = index_of(lines, "checkpoint", 1)  # keep a valid, but not closing, checkpoint
    write_lines(path, lines[: cut + 1])
    assert_break(directory, 1, seq_of(lines[cut]) + 1, "truncated", "does not close")
    # cutting the compressed bytes is caught by the zstandard frame checks
    write_lines(path, lines)
    path.write_bytes(path.read_bytes()[:-7])
    assert_break(directory, 1, 1, "truncated")


def test_truncated_tail_is_detected(tmp_path, key):
    directory = tmp_path / "log"
    seqs = make_log(directory, key)
    path = segment_files(directory)[-1]
    data = path.read_bytes()
    lines = read_lines(path)  # ..., last batch, its checkpoint, the close checkpoint
    assert seq_of(lines[-1]) == seqs[-1] + 2
    path.write_bytes(data[:-100])  # in the middle of the close checkpoint
    assert_break(directory, 1, seqs[-1] + 2, "incomplete entry")
    path.write_bytes(data[: -len(lines[-1]) - 1 - 60])  # into the batch's checkpoint
    assert_break(directory, 1, seqs[-5], "incomplete entry")
    write_lines(path, lines[:-2])  # both checkpoints removed: the last batch is unsigned
    assert_break(directory, 1, seqs[-5], "5 entries after the last checkpoint")


def test_rollback_to_an_earlier_checkpoint_needs_a_witness(tmp_path, key):
    """Removing whole batches with their checkpoints from the end is the documented limit."""
    directory = tmp_path / "log"
    with AuditLog.open(directory, key, clock=Clock()) as log:
        log.append_issuance(batch(0, 5))
        earlier = log.last_checkpoint
        log.append_issuance(batch(5, 5))
        witness = log.last_checkpoint  # published outside the host
    assert verify(directory, witnesses=[witness]).ok
    path = segment_files(directory)[0]
    lines = read_lines(path)
    keep = lines.index(earlier)
    write_lines(path, lines[: keep + 1])  # rolled back: ends one batch earlier
    assert verify(directory).ok  # undetectable from the directory alone
    brk = verify(directory, witnesses=[b"syslog: " + witness]).first_break
    assert brk is not None and "witnessed checkpoint" in brk.problem
    with pytest.raises(ValueError, match="not validly signed"):
        verify(directory, witnesses=[witness.replace(b'"sig":"', b'"sig":"00')])


def test_deleted_segment_is_detected(tmp_path, key):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(4, 4, 4, 4), segment_records=4)
    assert verify(directory).ok
    (directory / "segment-000002.log.zst").unlink()
    brk = assert_break(directory, 2, 1 + len(read_lines(directory / "segment-000001.log.zst")))
    assert "segment 2 missing (deleted)" in brk.problem


def test_deleted_newest_segment_is_detected(tmp_path, key):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(4, 4, 4), segment_records=4)
    newest = segment_files(directory)[-1]
    assert newest.name == "segment-000004.log"
    newest.unlink()
    brk = assert_break(directory, 4, seq_of(read_lines(segment_files(directory)[-1])[-1]) + 1)
    assert "segment 4 is missing" in brk.problem
    with pytest.raises(AuditLogError, match="newest segment was deleted"):
        AuditLog.open(directory, key)


def test_deleted_first_segment_is_detected(tmp_path, key):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(4, 4), segment_records=4)
    (directory / "segment-000001.log.zst").unlink()
    assert_break(directory, 1, 1, "segment 1 missing")
    with pytest.raises(AuditLogError, match="segment 1 is missing"):
        AuditLog.open(directory, key)


def test_broken_log_is_refused_on_open(tmp_path, key):
    directory, seqs, path, _ = default_log(tmp_path, key)
    remove_record(path, seqs[1])
    with pytest.raises(AuditLogError, match=rf"segment 1 at sequence {seqs[1]}: .*missing"):
        AuditLog.open(directory, key)


# ----------------------------------------------------------------------------- crashes


def test_torn_write_is_recovered_and_recorded(tmp_path, key, monkeypatch):
    directory = tmp_path / "log"
    log = AuditLog.open(directory, key, clock=Clock())
    log.append_issuance(batch(0, 3))
    real_write = os.write

    def torn_write(fd, data):  # the process dies half-way through the batch
        real_write(fd, bytes(data)[: len(data) // 2 + 10])
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(os, "write", torn_write)
    with pytest.raises(AuditUnavailable):
        log.append_issuance(batch(3, 20))
    monkeypatch.setattr(os, "write", real_write)
    with pytest.raises(AuditUnavailable, match="reopen"):
        log.append_issuance(batch(3, 1))
    log.close()  # a failed log is released without a checkpoint

    # entries 1 header, 2 checkpoint, 3-5 records, 6 checkpoint, then the torn batch
    brk = assert_break(directory, 1, 7, "incomplete entry")
    assert "torn write" in brk.problem
    with AuditLog.open(directory, key, clock=Clock()) as log:
        info = log.recovered
        assert info is not None and info["discarded_entries"] >= 5
        assert info["after_sequence"] == 6
        seqs = log.append_issuance(batch(3, 2))
    evidence = directory / info["evidence"]
    assert evidence.read_bytes().count(b"\n") == info["discarded_entries"]
    assert stat.S_IMODE(evidence.stat().st_mode) == 0o600
    report = verify(directory)
    assert report.ok, report.first_break
    assert [r["after_sequence"] for r in report.recoveries] == [6]
    assert seqs[0] == 9  # 7 recover entry, 8 its checkpoint
    assert [e["seq"] for e in search(directory)] == [3, 4, 5, *seqs]


_WRITER = """
import sys
from dccsign.audit.key import AuditKey
from dccsign.audit.records import IssuanceRecord
from dccsign.audit.writer import AuditLog
key = AuditKey.load(sys.argv[1], sys.argv[2].encode())
log = AuditLog.open(sys.argv[3], key, segment_records=300)
i = 0
while True:
    records = [
        IssuanceRecord(b"k" * 8, -7, "c", "a%d" % (i % 7), None, "v", "U%d" % (i + j), "NL",
                       b"p" * 200, b"s" * 64)
        for j in range(50)
    ]
    i += 50
    seqs = log.append_issuance(records)
    sys.stdout.write("%d\\n" % seqs[-1])
    sys.stdout.flush()
"""


def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path, key_file):
    directory = tmp_path / "log"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(key_file), PASSPHRASE.decode(), str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        acknowledged = [int(child.stdout.readline()) for _ in range(40)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    key = AuditKey.load(key_file, PASSPHRASE)
    with AuditLog.open(directory, key, segment_records=300) as log:
        assert log.head[0] >= acknowledged[-1]
    report = verify(directory)
    assert report.ok, report.first_break
    assert report.segments >= 6
    stored = {e["seq"] for e in search(directory)}
    assert set(acknowledged) <= stored


def test_crash_between_closing_and_creating_a_segment(tmp_path, key, monkeypatch):
    directory = tmp_path / "log"
    log = AuditLog.open(directory, key, segment_records=5, clock=Clock())
    real_open = os.open

    def no_new_files(path, flags, *args):
        if flags & os.O_CREAT and "segment-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_new_files)
    seqs = log.append_issuance(batch(0, 5))  # durable: its records are safe
    assert seqs == [3, 4, 5, 6, 7]
    with pytest.raises(AuditUnavailable, match="segment 2"):
        log.append_issuance(batch(5, 1))
    monkeypatch.setattr(os, "open", real_open)
    log.close()
    assert_break(directory, 2, 9, "segment 2 is missing")
    with AuditLog.open(directory, key, segment_records=5) as log:
        assert log.segment == 2 and log.recovered is None
    assert verify(directory).ok
    assert [p.name for p in segment_files(directory)] == [
        "segment-000001.log.zst",
        "segment-000002.log",
    ]


def test_torn_bytes_after_a_closing_checkpoint(tmp_path, key, monkeypatch):
    """Nothing may follow a segment's closing checkpoint: the recovery goes to the next one."""
    directory = tmp_path / "log"
    log = AuditLog.open(directory, key, segment_records=5)
    monkeypatch.setattr(AuditLog, "_new_segment", _fail_new_segment)
    log.append_issuance(batch(0, 5))
    log.close()
    monkeypatch.undo()
    first = directory / "segment-000001.log"
    first.write_bytes(first.read_bytes() + b'{"account":"uzi:1","al')
    with AuditLog.open(directory, key, segment_records=5) as log:
        assert log.recovered is not None and log.recovered["torn_segment"] == 1
        assert log.segment == 2
        log.append_issuance(batch(5, 1))
    report = verify(directory)
    assert report.ok, report.first_break
    assert report.recoveries[0]["discarded_bytes"] == 22
    assert json.loads(read_lines(directory / "segment-000001.log.zst")[-1])["end"] == "segment"
    kinds = [json.loads(line)["t"] for line in read_lines(directory / "segment-000002.log")]
    assert kinds == [
        "header",
        "checkpoint",
        "recover",
        "checkpoint",
        "issue",
        "checkpoint",
        "checkpoint",
    ]


def _fail_new_segment(self, number):
    raise OSError(errno.EROFS, "Read-only file system")


def test_interrupted_compression_is_completed(tmp_path, key):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(4, 4), segment_records=4)
    packed = directory / "segment-000001.log.zst"
    plain = directory / "segment-000001.log"
    write_lines(plain, read_lines(packed))  # stopped between the rename and the unlink
    (directory / "segment-000002.log.zst.tmp").write_bytes(b"partial")
    assert verify(directory).ok
    with AuditLog.open(directory, key, segment_records=4):
        pass
    assert not plain.exists() and packed.exists()
    assert not (directory / "segment-000002.log.zst.tmp").exists()
    assert verify(directory).ok


def test_a_discarded_plain_segment_left_behind_is_ignored_and_removed(tmp_path, key):
    """A crash while the plain copy of a compressed segment is shrunk (renamed .log.del
    first): verify ignores the leftover, half-shrunk or not, and open removes it."""
    directory = tmp_path / "log"
    make_log(directory, key, batches=(4, 4), segment_records=4)
    packed = directory / "segment-000001.log.zst"
    leftover = directory / "segment-000001.log.del"
    lines = read_lines(packed)
    write_lines(leftover, lines[: len(lines) // 2])  # shrunk halfway, then the crash
    assert verify(directory).ok
    with AuditLog.open(directory, key, segment_records=4):
        pass
    assert not leftover.exists() and packed.exists()
    assert verify(directory).ok


def test_compression_writes_and_discards_in_steps(tmp_path, key, monkeypatch):
    """With steps smaller than a segment, the closed segments are compressed and the plain
    copies removed as in one go: the same records, a log that verifies, no .del left."""
    monkeypatch.setattr(segments, "FLUSH_STEP", 64)
    monkeypatch.setattr(segments, "SHRINK_STEP", 100)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(segments.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    directory = tmp_path / "log"
    make_log(directory, key, batches=(4, 4, 4), segment_records=4)
    names = sorted(p.name for p in directory.iterdir())
    assert "segment-000001.log.zst" in names and "segment-000002.log.zst" in names
    assert not [n for n in names if n.endswith((".del", ".tmp"))]
    assert len(synced) > 4  # stepped: many flushes per segment
    report = verify(directory)
    assert report.ok, report.first_break
    assert len(list(search(directory))) == 12


# ----------------------------------------------------------------------------- unavailable


@pytest.mark.parametrize(
    ("call", "code"),
    [("write", errno.ENOSPC), ("write", errno.EROFS), ("fsync", errno.EIO)],
)
def test_write_failure_stops_the_log(tmp_path, key, monkeypatch, call, code):
    directory = tmp_path / "log"
    log = AuditLog.open(directory, key)
    seqs = log.append_issuance(batch(0, 2))
    real = getattr(os, call)

    def failing(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, failing)
    with pytest.raises(AuditUnavailable, match=os.strerror(code)):
        log.append_issuance(batch(2, 10))
    monkeypatch.setattr(os, call, real)
    with pytest.raises(AuditUnavailable):  # refused even though the disk works again
        log.append_issuance(batch(2, 1))
    with pytest.raises(AuditUnavailable):
        log.append_key_event(KeyEvent("retire", KID, None, "alice", None))
    log.close()
    with AuditLog.open(directory, key) as log:
        assert log.append_issuance(batch(2, 1))[0] > seqs[-1]
    assert verify(directory).ok


def test_unwritable_directory_is_unavailable(tmp_path, key, monkeypatch):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(1,))
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(AuditUnavailable, match="Read-only file system"):
        AuditLog.open(directory, key)
    with pytest.raises(AuditUnavailable, match="Read-only file system"):
        AuditLog.open(tmp_path / "new", key)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_unavailable(tmp_path, key):
    directory = tmp_path / "log"
    make_log(directory, key, batches=(1,))
    (directory / "lock").unlink()
    directory.chmod(0o500)
    try:
        with pytest.raises(AuditUnavailable):
            AuditLog.open(directory, key)
    finally:
        directory.chmod(0o700)


# ----------------------------------------------------------------------------- audit key


def test_audit_key_file(tmp_path, key_file):
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key_file.read_bytes()
    with pytest.raises(AuditKeyError, match="refusing to overwrite"):
        AuditKey.create(key_file, PASSPHRASE)
    with pytest.raises(AuditKeyError, match=rf"{key_file}: cannot decrypt .*wrong passphrase"):
        AuditKey.load(key_file, b"wrong")
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(key_file.read_bytes()[:200])
    with pytest.raises(AuditKeyError, match=str(corrupt)):
        AuditKey.load(corrupt, PASSPHRASE)
    with pytest.raises(AuditKeyError, match=rf"{tmp_path / 'missing.key'}: .*not found"):
        AuditKey.load(tmp_path / "missing.key", PASSPHRASE)
    p256 = AuditKey.create(tmp_path / "p256.key", PASSPHRASE, algorithm="P-256")
    assert AuditKey.load(tmp_path / "p256.key", PASSPHRASE).fingerprint == p256.fingerprint
    make_log(tmp_path / "log", p256, batches=(2,))
    assert verify(tmp_path / "log", p256.public_key_pem()).ok


# ----------------------------------------------------------------------------- privacy, revocation


def test_revocation_hashes_match_an_independent_computation(tmp_path, key):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    der = ec_key.sign(b"payload", ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    es256 = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ps256 = rsa_key.sign(
        b"payload", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()
    )
    account = "uzi:abused-account"
    records = [
        record(1, alg=-7, account=account, signature=es256),
        record(2, alg=-37, account=account, signature=ps256),
        record(3, alg=-7, account="uzi:someone-else"),
    ]
    directory = tmp_path / "log"
    with AuditLog.open(directory, key) as log:
        log.append_issuance(records)

    def expected(rec, signed: bytes) -> tuple[str, str, str]:
        return (
            hashlib.sha256(rec.uvci.encode()).digest()[:16].hex(),
            hashlib.sha256(("NL" + rec.uvci).encode()).digest()[:16].hex(),
            hashlib.sha256(signed).digest()[:16].hex(),
        )

    got = revocations(directory, account)
    assert [(r.uci, r.countrycodeuci, r.signature) for r in got] == [
        expected(records[0], es256[:32]),  # ES256: the r half only
        expected(records[1], ps256),  # PS256: the whole signature
    ]
    assert [r.dcc_type for r in got] == ["t", "r"]


def test_no_clear_personal_data_in_the_files(tmp_path, key):
    directory = tmp_path / "log"
    records = batch(0, 12)
    with AuditLog.open(directory, key, segment_records=5) as log:
        log.append_issuance(records[:6])
        log.append_issuance(records[6:])
    newest = segment_files(directory)[-1]
    newest.write_bytes(newest.read_bytes() + b'{"t":"issue","seq')
    with AuditLog.open(directory, key, segment_records=5) as log:  # writes torn evidence
        assert log.recovered is not None
    contents = []
    for path in directory.iterdir():
        data = path.read_bytes()
        contents.append(data)
        if path.suffix == ".zst":
            contents.append(zstandard.ZstdDecompressor().decompress(data))
    assert any(b'"uvci_hash"' in c for c in contents)
    secrets = [NAME.encode(), DOB.encode(), b"DCCSIGNTEST"]
    secrets += [r.uvci.encode() for r in records]
    for blob in contents:
        for secret in secrets:
            assert secret not in blob


# ----------------------------------------------------------------------------- CLI


def test_cli_verify_exit_codes(tmp_path, key, capsys):
    directory = tmp_path / "log"
    seqs = make_log(directory, key)
    pub = tmp_path / "audit.pub.pem"
    pub.write_bytes(key.public_key_pem())

    code, out, _ = run_cli(capsys, "audit", "verify", directory)
    assert code == 0 and "intact: 15 records" in out and "limited trust" in out
    code, out, _ = run_cli(capsys, "audit", "verify", directory, "--audit-pubkey", pub, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["key_pinned"] and report["first_break"] is None

    path = segment_files(directory)[0]
    remove_record(path, seqs[4])
    code, out, _ = run_cli(capsys, "audit", "verify", directory, "--audit-pubkey", pub)
    assert code == 1 and f"BROKEN at segment 1, sequence {seqs[4]}" in out
    code, out, _ = run_cli(capsys, "audit", "verify", directory, "--json")
    assert code == 1 and json.loads(out)["first_break"]["sequence"] == seqs[4]

    code, _, err = run_cli(capsys, "audit", "verify", tmp_path / "nowhere")
    assert code == 4 and "no such audit log directory" in err
    code, _, err = run_cli(capsys, "audit", "verify", directory, "--audit-pubkey", path)
    assert code == 4 and "not a PEM public key" in err
    code, _, err = run_cli(capsys, "audit", "verify", directory, "--audit-pubkey", tmp_path / "x")
    assert code == 4 and "cannot read" in err
    code, _, _ = run_cli(capsys, "audit", "verify")
    assert code == 2


def test_cli_search_and_revocations(tmp_path, key, capsys):
    directory = tmp_path / "log"
    with AuditLog.open(directory, key, clock=Clock()) as log:
        log.append_issuance(batch(0, 6))
        log.append_key_event(KeyEvent("disable", KID, "es256-v", "alice", "abused account"))

    code, out, err = run_cli(capsys, "audit", "search", directory, "--client", "portal-a")
    assert code == 0 and out.count("portal-a") == 3 and "3 matching" in err
    code, out, _ = run_cli(
        capsys, "audit", "search", directory, "--account", "uzi:900000001", "--json"
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {r["account"] for r in rows} == {"uzi:900000001"} and len(rows) == 2
    code, out, _ = run_cli(
        capsys,
        "audit",
        "search",
        directory,
        "--kid",
        KID.hex(),
        "--since",
        "2024-05-01T09:00:00Z",
        "--until",
        "2024-05-02",
        "--key-events",
    )
    assert code == 0 and "disable by alice" in out and out.count("\n") == 7
    code, out, _ = run_cli(capsys, "audit", "search", directory, "--since", "2025-01-01")
    assert code == 0 and out == ""
    assert run_cli(capsys, "audit", "search", directory, "--kid", "abc")[0] == 2
    assert run_cli(capsys, "audit", "search", directory, "--since", "yesterday")[0] == 2
    assert run_cli(capsys, "audit", "search", tmp_path / "nowhere")[0] == 4

    code, out, _ = run_cli(
        capsys, "audit", "revocations", directory, "--account", "uzi:900000002", "--json"
    )
    doc = json.loads(out)
    expected = [hashlib.sha256(uvci(i).encode()).digest()[:16].hex() for i in (2, 5)]
    assert code == 0 and doc["count"] == 2 and doc["hashes"]["UCI"] == expected
    assert set(doc["hashes"]) == {"UCI", "COUNTRYCODEUCI", "SIGNATURE"}
    code, out, _ = run_cli(capsys, "audit", "revocations", directory, "--account", "uzi:900000002")
    assert code == 0 and expected[0] in out and "COUNTRYCODEUCI" in out
    assert run_cli(capsys, "audit", "revocations", directory)[0] == 2

    (directory / "segment-000001.log").write_bytes(b"not json\n")
    code, _, err = run_cli(capsys, "audit", "search", directory)
    assert code == 1 and "not JSON" in err


def test_cli_help_is_wired(capsys):
    code, out, _ = run_cli(capsys, "audit", "verify", "--help")
    assert code == 0 and "--audit-pubkey" in out and "--witness" in out
