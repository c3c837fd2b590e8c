"""The typed Python client (services.client), sync and asyncio, against the whole suite."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog
from onnx import TensorProto, helper, numpy_helper
from structlog.testing import capture_logs

from services.client import AsyncMaasClient, InvalidArgument, MaasClient, NotFound
from services.common.registry_client import UPLOAD_CHUNK_BYTES
from tests.integration.suite import Suite, run_cli
from tests.models import affine_model, identity_model

pytestmark = pytest.mark.integration


def _plus_one_model(rows: int) -> bytes:
    """Y = x + 1 on FP32 [-1, 4], carrying a [rows, 4] initializer so the artifact spans several chunks."""
    table = np.zeros((rows, 4), np.float32)
    table[0] = 1.0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Gather", ["table", "row"], ["one"]), helper.make_node("Add", ["x", "one"], ["y"])]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array(0, np.int64), "row")]
    graph = helper.make_graph(nodes, "plus_one", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


async def _serve_deployed(suite: Suite) -> None:
    assert suite.worker is not None
    await suite.worker.reconcile()  # deterministic: load what was deployed now, not on the next event


def _client(suite: Suite) -> MaasClient:
    return MaasClient(suite.gateway_address, suite.registry_address)


async def test_async_push_with_progress_deploy_and_infer(suite: Suite) -> None:
    model = _plus_one_model(rows=250_000)
    seen: list[tuple[int, int]] = []
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version = await client.push("plus", model, description="x + 1", progress=lambda *p: seen.append(p))
        deployment = await client.deploy("plus", version.version, max_batch_size=4)
        await _serve_deployed(suite)
        outputs = await client.infer("plus", {"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
        result = await client.infer("plus", {"x": np.zeros((1, 4), np.float32)}, version=1, outputs=["y"])
        metadata = await client.model_metadata("plus")
        assert await client.model_ready("plus")
        assert (await client.get_model("plus")).description == "x + 1"
        assert await client.list_versions("plus") == [version]
        assert await client.get_version("plus") == version

    assert (version.version, version.size_bytes, deployment.max_batch_size) == (1, len(model), 4)
    assert len(seen) == math.ceil(len(model) / UPLOAD_CHUNK_BYTES) > 1
    assert [sent for sent, _ in seen] == sorted(sent for sent, _ in seen)
    assert seen[-1] == (len(model), len(model)) and {total for _, total in seen} == {len(model)}
    assert outputs["y"].dtype == np.float32
    assert outputs["y"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert (result.model_name, result.model_version, list(result)) == ("plus", "1", ["y"])
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("x", "FP32", (-1, 4))]


def _push_file_and_deploy(suite: Suite, path: Path, seen: list[tuple[int, int]]) -> int:
    with _client(suite) as client:
        version = client.push("strings", path, progress=lambda *p: seen.append(p)).version
        client.deploy("strings")
        return version


def _infer_strings(suite: Suite) -> dict[str, np.ndarray]:
    with _client(suite) as client:
        texts = np.array([b"a", b"", "h\u00e9".encode(), b"xyz"], dtype=object).reshape(2, 2)
        return client.infer("strings", {"inp": texts})


async def test_sync_client_bytes_tensors_from_a_file(suite: Suite, tmp_path: Path) -> None:
    path = tmp_path / "strings.onnx"
    path.write_bytes(identity_model(TensorProto.STRING, ["n", 2]))
    seen: list[tuple[int, int]] = []
    # The suite's servers run on this event loop: the blocking client must run on another thread.
    assert await asyncio.to_thread(_push_file_and_deploy, suite, path, seen) == 1
    assert seen == [(path.stat().st_size, path.stat().st_size)]
    await _serve_deployed(suite)
    outputs = await asyncio.to_thread(_infer_strings, suite)
    assert outputs["out"].dtype == object and outputs["out"].shape == (2, 2)
    assert outputs["out"].tolist() == [[b"a", b""], ["h\u00e9".encode(), b"xyz"]]


def _sync_errors(suite: Suite) -> tuple[NotFound, InvalidArgument]:
    with _client(suite) as client:
        with pytest.raises(NotFound) as missing:
            client.infer("nope", {"x": np.zeros((1, 4), np.float32)})
        with pytest.raises(InvalidArgument) as shape:
            client.infer("affine", {"x": np.zeros((1, 3), np.float32)})
        return missing.value, shape.value


async def test_typed_errors_carry_the_grpc_code(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        with pytest.raises(NotFound) as missing:
            await client.infer("nope", {"x": np.zeros((1, 4), np.float32)})
        with pytest.raises(InvalidArgument) as shape:
            await client.infer("affine", {"x": np.zeros((1, 3), np.float32)})
        with pytest.raises(InvalidArgument) as datatype:
            await client.infer("affine", {"x": np.zeros((1, 4), np.float64)})
        with pytest.raises(NotFound) as unknown_model:
            await client.get_version("nope")
        with pytest.raises(InvalidArgument) as not_onnx:
            await client.push("junk", b"not an onnx model")

    assert missing.value.grpc_code == grpc.StatusCode.NOT_FOUND and "nope" in missing.value.message
    assert shape.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimension 1 is 3, expected 4" in shape.value.message
    assert "FP64" in datatype.value.message and "FP32" in datatype.value.message
    assert unknown_model.value.grpc_code == grpc.StatusCode.NOT_FOUND
    assert not_onnx.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    sync_missing, sync_shape = await asyncio.to_thread(_sync_errors, suite)
    assert (sync_missing.grpc_code, sync_missing.message) == (missing.value.grpc_code, missing.value.message)
    assert (sync_shape.grpc_code, sync_shape.message) == (shape.value.grpc_code, shape.value.message)


def _push_concurrently(suite: Suite, name: str, count: int) -> list[int]:
    model = affine_model()
    with _client(suite) as client, ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: client.push(name, model).version, range(count)))


async def test_concurrent_pushes_of_a_new_model_all_succeed(suite: Suite) -> None:
    threads = await asyncio.to_thread(_push_concurrently, suite, "conc", 8)
    assert sorted(threads) == list(range(1, 9))

    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        tasks = await asyncio.gather(*(client.push("conc-aio", affine_model()) for _ in range(8)))
        assert sorted(v.version for v in tasks) == list(range(1, 9))
        assert sorted(m.name for m in await client.list_models()) == ["conc", "conc-aio"]


def _finished(logs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["request_id"]: e["rpc"] for e in logs if e["event"] == "rpc_finished"}


async def test_metadata_hook_is_sent_with_every_call(suite: Suite) -> None:
    await suite.push("affine", affine_model())
    ids = iter(f"client-{n}" for n in range(100))
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with AsyncMaasClient(
            suite.gateway_address, suite.registry_address, metadata=lambda: [("x-request-id", next(ids))]
        ) as client:
            await client.infer("affine", {"x": np.zeros((1, 4), np.float32)})
            await client.list_models()
        async with asyncio.timeout(5):  # the client sees the reply before the server logs its line
            while not {"client-0", "client-1"} <= _finished(logs).keys():
                await asyncio.sleep(0.01)
    finished = _finished(logs)
    assert finished["client-0"].endswith("ModelInfer") and finished["client-1"].endswith("ListModels")


def _pull(suite: Suite, dest: Path, seen: list[tuple[int, int]]) -> int:
    with _client(suite) as client:
        return client.pull("plus", dest, progress=lambda *p: seen.append(p)).version


async def test_pull_streams_the_artifact_to_disk_with_progress(suite: Suite, tmp_path: Path) -> None:
    model = _plus_one_model(rows=250_000)
    await suite.registry.create_model("plus")
    await suite.registry.upload_version("plus", model)
    seen: list[tuple[int, int]] = []

    version = await asyncio.to_thread(_pull, suite, tmp_path / "out" / "plus.onnx", seen)

    assert version == 1
    assert (tmp_path / "out" / "plus.onnx").read_bytes() == model
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["plus.onnx"]  # no partial file left
    assert len(seen) > 1 and seen[-1] == (len(model), len(model))
    assert [got for got, _ in seen] == sorted(got for got, _ in seen)
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        with pytest.raises(NotFound):
            await client.pull("plus", tmp_path / "missing.onnx", version=7)
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("missing.onnx*")))
    code, stdout, stderr = await run_cli(suite, "models", "pull", "plus", "-o", str(tmp_path / "cli.onnx"))
    assert code == 0, stderr
    assert "pulled model 'plus' version 1" in stdout
    assert (tmp_path / "cli.onnx").read_bytes() == model
