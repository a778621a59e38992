"""The shared state's own Redis link (engine/server/resplink.py): the RESP2 encoder and
parser on their own, and the link against a real redis-server (AUTH, SELECT, scripts,
error replies, a connection that breaks)."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from dccsign.server.resplink import Incomplete, NoScript, RespError, ScriptLink, encode, parse

values = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


def resp(value) -> bytes:
    """*value* as Redis would send it (RESP2), for the parser's tests."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(map(resp, value))


@given(values)
def test_parse_reads_what_redis_writes_and_waits_for_the_rest(value):
    data = resp(value)
    assert parse(data) == (value, len(data))
    for cut in range(len(data)):
        with pytest.raises(Incomplete):
            parse(data[:cut])


def test_parse_error_replies_and_simple_strings():
    nested = b"*2\r\n:1\r\n-ERR inner\r\n"
    value, _ = parse(nested)
    assert value[0] == 1 and isinstance(value[1], RespError) and str(value[1]) == "ERR inner"
    assert isinstance(parse(b"-NOSCRIPT No matching script\r\n")[0], NoScript)
    assert parse(b"+OK\r\n") == (b"OK", 5)
    assert parse(b"*-1\r\n") == (None, 5)
    with pytest.raises(RespError, match="not a RESP reply"):
        parse(b"?what\r\n")


def test_encode_is_an_array_of_bulk_strings():
    assert encode(("SET", b"k\r\n", 12)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"


@pytest.mark.parametrize("url", ["http://x", "rediss://h:1", "redis+cluster://a:1", "redis://h/x"])
def test_urls_the_link_does_not_serve(url):
    with pytest.raises(ValueError):
        ScriptLink(url)


async def test_scripts_errors_and_databases_on_a_real_redis(redis):
    async with ScriptLink(redis.url) as link:
        sha = await link.script_load("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1, false}")
        assert await link.evalsha(sha, [b"k"], [b"v\x00\r\n", 41]) == [b"k", b"v\x00\r\n", 42, None]
        with pytest.raises(NoScript):
            await link.evalsha(b"0" * 40, [b"k"], [])
        with pytest.raises(RespError, match="ERR"):
            await link.call("NO-SUCH-COMMAND")
        assert await link.call("SET", "only-in-0", "x") == b"OK"  # the link still works
        big = b"x" * 200_000  # a reply over several reads
        assert await link.call("ECHO", big) == big
    async with ScriptLink(redis.url.rsplit("/", 1)[0] + "/3") as link:
        assert await link.call("GET", "only-in-0") is None  # SELECT 3 happened
        await link.call("CONFIG", "SET", "requirepass", "s3cret")
    with pytest.raises(RespError, match=r"NOAUTH|AUTH"):
        async with ScriptLink(redis.url) as link:
            await link.call("GET", "only-in-0")
    async with ScriptLink(f"redis://:s3cret@127.0.0.1:{redis.port}/0") as link:
        assert await link.call("GET", "only-in-0") == b"x"
        await link.call("CONFIG", "SET", "requirepass", "")


async def test_a_connection_that_breaks_raises(redis):
    async with ScriptLink(redis.url) as link:
        await trio.to_thread.run_sync(redis.stop)
        with pytest.raises((trio.BrokenResourceError, OSError)):
            await link.call("PING")
