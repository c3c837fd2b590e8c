"""The whole suite in one event loop: real registry, gateway and worker servers on free ports."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis

from inference import grpc_service_pb2_grpc
from services.common import keys
from services.common.auth import ServerAuth, bearer
from services.common.grpc_server import GrpcServer
from services.common.redis_conn import create_redis
from services.common.registry_client import RegistryClient
from services.common.tls import CertificateFiles, channel_credentials, registry_channel_credentials
from services.gateway import server as gateway_server
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.inference.worker import InferenceWorker
from services.registry import server as registry_server
from services.registry.identities import system_tokens
from services.registry.settings import RegistrySettings


async def start_service_process(
    module: str, ready: Path, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, int]:
    """Run ``python -m module`` with ``env`` (on top of a MAAS_-free environment) until it writes ``ready``.

    Returns:
        The process and the gRPC port from its ready file.
    """
    await asyncio.to_thread(ready.unlink, missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", module, env=clean | env)
    async with asyncio.timeout(60):
        while not await asyncio.to_thread(ready.exists):
            assert process.returncode is None, f"{module} exited during start-up"
            await asyncio.sleep(0.05)
    return process, int(json.loads(await asyncio.to_thread(ready.read_text))["port"])


async def start_worker_process(
    suite: Suite, tmp_path: Path, name: str, *, worker_id: str = "", **settings: str
) -> asyncio.subprocess.Process:
    """Run an inference worker process on ``suite``'s Redis and registry until it is ready.

    Args:
        suite: The running suite (its Redis, in cluster mode if the suite is, and its registry).
        tmp_path: Where its ready file and its model cache (``cache``, shared by the processes) go.
        name: Names its ready file.
        worker_id: Its worker id (default ``name``); a restart under the same id runs its pending
            entries at once, without waiting for a reclaim.
        settings: ``MAAS_INFERENCE_<NAME>`` settings on top of the defaults (CPU, log level warning).
    """
    ready = tmp_path / f"{name}.json"
    env = {
        "MAAS_REDIS_URL": suite.redis_url,
        "MAAS_INFERENCE_REGISTRY_ADDRESS": suite.registry_address,
        "MAAS_INFERENCE_WORKER_ID": worker_id or name,
        "MAAS_INFERENCE_PROVIDERS": "cpu",
        "MAAS_INFERENCE_CACHE_DIR": str(tmp_path / "cache"),
        "MAAS_INFERENCE_READY_FILE": str(ready),
        "MAAS_INFERENCE_LOG_LEVEL": "warning",
    } | ({"MAAS_REDIS_CLUSTER": "1"} if suite.cluster else {})
    env |= {f"MAAS_INFERENCE_{key.upper()}": value for key, value in settings.items()}
    process, port = await start_service_process("services.inference", ready, env)
    assert port > 0
    return process


async def start_gateway_process(suite: Suite, ready: Path, **settings: str) -> tuple[asyncio.subprocess.Process, str]:
    """Run a gateway process on ``suite``'s Redis and registry, with ``MAAS_GATEWAY_<NAME>`` ``settings``.

    Returns:
        The process and its address.
    """
    env = {
        "MAAS_REDIS_URL": suite.redis_url,
        "MAAS_GATEWAY_REGISTRY_ADDRESS": suite.registry_address,
        "MAAS_GATEWAY_PORT": "0",
        "MAAS_GATEWAY_READY_FILE": str(ready),
    } | {f"MAAS_GATEWAY_{name.upper()}": value for name, value in settings.items()}
    process, port = await start_service_process("services.gateway", ready, env)
    return process, f"127.0.0.1:{port}"


async def queue_settled(redis: aioredis.Redis, queue: str, timeout_s: float = 10.0) -> bool:
    """Whether ``queue`` holds nothing and nothing read is unacknowledged, within ``timeout_s``.

    A reply reaches its gateway's listener before the worker acks its entry and writes its
    statistics (``services.gateway.direct_replies``): a caller that has its reply waits for those.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await redis.xlen(queue) == 0 and (await redis.xpending(queue, keys.QUEUE_GROUP))["pending"] == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def run_cli(suite: Suite, *args: str, key: str | None = None) -> tuple[int, str, str]:
    """Run the ``maas`` CLI against ``suite`` in a child process; return its code, stdout and stderr.

    The CLI sends ``key`` if given, and no key otherwise (not even ``maas up``'s key file).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")} | {
        "MAAS_GATEWAY": suite.gateway_address, "MAAS_REGISTRY": suite.registry_address,
        "MAAS_API_KEY_FILE": str(suite.data_dir / "no-such.key"),
    } | ({"MAAS_API_KEY": key} if key is not None else {})  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


class Suite:
    """Registry + gateway (+ optionally a worker) built with the production wiring functions."""

    def __init__(
        self,
        redis_url: str,
        data_dir: Path,
        *,
        pool: str = "default",
        timeout_s: float = 20,
        gateway: dict[str, object] | None = None,
        role_urls: dict[str, str] | None = None,
        tls: CertificateFiles | None = None,
        mtls: bool = False,
        auth: dict[str, object] | None = None,
        registry: dict[str, object] | None = None,
        cluster: bool = False,
    ) -> None:
        self.redis_url = redis_url
        self.cluster = cluster  # redis_url names a node of a Redis Cluster
        self.registry_overrides = registry or {}
        self.timeout_s = timeout_s
        self.data_dir = data_dir
        self.pool = pool
        self.gateway_overrides = gateway or {}
        self.redis = create_redis(redis_url, timeout_s=2, cluster=cluster)
        # Per-role Redis users (redis_acl.ROLES): a service whose role is here connects as it.
        self.role_urls = role_urls or {}
        self._role_clients = {role: create_redis(url, timeout_s=2) for role, url in self.role_urls.items()}
        self.worker: InferenceWorker | None = None
        self._servers: list[GrpcServer] = []
        # API keys: None serves without keys; a dict turns auth on (its items are extra auth settings).
        self.auth_overrides = auth
        self.auth_secret = secrets.token_urlsafe(32) if auth is not None else None
        self.system_keys = system_tokens() if auth is not None else {}
        self.admin_key = self.system_keys.get("admin", "")
        self._auths: list[ServerAuth] = []
        # TLS on every server (mutual TLS with ``mtls``); every client presents a certificate.
        self.tls, self.mtls = tls, mtls
        self.credentials = None if tls is None else channel_credentials(tls.ca_cert, tls.client_cert, tls.client_key)

    async def start(self, *, with_worker: bool = True) -> Suite:
        reg_settings = RegistrySettings(
            port=0, redis_url=self._url("registry"), redis_cluster=self.cluster, data_dir=self.data_dir / "blobs",
            **self._server_tls("registry"),
            **self._auth("registry"), **self.registry_overrides,
        )  # fmt: skip
        store = self.store = registry_server.create_store(reg_settings, self._client("registry"))
        await store.start()
        identities = registry_server.create_identities(reg_settings, self._client("registry"))
        if self.system_keys:
            await identities.ensure_system_keys(self.system_keys)
        auth = await self._start_auth(registry_server.create_auth(reg_settings, self._client("registry")))
        registry = registry_server.create_server(reg_settings, store, identities, auth)
        await self._start(registry)
        self.registry_address = f"127.0.0.1:{registry.port}"
        self.registry = RegistryClient(
            self.registry_address, credentials=self.credentials, metadata=bearer(self.admin_key)
        )
        if with_worker:
            await self.start_worker()
        await self._start_gateway()
        return self

    async def start_worker(self, **overrides: object) -> InferenceWorker:
        settings = InferenceSettings(
            port=0, redis_url=self._url("worker"), redis_cluster=self.cluster, registry_address=self.registry_address,
            pool=self.pool,
            cache_dir=self.data_dir / "cache", providers="cpu", reconcile_interval_s=5, shutdown_grace_s=5,
            **self._server_tls("inference"), **self._registry_tls("inference"), **self._auth("worker"), **overrides,
        )  # fmt: skip
        self.worker_settings = settings
        credentials = registry_channel_credentials(settings)
        self._worker_registry = RegistryClient(
            self.registry_address, credentials=credentials, metadata=bearer(settings.registry_api_key)
        )
        self.worker = InferenceWorker(settings, self._client("worker"), self._worker_registry)
        await self.worker.start()
        return self.worker

    async def _start_gateway(self) -> None:
        settings = GatewaySettings(
            port=0, redis_url=self._url("gateway"), redis_cluster=self.cluster, registry_address=self.registry_address,
            default_timeout_s=self.timeout_s, redis_timeout_s=2, block_ms=200, **self._server_tls("gateway"),
            **self._registry_tls("gateway"), **self._auth("gateway"), **self.gateway_overrides,
        )  # fmt: skip
        self.gateway_settings = settings
        credentials = registry_channel_credentials(settings)
        self._gateway_registry = RegistryClient(
            self.registry_address, credentials=credentials, metadata=bearer(settings.registry_api_key)
        )
        self.gateway = gateway_server.create_gateway(settings, self._client("gateway"), self._gateway_registry)
        auth = await self._start_auth(gateway_server.create_auth(settings, self._client("gateway")))
        handle = gateway_server.create_server(settings, self.gateway, auth)
        await self.gateway.start()
        await self._start(handle)
        self.gateway_address = f"127.0.0.1:{handle.port}"
        address, credentials = self.gateway_address, self.credentials
        self.channel = (
            grpc.aio.insecure_channel(address) if credentials is None else grpc.aio.secure_channel(address, credentials)
        )
        self.inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def _start(self, handle: GrpcServer) -> None:
        await handle.server.start()
        await handle.set_serving(True)
        self._servers.append(handle)

    async def push(self, name: str, model: bytes, *, class_labels: tuple[str, ...] = (), **deploy: int | str) -> int:
        await self.registry.create_model(name)
        version = await self.registry.upload_version(name, model, class_labels=class_labels)
        await self.registry.deploy(name, version.version, **deploy)  # type: ignore[arg-type]
        if self.worker is not None:
            await self.worker.reconcile()
        return version.version

    async def stop(self) -> None:
        await self.channel.close()
        for handle in reversed(self._servers):
            await handle.server.stop(None)
        await self.store.close()
        if self.worker is not None:
            await self.worker.drain()
            await self._worker_registry.close()
        await self.gateway.stop(timeout_s=1)
        await self._gateway_registry.close()
        await self.registry.close()
        for auth in self._auths:
            await auth.stop()
        await self.redis.aclose()
        for client in self._role_clients.values():
            await client.aclose()

    def _server_tls(self, service: str) -> dict[str, Path]:
        if self.tls is None:
            return {}
        files = {"tls_cert_file": self.tls.server_cert(service), "tls_key_file": self.tls.server_key(service)}
        return files | ({"tls_client_ca_file": self.tls.ca_cert} if self.mtls else {})

    def _registry_tls(self, service: str) -> dict[str, Path]:
        if self.tls is None:
            return {}
        return {
            "registry_tls_ca_file": self.tls.ca_cert,
            "registry_tls_cert_file": self.tls.server_cert(service),
            "registry_tls_key_file": self.tls.server_key(service),
        }

    def _auth(self, role: str) -> dict[str, Any]:
        """Auth settings of a service: off, or on with the suite's secret and the role's system key."""
        if self.auth_overrides is None:
            return {"auth_enabled": False}
        values: dict[str, Any] = {"auth_enabled": True, "auth_secret": self.auth_secret}
        if role in self.system_keys:
            values["registry_api_key"] = self.system_keys[role]
        return values | self.auth_overrides

    async def _start_auth(self, auth: ServerAuth | None) -> ServerAuth | None:
        if auth is not None:
            await auth.start()
            self._auths.append(auth)
        return auth

    def _url(self, role: str) -> str:
        return self.role_urls.get(role, self.redis_url)

    def _client(self, role: str) -> aioredis.Redis:
        return self._role_clients.get(role, self.redis)
