"""Gateway wiring: the only module that builds concrete objects."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from inference import grpc_service_pb2, grpc_service_pb2_grpc
from services.common import keys, tracing
from services.common.auth import INFERENCE_RULES, ServerAuth, bearer, create_server_auth
from services.common.grpc_server import GrpcServer, create_grpc_server, run_until_signal
from services.common.redis_conn import create_redis
from services.common.registry_client import RegistryClient
from services.common.stats import CallStats
from services.common.tls import registry_channel_credentials
from services.gateway.admission import Admission
from services.gateway.clients import ModelCatalog
from services.gateway.direct_replies import ReplyListener
from services.gateway.quotas import Quotas
from services.gateway.replies import ReplyReader
from services.gateway.router import Router
from services.gateway.servicer import GRPCInferenceServiceServicer
from services.gateway.settings import GatewaySettings
from services.gateway.shm import SharedMemoryRegistry
from services.gateway.streams import Streams

log = structlog.get_logger(__name__)

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass(frozen=True)
class Gateway:
    """The gateway's domain objects, started and stopped together."""

    catalog: ModelCatalog
    replies: ReplyReader
    admission: Admission
    router: Router
    streams: Streams
    shared_memory: SharedMemoryRegistry = field(default_factory=SharedMemoryRegistry)
    stats: CallStats = field(kw_only=True)
    quotas: Quotas = field(kw_only=True)
    listener: ReplyListener | None = field(default=None, kw_only=True)
    """The reply listener (None: replies come through the reply stream only)."""

    async def start(self) -> None:
        """Follow registry events, start taking replies, admitting calls and flushing statistics."""
        await self.catalog.start()
        await self.replies.start()
        if self.listener is not None:
            await self.listener.start()
        await self.admission.start()
        await self.quotas.start()
        await self.stats.start()

    async def stop(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for calls in flight, then stop reading and unmap shared memory."""
        await self.replies.stop(timeout_s=timeout_s)
        if self.listener is not None:
            await self.listener.stop()
        await self.stats.stop()
        await self.quotas.stop()
        await self.admission.stop()
        await self.catalog.stop()
        self.shared_memory.close()


def create_gateway(settings: GatewaySettings, redis: aioredis.Redis, registry: RegistryClient) -> Gateway:
    """Build the catalog, this process's reply reader, admission and the router (not started)."""
    catalog = ModelCatalog(registry, redis, ttl_s=settings.metadata_cache_ttl_s)
    replies = ReplyReader(
        redis, keys.replies(settings.gateway_id), ttl_s=settings.reply_stream_ttl_s, block_ms=settings.block_ms
    )
    admission = Admission(redis)
    quotas = Quotas(redis, admission.send_soon, ttl_s=settings.quota_cache_ttl_s)
    stats = CallStats(redis)
    listener = create_listener(settings, replies)
    router = Router(
        redis, catalog, replies, admission, default_timeout_s=settings.default_timeout_s,
        max_request_tensor_bytes=settings.max_request_tensor_bytes, max_message_bytes=settings.max_message_bytes,
        stats=stats, quotas=quotas, max_new_tokens=settings.max_new_tokens, listener=listener,
    )  # fmt: skip
    streams = Streams(settings.max_stream_in_flight)
    return Gateway(catalog, replies, admission, router, streams, stats=stats, quotas=quotas, listener=listener)


def create_listener(settings: GatewaySettings, replies: ReplyReader) -> ReplyListener | None:
    """The reply listener ``settings`` ask for, or None (off, TLS, or no address to give workers: logged)."""
    if not settings.direct_replies:
        return None
    host = settings.reply_host or settings.host
    advertise = settings.reply_advertise_host or host
    why = ""
    if settings.tls_cert_file is not None:
        why = "the gateway serves TLS and the reply listener has none yet"
    elif advertise in ("", "0.0.0.0", "::"):
        why = f"it binds every address ({host!r}); set MAAS_GATEWAY_REPLY_ADVERTISE_HOST to the host workers reach"
    if why:
        log.info("direct_replies_off", reason=why)
        return None
    return ReplyListener(
        replies, host=host, port=settings.reply_port, advertise_host=advertise,
        max_payload_bytes=settings.max_message_bytes, socket_path=settings.reply_socket,
    )  # fmt: skip


def create_server(settings: GatewaySettings, gateway: Gateway, auth: ServerAuth | None = None) -> GrpcServer:
    """Build the gateway's gRPC server (not started) and bind it; ``auth`` checks API keys (None: no check)."""

    def add(server: object) -> None:
        servicer = GRPCInferenceServiceServicer(gateway.router, gateway.streams, gateway.shared_memory)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    return create_grpc_server(settings, [SERVICE_NAME], add, auth=auth.interceptor if auth is not None else None)


def create_auth(settings: GatewaySettings, redis: aioredis.Redis) -> ServerAuth | None:
    """Build the gateway's API key check (None when ``settings.auth_enabled`` is off)."""
    return create_server_auth(settings, redis, INFERENCE_RULES, service="gateway")


async def _wait_for_redis(client: aioredis.Redis) -> None:
    delay_s = 0.2
    while True:
        try:
            await client.ping()
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("redis_unreachable", error=str(exc), retry_in_s=delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)


async def serve(settings: GatewaySettings) -> None:
    """Run the gateway until SIGTERM/SIGINT, then drain (see DESIGN.md, drain order)."""
    tracer_provider = tracing.configure_tracing(settings, "gateway")
    redis = create_redis(settings.redis_url, settings.redis_timeout_s, cluster=settings.redis_cluster)
    credentials = registry_channel_credentials(settings)
    registry = RegistryClient(
        settings.registry_address, timeout_s=settings.registry_timeout_s, credentials=credentials,
        metadata=bearer(settings.registry_api_key),
    )  # fmt: skip
    gateway = create_gateway(settings, redis, registry)
    auth = create_auth(settings, redis)
    handle = create_server(settings, gateway, auth)

    async def before_stop() -> None:
        # Endpoints are removed concurrently with SIGTERM: keep serving while that happens.
        await asyncio.sleep(settings.drain_delay_s)
        # Then streams take no new requests: they answer what they hold and end (UNAVAILABLE).
        gateway.streams.drain()

    await _wait_for_redis(redis)
    await gateway.start()
    if auth is not None:
        await auth.start()
    try:
        await run_until_signal(handle, settings, service="gateway", before_stop=before_stop)
    finally:
        await gateway.stop(timeout_s=settings.shutdown_grace_s)
        if auth is not None:
            await auth.stop()
        await registry.close()
        await redis.aclose()
        await tracing.shutdown_tracing(tracer_provider)
