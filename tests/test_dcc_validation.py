"""The DCC validator (dccsign.dcc.validate): every rule, every version boundary, robustness, and a
cross-check against the official JSON schemas and the official test vectors.

Three kinds of evidence:

* unit tests, one rule or one version boundary at a time;
* property tests against the official combined schemas (read in place from ``../shared``):
  soundness (whatever we accept, the schema of its ``ver`` accepts) over valid and mutated
  payloads, and completeness (whatever the schema accepts *and* our documented stricter rules
  allow, we accept) over generated valid payloads;
* the dgc-testdata vectors, each with its expected outcome listed explicitly.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import string
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from conftest import shared_path
from dccsign.dcc.uvci import make_uvci
from dccsign.dcc.validate import DOSE_MAX, RULES, DCCValidationError, Issue, validate
from dccsign.dcc.valuesets import ValueSets
from dccsign.testing.samples import FIELD_NAMES, NEAR_MISS, field_slots, sample

VERSIONS = ["1.0.0", "1.0.1", "1.1.0", "1.2.0", "1.2.1", "1.3.0", "1.3.1", "1.3.2", "1.3.3"]
TODAY = date(2025, 1, 15)  # fixed, so that "dob not in the future" is deterministic
BUILTIN = ValueSets.builtin()


def max_len(ver: str) -> int:
    return 80 if ver >= "1.3.0" else 50


#: Each sample's UVCI as a literal (the samples compute theirs with the make_uvci under test).
UVCIS = {
    "v": "URN:UVCI:01:NL:187/37512422923#Z",
    "t": "URN:UVCI:01:NL:TEST/8H2K7Q9ZX1",
    "r": "URN:UVCI:01:NL:REC/42GQ61D7MPA3",
}


def base(kind: str, ver: str = "1.3.0") -> dict[str, Any]:
    """A small valid DCC of type ``kind`` that every version accepts: the shipped sample of
    that type, with the vaccination sample's holder and a literal UVCI."""
    holder = sample("v")
    dcc = sample(kind)
    dcc["ver"] = ver
    dcc["nam"], dcc["dob"] = holder["nam"], holder["dob"]
    dcc[kind][0]["ci"] = UVCIS[kind]
    return dcc


def issues_of(dcc: object, **kwargs: Any) -> list[tuple[str, str]]:
    """(path, rule) of every issue, or [] when the DCC is valid."""
    kwargs.setdefault("today", TODAY)
    try:
        validate(dcc, **kwargs)
    except DCCValidationError as exc:
        assert exc.issues, "a DCCValidationError must carry issues"
        return [(i.path, i.rule) for i in exc.issues]
    return []


def rejected_with(dcc: object, path: str, rule: str, **kwargs: Any) -> None:
    found = issues_of(dcc, **kwargs)
    assert (path, rule) in found, found


def accepted(dcc: object, **kwargs: Any) -> None:
    assert issues_of(dcc, **kwargs) == []


# ---------------------------------------------------------------------------------------------
# Valid payloads


@pytest.mark.parametrize("ver", VERSIONS)
@pytest.mark.parametrize("kind", ["v", "t", "r"])
def test_valid_payloads_of_every_version(kind: str, ver: str) -> None:
    assert validate(base(kind, ver), today=TODAY) == kind


def test_default_arguments() -> None:
    # Default value sets and today's UTC date.
    assert validate(base("v")) == "v"
    assert validate(base("t"), valuesets=BUILTIN, today=datetime(2030, 1, 1, 23, 59)) == "t"


def test_input_is_not_modified() -> None:
    dcc = base("t")
    dcc["t"][0]["tc"] = ""
    snapshot = copy.deepcopy(dcc)
    issues_of(dcc)
    assert dcc == snapshot


def test_tuples_are_accepted_as_arrays() -> None:
    # CBOR decoders can hand arrays over as tuples.
    dcc = base("r")
    dcc["r"] = tuple(dcc["r"])
    assert validate(dcc, today=TODAY) == "r"


# ---------------------------------------------------------------------------------------------
# ver


@pytest.mark.parametrize(
    ("ver", "expected"),
    [
        ("1.3.4", []),  # unknown later patch: newest 1.3 rules
        ("1.3.99", []),
        ("1.2.7", []),
        ("1.0.2", []),
        ("1.4.0", [("$.ver", "version")]),
        ("2.0.0", [("$.ver", "version")]),
        ("1.3", [("$.ver", "version")]),
        ("1.3.0.0", [("$.ver", "version")]),
        ("1.03.0", [("$.ver", "version")]),
        ("1.3.01", [("$.ver", "version")]),
        ("1.3.0\n", [("$.ver", "version")]),
        (" 1.3.0", [("$.ver", "version")]),
        ("1x3x0", [("$.ver", "version")]),
        ("١.٣.٠", [("$.ver", "version")]),
        ("1.3." + "9" * 5000, []),  # a huge patch number must not trip int() limits
        ("", [("$.ver", "version")]),
        (130, [("$.ver", "type")]),
        (1.3, [("$.ver", "type")]),
        (None, [("$.ver", "type")]),
        (["1.3.0"], [("$.ver", "type")]),
    ],
)
def test_ver(ver: object, expected: list[tuple[str, str]]) -> None:
    dcc = base("v")
    dcc["ver"] = ver
    assert issues_of(dcc) == expected


def test_missing_ver() -> None:
    dcc = base("v")
    del dcc["ver"]
    assert issues_of(dcc) == [("$.ver", "required")]


def test_later_patches_follow_their_minor_version() -> None:
    dcc = base("t", "1.0.7")
    dcc["t"][0]["tt"] = "PCR"  # 1.0.0 allowed free text, 1.0.1 introduced the value set
    rejected_with(dcc, "$.t[0].tt", "value-set")
    dcc = base("v", "1.3.9")
    del dcc["nam"]["fnt"]
    accepted(dcc)  # 1.3.2 rules
    dcc["ver"] = "1.2.9"
    rejected_with(dcc, "$.nam.fnt", "required")


def test_invalid_ver_still_checks_everything_else() -> None:
    dcc = base("v")
    dcc["ver"] = "9"
    dcc["v"][0]["dn"] = 0
    assert issues_of(dcc) == [("$.ver", "version"), ("$.v[0].dn", "range")]


# ---------------------------------------------------------------------------------------------
# Version boundaries


@pytest.mark.parametrize("ver", VERSIONS)
@pytest.mark.parametrize(
    ("kind", "where", "key"),
    [
        ("v", "nam", "fn"),
        ("v", "nam", "gn"),
        ("v", "nam", "fnt"),
        ("v", "nam", "gnt"),
        ("v", "entry", "is"),
        ("t", "entry", "tc"),
        ("t", "entry", "nm"),
        ("t", "entry", "ma"),
        ("r", "entry", "is"),
    ],
)
def test_text_length_limits(kind: str, where: str, key: str, ver: str) -> None:
    limit = max_len(ver)
    for length, ok in ((limit, True), (limit + 1, False)):
        dcc = base(kind, ver)
        target = dcc["nam"] if where == "nam" else dcc[kind][0]
        target[key] = "X" * length
        path = f"$.nam.{key}" if where == "nam" else f"$.{kind}[0].{key}"
        if ok:
            accepted(dcc)
        else:
            assert issues_of(dcc) == [(path, "max-length")]


def test_51_character_name_is_valid_in_130_and_invalid_in_121() -> None:
    name = "A" * 51
    dcc = base("v", "1.3.0")
    dcc["nam"]["fnt"] = name
    accepted(dcc)
    dcc["ver"] = "1.2.1"
    assert issues_of(dcc) == [("$.nam.fnt", "max-length")]


@pytest.mark.parametrize("ver", VERSIONS)
def test_ci_length_limit(ver: str) -> None:
    limit = max_len(ver)
    prefix = "URN:UVCI:01:NL:"
    for length, ok in ((limit, True), (limit + 1, False)):
        dcc = base("v", ver)
        dcc["v"][0]["ci"] = prefix + "A" * (length - len(prefix))
        assert len(dcc["v"][0]["ci"]) == length
        if ok:
            accepted(dcc)
        else:
            assert issues_of(dcc) == [("$.v[0].ci", "max-length")]


def test_lengths_count_code_points_like_json_schema() -> None:
    # U+1D518 is one code point (two UTF-16 units, four UTF-8 bytes): JSON Schema's maxLength
    # counts it once, and so do we. A combining accent is a code point of its own.
    dcc = base("v")
    dcc["nam"]["fn"] = "\U0001d518" * 80
    accepted(dcc)
    dcc["nam"]["fn"] = "e\u0301" * 40
    accepted(dcc)
    dcc["nam"]["fn"] = "e\u0301" * 40 + "x"
    assert issues_of(dcc) == [("$.nam.fn", "max-length")]


@pytest.mark.parametrize("ver", VERSIONS)
def test_dob_empty(ver: str) -> None:
    dcc = base("r", ver)
    dcc["dob"] = ""
    if ver >= "1.3.0":
        accepted(dcc)
    else:
        assert issues_of(dcc) == [("$.dob", "date")]


@pytest.mark.parametrize("ver", VERSIONS)
@pytest.mark.parametrize("dob", ["1979", "1979-04", "1901-08", "2000-02"])
def test_dob_partial(dob: str, ver: str) -> None:
    dcc = base("v", ver)
    dcc["dob"] = dob
    if ver >= "1.1.0":
        accepted(dcc)
    else:
        assert issues_of(dcc) == [("$.dob", "date")]


@pytest.mark.parametrize("ver", VERSIONS)
@pytest.mark.parametrize(
    ("value", "ok_before_130", "ok_from_130"),
    [
        (1, True, True),
        (9, True, True),
        (10, False, True),
        (DOSE_MAX, False, True),
        (DOSE_MAX + 1, False, False),
        (0, False, False),
        (-1, False, False),
        (2**64, False, False),
    ],
)
def test_dose_range(value: int, ok_before_130: bool, ok_from_130: bool, ver: str) -> None:
    for key in ("dn", "sd"):
        dcc = base("v", ver)
        dcc["v"][0][key] = value
        if ok_from_130 if ver >= "1.3.0" else ok_before_130:
            accepted(dcc)
        else:
            assert issues_of(dcc) == [(f"$.v[0].{key}", "range")]


def test_dn_10_is_valid_in_130_and_invalid_in_121() -> None:
    dcc = base("v", "1.3.0")
    dcc["v"][0]["dn"] = 10
    accepted(dcc)
    dcc["ver"] = "1.2.1"
    assert issues_of(dcc) == [("$.v[0].dn", "range")]


def test_dose_number_may_exceed_series() -> None:
    dcc = base("v")
    dcc["v"][0].update(dn=3, sd=2)  # boosters
    accepted(dcc)


@pytest.mark.parametrize("ver", VERSIONS)
def test_fnt_and_gnt_presence(ver: str) -> None:
    only_gnt = base("v", ver)
    del only_gnt["nam"]["fnt"]
    only_fnt = base("v", ver)
    del only_fnt["nam"]["gnt"]
    neither = base("v", ver)
    del neither["nam"]["fnt"], neither["nam"]["gnt"]
    accepted(only_fnt)
    if ver >= "1.3.2":
        accepted(only_gnt)
        assert issues_of(neither) == [("$.nam", "required")]
    else:
        assert issues_of(only_gnt) == [("$.nam.fnt", "required")]
        assert issues_of(neither) == [("$.nam.fnt", "required")]


def test_fnt_missing_valid_in_132_with_gnt_invalid_in_131() -> None:
    dcc = base("t", "1.3.2")
    dcc["nam"] = {"gn": "Zoë", "gnt": "ZOE"}
    accepted(dcc)
    dcc["ver"] = "1.3.1"
    assert issues_of(dcc) == [("$.nam.fnt", "required")]


@pytest.mark.parametrize("ver", VERSIONS)
def test_tc_required_before_130(ver: str) -> None:
    dcc = base("t", ver)
    del dcc["t"][0]["tc"]
    if ver >= "1.3.0":
        accepted(dcc)
    else:
        assert issues_of(dcc) == [("$.t[0].tc", "required")]


@pytest.mark.parametrize("ver", VERSIONS)
def test_tt_free_text_only_in_100(ver: str) -> None:
    dcc = base("t", ver)
    dcc["t"][0]["tt"] = "RT-PCR"
    if ver == "1.0.0":
        accepted(dcc)
    else:
        assert issues_of(dcc) == [("$.t[0].tt", "value-set")]


def test_tt_in_100_is_still_checked_as_text() -> None:
    for value, rule in (("", "empty"), ("X" * 51, "max-length"), (None, "type")):
        dcc = base("t", "1.0.0")
        dcc["t"][0]["tt"] = value
        assert issues_of(dcc) == [("$.t[0].tt", rule)]


@pytest.mark.parametrize("ver", VERSIONS)
def test_dr_only_in_10x_and_110(ver: str) -> None:
    dcc = base("t", ver)
    dcc["t"][0]["dr"] = "2021-07-01T11:00:00+02:00"
    if ver <= "1.1.0":
        accepted(dcc)
        dcc["t"][0]["dr"] = "2021-07-01 11:00"
        assert issues_of(dcc) == [("$.t[0].dr", "date-time")]
    else:
        assert issues_of(dcc) == [("$.t[0].dr", "unknown-field")]


@pytest.mark.parametrize("ver", VERSIONS)
def test_nm_exists_in_every_version(ver: str) -> None:
    # The schemas define nm from 1.0.0 on (1.3.0 only added a length limit).
    accepted(base("t", ver))


# ---------------------------------------------------------------------------------------------
# Groups and entries


@pytest.mark.parametrize("ver", VERSIONS)
def test_exactly_one_group(ver: str) -> None:
    none = base("v", ver)
    del none["v"]
    assert issues_of(none) == [("$", "one-group")]
    two = base("v", ver)
    two["r"] = base("r", ver)["r"]
    assert issues_of(two) == [("$", "one-group")]
    three = {**two, "t": base("t", ver)["t"]}
    assert issues_of(three) == [("$", "one-group")]


@pytest.mark.parametrize("ver", VERSIONS)
def test_exactly_one_entry(ver: str) -> None:
    for kind in "vtr":
        dcc = base(kind, ver)
        dcc[kind] = dcc[kind] * 2
        assert issues_of(dcc) == [(f"$.{kind}", "one-entry")]
        dcc[kind] = []
        assert issues_of(dcc) == [(f"$.{kind}", "one-entry")]


def test_every_entry_of_an_oversized_group_is_checked() -> None:
    dcc = base("v")
    second = copy.deepcopy(dcc["v"][0])
    second["dn"] = True
    dcc["v"].append(second)
    assert issues_of(dcc) == [("$.v", "one-entry"), ("$.v[1].dn", "type")]


def test_null_groups_are_type_errors_not_absent() -> None:
    # Json.NET style (BG): "t": null, "r": null beside a real "v".
    dcc = base("v")
    dcc["t"] = None
    dcc["r"] = None
    assert issues_of(dcc) == [("$", "one-group"), ("$.t", "type"), ("$.r", "type")]


@pytest.mark.parametrize("junk", [None, {}, "v", 1, {"0": {}}])
def test_group_must_be_an_array(junk: object) -> None:
    dcc = base("v")
    dcc["v"] = junk
    assert issues_of(dcc) == [("$.v", "type")]


@pytest.mark.parametrize("junk", [None, [], "x", 1, True])
def test_entry_must_be_an_object(junk: object) -> None:
    for kind in "vtr":
        dcc = base(kind)
        dcc[kind] = [junk]
        assert issues_of(dcc) == [(f"$.{kind}[0]", "type")]


# ---------------------------------------------------------------------------------------------
# Types: null, bool, float


FIELDS = {
    "v": ["tg", "vp", "mp", "ma", "dn", "sd", "dt", "co", "is", "ci"],
    "t": ["tg", "tt", "nm", "sc", "tr", "tc", "co", "is", "ci"],
    "r": ["tg", "fr", "co", "is", "df", "du", "ci"],
}
REQUIRED_130 = {
    "v": FIELDS["v"],
    "t": ["tg", "tt", "sc", "tr", "co", "is", "ci"],
    "r": FIELDS["r"],
}


@pytest.mark.parametrize(("kind", "key"), [(k, f) for k in "vtr" for f in FIELDS[k]])
def test_null_field_is_a_type_error(kind: str, key: str) -> None:
    dcc = base(kind)
    dcc[kind][0][key] = None
    assert issues_of(dcc) == [(f"$.{kind}[0].{key}", "type")]


@pytest.mark.parametrize(("kind", "key"), [(k, f) for k in "vtr" for f in REQUIRED_130[k]])
def test_missing_required_field(kind: str, key: str) -> None:
    dcc = base(kind)
    del dcc[kind][0][key]
    assert issues_of(dcc) == [(f"$.{kind}[0].{key}", "required")]


@pytest.mark.parametrize("key", ["fn", "fnt", "gn", "gnt"])
def test_null_name_part_is_a_type_error(key: str) -> None:
    dcc = base("v")
    dcc["nam"][key] = None
    assert issues_of(dcc) == [(f"$.nam.{key}", "type")]


@pytest.mark.parametrize("key", ["ver", "nam", "dob"])
def test_null_top_level_field_is_a_type_error(key: str) -> None:
    dcc = base("v")
    dcc[key] = None
    assert issues_of(dcc) == [(f"$.{key}", "type")]


@pytest.mark.parametrize("key", ["nam", "dob"])
def test_missing_top_level_field(key: str) -> None:
    dcc = base("v")
    del dcc[key]
    assert issues_of(dcc) == [(f"$.{key}", "required")]


@pytest.mark.parametrize("value", [True, False, 1.0, 2.0, 2.5, "2", float("nan"), [2], {"n": 2}])
def test_doses_must_be_json_integers(value: object) -> None:
    for key in ("dn", "sd"):
        dcc = base("v")
        dcc["v"][0][key] = value
        assert issues_of(dcc) == [(f"$.v[0].{key}", "type")]


@pytest.mark.parametrize("value", [1, True, 1.5, ["840539006"], {"code": "840539006"}])
def test_strings_must_be_strings(value: object) -> None:
    for kind, key in (("v", "tg"), ("t", "sc"), ("r", "df"), ("v", "is"), ("v", "ci")):
        dcc = base(kind)
        dcc[kind][0][key] = value
        assert issues_of(dcc) == [(f"$.{kind}[0].{key}", "type")]


@pytest.mark.parametrize("junk", [None, [], "Jansen", 1, ["fnt"]])
def test_nam_must_be_an_object(junk: object) -> None:
    dcc = base("v")
    dcc["nam"] = junk
    assert issues_of(dcc) == [("$.nam", "type")]


# ---------------------------------------------------------------------------------------------
# Unknown fields


def test_unknown_fields_at_every_level() -> None:
    dcc = base("t")
    dcc["extra"] = 1
    dcc["nam"]["mn"] = "middle"
    dcc["t"][0]["xx"] = "1"
    dcc["t"][0]["Tg"] = "840539006"
    assert issues_of(dcc) == [
        ("$.extra", "unknown-field"),
        ("$.nam.mn", "unknown-field"),
        ("$.t[0].xx", "unknown-field"),
        ("$.t[0].Tg", "unknown-field"),
    ]


def test_unknown_field_paths_quote_odd_keys() -> None:
    dcc = base("r")
    dcc["r"][0]["we'ird key"] = 1
    dcc["r"][0][7] = 1
    dcc["r"][0][""] = 1
    dcc["r"][0]["x" * 1000] = 1
    paths = [p for p, rule in issues_of(dcc) if rule == "unknown-field"]
    assert paths[:3] == ["$.r[0]['we\\'ird key']", "$.r[0][7]", "$.r[0]['']"]
    assert len(paths[3]) < 60


def test_unknown_field_even_when_null() -> None:
    dcc = base("v")
    dcc["v"][0]["nm"] = None  # a test field in a vaccination entry
    assert issues_of(dcc) == [("$.v[0].nm", "unknown-field")]


# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    "value",
    [
        "Bakker",
        "BAKKER CELIK",
        "BAKKER-CELIK",
        "BÄKKER",
        "BAKKER1",
        "ＢＡＫＫＥＲ",
        "BAKKER\n",
        "\n",
    ],
)
def test_transliterated_names_are_icao_only(value: str) -> None:
    for key in ("fnt", "gnt"):
        dcc = base("v")
        dcc["nam"][key] = value
        assert issues_of(dcc) == [(f"$.nam.{key}", "pattern")]


@pytest.mark.parametrize("value", ["<", "A", "VAN<DEN<BERG", "<<<", "X" * 80])
def test_transliterated_names_valid(value: str) -> None:
    dcc = base("v")
    dcc["nam"]["fnt"] = value
    accepted(dcc)


def test_free_names_take_any_text() -> None:
    dcc = base("v")
    dcc["nam"]["fn"] = "d'Červenková Panklová ‏عبد الله 王 🙂"
    dcc["nam"]["gn"] = ""
    accepted(dcc)


def test_someone_must_be_named() -> None:
    dcc = base("v")
    dcc["nam"] = {"fn": "", "fnt": "", "gnt": ""}
    assert issues_of(dcc) == [("$.nam", "empty")]
    dcc["nam"] = {"fnt": "", "gnt": "JOEL"}  # unknown surname (the "DICOM type 2" convention)
    accepted(dcc)
    dcc = base("v", "1.3.2")
    dcc["nam"] = {"gnt": ""}
    assert issues_of(dcc) == [("$.nam", "empty")]
    dcc["nam"] = {"fnt": "", "gnt": "joel"}  # one mistake, one issue
    assert issues_of(dcc) == [("$.nam.gnt", "pattern")]


def test_lone_surrogates_are_refused() -> None:
    for key in ("fn", "gn"):
        dcc = base("v")
        dcc["nam"][key] = "Jan\ud800"
        assert issues_of(dcc) == [(f"$.nam.{key}", "encoding")]
    dcc = base("t")
    dcc["t"][0]["tc"] = "\udfff"
    assert issues_of(dcc) == [("$.t[0].tc", "encoding")]


# ---------------------------------------------------------------------------------------------
# Empty strings


@pytest.mark.parametrize(
    ("kind", "key"), [("v", "is"), ("t", "is"), ("r", "is"), ("t", "tc"), ("t", "nm"), ("t", "ma")]
)
def test_empty_free_text_is_refused(kind: str, key: str) -> None:
    dcc = base(kind)
    dcc[kind][0][key] = ""
    assert issues_of(dcc) == [(f"$.{kind}[0].{key}", "empty")]


@pytest.mark.parametrize(("kind", "key"), [("v", "tg"), ("v", "co"), ("t", "tr"), ("t", "tt")])
def test_empty_codes_are_value_set_errors(kind: str, key: str) -> None:
    dcc = base(kind)
    dcc[kind][0][key] = ""
    assert issues_of(dcc) == [(f"$.{kind}[0].{key}", "value-set")]


# ---------------------------------------------------------------------------------------------
# Dates


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2020-02-29", True),
        ("2000-02-29", True),
        ("0001-01-01", True),
        ("9999-12-31", True),
        ("2021-02-29", False),
        ("1900-02-29", False),
        ("2021-04-31", False),
        ("2021-13-01", False),
        ("2021-00-10", False),
        ("2021-01-00", False),
        ("0000-01-01", False),
        ("2021-1-01", False),
        ("21-01-01", False),
        ("2021/01/01", False),
        ("20210101", False),  # basic format: fromisoformat would take it
        ("2021-W01-1", False),
        ("2021-01-01T00:00:00Z", False),  # PL 11-13 put date-times here
        ("2021-01-01 ", False),
        ("2021-01-01\n", False),
        ("+021-01-01", False),
        (" 021-01-01", False),
        ("2021-01-+1", False),
        ("٢٠٢١-٠١-٠١", False),
        ("２０２１-01-01", False),
        ("", False),
    ],
)
def test_complete_dates(value: str, ok: bool) -> None:
    for kind, key in (("v", "dt"), ("r", "fr"), ("r", "df")):
        dcc = base(kind)
        dcc[kind][0][key] = value
        if ok:
            if key == "df":
                dcc["r"][0]["du"] = "9999-12-31"
            accepted(dcc)
        else:
            assert issues_of(dcc) == [(f"$.{kind}[0].{key}", "date")]


@given(st.text(alphabet="0123456789-+ :TWZ\n٣", min_size=8, max_size=12))
def test_complete_date_check_matches_an_independent_oracle(text: str) -> None:
    # Our check is str tests plus date.fromisoformat, which accepts other ISO shapes; this
    # compares it with a regular-expression-and-calendar oracle.
    def oracle(s: str) -> bool:
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s):
            return False
        try:
            date(int(s[:4]), int(s[5:7]), int(s[8:]))
        except ValueError:
            return False
        return True

    dcc = base("v")
    dcc["v"][0]["dt"] = text
    assert (issues_of(dcc) == []) is oracle(text)


def test_recovery_validity_order() -> None:
    dcc = base("r")
    dcc["r"][0].update(df="2021-05-13", du="2021-05-13")
    accepted(dcc)
    dcc["r"][0].update(df="2021-05-13", du="2021-05-12")
    assert issues_of(dcc) == [("$.r[0].du", "date-order")]
    dcc["r"][0].update(df="2021-05-13", du="2021-02-30")  # no order check on a broken date
    assert issues_of(dcc) == [("$.r[0].du", "date")]


@pytest.mark.parametrize(
    ("dob", "rule"),
    [
        ("2025-01-15", None),  # today
        ("2025-01-16", "range"),
        ("2025-01", None),
        ("2025-02", "range"),
        ("2025", None),
        ("2026", "range"),
        ("2099-12-31", "range"),
        ("1900-01-01", None),
        ("1899-12-31", "date"),
        ("2100", "date"),
        ("1999-02-29", "date"),
        ("1999-02-30", "date"),
        ("1999-13", "date"),
        ("1999-00", "date"),
        ("1999-1", "date"),
        ("1978-01-26T00:00:00", "date"),  # BG
        ("1963-xx-xx", "date"),
        ("1979-04-14\n", "date"),
        ("19790414", "date"),
        ("١٩٧٩", "date"),
    ],
)
def test_dob(dob: str, rule: str | None) -> None:
    dcc = base("v", "1.3.0")
    dcc["dob"] = dob
    assert issues_of(dcc) == ([] if rule is None else [("$.dob", rule)])


def test_dob_future_uses_the_today_argument() -> None:
    dcc = base("v")
    dcc["dob"] = "2030-01-01"
    assert issues_of(dcc, today=date(2029, 12, 31)) == [("$.dob", "range")]
    accepted(dcc, today=date(2030, 1, 1))
    accepted(dcc, today=datetime(2030, 1, 1, 0, 0))


@pytest.mark.parametrize(
    "value",
    [
        "2021-07-01T09:30:00Z",
        "2021-07-01T09:30:00z",
        "2021-07-01t09:30:00Z",
        "2021-07-01T09:30:00+02:00",
        "2021-07-01T09:30:00-05:30",
        "2021-07-01T09:30:00-00:00",
        "2021-07-01T23:59:59+23:59",
        "2021-07-01T09:30:00.5Z",
        "2021-07-01T09:30:00.123456789+01:00",
        "2020-02-29T00:00:00Z",
    ],
)
def test_sample_collection_time_valid(value: str) -> None:
    dcc = base("t")
    dcc["t"][0]["sc"] = value
    accepted(dcc)


@pytest.mark.parametrize(
    "value",
    [
        "2021-07-01T09:30:00+0200",  # HU, SE vectors
        "2021-07-01T09:30:00+02",
        "2021-07-01 09:30:00Z",
        "2021-07-01T09:30:00",
        "2021-07-01T09:30Z",
        "2021-07-01T9:30:00Z",
        "2021-07-01T24:00:00Z",
        "2021-07-01T09:60:00Z",
        "2021-07-01T09:30:60Z",  # leap second
        "2021-07-01T09:30:00+24:00",
        "2021-07-01T09:30:00+02:60",
        "2021-07-01T09:30:00.Z",
        "2021-07-01T09:30:00.1234567890Z",
        "2021-02-29T09:30:00Z",
        "2021-07-01",
        "2021-07-01T09:30:00Z\n",
        "2021-07-01T09:30:00ZZ",
        "２０２１-07-01T09:30:00Z",
        "",
    ],
)
def test_sample_collection_time_invalid(value: str) -> None:
    dcc = base("t")
    dcc["t"][0]["sc"] = value
    assert issues_of(dcc) == [("$.t[0].sc", "date-time")]


# ---------------------------------------------------------------------------------------------
# Value sets


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("v", "tg", "840539007"),
        ("v", "vp", "1119349007 "),
        ("v", "mp", "COVID-19 Vaccine Moderna"),  # HU
        ("v", "ma", "ORG-1000030215"),  # SM
        ("v", "ma", "ORG-99999999"),  # PL 9
        ("v", "co", "XY"),  # PL 8
        ("v", "co", "nl"),
        ("v", "co", "NLD"),
        ("t", "tt", "COVID-19 test"),  # IE
        ("t", "tr", "positive"),
        ("t", "co", "EU"),
        ("r", "tg", "COVID-19"),
        ("r", "co", "UK"),
    ],
)
def test_value_set_violations(kind: str, key: str, value: str) -> None:
    dcc = base(kind)
    dcc[kind][0][key] = value
    assert issues_of(dcc) == [(f"$.{kind}[0].{key}", "value-set")]


def test_retired_codes_are_still_accepted() -> None:
    dcc = base("v")
    dcc["v"][0]["vp"] = "J07BX03"
    accepted(dcc)
    dcc["v"][0]["mp"] = "NVX-CoV2373"
    accepted(dcc)


def test_rat_device_is_not_restricted_by_the_builtin_tables() -> None:
    dcc = base("t")
    dcc["t"][0].update(tt="LP217198-3", ma="9999")
    accepted(dcc)
    dcc["t"][0]["ma"] = "X" * 81
    assert issues_of(dcc) == [("$.t[0].ma", "max-length")]


def test_every_builtin_code_is_accepted() -> None:
    cases = [
        ("v", "vp", "vaccine-prophylaxis"),
        ("v", "mp", "vaccine-medicinal-product"),
        ("v", "ma", "vaccine-mah-manf"),
        ("v", "co", "country-2-codes"),
        ("t", "tt", "test-type"),
        ("t", "tr", "test-result"),
        ("r", "tg", "disease-agent-targeted"),
    ]
    for kind, key, set_id in cases:
        for code in BUILTIN.codes(set_id):
            dcc = base(kind)
            dcc[kind][0][key] = code
            accepted(dcc)


# ---------------------------------------------------------------------------------------------
# ci


@pytest.mark.parametrize(
    ("ci", "rule"),
    [
        ("URN:UVCI:01:NL:187/37512422923#Y", "uvci-checksum"),
        ("urn:uvci:01:NL:187/37512422923", "uvci-grammar"),
        ("URN:UVCI:01DE/IZ12345A/5CWLU12RNOB9RXSEOP6FG8#W", "uvci-grammar"),
        ("01ITE7300E1AB2A84C719004F103DCB1F70A#6", "uvci-grammar"),
        ("", "uvci-grammar"),
        ("URN:UVCI:01:NL:" + "A" * 70, "max-length"),
    ],
)
def test_certificate_identifier(ci: str, rule: str) -> None:
    for kind in "vtr":
        dcc = base(kind)
        dcc[kind][0]["ci"] = ci
        assert issues_of(dcc) == [(f"$.{kind}[0].ci", rule)]


# ---------------------------------------------------------------------------------------------
# Issues and the exception


def test_all_issues_are_collected_in_document_order() -> None:
    dcc = base("r", "1.2.1")
    dcc["nam"]["fnt"] = "de Vries"
    dcc["nam"]["gn"] = "G" * 51
    dcc["dob"] = ""
    dcc["r"][0].update(tg=None, fr="2021-02-30", co="XY", is_="x", du="2021-01-01", ci="x")
    dcc["t"] = []
    assert issues_of(dcc) == [
        ("$.nam.gn", "max-length"),
        ("$.nam.fnt", "pattern"),
        ("$.dob", "date"),
        ("$", "one-group"),
        ("$.t", "one-entry"),
        ("$.r[0].is_", "unknown-field"),
        ("$.r[0].tg", "type"),
        ("$.r[0].fr", "date"),
        ("$.r[0].co", "value-set"),
        ("$.r[0].du", "date-order"),
        ("$.r[0].ci", "uvci-grammar"),
    ]


def test_exception_api() -> None:
    dcc = base("v")
    dcc["v"][0].update(dn=0, sd=True, co="XX", ci="x", tg="x", vp="x", mp="x")
    with pytest.raises(DCCValidationError) as info:
        validate(dcc)
    exc = info.value
    assert isinstance(exc, ValueError)
    assert len(exc.issues) == 7
    assert all(isinstance(i, Issue) and i.rule in RULES for i in exc.issues)
    assert exc.as_json() == [i.as_dict() for i in exc.issues]
    assert set(exc.as_json()[0]) == {"path", "rule", "message"}
    text = str(exc)
    assert text.startswith("DCC rejected (7 issues): $.v[0].tg [value-set] ")
    assert text.endswith("; and 2 more")
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is DCCValidationError and clone.issues == exc.issues
    assert str(clone) == text
    json.dumps(exc.as_json())


def test_single_issue_summary() -> None:
    dcc = base("v")
    dcc["v"][0]["dn"] = 0
    with pytest.raises(DCCValidationError, match=r"^DCC rejected \(1 issue\): \$\.v\[0\]\.dn "):
        validate(dcc)


def test_issue_is_a_frozen_value() -> None:
    issue = Issue("$.v[0].dn", "range", "dn must be an integer from 1 to 99, got 0")
    with pytest.raises(FrozenInstanceError):
        issue.rule = "x"  # type: ignore[misc]
    assert issue == Issue("$.v[0].dn", "range", "dn must be an integer from 1 to 99, got 0")
    assert issue.as_dict()["path"] == "$.v[0].dn"


def test_messages_name_the_allowed_form() -> None:
    dcc = base("t", "1.2.1")
    dcc["dob"] = "1990-13"
    dcc["nam"]["fnt"] = "X" * 60
    dcc["t"][0]["sc"] = "2021-07-01 09:30"
    messages = {i.path: i.message for i in _raised(dcc).issues}
    assert "at most 50 characters" in messages["$.nam.fnt"]
    assert "1.2.x" in messages["$.nam.fnt"]
    assert "calendar date" in messages["$.dob"]
    assert "RFC 3339" in messages["$.t[0].sc"]


def _raised(dcc: object) -> DCCValidationError:
    with pytest.raises(DCCValidationError) as info:
        validate(dcc, today=TODAY)
    return info.value


def test_huge_values_give_bounded_messages() -> None:
    dcc = base("v")
    huge = "é" * 5_000_000
    dcc["nam"]["fn"] = huge
    dcc["v"][0]["co"] = huge
    dcc["v"][0]["ci"] = huge
    dcc[huge] = 1
    exc = _raised(dcc)
    assert [i.rule for i in exc.issues] == [
        "unknown-field",
        "max-length",
        "value-set",
        "max-length",
    ]
    assert all(len(i.message) < 300 and len(i.path) < 100 for i in exc.issues)
    assert len(str(exc)) < 2000


@pytest.mark.parametrize("junk", [None, [], [base("v")], "{}", b"{}", 1, 1.5, True, object()])
def test_non_object_input(junk: object) -> None:
    assert issues_of(junk) == [("$", "type")]


def test_wrong_argument_types_are_caller_bugs() -> None:
    with pytest.raises(TypeError, match="valuesets"):
        validate(base("v"), valuesets={})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="today"):
        validate(base("v"), today="2025-01-01")  # type: ignore[arg-type]


class _ExplodingDict(dict):
    def get(self, *args: Any) -> Any:
        raise RuntimeError("boom")


class _ExplodingKey(str):
    def __hash__(self) -> int:
        raise RuntimeError("boom")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("boom")


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("boom")


def test_hostile_objects_only_ever_raise_validation_errors() -> None:
    exc = _raised(_ExplodingDict(base("v")))
    assert [(i.path, i.rule) for i in exc.issues] == [("$", "internal")]
    dcc = base("v")
    dcc["v"][0]["dn"] = _BadRepr()
    dcc["v"][0][_BadRepr()] = 1
    assert issues_of(dcc) == [("$.v[0][<_BadRepr>]", "unknown-field"), ("$.v[0].dn", "type")]
    dcc = base("v")
    dcc["v"][0]["co"] = _ExplodingKey("NL")
    assert issues_of(dcc)[-1][1] in RULES


# ---------------------------------------------------------------------------------------------
# Fuzzing: junk of every shape only ever gives DCCValidationError.

KEYS = list(FIELD_NAMES)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=90),
    st.sampled_from(["1.3.0", "1.0.0", "840539006", "NL", "", "1979", "2021-02-29", "LP6464-4"]),
)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), children, max_size=6
        ),
    ),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(junk)
def test_fuzz_junk_only_raises_validation_errors(value: object) -> None:
    try:
        kind = validate(value, today=TODAY)
    except DCCValidationError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.rule in RULES and issue.rule != "internal", issue
            assert issue.path.startswith("$") and issue.message
    else:
        assert kind in ("v", "t", "r")


@settings(max_examples=300)
@given(st.sampled_from(VERSIONS), st.sampled_from("vtr"), st.data())
def test_fuzz_single_field_replacement(ver: str, kind: str, data: st.DataObject) -> None:
    dcc = base(kind, ver)
    target, key = data.draw(st.sampled_from(field_slots(dcc)))
    target[key] = data.draw(junk)
    try:
        validate(dcc, today=TODAY)
    except DCCValidationError as exc:
        assert all(i.rule in RULES and i.rule != "internal" for i in exc.issues)


# ---------------------------------------------------------------------------------------------
# Cross-check against the official JSON schemas.


def _rfc3339(value: object) -> bool:
    """An independent date-time format check: jsonschema asserts "date-time" only when the
    optional rfc3339-validator package is installed, so the oracle brings its own."""
    if not isinstance(value, str):
        return True
    m = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))",
        value,
        re.ASCII,
    )
    if m is None or int(m[2]) > 23 or int(m[3]) > 59 or int(m[4]) > 59:
        return False
    if m[7] is not None and (int(m[7]) > 23 or int(m[8]) > 59):
        return False
    try:
        date.fromisoformat(m[1])
    except ValueError:
        return False
    return True


_SCHEMAS: dict[str, Draft202012Validator] = {}


def schemas() -> dict[str, Draft202012Validator]:
    """The official schema validators by version, loaded once, with formats asserted.

    A plain function rather than a fixture: hypothesis prints a failing example's arguments,
    and a fixture argument holding nine compiled schemas would drown the report.
    """
    if not _SCHEMAS:
        checker = FormatChecker()
        checker.checks("date-time")(_rfc3339)
        for ver in VERSIONS:
            path = shared_path("testdata", "dcc-schema", f"{ver}.json")
            schema = json.loads(path.read_text("utf-8"))
            Draft202012Validator.check_schema(schema)
            _SCHEMAS[ver] = Draft202012Validator(schema, format_checker=checker)
    return _SCHEMAS


def test_format_checker_asserts_dates() -> None:
    # The cross-check is only as good as the oracle: make sure formats are asserted.
    dcc = base("v", "1.3.0")
    dcc["v"][0]["dt"] = "2021-02-30"
    assert not schemas()["1.3.0"].is_valid(dcc)
    dcc = base("t", "1.3.0")
    dcc["t"][0]["sc"] = "2021-07-01 09:30"
    assert not schemas()["1.3.0"].is_valid(dcc)
    assert schemas()["1.3.0"].is_valid(base("t", "1.3.0"))


# -- generators of valid payloads (schema + our documented stricter rules) ---------------------

UPPER = string.ascii_uppercase
names_text = st.characters(codec="utf-8")  # any code point but surrogates


def _text(limit: int, *, min_size: int = 0, alphabet: Any = names_text) -> st.SearchStrategy[str]:
    # Lengths at the limit are the interesting ones: generate them on purpose.
    return st.one_of(
        st.text(alphabet=alphabet, min_size=min_size, max_size=limit),
        st.text(alphabet=alphabet, min_size=limit, max_size=limit),
    )


def _codes(set_id: str) -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(BUILTIN.codes(set_id)))


@st.composite
def _uvci(draw: st.DrawFn, limit: int) -> str:
    cc = draw(st.text(alphabet=UPPER, min_size=2, max_size=2))
    checksum = draw(st.booleans())
    room = limit - len("URN:UVCI:01:NL:") - (2 if checksum else 0)
    part = UPPER + string.digits
    if draw(st.booleans()):  # exactly at the length limit
        parts = [draw(st.text(alphabet=part, min_size=room, max_size=room))]
    else:
        n = draw(st.integers(1, 3))
        size = (room - (n - 1)) // n
        parts = draw(
            st.lists(st.text(alphabet=part, min_size=1, max_size=size), min_size=n, max_size=n)
        )
    return make_uvci(cc, *parts, checksum=checksum)


@st.composite
def _rfc3339_datetime(draw: st.DrawFn) -> str:
    day = draw(st.dates()).isoformat()
    hms = draw(st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59)))
    frac = draw(st.sampled_from(["", ".5", ".123", ".123456", ".123456789"]))
    offset = draw(
        st.one_of(
            st.sampled_from(["Z", "z", "+00:00", "-00:00"]),
            st.builds(
                "{}{:02d}:{:02d}".format,
                st.sampled_from("+-"),
                st.integers(0, 23),
                st.integers(0, 59),
            ),
        )
    )
    sep = draw(st.sampled_from("Tt"))
    return f"{day}{sep}{hms[0]:02d}:{hms[1]:02d}:{hms[2]:02d}{frac}{offset}"


@st.composite
def _name(draw: st.DrawFn, ver: str) -> dict[str, str]:
    limit = max_len(ver)
    icao = _text(limit, alphabet=UPPER + "<")
    nonempty_icao = _text(limit, min_size=1, alphabet=UPPER + "<")
    nam: dict[str, str] = {}
    shape = draw(st.sampled_from(["both", "fnt"] + (["gnt"] if ver >= "1.3.2" else [])))
    if shape == "both":
        first_named = draw(st.booleans())
        nam["fnt"] = draw(nonempty_icao if first_named else icao)
        nam["gnt"] = draw(icao if first_named else nonempty_icao)
    else:
        nam[shape] = draw(nonempty_icao)
    for key in ("fn", "gn"):
        if draw(st.booleans()):
            nam[key] = draw(_text(limit))
    return nam


@st.composite
def _dob(draw: st.DrawFn, ver: str) -> str:
    full = st.dates(date(1900, 1, 1), TODAY).map(date.isoformat)
    options = [full]
    if ver >= "1.1.0":
        options.append(st.integers(1900, TODAY.year).map(str))
        options.append(st.dates(date(1900, 1, 1), TODAY).map(lambda d: d.isoformat()[:7]))
    if ver >= "1.3.0":
        options.append(st.just(""))
    return draw(st.one_of(options))


@st.composite
def valid_dcc(draw: st.DrawFn, ver: str | None = None, kind: str | None = None) -> dict:
    ver = ver or draw(st.sampled_from(VERSIONS))
    kind = kind or draw(st.sampled_from("vtr"))
    limit = max_len(ver)
    text = _text(limit, min_size=1)
    entry: dict[str, Any] = {
        "tg": "840539006",
        "co": draw(_codes("country-2-codes")),
        "is": draw(text),
        "ci": draw(_uvci(limit)),
    }
    if kind == "v":
        top = 9 if ver < "1.3.0" else DOSE_MAX
        dose = st.one_of(st.integers(1, top), st.sampled_from([1, top]))
        entry.update(
            vp=draw(_codes("vaccine-prophylaxis")),
            mp=draw(_codes("vaccine-medicinal-product")),
            ma=draw(_codes("vaccine-mah-manf")),
            dn=draw(dose),
            sd=draw(dose),
            dt=draw(st.dates()).isoformat(),
        )
    elif kind == "t":
        entry.update(
            tt=draw(text if ver == "1.0.0" else _codes("test-type")),
            sc=draw(_rfc3339_datetime()),
            tr=draw(_codes("test-result")),
        )
        optional = {"nm": text, "ma": text, "tc": text}
        if ver <= "1.1.0":
            optional["dr"] = _rfc3339_datetime()
        for key, strategy in optional.items():
            if draw(st.booleans()) or (key == "tc" and ver < "1.3.0"):
                entry[key] = draw(strategy)
    else:
        df = draw(st.dates(max_value=date(9000, 1, 1)))
        entry.update(
            fr=draw(st.dates()).isoformat(),
            df=df.isoformat(),
            du=(df + timedelta(days=draw(st.integers(0, 4000)))).isoformat(),
        )
    dcc = {"ver": ver, "nam": draw(_name(ver)), "dob": draw(_dob(ver)), kind: [entry]}
    # Key order carries no meaning; shuffle it so that nothing depends on it.
    items = draw(st.permutations(list(dcc.items())))
    return dict(items)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_dcc())
def test_completeness_generated_valid_payloads_are_accepted(dcc: dict[str, Any]) -> None:
    errors = [e.message for e in schemas()[dcc["ver"]].iter_errors(dcc)]
    assert errors == [], "generator bug: the official schema rejects a generated payload"
    assert validate(dcc, today=TODAY) in dcc


# -- mutations: near-misses for the soundness check --------------------------------------------

near_miss_values = st.one_of(
    junk,
    st.sampled_from(NEAR_MISS),
    st.integers(45, 85).flatmap(lambda n: st.sampled_from(["A" * n, "é" * n, "<" * n])),
)


@st.composite
def mutated_dcc(draw: st.DrawFn) -> dict:
    dcc = draw(valid_dcc())
    kind = next(k for k in "vtr" if k in dcc)
    # The sharpest probe: a payload valid under one version, relabelled as another. It
    # carries that version's freedoms (no tc, dn 10, dob "", no fnt, 80-character names...).
    if draw(st.booleans()):
        dcc["ver"] = draw(st.sampled_from([*VERSIONS, "1.3.7", "1.0.4", "1.2.9"]))
        if draw(st.booleans()):
            return dcc
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["ver", "replace", "delete", "add", "group", "entry"]))
        slots = field_slots(dcc)
        if action == "ver":
            dcc["ver"] = draw(st.sampled_from([*VERSIONS, "1.3.7", "1.0.4", "1.4.0"]))
        elif action == "replace" and slots:
            target, key = draw(st.sampled_from(slots))
            target[key] = draw(near_miss_values)
        elif action == "delete" and slots:
            target, key = draw(st.sampled_from(slots))
            del target[key]
        elif action == "add" and slots:
            target, _ = draw(st.sampled_from(slots))
            target[draw(st.sampled_from(KEYS))] = draw(near_miss_values)
        elif action == "group":
            other = draw(st.sampled_from("vtr"))
            dcc[other] = draw(valid_dcc(ver=str(dcc.get("ver", "1.3.0")), kind=other))[other]
        elif action == "entry" and isinstance(dcc.get(kind), list):
            dcc[kind] = [*dcc[kind], copy.deepcopy(dcc[kind][0]) if dcc[kind] else {}]
    return dcc


FREEDOMS = [
    "none",
    "dob-empty",
    "dob-partial",
    "no-fnt",
    "long",
    "dn",
    "sd",
    "tc",
    "dr",
    "tt-text",
    "nm-long",
]
# The entry-level freedoms exist for one certificate type only.
FREEDOM_KIND = {"dn": "v", "sd": "v", "tc": "t", "dr": "t", "tt-text": "t", "nm-long": "t"}


@st.composite
def version_probe(draw: st.DrawFn, freedom: str, ver: str) -> dict:
    """A payload valid in the strictest schema (1.2.1 rules, which also hold for 1.3.x) with
    one freedom that only some versions allow, labelled ``ver``."""
    kind = FREEDOM_KIND.get(freedom) or draw(st.sampled_from("vtr"))
    dcc = draw(valid_dcc(ver="1.2.1", kind=kind))
    entry = dcc[kind][0]
    if freedom == "dob-empty":
        dcc["dob"] = ""
    elif freedom == "dob-partial":
        dcc["dob"] = draw(st.sampled_from(["1979", "1979-04", "2000-12"]))
    elif freedom == "no-fnt":
        dcc["nam"].pop("fnt", None)
        dcc["nam"]["gnt"] = draw(st.text(alphabet=UPPER, min_size=1, max_size=50))
    elif freedom == "long":
        target, key = draw(
            st.sampled_from(
                [(dcc["nam"], k) for k in ("fn", "gn", "fnt", "gnt")]
                + [(entry, k) for k in ("is", "tc", "nm") if k in entry]
            )
        )
        target[key] = draw(st.text(alphabet=UPPER, min_size=51, max_size=80))
    elif freedom in ("dn", "sd"):
        entry[freedom] = draw(st.integers(10, DOSE_MAX))
    elif freedom == "tc":
        entry.pop("tc", None)
    elif freedom == "dr":
        entry["dr"] = draw(_rfc3339_datetime())
    elif freedom == "tt-text":
        entry["tt"] = draw(st.sampled_from(["PCR", "RAT", "LP6464"]))
    elif freedom == "nm-long":
        entry["nm"] = draw(st.text(alphabet=UPPER, min_size=51, max_size=200))
    dcc["ver"] = ver
    return dcc


def _schema_for(dcc: dict) -> Draft202012Validator:
    """The official schema of an accepted payload's version (later patches: newest of the
    minor version, exactly the rule the validator documents)."""
    ver = dcc["ver"]
    if ver in schemas():
        return schemas()[ver]
    minor = ver.rsplit(".", 1)[0]
    return schemas()[max(v for v in VERSIONS if v.startswith(minor + "."))]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(valid_dcc(), mutated_dcc()))
def test_soundness_whatever_we_accept_the_schema_accepts(dcc: dict[str, Any]) -> None:
    try:
        kind = validate(dcc, today=TODAY)
    except DCCValidationError as exc:
        assert all(i.rule in RULES and i.rule != "internal" for i in exc.issues)
        return
    errors = [e.message for e in _schema_for(dcc).iter_errors(dcc)]
    assert errors == [], f"accepted as {kind!r} but the official schema says: {errors}"


@pytest.mark.parametrize("ver", [*VERSIONS, "1.0.4", "1.1.2", "1.2.9", "1.3.7"])
@pytest.mark.parametrize("freedom", FREEDOMS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_soundness_at_every_version_boundary(freedom: str, ver: str, data: st.DataObject) -> None:
    # Every (version-specific freedom, version) pair, on generated payloads: accepted means
    # the official schema accepts it too.
    dcc = data.draw(version_probe(freedom, ver))
    try:
        validate(dcc, today=TODAY)
    except DCCValidationError:
        return
    errors = [e.message for e in _schema_for(dcc).iter_errors(dcc)]
    assert errors == [], f"accepted, but the official schema says: {errors}"


@pytest.mark.parametrize("ver", VERSIONS)
@pytest.mark.parametrize("kind", ["v", "t", "r"])
def test_soundness_of_boundary_examples(kind: str, ver: str) -> None:
    # Hand-made payloads at every version boundary: accepted ones must be schema-valid, and
    # each schema-invalid one must be rejected.
    variants: list[Callable[[dict], None]] = [
        lambda d: d["nam"].update(fnt="A" * 50),
        lambda d: d["nam"].update(fnt="A" * 51),
        lambda d: d["nam"].update(fn="é" * 80),
        lambda d: d["nam"].pop("fnt"),
        lambda d: d.update(dob=""),
        lambda d: d.update(dob="1979"),
        lambda d: d.update(dob="1979-04"),
        lambda d: d[kind][0].update(dn=10),
        lambda d: d[kind][0].update(sd=9),
        lambda d: d[kind][0].pop("tc", None),
        lambda d: d[kind][0].update(dr="2021-07-01T10:00:00Z"),
        lambda d: d[kind][0].update(tt="PCR"),
        lambda d: d[kind][0].update(ci="URN:UVCI:01:NL:" + "A" * 35),
        lambda d: d[kind][0].update(ci="URN:UVCI:01:NL:" + "A" * 36),
        lambda d: d[kind][0].update(nm="N" * 60),
    ]
    for change in variants:
        dcc = base(kind, ver)
        change(dcc)
        ours = issues_of(dcc) == []
        theirs = schemas()[ver].is_valid(dcc)
        assert theirs or not ours, (ver, kind, dcc)


# ---------------------------------------------------------------------------------------------
# The official test vectors (dgc-testdata): every vector with a "JSON" payload, each with its
# expected outcome. Accepted: the type. Rejected: every (path, rule) issue. Most rejections are
# real-world shapes a signer must not produce (see the spec notes §2.5, §4 items 23, 24).

_CI_GRAMMAR = {k: [(f"$.{k}[0].ci", "uvci-grammar")] for k in "vtr"}
_FR_LOWER = {f"FR/2DCode/raw/DGC_QrCode_{n:05d}_Raw.json": _CI_GRAMMAR["v"] for n in range(1, 19)}

VECTORS: dict[str, str | list[tuple[str, str]]] = {
    "AT/2DCode/raw/1.json": "v",
    "AT/2DCode/raw/2.json": "r",
    "AT/2DCode/raw/3.json": "t",
    "AT/2DCode/raw/4.json": "t",
    # DE: "URN:UVCI:01DE/..." (no colon after the version)
    "DE/2DCode/raw/1.json": _CI_GRAMMAR["v"],
    "DE/2DCode/raw/2.json": _CI_GRAMMAR["t"],
    "DE/2DCode/raw/3.json": _CI_GRAMMAR["r"],
    "DE/2DCode/raw/4.json": _CI_GRAMMAR["v"],
    **{f"FR/2DCode/raw/DCC_Test_{n:04d}.json": "t" for n in [*range(1, 9), *range(10, 18)]},
    # FR 2021 QR codes: "urn:uvci:01:FR:..." in lower case
    **_FR_LOWER,
    # FR: "dgci:V1:FR:...:36" and "URN:UVCI:V1:FR:...:"
    "FR/2DCode/raw/recovery_ok.json": _CI_GRAMMAR["r"],
    "FR/2DCode/raw/test_pcr_ok.json": _CI_GRAMMAR["t"],
    "FR/2DCode/raw/vaccin_ok.json": _CI_GRAMMAR["v"],
    # IT: "01IT...#n" (no URN prefix); IT 4 also has an empty RAT device "ma": ""
    "IT/2DCode/raw/1.json": _CI_GRAMMAR["v"],
    "IT/2DCode/raw/2.json": _CI_GRAMMAR["r"],
    "IT/2DCode/raw/3.json": _CI_GRAMMAR["t"],
    "IT/2DCode/raw/4.json": [("$.t[0].ma", "empty"), ("$.t[0].ci", "uvci-grammar")],
    **{
        f"PL/{ver}/2DCode/raw/{n}.json": expected
        for ver in ("1.0.0", "1.2.1", "1.3.0")
        for n, expected in {
            1: "v",
            2: "v",
            3: "r",
            4: "t",
            5: "t",
            6: "v",  # wrong signing key: a verifier matter, the payload is fine
            # 7: RAT device "9999" (SCHEMAVALIDATION=false). The builtin tables do not restrict
            # t.ma; see test_vectors_with_a_binding_device_list.
            7: "t",
            8: [("$.r[0].co", "value-set")],  # country "XY"
            9: [("$.v[0].ma", "value-set")],  # MAH "ORG-99999999"
            10: "r",  # expired: a verifier matter
            # 11-13: "dt" holds a date-time, not a complete date
            11: [("$.v[0].dt", "date")],
            12: [("$.v[0].dt", "date")],
            13: [("$.v[0].dt", "date")],
            14: "v",
        }.items()
    },
    "common/2DCode/raw/CBO1.json": "t",
    "common/2DCode/raw/CBO2.json": "t",
    "common/2DCode/raw/CO1.json": "v",
    "common/2DCode/raw/CO2.json": "v",
    "common/2DCode/raw/CO3.json": "v",
    "common/2DCode/raw/CO28.json": "v",
    # DGC2: v, t and r in one payload (schema-valid before 1.3.0, refused by rule)
    "common/2DCode/raw/DGC2.json": [("$", "one-group")],
    "common/2DCode/raw/DGC3.json": "t",
    "common/2DCode/raw/DGC4.json": "t",
    "common/2DCode/raw/DGC5.json": "r",
    "common/2DCode/raw/DGC6.json": "v",
}


def _vector(name: str) -> dict[str, Any]:
    return json.loads(shared_path("testdata", "dgc", *name.split("/")).read_text("utf-8"))


def test_vector_table_lists_every_vector_with_a_payload() -> None:
    root = shared_path("testdata", "dgc")
    with_json = {
        p.relative_to(root).as_posix()
        for p in root.glob("**/2DCode/raw/*.json")
        if "JSON" in json.loads(p.read_text("utf-8"))
    }
    assert with_json == set(VECTORS)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector(name: str) -> None:
    dcc = _vector(name)["JSON"]
    expected = VECTORS[name]
    if isinstance(expected, str):
        assert validate(dcc, today=TODAY) == expected
        # And the official schema of its version agrees.
        assert schemas()[dcc["ver"]].is_valid(dcc)
    else:
        assert issues_of(dcc) == expected


def test_vectors_with_a_binding_device_list(tmp_path: Path) -> None:
    # With a RAT device list loaded (here the example list, saved as test-manf.json), PL 7's
    # device "9999" is refused as the vector expects, while PL 5's "1232" stays valid.
    (tmp_path / "test-manf.json").write_bytes(
        shared_path("testdata", "dcc-valuesets", "test-manf-example.json").read_bytes()
    )
    vs = ValueSets.from_directory(tmp_path)
    for ver in ("1.0.0", "1.2.1", "1.3.0"):
        seven = _vector(f"PL/{ver}/2DCode/raw/7.json")["JSON"]
        assert issues_of(seven, valuesets=vs) == [("$.t[0].ma", "value-set")]
        assert validate(_vector(f"PL/{ver}/2DCode/raw/5.json")["JSON"], valuesets=vs) == "t"
