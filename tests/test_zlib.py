"""zlib streams for HC1 against both implementations."""

import gzip
import os
import threading
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dccsign.native import ZlibError


@given(st.binary(max_size=5000), st.sampled_from([-1, 0, 1, 6, 9]))
def test_round_trip_with_standard_zlib(impl, data, level):
    z = impl.zlib_compress(data, level)
    assert z[0] == 0x78  # 32 KiB window: a verifier inflates only streams starting 0x78
    assert zlib.decompress(z) == data
    assert impl.zlib_decompress(z) == data


def test_decompress_accepts_other_encoders(impl):
    data = os.urandom(200) + b"x" * 500
    for level in range(10):
        assert impl.zlib_decompress(zlib.compress(data, level)) == data
    co = zlib.compressobj(9, zlib.DEFLATED, 9)  # a small window (CMF 0x18) is still zlib
    assert impl.zlib_decompress(co.compress(data) + co.flush()) == data


@pytest.mark.parametrize("level", [-2, 10, "9", None, 1.0])
def test_level_is_checked(impl, level):
    with pytest.raises(ValueError, match="zlib level"):
        impl.zlib_compress(b"x", level)


def test_rejects_broken_streams(impl):
    good = zlib.compress(b"hello " * 50, 9)
    cases = {
        "truncated": good[:-3],
        "trailing": good + b"\x00",
        "raw deflate": zlib.compress(b"hello", 9)[2:-4],
        "gzip": gzip.compress(b"hello"),
        "uncompressed": b"hello world",  # TD common/Z2
        "empty": b"",
        "corrupt": good[:5] + bytes([good[5] ^ 0xFF]) + good[6:],
    }
    for name, data in cases.items():
        with pytest.raises(ZlibError):
            impl.zlib_decompress(data)
            pytest.fail(name)


def test_size_limit(impl):
    bomb = zlib.compress(b"\x00" * 200_000, 9)
    with pytest.raises(ZlibError, match="size limit"):
        impl.zlib_decompress(bomb)
    assert len(impl.zlib_decompress(bomb, max_length=200_000)) == 200_000
    with pytest.raises(ZlibError, match="size limit"):
        impl.zlib_decompress(bomb, max_length=199_999)
    with pytest.raises(ValueError):
        impl.zlib_decompress(bomb, max_length=0)


def test_threads_do_not_share_streams(impl):
    # The native core keeps one deflate stream per thread; interleaved use must not mix them.
    inputs = [os.urandom(50) * (i % 7 + 1) for i in range(64)]
    errors = []

    def work(seed):
        try:
            for _ in range(200):
                for level in (9, 1, 0):
                    data = inputs[seed]
                    if zlib.decompress(impl.zlib_compress(data, level)) != data:
                        errors.append(seed)
        except Exception as exc:  # surfaces in the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
