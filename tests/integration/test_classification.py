"""Triton's classification extension end to end: labels pushed with a version, class_count through tritonclient.

tritonclient runs in a child process (its protobuf descriptors cannot share a process with
MaaS's, see tests/triton_probe.py); it calls the gateway and the worker's direct service alike.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto
from typer.testing import CliRunner

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from services.cli.main import app
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import InvalidArgument
from services.common.grpc_server import GrpcServer
from services.common.metadata import MAX_CLASS_LABEL_BYTES, MAX_CLASS_LABELS
from services.inference.server import create_server
from services.inference.settings import InferenceSettings
from tests.integration.suite import Suite
from tests.models import identity_model, two_io_model

pytestmark = pytest.mark.integration

LABELS = ("cat", "", "dog")
"""Index 1 has an empty label and indexes 3 and 4 none: their strings carry no label."""
SCORES = np.array([[0.1, 0.7, 0.7, -1.0, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]], np.float32)
TOP3 = [["0.700000:1", "0.700000:2:dog", "0.200000:4"], ["5.000000:0:cat", "4.000000:1", "3.000000:2:dog"]]

_CHILD = r"""
import pickle, sys
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

def infer(client, call):
    inputs = []
    for name, array in call["inputs"].items():
        tensor = grpcclient.InferInput(name, list(array.shape), call["datatype"])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(name, class_count=k) for name, k in call["outputs"].items()]
    result = client.infer(call["model"], inputs, outputs=outputs, client_timeout=60)
    found = {}
    for name in call["outputs"]:
        out = result.get_output(name)
        found[name] = {"datatype": out.datatype, "shape": list(out.shape), "array": result.as_numpy(name)}
    return found

calls, addresses = pickle.load(sys.stdin.buffer)
clients = {target: grpcclient.InferenceServerClient(address) for target, address in addresses.items()}
results = {}
for key, call in calls.items():
    try:
        if call.get("op") == "server_metadata":
            results[key] = {"ok": clients[call["target"]].get_server_metadata(as_json=True)}
        else:
            results[key] = {"ok": infer(clients[call["target"]], call)}
    except InferenceServerException as exc:
        results[key] = {"error": (str(exc.status()), exc.message())}
for client in clients.values():
    client.close()
pickle.dump(results, sys.stdout.buffer)
"""


async def tritonclient_calls(addresses: dict[str, str], calls: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Make ``calls`` with an unmodified tritonclient in a child process; return its results by key."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(90):
        stdout, stderr = await child.communicate(pickle.dumps((calls, addresses)))
    assert child.returncode == 0, f"tritonclient child failed: {stderr.decode()[-3000:]}"
    results: dict[str, Any] = pickle.loads(stdout)
    return results


def _infer(target: str, model: str, datatype: str, inputs: dict[str, Any], outputs: dict[str, int]) -> dict[str, Any]:
    return {"target": target, "model": model, "datatype": datatype, "inputs": inputs, "outputs": outputs}


def _ok(results: dict[str, Any], key: str) -> dict[str, Any]:
    assert "ok" in results[key], f"{key}: {results[key]}"
    found: dict[str, Any] = results[key]["ok"]
    return found


def _strings(output: dict[str, Any]) -> list[Any]:
    assert output["datatype"] == "BYTES"
    assert list(output["array"].shape) == output["shape"]
    return np.vectorize(bytes.decode, otypes=[object])(output["array"]).tolist()  # type: ignore[no-any-return]


@pytest.fixture
async def direct(suite: Suite, redis_server: EmbeddedRedis) -> AsyncIterator[str]:
    """The worker's direct (queue-less) gRPC service; yields its address."""
    assert suite.worker is not None
    settings = InferenceSettings(port=0, redis_url=redis_server.url, registry_address=suite.registry_address)
    server: GrpcServer = create_server(settings, suite.worker)
    await server.server.start()
    yield f"127.0.0.1:{server.port}"
    await server.server.stop(None)


async def test_class_count_through_tritonclient(suite: Suite, direct: str) -> None:
    await suite.push("scores", identity_model(TensorProto.FLOAT, ["batch", 5]), class_labels=LABELS)
    await suite.push("plain", identity_model(TensorProto.INT32, ["batch", 4]))
    await suite.push("fixed", identity_model(TensorProto.FLOAT16, [2, 3]))
    await suite.push("two", two_io_model())
    await suite.push("flags", identity_model(TensorProto.BOOL, ["batch", 2]))
    version = await suite.registry.get_version("scores", 1)
    assert version.class_labels == LABELS
    ints = np.array([[3, -7, 9, 0]], np.int32)
    pair = {"a": np.array([[1, 5, 3]], np.int64), "b": np.array([[2, 2, 2]], np.int64)}
    calls: dict[str, dict[str, Any]] = {}
    for target in ("gateway", "worker"):
        calls[f"{target}/top3"] = _infer(target, "scores", "FP32", {"inp": SCORES}, {"out": 3})
        calls[f"{target}/all"] = _infer(target, "scores", "FP32", {"inp": SCORES}, {"out": 100})
        calls[f"{target}/plain"] = _infer(target, "plain", "INT32", {"inp": ints}, {"out": 2})
        calls[f"{target}/fixed"] = _infer(
            target, "fixed", "FP16", {"inp": np.array([[1, 2, 3], [6, 5, 4]], np.float16)}, {"out": 2}
        )
        calls[f"{target}/two"] = _infer(target, "two", "INT64", pair, {"sum": 1, "prod": 0})
        calls[f"{target}/negative"] = _infer(target, "scores", "FP32", {"inp": SCORES}, {"out": -1})
        calls[f"{target}/bool"] = _infer(target, "flags", "BOOL", {"inp": np.array([[True, False]])}, {"out": 1})
    calls["gateway/metadata"] = {"op": "server_metadata", "target": "gateway"}
    results = await tritonclient_calls({"gateway": suite.gateway_address, "worker": direct}, calls)

    for target in ("gateway", "worker"):
        top3 = _ok(results, f"{target}/top3")["out"]
        assert top3["shape"] == [2, 3]
        assert _strings(top3) == TOP3
        every = _ok(results, f"{target}/all")["out"]
        assert every["shape"] == [2, 5]
        assert _strings(every)[1] == ["5.000000:0:cat", "4.000000:1", "3.000000:2:dog", "2.000000:3", "1.000000:4"]
        assert _strings(_ok(results, f"{target}/plain")["out"]) == [["9:2", "3:0"]]
        fixed = _ok(results, f"{target}/fixed")["out"]  # not batchable: the whole tensor is one row
        assert fixed["shape"] == [2]
        assert _strings(fixed) == ["6.000000:3", "5.000000:4"]
        two = _ok(results, f"{target}/two")
        assert _strings(two["sum"]) == [["7:1"]]
        assert two["prod"]["datatype"] == "INT64"
        assert two["prod"]["array"].tolist() == [[2, 10, 6]]
        message = "output 'out': parameter 'classification' (class_count) must be >= 1, got -1"
        assert results[f"{target}/negative"] == {"error": ("StatusCode.INVALID_ARGUMENT", message)}
        message = "output 'out': class_count needs a numeric output, not BOOL"
        assert results[f"{target}/bool"] == {"error": ("StatusCode.INVALID_ARGUMENT", message)}
    assert "classification" in _ok(results, "gateway/metadata")["extensions"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (pb.InferParameter(string_param="3"), "must be an int64_param, got string_param"),
        (pb.InferParameter(uint64_param=3), "must be an int64_param, got uint64_param"),
        (pb.InferParameter(), "must be an int64_param, got no value"),
        (pb.InferParameter(int64_param=0), "must be >= 1, got 0"),
    ],
)
async def test_a_class_count_that_is_not_a_positive_int64_is_refused(
    suite: Suite, direct: str, value: pb.InferParameter, message: str
) -> None:
    await suite.push("scores", identity_model(TensorProto.FLOAT, ["batch", 5]))
    request = pb.ModelInferRequest(model_name="scores")
    request.inputs.add(name="inp", datatype="FP32", shape=[2, 5])
    request.raw_input_contents.append(SCORES.tobytes())
    request.outputs.add(name="out").parameters["classification"].CopyFrom(value)
    async with grpc.aio.insecure_channel(direct) as channel:
        for stub in (suite.inference, pb_grpc.GRPCInferenceServiceStub(channel)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == f"output 'out': parameter 'classification' (class_count) {message}"


async def test_other_output_parameters_are_still_refused(suite: Suite) -> None:
    await suite.push("scores", identity_model(TensorProto.FLOAT, ["batch", 5]))
    request = pb.ModelInferRequest(model_name="scores")
    request.inputs.add(name="inp", datatype="FP32", shape=[2, 5])
    request.raw_input_contents.append(SCORES.tobytes())
    output = request.outputs.add(name="out")
    output.parameters["classification"].int64_param = 2
    output.parameters["top_p"].int64_param = 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.inference.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("output 'out': parameter 'top_p' is not supported")


async def test_class_labels_are_limited(suite: Suite) -> None:
    model = identity_model(TensorProto.FLOAT, ["batch", 5])
    await suite.registry.create_model("scores")
    too_many = ("x",) * (MAX_CLASS_LABELS + 1)
    with pytest.raises(InvalidArgument, match=f"class_labels has {MAX_CLASS_LABELS + 1} labels, at most"):
        await suite.registry.upload_version("scores", model, class_labels=too_many)
    too_big = ("é" * (MAX_CLASS_LABEL_BYTES // 4), "é" * (MAX_CLASS_LABEL_BYTES // 4), "!")
    with pytest.raises(InvalidArgument, match=f"class_labels hold {MAX_CLASS_LABEL_BYTES + 1} bytes of UTF-8"):
        await suite.registry.upload_version("scores", model, class_labels=too_big)
    assert await suite.registry.list_versions("scores") == []


async def test_cli_pushes_a_labels_file_and_shows_the_count(suite: Suite, tmp_path: Any) -> None:
    model_file, labels_file = tmp_path / "scores.onnx", tmp_path / "labels.txt"
    model_file.write_bytes(identity_model(TensorProto.FLOAT, ["batch", 5]))
    labels_file.write_text("cat\r\n\r\ndog\n", encoding="utf-8")
    env = {"MAAS_REGISTRY": suite.registry_address}
    runner = CliRunner()
    push = ["models", "push", str(model_file), "--name", "scores", "--labels", str(labels_file), "--no-deploy"]
    pushed = await asyncio.to_thread(runner.invoke, app, push, env=env)
    assert pushed.exit_code == 0, pushed.output
    assert "pushed model 'scores' version 1" in pushed.output
    assert "3 class labels" in pushed.output
    assert (await suite.registry.get_version("scores", 1)).class_labels == LABELS
    shown = await asyncio.to_thread(runner.invoke, app, ["models", "show", "scores"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "3 class labels" in " ".join(shown.output.split())  # rich wraps long lines
    labels_file.write_bytes(b"\xff\n")
    refused = await asyncio.to_thread(runner.invoke, app, push, env=env)
    assert refused.exit_code == 2
    assert "Invalid value for --labels: not UTF-8 text" in refused.output
