"""Server interceptors: request context and logging, and the one error mapper."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import structlog

from services.common.errors import MaasError

log = structlog.get_logger(__name__)

_Around = Callable[[grpc.aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]


def _wrap_handler(handler: grpc.RpcMethodHandler, around: _Around) -> grpc.RpcMethodHandler:
    """Return ``handler`` with every behaviour run inside ``around(context)``."""
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(context):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(context):
                return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    streaming = handler.unary_stream or handler.stream_stream
    assert streaming is not None

    async def stream_out(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with around(context):
            async for reply in streaming(request, context):
                yield reply

    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )
    return factory(stream_out, handler.request_deserializer, handler.response_serializer)


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value.decode() if isinstance(value, bytes) else str(value)
    return secrets.token_hex(16)


def _final_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN"


class _HandlerCache:
    """Wrapped handlers by method: built once, not on every call (the inner handler is stable)."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]) -> None:
        self._wrap = wrap
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        cached = self._handlers.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._handlers[method] = (handler, self._wrap(handler, method))
        return cached[1]


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Bind request_id and rpc to the log context and log one ``rpc_finished`` line a call.

    Args:
        access_log_sample: Fraction of successful calls that log their ``rpc_finished`` line;
            every failed call logs it.
    """

    def __init__(self, access_log_sample: float = 1.0) -> None:
        self._sample = access_log_sample
        self._cache = _HandlerCache(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the RPC's handler (see class docstring)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._cache.get(handler, handler_call_details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        sample = self._sample

        @asynccontextmanager
        async def around(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            structlog.contextvars.clear_contextvars()
            request_id = _request_id(context)
            structlog.contextvars.bind_contextvars(request_id=request_id, rpc=rpc)
            context.set_trailing_metadata((("x-request-id", request_id),))
            started = time.perf_counter()
            exc: BaseException | None = None
            try:
                yield
            except BaseException as error:
                exc = error
                raise
            finally:
                if exc is not None or sample >= 1.0 or random.random() < sample:
                    duration_ms = round((time.perf_counter() - started) * 1000, 3)
                    log.info("rpc_finished", code=_final_code(context, exc), duration_ms=duration_ms)

        return _wrap_handler(handler, around)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Abort with the taxonomy's code and message; anything else is INTERNAL, logged once."""

    def __init__(self) -> None:
        self._cache = _HandlerCache(lambda handler, _rpc: _wrap_handler(handler, _map_errors))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the RPC's handler (see class docstring)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._cache.get(handler, handler_call_details.method)


@asynccontextmanager
async def _map_errors(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    try:
        yield
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except MaasError as exc:
        log.info("rpc_error", code=exc.grpc_code.name, message=exc.message)
        await context.abort(exc.grpc_code, exc.message)
    except Exception:
        request_id = structlog.contextvars.get_contextvars().get("request_id", "-")
        log.exception("rpc_internal_error")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request_id={request_id})")
