"""keyd's columns (SIGN_COLUMNS): the codec's round trips and hostile variants, and the
native pair ``keyd_check_columns`` / ``audit_issue_columns`` against both implementations and
against the per-part functions they replace (same verdicts, same audit lines)."""

import json
import time
from array import array

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import _load_impl
from dccsign.dcc.issuer import claims_prefix
from dccsign.protocol.keyd import (
    MAX_COLUMN_ITEMS,
    MAX_KID_BATCHES,
    NEED_DATA,
    ColumnsResult,
    Connection,
    ItemError,
    KeydColumns,
    KeydProtocolError,
    KidsResult,
    MessageType,
    SignColumns,
    SignKids,
    SignPart,
)
from dccsign.testing.samples import sample

KID = bytes(range(8))
TIME = b"2026-11-23T09:12:44.021730Z"
PREV = "cd" * 32
NOW = int(time.time())


def _payload(n, *, iss="NL", iat=NOW - 60, exp=NOW + 86400, kind="v"):
    dcc = {**sample(kind), "dob": f"19{n % 90 + 10}"}
    group = next(g for g in ("v", "t", "r") if g in dcc)
    dcc[group] = [{**dcc[group][0], "ci": f"URN:UVCI:01:NL:COLS/{n:05d}"}]
    return claims_prefix(iss, iat, exp) + cbor2.dumps(dcc)


def _roundtrip(msg, max_frame=1 << 22):
    wire = Connection(max_frame).send(msg)
    conn = Connection(max_frame)
    conn.receive_data(wire)
    out = conn.next_event()
    assert conn.next_event() is NEED_DATA
    return wire, out


# ----------------------------------------------------------------------------- codec


def _mixed_parts(n_accounts=5, per=3):
    return [
        SignPart(
            f"portal-{a % 2}",
            f"uzi:{a}",
            tuple(_payload(a * 10 + i) for i in range(per)),
            None if a % 3 else f"op:{a}",
        )
        for a in range(n_accounts)
    ]


def test_columns_round_trip_with_mixed_accounts():
    parts = _mixed_parts()
    cols = KeydColumns.from_parts(parts)
    assert len(cols) == 15 and len(cols.accounts) == 5 and len(cols.clients) == 2
    wire, back = _roundtrip(SignColumns(9, KID, cols))
    assert wire[2] == MessageType.SIGN_COLUMNS and back == SignColumns(9, KID, cols)
    assert list(back.columns.parts()) == parts  # the old view: one run per part
    assert back.columns.payload_list() == [p for part in parts for p in part.payloads]


def test_concat_rebases_offsets_and_indices():
    a = KeydColumns.from_parts(_mixed_parts(3, 2))
    b = KeydColumns.from_parts([SignPart("portal-9", "uzi:x", (b"\xa0", b"\xa1\x01\x02"), "o")])
    merged = KeydColumns.concat([a, b, a])
    assert len(merged) == 2 * len(a) + len(b)
    assert list(merged.parts()) == [*a.parts(), *b.parts(), *a.parts()]
    merged.check()


def test_empty_columns_round_trip():
    cols = KeydColumns.from_parts([])
    _, back = _roundtrip(SignColumns(1, KID, cols))
    assert len(back.columns) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["c1", "c2", "é"]),
            st.text(min_size=1, max_size=12),
            st.none() | st.text(min_size=1, max_size=5),
            st.lists(st.binary(max_size=40), min_size=1, max_size=4),
        ),
        max_size=8,
    )
)
def test_columns_round_trip_property(raw):
    parts = [SignPart(c, a, tuple(p), o) for c, a, o, p in raw]
    cols = KeydColumns.from_parts(parts)
    _, back = _roundtrip(SignColumns(3, KID, cols))
    assert back.columns == cols
    assert [x for part in back.columns.parts() for x in part.payloads] == [
        x for part in parts for x in part.payloads
    ]


def test_result_round_trip_and_views():
    results = [b"s" * 64, (ItemError.INVALID_DCC, "bad"), b"t" * 64, (ItemError.INTERNAL, "x")]
    res = ColumnsResult.from_results(4, results)
    wire, back = _roundtrip(res)
    assert wire[2] == MessageType.SIGN_COLUMNS_RESULT and back == res
    assert back.results() == results and back.signature_list() == [b"s" * 64, b"t" * 64]
    everyone = ColumnsResult.refuse_all(5, 3, ItemError.KID_NOT_ACTIVE, "retired")
    assert _roundtrip(everyone)[1].results() == [(ItemError.KID_NOT_ACTIVE, "retired")] * 3


def _body(cols, **over):
    u = lambda a: array("I", a).tobytes()  # noqa: E731 - little-endian hosts only in CI
    body = {
        "kid": KID,
        "payloads": cols.payloads,
        "ends": cols.ends.tobytes(),
        "clients": list(cols.clients),
        "accounts": list(cols.accounts),
        "operators": list(cols.operators),
        "client_ix": cols.client_ix.tobytes(),
        "account_ix": cols.account_ix.tobytes(),
        "operator_ix": cols.operator_ix.tobytes(),
    }
    body.update({k: u(v) if isinstance(v, list) and k.endswith(("ix", "ends")) else v
                 for k, v in over.items()})  # fmt: skip
    return body


def _frame(body, mtype=MessageType.SIGN_COLUMNS):
    raw = cbor2.dumps(body)
    return bytes([0x4B, 1, mtype, 0]) + (7).to_bytes(4, "big") + len(raw).to_bytes(4, "big") + raw


def _refused(body, match, mtype=MessageType.SIGN_COLUMNS):
    conn = Connection(1 << 22)
    conn.receive_data(_frame(body, mtype))
    with pytest.raises(KeydProtocolError, match=match):
        conn.next_event()


def test_hostile_columns_get_precise_errors():
    cols = KeydColumns.from_parts(_mixed_parts(3, 2))  # 6 items, 3 accounts, 2 clients
    _refused(_body(cols, ends=[1, 2, 3]), "client_ix has 6 entries for 3 items")
    _refused(_body(cols, ends=[*cols.ends[:-1], cols.ends[-1] + 1]), "not the payloads' length")
    _refused(_body(cols, ends=[5, 3, *cols.ends[2:]]), "end offsets must not decrease")
    _refused(_body(cols, ends=b"\x01\x02\x03"), "ends: length 3 is not a multiple of 4")
    _refused(_body(cols, account_ix=[0, 0, 1, 1, 2, 3]), "index into accounts is out of range")
    _refused(_body(cols, client_ix=[0, 0, 0, 0, 0, 2**32 - 1]), "index into clients")
    _refused(_body(cols, operator_ix=[0, 0, 0, 0, 0, 9]), "index into operators")
    _refused(_body(cols, accounts=["a", 7, "c"]), "accounts must be text")
    _refused(_body(cols, clients=["a", None]), "clients must be text")
    _refused(_body(cols, operators=[None, 3]), "operators must be text or null")
    _refused(_body(cols, accounts=["a", "", "c"]), "1 to 1024 characters")
    _refused(_body(cols, accounts=["a", "x" * 1025, "c"]), "1 to 1024 characters")
    _refused(_body(cols, accounts=[f"a{i}" for i in range(7)]), "7 accounts for 6 items")
    _refused(_body(cols, kid=b"short"), "kid must be 8 bytes")
    _refused(_body(cols, payloads="text"), "'payloads' missing or of the wrong type")
    _refused({**_body(cols), "ends": [1, 2]}, "'ends' missing or of the wrong type")
    empty = KeydColumns.from_parts([])
    _refused(_body(empty, payloads=b"xx"), "payload bytes without items")


def test_hostile_results_get_precise_errors():
    good = {"codes": bytes([0, 11]), "sigs": b"s" * 64, "sig_ends": array("I", [64]).tobytes(),
            "reasons": ["bad"]}  # fmt: skip
    r = MessageType.SIGN_COLUMNS_RESULT
    _refused({**good, "codes": bytes([0, 99])}, "unknown item error", r)
    _refused({**good, "codes": bytes([0, 0])}, "1 signature ends for 2 signed items", r)
    _refused({**good, "sig_ends": array("I", [63]).tobytes()}, "do not cover", r)
    _refused({**good, "reasons": []}, "0 reasons for 1 refused items", r)
    _refused({**good, "reasons": [b"x"]}, "reasons must be text", r)


def test_item_count_is_bounded():
    n = MAX_COLUMN_ITEMS + 1
    cols = KeydColumns(b"", array("I", [0]) * n, ("c",), ("a",), (None,), array("I", [0]) * n,
                       array("I", [0]) * n, array("I", [0]) * n)  # fmt: skip
    with pytest.raises(KeydProtocolError, match="at most 65536"):
        Connection(1 << 24).send(SignColumns(1, KID, cols))
    _refused(_body(cols), "at most 65536")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_columns_never_crash(data):
    cols = KeydColumns.from_parts(_mixed_parts(3, 2))
    wire = Connection(1 << 22).send(SignColumns(1, KID, cols))
    pos = data.draw(st.integers(12, len(wire) - 1))
    mutated = bytearray(wire)
    mutated[pos] = data.draw(st.integers(0, 255))
    conn = Connection(1 << 22)
    conn.receive_data(bytes(mutated))
    try:
        msg = conn.next_event()
    except KeydProtocolError:
        return
    if msg is not NEED_DATA:
        assert isinstance(msg, SignColumns)
        msg.columns.check()


# ----------------------------------------------------------------- SIGN_KIDS (one per kid)

KID2 = bytes(range(8, 16))


def test_kids_round_trip():
    a = KeydColumns.from_parts(_mixed_parts(3, 2))
    b = KeydColumns.from_parts(_mixed_parts(2, 1))
    msg = SignKids(11, (SignColumns(0, KID, a), SignColumns(0, KID2, b)))
    wire, back = _roundtrip(msg)
    assert wire[2] == MessageType.SIGN_KIDS and back == msg and len(back) == 8
    results = (
        ColumnsResult.from_results(0, [b"s" * 64, (ItemError.INVALID_DCC, "bad")]),
        ColumnsResult.refuse_all(0, 3, ItemError.KID_NOT_ACTIVE, "retired"),
    )
    wire, back = _roundtrip(KidsResult(11, results))
    assert wire[2] == MessageType.SIGN_KIDS_RESULT and back == KidsResult(11, results)


def test_hostile_kids_get_precise_errors():
    cols = KeydColumns.from_parts(_mixed_parts(3, 2))
    good = _body(cols)
    k = MessageType.SIGN_KIDS
    _refused({"batches": []}, "0 batches; 1 to 64", k)
    _refused({"batches": [good, good]}, "a kid appears in two batches", k)
    _refused({"batches": [good, 7]}, "a batch is not a map", k)
    _refused({"batches": good}, "'batches' missing or of the wrong type", k)
    _refused({"batches": [good, {**good, "kid": b"short"}]}, "kid must be 8 bytes", k)
    _refused({"batches": [good, _body(cols, kid=KID2, ends=[1, 2, 3])]},
             "SIGN_KIDS: client_ix has 6 entries for 3 items", k)  # fmt: skip
    many = [_body(cols, kid=i.to_bytes(8, "big")) for i in range(MAX_KID_BATCHES + 1)]
    _refused({"batches": many}, "65 batches; 1 to 64", k)
    r = MessageType.SIGN_KIDS_RESULT
    _refused({"results": []}, "0 results; 1 to 64", r)
    _refused({"results": [{"codes": bytes([0])}]}, "'sigs' missing or of the wrong type", r)
    _refused({"results": [7]}, "a result is not a map", r)
    # and the sender never writes what the peer must refuse
    with pytest.raises(KeydProtocolError, match="a kid appears in two batches"):
        Connection().send(SignKids(1, (SignColumns(0, KID, cols),) * 2))
    with pytest.raises(KeydProtocolError, match="0 batches"):
        Connection().send(SignKids(1, ()))


def test_kids_item_count_is_bounded_over_all_batches():
    half = MAX_COLUMN_ITEMS // 2 + 1
    cols = KeydColumns(
        b"",
        array("I", [0]) * half,
        ("c",),
        ("a",),
        (None,),
        array("I", [0]) * half,
        array("I", [0]) * half,
        array("I", [0]) * half,
    )
    msg = SignKids(1, (SignColumns(0, KID, cols), SignColumns(0, KID2, cols)))
    with pytest.raises(KeydProtocolError, match="65538 items; at most 65536"):
        Connection(1 << 24).send(msg)
    _refused({"batches": [_body(cols), _body(cols, kid=KID2)]}, "at most 65536",
             MessageType.SIGN_KIDS)  # fmt: skip


# ----------------------------------------------------------------------------- checks


def _cols(payloads, clients=("portal",), client_ix=None):
    ends = array("I")
    size = 0
    for p in payloads:
        size += len(p)
        ends.append(size)
    return b"".join(payloads), ends, array("I", client_ix or [0] * len(payloads))


def _check(impl, payloads, *, client_ix=None, client_ok=b"\x01", limit=1000, nb=NOW - 1000,
           na=NOW + 10**6, latest=NOW + 60, allowed="vtr"):  # fmt: skip
    buf, ends, cix = _cols(payloads, client_ix=client_ix)
    return impl.keyd_check_columns(buf, ends, cix, client_ok, limit, nb, na, latest, allowed)


def test_check_codes_in_keyds_order(impl):
    payloads = [
        _payload(0),  # ok
        _payload(1, exp=NOW + 10**7),  # exp after the DSC
        _payload(2, iat=NOW - 5000),  # iat before the DSC
        _payload(3, iat=NOW, exp=NOW),  # exp not after iat
        _payload(4, iat=NOW + 61, exp=NOW + 90000),  # iat in the future
        _payload(5, kind="r"),  # type not allowed
        b"\xa0",  # a map, not a CWT
        b"\xff\x00",  # not CBOR
        _payload(8) + b"x" * 1000,  # too large (and malformed: size first)
        _payload(9),  # client not allowed
    ]
    codes, facts, malformed = _check(impl, payloads, client_ix=[0] * 9 + [1],
                                     client_ok=b"\x01\x00", allowed="vt")  # fmt: skip
    assert list(codes) == [0, 2, 3, 5, 4, 6, 1, 1, 12, 8]
    assert set(malformed) == {6, 7}
    assert malformed[7].startswith("not one CBOR item: ")
    assert len(facts) == 24 * len(payloads)
    assert facts[9 * 24 :] == bytes(24) and facts[6 * 24 : 9 * 24] == bytes(72)


def test_check_matches_cwt_facts_and_both_implementations_agree():
    native, python = _load_impl("native"), _load_impl("python")
    payloads = [_payload(i, kind="vtr"[i % 3]) for i in range(20)]
    payloads += [p[:-3] for p in payloads[:3]] + [b"", b"\x00", bytes(range(256))]
    a = _check(native, payloads)
    b = _check(python, payloads)
    assert a == b
    from dccsign.native._keydcols_py import unpack_facts

    for i, f in enumerate(native.cwt_facts(payloads)):
        if isinstance(f, str):
            assert a[2][i] == f
        else:
            iss, t, ci_len, ci_off, exp, iat = unpack_facts(a[1], i)
            assert (iss, t, exp, iat) == (f.iss, f.dcc_type, f.exp, f.iat)
            assert payloads[i][ci_off : ci_off + ci_len].decode() == f.uvci


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_check_of_mutated_payloads_agrees_between_implementations(data):
    native, python = _load_impl("native"), _load_impl("python")
    payloads = []
    for n in range(data.draw(st.integers(1, 4))):
        p = bytearray(_payload(n, kind=data.draw(st.sampled_from("vtr"))))
        for _ in range(data.draw(st.integers(0, 3))):
            p[data.draw(st.integers(0, len(p) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, 3))
        payloads.append(bytes(p[: len(p) - cut]))
    allowed = data.draw(st.sampled_from(["vtr", "v", "tr", ""]))
    assert _check(native, payloads, allowed=allowed) == _check(python, payloads, allowed=allowed)


def test_check_argument_errors_are_shared(impl):
    buf, ends, cix = _cols([_payload(0)])
    with pytest.raises(TypeError, match="ends must be an array"):
        impl.keyd_check_columns(buf, list(ends), cix, b"\x01", 9, 0, 0, 0, "v")
    with pytest.raises(ValueError, match="client index is out of range"):
        impl.keyd_check_columns(buf, ends, array("I", [3]), b"\x01", 9, 0, 0, 0, "v")
    with pytest.raises(ValueError, match="not the payloads' length"):
        impl.keyd_check_columns(buf + b"x", ends, cix, b"\x01", 9, 0, 0, 0, "v")


# ----------------------------------------------------------------------------- audit lines


def _audit_case(impl, parts, alg=-7):
    cols = KeydColumns.from_parts(parts)
    codes, facts, _ = impl.keyd_check_columns(
        cols.payloads,
        cols.ends,
        cols.client_ix,
        b"\x01" * len(cols.clients),
        10**4,
        NOW - 1000,
        NOW + 10**6,
        NOW + 60,
        "vtr",
    )
    assert not any(codes)
    selected = array("I", range(len(cols)))
    sigs = [bytes([i % 256]) * (64 if alg == -7 else 256) for i in range(len(cols))]
    sig_ends = array("I", [(i + 1) * len(sigs[0]) for i in range(len(sigs))])
    return cols, facts, selected, sigs, sig_ends


@pytest.mark.parametrize("alg", [-7, -37])
def test_audit_lines_of_a_mixed_batch_equal_the_per_part_lines(impl, alg):
    parts = [
        SignPart("portal-a", "uzi:1", (_payload(1), _payload(2))),
        SignPart("portal-b", 'uzi:"quoted"\n\x01é', (_payload(3),), "operator\\x"),
        SignPart("portal-a", "uzi:1", (_payload(4),), "op"),
        SignPart("portal-a", "uzi:3", (_payload(5, kind="t"), _payload(6, kind="r"))),
    ]
    cols, facts, selected, sigs, sig_ends = _audit_case(impl, parts, alg)
    blob, last = impl.audit_issue_columns(
        TIME,
        alg,
        KID,
        cols.clients,
        cols.accounts,
        cols.operators,
        cols.client_ix,
        cols.account_ix,
        cols.operator_ix,
        cols.payloads,
        cols.ends,
        facts,
        selected,
        b"".join(sigs),
        sig_ends,
        17,
        PREV,
    )
    # the same lines as the per-part function, one group per part
    heads, middles, sizes, isses, uvcis, types = [], [], [], [], [], ""
    for part in parts:
        account = json.dumps(part.account, ensure_ascii=False)
        client = json.dumps(part.client, ensure_ascii=False)
        operator = json.dumps(part.operator, ensure_ascii=False)
        heads.append(f'{{"account":{account},"alg":{alg},"client":{client},"iss":'.encode())
        middles.append(f',"kid":"{KID.hex()}","operator":{operator},"payload_sha256":"'.encode())
        sizes.append(len(part.payloads))
        for f in impl.cwt_facts(part.payloads):
            isses.append(f.iss)
            uvcis.append(f.uvci)
            types += f.dcc_type
    lines, prev = impl.audit_issue_groups(
        heads,
        middles,
        sizes,
        TIME,
        alg,
        isses,
        uvcis,
        types,
        cols.payload_list(),
        sigs,
        17,
        PREV,
    )
    assert blob.split(b"\n") == lines and last == prev
    assert json.loads(lines[2])["account"] == 'uzi:"quoted"\n\x01é'


def test_audit_columns_selected_subset_and_both_implementations_agree():
    native, python = _load_impl("native"), _load_impl("python")
    parts = [SignPart(f"c{i % 3}", f"uzi:{i}", (_payload(i),), None if i % 2 else "op")
             for i in range(12)]  # fmt: skip
    out = []
    for impl in (native, python):
        cols, facts, _, sigs, _ = _audit_case(impl, parts)
        selected = array("I", [1, 4, 5, 11])
        chosen = [sigs[i] for i in selected]
        ends = array("I", [64 * (k + 1) for k in range(len(chosen))])
        out.append(impl.audit_issue_columns(
            TIME, -7, KID, cols.clients, cols.accounts, cols.operators, cols.client_ix,
            cols.account_ix, cols.operator_ix, cols.payloads, cols.ends, facts, selected,
            b"".join(chosen), ends, 1, PREV,
        ))  # fmt: skip
    assert out[0] == out[1]
    entries = [json.loads(line) for line in out[0][0].split(b"\n")]
    assert [e["account"] for e in entries] == ["uzi:1", "uzi:4", "uzi:5", "uzi:11"]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]


def test_audit_columns_errors_are_shared(impl):
    parts = [SignPart("c", "a", (_payload(0), _payload(1)))]
    cols, facts, selected, sigs, sig_ends = _audit_case(impl, parts)

    def call(**over):
        args = dict(time=TIME, alg=-7, kid=KID, clients=cols.clients, accounts=cols.accounts,
                    operators=cols.operators, client_ix=cols.client_ix,
                    account_ix=cols.account_ix, operator_ix=cols.operator_ix,
                    payloads=cols.payloads, ends=cols.ends, facts=facts, selected=selected,
                    signatures=b"".join(sigs), sig_ends=sig_ends, seq=1, prev=PREV)  # fmt: skip
        args.update(over)
        return impl.audit_issue_columns(*args.values())

    assert call()[0].count(b"\n") == 1
    assert call(selected=array("I"), signatures=b"", sig_ends=array("I")) == (b"", PREV)
    with pytest.raises(ValueError, match=r"accounts\[0\] must be a non-empty string"):
        call(accounts=("",))
    with pytest.raises(ValueError, match=r"clients\[0\] is not valid Unicode text"):
        call(clients=("\ud800",))
    with pytest.raises(ValueError, match="record 1: an ES256 signature is 64 bytes"):
        call(signatures=b"".join(sigs)[:-1], sig_ends=array("I", [64, 127]))
    with pytest.raises(ValueError, match="selected item 1 has no facts"):
        call(facts=facts[:24] + bytes(24))
    with pytest.raises(ValueError, match="index into accounts is out of range"):
        call(account_ix=array("I", [0, 1]))
    # facts that would steer reads outside the payload (or overflow the UVCI scratch)
    for offset, value in ((4, b"\xff\xff\x00\x00"), (3, b"\xff"), (0, b"n")):
        bad = bytearray(facts)
        bad[24 + offset : 24 + offset + len(value)] = value
        with pytest.raises(ValueError, match="selected item 1: its facts do not describe"):
            call(facts=bytes(bad))
    with pytest.raises(ValueError, match="prev must be 64"):
        call(prev="x")
    with pytest.raises(TypeError, match="selected must be an array"):
        call(selected=[0, 1])


# ----------------------------------------------------------------------------- fast checks
#
# The native functions check the usual arguments in C and call the reference's checks only
# for anything unusual (to name the problem); these draw arguments around the usual ones and
# require the same answer from both implementations: the same result, or the same error.


class _Sub(array):
    """An array('I') subclass: the reference refuses it, so must the fast path."""


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except (TypeError, ValueError, OverflowError) as exc:
        return (type(exc).__name__, str(exc))


_CHECK_OVERRIDES = {
    "ends": lambda a: [
        list(a["ends"]),
        _Sub("I", a["ends"]),
        array("l", a["ends"]),
        a["ends"][:-1],
        array("I", reversed(a["ends"])),
    ],
    "client_ix": lambda a: [
        array("I", [5] * len(a["ends"])),
        a["client_ix"][:-1],
        _Sub("I", a["client_ix"]),
    ],
    "payloads": lambda a: [a["payloads"] + b"x", bytearray(a["payloads"])],
    "client_ok": lambda a: [b"", bytearray(b"\x01")],
    "max_payload": lambda a: [-1, True, 2**62, 2**70, 10.0, 0],
    "not_before": lambda a: [float("nan"), float("inf"), 5e18, -5e18, NOW - 1000, 1.5, -1.5],
    "not_after": lambda a: [float("-inf"), 4.5e18, NOW + 10**6, 1e300],
    "latest_iat": lambda a: [float("nan"), NOW + 60, -4e18, 3.9e18, 2**70],
    "allowed": lambda a: ["", "v", "rt", "vv", "x", "vtrv", b"v", None, "tvr"],
}


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_check_columns_fast_path_agrees_with_the_reference(data):
    native, python = _load_impl("native"), _load_impl("python")
    n = data.draw(st.integers(0, 4))
    buf, ends, cix = _cols([_payload(i) for i in range(n)])
    args = dict(payloads=buf, ends=ends, client_ix=cix, client_ok=b"\x01", max_payload=10**4,
                not_before=NOW - 1000.0, not_after=NOW + 10.0**6, latest_iat=NOW + 60.0,
                allowed="vtr")  # fmt: skip
    for name in data.draw(st.sets(st.sampled_from(sorted(_CHECK_OVERRIDES)), max_size=3)):
        args[name] = data.draw(st.sampled_from(_CHECK_OVERRIDES[name](args)))
    got = _outcome(native.keyd_check_columns, *args.values())
    assert got == _outcome(python.keyd_check_columns, *args.values())


_AUDIT_OVERRIDES = {
    "time": lambda a: ["x", b"t\xc3\xa9", b""],
    "alg": lambda a: [-37, True, -7.0, 0],
    "kid": lambda a: [KID[:7], bytearray(KID), "k" * 8],
    "clients": lambda a: [list(a["clients"]), ()],
    "accounts": lambda a: [("",), a["accounts"] * 2],
    "operators": lambda a: [(None,) * 3, ()],
    "client_ix": lambda a: [array("I", [9] * len(a["ends"])), _Sub("I", a["client_ix"])],
    "account_ix": lambda a: [a["account_ix"][:-1], list(a["account_ix"])],
    "operator_ix": lambda a: [array("I", [7] * len(a["ends"]))],
    "payloads": lambda a: [a["payloads"][:-1], bytearray(a["payloads"])],
    "ends": lambda a: [array("I", reversed(a["ends"])), _Sub("I", a["ends"])],
    "facts": lambda a: [a["facts"][:-1], bytearray(a["facts"])],
    "selected": lambda a: [array("I", [len(a["ends"])]), array("I"), _Sub("I", a["selected"])],
    "signatures": lambda a: [a["signatures"] + b"s", b""],
    "sig_ends": lambda a: [array("I", reversed(a["sig_ends"])), a["sig_ends"][:-1]],
    "seq": lambda a: [-1, 2**63, 2**63 - 1, True, 1.0],
    "prev": lambda a: ["CD" * 32, "cd" * 31, "gg" * 32, b"cd" * 32],
}


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_audit_columns_fast_path_agrees_with_the_reference(data):
    native, python = _load_impl("native"), _load_impl("python")
    n = data.draw(st.integers(1, 4))
    parts = [SignPart(f"c{i % 2}", f"uzi:{i}", (_payload(i),), None if i % 2 else "op")
             for i in range(n)]  # fmt: skip
    cols, facts, selected, sigs, sig_ends = _audit_case(native, parts)
    args = dict(time=TIME, alg=-7, kid=KID, clients=cols.clients, accounts=cols.accounts,
                operators=cols.operators, client_ix=cols.client_ix, account_ix=cols.account_ix,
                operator_ix=cols.operator_ix, payloads=cols.payloads, ends=cols.ends,
                facts=facts, selected=selected, signatures=b"".join(sigs), sig_ends=sig_ends,
                seq=1, prev=PREV)  # fmt: skip
    for name in data.draw(st.sets(st.sampled_from(sorted(_AUDIT_OVERRIDES)), max_size=3)):
        args[name] = data.draw(st.sampled_from(_AUDIT_OVERRIDES[name](args)))
    got = _outcome(native.audit_issue_columns, *args.values())
    assert got == _outcome(python.audit_issue_columns, *args.values())
