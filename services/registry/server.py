"""Wiring of the registry service: the only module that builds concrete objects."""

from __future__ import annotations

import grpc
import redis.asyncio as aioredis

from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common import tracing
from services.common.auth import REGISTRY_RULES, ServerAuth, auth_secret, create_server_auth
from services.common.grpc_server import GrpcServer, create_grpc_server, run_until_signal
from services.common.redis_acl import read_passwords
from services.common.redis_conn import create_redis
from services.registry.blobs import STAGING_DIR, BlobStore, LocalBlobStore
from services.registry.bundle_upload import BundleLimits
from services.registry.cluster_status import ClusterStatusReader
from services.registry.identities import IdentityStore
from services.registry.operations import OperationStore
from services.registry.optimize import OptimizeLimits, Optimizer
from services.registry.s3blobs import S3BlobStore, S3Config, create_s3_client
from services.registry.sandbox import ArtifactValidator, SandboxLimits
from services.registry.servicer import ModelRegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.store import ModelStore

SERVICE_NAME: str = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name


def create_server(
    settings: RegistrySettings,
    store: ModelStore,
    identities: IdentityStore | None = None,
    auth: ServerAuth | None = None,
    optimizer: Optimizer | None = None,
) -> GrpcServer:
    """Build the registry's gRPC server (not started), bound to ``settings.host:settings.port``.

    The servicer keeps no state of its own: every rule that concurrent calls share (such as
    distinct version numbers) is enforced atomically in Redis by the store.

    Args:
        settings: Where to listen.
        store: The domain logic the servicer calls.
        identities: Tenants and API keys (None: a store without a secret, refusing key creation).
        auth: The API key check of every RPC (``create_auth``); None serves without keys.
        optimizer: Runs OptimizeVersion operations (None: ``create_optimizer``'s, which its owner
            must close; ``serve`` passes its own and closes it).

    Returns:
        The server with its health servicer and the bound port.
    """
    cluster = ClusterStatusReader(store.redis, store.list_deployments)
    optimizer = optimizer or create_optimizer(settings, store)
    servicer = ModelRegistryServicer(store, identities or IdentityStore(store.redis, None), cluster, optimizer)

    def add_servicers(server: grpc.aio.Server) -> None:
        registry_pb2_grpc.add_ModelRegistryServicer_to_server(servicer, server)

    interceptor = auth.interceptor if auth is not None else None
    return create_grpc_server(settings, [SERVICE_NAME], add_servicers, auth=interceptor)


def create_optimizer(settings: RegistrySettings, store: ModelStore) -> Optimizer:
    """Build the optimiser: operations in the store's Redis, transforms within ``settings.optimize_*``."""
    limits = OptimizeLimits(
        timeout_s=settings.optimize_timeout_s,
        memory_bytes=settings.optimize_memory_bytes,
        concurrency=settings.optimize_concurrency,
        latency_iterations=settings.optimize_latency_iterations,
        max_calibration_bytes=settings.optimize_max_calibration_bytes,
    )
    operations = OperationStore(store.redis, ttl_s=settings.operation_ttl_s, lease_s=settings.operation_lease_s)
    return Optimizer(store, operations, limits)


def create_identities(settings: RegistrySettings, redis: aioredis.Redis) -> IdentityStore:
    """Build the identity store: tenants and API keys in ``redis``, hashed with the server secret."""
    return IdentityStore(redis, auth_secret(settings))


def create_auth(settings: RegistrySettings, redis: aioredis.Redis) -> ServerAuth | None:
    """Build the registry's API key check (None when ``settings.auth_enabled`` is off)."""
    return create_server_auth(settings, redis, REGISTRY_RULES, service="registry")


async def ensure_system_keys(settings: RegistrySettings, identities: IdentityStore) -> None:
    """Create the built-in keys of ``settings.system_keys_file`` unless they exist."""
    if settings.system_keys_file is not None:
        await identities.ensure_system_keys(read_passwords(settings.system_keys_file))


def create_blobs(settings: RegistrySettings) -> BlobStore:
    """Build the blob store that ``settings.blob_store`` names: ``data_dir``, or an S3 bucket."""
    if settings.blob_store == "local":
        return LocalBlobStore(settings.data_dir)
    config = S3Config(
        bucket=settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        prefix=settings.s3_prefix,
        part_bytes=settings.s3_part_bytes,
        timeout_s=settings.s3_timeout_s,
    )
    return S3BlobStore(config, settings.data_dir / STAGING_DIR, create_s3_client(config))


def create_store(settings: RegistrySettings, redis: aioredis.Redis) -> ModelStore:
    """Build the model store: metadata in ``redis``, artifacts in ``create_blobs``'s store."""
    limits = SandboxLimits(
        timeout_s=settings.validate_timeout_s,
        memory_bytes=settings.validate_memory_bytes,
        concurrency=settings.validate_concurrency,
    )
    return ModelStore(
        redis,
        create_blobs(settings),
        max_artifact_bytes=settings.max_artifact_bytes,
        chunk_bytes=settings.chunk_bytes,
        validator=ArtifactValidator(limits),
        bundle_limits=BundleLimits(
            max_files=settings.max_bundle_files,
            max_file_bytes=settings.max_bundle_file_bytes,
            max_total_bytes=settings.max_bundle_bytes,
        ),
    )


async def serve(settings: RegistrySettings) -> None:
    """Serve the registry until SIGTERM or SIGINT, then drain and close Redis (and flush traces)."""
    tracer_provider = tracing.configure_tracing(settings, "registry")
    redis = create_redis(settings.redis_url, settings.redis_timeout_s, cluster=settings.redis_cluster)
    auth = create_auth(settings, redis)
    try:
        identities = create_identities(settings, redis)
        await ensure_system_keys(settings, identities)
        store = create_store(settings, redis)
        await store.start()
        optimizer = create_optimizer(settings, store)
        handle = create_server(settings, store, identities, auth, optimizer)
        if auth is not None:
            await auth.start()
        try:
            await run_until_signal(handle, settings, service="registry")
        finally:
            await optimizer.close()
            await store.close()
    finally:
        if auth is not None:
            await auth.stop()
        await redis.aclose()
        await tracing.shutdown_tracing(tracer_provider)
