"""Replies straight to the gateway's reply listener, and the reply stream whenever that fails.

Real Redis, real gRPC servers, real TCP connections on loopback: the gateway's listener, and
plain asyncio servers standing in for a listener that misbehaves (refuses, never acknowledges).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import REGISTRY

from inference import grpc_service_pb2 as pb
from services.common import keys
from services.common.embedded_redis import EmbeddedRedis
from services.common.queue import WELCOME, QueuedRequest, Reply, ReplyAddress, hello, read_hello, read_replies
from services.common.redis_conn import send_commands
from services.gateway.direct_replies import ReplyListener
from services.gateway.replies import ReplyReader
from services.inference.acks import HeldAcks
from services.inference.direct_replies import DirectReplies
from tests.integration.suite import Suite, queue_settled
from tests.models import affine_model

pytestmark = pytest.mark.integration

CALLS = 12


def _replies(path: str) -> float:
    return REGISTRY.get_sample_value("maas_gateway_replies_total", {"path": path}) or 0.0


def _request(value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return request


async def _call_all(suite: Suite) -> None:
    """CALLS concurrent calls, each answered with its own value."""
    responses = await asyncio.gather(*(suite.inference.ModelInfer(_request(i), timeout=20) for i in range(CALLS)))
    for i, response in enumerate(responses):
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [2.0 * i + 1] * 4


@pytest.fixture
async def started(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Suite]:
    """The suite, its gateway with ``request.param``'s settings; the database is flushed after."""
    suite = await Suite(redis_server.url, tmp_path, gateway=getattr(request, "param", {})).start()
    await suite.push("affine", affine_model(), max_batch_size=8)
    yield suite
    await suite.stop()


async def test_replies_go_straight_to_the_gateway_and_the_entries_are_acked(started: Suite) -> None:
    listener = started.gateway.listener
    assert listener is not None and listener.address.startswith(f"127.0.0.1:{listener.port}/")
    direct, stream = _replies("direct"), _replies("stream")
    await _call_all(started)
    assert _replies("direct") - direct == CALLS
    assert _replies("stream") - stream == 0
    assert await queue_settled(started.redis, keys.queue("affine", 1))


@pytest.mark.parametrize("started", [{"direct_replies": False}], indirect=True)
async def test_a_gateway_without_a_listener_gets_its_replies_through_its_stream(started: Suite) -> None:
    assert started.gateway.listener is None
    direct, stream = _replies("direct"), _replies("stream")
    await _call_all(started)
    assert _replies("direct") - direct == 0
    assert _replies("stream") - stream == CALLS
    assert await queue_settled(started.redis, keys.queue("affine", 1))


# NOTE: the listener binds 127.0.0.1 only; 127.0.0.2, loopback too, has nothing listening.
@pytest.mark.parametrize("started", [{"reply_advertise_host": "127.0.0.2"}], indirect=True)
async def test_a_listener_workers_cannot_reach_costs_no_call(started: Suite) -> None:
    direct, stream = _replies("direct"), _replies("stream")
    await _call_all(started)
    await _call_all(started)  # the worker leaves the address alone for a while: no connect per batch
    assert _replies("direct") - direct == 0
    assert _replies("stream") - stream == 2 * CALLS
    assert await queue_settled(started.redis, keys.queue("affine", 1))


async def test_a_reply_that_arrives_both_ways_answers_its_call_once(started: Suite) -> None:
    replies = started.gateway.replies
    future = replies.expect("call-1")
    replies.deliver(Reply(id="call-1", code=0, payload=b"first"))
    replies.deliver(Reply(id="call-1", code=0, payload=b"again"))  # e.g. the stream's, after a lost ACK
    assert (await future).payload == b"first"
    replies.forget("call-1")


async def test_the_listener_closes_a_connection_without_its_token(started: Suite) -> None:
    listener = started.gateway.listener
    assert listener is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(hello(b"wrong"))
    assert await asyncio.wait_for(reader.read(10), 5) == b""  # closed, no welcome
    writer.close()
    good = listener.address
    wrong = good.rpartition("/")[0] + "/not-the-token"
    sender = DirectReplies(timeout_s=2)
    try:
        assert not await sender.send(wrong, [Reply(id="x", code=0)])
        assert await sender.send(good, [Reply(id="nobody-waits", code=0)])  # dropped as late, but acknowledged
    finally:
        await sender.close()


async def test_entries_name_the_listener_and_a_generation_would_not() -> None:
    entry = QueuedRequest(id="c", reply_to="r", deadline_ms=1, payload=b"", reply_addr="127.0.0.1:1/t")
    fields = {k.encode(): str(v).encode() if not isinstance(v, bytes) else v for k, v in entry.to_fields().items()}
    assert QueuedRequest.from_fields(fields) == entry
    del fields[b"raddr"]  # an entry of a gateway without a listener, or of an older one
    assert QueuedRequest.from_fields(fields).reply_addr == ""


async def _silent_listener(frames: list[list[Reply]]) -> tuple[asyncio.Server, int]:
    """A listener that welcomes any worker and reads its frames, but never acknowledges one."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_hello(reader) == b"token"
        writer.write(WELCOME)
        try:
            while True:
                frames.append(await read_replies(reader, 1 << 20))
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_frame_without_an_ack_in_time_is_not_delivered_and_the_address_is_left_alone() -> None:
    frames: list[list[Reply]] = []
    server, port = await _silent_listener(frames)
    sender = DirectReplies(timeout_s=0.3, retry_after_s=60)
    address = f"127.0.0.1:{port}/token"
    try:
        assert not await sender.send(address, [Reply(id="a", code=0, payload=b"x" * 1000)])
        assert [[reply.id for reply in frame] for frame in frames] == [["a"]]
        assert not await sender.send(address, [Reply(id="b", code=0)])  # not tried again: straight to the stream
        await asyncio.sleep(0.1)
        assert len(frames) == 1
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()


async def test_a_gateway_that_restarts_gets_a_new_connection() -> None:
    frames: list[list[Reply]] = []

    async def acking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_hello(reader) == b"token"
        writer.write(WELCOME)
        frames.append(await read_replies(reader, 1 << 20))
        writer.write(b".")
        writer.close()  # the gateway goes away after one frame

    server = await asyncio.start_server(acking, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}/token"
    sender = DirectReplies(timeout_s=2, retry_after_s=60)
    try:
        assert await sender.send(address, [Reply(id="a", code=0)])
        await asyncio.sleep(0.1)  # the connection's end is seen
        assert await sender.send(address, [Reply(id="b", code=0)])  # reconnected, not refused
        assert [[reply.id for reply in frame] for frame in frames] == [["a"], ["b"]]
    finally:
        await sender.close()
        server.close()
        await server.wait_closed()


# Over a Unix socket on the gateway's host ---------------------------------------------------


async def test_a_worker_on_the_gateways_host_sends_its_replies_over_the_unix_socket(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "replies.sock"
    # NOTE: nothing listens on 127.0.0.2 (loopback): a reply can only arrive through the socket.
    suite = await Suite(
        redis_server.url, tmp_path, gateway={"reply_socket": str(path), "reply_advertise_host": "127.0.0.2"}
    ).start()
    try:
        await suite.push("affine", affine_model(), max_batch_size=8)
        listener = suite.gateway.listener
        assert listener is not None and listener.address.endswith(f";{path}@{socket.gethostname()}")
        assert os.stat(path).st_mode & 0o777 == 0o600
        direct, stream = _replies("direct"), _replies("stream")
        await _call_all(suite)
        assert _replies("direct") - direct == CALLS
        assert _replies("stream") - stream == 0
        assert await queue_settled(suite.redis, keys.queue("affine", 1))
    finally:
        await suite.stop()
    assert not path.exists()


async def _acking_server(frames: list[str], where: str | int, token: bytes = b"token") -> asyncio.Server:
    """A listener (TCP port 0, or a Unix socket path) that acknowledges every frame; ``frames`` gets their ids."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_hello(reader) != token:
            writer.close()
            return
        writer.write(WELCOME)
        try:
            while True:
                frames.extend(reply.id for reply in await read_replies(reader, 1 << 20))
                writer.write(b".")
        except asyncio.IncompleteReadError:
            writer.close()

    if isinstance(where, str):
        return await asyncio.start_unix_server(serve, where)
    return await asyncio.start_server(serve, "127.0.0.1", where)


async def test_a_reply_socket_that_refuses_falls_back_to_tcp_and_another_hosts_is_not_tried(tmp_path: Path) -> None:
    over_tcp: list[str] = []
    over_socket: list[str] = []
    tcp = await _acking_server(over_tcp, 0)
    path = str(tmp_path / "other-gateway.sock")
    other = await _acking_server(over_socket, path, b"its-own")  # another gateway's socket: it refuses our token
    port = tcp.sockets[0].getsockname()[1]
    sender = DirectReplies(timeout_s=2, retry_after_s=60)
    try:
        here = ReplyAddress("127.0.0.1", port, b"token", path, socket.gethostname())
        assert await sender.send(str(here), [Reply(id="a", code=0)])
        elsewhere = ReplyAddress("127.0.0.1", port, b"token", "/nonexistent/replies.sock", "another-host")
        assert await sender.send(str(elsewhere), [Reply(id="b", code=0)])
        assert over_tcp == ["a", "b"]
        assert over_socket == []
    finally:
        await sender.close()
        for server in (tcp, other):
            server.close()
            await server.wait_closed()
    right = await _acking_server(over_socket, path)  # now the socket is the right gateway's
    sender = DirectReplies(timeout_s=2, retry_after_s=60)
    try:
        assert await sender.send(
            str(ReplyAddress("127.0.0.1", 1, b"token", path, socket.gethostname())), [Reply(id="c", code=0)]
        )
        assert over_socket == ["c"]  # TCP port 1 has no listener: the socket carried it
    finally:
        await sender.close()
        right.close()
        await right.wait_closed()


async def test_a_reply_socket_left_by_a_dead_gateway_is_replaced_and_a_live_or_foreign_one_is_refused(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    def listener(path: Path) -> ReplyListener:
        replies = ReplyReader(redis_client, "replies:test", ttl_s=60, block_ms=100)
        return ReplyListener(
            replies, host="127.0.0.1", port=0, advertise_host="127.0.0.1", max_payload_bytes=1 << 20,
            socket_path=str(path),
        )  # fmt: skip

    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, nothing listens: what a killed gateway leaves
    first = listener(stale)
    await first.start()
    try:
        assert ";" in first.address
        with pytest.raises(RuntimeError, match="is in use by another process"):
            await listener(stale).start()
    finally:
        await first.stop()
    assert not stale.exists()
    regular = tmp_path / "regular"
    regular.write_text("not a socket")
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        await listener(regular).start()
    assert regular.read_text() == "not a socket"


# Held acks (services/inference/acks.py) ----------------------------------------------------


@pytest.fixture
async def holding(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    """The suite with a worker that holds acks for 5 s: longer than any test waits."""
    suite = await Suite(redis_server.url, tmp_path).start(with_worker=False)
    await suite.start_worker(held_ack_ms=5000)
    await suite.push("affine", affine_model(), max_batch_size=8)
    yield suite
    await suite.stop()


async def _pending(redis: aioredis.Redis, queue: str) -> list[bytes]:
    return [item["message_id"] for item in await redis.xpending_range(queue, keys.QUEUE_GROUP, "-", "+", 100)]


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 3.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_a_batch_acks_ride_with_the_next_read_and_a_stopping_worker_sends_the_rest(holding: Suite) -> None:
    queue, worker = keys.queue("affine", 1), holding.worker
    assert worker is not None
    await holding.inference.ModelInfer(_request(1), timeout=20)
    # The reply came through the listener; its entry's acks wait for a read: pending, in flight.
    [first] = await _pending(holding.redis, queue)
    await holding.inference.ModelInfer(_request(2), timeout=20)

    # The read that follows the second call's run carries the first call's acks, long before 5 s.
    async def only_second_pending() -> bool:
        pending = await _pending(holding.redis, queue)
        return len(pending) == 1 and pending[0] != first

    assert await _eventually(only_second_pending)
    assert await holding.redis.xlen(queue) == 1
    await worker.beat()  # the held entry counts as in flight
    assert json.loads(await holding.redis.get(keys.worker(worker.settings.worker_id)))["in_flight"] == 1
    await worker.drain()  # a stopping consumer sends what it holds
    assert await holding.redis.xlen(queue) == 0
    assert await _pending(holding.redis, queue) == []
    stats = await holding.redis.hgetall(keys.stats("affine", 1))
    assert stats, "the batches count in the statistics once their held acks went through"


async def _exists(redis: aioredis.Redis, key: str) -> bool:
    return bool(await redis.exists(key))


async def test_held_acks_go_alone_once_their_delay_passes(redis_client: aioredis.Redis) -> None:
    async def send(commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        return await send_commands(redis_client, commands)

    settled: list[int] = []
    acks = HeldAcks(send, 0.05, lambda: settled.append(1))
    acks.hold([b"1-1"], [("SET", "held", "sent")])
    assert len(acks) == 1 and acks.ids == {b"1-1"}
    assert await _eventually(lambda: _exists(redis_client, "held"))  # no read took them: the timer sent them
    assert len(acks) == 0 and settled == [1]

    acked: list[str] = []
    acks.hold([b"2-1"], [("SET", "taken", "by-a-read")], lambda: acked.append("2-1"))
    block, taken = acks.take()  # a read takes them before the delay: the timer is off
    assert block[0] == ("MULTI",) and block[-1] == ("EXEC",) and taken.ids == {b"2-1"}
    await asyncio.sleep(0.15)
    assert not await redis_client.exists("taken")
    assert acks.ids == {b"2-1"}  # still held until the read's reply settles them
    acks.hold([b"3-1"], [("SET", "later", "x")], lambda: acked.append("3-1"))  # while the first is on its way
    later, later_taken = acks.take()  # the next read takes only what is new
    assert later[1:-1] == [("SET", "later", "x")] and later_taken.ids == {b"3-1"} and acks.ids == {b"2-1", b"3-1"}
    acks.settled(later_taken, [b"OK"])
    assert acks.ids == {b"2-1"}, "a block settles its own entries only"
    assert acked == ["3-1"], "what counts once acked counts when its own block went through"
    acks.settled(taken, redis.exceptions.ConnectionError("gone"))  # lost: pending, a reclaim runs them again
    assert len(acks) == 0
    assert acked == ["3-1"], "a block that failed counts nothing: its entries run again"
    await acks.close()
