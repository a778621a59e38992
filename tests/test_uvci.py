"""UVCI grammar, Luhn mod-38 check character and construction (dccsign.dcc.uvci)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dccsign.dcc.uvci import (
    LUHN_ALPHABET,
    UVCI_MAX_LENGTH,
    check_uvci,
    luhn_mod38_check_char,
    make_uvci,
)

# A deliberately plain reference: walk from the right, double every second value starting
# with the rightmost, fold a doubled value by adding its base-38 digits, and pick the
# character that makes the sum a multiple of 38.


def reference_check_char(text: str) -> str:
    n = len(LUHN_ALPHABET)
    total = 0
    for position, ch in enumerate(reversed(text)):
        value = LUHN_ALPHABET.index(ch)
        if position % 2 == 0:
            value *= 2
            value = value // n + value % n
        total += value
    return LUHN_ALPHABET[(n - total % n) % n]


alphabet_text = st.text(alphabet=LUHN_ALPHABET, min_size=1, max_size=120)
part = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=14)
country = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2)


# -- check character -------------------------------------------------------------------------


def test_worked_example_from_the_notes() -> None:
    assert luhn_mod38_check_char("URN:UVCI:01:NL:187/37512422923") == "Z"


@pytest.mark.parametrize(
    "uvci",
    [
        # Canonical identifiers with check characters taken from real test vectors (AT, FR):
        # they include the two separator symbols as check characters.
        "URN:UVCI:01:AT:10807843F94AEE0EE5093FBC254BD813#B",
        "URN:UVCI:01:FR:Y4996KBJ4Q3Q#:",
        "URN:UVCI:01:FR:P4LU2647E8HN#/",
        "URN:UVCI:01:NL:187/37512422923#Z",
    ],
)
def test_known_check_characters(uvci: str) -> None:
    body, check = uvci.split("#")
    assert luhn_mod38_check_char(body) == check
    assert check_uvci(uvci) is None


@given(alphabet_text)
def test_check_char_matches_reference(text: str) -> None:
    assert luhn_mod38_check_char(text) == reference_check_char(text)


@settings(max_examples=30)
@given(st.text(alphabet=LUHN_ALPHABET, min_size=1600, max_size=4000))
def test_check_char_of_long_text_matches_reference(text: str) -> None:
    # Beyond the length where the fast byte sum is exact, the slow path must take over.
    assert luhn_mod38_check_char(text) == reference_check_char(text)


@given(alphabet_text, st.data())
def test_every_single_substitution_changes_the_check_char(text: str, data: st.DataObject) -> None:
    # Luhn mod N detects every single-character error: that is what it is for.
    i = data.draw(st.integers(0, len(text) - 1))
    other = data.draw(st.sampled_from(LUHN_ALPHABET).filter(lambda c: c != text[i]))
    changed = text[:i] + other + text[i + 1 :]
    assert luhn_mod38_check_char(changed) != luhn_mod38_check_char(text)


@pytest.mark.parametrize("bad", ["", "urn:uvci:01", "URN:UVCI:01:NL#", "Ä", "A B", "A\n", 17, None])
def test_check_char_rejects_text_outside_the_alphabet(bad: object) -> None:
    with pytest.raises(ValueError, match="check character"):
        luhn_mod38_check_char(bad)  # type: ignore[arg-type]


# -- grammar --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uvci",
    [
        "URN:UVCI:01:NL:1",
        "URN:UVCI:01:NL:187/37512422923",
        "URN:UVCI:01:SE:EHM/100000024GI5HMGZKSMS",
        "URN:UVCI:01:PL:1/4F86BBF0865B465F9BDD907C3A2C141F",
        "URN:UVCI:01:DE:IZ12345A/VAC1/5CWLU12RNOB9RXSEOP6FG8",
    ],
)
def test_canonical_forms_are_accepted(uvci: str) -> None:
    assert check_uvci(uvci) is None
    assert check_uvci(uvci + "#" + luhn_mod38_check_char(uvci)) is None


@pytest.mark.parametrize(
    "uvci",
    [
        "",
        "urn:uvci:01:FR:KKF3BYIGYSVF#Q",  # lower case (FR vectors)
        "URN:UVCI:01:nl:187/37512422923",
        "URN:UVCI:01DE/IZ12345A/5CWLU12RNOB9RXSEOP6FG8#W",  # no colon after 01 (DE vectors)
        "01ITE7300E1AB2A84C719004F103DCB1F70A#6",  # no prefix (IT vectors)
        "dgci:V1:CY:3U7V5H6W8Y9Z0#89",
        "urn:uvci:01/PT/SPMS/1234",
        "URN:UVCI:02:NL:187/37512422923",  # unknown UVCI version
        "URN:UVCI:01:NLD:187",  # three-letter country
        "URN:UVCI:01:N1:187",
        "URN:UVCI:01:NL:",  # no identifier
        "URN:UVCI:01:NL:187/",
        "URN:UVCI:01:NL:/187",
        "URN:UVCI:01:NL:187//1",
        "URN:UVCI:01:NL:A/B/C/D",  # four parts
        "URN:UVCI:01:NL:187-37512422923",
        "URN:UVCI:01:NL:187 37512422923",
        "URN:UVCI:01:NL:187/37512422923#",  # '#' without a check character
        "URN:UVCI:01:NL:187/37512422923##Z",  # FI-style double '#'
        "URN:UVCI:01:NL:187/37512422923#ZZ",
        "URN:UVCI:01:NL:187/37512422923#z",
        "URN:UVCI:01:NL:187/37512422923\n",  # Python's `$` would let this through
        " URN:UVCI:01:NL:187/37512422923",
        "URN:UVCI:01:NL:187/٣٧٥",  # Arabic-Indic digits: `\d` would let these through
        "URN:UVCI:01:NL:ＡＢＣ",  # full-width letters
        "01 IS/ABC4556#8",
    ],
)
def test_non_canonical_forms_are_grammar_errors(uvci: str) -> None:
    result = check_uvci(uvci)
    assert result is not None
    rule, message = result
    assert rule == "uvci-grammar"
    assert "URN:UVCI:01:CC:PART" in message


def test_wrong_check_character_is_a_checksum_error() -> None:
    result = check_uvci("URN:UVCI:01:NL:187/37512422923#Y")
    assert result is not None
    rule, message = result
    assert rule == "uvci-checksum"
    assert "'Z'" in message and "'Y'" in message


@pytest.mark.parametrize("junk", [None, 12, b"URN:UVCI:01:NL:1", ["URN:UVCI:01:NL:1"]])
def test_check_uvci_on_non_strings(junk: object) -> None:
    assert check_uvci(junk) == ("uvci-grammar", "a UVCI must be a string")  # type: ignore[arg-type]


@given(st.text(max_size=100))
def test_check_uvci_never_raises(text: str) -> None:
    result = check_uvci(text)
    assert result is None or result[0] in ("uvci-grammar", "uvci-checksum")


@given(country, st.lists(part, min_size=1, max_size=3), st.data())
def test_single_substitutions_are_detected(cc: str, parts: list[str], data: st.DataObject) -> None:
    uvci = make_uvci(cc, *parts)
    # Change one character of the identifier (after the fixed prefix) to another valid part
    # character: the result is still grammatical, so only the check character catches it.
    body = uvci[:-2]
    positions = [i for i, ch in enumerate(body) if i >= len("URN:UVCI:01:NL:") and ch != "/"]
    i = data.draw(st.sampled_from(positions))
    others = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".replace(body[i], "")
    tampered = body[:i] + data.draw(st.sampled_from(others)) + body[i + 1 :] + uvci[-2:]
    result = check_uvci(tampered)
    assert result is not None and result[0] == "uvci-checksum"


# -- construction ---------------------------------------------------------------------------


def test_make_uvci_worked_example() -> None:
    assert make_uvci("NL", "187", "37512422923") == "URN:UVCI:01:NL:187/37512422923#Z"
    assert make_uvci("NL", "187", "37512422923", checksum=False) == (
        "URN:UVCI:01:NL:187/37512422923"
    )


def test_make_uvci_upper_cases_ascii_input() -> None:
    assert make_uvci("nl", "gp", "abc123") == make_uvci("NL", "GP", "ABC123")


@given(country, st.lists(part, min_size=1, max_size=3), st.booleans())
def test_make_uvci_output_is_canonical(cc: str, parts: list[str], checksum: bool) -> None:
    try:
        uvci = make_uvci(cc, *parts, checksum=checksum)
    except ValueError as exc:
        assert "at most 80" in str(exc)
        return
    assert len(uvci) <= UVCI_MAX_LENGTH
    assert check_uvci(uvci) is None
    assert ("#" in uvci) is checksum


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("N", "1"), "country"),
        (("NLD", "1"), "country"),
        (("N1", "1"), "country"),
        (("ıs", "1"), "country"),  # dotless i upper-cases to ASCII 'I'
        ((None, "1"), "country"),
        (("NL",), "one to three"),
        (("NL", "A", "B", "C", "D"), "one to three"),
        (("NL", ""), "part"),
        (("NL", "187/375"), "part"),
        (("NL", "A B"), "part"),
        (("NL", "ı"), "part"),
        (("NL", "Ä"), "part"),
        (("NL", 187), "part"),
        (("NL", "X" * 70), "at most 80"),
    ],
)
def test_make_uvci_rejects_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_uvci(*args)
