"""The audit log's issue lines (``audit_issue_lines``) against both implementations.

The format is specified in docs/audit-format.md; these tests recompute every field with hashlib
and json rather than trusting either implementation.
"""

import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccsign.audit.records import revocation_hashes
from dccsign.native import implementation

HEAD = '{"account":"uzi:9000é","alg":-7,"client":"portal-a","iss":'.encode()
MIDDLE = b',"kid":"0011223344556677","operator":null,"payload_sha256":"'
TIME = b"2026-11-23T09:12:44.021730Z"
PREV = "ab" * 32


def _args(n=3, alg=-7, **over):
    args = {
        "head": HEAD if alg == -7 else HEAD.replace(b"-7", b"-37"),
        "middle": MIDDLE,
        "time": TIME,
        "alg": alg,
        "isses": ["NL"] * n,
        "uvcis": [f"URN:UVCI:01:NL:GP/{i:04d}" for i in range(n)],
        "dcc_types": "vtr"[:n] if n <= 3 else "v" * n,
        "payloads": [os.urandom(300 + i) for i in range(n)],
        "signatures": [os.urandom(64 if alg == -7 else 256) for _ in range(n)],
        "seq": 41,
        "prev": PREV,
    }
    args.update(over)
    return args


@pytest.mark.parametrize("alg", [-7, -37])
def test_lines_match_the_documented_format(impl, alg):
    args = _args(alg=alg)
    lines, last = impl.audit_issue_lines(**args)
    prev = PREV
    for i, line in enumerate(lines):
        entry = json.loads(line)
        # canonical JSON: keys sorted, no whitespace, UTF-8 as is
        assert (
            line
            == json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        )
        uvci = args["uvcis"][i]
        assert entry == {
            "account": "uzi:9000é",
            "alg": alg,
            "client": "portal-a",
            "iss": "NL",
            "kid": "0011223344556677",
            "operator": None,
            "payload_sha256": hashlib.sha256(args["payloads"][i]).hexdigest(),
            "prev": prev,
            "rev": revocation_hashes(uvci, "NL", args["signatures"][i], alg),
            "seq": 41 + i,
            "t": "issue",
            "time": TIME.decode(),
            "type": args["dcc_types"][i],
            "uvci_hash": hashlib.sha256(uvci.encode()).hexdigest(),
        }
        prev = hashlib.sha256(line).hexdigest()
    assert last == prev


def test_es256_signature_hash_covers_r_only(impl):
    args = _args(n=1)
    sig = args["signatures"][0]
    (line,), _ = impl.audit_issue_lines(**args)
    assert json.loads(line)["rev"]["SIGNATURE"] == hashlib.sha256(sig[:32]).hexdigest()[:32]


def test_empty_batch_keeps_the_chain(impl):
    assert impl.audit_issue_lines(**_args(n=0)) == ([], PREV)


def test_non_ascii_uvci_is_hashed_as_utf8(impl):
    args = _args(n=1, uvcis=["URN:UVCI:01:NL:Ä"], seq=2**63 - 1)
    (line,), _ = impl.audit_issue_lines(**args)
    entry = json.loads(line)
    assert entry["uvci_hash"] == hashlib.sha256("URN:UVCI:01:NL:Ä".encode()).hexdigest()
    assert entry["seq"] == 2**63 - 1


@pytest.mark.parametrize(
    ("over", "error", "message"),
    [
        ({"isses": ["NL", "nl", "NL"]}, ValueError, "record 1: iss must be two ASCII capitals"),
        ({"isses": ["NL", "NL", "NLD"]}, ValueError, "record 2: iss must be two ASCII"),
        ({"dcc_types": "vx?"}, ValueError, "record 1: dcc_type must be 'v', 't' or 'r'"),
        ({"uvcis": ["", "a", "b"]}, ValueError, "record 0: uvci must be a non-empty string"),
        ({"uvcis": ["a", "b", "x" * 1025]}, ValueError, "record 2: uvci must be a non-empty"),
        ({"uvcis": ["a", "\ud800", "b"]}, ValueError, "record 1: uvci is not valid Unicode"),
        ({"signatures": [b"s" * 64, b"s" * 63, b"s" * 64]}, ValueError, "record 1: an ES256"),
        ({"signatures": [b"s" * 64, bytearray(64), b"s" * 64]}, TypeError, "signature 1 must"),
        ({"payloads": [b"p", "p", b"p"]}, TypeError, "payload 1 must be bytes"),
        ({"alg": -8}, ValueError, "alg must be -7"),
        ({"prev": "AB" * 32}, ValueError, "prev must be 64 lower-case hex digits"),
        ({"prev": "ab" * 31}, ValueError, "prev must be 64"),
        ({"seq": -1}, ValueError, "seq must be a non-negative 64-bit integer"),
        ({"seq": 2**63}, ValueError, "seq must be"),
        ({"dcc_types": "vt"}, ValueError, "differ in length"),
        ({"time": "2026"}, TypeError, "time must be bytes"),
        ({"time": "é".encode()}, ValueError, "time must be ASCII"),
        ({"dcc_types": list("vtr")}, TypeError, "dcc_types must be a str"),
    ],
)
def test_refuses_bad_records_by_index(impl, over, error, message):
    with pytest.raises(error, match=message.replace("?", r"\?")):
        impl.audit_issue_lines(**_args(**over))


def test_first_index_names_records_of_later_batches(impl):
    with pytest.raises(ValueError, match="record 11: dcc_type"):
        impl.audit_issue_lines(**_args(dcc_types="vxr"), first_index=10)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=90),
            st.sampled_from("vtr"),
            st.binary(max_size=400),
            st.binary(min_size=64, max_size=64),
        ),
        max_size=8,
    ),
    st.integers(0, 2**63 - 100),
)
def test_implementations_agree(impl, items, seq):
    args = _args(
        n=len(items),
        uvcis=[i[0] for i in items],
        dcc_types="".join(i[1] for i in items),
        payloads=[i[2] for i in items],
        signatures=[i[3] for i in items],
        seq=seq,
    )
    assert impl.audit_issue_lines(**args) == implementation("python").audit_issue_lines(**args)


def _groups_args(sizes, **over):
    """Arguments of audit_issue_groups: one head/middle per group, records over all groups."""
    n = sum(sizes)
    args = _args(n=n, dcc_types="".join("vtr"[i % 3] for i in range(n)))
    head, middle = args.pop("head"), args.pop("middle")
    args["heads"] = [head.replace(b"portal-a", f"portal-{g}".encode()) for g in range(len(sizes))]
    args["middles"] = [
        middle.replace(b"null", f'"op:{g}"'.encode()) if g % 2 else middle
        for g in range(len(sizes))
    ]
    args["sizes"] = sizes
    args.update(over)
    return args


@pytest.mark.parametrize("sizes", [[3], [1, 1, 1], [2, 0, 3], [0], [], [4, 1]])
def test_groups_equal_one_call_per_group(impl, sizes):
    """One call for many groups (keyd's micro-batch of parts) gives the lines and chain of one
    audit_issue_lines call per group, chained one after the other."""
    args = _groups_args(sizes)
    lines, last = impl.audit_issue_groups(**args)
    expected: list[bytes] = []
    prev, seq, start = args["prev"], args["seq"], 0
    for head, middle, size in zip(args["heads"], args["middles"], sizes, strict=True):
        end = start + size
        group, prev = implementation("python").audit_issue_lines(
            head,
            middle,
            args["time"],
            args["alg"],
            args["isses"][start:end],
            args["uvcis"][start:end],
            args["dcc_types"][start:end],
            args["payloads"][start:end],
            args["signatures"][start:end],
            seq,
            prev,
        )
        expected += group
        seq += size
        start = end
    assert (lines, last) == (expected, prev)
    groups = [g for g, size in enumerate(sizes) for _ in range(size)]
    for line, g in zip(lines, groups, strict=True):
        assert json.loads(line)["client"] == f"portal-{g}"


@pytest.mark.parametrize(
    ("over", "error", "message"),
    [
        ({"sizes": [2, 3]}, ValueError, "add up to the record count"),
        ({"sizes": [5, -1]}, ValueError, "non-negative integers"),
        ({"sizes": [1.0, 3]}, ValueError, "non-negative integers"),
        ({"sizes": [4]}, ValueError, "heads, middles and sizes differ in length"),
        ({"heads": [b"{", "{"]}, TypeError, "head must be bytes"),
        ({"middles": [b",", bytearray(b",")]}, TypeError, "middle must be bytes"),
    ],
)
def test_groups_refuse_bad_shapes(impl, over, error, message):
    args = _groups_args([1, 3])
    args.update(over)
    with pytest.raises(error, match=message):
        impl.audit_issue_groups(**args)


def test_groups_name_records_by_their_index_over_all_groups(impl):
    args = _groups_args([2, 2])
    args["dcc_types"] = "vtvx"
    with pytest.raises(ValueError, match="record 3: dcc_type"):
        impl.audit_issue_groups(**args)
