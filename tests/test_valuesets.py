"""Value-set tables: the shipped table, loading official-format directories, and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import dccsign
from conftest import shared_path
from dccsign.dcc.validate import DCCValidationError, validate
from dccsign.dcc.valuesets import FIELD_SETS, OFFICIAL_IDS, ValueSets
from dccsign.testing.samples import sample

# The sets the validator uses, as file names of the official value-set repository.
OFFICIAL_FILES = [
    "country-2-codes",
    "disease-agent-targeted",
    "test-result",
    "test-type",
    "vaccine-mah-manf",
    "vaccine-medicinal-product",
    "vaccine-prophylaxis",
]


def official_file(name: str) -> Path:
    return shared_path("testdata", "dcc-valuesets", f"{name}.json")


def write_set(directory: Path, name: str, values: dict[str, Any]) -> Path:
    path = directory / f"{name}.json"
    doc = {
        "valueSetId": OFFICIAL_IDS.get(name, name),
        "valueSetDate": "2030-01-01",
        "valueSetValues": values,
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def entry(display: str, active: bool = True) -> dict[str, Any]:
    return {"display": display, "lang": "en", "active": active, "system": "x", "version": ""}


# -- the builtin table -------------------------------------------------------------------------


def test_builtin_is_cached_and_immutable() -> None:
    vs = ValueSets.builtin()
    assert ValueSets.builtin() is vs
    with pytest.raises(AttributeError):
        vs._sets = {}  # type: ignore[misc]
    with pytest.raises(AttributeError):
        vs.release = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del vs._release
    with pytest.raises(TypeError):
        vs._sets["test-type"] = {}  # type: ignore[index]


def test_builtin_contents() -> None:
    vs = ValueSets.builtin()
    assert vs.release == "2.12.0"
    assert set(OFFICIAL_FILES) <= vs.set_ids
    assert vs.contains("disease-agent-targeted", "840539006")
    assert vs.display("disease-agent-targeted", "840539006") == "COVID-19"
    assert vs.contains("vaccine-medicinal-product", "EU/1/20/1528")
    assert vs.display("vaccine-medicinal-product", "EU/1/20/1528") == "Comirnaty"
    assert vs.contains("test-type", "LP217198-3")
    assert vs.contains("test-result", "260373001")
    assert vs.contains("country-2-codes", "NL")
    assert vs.display("country-2-codes", "NL") == "Netherlands"
    assert len(vs.codes("country-2-codes")) == 250


def test_retired_codes_stay_known() -> None:
    vs = ValueSets.builtin()
    assert vs.contains("vaccine-prophylaxis", "J07BX03")
    assert vs.is_active("vaccine-prophylaxis", "J07BX03") is False
    assert vs.is_active("vaccine-prophylaxis", "1119349007") is True
    assert vs.is_active("vaccine-prophylaxis", "nope") is None


def test_rat_device_list_is_not_builtin() -> None:
    # The only copy in the value-set repository is an example, so nothing restricts t.ma.
    vs = ValueSets.builtin()
    assert not vs.has_set("test-manf")
    assert not vs.contains("test-manf", "1232")
    assert vs.codes("test-manf") == frozenset()


@pytest.mark.parametrize(
    ("set_id", "code"),
    [("test-type", ""), ("test-type", "lp6464-4"), ("no-such-set", "x"), ("test-type", None)],
)
def test_unknown_codes_and_sets(set_id: str, code: Any) -> None:
    vs = ValueSets.builtin()
    assert vs.contains(set_id, code) is False
    assert vs.display(set_id, code) is None
    assert vs.is_active(set_id, code) is None


def test_builtin_matches_the_official_release() -> None:
    # The shipped table was derived from these files once; check that nothing was lost.
    vs = ValueSets.builtin()
    for name in OFFICIAL_FILES:
        doc = json.loads(official_file(name).read_text(encoding="utf-8"))
        assert doc["valueSetId"] == OFFICIAL_IDS[name]
        values = doc["valueSetValues"]
        assert vs.codes(name) == frozenset(values), name
        for code, item in values.items():
            assert vs.display(name, code) == item["display"]
            assert vs.is_active(name, code) is item["active"]


def test_field_sets_cover_every_coded_field() -> None:
    assert set(FIELD_SETS.values()) == {*OFFICIAL_FILES, "test-manf"}


def test_product_code_does_not_read_shared_data() -> None:
    # The product must run without ../shared: no module of ours may mention it.
    root = Path(dccsign.__file__).parent / "dcc"
    modules = sorted(root.glob("*.py"))
    assert {"validate.py", "valuesets.py", "uvci.py"} <= {m.name for m in modules}
    for module in modules:
        source = module.read_text(encoding="utf-8")
        for needle in ("shared/", "testdata", "DCCSIGN_SHARED_DIR"):
            assert needle not in source, (module.name, needle)
    table = json.loads((root / "data" / "valuesets.json").read_text(encoding="utf-8"))
    assert table["format"] == 1
    assert set(OFFICIAL_FILES) <= set(table["sets"])


# -- loading a directory ----------------------------------------------------------------------


def test_from_directory_with_the_official_files(tmp_path: Path) -> None:
    for name in [*OFFICIAL_FILES, "test-manf-example"]:
        shutil.copy(official_file(name), tmp_path)
    vs = ValueSets.from_directory(tmp_path)
    assert vs.release == f"2.12.0+{tmp_path.name}"
    for name in OFFICIAL_FILES:
        assert vs.codes(name) == ValueSets.builtin().codes(name)
    # The example device list is loaded under its own name and restricts nothing.
    assert vs.contains("test-manf-example", "1232")
    assert not vs.has_set("test-manf")
    dcc = sample("t")
    dcc["t"][0]["tt"] = "LP217198-3"
    dcc["t"][0]["ma"] = "9999"
    assert validate(dcc, valuesets=vs) == "t"


def test_a_directory_set_replaces_the_builtin_one(tmp_path: Path) -> None:
    write_set(
        tmp_path,
        "vaccine-medicinal-product",
        {"EU/1/99/9999": entry("Newvax"), "EU/1/20/1528": entry("Comirnaty", active=False)},
    )
    vs = ValueSets.from_directory(str(tmp_path))
    assert vs.codes("vaccine-medicinal-product") == {"EU/1/99/9999", "EU/1/20/1528"}
    assert vs.display("vaccine-medicinal-product", "EU/1/99/9999") == "Newvax"
    assert vs.is_active("vaccine-medicinal-product", "EU/1/20/1528") is False
    # Other sets stay builtin.
    assert vs.codes("country-2-codes") == ValueSets.builtin().codes("country-2-codes")

    dcc = sample("v")
    assert validate(dcc, valuesets=vs) == "v"  # an inactive code is still valid
    dcc["v"][0]["mp"] = "EU/1/99/9999"
    assert validate(dcc, valuesets=vs) == "v"
    with pytest.raises(DCCValidationError) as info:
        validate(dcc)  # unknown to the builtin table
    assert [(i.path, i.rule) for i in info.value.issues] == [("$.v[0].mp", "value-set")]
    dcc["v"][0]["mp"] = "EU/1/21/1529"  # builtin code missing from the new file
    with pytest.raises(DCCValidationError):
        validate(dcc, valuesets=vs)


def test_a_test_manf_file_makes_the_device_list_binding(tmp_path: Path) -> None:
    write_set(tmp_path, "test-manf", {"1232": entry("Abbott Panbio"), "1065": entry("x", False)})
    vs = ValueSets.from_directory(tmp_path)
    dcc = sample("t")
    dcc["t"][0]["tt"] = "LP217198-3"
    for ok in ("1232", "1065"):
        dcc["t"][0]["ma"] = ok
        assert validate(dcc, valuesets=vs) == "t"
    dcc["t"][0]["ma"] = "9999"
    assert validate(dcc) == "t"  # builtin: unrestricted
    with pytest.raises(DCCValidationError) as info:
        validate(dcc, valuesets=vs)
    assert info.value.as_json() == [
        {
            "path": "$.t[0].ma",
            "rule": "value-set",
            "message": "'9999' is not a code of the value set test-manf",
        }
    ]


def test_country_codes_of_the_wrong_shape_never_validate_co(tmp_path: Path) -> None:
    # The schema's co pattern needs upper-case letters: a lower-case code in a loaded file must
    # not make such a co acceptable.
    write_set(tmp_path, "country-2-codes", {"NL": entry("Netherlands"), "xx": entry("junk")})
    vs = ValueSets.from_directory(tmp_path)
    assert vs.contains("country-2-codes", "xx")
    dcc = sample("r")
    dcc["r"][0]["co"] = "xx"
    with pytest.raises(DCCValidationError) as info:
        validate(dcc, valuesets=vs)
    assert [i.rule for i in info.value.issues] == ["value-set"]


def test_non_json_files_are_ignored_and_subdirectories_not_searched(tmp_path: Path) -> None:
    write_set(tmp_path, "test-type", {"LP6464-4": entry("NAAT")})
    (tmp_path / "README.md").write_text("not a value set")
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "junk.json").write_text("[]")
    vs = ValueSets.from_directory(tmp_path)
    assert vs.codes("test-type") == {"LP6464-4"}


def test_missing_flags_and_extra_fields_are_tolerated(tmp_path: Path) -> None:
    # vaccine-encoding-instructions.json style entries: no display, other fields.
    write_set(tmp_path, "custom", {"a": {"foo": 1}, "b": {"display": "B"}})
    vs = ValueSets.from_directory(tmp_path)
    assert vs.contains("custom", "a") and vs.display("custom", "a") is None
    assert vs.is_active("custom", "a") is True


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        ("[]", "top level must be a JSON object"),
        ('{"valueSetValues": {"a": {}}}', "'valueSetId' must be a non-empty string"),
        ('{"valueSetId": 7, "valueSetValues": {"a": {}}}', "'valueSetId' must be"),
        ('{"valueSetId": "x"}', "'valueSetValues' must be a non-empty JSON object"),
        ('{"valueSetId": "x", "valueSetValues": {}}', "'valueSetValues' must be a non-empty"),
        ('{"valueSetId": "x", "valueSetValues": []}', "'valueSetValues' must be a non-empty"),
        ('{"valueSetId": "x", "valueSetValues": {"": {}}}', "a code must be a non-empty"),
        ('{"valueSetId": "x", "valueSetValues": {"a": "A"}}', "entry of code 'a' must be"),
        ('{"valueSetId": "x", "valueSetValues": {"a": {"display": 1}}}', "'display' of code"),
        ('{"valueSetId": "x", "valueSetValues": {"a": {"active": "yes"}}}', "'active' of code"),
        ('{"valueSetId": "x", "valueSetValues": {"a": {"active": null}}}', "'active' of code"),
    ],
)
def test_malformed_files_name_the_file_and_the_problem(
    tmp_path: Path, content: str | bytes, problem: str
) -> None:
    write_set(tmp_path, "test-type", {"LP6464-4": entry("NAAT")})
    bad = tmp_path / "vaccine-prophylaxis.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="value-set file") as info:
        ValueSets.from_directory(tmp_path)
    assert str(bad) in str(info.value)
    assert problem in str(info.value)


def test_a_file_saved_under_another_sets_name_is_refused(tmp_path: Path) -> None:
    shutil.copy(official_file("vaccine-medicinal-product"), tmp_path / "test-type.json")
    with pytest.raises(ValueError, match="belongs to set 'vaccine-medicinal-product'"):
        ValueSets.from_directory(tmp_path)


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no value-set files"):
        ValueSets.from_directory(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ValueSets.from_directory(tmp_path / "absent")
    file = write_set(tmp_path, "test-type", {"LP6464-4": entry("NAAT")})
    with pytest.raises(NotADirectoryError):
        ValueSets.from_directory(file)
