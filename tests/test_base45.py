"""base45 (RFC 9285) against both implementations."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dccsign.native import Base45DecodeError, implementation

# RFC 9285 §4.3 examples.
RFC_EXAMPLES = [
    (b"AB", "BB8"),
    (b"Hello!!", "%69 VD92EX0"),
    (b"base-45", "UJCLQE7W581"),
    (b"ietf!", "QED8WEX0"),
]


@pytest.mark.parametrize(("raw", "text"), RFC_EXAMPLES)
def test_rfc_examples(impl, raw, text):
    assert impl.b45encode(raw) == text
    assert impl.b45decode(text) == raw
    assert impl.b45decode(text.encode()) == raw


@given(st.binary(max_size=2000))
def test_round_trip_and_agreement(impl, data):
    text = impl.b45encode(data)
    assert impl.b45decode(text) == data
    assert text == implementation("python").b45encode(data)


def test_empty(impl):
    assert impl.b45encode(b"") == ""
    assert impl.b45decode("") == b""


def test_space_is_a_symbol(impl):
    # 0x0024 -> "0 0"? No: c = 36 (space) for n = 36, so b"\x00\x24" encodes as " 00".
    # A space can only be the first or second digit of a group (the last digit of a triplet
    # is at most 65535 // 2025 = 32, of a pair at most 255 // 45 = 5), so base45 never ends
    # in a space -- but it must never be stripped either (spec notes §4.10).
    data = b"\x00\x24"
    text = impl.b45encode(data)
    assert text == " 00"
    assert impl.b45decode(text) == data
    assert impl.b45decode(text.strip()) != data


@pytest.mark.parametrize(
    ("text", "fragment", "position"),
    [
        ("bb8", "character 'b'", 0),  # lower case (TD common/B1)
        ("BB8a", "length 4", 4),  # length = 1 mod 3
        ("A", "length 1", 1),
        ("GGW", "exceeds 65535", 0),  # 16 + 16*45 + 32*2025 = 65536
        ("BB8GGW", "exceeds 65535", 3),
        (":Z", "exceeds 255", 0),  # 44 + 35*45 > 255
        ("BB8é0", "character 'é'", 3),
        ("BB#", "character '#'", 2),
    ],
)
def test_rejects_malformed(impl, text, fragment, position):
    with pytest.raises(Base45DecodeError, match=fragment) as info:
        impl.b45decode(text)
    assert info.value.position == position
    assert isinstance(info.value, ValueError)


def test_largest_values_accepted(impl):
    assert impl.b45decode("FGW") == b"\xff\xff"
    assert impl.b45decode("U5") == b"\xff"


@given(st.text(max_size=60))
def test_decoder_raises_only_its_error(impl, text):
    with contextlib.suppress(Base45DecodeError):  # any other exception fails the test
        impl.b45decode(text)


def test_type_errors(impl):
    with pytest.raises(TypeError):
        impl.b45decode(123)
    with pytest.raises(TypeError):
        impl.b45encode("text")
