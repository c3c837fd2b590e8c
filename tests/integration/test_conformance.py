"""docs/conformance.md is what the gateway does: every RPC, every documented error code, tritonclient."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from services.common.embedded_redis import EmbeddedRedis
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "conformance.md"
README = ROOT / "README.md"
PROBE = ROOT / "tests" / "triton_conformance_probe.py"
BEGIN, END = "<!-- conformance-table: begin -->", "<!-- conformance-table: end -->"

Call = Callable[[], Awaitable[object]]


def _table(path: Path) -> list[str]:
    text = path.read_text()
    assert BEGIN in text and END in text, f"{path.name} has no conformance table"
    return [line for line in text.split(BEGIN)[1].split(END)[0].splitlines() if line.startswith("| ")][1:]


def _rows() -> dict[str, dict[str, object]]:
    rows = {}
    for line in _table(DOC):
        rpc, extension, supported, methods, codes = (cell.strip() for cell in line.strip("|").split("|"))
        rows[rpc] = {
            "extension": extension,
            "supported": supported == "yes",
            "methods": {m.strip() for m in methods.split(",")},
            "codes": set() if codes == "-" else {c.strip() for c in codes.split(",")},
        }
    return rows


def _infer(model: str = "affine", rows: int = 1, width: int = 4, version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id="c")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, width])
    request.raw_input_contents.append(np.ones((rows, width), np.float32).tobytes())
    return request


async def _code(call: Call) -> str:
    try:
        await call()
    except grpc.aio.AioRpcError as exc:
        assert exc.details(), f"{exc.code().name} without a message"
        return exc.code().name
    return "OK"


def _cases(suite: Suite, region_key: str) -> dict[str, list[tuple[str, Call]]]:  # noqa: C901 - one table
    """(expected code, call) per RPC: every code the table lists, and OK for what is supported."""
    s = suite.inference
    raw_stream = suite.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None, response_deserializer=None
    )

    async def requests(*items: object) -> AsyncIterator[object]:
        for item in items:
            yield item

    async def stream(*items: pb.ModelInferRequest) -> None:
        async for answer in s.ModelStreamInfer(requests(*items), timeout=10):
            assert not answer.error_message, answer.error_message

    async def undecodable_stream() -> None:
        async for _answer in raw_stream(requests(b"\xff\xff\xff"), timeout=10):
            pass

    async def unanswered_stream() -> None:
        call = s.ModelStreamInfer(timeout=0.5)
        await call.write(_infer("lonely"))
        await call.read()

    async def draining_stream() -> None:
        suite.gateway.streams.drain()
        await stream(_infer())

    def register(name: str, key: str, size: int = 64) -> Call:
        return lambda: s.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=size), timeout=5
        )

    def load(**parameters: pb.ModelRepositoryParameter) -> Call:
        return lambda: s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="affine", parameters=parameters))

    bad_param = pb.ModelRepositoryParameter(bool_param=True)
    return {
        "ServerLive": [("OK", lambda: s.ServerLive(pb.ServerLiveRequest()))],
        "ServerReady": [("OK", lambda: s.ServerReady(pb.ServerReadyRequest()))],
        "ModelReady": [
            ("OK", lambda: s.ModelReady(pb.ModelReadyRequest(name="affine"))),
            ("OK", lambda: s.ModelReady(pb.ModelReadyRequest(name="nope"))),
            ("INVALID_ARGUMENT", lambda: s.ModelReady(pb.ModelReadyRequest(name="affine", version="one"))),
        ],
        "ServerMetadata": [("OK", lambda: s.ServerMetadata(pb.ServerMetadataRequest()))],
        "ModelMetadata": [
            ("OK", lambda: s.ModelMetadata(pb.ModelMetadataRequest(name="affine"))),
            ("NOT_FOUND", lambda: s.ModelMetadata(pb.ModelMetadataRequest(name="nope"))),
            ("NOT_FOUND", lambda: s.ModelMetadata(pb.ModelMetadataRequest(name="affine", version="99"))),
            ("INVALID_ARGUMENT", lambda: s.ModelMetadata(pb.ModelMetadataRequest(name="affine", version="one"))),
        ],
        "ModelInfer": [
            ("OK", lambda: s.ModelInfer(_infer(), timeout=10)),
            ("INVALID_ARGUMENT", lambda: s.ModelInfer(_infer(width=3), timeout=10)),
            ("NOT_FOUND", lambda: s.ModelInfer(_infer("nope"), timeout=10)),
            ("NOT_FOUND", lambda: s.ModelInfer(_infer(version="99"), timeout=10)),
            ("FAILED_PRECONDITION", lambda: s.ModelInfer(_infer("idle"), timeout=10)),
            ("RESOURCE_EXHAUSTED", lambda: s.ModelInfer(_infer(rows=2048), timeout=10)),
            ("DEADLINE_EXCEEDED", lambda: s.ModelInfer(_infer("lonely"), timeout=0.5)),
        ],
        "ModelStreamInfer": [
            ("OK", lambda: stream(_infer(), _infer())),
            ("INVALID_ARGUMENT", undecodable_stream),
            ("DEADLINE_EXCEEDED", unanswered_stream),
        ],
        "ModelConfig": [
            ("OK", lambda: s.ModelConfig(pb.ModelConfigRequest(name="affine"))),
            ("NOT_FOUND", lambda: s.ModelConfig(pb.ModelConfigRequest(name="nope"))),
            ("INVALID_ARGUMENT", lambda: s.ModelConfig(pb.ModelConfigRequest(name="affine", version="one"))),
        ],
        "ModelStatistics": [
            ("OK", lambda: s.ModelStatistics(pb.ModelStatisticsRequest())),
            ("OK", lambda: s.ModelStatistics(pb.ModelStatisticsRequest(name="affine"))),
            ("NOT_FOUND", lambda: s.ModelStatistics(pb.ModelStatisticsRequest(name="nope"))),
            ("INVALID_ARGUMENT", lambda: s.ModelStatistics(pb.ModelStatisticsRequest(name="affine", version="one"))),
        ],
        "RepositoryIndex": [("OK", lambda: s.RepositoryIndex(pb.RepositoryIndexRequest()))],
        "RepositoryModelLoad": [
            ("OK", load()),
            ("OK", load(config=pb.ModelRepositoryParameter(string_param='{"max_batch_size": 8}'))),
            ("INVALID_ARGUMENT", load(config=pb.ModelRepositoryParameter(string_param="{not json"))),
            ("INVALID_ARGUMENT", load(other=bad_param)),
            ("NOT_FOUND", lambda: s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"))),
        ],
        "RepositoryModelUnload": [
            ("OK", lambda: s.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="spare"))),
            ("NOT_FOUND", lambda: s.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="nope"))),
        ],
        "SystemSharedMemoryRegister": [
            ("OK", register("region", region_key)),
            ("ALREADY_EXISTS", register("region", region_key)),
            ("NOT_FOUND", register("ghost", "/maas-conformance-no-such-object")),
            ("INVALID_ARGUMENT", register("bad", "/a/b")),
            ("INVALID_ARGUMENT", register("zero", region_key, size=0)),
        ],
        "SystemSharedMemoryStatus": [
            ("OK", lambda: s.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())),
            ("OK", lambda: s.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="region"))),
            ("NOT_FOUND", lambda: s.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="ghost"))),
        ],
        "SystemSharedMemoryUnregister": [
            ("OK", lambda: s.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="region"))),
            ("OK", lambda: s.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())),
        ],
        "CudaSharedMemoryStatus": [
            ("UNIMPLEMENTED", lambda: s.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()))
        ],
        "CudaSharedMemoryRegister": [
            ("UNIMPLEMENTED", lambda: s.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="g")))
        ],
        "CudaSharedMemoryUnregister": [
            ("UNIMPLEMENTED", lambda: s.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest()))
        ],
        "TraceSetting": [("UNIMPLEMENTED", lambda: s.TraceSetting(pb.TraceSettingRequest()))],
        "LogSettings": [("UNIMPLEMENTED", lambda: s.LogSettings(pb.LogSettingsRequest()))],
        # Last: draining ends every stream (and this gateway's use for streams).
        "ModelStreamInfer (drain)": [("UNAVAILABLE", draining_stream)],
    }


@pytest.fixture
async def conformance_suite(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Suite]:
    suite = await Suite(redis_server.url, tmp_path, gateway={"max_request_tensor_bytes": 16 * 1024}).start()
    try:
        await suite.push("affine", affine_model())
        await suite.push("spare", affine_model())
        await suite.push("lonely", affine_model(), pool="nobody-serves-this")
        await suite.registry.create_model("idle")
        await suite.registry.upload_version("idle", affine_model())
        yield suite
    finally:
        await suite.stop()


def test_the_table_lists_every_rpc_of_the_service_and_readme_has_the_same_table() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert set(_rows()) == {method.name for method in service.methods}
    assert _table(README) == _table(DOC)


async def test_every_rpc_answers_the_documented_codes(conformance_suite: Suite) -> None:
    rows = _rows()
    region = shared_memory.SharedMemory(create=True, size=64)
    try:
        cases = _cases(conformance_suite, f"/{region.name}")
        seen: dict[str, set[str]] = {}
        for rpc, calls in cases.items():
            for expected, call in calls:
                got = await _code(call)
                assert got == expected, f"{rpc}: expected {expected}, got {got}"
                seen.setdefault(rpc.split(" ")[0], set()).add(got)
    finally:
        region.close()
        region.unlink()
    for rpc, row in rows.items():
        codes = seen[rpc] - {"OK"}
        assert codes == row["codes"], f"{rpc}: the table says {sorted(row['codes'])}, the server gave {sorted(codes)}"
        assert ("OK" in seen[rpc]) == row["supported"], f"{rpc}: supported is {row['supported']} in the table"


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_every_tritonclient_method_works_or_is_unimplemented(conformance_suite: Suite, mode: str) -> None:
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(PROBE), conformance_suite.gateway_address, mode],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows()
    called: dict[str, set[str]] = {}
    for method, rpc, code in json.loads(done.stdout):
        assert code == ("OK" if rows[rpc]["supported"] else "UNIMPLEMENTED"), f"{method} ({rpc}): {code}"
        called.setdefault(rpc, set()).add(method)
    for rpc, row in rows.items():
        assert called.get(rpc, set()) == _methods(row, mode), f"{rpc}: tritonclient {mode} calls {called.get(rpc)}"


def _methods(row: dict[str, object], mode: str) -> set[str]:
    """The row's tritonclient methods of one client: untagged, or tagged "(sync)" or "(aio)"."""
    methods: set[str] = row["methods"]  # type: ignore[assignment]
    other = "(aio)" if mode == "sync" else "(sync)"
    return {m.removesuffix(f" ({mode})") for m in methods if not m.endswith(other)}
