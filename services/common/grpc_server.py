"""Server bootstrap shared by every service: interceptors, health, reflection, metrics, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import start_http_server

from services.common.interceptors import ErrorInterceptor, RequestContextInterceptor, WrappingInterceptor
from services.common.settings import ServiceSettings
from services.common.tls import server_credentials

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest gRPC message MaaS's own clients accept or send (servers: ``max_message_bytes``)."""


@dataclass
class GrpcServer:
    """A started-or-not gRPC server with its health servicer and bound port."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    service_names: Sequence[str]
    metrics_port: int | None = None
    _metrics_httpd: Any = field(default=None, repr=False)

    async def set_serving(self, is_serving: bool) -> None:
        """Report SERVING (or NOT_SERVING) for the server and each of its services."""
        status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)


REFUSAL_DRAIN_S = 2.0
"""Longest a server reads on after refusing a client stream, so that the client reads its status."""


async def drain_requests(requests: AsyncIterator[Any], seconds: float = REFUSAL_DRAIN_S) -> None:
    """Read and drop what a client still sends on a refused stream, for at most ``seconds``.

    grpc.aio reports a client's write that races the end of its call as INTERNAL ("Internal error
    from Core") instead of the server's status: a refusal answered only once the client has
    finished writing (or after ``seconds``) reaches the client as itself.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            async for _request in requests:
                pass


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose methods' handlers come wrapped (``_WrappingRegistrar``)."""

    def __init__(
        self,
        inner: grpc.GenericRpcHandler,
        wrap: Callable[[grpc.RpcMethodHandler | None, str], grpc.RpcMethodHandler | None],
    ) -> None:
        self._inner = inner
        self._wrap = wrap

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._wrap(self._inner.service(handler_call_details), handler_call_details.method)


class _WrappingRegistrar:
    """Registers servicers on ``server`` with every method's handler wrapped once, up front.

    The same wrappers as installing them as interceptors (the first is the outermost), without
    gRPC's interceptor pipeline, which runs an ``intercept_service`` coroutine per interceptor on
    every call: with MaaS's three on a bare grpc.aio server (a handler that only answers, 32
    clients, 2 cores), 217-312 µs of server CPU a call against 191-256 µs wrapped here, lower in
    each of 5 alternating pairs (through the whole stack, within the noise: README).
    """

    def __init__(self, server: grpc.aio.Server, wrappers: Sequence[WrappingInterceptor]) -> None:
        self._server = server
        self._wrappers = list(reversed(wrappers))

    def _wrap(self, handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
        for wrapper in self._wrappers:
            handler = wrapper.wrap(handler, method)
        return handler

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Register ``service``'s methods (gRPC's fast path: looked up by name), wrapped."""
        wrapped = {name: self._wrap(handler, f"/{service}/{name}") for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers whose handlers come wrapped."""
        self._server.add_generic_rpc_handlers(tuple(_WrappedGenericHandler(h, self._wrap) for h in handlers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def create_grpc_server(
    settings: ServiceSettings,
    service_names: Sequence[str],
    add_servicers: Callable[[grpc.aio.Server], None],
    auth: WrappingInterceptor | None = None,
) -> GrpcServer:
    """Build a ``grpc.aio`` server with MaaS's wrappers (``_WrappingRegistrar``), health and reflection; bind it.

    Args:
        settings: Host and port to bind (port 0 picks a free one); TLS (mutual TLS) when its
            ``tls_*`` files are set, see ``services.common.tls``.
        service_names: Full names of the services ``add_servicers`` registers.
        add_servicers: Registers the service's servicers on the server.
        auth: The API key check (``services.common.auth.AuthInterceptor``), run inside the error
            mapper's scope; None serves without keys.

    Returns:
        The server (not started) with its health servicer and the bound port.

    Raises:
        TlsConfigError: The TLS settings are incomplete or name a file that cannot be read.
    """
    credentials = server_credentials(settings)  # first: bad TLS settings fail before anything is built
    wrappers: list[WrappingInterceptor] = [
        RequestContextInterceptor(settings.access_log_sample),
        ErrorInterceptor(),
        *([auth] if auth is not None else []),
    ]
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    # NOTE: the registrar is not a grpc.aio.Server, but has what the generated add_*_to_server
    # functions and reflection call (and hands anything else to the server).
    registrar = cast(grpc.aio.Server, _WrappingRegistrar(server, wrappers))
    add_servicers(registrar)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    # NOTE: not reflection.enable_server_reflection, which picks its servicer by the server's type.
    reflection_service = reflection.aio.ReflectionServicer([*names, reflection.SERVICE_NAME])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection_service, registrar)
    address = f"{settings.host}:{settings.port}"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    return GrpcServer(server=server, health=health, port=port, service_names=list(service_names))


def start_metrics(handle: GrpcServer, settings: ServiceSettings) -> None:
    """Start the Prometheus HTTP endpoint if ``settings.metrics_port`` is set."""
    if settings.metrics_port is None:
        return
    httpd, _thread = start_http_server(settings.metrics_port, addr=settings.host)
    handle._metrics_httpd = httpd
    handle.metrics_port = int(httpd.server_port)


async def stop_metrics(handle: GrpcServer) -> None:
    """Stop the Prometheus HTTP endpoint if it runs."""
    if handle._metrics_httpd is not None:
        await asyncio.get_running_loop().run_in_executor(None, handle._metrics_httpd.shutdown)
        handle._metrics_httpd.server_close()


def write_ready_file(path: Path, handle: GrpcServer, **extra: object) -> None:
    """Atomically write the bound ports (and ``extra``) as JSON, for supervisors and tests."""
    payload = {"port": handle.port, "metrics_port": handle.metrics_port, "pid": os.getpid(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def stop_signal_event() -> asyncio.Event:
    """Return an event set on SIGTERM or SIGINT (Python as PID 1 needs explicit handlers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until_signal(
    handle: GrpcServer,
    settings: ServiceSettings,
    *,
    service: str,
    before_stop: Callable[[], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then shut down in the documented order.

    Health goes SERVING once the server has started; on a signal it goes NOT_SERVING, then
    ``before_stop`` runs (drain), then the server stops with ``settings.shutdown_grace_s``.
    """
    stop = stop or stop_signal_event()
    await handle.server.start()
    start_metrics(handle, settings)
    await handle.set_serving(True)
    if settings.ready_file is not None:
        write_ready_file(settings.ready_file, handle)
    log.info("server_started", service=service, port=handle.port, metrics_port=handle.metrics_port)
    await stop.wait()
    log.info("server_stopping", service=service, grace_s=settings.shutdown_grace_s)
    await handle.set_serving(False)
    if before_stop is not None:
        await before_stop()
    await handle.server.stop(settings.shutdown_grace_s)
    await stop_metrics(handle)
    log.info("server_stopped", service=service)
