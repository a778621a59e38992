"""The quota window arithmetic (``native.quota_*``, reference ``native/_quota_py.py``): both
implementations change the same lists and the same ``OrderedDict`` in the same way and give
the same answers and errors. ``QuotaTracker``'s own rules are tested in test_policy.py."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import _load_impl

PER_MINUTE = ((0, 5, 61),)
TWO = ((0, 7, 61), (1, 40, 61))
ALL = ((0, 9, 61), (1, 50, 61), (2, 400, 25))


def _both():
    return _load_impl("python"), _load_impl("native")


def test_add_take_back_and_expire_step_by_step(impl):
    usage = [None, None, None]
    assert impl.quota_add(usage, TWO, (100, 1, 0), 3) is True
    assert usage == [[3, 100, 3], [3, 1, 3], None]
    assert impl.quota_add(usage, TWO, (100, 1, 0), 2) is True  # same buckets: added there
    assert usage == [[5, 100, 5], [5, 1, 5], None]
    assert impl.quota_add(usage, TWO, (101, 1, 0), 3) is False  # 8 > 7 per minute
    assert usage == [[8, 100, 5, 101, 3], [8, 1, 8], None]
    impl.quota_take_back(usage, TWO, 3)
    assert usage == [[5, 100, 5], [5, 1, 5], None]
    # 61 buckets later the minute window has forgotten bucket 100; the hour has not.
    assert impl.quota_add(usage, TWO, (161, 2, 0), 7) is True
    assert usage == [[7, 161, 7], [12, 1, 5, 2, 7], None]
    impl.quota_expire(usage[1], 1)
    assert usage[1] == [7, 2, 7]
    impl.quota_remove_newest(usage[1], 100)  # never below zero
    assert usage[1] == [0]


def test_a_limit_beyond_64_bits_is_no_limit(impl):
    usage = [None, None, None]
    assert impl.quota_add(usage, ((2, 10**30, 25),), (0, 0, 7), 2**40) is True
    assert usage[2] == [2**40, 7, 2**40]


def test_charge_known_stops_at_new_and_at_refused_accounts(impl):
    table = OrderedDict()
    for name in ("a", "b", "c", "d"):
        table["p", name] = [None, None, None]
    impl.quota_add(table["p", "c"], PER_MINUTE, (10, 0, 0), 5)  # c is full
    accounts = ["b", "a", "new", "c", "d"]
    counts = [1, 2, 1, 1, 1]
    assert impl.quota_charge_known(table, "p", accounts, counts, PER_MINUTE, (10, 0, 0), 0) == (
        2,
        False,
    )
    assert list(table) == [("p", "c"), ("p", "d"), ("p", "b"), ("p", "a")]
    assert table["p", "a"][0] == [2, 10, 2] and table["p", "b"][0] == [1, 10, 1]
    # The caller inserts "new" itself and goes on after it: c does not fit, and is moved
    # to the recent end with nothing added.
    assert impl.quota_charge_known(table, "p", accounts, counts, PER_MINUTE, (10, 0, 0), 3) == (
        3,
        True,
    )
    assert list(table)[-1] == ("p", "c") and table["p", "c"][0] == [5, 10, 5]
    assert impl.quota_charge_known(table, "p", accounts, counts, PER_MINUTE, (10, 0, 0), 4) == (
        5,
        False,
    )
    assert impl.quota_charge_known(table, "p", accounts, counts, PER_MINUTE, (10, 0, 0), 9) == (
        5,
        False,
    )


def test_charge_known_takes_in_new_accounts_while_the_table_has_room(impl):
    """insert=(spans, max_accounts): a new account whose units fit goes in at the recent
    end (up to two idle accounts at the old end dropped first); one whose units exceed a
    limit, or a full table, stops the call untouched (the caller's slow path)."""
    spans = (61, 61, 25)
    table: OrderedDict = OrderedDict()
    table["p", "idle"] = [[2, 3, 2], None, None]  # its units are in bucket 3: long expired
    table["p", "idle2"] = [[0], None, None]
    table["p", "busy"] = [[1, 100, 1], None, None]
    buckets = (100, 1, 0)
    insert = (spans, 4)
    got = impl.quota_charge_known(table, "p", ["n1"], [2], PER_MINUTE, buckets, 0, insert)
    assert got == (1, False)
    assert list(table) == [("p", "busy"), ("p", "n1")]  # "idle" and "idle2" were dropped
    got = impl.quota_charge_known(
        table, "p", ["n1", "busy", "n2"], [0, 1, 3], PER_MINUTE, buckets, 1, insert
    )
    assert got == (3, False)
    # "busy" is not idle: nothing was dropped for n2.
    assert list(table) == [("p", "n1"), ("p", "busy"), ("p", "n2")]
    assert table["p", "n1"] == [[2, 100, 2], None, None]
    assert table["p", "n2"] == [[3, 100, 3], None, None]
    assert table["p", "busy"] == [[2, 100, 2], None, None]
    # Over the limit (PER_MINUTE allows 5): untouched, for the caller to refuse.
    assert impl.quota_charge_known(table, "p", ["big"], [11], PER_MINUTE, buckets, 0, insert) == (
        0, False,
    )  # fmt: skip
    assert ("p", "big") not in table
    # A full table (4 accounts): the caller evicts and warns; nothing is done here.
    table["p", "x"] = [None, None, None]
    assert impl.quota_charge_known(table, "p", ["n3"], [1], PER_MINUTE, buckets, 0, insert) == (
        0, False,
    )  # fmt: skip
    assert len(table) == 4 and ("p", "n3") not in table
    with pytest.raises(ValueError, match="spans"):
        impl.quota_charge_known(table, "p", ["n3"], [1], PER_MINUTE, buckets, 0, ((1, 2), 9))
    with pytest.raises(ValueError, match="insert"):
        impl.quota_charge_known(table, "p", ["n3"], [1], PER_MINUTE, buckets, 0, (spans,))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda q: q.quota_add([None, None], PER_MINUTE, (0, 0, 0), 1), TypeError, "three"),
        (lambda q: q.quota_add([None] * 3, ((3, 1, 1),), (0, 0, 0), 1), ValueError, "kind"),
        (lambda q: q.quota_add([None] * 3, ((0, 1),), (0, 0, 0), 1), ValueError, "each limit"),
        (lambda q: q.quota_add([None] * 3, PER_MINUTE, (0, 0), 1), ValueError, "buckets"),
        (lambda q: q.quota_take_back([None] * 2, PER_MINUTE, 1), TypeError, "three"),
        (
            lambda q: q.quota_charge_known(
                OrderedDict({("p", "a"): (None, None, None)}),
                "p",
                ["a"],
                [1],
                PER_MINUTE,
                (0, 0, 0),
                0,
            ),
            TypeError,
            "three",
        ),
        (
            lambda q: q.quota_charge_known(
                OrderedDict(), "p", ["a"], [1], PER_MINUTE, (0, 0, 0), -1
            ),
            ValueError,
            "start",
        ),
    ],
)
def test_both_refuse_malformed_arguments_alike(call, error, message):
    for impl in _both():
        with pytest.raises(error, match=message):
            call(impl)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "take_back", "charge", "charge_new"]),
        st.integers(0, 5),  # account
        st.integers(1, 6),  # units
        st.integers(0, 4),  # clock steps forward (seconds, scaled per kind below)
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, limits=st.sampled_from([PER_MINUTE, TWO, ALL]))
def test_both_implementations_change_the_state_alike(ops, limits):
    states = []
    for impl in _both():
        table: OrderedDict = OrderedDict()
        answers = []
        now = 1_000_000
        for op, account, n, step in ops:
            now += step * 37  # crosses minute buckets, hour buckets now and then
            buckets = (now, now // 60, now // 3600)
            key = ("p", f"acct{account}")
            if op in ("charge", "charge_new"):
                names = [f"acct{(account + j) % 6}" for j in range(3)]
                counts = [n, 1, n]
                insert = ((61, 61, 25), 4) if op == "charge_new" else None
                answers.append(
                    impl.quota_charge_known(table, "p", names, counts, limits, buckets, 0, insert)
                )
                continue
            usage = table.setdefault(key, [None, None, None])
            if op == "add":
                answers.append(impl.quota_add(usage, limits, buckets, n))
            elif any(w is not None for w in usage[:1]) and all(
                usage[kind] is not None for kind, _l, _s in limits
            ):
                impl.quota_take_back(usage, limits, n)
        states.append((answers, list(table.items()), copy.deepcopy(dict(table))))
    assert states[0] == states[1]


def test_quota_idle_expires_what_has_left_every_window(impl):
    spans = (61, 61, 25)
    usage = [[3, 10, 1, 70, 2], None, [4, 2, 4]]
    assert impl.quota_idle(usage, (100, 0, 20), spans) is False  # minute 70 still counts
    assert usage[0] == [2, 70, 2]  # bucket 10 expired on the way
    assert impl.quota_idle(usage, (200, 0, 20), spans) is False  # the day window still counts
    assert impl.quota_idle(usage, (200, 0, 30), spans) is True
    assert usage[0] == [0] and usage[2] == [0]
    assert impl.quota_idle([None, None, None], (0, 0, 0), spans) is True
    with pytest.raises(TypeError, match="three"):
        impl.quota_idle([None], (0, 0, 0), spans)
    with pytest.raises(ValueError, match="one entry per window kind"):
        impl.quota_idle([None, None, None], (0, 0), spans)
