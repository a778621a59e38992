"""span_table: the distinct accounts / operators of a frame, both implementations."""

from __future__ import annotations

from array import array

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccsign.native import _walker_py as W
from dccsign.native._spantable_py import SPAN_ABSENT
from dccsign.testing.samples import varied_samples

DCC = varied_samples(1, seed=3)[0]


def _view(impl, accounts, operators):
    items = []
    for account, operator in zip(accounts, operators, strict=True):
        item = {"dcc": DCC, "account": account}
        if operator is not None:
            item["operator"] = operator
        items.append(item)
    return impl.walk_sign_batch(cbor2.dumps({"items": items}), 1000)


def _table_of_first(impl, view, fields, n, **kw):
    """``span_table`` of the span columns *fields* over items 0 to *n* - 1 of *view*."""
    return impl.span_table(view.data, view.columns, W.NFIELDS, fields, array("I", range(n)), **kw)


def _expected(values, rows):
    table: list[str] = []
    index = []
    for r in rows:
        v = values[r]
        if v is None:
            index.append(SPAN_ABSENT)
            continue
        if v not in table:
            table.append(v)
        index.append(table.index(v))
    return [t.encode() for t in table], index


_names = st.sampled_from(["uzi:1", "uzi:2", "uzi:10", "Zoë", "a" * 200, "uzi:1 "])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_names, st.none() | _names), min_size=1, max_size=60), st.data())
def test_the_table_is_the_distinct_spans_in_order_of_first_appearance(impl, pairs, data):
    accounts = [a for a, _ in pairs]
    operators = [o for _, o in pairs]
    view = _view(impl, accounts, operators)
    rows = data.draw(st.lists(st.integers(0, len(pairs) - 1), max_size=len(pairs)))
    rows = array("I", rows)
    for values, fields in (
        (accounts, (W.ACCOUNT_OFF, W.ACCOUNT_LEN)),
        (operators, (W.OPERATOR_OFF, W.OPERATOR_LEN)),
    ):
        table, index = impl.span_table(view.data, view.columns, W.NFIELDS, fields, rows)
        want_table, want_index = _expected(values, rows)
        assert table == want_table and list(index) == want_index
        assert isinstance(index, array) and index.typecode == "I"


def test_many_distinct_accounts(impl):
    """A frame of 1,000 items, every account different but for a few repeats: the hash table
    grows with the frame, never probes forever."""
    accounts = [f"uzi:{i % 997}" for i in range(1000)]
    view = _view(impl, accounts, [None] * 1000)
    table, index = _table_of_first(impl, view, (W.ACCOUNT_OFF, W.ACCOUNT_LEN), 1000)
    assert len(table) == 997 and [table[k].decode() for k in index] == accounts


def test_bad_arguments_are_refused_alike(impl):
    view = _view(impl, ["uzi:1"], [None])
    fields = (W.ACCOUNT_OFF, W.ACCOUNT_LEN)
    with pytest.raises(TypeError):
        impl.span_table(view.data, view.columns, W.NFIELDS, fields, [0])
    with pytest.raises(ValueError, match="row 1 is not an item"):
        impl.span_table(view.data, view.columns, W.NFIELDS, fields, array("I", [1]))
    with pytest.raises(ValueError, match="column numbers"):
        impl.span_table(view.data, view.columns, W.NFIELDS, (W.NFIELDS, 0), array("I", [0]))
    with pytest.raises(ValueError, match="whole number"):
        impl.span_table(view.data, view.columns[:-4], W.NFIELDS, fields, array("I", [0]))
    assert impl.span_table(view.data, view.columns, W.NFIELDS, fields, array("I")) == (
        [],
        array("I"),
    )


def test_base_and_absent_place_the_table_in_a_larger_one(impl):
    """Operators: "no operator" first (0), the distinct names after it."""
    view = _view(impl, ["uzi:1"] * 4, [None, "op:a", None, "op:b"])
    fields = (W.OPERATOR_OFF, W.OPERATOR_LEN)
    table, index = _table_of_first(impl, view, fields, 4, base=1, absent=0)
    assert table == [b"op:a", b"op:b"] and list(index) == [0, 1, 0, 2]
    with pytest.raises(ValueError, match="uint32"):
        _table_of_first(impl, view, fields, 4, base=-1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.data())
def test_gather_lays_pieces_out_in_item_order(impl, n, data):
    groups, want = [], [b""] * n
    for _group in range(data.draw(st.integers(0, 3))):
        rows = data.draw(st.lists(st.integers(0, max(n - 1, 0)), unique=True, max_size=n))
        rows = rows if n else []
        pieces = [data.draw(st.binary(max_size=9)) for _ in rows]
        ends, size = array("I"), 0
        for p in pieces:
            size += len(p)
            ends.append(size)
        groups.append((array("I", rows), b"".join(pieces), ends))
        for r, p in zip(rows, pieces, strict=True):
            want[r] += p
    buf, offsets = impl.gather_spans(n, groups)
    assert len(offsets) == n + 1 and offsets[0] == 0
    assert [buf[offsets[i] : offsets[i + 1]] for i in range(n)] == want


def test_gather_and_fill_refuse_bad_columns_alike(impl):
    with pytest.raises(ValueError, match="piece"):
        impl.gather_spans(2, [(array("I", [2]), b"ab", array("I", [2]))])
    with pytest.raises(ValueError, match="piece"):
        impl.gather_spans(2, [(array("I", [0, 1]), b"ab", array("I", [2, 1]))])
    with pytest.raises(ValueError, match="same length"):
        impl.gather_spans(2, [(array("I", [0]), b"ab", array("I", [1, 2]))])
    with pytest.raises(TypeError):
        impl.gather_spans(2, [([0], b"ab", array("I", [2]))])
    target = array("I", [7, 7, 7])
    impl.fill_rows(target, array("I", [0, 2]), 5)
    assert list(target) == [5, 7, 5]
    with pytest.raises(ValueError, match="beyond"):
        impl.fill_rows(target, array("I", [3]), 1)
