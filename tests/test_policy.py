"""Per-client policy and quotas (dccsign.server.policy): the file format, the static rules, the
quota windows, the bounded account table and reloading."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccsign.errors import DccSignError
from dccsign.server.policy import (
    DEFAULT_MAX_ACCOUNTS,
    ClientPolicy,
    Policy,
    PolicyError,
    PolicyFile,
    Quota,
    QuotaTracker,
    Refusal,
    RefusalCode,
)
from dccsign.testing.samples import sample

REPO = Path(__file__).resolve().parents[1]
KID = bytes.fromhex("d0ff3fe0ad2e2c1b")
OTHER_KID = bytes.fromhex("0011223344556677")
MINISTRY = "Ministry of Health Welfare and Sport"  # the "is" of every sample
ACCOUNT = "uzi:900012345"

FULL = {
    "clients": {
        "portal-a": {
            "kids": ["d0ff3fe0ad2e2c1b"],
            "types": ["v", "t", "r"],
            "countries": ["NL"],
            "issuers": [MINISTRY],
            "quota": {"per_hour": 100000},
            "account_quota": {"per_hour": 50, "per_day": 200},
            "disabled": False,
        },
        "portal-b": {"types": ["t"]},
    },
    "unix_uids": {"1000": "portal-a"},
    "default_account_quota": {"per_hour": 50},
}


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy_with(**client: object) -> Policy:
    """A policy with one client, "portal-a", with the given keys."""
    return Policy.from_dict({"clients": {"portal-a": client}}, source="test")


def problems_of(obj: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(obj, source="policy.json")
    return list(info.value.problems)


def write(path: Path, obj: object, *, mtime_ns: int | None = None) -> None:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


# ----------------------------------------------------------------------------- the file


def test_full_valid_file(tmp_path):
    path = tmp_path / "policy.json"
    write(path, FULL)
    policy = Policy.load(path)
    assert policy.source == str(path)
    assert set(policy.clients) == {"portal-a", "portal-b"}
    a = policy.client("portal-a")
    assert a == ClientPolicy(
        name="portal-a",
        kids=frozenset({KID}),
        types=frozenset({"v", "t", "r"}),
        countries=frozenset({"NL"}),
        issuers=frozenset({MINISTRY}),
        quota=Quota(per_hour=100000),
        account_quota=Quota(per_hour=50, per_day=200),
        disabled=False,
    )
    b = policy.client("portal-b")
    assert b is not None
    assert (b.kids, b.countries, b.issuers, b.quota, b.disabled) == (None, None, None, None, False)
    assert b.types == frozenset({"t"})
    assert b.account_quota == Quota(per_hour=50)  # the default
    assert policy.default_account_quota == Quota(per_hour=50)
    assert policy.client("portal-x") is None
    assert policy.resolve_uid(1000) == "portal-a"
    assert policy.resolve_uid(0) is None


def test_minimal_policy_and_upper_case_kid():
    policy = Policy.from_dict({"clients": {"c": {"kids": ["D0FF3FE0AD2E2C1B"]}}})
    client = policy.client("c")
    assert client is not None and client.kids == frozenset({KID})
    assert client.account_quota is None
    assert policy.resolve_uid(1000) is None
    assert Policy.from_dict({"clients": {}}).clients == {}


def test_documented_example_is_valid_and_means_what_the_text_says():
    text = (REPO / "docs" / "policy.md").read_text()
    example = re.search(r"```json\n(.*?)```", text, re.S)
    assert example is not None
    policy = Policy.from_dict(json.loads(example.group(1)), source="docs/policy.md")
    a = policy.client("cn:portal-a.example.nl")
    lab = policy.client("cn:testlab-portal.example.nl")
    batch = policy.client("local-batch")
    assert a is not None and lab is not None and batch is not None
    assert a.quota == Quota(per_minute=5000, per_hour=100000)
    assert a.account_quota == Quota(per_hour=50, per_day=200)
    assert lab.account_quota == Quota(per_hour=50, per_day=500)
    assert policy.check("cn:testlab-portal.example.nl", KID, "v", sample("v")) is not None
    assert policy.check("cn:testlab-portal.example.nl", KID, "t", sample("t")) is None
    assert policy.resolve_uid(1001) == "local-batch"
    assert batch.disabled


def test_documented_error_example_is_what_the_code_says():
    text = (REPO / "docs" / "policy.md").read_text()
    documented = re.search(r"```\n(/etc/dccsign/policy.json: .*?)\n```", text, re.S)
    assert documented is not None
    bad = {
        "clients": {"cn:portal-a.example.nl": {"kid": ["d0ff3fe0ad2e2c1b"], "types": ["v", "x"]}},
        "unix_uids": {"1001": "local"},
    }
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(bad, source="/etc/dccsign/policy.json")
    assert str(info.value) == documented.group(1)


BAD_CASES = [
    # unknown keys, at every level
    ({"clients": {}, "client": {}}, "client: unknown key (did you mean 'clients'?"),
    ({"clients": {"p": {"kid": []}}}, "clients.p.kid: unknown key (did you mean 'kids'?"),
    ({"clients": {"p": {"quota": {"per_hr": 5}}}}, "clients.p.quota.per_hr: unknown key"),
    (
        {"clients": {"p": {"account_quota": {"per_week": 5}}}},
        "clients.p.account_quota.per_week: unknown key (allowed:",
    ),
    ({"clients": {}, "default_account_quota": {"perday": 1}}, "default_account_quota.perday:"),
    # the top level
    ([], "(top level): expected an object, got an array"),
    ({}, "clients: missing"),
    ({"clients": []}, "clients: expected an object, got an array"),
    ({"clients": {"p": None}}, "clients.p: expected an object, got null"),
    # kids
    ({"clients": {"p": {"kids": ["d0ff3fe0ad2e2c1"]}}}, "clients.p.kids[0]: not 16 hex digits"),
    ({"clients": {"p": {"kids": ["d0ff3fe0ad2e2c1bb"]}}}, "clients.p.kids[0]: not 16 hex digits"),
    ({"clients": {"p": {"kids": ["g0ff3fe0ad2e2c1b"]}}}, "clients.p.kids[0]: not 16 hex digits"),
    ({"clients": {"p": {"kids": [" d0ff3fe0ad2e2c1"]}}}, "clients.p.kids[0]: not 16 hex digits"),
    ({"clients": {"p": {"kids": [12]}}}, "clients.p.kids[0]: expected a string of 16 hex"),
    (
        {"clients": {"p": {"kids": ["d0ff3fe0ad2e2c1b", "D0FF3FE0AD2E2C1B"]}}},
        "clients.p.kids[1]: duplicate of [0]",
    ),
    ({"clients": {"p": {"kids": []}}}, "clients.p.kids: empty array"),
    ({"clients": {"p": {"kids": "d0ff3fe0ad2e2c1b"}}}, "clients.p.kids: expected an array"),
    # types
    ({"clients": {"p": {"types": ["x"]}}}, "clients.p.types[0]: not a DCC type: 'x'"),
    ({"clients": {"p": {"types": ["v", "V"]}}}, "clients.p.types[1]: not a DCC type: 'V'"),
    ({"clients": {"p": {"types": ["vaccination"]}}}, "clients.p.types[0]: not a DCC type"),
    ({"clients": {"p": {"types": [1]}}}, "clients.p.types[0]: not a DCC type: 1"),
    ({"clients": {"p": {"types": ["v", "v"]}}}, "clients.p.types[1]: duplicate of [0]"),
    ({"clients": {"p": {"types": []}}}, "clients.p.types: empty array"),
    # countries and issuers
    ({"clients": {"p": {"countries": ["nl"]}}}, "clients.p.countries[0]: not a two-letter"),
    ({"clients": {"p": {"countries": ["NLD"]}}}, "clients.p.countries[0]: not a two-letter"),
    ({"clients": {"p": {"issuers": [""]}}}, "clients.p.issuers[0]: expected a non-empty string"),
    ({"clients": {"p": {"issuers": ["x" * 81]}}}, "clients.p.issuers[0]: expected a non-empty"),
    ({"clients": {"p": {"issuers": [None]}}}, "clients.p.issuers[0]: expected a non-empty"),
    # quota windows
    ({"clients": {"p": {"quota": {}}}}, "clients.p.quota: no window (give at least one of"),
    ({"clients": {"p": {"quota": {"per_hour": 0}}}}, "clients.p.quota.per_hour: expected a pos"),
    ({"clients": {"p": {"quota": {"per_day": -5}}}}, "clients.p.quota.per_day: expected a pos"),
    (
        {"clients": {"p": {"quota": {"per_minute": 1.5}}}},
        "clients.p.quota.per_minute: expected a positive integer, got the number 1.5",
    ),
    (
        {"clients": {"p": {"quota": {"per_minute": 10.0}}}},
        "clients.p.quota.per_minute: expected a positive integer, got the number 10.0",
    ),
    (
        {"clients": {"p": {"quota": {"per_hour": True}}}},
        "clients.p.quota.per_hour: expected a positive integer, got a boolean",
    ),
    (
        {"clients": {"p": {"account_quota": {"per_hour": "50"}}}},
        "clients.p.account_quota.per_hour: expected a positive integer, got the string '50'",
    ),
    ({"clients": {"p": {"quota": 100}}}, "clients.p.quota: expected an object, got the number"),
    ({"clients": {}, "default_account_quota": {}}, "default_account_quota: no window"),
    # client names
    ({"clients": {"a b": {}}}, "clients: invalid client name 'a b' (1 to 128 characters of"),
    ({"clients": {"": {}}}, "clients: invalid client name ''"),
    ({"clients": {"x" * 129: {}}}, "clients: invalid client name 'xxxx"),
    ({"clients": {"portál": {}}}, "clients: invalid client name 'portál'"),
    ({"clients": {"p/q": {}}}, "clients: invalid client name 'p/q'"),
    # the kill switch
    ({"clients": {"p": {"disabled": "yes"}}}, "clients.p.disabled: expected true or false, got"),
    ({"clients": {"p": {"disabled": 0}}}, "clients.p.disabled: expected true or false, got the"),
    # unix uids
    ({"clients": {"p": {}}, "unix_uids": {"01": "p"}}, "unix_uids.01: not a uid"),
    ({"clients": {"p": {}}, "unix_uids": {"-1": "p"}}, "unix_uids.-1: not a uid"),
    ({"clients": {"p": {}}, "unix_uids": {"4294967296": "p"}}, "unix_uids.4294967296: not a uid"),
    ({"clients": {"p": {}}, "unix_uids": {"x": "p"}}, "unix_uids.x: not a uid"),
    ({"clients": {"p": {}}, "unix_uids": {"7": "q"}}, "unix_uids.7: unknown client 'q'"),
    ({"clients": {"p": {}}, "unix_uids": {"7": 7}}, "unix_uids.7: expected a client name"),
    ({"clients": {"p": {}}, "unix_uids": ["p"]}, "unix_uids: expected an object, got an array"),
]


@pytest.mark.parametrize(("obj", "expected"), BAD_CASES, ids=[c[1][:48] for c in BAD_CASES])
def test_every_validation_error_names_its_path(obj, expected):
    problems = problems_of(obj)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


def test_error_message_names_the_source_and_every_problem():
    obj = copy.deepcopy(FULL)
    obj["clients"]["portal-a"]["kids"] = ["nothex"]
    obj["clients"]["portal-a"]["types"] = ["x"]
    obj["clients"]["portal-b"]["colour"] = "red"
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(obj, source="policy.json")
    err = info.value
    assert isinstance(err, DccSignError)
    assert err.source == "policy.json"
    assert err.problems == (
        "clients.portal-a.kids[0]: not 16 hex digits: 'nothex'",
        'clients.portal-a.types[0]: not a DCC type: \'x\' (one of "v", "t", "r")',
        "clients.portal-b.colour: unknown key (allowed: kids, types, countries, issuers, "
        "quota, account_quota, disabled, weight)",
    )
    assert str(err) == "policy.json: 3 problems: " + "; ".join(err.problems)


def test_valid_edge_values():
    name = "Aa0._:@-" * 16  # 128 characters, every allowed kind
    policy = Policy.from_dict(
        {
            "clients": {name: {"issuers": ["x" * 80], "quota": {"per_minute": 1}}},
            "unix_uids": {"0": name, "4294967295": name},
        }
    )
    assert policy.resolve_uid(0) == name
    assert policy.resolve_uid(2**32 - 1) == name


def test_file_errors(tmp_path):
    path = tmp_path / "policy.json"
    cases = {
        '{"clients": {"p": {}, "p": {"disabled": true}}}': "clients.p: duplicate key",
        '{"clients": {"p": {"types": ["v"], "types": ["t"]}}}': "clients.p.types: duplicate key",
        '{"clients": {"p": {}},\n  "unix_uids": {"1": "p",}}': "not JSON: line 2 column 26:",
        '{"clients": {"p": {"quota": {"per_hour": NaN}}}}': "not JSON: NaN is not a JSON value",
        "": "not JSON: line 1 column 1: Expecting value",
    }
    for text, expected in cases.items():
        write(path, text)
        with pytest.raises(PolicyError) as info:
            Policy.load(path)
        assert str(info.value).startswith(f"{path}: {expected}"), (text, str(info.value))
    path.write_bytes(b'{"clients": {"\xff": {}}}')
    with pytest.raises(PolicyError, match=r"policy\.json: not UTF-8 text \(byte 14\)"):
        Policy.load(path)
    with pytest.raises(PolicyError, match=r"missing\.json: cannot read: No such file"):
        Policy.load(tmp_path / "missing.json")


def test_quota_and_policy_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="at least one window"):
        Quota()
    with pytest.raises(ValueError, match="per_hour must be a positive int"):
        Quota(per_hour=0)
    with pytest.raises(ValueError, match="unknown client"):
        Policy({}, {5: "nobody"})


# ----------------------------------------------------------------------------- static rules


@pytest.fixture
def full_policy() -> Policy:
    return Policy.from_dict(FULL, source="test")


@pytest.mark.parametrize("dcc_type", ["v", "t", "r"])
def test_allowed_items_pass(full_policy, dcc_type):
    assert full_policy.check("portal-a", KID, dcc_type, sample(dcc_type)) is None


def test_unknown_client(full_policy):
    refusal = full_policy.check("portal-x", KID, "v", sample("v"))
    assert refusal == Refusal(RefusalCode.CLIENT_UNKNOWN, "unknown client 'portal-x'")


def test_kill_switch_comes_before_every_other_rule():
    policy = policy_with(kids=[OTHER_KID.hex()], disabled=True)
    refusal = policy.check("portal-a", KID, "x", {})
    assert refusal is not None
    assert refusal.code == "CLIENT_DISABLED"
    assert refusal.message == "client 'portal-a' is disabled"
    assert refusal.retry_after_s is None
    assert policy_with(disabled=False).check("portal-a", KID, "v", sample("v")) is None


def test_kid_not_allowed(full_policy):
    refusal = full_policy.check("portal-a", OTHER_KID, "v", sample("v"))
    assert refusal is not None
    assert refusal.code == RefusalCode.KID_NOT_ALLOWED
    assert refusal.message == (
        "client 'portal-a': kid 0011223344556677 not allowed (allowed: d0ff3fe0ad2e2c1b)"
    )
    # No kid chosen yet: only a client without a kids list passes.
    refusal = full_policy.check("portal-a", None, "v", sample("v"))
    assert refusal is not None and refusal.code == RefusalCode.KID_NOT_ALLOWED
    assert "no kid given" in refusal.message
    assert full_policy.check("portal-b", None, "t", sample("t")) is None


def test_type_not_allowed(full_policy):
    refusal = full_policy.check("portal-b", KID, "v", sample("v"))
    assert refusal is not None
    assert refusal.code == RefusalCode.TYPE_NOT_ALLOWED
    assert refusal.message == "client 'portal-b': DCC type 'v' not allowed (allowed: 't')"


@pytest.mark.parametrize(
    ("kind", "field", "value", "code", "message", "inexact"),
    [
        ("r", "co", "DE", "COUNTRY_NOT_ALLOWED",
         "client 'portal-a': r[0].co 'DE' not allowed (allowed: 'NL')", "nl"),
        ("t", "is", "Adolf's Test Shop", "ISSUER_NOT_ALLOWED",
         "client 'portal-a': t[0].is \"Adolf's Test Shop\" not allowed "
         "(allowed: 'Ministry of Health Welfare and Sport')", MINISTRY.lower()),
    ],
    ids=["country", "issuer"],
)  # fmt: skip
def test_entry_value_not_allowed(full_policy, kind, field, value, code, message, inexact):
    dcc = sample(kind)
    dcc[kind][0][field] = value
    refusal = full_policy.check("portal-a", KID, kind, dcc)
    assert refusal is not None
    assert refusal.code == RefusalCode[code]
    assert refusal.message == message
    dcc[kind][0][field] = inexact  # exact comparison
    assert full_policy.check("portal-a", KID, kind, dcc).code == code


@pytest.mark.parametrize(
    "dcc",
    [
        {},
        {"v": []},
        {"v": "NL"},
        {"v": [None]},
        {"v": [{"is": MINISTRY}]},
        {"v": [{"co": ["NL"], "is": MINISTRY}]},
        {"v": [{"co": None, "is": MINISTRY}]},
        [],
    ],
)
def test_malformed_dcc_is_refused_never_raised(full_policy, dcc):
    refusal = full_policy.check("portal-a", KID, "v", dcc)
    assert refusal is not None and refusal.code == RefusalCode.COUNTRY_NOT_ALLOWED


def test_country_and_issuer_only_read_when_restricted():
    assert policy_with(types=["v"]).check("portal-a", KID, "v", {}) is None
    policy = policy_with(issuers=[MINISTRY])
    assert policy.check("portal-a", KID, "v", {"v": [{"is": MINISTRY}]}) is None
    refusal = policy.check("portal-a", KID, "v", {"v": [{"co": "NL"}]})
    assert refusal is not None and refusal.code == "ISSUER_NOT_ALLOWED"
    assert "DCC without v[0].is" in refusal.message


def test_hostile_values_are_cut_short_in_messages(full_policy):
    dcc = sample("v")
    dcc["v"][0]["co"] = "X" * 10_000
    refusal = full_policy.check("portal-a", KID, "v", dcc)
    assert refusal is not None and len(refusal.message) < 200
    dcc["v"][0]["co"] = ["NL"] * 100_000
    refusal = full_policy.check("portal-a", KID, "v", dcc)
    assert refusal is not None and "v[0].co <list> not allowed" in refusal.message


# ----------------------------------------------------------------------------- quotas


def quota_policy(quota=None, account_quota=None, default=None) -> Policy:
    client: dict[str, object] = {}
    if quota is not None:
        client["quota"] = quota
    if account_quota is not None:
        client["account_quota"] = account_quota
    obj: dict[str, object] = {"clients": {"portal-a": client, "portal-b": {}}}
    if default is not None:
        obj["default_account_quota"] = default
    return Policy.from_dict(obj, source="test")


def test_no_quota_no_state():
    tracker = QuotaTracker(FakeClock())
    policy = quota_policy()
    for _ in range(1000):
        assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None
    assert len(tracker) == 0
    assert tracker.usage("portal-a") == {}


def test_unknown_client_and_bad_n():
    tracker = QuotaTracker(FakeClock())
    refusal = tracker.try_reserve(quota_policy(), "portal-x", ACCOUNT)
    assert refusal is not None and refusal.code == RefusalCode.CLIENT_UNKNOWN
    with pytest.raises(ValueError, match="n must be at least 1"):
        tracker.try_reserve(quota_policy(), "portal-a", ACCOUNT, 0)
    with pytest.raises(ValueError, match="n must be at least 1"):
        tracker.release("portal-a", ACCOUNT, 0)
    with pytest.raises(ValueError, match="max_accounts"):
        QuotaTracker(max_accounts=0)
    assert DEFAULT_MAX_ACCOUNTS == 100_000


def test_client_quota_per_minute_with_retry_after():
    clock = FakeClock(1000.0)
    tracker = QuotaTracker(clock)
    policy = quota_policy(quota={"per_minute": 3})
    for account in ("a", "b", "c"):  # the client quota covers all accounts
        assert tracker.try_reserve(policy, "portal-a", account) is None
        clock.t += 0.4  # 1000.0, 1000.4, 1000.8: all in the one-second bucket 1000
    refusal = tracker.try_reserve(policy, "portal-a", "d")
    assert refusal is not None
    assert refusal.code == RefusalCode.QUOTA_CLIENT
    # Bucket 1000 counts while the clock is in buckets 1000..1060: free at t = 1061.
    assert refusal.retry_after_s == pytest.approx(1061.0 - 1001.2)
    assert refusal.message == "client 'portal-a': quota of 3 per minute reached (retry in 60 s)"
    clock.t = 1060.99
    assert tracker.try_reserve(policy, "portal-a", "d") is not None
    clock.t = 1061.0
    assert tracker.try_reserve(policy, "portal-a", "d") is None
    assert tracker.usage("portal-a") == {"per_minute": 1}


def test_per_hour_window_across_bucket_boundaries():
    clock = FakeClock(3600.0 * 100)  # bucket boundaries at whole minutes
    base = clock.t
    tracker = QuotaTracker(clock)
    policy = quota_policy(account_quota={"per_hour": 2})
    clock.t = base + 10  # minute bucket 0
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None
    clock.t = base + 70  # minute bucket 1
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None
    clock.t = base + 3599
    refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT)
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_ACCOUNT
    assert refusal.retry_after_s == pytest.approx(61.0)  # bucket 0 leaves at base + 3660
    assert refusal.message == (
        "account 'uzi:900012345' of client 'portal-a': quota of 2 per hour reached (retry in 61 s)"
    )
    clock.t = base + 3659.9
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is not None
    clock.t = base + 3660  # the unit of bucket 0 expired, the one of bucket 1 still counts
    assert tracker.usage("portal-a", ACCOUNT) == {"per_hour": 1}
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None
    refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT)
    assert refusal is not None and refusal.retry_after_s == pytest.approx(60.0)
    clock.t = base + 3720
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None


@pytest.mark.parametrize("seed", range(3))
def test_limit_holds_over_every_rolling_span(seed):
    """Never more than the limit in any window-long span, whatever the arrival times."""
    rng = random.Random(seed)
    clock = FakeClock(rng.uniform(0, 10_000))
    tracker = QuotaTracker(clock)
    policy = quota_policy(quota={"per_minute": 7, "per_hour": 40})
    admitted: list[float] = []
    for _ in range(3000):
        clock.t += rng.expovariate(1 / 3.0)
        if tracker.try_reserve(policy, "portal-a", ACCOUNT) is None:
            admitted.append(clock.t)
    assert len(admitted) > 100
    for i, t in enumerate(admitted):
        assert sum(1 for u in admitted[: i + 1] if u > t - 60) <= 7
        assert sum(1 for u in admitted[max(0, i - 60) : i + 1] if u > t - 3600) <= 40


def test_retry_after_is_when_a_retry_succeeds():
    rng = random.Random(7)
    clock = FakeClock(50_000.0)
    tracker = QuotaTracker(clock)
    policy = quota_policy(account_quota={"per_minute": 5, "per_hour": 20})
    for _ in range(200):
        clock.t += rng.uniform(0, 20)
        n = rng.randint(1, 3)
        refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT, n)
        if refusal is None:
            continue
        assert refusal.retry_after_s is not None and refusal.retry_after_s > 0
        at = clock.t
        clock.t = at + refusal.retry_after_s - 0.001
        assert tracker.try_reserve(policy, "portal-a", ACCOUNT, n) is not None
        clock.t = at + refusal.retry_after_s
        assert tracker.try_reserve(policy, "portal-a", ACCOUNT, n) is None


def test_multi_unit_reservations():
    clock = FakeClock(7200.0)
    tracker = QuotaTracker(clock)
    policy = quota_policy(account_quota={"per_hour": 5})
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT, 3) is None
    clock.t += 120
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT, 2) is None
    clock.t += 120
    refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT, 3)
    assert refusal is not None  # needs the 3 of the first bucket to expire: 3660 s after it
    assert refusal.retry_after_s == pytest.approx(7200 + 3660 - clock.t)
    assert tracker.usage("portal-a", ACCOUNT) == {"per_hour": 5}
    refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT, 6)  # more than the limit
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_ACCOUNT
    assert refusal.retry_after_s is None
    assert "6 items exceed the quota of 5 per hour (can never fit)" in refusal.message
    # Also for an account never seen: refused without being tracked.
    refusal = tracker.try_reserve(policy, "portal-a", "new", 6)
    assert refusal is not None and refusal.retry_after_s is None
    assert len(tracker) == 1


def test_release_gives_units_back():
    clock = FakeClock(0.0)
    tracker = QuotaTracker(clock)
    policy = quota_policy(quota={"per_hour": 10}, account_quota={"per_minute": 2, "per_day": 3})
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT, 2) is None
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is not None
    tracker.release("portal-a", ACCOUNT)  # keyd refused one of the two
    assert tracker.usage("portal-a") == {"per_hour": 1}
    assert tracker.usage("portal-a", ACCOUNT) == {"per_minute": 1, "per_day": 1}
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None
    tracker.release("portal-a", ACCOUNT, 5)  # more than reserved: back to zero, not below
    assert tracker.usage("portal-a") == {"per_hour": 0}
    assert tracker.usage("portal-a", ACCOUNT) == {"per_minute": 0, "per_day": 0}
    tracker.release("portal-a", "never-seen")
    tracker.release("portal-x", ACCOUNT)
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT, 2) is None


def test_release_takes_the_newest_units():
    clock = FakeClock(0.0)
    tracker = QuotaTracker(clock)
    policy = quota_policy(account_quota={"per_minute": 2})
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None  # bucket 0
    clock.t = 30.0
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None  # bucket 30
    tracker.release("portal-a", ACCOUNT)
    refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT, 2)
    assert refusal is not None and refusal.retry_after_s == pytest.approx(61 - 30)


def test_account_refusal_reserves_nothing_for_the_client():
    tracker = QuotaTracker(FakeClock(0.0))
    policy = quota_policy(quota={"per_hour": 10}, account_quota={"per_hour": 2})
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT, 2) is None
    for n in (1, 2, 5):
        refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT, n)
        assert refusal is not None and refusal.code == RefusalCode.QUOTA_ACCOUNT
    assert tracker.usage("portal-a") == {"per_hour": 2}
    # ...so the other accounts still get the whole rest of the client quota.
    for i in range(4):
        assert tracker.try_reserve(policy, "portal-a", f"other-{i}", 2) is None
    assert tracker.usage("portal-a") == {"per_hour": 10}


def test_client_refusal_reserves_nothing_for_the_account():
    tracker = QuotaTracker(FakeClock(0.0))
    policy = quota_policy(quota={"per_hour": 3}, account_quota={"per_hour": 5})
    assert tracker.try_reserve(policy, "portal-a", "a", 3) is None
    refusal = tracker.try_reserve(policy, "portal-a", "b")
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_CLIENT
    assert tracker.usage("portal-a", "b") == {}
    assert len(tracker) == 1
    refusal = tracker.try_reserve(policy, "portal-a", "a")
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_CLIENT
    assert tracker.usage("portal-a", "a") == {"per_hour": 3}


def test_refusal_names_the_limit_that_frees_up_last():
    clock = FakeClock(0.0)
    tracker = QuotaTracker(clock)
    policy = quota_policy(quota={"per_minute": 2}, account_quota={"per_minute": 5, "per_day": 2})
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT, 2) is None
    refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT)
    assert refusal is not None  # client minute (61 s) and account day (25 h) both full
    assert refusal.code == RefusalCode.QUOTA_ACCOUNT
    assert refusal.retry_after_s == pytest.approx(25 * 3600)
    assert "quota of 2 per day" in refusal.message
    clock.t = 61.0
    refusal = tracker.try_reserve(policy, "portal-a", "other", 3)  # client minute: never fits
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_CLIENT
    assert refusal.retry_after_s is None


def test_accounts_are_per_client_and_the_default_quota_applies():
    tracker = QuotaTracker(FakeClock(0.0))
    policy = quota_policy(account_quota={"per_hour": 1}, default={"per_hour": 2})
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None
    assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is not None
    # The same account name from portal-b is another count, under the default quota.
    assert tracker.try_reserve(policy, "portal-b", ACCOUNT) is None
    assert tracker.try_reserve(policy, "portal-b", ACCOUNT) is None
    refusal = tracker.try_reserve(policy, "portal-b", ACCOUNT)
    assert refusal is not None and "quota of 2 per hour" in refusal.message


def test_quota_state_survives_a_new_policy():
    tracker = QuotaTracker(FakeClock(0.0))
    before = quota_policy(quota={"per_hour": 10}, account_quota={"per_hour": 5})
    assert tracker.try_reserve(before, "portal-a", ACCOUNT, 4) is None
    after = quota_policy(quota={"per_hour": 10}, account_quota={"per_hour": 5})  # reloaded
    assert after is not before
    assert tracker.try_reserve(after, "portal-a", ACCOUNT) is None
    refusal = tracker.try_reserve(after, "portal-a", ACCOUNT)
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_ACCOUNT
    assert tracker.usage("portal-a") == {"per_hour": 5}


def test_lowered_limit_applies_to_units_already_counted():
    clock = FakeClock(0.0)
    tracker = QuotaTracker(clock)
    first = quota_policy(account_quota={"per_hour": 5})
    assert tracker.try_reserve(first, "portal-a", "a", 3) is None
    reloaded = quota_policy(account_quota={"per_hour": 3, "per_day": 10})
    refusal = tracker.try_reserve(reloaded, "portal-a", "a")
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_ACCOUNT
    # The new per_day window starts at the reload.
    assert tracker.usage("portal-a", "a") == {"per_hour": 3, "per_day": 0}


def test_memory_stays_bounded_under_many_accounts(caplog):
    clock = FakeClock(0.0)
    tracker = QuotaTracker(clock, max_accounts=1000)
    policy = quota_policy(quota={"per_day": 10**9}, account_quota={"per_hour": 5, "per_day": 9})
    with caplog.at_level(logging.WARNING, logger="dccsign.policy"):
        for i in range(200_000):
            clock.t += 0.0002  # 40 s in all: every account is still live when evicted
            assert tracker.try_reserve(policy, "portal-a", f"uzi:{i}") is None
            if i % 50_000 == 0:
                assert len(tracker) == min(i + 1, 1000)
    assert len(tracker) == 1000
    assert tracker.evicted_live == 199_000
    assert tracker.usage("portal-a", "uzi:199999") == {"per_hour": 1, "per_day": 1}
    assert tracker.usage("portal-a", "uzi:0") == {}  # evicted: forgotten
    assert tracker.usage("portal-a") == {"per_day": 200_000}  # the client is never evicted
    warnings = [r for r in caplog.records if r.name == "dccsign.policy"]
    assert len(warnings) == 1  # at most one a minute
    assert "evicted while still counting units" in warnings[0].getMessage()


def test_idle_accounts_are_dropped_before_live_ones():
    clock = FakeClock(0.0)
    tracker = QuotaTracker(clock, max_accounts=10)
    policy = quota_policy(account_quota={"per_minute": 5})
    for i in range(10):
        assert tracker.try_reserve(policy, "portal-a", f"old-{i}") is None
    clock.t = 61.0  # every unit of the old accounts has expired
    for i in range(5):
        assert tracker.try_reserve(policy, "portal-a", f"new-{i}") is None
    assert len(tracker) == 5  # two idle ones dropped per new account, then none left
    assert tracker.evicted_live == 0
    # A live account is touched on use and so is not the one evicted.
    clock.t = 62.0
    for i in range(4):
        assert tracker.try_reserve(policy, "portal-a", f"more-{i}") is None
    assert tracker.try_reserve(policy, "portal-a", "new-0") is None
    for i in range(2):
        assert tracker.try_reserve(policy, "portal-a", f"last-{i}") is None
    assert len(tracker) == 10
    assert tracker.usage("portal-a", "new-0") == {"per_minute": 2}
    assert tracker.usage("portal-a", "new-1") == {}
    assert tracker.evicted_live == 1


# ----------------------------------------------------------------------------- reloading


def _watched_full_policy(tmp_path, start=0.0):
    """``(path, clock, pf)``: FULL written to *path* with a fixed mtime, and a PolicyFile that
    watches it on a fake clock at *start*."""
    path = tmp_path / "policy.json"
    write(path, FULL, mtime_ns=1_000_000_000_000_000_000)
    clock = FakeClock(start)
    return path, clock, PolicyFile(path, clock=clock)


def test_reload_picks_up_a_changed_file_within_the_interval(tmp_path, caplog):
    path, clock, pf = _watched_full_policy(tmp_path, 100.0)
    first = pf.current()
    assert pf.last_error is None
    assert first.check("portal-a", KID, "v", sample("v")) is None
    changed = copy.deepcopy(FULL)
    changed["clients"]["portal-a"]["disabled"] = True  # the kill switch
    write(path, changed, mtime_ns=1_000_000_001_000_000_000)
    clock.t = 100.49
    assert pf.current() is first  # not looked at yet
    clock.t = 100.5
    with caplog.at_level(logging.INFO, logger="dccsign.policy"):
        second = pf.current()
    assert second is not first
    refusal = second.check("portal-a", KID, "v", sample("v"))
    assert refusal is not None and refusal.code == RefusalCode.CLIENT_DISABLED
    messages = [r.getMessage() for r in caplog.records]
    assert any("policy reloaded from" in m for m in messages)
    assert "policy: client portal-a is disabled" in messages
    # Unchanged file: not re-read.
    clock.t = 101.5
    assert pf.current() is second
    assert pf.refresh() is False


def test_invalid_new_file_keeps_the_old_policy(tmp_path, caplog):
    path, clock, pf = _watched_full_policy(tmp_path)
    good = pf.current()
    broken = copy.deepcopy(FULL)
    broken["clients"]["portal-a"]["kids"] = ["d0ff3fe0"]
    write(path, broken, mtime_ns=1_000_000_001_000_000_000)
    clock.t = 1.0
    with caplog.at_level(logging.ERROR, logger="dccsign.policy"):
        assert pf.current() is good
    assert pf.last_error == f"{path}: clients.portal-a.kids[0]: not 16 hex digits: 'd0ff3fe0'"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "previous one stays in force" in errors[0].getMessage()
    clock.t = 2.0
    with caplog.at_level(logging.ERROR, logger="dccsign.policy"):
        assert pf.current() is good  # the same bad file: not reported again
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    # Half-written JSON, then a missing file: still the old policy.
    write(path, json.dumps(FULL)[:40], mtime_ns=1_000_000_002_000_000_000)
    clock.t = 3.0
    assert pf.current() is good
    assert pf.last_error is not None and "not JSON: line 1" in pf.last_error
    path.unlink()
    clock.t = 4.0
    assert pf.current() is good
    assert pf.last_error == f"{path}: cannot read: No such file or directory"
    # Fixed (atomically replaced): loaded, error cleared.
    fixed = copy.deepcopy(FULL)
    fixed["clients"]["portal-c"] = {}
    tmp = tmp_path / "policy.json.new"
    write(tmp, fixed)
    tmp.replace(path)
    clock.t = 5.0
    assert pf.current().client("portal-c") is not None
    assert pf.last_error is None


def test_replaced_file_is_seen_even_with_the_same_size_and_mtime(tmp_path):
    path = tmp_path / "policy.json"
    stamp = 1_000_000_000_000_000_000
    write(path, {"clients": {"a": {}}}, mtime_ns=stamp)
    clock = FakeClock(0.0)
    pf = PolicyFile(path, clock=clock)
    tmp = tmp_path / "policy.json.new"
    write(tmp, {"clients": {"b": {}}}, mtime_ns=stamp)  # same size, same mtime
    tmp.replace(path)  # a new inode
    clock.t = 0.5
    assert set(pf.current().clients) == {"b"}


def test_initial_file_must_be_valid(tmp_path):
    path = tmp_path / "policy.json"
    write(path, {"clients": {"p": {"typo": 1}}})
    with pytest.raises(PolicyError, match=r"clients\.p\.typo: unknown key"):
        PolicyFile(path)
    with pytest.raises(PolicyError, match="cannot read"):
        PolicyFile(tmp_path / "absent.json")


def test_reload_keeps_quota_counts(tmp_path):
    path, clock, pf = _watched_full_policy(tmp_path)
    tracker = QuotaTracker(clock)
    for _ in range(50):
        assert tracker.try_reserve(pf.current(), "portal-a", ACCOUNT) is None
    changed = copy.deepcopy(FULL)
    changed["clients"]["portal-a"]["account_quota"] = {"per_hour": 60}
    write(path, changed, mtime_ns=1_000_000_001_000_000_000)
    clock.t = 1.0
    policy = pf.current()
    assert policy.client("portal-a").account_quota == Quota(per_hour=60)
    for _ in range(10):
        assert tracker.try_reserve(policy, "portal-a", ACCOUNT) is None
    refusal = tracker.try_reserve(policy, "portal-a", ACCOUNT)
    assert refusal is not None and refusal.code == RefusalCode.QUOTA_ACCOUNT


# ----------------------------------------------------------------------------- client names


def test_the_two_transports_have_separate_client_names():
    """A certificate is client cn:<CN>; a local peer is what unix_uids maps its uid to, else
    uid:<uid>. A local client's plain name is never a certificate's, and the other way round."""
    policy = Policy.from_dict(
        {
            "clients": {"local": {}, "uid:1002": {}, "cn:portal.example": {}},
            "unix_uids": {"1001": "local"},
        }
    )
    assert policy.unix_client(1001) == "local" and policy.resolve_uid(1001) == "local"
    assert policy.unix_client(1002) == "uid:1002" and policy.resolve_uid(1002) == "uid:1002"
    assert policy.unix_client(1003) == "uid:1003" and policy.resolve_uid(1003) is None


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"clients": {"cn:x": {}}, "unix_uids": {"7": "cn:x"}}, "unix_uids.7: client 'cn:x'"),
        ({"clients": {"uid:8": {}}, "unix_uids": {"7": "uid:8"}}, "unix_uids.7: client 'uid:8'"),
        ({"clients": {"uid:x": {}}}, "'uid:' must be followed by a uid"),
        ({"clients": {"uid:007": {}}}, "'uid:' must be followed by a uid"),
        ({"clients": {"uid:4294967296": {}}}, "'uid:' must be followed by a uid"),
        ({"clients": {"cn:": {}}}, "no common name after it"),
    ],
)
def test_client_names_that_would_mix_the_transports_are_refused(document, problem):
    with pytest.raises(PolicyError, match=re.escape(problem)):
        Policy.from_dict(document)


def test_a_policy_file_over_the_size_limit_is_refused_unread(tmp_path, caplog):
    from dccsign.server.policy import MAX_POLICY_BYTES

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"clients": {"a": {}}}))
    policy = PolicyFile(path, interval_s=0)
    # Valid JSON, but more than the limit: refused without being parsed, the old one stays.
    big = {"clients": {f"cn:c{n:07d}": {} for n in range(MAX_POLICY_BYTES // 14)}}
    path.write_text(json.dumps(big))
    assert path.stat().st_size > MAX_POLICY_BYTES
    with caplog.at_level(logging.ERROR, "dccsign.server.policy"):
        assert policy.refresh() is False
    assert "larger than 4 MiB: refused unread" in (policy.last_error or "")
    assert list(policy.current().clients) == ["a"]
    with pytest.raises(PolicyError, match="larger than 4 MiB"):
        Policy.load(path)


def test_reload_inline_false_never_reads_in_current(tmp_path):
    """The engine reloads in a worker thread: current() must not read the file itself."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"clients": {"a": {}}}))
    policy = PolicyFile(path, interval_s=0, reload_inline=False)
    path.write_text(json.dumps({"clients": {"b": {}}}))
    os.utime(path, ns=(1, 1))
    assert list(policy.current().clients) == ["a"]
    assert policy.refresh() is True
    assert list(policy.current().clients) == ["b"]


def test_weight_is_a_small_positive_integer():
    policy = Policy.from_dict({"clients": {"a": {"weight": 3}, "b": {}}})
    assert policy.client("a").weight == 3 and policy.client("b").weight == 1
    for bad, shown in (
        (0, "the number 0"),
        (1001, "the number 1001"),
        (1.5, "the number 1.5"),
        (True, "a boolean"),
        ("2", "the string '2'"),
        (None, "null"),
    ):
        with pytest.raises(PolicyError) as info:
            Policy.from_dict({"clients": {"a": {"weight": bad}}}, source="p.json")
        assert info.value.problems == (
            f"clients.a.weight: expected an integer from 1 to 1000, got {shown}",
        )


# ------------------------------------------------ reservations of a whole frame (issue 14)


def _reserve_one_by_one(tracker, policy, client, accounts, counts):
    """What try_reserve_many must equal: the engine's old loop of single calls."""
    out = []
    for account, n in zip(accounts, counts, strict=True):
        refusal = tracker.try_reserve(policy, client, account, n)
        granted = n
        if refusal is not None:
            for granted in range(n):  # noqa: B007 - granted is the result
                refusal = tracker.try_reserve(policy, client, account, 1)
                if refusal is not None:
                    break
            else:
                granted, refusal = n, None
        out.append((granted, refusal))
    return out


def _state(tracker, client, names):
    return (
        tracker.usage(client),
        {a: tracker.usage(client, a) for a in names},
        len(tracker),
        tracker.evicted_live,
    )


_limits = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {}, optional={"per_minute": st.integers(1, 12), "per_hour": st.integers(1, 30)}
    ).filter(bool),
)


@settings(max_examples=300, deadline=None)
@given(
    quota=_limits,
    account_quota=_limits,
    max_accounts=st.integers(1, 8),
    frames=st.lists(
        st.tuples(
            st.floats(0, 90),  # seconds since the frame before
            st.lists(
                st.tuples(st.integers(0, 9), st.integers(1, 7)),
                max_size=8,
                unique_by=lambda t: t[0],
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    client=st.sampled_from(["portal-a", "portal-b", "portal-x"]),
)
def test_try_reserve_many_is_the_single_calls_in_order(
    quota, account_quota, max_accounts, frames, client
):
    """Same grants, same refusals (code, message, retry_after) and the same state as the
    single calls -- through client and account limits, refusals in the middle of a frame,
    new accounts, evictions from a small account table, windows expiring between frames."""
    policy = quota_policy(quota, account_quota)
    clocks = FakeClock(), FakeClock()
    batch = QuotaTracker(clocks[0], max_accounts=max_accounts)
    single = QuotaTracker(clocks[1], max_accounts=max_accounts)
    for gap, items in frames:
        for clock in clocks:
            clock.t += gap
        names = [f"uzi:{a}" for a, _ in items]
        counts = [n for _, n in items]
        got = batch.try_reserve_many(policy, client, names, counts)
        want = _reserve_one_by_one(single, policy, client, names, counts)
        assert got == want
        everyone = [f"uzi:{a}" for a in range(10)]
        assert _state(batch, client, everyone) == _state(single, client, everyone)


def test_try_reserve_many_checks_its_arguments():
    tracker = QuotaTracker(FakeClock())
    with pytest.raises(ValueError, match="differ in length"):
        tracker.try_reserve_many(quota_policy(), "portal-a", ["a"], [1, 2])
    with pytest.raises(ValueError, match="at least 1"):
        tracker.try_reserve_many(quota_policy(), "portal-a", ["a", "b"], [1, 0])
    assert tracker.try_reserve_many(quota_policy(), "portal-a", [], []) == []
