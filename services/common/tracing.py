"""OpenTelemetry traces through the queue: setup, W3C propagation, spans and log correlation.

One call makes one trace: the gateway's server span (its parent comes from the caller's
``traceparent``/``tracestate`` gRPC metadata, or it starts a new trace) holds ``maas.admission``
and ``maas.reply_wait``; its context travels in the queue entry (``QueuedRequest.traceparent``),
and the worker adds ``maas.queue_wait``, ``maas.batch_assembly``, ``maas.model_run`` and
``maas.reply`` under it (a generative model's call: ``maas.generation``, with its token count,
instead of a batch's assembly and model run). A batch runs once for several calls: its assembly and model run spans
are recorded once, in the trace of the batch's first call, with a link to each other call's
span, and every call's ``maas.reply`` span links to the model run.

Off by default. When off, no tracer exists: every helper here returns at once (one ``None``
check), so the request path pays nothing for it. On with ``tracing_enabled`` or when
``OTEL_TRACES_EXPORTER`` names an exporter; the SDK reads the other standard ``OTEL_*``
variables itself (``OTEL_EXPORTER_OTLP_*``, ``OTEL_TRACES_SAMPLER``, ``OTEL_RESOURCE_ATTRIBUTES``).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from structlog.typing import EventDict

from services.common.settings import ServiceSettings
from services.common.stats import entry_time_ns

if TYPE_CHECKING:  # the SDK is imported only when tracing is configured (CLI start-up time)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_TRACER_NAME = "maas"
_PROPAGATOR = TraceContextTextMapPropagator()
_HEADERS = ("traceparent", "tracestate")
_NOOP: AbstractContextManager[Any] = nullcontext()
# Server-side span status per the OpenTelemetry gRPC conventions: a client's mistake is no error.
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
_OTLP_MODULE = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


class TracingConfigError(ValueError):
    """The tracing settings name an unknown exporter, or one that is not installed."""


def is_enabled() -> bool:
    """Whether this process records spans."""
    return _tracer is not None


def install(provider: TracerProvider | None) -> TracerProvider | None:
    """Record spans with ``provider`` from now on (None: stop recording); return the previous one.

    ``configure_tracing`` calls it; tests install a provider with an in-memory exporter.
    """
    global _tracer, _provider
    previous, _provider = _provider, provider
    _tracer = provider.get_tracer(_TRACER_NAME) if provider is not None else None
    return previous


def _exporter(name: str) -> SpanExporter | None:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            module = importlib.import_module(_OTLP_MODULE)
        except ImportError:
            raise TracingConfigError(
                "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: install maas with the 'otlp' extra "
                "(pip install 'maas[otlp]'), or set OTEL_TRACES_EXPORTER=console or none"
            ) from None
        exporter: SpanExporter = module.OTLPSpanExporter()
        return exporter
    if name == "none":
        return None
    raise TracingConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter '{name}', expected otlp, console or none")


def configure_tracing(settings: ServiceSettings, service: str) -> TracerProvider | None:
    """Set up tracing for the process as ``settings`` say, or leave it off.

    Args:
        settings: ``tracing_enabled``, ``otel_traces_exporter`` (comma-separated; empty with
            tracing on: otlp) and ``otel_service_name`` (empty: ``maas-<service>``).
        service: The service's name (gateway, inference, registry).

    Returns:
        The installed provider (None: tracing is off); hand it to ``shutdown_tracing`` at exit.

    Raises:
        TracingConfigError: An exporter is unknown, or otlp without the ``otlp`` extra installed.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    names = [name.strip().lower() for name in settings.otel_traces_exporter.split(",") if name.strip()]
    if not settings.tracing_enabled and all(name == "none" for name in names):
        return None
    exporters = [exporter for name in names or ["otlp"] if (exporter := _exporter(name)) is not None]
    resource = Resource.create({"service.name": settings.otel_service_name or f"maas-{service}"})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # for libraries that trace through the global API
    install(provider)
    return provider


async def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Stop recording and export the spans still buffered (off the event loop: exporting blocks)."""
    if provider is None:
        return
    if _provider is provider:
        install(None)
    await asyncio.to_thread(provider.shutdown)


def traceparent() -> str:
    """The current span's W3C ``traceparent`` header, for a queue entry ('' when off or no span)."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def _attributes(values: Mapping[str, Any]) -> dict[str, AttributeValue]:
    return {f"maas.{key}": value for key, value in values.items() if value not in ("", None)}


def span(name: str, **attributes: str | int) -> AbstractContextManager[Any]:
    """A child span of the current one around a block (a shared no-op when tracing is off).

    Attributes are recorded as ``maas.<name>``; empty ones are left out.
    """
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=_attributes(attributes))


@contextmanager
def detached_span(name: str, **attributes: str | int) -> Iterator[trace.Span]:
    """A child span of the current one around a block, never made current (a no-op span when tracing is off).

    For a block that yields to its caller (an async generator's): a current span would stay
    current in the caller's code, and its context could not be detached from another task. An
    exception from the block (not a cancellation or a closed generator) marks the span failed.
    """
    if _tracer is None:
        yield trace.INVALID_SPAN
        return
    recorded = _tracer.start_span(name, attributes=_attributes(attributes))
    try:
        yield recorded
    except Exception as exc:
        recorded.record_exception(exc)
        recorded.set_status(trace.StatusCode.ERROR, type(exc).__name__)
        raise
    finally:
        recorded.end()


def annotate(**attributes: str | int) -> None:
    """Add ``maas.<name>`` attributes to the current span (nothing when off)."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(_attributes(attributes))


class ServerSpan:
    """The server span of one RPC, current while its handler runs (``RequestContextInterceptor``)."""

    __slots__ = ("_span", "_token")

    def __init__(self, tracer: trace.Tracer, rpc: str, metadata: Sequence[tuple[str, Any]] | None) -> None:
        carrier = {key: value for key, value in metadata or () if key in _HEADERS and isinstance(value, str)}
        parent = _PROPAGATOR.extract(carrier)
        name = rpc.lstrip("/")
        service, _, method = name.partition("/")
        self._span = tracer.start_span(
            name, context=parent, kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )  # fmt: skip
        self._token = otel_context.attach(trace.set_span_in_context(self._span, parent))

    def end(self, code: str) -> None:
        """End the span with the RPC's final status code (its name, e.g. ``OK``)."""
        status = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
        self._span.set_attribute("rpc.grpc.status_code", status.value[0])
        if code in _SERVER_ERRORS:
            self._span.set_status(trace.StatusCode.ERROR, code)
        otel_context.detach(self._token)
        self._span.end()


def server_span(rpc: str, metadata: Sequence[tuple[str, Any]] | None) -> ServerSpan | None:
    """Start the server span of an RPC from its invocation metadata (None when tracing is off)."""
    return None if _tracer is None else ServerSpan(_tracer, rpc, metadata)


def add_trace_ids(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
    """A structlog processor: add the current span's ``trace_id`` and ``span_id`` (hex) to the line."""
    if _tracer is not None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event_dict.setdefault("trace_id", trace.format_trace_id(context.trace_id))
            event_dict.setdefault("span_id", trace.format_span_id(context.span_id))
    return event_dict


class _Call:
    """One queue entry of a batch, as traced: its parent context and attributes."""

    __slots__ = ("attributes", "context", "own")

    def __init__(self, tracer: trace.Tracer, fields: Mapping[bytes, bytes], entry_ns: int, labels: Mapping[str, str]):
        header = fields.get(b"traceparent", b"").decode(errors="replace")
        self.attributes = _attributes(
            {**labels, "request_id": fields.get(b"rid", b"").decode(errors="replace"),
             "tenant": fields.get(b"tenant", b"").decode(errors="replace")}
        )  # fmt: skip
        self.context = _PROPAGATOR.extract({"traceparent": header}) if header else otel_context.Context()
        self.own: trace.Span | None = None
        if not trace.get_current_span(self.context).get_span_context().is_valid:
            # No (valid) caller context: this call's worker spans get a root of their own.
            self.own = tracer.start_span(
                "maas.queued_call", context=self.context, kind=trace.SpanKind.CONSUMER,
                attributes=self.attributes, start_time=entry_ns,
            )  # fmt: skip
            self.context = trace.set_span_in_context(self.own)

    @property
    def span_context(self) -> trace.SpanContext:
        return trace.get_current_span(self.context).get_span_context()


class BatchTrace:
    """The worker's spans of one batch read from a queue (see the module docstring).

    Args:
        tracer: Records the spans.
        entries: The batch's stream entries (id, fields); ``traceparent`` in the fields, if any,
            is each call's parent.
        started_ns: When the worker began the batch (epoch ns): the end of every queue wait.
        labels: ``model`` and ``version``, recorded on every span.
    """

    def __init__(
        self, tracer: trace.Tracer, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]], started_ns: int,
        labels: Mapping[str, str],
    ) -> None:  # fmt: skip
        self._tracer = tracer
        self._started_ns = started_ns
        self._ran_ns = started_ns
        self._labels = labels
        self._run: trace.SpanContext | None = None
        self._ran: set[bytes] = set()
        self._calls: dict[bytes, _Call] = {}
        for entry_id, fields in entries:
            entry_ns = min(entry_time_ns(entry_id), started_ns)  # the hosts' clocks may disagree
            call = self._calls[entry_id] = _Call(tracer, fields, entry_ns, labels)
            tracer.start_span(
                "maas.queue_wait", context=call.context, attributes=call.attributes, start_time=entry_ns
            ).end(end_time=started_ns)

    def ran(self, entry_ids: Sequence[bytes], assembled_ns: int, ran_ns: int) -> None:
        """Record the batch's assembly (until ``assembled_ns``) and model run of the calls ``entry_ids``."""
        self._ran_ns = ran_ns
        if not entry_ids:
            return
        self._ran = set(entry_ids)
        lead = self._calls[entry_ids[0]]
        links = [trace.Link(self._calls[entry_id].span_context) for entry_id in entry_ids[1:]]
        attributes = {**lead.attributes, **_attributes({"batch_size": len(entry_ids)})}
        self._tracer.start_span(
            "maas.batch_assembly", context=lead.context, attributes=attributes, start_time=self._started_ns
        ).end(end_time=assembled_ns)
        run = self._tracer.start_span(
            "maas.model_run", context=lead.context, attributes=attributes, links=links, start_time=assembled_ns
        )
        run.end(end_time=ran_ns)
        self._run = run.get_span_context()

    def generated(self, entry_id: bytes, started_ns: int, ended_ns: int, tokens: int, finish_reason: str) -> None:
        """Record the generation of the call ``entry_id`` (its model runs, token by token): tokens and finish reason."""
        call = self._calls[entry_id]
        attributes = {**call.attributes, **_attributes({"tokens": tokens, "finish_reason": finish_reason})}
        self._tracer.start_span(
            "maas.generation", context=call.context, attributes=attributes, start_time=started_ns
        ).end(end_time=ended_ns)
        self._ran_ns = ended_ns

    def replied(self, codes: Mapping[bytes, str], replied_ns: int) -> None:
        """Record each call's reply (``codes``: its status code name by entry id), written at ``replied_ns``."""
        for entry_id, code in codes.items():
            call = self._calls.get(entry_id)
            if call is None:
                continue
            links = [trace.Link(self._run)] if self._run is not None and entry_id in self._ran else []
            attributes = {**call.attributes, "rpc.grpc.status_code": grpc.StatusCode[code].value[0]}
            reply = self._tracer.start_span(
                "maas.reply", context=call.context, attributes=attributes, links=links, start_time=self._ran_ns
            )
            if code != "OK":
                reply.set_status(trace.StatusCode.ERROR, code)
            reply.end(end_time=replied_ns)
            if call.own is not None:
                call.own.end(end_time=replied_ns)


def batch_trace(
    entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]], started_ns: int, labels: Mapping[str, str]
) -> BatchTrace | None:
    """Start tracing a batch a worker read (None when tracing is off); see ``BatchTrace``."""
    return None if _tracer is None else BatchTrace(_tracer, entries, started_ns, labels)
