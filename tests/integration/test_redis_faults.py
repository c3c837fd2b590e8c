"""Redis restarts as the services live through them: calls after Redis is back, and sockets left behind.

The sockets are counted from ``/proc`` (this process's TCP sockets whose peer is the Redis port),
so these tests run on Linux only.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.exceptions

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from services.common.embedded_redis import EmbeddedRedis
from services.common.redis_conn import create_redis, send_commands
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="counts sockets from /proc (Linux)"),
]

_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip
_CALL_TIMEOUT_S = 5.0
_SETTLE_S = 1.0
"""After Redis answers PING again, calls started this much later must all succeed."""
_STEADY_INTERVAL_S = 0.01
"""About 100 calls a second, plus bursts."""
_BURST = 60
"""Concurrent calls in a burst: they spread over many pooled connections."""


def redis_sockets(port: int) -> Counter[str]:
    """Count, by TCP state, the sockets this process holds open to ``port``."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed while listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    states: Counter[str] = Counter()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes:
            states[_TCP_STATES.get(state, state)] += 1
    return states


@dataclass
class _Traffic:
    """Steady ModelInfer calls plus bursts; every call's start, end and outcome is kept."""

    stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub
    calls: list[tuple[float, float, str]] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _steady: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._steady = asyncio.create_task(self._run_steady())

    async def burst(self, size: int = _BURST) -> None:
        await asyncio.gather(*(self._spawn() for _ in range(size)))

    async def stop(self) -> None:
        """Stop the steady calls and wait for every call to end (each has a deadline)."""
        if self._steady is not None:
            self._steady.cancel()
            await asyncio.gather(self._steady, return_exceptions=True)
        await asyncio.gather(*self._tasks)

    def _spawn(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self._call())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_steady(self) -> None:
        while True:
            self._spawn()
            await asyncio.sleep(_STEADY_INTERVAL_S)

    async def _call(self) -> None:
        request = pb.ModelInferRequest(model_name="affine")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            response = await self.stub.ModelInfer(request, timeout=_CALL_TIMEOUT_S)
            outcome = (
                "OK" if np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [3.0] * 4 else "BAD"
            )
        except grpc.aio.AioRpcError as exc:
            outcome = f"{exc.code().name}: {exc.details()}"
        self.calls.append((started, loop.time(), outcome))


async def _restart(server: EmbeddedRedis) -> tuple[float, float]:
    """Stop Redis gracefully (SIGTERM: AOF flushed) and start it on the same port; return (down, back)."""
    loop = asyncio.get_running_loop()
    down = loop.time()
    await asyncio.to_thread(server.stop)  # traffic goes on meanwhile
    server.start()  # from this thread: its parent-death signal follows the creating thread
    return down, loop.time()


async def test_calls_and_connections_recover_after_graceful_restarts(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis").start()
    running = await Suite(server.url, tmp_path).start()
    traffic = _Traffic(running.inference)
    problems: list[str] = []
    windows: list[tuple[float, float]] = []
    try:
        await running.push("affine", affine_model())
        traffic.start()
        for _ in range(2):  # fill the pools: bursts leave idle connections behind
            await asyncio.sleep(0.5)
            await traffic.burst()
        await asyncio.sleep(0.5)
        before = redis_sockets(server.port)
        for restart in (1, 2):
            down, back = await _restart(server)
            if windows:
                windows[-1] = (windows[-1][0], down)
            windows.append((back, float("inf")))
            await asyncio.sleep(_SETTLE_S + 1.0)  # steady traffic only: idle pooled connections stay idle
            after = redis_sockets(server.port)
            if after["CLOSE_WAIT"] or sum(after.values()) > sum(before.values()) + 5:
                problems.append(
                    f"restart {restart}: sockets to Redis {dict(after)}, before the restarts {dict(before)}"
                )
            await traffic.burst()  # reaches the connections that were idle during the restart
            await asyncio.sleep(0.5)
        await traffic.stop()
        final = redis_sockets(server.port)
    finally:
        await traffic.stop()
        await running.stop()
        server.stop()

    judged = [
        (started - back, outcome)
        for started, _ended, outcome in traffic.calls
        for back, next_down in windows
        if back + _SETTLE_S <= started < next_down
    ]
    failed = [f"started {after:.2f} s after Redis was back: {outcome}" for after, outcome in judged if outcome != "OK"]
    counted = len(judged)
    assert counted > 200, f"too little traffic to judge: {counted} calls after the restarts"
    if failed:
        problems.append(f"{len(failed)} of {counted} calls failed after Redis was back: {failed[:10]}")
    if final["CLOSE_WAIT"] or sum(final.values()) > sum(before.values()) + 5:
        problems.append(f"at the end: sockets to Redis {dict(final)}, before the restarts {dict(before)}")
    assert not problems, "\n".join(problems)


async def test_pooled_connections_survive_a_restart_and_close_with_the_server(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persistence=False).start()
    client = create_redis(server.url, timeout_s=2)
    try:
        await asyncio.gather(*(client.xread({"nothing": "0-0"}, block=100) for _ in range(20)))
        assert redis_sockets(server.port) == {"ESTABLISHED": 20}
        await _restart(server)
        await asyncio.sleep(0.2)
        assert redis_sockets(server.port) == {}, "the server closed them: no socket may stay in CLOSE_WAIT"
        replies = await asyncio.gather(
            *(client.xread({"nothing": "0-0"}, block=100) for _ in range(20)), return_exceptions=True
        )
        assert [reply for reply in replies if isinstance(reply, BaseException)] == []
        assert redis_sockets(server.port) == {"ESTABLISHED": 20}
    finally:
        await client.aclose()
        server.stop()
    assert redis_sockets(server.port) == {}


async def test_idle_connections_are_closed(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persistence=False).start()
    client = create_redis(server.url, timeout_s=2, max_idle_s=0.5)
    try:
        await asyncio.gather(*(client.xread({"nothing": "0-0"}, block=100) for _ in range(20)))
        assert redis_sockets(server.port) == {"ESTABLISHED": 20}
        await asyncio.sleep(1.6)  # past max_idle_s and the next look through the pool
        assert await client.ping()
        assert redis_sockets(server.port) == {"ESTABLISHED": 1}
    finally:
        await client.aclose()
        server.stop()


async def test_redis_down_fails_fast_despite_the_retry(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persistence=False).start()
    client = create_redis(server.url, timeout_s=2)
    try:
        assert await client.ping()
        server.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        assert loop.time() - started < 1
        assert redis_sockets(server.port) == {}
    finally:
        await client.aclose()
        server.stop()


async def test_a_pooled_connection_with_an_unread_reply_is_not_handed_out(tmp_path: Path) -> None:
    # e.g. a command whose caller was cancelled between its write and its read, and a pool
    # that missed it: the next user must get its own reply, not the stale one.
    server = EmbeddedRedis(tmp_path / "redis", persistence=False).start()
    client = create_redis(server.url, timeout_s=2)
    pool = client.connection_pool
    try:
        connection = await pool.get_connection()
        await connection.send_command("ECHO", "stale")
        await asyncio.sleep(0.1)  # the reply is in: read off the socket into the connection's stream
        await pool.release(connection)
        assert await send_commands(client, [("ECHO", "mine")]) == [b"mine"]
        assert await client.echo("also mine") == b"also mine"
    finally:
        await client.aclose()
        server.stop()


async def test_a_client_over_the_unix_socket_survives_a_restart_and_fails_fast_when_redis_is_down(
    tmp_path: Path,
) -> None:
    # maas up's services reach its embedded Redis this way (services/cli/supervisor.py)
    path = tmp_path / "redis.sock"
    server = EmbeddedRedis(tmp_path / "redis", persistence=False, unix_socket=path).start()
    assert server.local_url == f"unix://{path}?db=0"
    client = create_redis(server.local_url, timeout_s=2)
    admin = redis.Redis(host=server.host, port=server.port)

    def clients_on_the_socket() -> int:
        return sum(1 for entry in admin.client_list() if "U" in entry["flags"])  # flag U: a Unix socket client

    try:
        await asyncio.gather(*(client.xread({"nothing": "0-0"}, block=100) for _ in range(20)))
        assert clients_on_the_socket() == 20
        await _restart(server)
        admin = redis.Redis(host=server.host, port=server.port)
        replies = await asyncio.gather(
            *(client.xread({"nothing": "0-0"}, block=100) for _ in range(20)), return_exceptions=True
        )
        assert [reply for reply in replies if isinstance(reply, BaseException)] == []
        assert await send_commands(client, [("ECHO", "mine")]) == [b"mine"]
        assert clients_on_the_socket() == 20  # the dead connections were replaced, not added to
        server.stop()
        started = asyncio.get_running_loop().time()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        assert asyncio.get_running_loop().time() - started < 1
    finally:
        admin.close()
        await client.aclose()
        server.stop()
