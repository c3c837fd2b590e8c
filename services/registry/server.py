"""Wiring of the registry service: the only module that builds concrete objects."""

from __future__ import annotations

import grpc
import redis.asyncio as aioredis

from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.grpc_server import GrpcServer, create_grpc_server, run_until_signal
from services.common.redis_conn import create_redis
from services.registry.blobs import LocalBlobStore
from services.registry.servicer import ModelRegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.store import ModelStore

SERVICE_NAME: str = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name


def create_server(settings: RegistrySettings, store: ModelStore) -> GrpcServer:
    """Build the registry's gRPC server (not started), bound to ``settings.host:settings.port``.

    The servicer keeps no state of its own: every rule that concurrent calls share (such as
    distinct version numbers) is enforced atomically in Redis by the store.

    Args:
        settings: Where to listen.
        store: The domain logic the servicer calls.

    Returns:
        The server with its health servicer and the bound port.
    """
    servicer = ModelRegistryServicer(store)

    def add_servicers(server: grpc.aio.Server) -> None:
        registry_pb2_grpc.add_ModelRegistryServicer_to_server(servicer, server)

    return create_grpc_server(settings, [SERVICE_NAME], add_servicers)


def create_store(settings: RegistrySettings, redis: aioredis.Redis) -> ModelStore:
    """Build the model store: metadata in ``redis``, artifacts under ``settings.data_dir``."""
    return ModelStore(
        redis,
        LocalBlobStore(settings.data_dir),
        max_artifact_bytes=settings.max_artifact_bytes,
        chunk_bytes=settings.chunk_bytes,
    )


async def serve(settings: RegistrySettings) -> None:
    """Serve the registry until SIGTERM or SIGINT, then drain and close Redis."""
    redis = create_redis(settings.redis_url, settings.redis_timeout_s)
    try:
        handle = create_server(settings, create_store(settings, redis))
        await run_until_signal(handle, settings, service="registry")
    finally:
        await redis.aclose()
