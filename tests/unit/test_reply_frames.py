"""The reply listener's frames (services/common/queue.py): what a worker writes, the gateway reads back."""

from __future__ import annotations

import asyncio
import socket

import pytest

from services.common.queue import (
    MAX_FRAME_REPLIES,
    MAX_TOKEN_BYTES,
    FrameError,
    Reply,
    ReplyAddress,
    hello,
    pack_replies,
    read_hello,
    read_replies,
)


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_replies_come_back_as_they_were_sent_frame_by_frame() -> None:
    first = [
        Reply(id="gw-1", code=0, payload=b"\x00\x01" * 3000),
        Reply(id="gw-2", code=4, message="no reply from a worker within 1 s: Ünïcode"),
        Reply(id="gw-3", code=0),
    ]
    second = [Reply(id="gw-4", code=3, message="bad", payload=b"")]
    reader = _reader(b"".join([*pack_replies(first), *pack_replies(second), *pack_replies([])]))
    assert await read_replies(reader, 1 << 20) == first
    assert await read_replies(reader, 1 << 20) == second
    assert await read_replies(reader, 1 << 20) == []
    with pytest.raises(asyncio.IncompleteReadError):  # the connection ended between frames
        await read_replies(reader, 1 << 20)


async def test_a_frame_cut_short_is_an_incomplete_read() -> None:
    data = b"".join(pack_replies([Reply(id="gw-1", code=0, payload=b"x" * 100)]))
    with pytest.raises(asyncio.IncompleteReadError):
        await read_replies(_reader(data[:-1]), 1 << 20)


async def test_a_frame_over_the_limits_is_refused_before_it_is_read() -> None:
    big = b"".join(pack_replies([Reply(id="gw-1", code=0, payload=b"x" * 2000)]))
    with pytest.raises(FrameError, match="a reply of 2000 bytes, more than this gateway's 1000"):
        await read_replies(_reader(big), 1000)
    with pytest.raises(FrameError, match=f"a frame of {MAX_FRAME_REPLIES + 1} replies"):
        await read_replies(_reader((MAX_FRAME_REPLIES + 1).to_bytes(4, "little")), 1000)


async def test_a_reply_id_that_is_not_utf8_is_refused() -> None:
    data = bytearray(b"".join(pack_replies([Reply(id="ab", code=0)])))
    data[4 + 11] = 0xFF  # the id's first byte, after the count and the header
    with pytest.raises(FrameError, match="not UTF-8"):
        await read_replies(_reader(bytes(data)), 1000)


def test_a_generations_partial_replies_are_not_framed() -> None:
    with pytest.raises(AssertionError, match="in order"):
        pack_replies([Reply(id="gw-1", code=0, seq=0, piece=b"hi")])


async def test_a_connection_opens_with_its_token_and_anything_else_reads_as_none() -> None:
    assert await read_hello(_reader(hello(b"s3cret") + b"frames follow")) == b"s3cret"
    assert await read_hello(_reader(b"GET / HTTP/1.1\r\n" + b"x" * 20)) == b""  # not a worker
    assert await read_hello(_reader(hello(b"x" * (MAX_TOKEN_BYTES + 1)))) == b""
    with pytest.raises(asyncio.IncompleteReadError):
        await read_hello(_reader(hello(b"s3cret")[:-1]))


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (ReplyAddress("10.0.0.7", 4100, b"tok-en_1"), "10.0.0.7:4100/tok-en_1"),
        (ReplyAddress("::1", 9, b"t"), "[::1]:9/t"),
        (
            ReplyAddress("127.0.0.1", 5, b"t", "/run/maas@x/gateway;replies.sock", "node-1"),
            "127.0.0.1:5/t;/run/maas@x/gateway;replies.sock@node-1",
        ),
    ],
)
def test_a_reply_address_reads_back_as_it_was_written(address: ReplyAddress, text: str) -> None:
    assert str(address) == text
    assert ReplyAddress.parse(text) == address


@pytest.mark.parametrize(
    "text", ["", "127.0.0.1:5", "127.0.0.1/t", ":5/t", "127.0.0.1:x/t", "127.0.0.1:5/t;", "127.0.0.1:5/t;/p", "h:5/t;@"]
)
def test_a_reply_address_of_another_form_is_refused_with_the_form_it_should_have(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not host:port/token\[;path@hostname\]"):
        ReplyAddress.parse(text)


def test_a_reply_socket_is_used_only_from_the_host_that_bound_it() -> None:
    here = ReplyAddress("127.0.0.1", 5, b"t", "/run/r.sock", socket.gethostname())
    assert here.local_socket() == "/run/r.sock"
    assert ReplyAddress("127.0.0.1", 5, b"t", "/run/r.sock", "another-host").local_socket() == ""
    assert ReplyAddress("127.0.0.1", 5, b"t").local_socket() == ""
