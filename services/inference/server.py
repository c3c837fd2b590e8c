"""Wiring of an inference worker: Redis, the registry, the worker and its direct gRPC service."""

from __future__ import annotations

import grpc

from inference import grpc_service_pb2, grpc_service_pb2_grpc
from services.common import tracing
from services.common.auth import INFERENCE_RULES, ServerAuth, bearer, create_server_auth
from services.common.grpc_server import GrpcServer, create_grpc_server, run_until_signal, stop_signal_event
from services.common.redis_conn import create_redis
from services.common.registry_client import RegistryClient
from services.common.tls import registry_channel_credentials
from services.inference.access import DirectAccess, ModelLookup
from services.inference.servicer import GRPCInferenceServiceServicer
from services.inference.settings import InferenceSettings
from services.inference.worker import InferenceWorker

SERVICE_NAME: str = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def create_server(
    settings: InferenceSettings,
    worker: InferenceWorker,
    auth: ServerAuth | None = None,
    models: ModelLookup | None = None,
) -> GrpcServer:
    """Build the worker's gRPC server (not started) and bind ``settings.host:settings.port``.

    Its direct inference service checks API keys as the gateway does when ``auth`` is given, and
    the models' owners in ``models`` (the registry; without it a tenant's key may use no model).

    Returns:
        The server handle; ``handle.port`` is the bound port.
    """
    servicer = GRPCInferenceServiceServicer(worker, DirectAccess(models))

    def add_servicers(server: grpc.aio.Server) -> None:
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    return create_grpc_server(settings, [SERVICE_NAME], add_servicers, auth=auth.interceptor if auth else None)


async def serve(settings: InferenceSettings) -> None:
    """Run one worker until SIGTERM/SIGINT, then drain it and exit.

    The deployed models are loaded (first reconcile) before health reports SERVING.
    """
    stop = stop_signal_event()
    tracer_provider = tracing.configure_tracing(settings, "inference")
    redis = create_redis(settings.redis_url, settings.redis_timeout_s, cluster=settings.redis_cluster)
    registry = RegistryClient(
        settings.registry_address, credentials=registry_channel_credentials(settings),
        metadata=bearer(settings.registry_api_key),
        min_transfer_bytes_per_s=settings.registry_min_transfer_bytes_per_s,
    )  # fmt: skip
    worker = InferenceWorker(settings, redis, registry)
    auth = create_server_auth(settings, redis, INFERENCE_RULES, service="inference")
    handle = create_server(settings, worker, auth, registry)
    worker.grpc_port = handle.port
    try:
        await worker.start()
        if auth is not None:
            await auth.start()
        await run_until_signal(handle, settings, service="inference", before_stop=worker.drain, stop=stop)
    finally:
        await worker.drain()
        if auth is not None:
            await auth.stop()
        await registry.close()
        await redis.aclose()
        await tracing.shutdown_tracing(tracer_provider)
