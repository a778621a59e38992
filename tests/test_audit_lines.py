"""The audit log's issue lines (``audit_issue_lines``) against both implementations.

The format is specified in engine/audit.py; these tests recompute every field with hashlib
and json rather than trusting either implementation.
"""

import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccsign.audit import revocation_hashes
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
