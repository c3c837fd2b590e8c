"""The whole suite in one event loop: real registry, gateway and worker servers on free ports."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc

from inference import grpc_service_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.redis_conn import create_redis
from services.common.registry_client import RegistryClient
from services.gateway import server as gateway_server
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.inference.worker import InferenceWorker
from services.registry import server as registry_server
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
    ) -> None:
        self.redis_url = redis_url
        self.timeout_s = timeout_s
        self.data_dir = data_dir
        self.pool = pool
        self.gateway_overrides = gateway or {}
        self.redis = create_redis(redis_url, timeout_s=2)
        self.worker: InferenceWorker | None = None
        self._servers: list[GrpcServer] = []

    async def start(self, *, with_worker: bool = True) -> Suite:
        reg_settings = RegistrySettings(port=0, redis_url=self.redis_url, data_dir=self.data_dir / "blobs")
        registry = registry_server.create_server(reg_settings, registry_server.create_store(reg_settings, self.redis))
        await self._start(registry)
        self.registry_address = f"127.0.0.1:{registry.port}"
        self.registry = RegistryClient(self.registry_address)
        if with_worker:
            await self.start_worker()
        await self._start_gateway()
        return self

    async def start_worker(self) -> InferenceWorker:
        settings = InferenceSettings(
            port=0, redis_url=self.redis_url, registry_address=self.registry_address, pool=self.pool,
            cache_dir=self.data_dir / "cache", providers="cpu", reconcile_interval_s=5, shutdown_grace_s=5,
        )  # fmt: skip
        self._worker_registry = RegistryClient(self.registry_address)
        self.worker = InferenceWorker(settings, self.redis, self._worker_registry)
        await self.worker.start()
        return self.worker

    async def _start_gateway(self) -> None:
        settings = GatewaySettings(
            port=0, redis_url=self.redis_url, registry_address=self.registry_address, default_timeout_s=self.timeout_s,
            redis_timeout_s=2, block_ms=200, **self.gateway_overrides,
        )  # fmt: skip
        self._gateway_registry = RegistryClient(self.registry_address)
        self.gateway = gateway_server.create_gateway(settings, self.redis, self._gateway_registry)
        handle = gateway_server.create_server(settings, self.gateway)
        await self.gateway.start()
        await self._start(handle)
        self.gateway_address = f"127.0.0.1:{handle.port}"
        self.channel = grpc.aio.insecure_channel(self.gateway_address)
        self.inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def _start(self, handle: GrpcServer) -> None:
        await handle.server.start()
        await handle.set_serving(True)
        self._servers.append(handle)

    async def push(self, name: str, model: bytes, **deploy: int | str) -> int:
        await self.registry.create_model(name)
        version = await self.registry.upload_version(name, model)
        await self.registry.deploy(name, version.version, **deploy)  # type: ignore[arg-type]
        if self.worker is not None:
            await self.worker.reconcile()
        return version.version

    async def stop(self) -> None:
        await self.channel.close()
        for handle in reversed(self._servers):
            await handle.server.stop(None)
        if self.worker is not None:
            await self.worker.drain()
            await self._worker_registry.close()
        await self.gateway.stop(timeout_s=1)
        await self._gateway_registry.close()
        await self.registry.close()
        await self.redis.aclose()
