"""OpenTelemetry traces of calls through the queue: gateway spans, worker spans, links, log ids."""

from __future__ import annotations

import asyncio
import importlib
import secrets
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from structlog.testing import capture_logs

from inference import grpc_service_pb2 as pb
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.client import AsyncMaasClient
from services.common import tracing
from services.common.queue import QueuedRequest
from services.gateway.settings import GatewaySettings
from tests.genai_model import build_genai_model
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration

SERVER = "inference.GRPCInferenceService/ModelInfer"
WORKER_SPANS = ("maas.queue_wait", "maas.reply")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Record this test's spans in memory (tracing on), then put back what was installed before."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing.install(provider)
    yield exporter
    tracing.install(previous)
    provider.shutdown()


def _request(value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return request


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


async def _call(suite: Suite, value: float, *metadata: tuple[str, str]) -> pb.ModelInferResponse:
    response: pb.ModelInferResponse = await suite.inference.ModelInfer(_request(value), metadata=metadata, timeout=10)
    return response


async def _finished(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    """The recorded spans once ``count`` spans named ``name`` ended (the worker's come after the reply)."""
    async with asyncio.timeout(10):
        while sum(span.name == name for span in exporter.get_finished_spans()) < count:
            await asyncio.sleep(0.02)
    return list(exporter.get_finished_spans())


def _hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def _in_trace(spans: Sequence[ReadableSpan], trace_id: str) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        if _hex_trace(span) == trace_id:
            named.setdefault(span.name, []).append(span)
    return named


def _parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


async def test_one_call_is_one_trace_from_gateway_through_the_queue(suite: Suite, spans: InMemorySpanExporter) -> None:
    await suite.push("affine", affine_model(), max_batch_size=8, max_wait_ms=300)
    header_a, trace_a, parent_a = _traceparent()
    header_b, trace_b, _parent_b = _traceparent()
    # Two calls at once: the worker's fill wait (max_wait_ms) puts them in one batch.
    response_a, response_b = await asyncio.gather(
        _call(suite, 1.0, ("traceparent", header_a), ("x-request-id", "call-a")),
        _call(suite, 2.0, ("traceparent", header_b), ("x-request-id", "call-b")),
    )
    assert np.frombuffer(response_a.raw_output_contents[0], np.float32).tolist() == [3.0] * 4
    assert np.frombuffer(response_b.raw_output_contents[0], np.float32).tolist() == [5.0] * 4
    recorded = await _finished(spans, "maas.reply", 2)

    traces = {trace_a: _in_trace(recorded, trace_a), trace_b: _in_trace(recorded, trace_b)}
    servers = {}
    for trace_id, named in traces.items():
        [server] = named[SERVER]
        servers[trace_id] = server
        assert server.kind is SpanKind.SERVER
        assert server.attributes is not None
        assert server.attributes["maas.model"] == "affine" and server.attributes["maas.version"] == 1
        assert server.attributes["rpc.grpc.status_code"] == 0
        for name in ("maas.admission", "maas.reply_wait", *WORKER_SPANS):
            [child] = named[name]
            assert _parent_id(child) == _span_id(server), name
    assert _parent_id(servers[trace_a]) == int(parent_a, 16)  # the caller's span is the parent
    assert servers[trace_a].attributes is not None and servers[trace_a].attributes["maas.request_id"] == "call-a"
    [wait] = traces[trace_a]["maas.queue_wait"]
    [admission] = traces[trace_a]["maas.admission"]
    assert wait.start_time is not None and wait.end_time is not None and admission.start_time is not None
    assert admission.start_time - 1_000_000 <= wait.start_time <= wait.end_time  # from the entry id's ms

    # One batch, one model run: in the first call's trace, linked to the other call's span.
    [run] = [span for span in recorded if span.name == "maas.model_run"]
    assert run.attributes is not None and run.attributes["maas.batch_size"] == 2
    lead = _hex_trace(run)
    other = trace_b if lead == trace_a else trace_a
    assert _parent_id(run) == _span_id(servers[lead])
    [assembly] = traces[lead]["maas.batch_assembly"]
    assert _parent_id(assembly) == _span_id(servers[lead])
    assert [(f"{link.context.trace_id:032x}", link.context.span_id) for link in run.links] == [
        (other, _span_id(servers[other]))
    ]
    assert "maas.model_run" not in traces[other]
    # Every call's reply links to the batch's model run.
    for named in traces.values():
        [reply] = named["maas.reply"]
        assert [link.context for link in reply.links] == [run.context]


async def test_a_generation_is_one_trace_with_its_token_count(
    suite: Suite, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version = await client.push("tiny", build_genai_model(tmp_path / "tiny"))
        await client.deploy("tiny", version.version)
    assert suite.worker is not None
    await suite.worker.reconcile()
    header, trace_id, parent_id = _traceparent()
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", 7) + b"hello a")
    request.parameters["max_new_tokens"].int64_param = 5
    call = suite.inference.ModelStreamInfer(iter([request]), metadata=(("traceparent", header),), timeout=20)
    assert [response.error_message async for response in call] == [""] * 5
    recorded = await _finished(spans, "maas.reply", 1)

    named = _in_trace(recorded, trace_id)
    [server] = named["inference.GRPCInferenceService/ModelStreamInfer"]
    assert _parent_id(server) == int(parent_id, 16)
    assert server.attributes is not None and server.attributes["maas.model"] == "tiny"
    for name in ("maas.admission", "maas.reply_wait", "maas.queue_wait", "maas.generation", "maas.reply"):
        [child] = named[name]
        assert _parent_id(child) == _span_id(server), name
    [generated] = named["maas.generation"]
    assert generated.attributes is not None
    assert (generated.attributes["maas.tokens"], generated.attributes["maas.finish_reason"]) == (5, "length")
    [wait] = named["maas.reply_wait"]
    assert wait.attributes is not None and wait.attributes["maas.tokens"] == 5
    assert "maas.model_run" not in named and "maas.batch_assembly" not in named


async def test_a_call_without_traceparent_starts_a_new_trace(suite: Suite, spans: InMemorySpanExporter) -> None:
    await suite.push("affine", affine_model(), max_batch_size=8)
    await _call(suite, 1.0)
    recorded = await _finished(spans, "maas.reply", 1)
    [server] = [span for span in recorded if span.name == SERVER]
    assert server.parent is None
    named = _in_trace(recorded, _hex_trace(server))
    assert {"maas.admission", "maas.reply_wait", "maas.queue_wait", "maas.model_run", "maas.reply"} <= named.keys()


async def test_log_lines_carry_the_trace_and_span_ids(suite: Suite, spans: InMemorySpanExporter) -> None:
    await suite.push("affine", affine_model(), max_batch_size=8)
    header, trace_id, _parent = _traceparent()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, tracing.add_trace_ids]) as logs:
        await _call(suite, 1.0, ("traceparent", header))
    recorded = await _finished(spans, "maas.reply", 1)
    [server] = [span for span in recorded if span.name == SERVER]
    [line] = [line for line in logs if line["event"] == "rpc_finished" and line["rpc"].endswith("/ModelInfer")]
    assert line["trace_id"] == trace_id
    assert line["span_id"] == f"{_span_id(server):016x}"


async def test_tracing_off_records_nothing_and_calls_work(suite: Suite) -> None:
    assert not tracing.is_enabled()
    await suite.push("affine", affine_model(), max_batch_size=8)
    header, _trace_id, _parent = _traceparent()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars, tracing.add_trace_ids]) as logs:
        response = await _call(suite, 1.0, ("traceparent", header))
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [3.0] * 4
    [line] = [line for line in logs if line["event"] == "rpc_finished" and line["rpc"].endswith("/ModelInfer")]
    assert "trace_id" not in line
    assert tracing.traceparent() == ""
    assert tracing.configure_tracing(GatewaySettings(), "gateway") is None
    assert tracing.configure_tracing(GatewaySettings(otel_traces_exporter="none"), "gateway") is None


def test_unknown_exporter_is_refused_clearly() -> None:
    with pytest.raises(tracing.TracingConfigError, match="unknown exporter 'jaegerx', expected otlp, console or none"):
        tracing.configure_tracing(GatewaySettings(otel_traces_exporter="jaegerx"), "gateway")
    assert not tracing.is_enabled()


def test_otlp_without_the_extra_names_the_extra() -> None:
    try:
        importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    except ImportError:
        pass
    else:
        pytest.skip("the otlp extra is installed here")
    with pytest.raises(tracing.TracingConfigError, match=r"pip install 'maas\[otlp\]'"):
        tracing.configure_tracing(GatewaySettings(tracing_enabled=True), "gateway")
    assert not tracing.is_enabled()


def test_traceparent_round_trips_through_the_queue_entry() -> None:
    header, _trace_id, _parent = _traceparent()
    entry = QueuedRequest(id="1", reply_to="r", deadline_ms=1, payload=b"p", traceparent=header)
    fields = {key.encode(): str(value).encode() if not isinstance(value, bytes) else value
              for key, value in entry.to_fields().items()}  # fmt: skip
    assert QueuedRequest.from_fields(fields) == entry
    assert "traceparent" not in QueuedRequest(id="1", reply_to="r", deadline_ms=1, payload=b"p").to_fields()


async def test_a_registry_call_is_a_server_span(suite: Suite, spans: InMemorySpanExporter) -> None:
    traceparent, trace_id, parent_id = _traceparent()
    await suite.registry.create_model("traced")
    [created] = [span for span in spans.get_finished_spans() if span.name.endswith("ModelRegistry/CreateModel")]
    assert created.name == "maas.registry.v1.ModelRegistry/CreateModel"
    assert created.kind is SpanKind.SERVER
    async with grpc.aio.insecure_channel(suite.registry_address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        await stub.GetModel(registry_pb2.GetModelRequest(name="traced"), metadata=(("traceparent", traceparent),))
    [got] = [span for span in spans.get_finished_spans() if span.name.endswith("ModelRegistry/GetModel")]
    assert _hex_trace(got) == trace_id and _parent_id(got) == int(parent_id, 16)  # the caller's trace goes on
