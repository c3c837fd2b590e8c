"""Generative models (ONNX Runtime GenAI): pushed as a bundle, streamed token by token, cancelled, resumed.

The model is tests/genai_model.py's tiny decoder: greedy decoding emits the byte after the
previous one, so "hello a" -> "bcdefg...". Its slow variant (``burn``) takes a few ms a token,
so that a cancel or a kill lands mid-generation.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from inference import grpc_service_pb2 as pb
from services.cli.examples import affine_model
from services.client import InvalidArgument, MaasClient, NotFound, TextPiece
from services.client.aio import AsyncMaasClient
from services.common import generation, keys
from services.common.auth import bearer
from services.common.embedded_redis import EmbeddedRedis
from tests.genai_model import build_genai_model
from tests.integration.suite import Suite, run_cli, start_worker_process
from tests.triton import triton_calls

pytestmark = pytest.mark.integration

GREEDY = "".join(chr(ord("b") + i) for i in range(30))
"""What greedy decoding generates after a prompt ending in "a" (ASCII up to "~")."""


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path, timeout_s=30).start(with_worker=False)
    await running.start_worker(max_generations=2, reclaim_idle_ms=600, reclaim_interval_s=0.3)
    yield running
    await running.stop()


async def _push(suite: Suite, tmp_path: Path, name: str, *, burn: int = 0) -> int:
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version = await client.push(name, build_genai_model(tmp_path / name, burn=burn))
        await client.deploy(name, version.version)
    if suite.worker is not None:
        await suite.worker.reconcile()
    return version.version


def _request(model: str, prompt: str, **parameters: int | float | bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="r1")
    request.inputs.add(name="prompt", datatype="BYTES", shape=[1])
    data = prompt.encode()
    request.raw_input_contents.append(struct.pack("<I", len(data)) + data)
    for name, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[name].bool_param = value
        elif isinstance(value, int):
            request.parameters[name].int64_param = value
        else:
            request.parameters[name].double_param = value
    return request


def _text(response: pb.ModelInferResponse) -> str:
    if not response.raw_output_contents:
        return ""
    raw = response.raw_output_contents[0]
    return raw[4 : 4 + struct.unpack("<I", raw[:4])[0]].decode()


async def _stream(suite: Suite, request: pb.ModelInferRequest) -> list[pb.ModelStreamInferResponse]:
    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        yield request

    return [response async for response in suite.inference.ModelStreamInfer(requests(), timeout=30)]


def _gauge() -> float:
    return REGISTRY.get_sample_value("maas_worker_generations_in_flight") or 0.0


async def _until_no_generation() -> None:
    async with asyncio.timeout(10):  # a whole slow generation would take far longer
        while _gauge() != 0:
            await asyncio.sleep(0.02)


async def test_greedy_generation_streams_token_by_token_and_infer_returns_it_whole(
    suite: Suite, tmp_path: Path
) -> None:
    await _push(suite, tmp_path, "tiny")
    metadata = await suite.inference.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))
    assert metadata.platform == "onnxruntime_genai"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("prompt", "BYTES", [1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("text", "BYTES", [1])]

    responses = await _stream(suite, _request("tiny", "hello a", max_new_tokens=25))
    assert [r.error_message for r in responses] == [""] * 25
    pieces = [_text(r.infer_response) for r in responses]
    assert pieces == list(GREEDY[:25])  # one response per token, in order
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in responses]
    assert finals == [False] * 24 + [True]
    assert responses[-1].infer_response.parameters["finish_reason"].string_param == "length"

    whole = await suite.inference.ModelInfer(_request("tiny", "hello a", max_new_tokens=25), timeout=30)
    assert _text(whole) == GREEDY[:25]
    assert whole.parameters["finish_reason"].string_param == "length"
    assert generation.FINAL not in whole.parameters  # one answer: no decoupled marker


async def test_parameters_are_checked_and_seeded_sampling_is_reproducible(suite: Suite, tmp_path: Path) -> None:
    await _push(suite, tmp_path, "tiny")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.inference.ModelInfer(_request("tiny", "hello", beam_width=2), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'beam_width' is not supported" in str(caught.value.details())
    assert "max_new_tokens, temperature, top_k, top_p, seed, do_sample" in str(caught.value.details())
    for bad, rule in [({"max_new_tokens": 0}, "1..1024"), ({"temperature": 0.0}, "> 0"), ({"top_p": 1.5}, "(0, 1]")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.inference.ModelInfer(_request("tiny", "hello", **bad), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rule in str(caught.value.details())

    def sampled(seed: int) -> pb.ModelInferRequest:
        return _request("tiny", "hello", max_new_tokens=12, do_sample=True, temperature=50.0, top_k=260, seed=seed)

    first = [_text(r.infer_response) for r in await _stream(suite, sampled(1))]
    again = [_text(r.infer_response) for r in await _stream(suite, sampled(1))]
    other = [_text(r.infer_response) for r in await _stream(suite, sampled(2))]
    assert first == again
    assert first != other


async def test_a_cancelled_stream_stops_the_generation(
    suite: Suite, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    await _push(suite, tmp_path, "slow", burn=256)  # a few ms a token: 1000 tokens take seconds
    call = suite.inference.ModelStreamInfer(iter([_request("slow", "a", max_new_tokens=1000)]), timeout=30)
    received = 0
    async for response in call:
        assert response.error_message == ""
        received += 1
        if received == 3:
            break
    assert _gauge() == 1
    call.cancel()
    await _until_no_generation()
    assert suite.worker is not None
    await suite.worker.run_until_empty(timeout_s=10)  # the entry was acked: nothing pending


async def test_generations_at_once_are_bounded_by_the_setting(suite: Suite, tmp_path: Path) -> None:
    await _push(suite, tmp_path, "slow", burn=256)
    assert suite.worker is not None
    peak = 0
    seen_at_peak: tuple[int, int] | None = None
    done = asyncio.Event()

    async def generations() -> tuple[int, int]:
        """What `maas status` shows of the worker: its heartbeat's generations now / at most."""
        assert suite.worker is not None
        await suite.worker.beat()
        [worker] = (await suite.registry.get_cluster_status()).workers
        return worker.generations, worker.max_generations

    async def watch() -> None:
        nonlocal peak, seen_at_peak
        while not done.is_set():
            peak = max(peak, int(_gauge()))
            if peak == 2 and seen_at_peak is None:
                seen_at_peak = await generations()
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(_stream(suite, _request("slow", "a", max_new_tokens=30)) for _ in range(3)))
    finally:
        done.set()
        await watcher
    assert ["".join(_text(r.infer_response) for r in responses) for responses in results] == [GREEDY[:30]] * 3
    assert peak == 2  # max_generations=2: the third waited in the queue
    assert seen_at_peak == (2, 2)
    await _until_no_generation()
    assert await generations() == (0, 2)


async def test_a_generative_request_over_the_size_limit_is_refused_on_a_stream(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    limit = 4096
    running = await Suite(redis_server.url, tmp_path, timeout_s=30, gateway={"max_request_tensor_bytes": limit}).start(
        with_worker=False
    )
    try:
        await _push(running, tmp_path, "tiny")
        [answer] = await _stream(running, _request("tiny", "a" * limit, max_new_tokens=2))
        assert answer.error_message.startswith("the request holds ")
        assert f"more than this gateway's limit of {limit} (max_request_tensor_bytes)" in answer.error_message
        assert await running.redis.xlen(keys.queue("tiny", 1)) == 0
    finally:
        await running.stop()


_RECLAIM = {"reclaim_idle_ms": "600", "reclaim_interval_s": "0.3"}
"""The second worker takes over the killed one's generation quickly."""


@pytest.fixture
async def bare_suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path, timeout_s=60).start(with_worker=False)
    yield running
    await running.stop()


async def _kill_mid_stream(
    suite: Suite, tmp_path: Path, request: pb.ModelInferRequest
) -> list[pb.ModelStreamInferResponse]:
    """Stream ``request``; SIGKILL the worker after 5 tokens arrived, start another; return every response."""
    first = await start_worker_process(suite, tmp_path, "first", **_RECLAIM)
    second = None
    responses: list[pb.ModelStreamInferResponse] = []
    try:
        async for response in suite.inference.ModelStreamInfer(iter([request]), timeout=60):
            responses.append(response)
            if len(responses) == 5:
                first.send_signal(signal.SIGKILL)
                await first.wait()
                second = await start_worker_process(suite, tmp_path, "second", **_RECLAIM)
    finally:
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await process.wait()
    return responses


async def test_a_worker_killed_mid_generation_greedy_resumes_without_duplicate_or_gap(
    bare_suite: Suite, tmp_path: Path
) -> None:
    await _push(bare_suite, tmp_path, "slow", burn=256)
    responses = await _kill_mid_stream(bare_suite, tmp_path, _request("slow", " ", max_new_tokens=60))
    assert [r.error_message for r in responses] == [""] * 60
    text = "".join(_text(r.infer_response) for r in responses)
    assert text == "".join(chr(ord("!") + i) for i in range(60))  # every token once, in order (ASCII)
    assert responses[-1].infer_response.parameters["triton_final_response"].bool_param


async def test_a_worker_killed_mid_unseeded_sampling_ends_the_call_unavailable(
    bare_suite: Suite, tmp_path: Path
) -> None:
    await _push(bare_suite, tmp_path, "slow", burn=256)
    request = _request("slow", "a", max_new_tokens=200, do_sample=True, temperature=50.0, top_k=260)
    responses = await _kill_mid_stream(bare_suite, tmp_path, request)
    assert all(r.error_message == "" for r in responses[:-1])
    last = responses[-1]
    assert last.infer_response.parameters["error_code"].string_param == "UNAVAILABLE"
    assert "the worker generating this answer died after" in last.error_message
    assert "unseeded sampling cannot be resumed" in last.error_message


async def test_the_client_streams_pieces_returns_the_whole_text_and_maps_errors(suite: Suite, tmp_path: Path) -> None:
    await _push(suite, tmp_path, "tiny")
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        pieces = [piece async for piece in client.generate("tiny", "hello a", max_new_tokens=6)]
        assert pieces == [TextPiece(c, model_version="1") for c in GREEDY[:5]] + [
            TextPiece(GREEDY[5], is_final=True, finish_reason="length", model_version="1")
        ]
        assert await client.generate_text("tiny", "hello a", max_new_tokens=6) == GREEDY[:6]
        answer = await client.generate_answer("tiny", "hello a", max_new_tokens=6)
        assert answer == TextPiece(GREEDY[:6], is_final=True, finish_reason="length", model_version="1")
        with pytest.raises(InvalidArgument, match=r"parameter 'top_p' must be in \(0, 1\], got 1.5"):
            async for _piece in client.generate("tiny", "a", top_p=1.5):
                pass
        with pytest.raises(InvalidArgument, match="parameter 'temperature' needs do_sample true"):
            await client.generate_text("tiny", "a", temperature=2, do_sample=False)
        with pytest.raises(NotFound, match="nope"):
            await client.generate_text("nope", "a")
        # A sampling parameter samples without do_sample (it would do nothing greedy).
        implied = await client.generate_text("tiny", "hello", max_new_tokens=12, temperature=50, top_k=260, seed=1)
        sampled = [p.text async for p in client.generate("tiny", "hello", max_new_tokens=12, do_sample=True,
                                                         temperature=50.0, top_k=260, seed=1)]  # fmt: skip
        assert implied == "".join(sampled) != GREEDY[:12]


async def test_the_sync_client_streams_and_closing_it_stops_the_generation(suite: Suite, tmp_path: Path) -> None:
    await _push(suite, tmp_path, "slow", burn=256)

    def calls() -> tuple[str, list[str]]:
        with MaasClient(suite.gateway_address, suite.registry_address) as client:
            whole = client.generate_text("slow", "a", max_new_tokens=4)
            pieces = client.generate("slow", "a", max_new_tokens=1000)
            first = [next(pieces).text for _ in range(3)]
            assert _gauge() == 1
            pieces.close()  # cancels the call
        return whole, first

    whole, first = await asyncio.to_thread(calls)
    assert (whole, first) == ("bcde", ["b", "c", "d"])
    await _until_no_generation()


async def test_tritonclient_streams_a_decoupled_generation(suite: Suite, tmp_path: Path) -> None:
    await _push(suite, tmp_path, "tiny")
    await suite.push("affine", affine_model())
    config, plain, streamed, empty_final, refused = await asyncio.to_thread(
        triton_calls,
        suite.gateway_address,
        [
            {"op": "config", "model": "tiny"},
            {"op": "config", "model": "affine"},
            {"op": "generate", "model": "tiny", "prompt": "hello a", "parameters": {"max_new_tokens": 8, "seed": 3}},
            {"op": "generate", "model": "tiny", "prompt": "hello a", "parameters": {"max_new_tokens": 3},
             "empty_final": True},
            {"op": "generate", "model": "tiny", "prompt": "a", "parameters": {"beam_width": 2}},
        ],
    )  # fmt: skip
    assert config["ok"]["config"]["model_transaction_policy"] == {"decoupled": True}
    assert "model_transaction_policy" not in plain["ok"]["config"]
    assert "".join(r["text"] for r in streamed["ok"]) == GREEDY[:8]
    assert [r["final"] for r in streamed["ok"]] == [False] * 7 + [True]
    assert streamed["ok"][-1]["finish_reason"] == "length"
    assert empty_final["ok"] == [
        {"text": "b", "final": False, "finish_reason": None},
        {"text": "c", "final": False, "finish_reason": None},
        {"text": "d", "final": False, "finish_reason": None},
        {"text": None, "final": True, "finish_reason": "length"},
    ]
    [error] = refused["ok"]
    assert "parameter 'beam_width' is not supported by generative models" in error["error"]


async def test_the_cli_prints_tokens_then_the_finish_reason(suite: Suite, tmp_path: Path) -> None:
    await _push(suite, tmp_path, "tiny")
    code, stdout, stderr = await run_cli(suite, "generate", "tiny", "hello a", "--max-new-tokens", "5")
    assert (code, stdout) == (0, GREEDY[:5] + "\n"), stderr
    assert "finish_reason: length" in stderr
    code, stdout, stderr = await run_cli(suite, "generate", "tiny", "hello a", "--max-new-tokens", "3", "--json")
    assert code == 0, stderr
    assert [json.loads(line) for line in stdout.splitlines()] == [
        {"text": "b", "final": False},
        {"text": "c", "final": False},
        {"text": "d", "final": True, "finish_reason": "length", "model_version": "1"},
    ]
    code, stdout, stderr = await run_cli(
        suite, "generate", "tiny", "hello a", "--max-new-tokens", "4", "--no-stream", "--json", "--version", "1"
    )
    assert (code, json.loads(stdout)) == (0, {"text": GREEDY[:4], "finish_reason": "length", "model_version": "1"})
    code, stdout, stderr = await run_cli(suite, "generate", "tiny", "hello a", "--max-new-tokens", "4", "--no-stream")
    assert (code, stdout) == (0, GREEDY[:4] + "\n"), stderr
    assert "finish_reason: length" in stderr
    code, stdout, stderr = await run_cli(suite, "status")
    assert code == 0, stderr
    [row] = [line for line in stdout.splitlines() if line.strip("│┃ ").startswith("tiny ")]  # not "tiny:1"
    assert "v1 on pool default (generative)" in row and "max batch" not in stdout
    code, stdout, stderr = await run_cli(suite, "status", "--json")
    assert (code, [m["generative"] for m in json.loads(stdout)["models"]]) == (0, [True]), stderr
    code, stdout, stderr = await run_cli(suite, "generate", "tiny", "a", "--top-p", "2")
    assert (code, stdout) == (1, "")
    assert "error INVALID_ARGUMENT: parameter 'top_p' must be in (0, 1], got 2.0" in stderr


@pytest.fixture
async def auth_suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path, timeout_s=30, auth={}).start()
    yield running
    await running.stop()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_generation_compute_is_charged_to_the_tenant_and_counted_in_statistics(
    auth_suite: Suite, tmp_path: Path
) -> None:
    await auth_suite.registry.create_model("llm")
    version = await auth_suite.registry.upload_bundle("llm", build_genai_model(tmp_path / "llm"))
    await auth_suite.registry.deploy("llm", version.version)
    assert auth_suite.worker is not None
    await auth_suite.worker.reconcile()
    await auth_suite.registry.create_tenant("team-g")
    _record, key = await auth_suite.registry.create_api_key("team-g", "caller", ["infer", "read"])
    labels = {"model": "llm", "version": str(version.version)}
    queued_before = _sample("maas_inference_queue_wait_seconds_count", **labels)
    async with AsyncMaasClient(auth_suite.gateway_address, auth_suite.registry_address, metadata=bearer(key)) as client:
        assert "".join([p.text async for p in client.generate("llm", "hello a", max_new_tokens=10)]) == GREEDY[:10]
        assert await client.generate_text("llm", "hello a", max_new_tokens=10) == GREEDY[:10]
    assert _sample("maas_inference_tenant_compute_seconds_total", tenant="team-g", **labels) > 0
    assert _sample("maas_inference_queue_wait_seconds_count", **labels) == queued_before + 2
    assert _sample("maas_inference_requests_total", code="OK", **labels) >= 2
    usage = {tenant.name: used for tenant, used in await auth_suite.registry.tenant_report()}["team-g"]
    assert usage.compute_ns > 0
    await auth_suite.worker.run_until_empty()  # which sends the worker's statistics
    statistics = await auth_suite.inference.ModelStatistics(
        pb.ModelStatisticsRequest(name="llm"), metadata=bearer(auth_suite.admin_key)
    )
    [stats] = statistics.model_stats
    assert (stats.inference_count, stats.execution_count) == (2, 2)
    assert stats.inference_stats.compute_infer.ns > 0
