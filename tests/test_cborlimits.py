"""protocol/cborlimits.py: counting a CBOR item's data items without decoding it (the native
``cbor_scan`` and its pure-Python reference, differentially), and the strict decoding both
codecs use."""

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccsign.protocol import cborlimits
from dccsign.testing.samples import varied_samples

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)  # fmt: skip


def _reference_count(value):
    """Data items by construction: what scan must say for cbor2's encoding of *value*."""
    if isinstance(value, list):
        return 1 + sum(_reference_count(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + _reference_count(v) for v in value.values())
    return 1


def _outcome(scan, data, max_items, max_depth):
    try:
        return scan(data, max_items, max_depth)
    except ValueError as exc:
        return str(exc)


@FUZZ
@given(value=values)
def test_counts_every_data_item(impl, value):
    data = cbor2.dumps(value)
    assert impl.cbor_scan(data, 10**6, 64) == _reference_count(value)


@FUZZ
@given(data=st.binary(max_size=300), max_items=st.integers(1, 60), max_depth=st.integers(1, 8))
def test_native_and_reference_agree_on_any_bytes(data, max_items, max_depth):
    from dccsign.native import implementation

    try:
        native = implementation("native")
    except ImportError as exc:
        pytest.skip(str(exc))
    python = implementation("python")
    assert _outcome(native.cbor_scan, data, max_items, max_depth) == _outcome(
        python.cbor_scan, data, max_items, max_depth
    )


@FUZZ
@given(value=values, cut=st.integers(0, 400), flip=st.integers(0, 3000))
def test_native_and_reference_agree_on_mutated_cbor(value, cut, flip):
    from dccsign.native import implementation

    try:
        native = implementation("native")
    except ImportError as exc:
        pytest.skip(str(exc))
    data = bytearray(cbor2.dumps(value))
    if data:
        data[flip % len(data)] ^= 1 << (flip % 8)
    data = bytes(data[: max(1, len(data) - cut % 4)])
    for limits in ((10**6, 64), (5, 3), (1, 1)):
        assert _outcome(native.cbor_scan, data, *limits) == _outcome(
            implementation("python").cbor_scan, data, *limits
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x9a\xff\xff\xff\xff", "malformed CBOR: CBOR container longer than its data"),
        (b"\x9a\x00\x01\x00\x00" + b"\xa0" * 65536, "more than 1000 CBOR data items"),
        (b"\x81" * 20 + b"\x00", "CBOR nested more than 16 levels deep"),
        (b"\xc1" * 20 + b"\x00", "CBOR nested more than 16 levels deep"),  # tags nest too
        (b"\xa0\x00", "trailing bytes after the CBOR item"),
        (b"\x5f\x41", "malformed CBOR: truncated CBOR string"),
        (b"\x5f\x61a\xff", "malformed CBOR: bad chunk in indefinite-length string"),
        (b"\xbf\x00", "malformed CBOR: truncated CBOR item"),
        (b"\xff", "malformed CBOR: unexpected CBOR break"),
        (b"\x1c", "malformed CBOR: reserved CBOR additional information (28-30)"),
        (b"\x1f", "malformed CBOR: invalid indefinite length on an integer or tag"),
        (b"\x19\x01", "malformed CBOR: truncated CBOR head"),
        (b"", "malformed CBOR: truncated CBOR item"),
    ],
)
def test_each_refusal_says_why(impl, data, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', '.').replace(')', '.')}$"):
        impl.cbor_scan(data, 1000, 16)


def test_a_definite_container_too_big_is_refused_at_its_head(impl):
    """The bomb of 16.7 million empty maps is refused before a byte of it is walked: the
    count in the array's head alone is over the limit."""
    n = 16 * 1024 * 1024
    bomb = b"\x9a" + n.to_bytes(4, "big") + b"\xa0" * n
    with pytest.raises(ValueError, match="more than 256064 CBOR data items"):
        impl.cbor_scan(bomb, 256_064, 16)


def test_limits_out_of_range_are_refused(impl):
    for max_items, max_depth in ((0, 16), (10, 0), (10, 65), (1.5, 16)):
        with pytest.raises(ValueError, match="must be"):
            impl.cbor_scan(b"\x00", max_items, max_depth)


def test_a_real_batch_is_far_below_the_wire_limit(impl):
    from dccsign.protocol import wire

    body = cbor2.dumps(
        {"items": [{"dcc": d, "account": "uzi:1", "idempotency_key": "k" * 64}
                   for d in varied_samples(1000)]}
    )  # fmt: skip
    count = impl.cbor_scan(body, wire.body_item_limit(1000), wire.MAX_DEPTH)
    assert count < wire.body_item_limit(1000) / 4  # ~41 per item against 256


def test_decode_is_strict():
    scan = cborlimits.scan
    assert cborlimits.decode(cbor2.dumps({"a": [1, b"x"]}), scan=scan, max_items=10,
                             max_depth=4) == {"a": [1, b"x"]}  # fmt: skip
    for bad, why in [
        (cbor2.dumps(cbor2.CBORTag(1, 0)), "tag"),
        (cbor2.dumps(cbor2.CBORTag(2, b"\x01\x00")), "tag"),  # a bignum
        (b"\xa2\x61a\x00\x61a\x01", "duplicate"),
        (cbor2.dumps({"a": 1}) + b"\x00", "trailing bytes"),
        (b"\xa1\x01\x02", "key"),  # an integer map key
    ]:
        with pytest.raises(ValueError) as info:
            cborlimits.decode(bad, scan=scan, max_items=10, max_depth=4)
        assert why in str(info.value).lower(), str(info.value)
