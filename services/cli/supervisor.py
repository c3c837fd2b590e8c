"""``maas up``: embedded Redis + registry + gateway + N workers as supervised child processes.

Children run in their own sessions so a terminal's Ctrl-C reaches only the supervisor, which
then stops them in drain order: gateway, workers, registry, Redis. Each child also gets
SIGTERM if the supervisor dies (Linux ``PR_SET_PDEATHSIG`` through ``setpriv``), so nothing is left
orphaned.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.common import redis_acl
from services.common.embedded_redis import EmbeddedRedis, with_parent_death_signal
from services.common.tls import CertificateFiles, make_certificates
from services.registry.identities import system_tokens

log = structlog.get_logger(__name__)

_READY_TIMEOUT_S = 90.0
_POLL_S = 0.1
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)


@dataclass
class UpOptions:
    """What ``maas up`` runs and where."""

    data_dir: Path
    workers: int = 1
    host: str = "127.0.0.1"
    gateway_port: int = 8001
    registry_port: int = 8002
    redis_url: str | None = None
    redis_cluster: bool = False
    """``redis_url`` names a node of an external Redis Cluster (the embedded Redis is one instance)."""
    redis_port: int = 0
    log_json: bool = False
    log_level: str = "info"
    access_log_sample: float = 1.0
    shutdown_grace_s: float = 10.0
    tls: bool = False
    """Serve TLS everywhere, with certificates made (once) under ``<data_dir>/tls``."""
    mtls: bool = False
    """Also require client certificates (mutual TLS); implies ``tls``."""
    auth: bool = True
    """Check API keys on every service (``AuthFiles``: secret and built-in keys in ``<data_dir>/auth``)."""
    unix_sockets: bool = True
    """Local links over Unix sockets (``_socket_dir``): the services to the embedded Redis, the
    workers to the gateway's reply listener. Each round trip costs about half the CPU of one over
    loopback TCP; the TCP ports stay open for other clients."""


@dataclass(frozen=True)
class AuthFiles:
    """The auth secret and built-in keys of ``maas up``, made on first start and reused (all mode 0600)."""

    directory: Path

    @property
    def secret_file(self) -> Path:
        """The server secret the keys' HMACs are keyed with (``MAAS_AUTH_SECRET``)."""
        return self.directory / "secret"

    @property
    def system_keys(self) -> Path:
        """``name=key`` lines of the built-in keys (``admin``, ``gateway``, ``worker``): the registry's file."""
        return self.directory / "system-keys.env"

    @property
    def admin_key(self) -> Path:
        """The administrator's key alone, where the CLI looks for it (``MAAS_API_KEY_FILE``)."""
        return self.directory / "admin.key"

    @classmethod
    def prepare(cls, directory: Path) -> AuthFiles:
        """Create what is missing in ``directory``: a secret, the built-in keys and ``admin.key``."""
        files = cls(directory)
        if not files.secret_file.exists():
            redis_acl.write_private(files.secret_file, secrets.token_urlsafe(48) + "\n")
        if not files.system_keys.exists():
            redis_acl.write_passwords(files.system_keys, system_tokens())
        redis_acl.write_private(files.admin_key, files.tokens()["admin"] + "\n")
        return files

    def secret(self) -> str:
        """Return the server secret."""
        return self.secret_file.read_text().strip()

    def tokens(self) -> dict[str, str]:
        """Return the built-in keys by name."""
        return redis_acl.read_passwords(self.system_keys)


@dataclass
class Child:
    """One supervised service process."""

    name: str
    module: str
    env_prefix: str
    env: dict[str, str]
    ready_file: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    info: dict[str, object] = field(default_factory=dict)

    def start(self) -> None:
        """Start (or restart) the process."""
        self.ready_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            with_parent_death_signal([sys.executable, "-m", self.module]),
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.info("child_started", child=self.name, pid=self.process.pid)

    def is_running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> dict[str, object]:
        """Wait for the child's ready file and return it.

        Raises:
            RuntimeError: The child exited or did not get ready in time.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())
                # A restart must come back on the ports the others and the user already know.
                self.env[f"{self.env_prefix}_PORT"] = str(self.info["port"])
                self.env[f"{self.env_prefix}_METRICS_PORT"] = str(self.info["metrics_port"])
                return self.info
            if not self.is_running():
                raise RuntimeError(f"{self.name} exited during start-up (code {self.process and self.process.poll()})")
            time.sleep(_POLL_S)
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:g} s")

    def terminate(self) -> None:
        """Send SIGTERM (the service drains, then exits)."""
        if self.is_running() and self.process is not None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float) -> None:
        """Wait for the process to exit, killing it after ``timeout_s``."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("child_killed", child=self.name, after_s=timeout_s)
            self.process.kill()
            self.process.wait()


_SOCKET_PATH_MAX = 100
"""Longest Unix socket path used (the kernel takes 107 bytes)."""
_REDIS_SOCKET = "redis.sock"
_REPLY_SOCKET = "gateway-replies.sock"


def _socket_dir(run_dir: Path) -> tuple[Path, bool]:
    """Where the Unix sockets go: ``run_dir`` if their paths fit, else a new private temporary dir.

    Returns:
        The dir, and whether it is a temporary one (to remove at stop).
    """
    run_dir = run_dir.resolve()
    if all(len(os.fsencode(run_dir / name)) <= _SOCKET_PATH_MAX for name in (_REDIS_SOCKET, _REPLY_SOCKET)):
        return run_dir, False
    return Path(tempfile.mkdtemp(prefix="maas-")), True


class Supervisor:
    """Starts the suite, restarts children that die, and stops everything in order."""

    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.run_dir = options.data_dir / "run"
        self.redis: EmbeddedRedis | None = None
        self.redis_url = options.redis_url or ""
        self.role_urls: dict[str, str] = {}
        """Each role's URL with its password (embedded Redis only; an external URL serves all)."""
        self.registry: Child | None = None
        self.gateway: Child | None = None
        self.workers: list[Child] = []
        self.registry_address = ""
        self.certs: CertificateFiles | None = None
        self.auth_files: AuthFiles | None = None
        self.socket_dir: Path | None = None
        """Where the Unix sockets are (None: ``UpOptions.unix_sockets`` off)."""
        self._owns_socket_dir = False
        self._stopping = False

    def _common_env(self) -> dict[str, str]:
        opts = self.options
        cluster = "1" if opts.redis_cluster else "0"
        return {"MAAS_REDIS_URL": self.redis_url, "MAAS_REDIS_CLUSTER": cluster, "PYTHONUNBUFFERED": "1"} | {
            f"MAAS_{svc}_{key}": value
            for svc in ("REGISTRY", "GATEWAY", "INFERENCE")
            for key, value in (
                ("HOST", opts.host),
                ("LOG_JSON", str(opts.log_json).lower()),
                ("LOG_LEVEL", opts.log_level),
                ("ACCESS_LOG_SAMPLE", str(opts.access_log_sample)),
                ("SHUTDOWN_GRACE_S", str(opts.shutdown_grace_s)),
                ("METRICS_PORT", "0"),
            )
        }

    def _tls_env(self, prefix: str) -> dict[str, str]:
        """A service's TLS settings: its own certificate, also shown to the registry when it calls it."""
        if self.certs is None:
            return {}
        service = prefix.removeprefix("MAAS_").lower()
        cert, key = str(self.certs.server_cert(service)), str(self.certs.server_key(service))
        env = {f"{prefix}_TLS_CERT_FILE": cert, f"{prefix}_TLS_KEY_FILE": key}
        if self.options.mtls:
            env[f"{prefix}_TLS_CLIENT_CA_FILE"] = str(self.certs.ca_cert)
        if service != "registry":
            env[f"{prefix}_REGISTRY_TLS_CA_FILE"] = str(self.certs.ca_cert)
            env[f"{prefix}_REGISTRY_TLS_CERT_FILE"], env[f"{prefix}_REGISTRY_TLS_KEY_FILE"] = cert, key
        return env

    def _child(self, name: str, module: str, prefix: str, extra: dict[str, str]) -> Child:
        ready = self.run_dir / f"{name}.json"
        env = self._common_env() | self._tls_env(prefix) | {f"{prefix}_READY_FILE": str(ready)} | extra
        role = redis_acl.SERVICE_ROLES[prefix.removeprefix("MAAS_").lower()]
        env["MAAS_REDIS_URL"] = self.role_urls.get(role, self.redis_url)
        env |= self._auth_env(prefix)
        return Child(name=name, module=module, env_prefix=prefix, env=env, ready_file=ready)

    def _auth_env(self, prefix: str) -> dict[str, str]:
        """A service's auth settings: on with the secret, and its own key towards the registry."""
        files = self.auth_files
        if files is None:
            return {f"{prefix}_AUTH_ENABLED": "false"}
        env = {f"{prefix}_AUTH_ENABLED": "true", "MAAS_AUTH_SECRET": files.secret()}
        if prefix == "MAAS_REGISTRY":
            env["MAAS_REGISTRY_SYSTEM_KEYS_FILE"] = str(files.system_keys)
        else:
            role = "gateway" if prefix == "MAAS_GATEWAY" else "worker"
            env[f"{prefix}_REGISTRY_API_KEY"] = files.tokens()[role]
        return env

    def start(self) -> dict[str, object]:
        """Start Redis (unless external), the registry, the workers and the gateway.

        Returns:
            The endpoints, also written to ``<data_dir>/run/endpoints.json``.
        """
        opts = self.options
        if opts.redis_cluster and not opts.redis_url:
            raise RuntimeError(
                "--redis-cluster needs --redis-url (a node of the cluster): the embedded Redis is one instance"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if opts.unix_sockets:
            self.socket_dir, self._owns_socket_dir = _socket_dir(self.run_dir)
        if opts.tls or opts.mtls:
            self.certs = make_certificates(opts.data_dir / "tls", hosts=[opts.host])
        if not opts.redis_url:
            self._start_redis()
        if opts.auth:
            self.auth_files = AuthFiles.prepare(opts.data_dir / "auth")
        self.registry = self._child(
            "registry",
            "services.registry",
            "MAAS_REGISTRY",
            {"MAAS_REGISTRY_PORT": str(opts.registry_port), "MAAS_REGISTRY_DATA_DIR": str(opts.data_dir / "registry")},
        )
        self.registry.start()
        registry_address = f"{opts.host}:{self.registry.wait_ready(_READY_TIMEOUT_S)['port']}"
        for index in range(opts.workers):
            self.workers.append(self._worker(index, registry_address))
        self.gateway = self._child(
            "gateway",
            "services.gateway",
            "MAAS_GATEWAY",
            {"MAAS_GATEWAY_PORT": str(opts.gateway_port), "MAAS_GATEWAY_REGISTRY_ADDRESS": registry_address}
            | self._unix_socket_env("MAAS_GATEWAY_REPLY_SOCKET", self._reply_socket_name()),
        )
        for child in (*self.workers, self.gateway):
            child.start()
        for child in (*self.workers, self.gateway):
            child.wait_ready(_READY_TIMEOUT_S)
        self.registry_address = registry_address
        return self._write_endpoints()

    def _start_redis(self) -> None:
        """Start the embedded Redis with one ACL user per role (fresh passwords every start).

        The passwords go to ``redis/passwords.env`` (mode 0600; ``default`` is the admin's), the
        users to ``redis/users.acl`` (hashes only); the endpoints name the read-only ``monitor``.
        """
        opts = self.options
        redis_dir = opts.data_dir.resolve() / "redis"
        passwords = redis_acl.new_passwords()
        redis_acl.write_passwords(redis_dir / "passwords.env", passwords)
        redis_acl.write_private(redis_dir / "users.acl", redis_acl.acl_file(passwords))
        self.redis = EmbeddedRedis(
            redis_dir, port=opts.redis_port, host=opts.host, aclfile=redis_dir / "users.acl",
            password=passwords[redis_acl.ADMIN], unix_socket=self._socket_path(_REDIS_SOCKET),
        ).start()  # fmt: skip
        local_url = self.redis.local_url
        self.role_urls = {role: redis_acl.role_url(local_url, role, passwords[role]) for role in redis_acl.ROLES}
        self.redis_url = redis_acl.role_url(self.redis.url, "monitor", passwords["monitor"])  # for tools: TCP

    def _socket_path(self, name: str | None) -> Path | None:
        return self.socket_dir / name if self.socket_dir is not None and name else None

    def _reply_socket_name(self) -> str | None:
        """The gateway reply listener's socket (none under TLS: the listener is off, ``gateway.server``)."""
        return None if self.options.tls or self.options.mtls else _REPLY_SOCKET

    def _unix_socket_env(self, variable: str, name: str | None) -> dict[str, str]:
        path = self._socket_path(name)
        return {variable: str(path)} if path is not None else {}

    def _worker(self, index: int, registry_address: str) -> Child:
        opts = self.options
        return self._child(
            f"worker-{index}",
            "services.inference",
            "MAAS_INFERENCE",
            {
                "MAAS_INFERENCE_REGISTRY_ADDRESS": registry_address,
                "MAAS_INFERENCE_CACHE_DIR": str(opts.data_dir / "inference-cache"),
                "MAAS_INFERENCE_WORKER_ID": f"{os.uname().nodename}-up-{index}",
            },
        )

    def _write_endpoints(self) -> dict[str, object]:
        assert self.gateway is not None
        host = self.options.host
        endpoints: dict[str, object] = {
            "gateway": f"{host}:{self.gateway.info['port']}",
            "registry": self.registry_address,
            "redis_url": self.redis_url,
            "metrics": {c.name: f"http://{host}:{c.info['metrics_port']}/metrics" for c in self._children()},
            "pids": {c.name: c.process.pid for c in self._children() if c.process is not None}
            | ({"redis": self.redis.pid} if self.redis and self.redis.pid else {}),
        }
        if self.auth_files is not None:
            endpoints["api_key_file"] = str(self.auth_files.admin_key)
        sockets = {"redis": self.redis.unix_socket if self.redis else None}
        sockets["gateway_replies"] = self._socket_path(self._reply_socket_name())
        if any(sockets.values()):
            endpoints["unix_sockets"] = {name: str(path) for name, path in sockets.items() if path is not None}
        if self.certs is not None:
            certs = self.certs
            endpoints["tls"] = {"ca": str(certs.ca_cert), "cert": str(certs.client_cert), "key": str(certs.client_key)}
        tmp = self.run_dir / "endpoints.json.tmp"
        redis_acl.write_private(tmp, json.dumps(endpoints, indent=2))  # its redis_url has a password
        tmp.replace(self.run_dir / "endpoints.json")
        return endpoints

    def _children(self) -> list[Child]:
        return [c for c in (self.gateway, *self.workers, self.registry) if c is not None]

    def request_stop(self, *_args: object) -> None:
        """Ask the supervision loop to stop (signal handler)."""
        self._stopping = True

    def supervise(self) -> None:
        """Restart children that die, until a stop is requested."""
        while not self._stopping:
            for child in self._children():
                if not child.is_running() and not self._stopping:
                    self._restart(child)
            time.sleep(_POLL_S)

    def _restart(self, child: Child) -> None:
        code = child.process.poll() if child.process else None
        backoff_s = _RESTART_BACKOFF_S[min(child.restarts, len(_RESTART_BACKOFF_S) - 1)]
        log.warning("child_exited", child=child.name, code=code, restart_in_s=backoff_s)
        time.sleep(backoff_s)
        child.restarts += 1
        child.start()
        self._write_endpoints()

    def stop(self) -> None:
        """Stop in drain order: gateway, workers, registry, then Redis."""
        self._stopping = True
        grace_s = self.options.shutdown_grace_s + 10.0
        for group in ([self.gateway], self.workers, [self.registry]):
            children = [c for c in group if c is not None]
            for child in children:
                child.terminate()
            for child in children:
                child.wait_stopped(grace_s)
        if self.redis is not None:
            self.redis.stop()
        if self._owns_socket_dir and self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        (self.run_dir / "endpoints.json").unlink(missing_ok=True)
        log.info("maas_stopped")
