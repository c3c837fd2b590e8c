"""Handler wrappers (the "interceptors"): request context and logging, and the one error mapper."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import structlog

from services.common import tracing
from services.common.errors import InvalidArgument, MaasError

log = structlog.get_logger(__name__)

_Around = Callable[[grpc.aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]


class _Undecodable:
    """What a lenient deserializer returns for bytes that are not the RPC's message."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # NOTE: a deserializer that raises makes gRPC answer UNKNOWN ("Unexpected <DecodeError>")
    # before any handler runs; returning a marker lets the handler answer INVALID_ARGUMENT.
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    what = f"a serialized {descriptor.full_name}" if descriptor is not None else "a valid message"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # protobuf's DecodeError and friends
            return _Undecodable(f"the request is not {what} (protobuf decoding failed)")

    return parse


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.message)
    return request


def _as_is(request: Any) -> Any:
    return request


async def _each_decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _wrap_handler(
    handler: grpc.RpcMethodHandler, around: _Around, *, checks_decoding: bool = False
) -> grpc.RpcMethodHandler:
    """Return ``handler`` with every behaviour run inside ``around(context)``.

    With ``checks_decoding``, a request that is not the RPC's message raises ``InvalidArgument``
    inside ``around`` instead of failing in gRPC as UNKNOWN.
    """
    deserializer = _lenient(handler.request_deserializer) if checks_decoding else handler.request_deserializer
    check: Callable[[Any], Any] = _decoded if checks_decoding else _as_is
    check_each: Callable[[Any], Any] = _each_decoded if checks_decoding else _as_is
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(context):
                return await inner_uu(check(request), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(context):
                return await inner_su(check_each(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, handler.response_serializer)
    streaming = handler.unary_stream or handler.stream_stream
    assert streaming is not None
    is_unary_in = handler.unary_stream is not None

    async def stream_out(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with around(context):
            incoming = check(request) if is_unary_in else check_each(request)
            async for reply in streaming(incoming, context):
                yield reply

    factory = grpc.unary_stream_rpc_method_handler if is_unary_in else grpc.stream_stream_rpc_method_handler
    return factory(stream_out, deserializer, handler.response_serializer)


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value.decode() if isinstance(value, bytes) else str(value)
    # NOTE: an id for logs, not a secret: the Mersenne Twister (seeded from os.urandom) costs
    # no system call, unlike secrets/uuid4, and system calls are dear on virtual machines.
    return f"{random.getrandbits(128):032x}"


def _final_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN"


class HandlerCache:
    """Wrapped handlers by method: built once, not on every call (the inner handler is stable)."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]) -> None:
        self._wrap = wrap
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """Return ``handler`` wrapped (built on the first call for ``method``)."""
        cached = self._handlers.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._handlers[method] = (handler, self._wrap(handler, method))
        return cached[1]


class WrappingInterceptor:
    """Wraps each method's handler, once per method (``HandlerCache``).

    Not installed as a gRPC interceptor (gRPC would run one per call): ``services.common.grpc_server``
    wraps the handlers when the servicers are registered.

    Args:
        wrap: Builds the wrapped handler of ``(handler, method)``.
        unwrapped: Prefixes of the methods left as they are (e.g. health and reflection).
    """

    def __init__(
        self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler], unwrapped: tuple[str, ...] = ()
    ) -> None:
        self._cache = HandlerCache(wrap)
        self._unwrapped = unwrapped

    def wrap(self, handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
        """``handler`` wrapped, or as it is (None, or a method left unwrapped): what a call gets."""
        if handler is None or method.startswith(self._unwrapped):
            return handler
        return self._cache.get(handler, method)


class RequestContextInterceptor(WrappingInterceptor):
    """Bind request_id and rpc to the log context and log one ``rpc_finished`` line a call.

    Args:
        access_log_sample: Fraction of successful calls that log their ``rpc_finished`` line;
            every failed call logs it.
    """

    def __init__(self, access_log_sample: float = 1.0) -> None:
        self._sample = access_log_sample
        super().__init__(self._wrap)

    def _wrap(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        sample = self._sample
        return _wrap_handler(handler, lambda context: _RequestScope(context, rpc, sample))


class _RequestScope:
    """One call's log context, request id, server span and ``rpc_finished`` line (a class: cheaper than a generator)."""

    __slots__ = ("_context", "_rpc", "_sample", "_span", "_started")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str, sample: float) -> None:
        self._context = context
        self._rpc = rpc
        self._sample = sample
        self._started = 0.0
        self._span: tracing.ServerSpan | None = None

    async def __aenter__(self) -> None:
        structlog.contextvars.clear_contextvars()
        request_id = _request_id(self._context)
        structlog.contextvars.bind_contextvars(request_id=request_id, rpc=self._rpc)
        self._context.set_trailing_metadata((("x-request-id", request_id),))
        if tracing.is_enabled():  # the caller's traceparent, or a new trace
            self._span = tracing.server_span(self._rpc, self._context.invocation_metadata())
            tracing.annotate(request_id=request_id)
        self._started = time.perf_counter()

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        code = _final_code(self._context, exc)
        if exc is not None or self._sample >= 1.0 or random.random() < self._sample:
            duration_ms = round((time.perf_counter() - self._started) * 1000, 3)
            log.info("rpc_finished", code=code, duration_ms=duration_ms)
        if self._span is not None:  # after the log line, which carries its trace id
            self._span.end(code)


class ErrorInterceptor(WrappingInterceptor):
    """Abort with the taxonomy's code and message; anything else is INTERNAL, logged once."""

    def __init__(self) -> None:
        super().__init__(lambda handler, _rpc: _wrap_handler(handler, _ErrorScope, checks_decoding=True))


class _ErrorScope:
    """Map what a call raised to its gRPC status (a class: cheaper than a generator)."""

    __slots__ = ("_context",)

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if not isinstance(exc, Exception) or isinstance(exc, grpc.aio.AbortError):
            return  # success, cancellation, or an abort already chosen
        if isinstance(exc, MaasError) and exc.trailing_metadata:
            self._context.set_trailing_metadata((*(self._context.trailing_metadata() or ()), *exc.trailing_metadata))
        await self._context.abort(*status_of(exc))


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and client-safe message for what a call raised; logs it (once) too.

    A ``MaasError`` keeps its own code and message (logged at info); anything else is a bug:
    INTERNAL with the request id, logged at error with its traceback.
    """
    if isinstance(exc, MaasError):
        log.info("rpc_error", code=exc.grpc_code.name, message=exc.message)
        return exc.grpc_code, exc.message
    request_id = structlog.contextvars.get_contextvars().get("request_id", "-")
    log.error("rpc_internal_error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request_id={request_id})"
