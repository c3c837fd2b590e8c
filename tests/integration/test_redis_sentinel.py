"""Redis behind Sentinel through a ``redis+sentinel://`` URL (docs/redis.md), with a real sentinel process.

The wheel's ``redis-server`` runs as a sentinel with ``--sentinel``; no failover is exercised.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common.embedded_redis import EmbeddedRedis, find_redis_server, with_parent_death_signal
from services.common.redis_conn import create_redis, send_commands

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sentinel_url(tmp_path: Path) -> Iterator[str]:
    """A master and one sentinel that monitors it as ``mymaster``; yields the ``redis+sentinel://`` URL."""
    master = EmbeddedRedis(tmp_path / "master", persistence=False).start()
    port = _free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
    process = subprocess.Popen(
        with_parent_death_signal([find_redis_server(), str(config), "--sentinel"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        probe = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                if probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"):
                    break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "sentinel did not start"
                time.sleep(0.05)
        probe.close()
        yield f"redis+sentinel://127.0.0.1:{port}/mymaster/0"
    finally:
        process.terminate()
        process.wait(10)
        master.stop()


async def test_a_sentinel_url_reaches_the_master_it_names(sentinel_url: str) -> None:
    client = create_redis(sentinel_url, timeout_s=5)
    try:
        assert await client.set("maas:v1:test:sentinel", b"via sentinel")
        replies = await send_commands(client, [["INCR", "maas:v1:test:n"], ["GET", "maas:v1:test:sentinel"]])
        assert replies == [1, b"via sentinel"]
        assert (await client.info("replication"))["role"] == "master"
    finally:
        await client.aclose()


def test_a_sentinel_url_without_a_master_name_is_refused() -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel://host:port"):
        create_redis("redis+sentinel://127.0.0.1:26379", timeout_s=1)
