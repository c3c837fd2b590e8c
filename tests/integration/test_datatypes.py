"""Every KServe v2 datatype round-trips exactly, raw and typed, through the gateway and a worker's direct service.

One suite serves an Identity model per datatype for the whole module. tritonclient runs in one child
process (its bundled protobuf descriptors cannot share a process with MaaS's, see
tests/triton_probe.py) that makes every call of the module; each test then checks its own call.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
from onnx import TensorProto

from services.common.dtypes import DATATYPES
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import InvalidArgument
from services.common.grpc_server import GrpcServer
from services.common.redis_conn import create_redis
from services.inference.server import create_server
from services.inference.settings import InferenceSettings
from tests.integration.suite import Suite
from tests.models import identity_model

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TARGETS = ("gateway", "worker")
INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"


def _ints(np_type: type[np.integer[Any]]) -> npt.NDArray[Any]:
    info = np.iinfo(np_type)
    edges = [info.min, info.max, 0, 1, info.max - 1, info.min + 1 if info.min < 0 else 2]
    return np.array(edges, dtype=np_type).reshape(2, 3)


def _floats(np_type: type[np.floating[Any]]) -> npt.NDArray[Any]:
    info = np.finfo(np_type)
    edges = [info.min, info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0, np.nan, np.inf, -np.inf, 1 / 3]
    return np.array(edges, dtype=np_type).reshape(2, 5)


def _bytes(items: list[bytes]) -> npt.NDArray[np.object_]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(1, -1)


VALUES: dict[str, npt.NDArray[Any]] = {
    "BOOL": np.array([[True, False], [False, True]]),
    **{name: _ints(np.dtype(DATATYPES[name].numpy).type) for name in ("UINT8", "UINT16", "UINT32", "UINT64")},
    **{name: _ints(np.dtype(DATATYPES[name].numpy).type) for name in ("INT8", "INT16", "INT32", "INT64")},
    **{name: _floats(np.dtype(DATATYPES[name].numpy).type) for name in ("FP16", "FP32", "FP64")},
    # Empty elements, embedded and trailing NULs, multi-byte UTF-8, and one element past 64 KiB.
    "BYTES": _bytes([b"", b"\x00", b"a\x00b", b"end\x00", "é€😀".encode(), b"x" * 70_000]),
}
assert set(VALUES) == set(DATATYPES), "a datatype without a round-trip case"
NOT_UTF8 = _bytes([b"ok", b"\xff\xfe", b"\x80"])
OVERFLOWS = {"UINT8": 256, "UINT16": 65_536, "INT8": 128, "INT16": -32_769}

ROUND_TRIPS = [
    (dt, mode) for dt in DATATYPES for mode in ("raw", "typed") if mode == "raw" or DATATYPES[dt].contents_field
]

_CHILD = r"""
import pickle, sys
import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

def infer(client, call):
    array = call["array"]
    if call["datatype"] == "BF16":
        array = array.astype(ml_dtypes.bfloat16)
    tensor = grpcclient.InferInput("inp", list(array.shape), call["datatype"])
    if call["field"] is None:
        tensor.set_data_from_numpy(array)
    else:
        # tritonclient only sends raw contents: typed contents go into its request message directly.
        getattr(tensor._get_tensor().contents, call["field"]).extend(array.reshape(-1).tolist())
    result = client.infer(call["model"], [tensor], client_timeout=60)
    out = result.get_output("out")
    return {"datatype": out.datatype, "shape": list(out.shape), "array": result.as_numpy("out")}

calls, addresses = pickle.load(sys.stdin.buffer)
clients = {target: grpcclient.InferenceServerClient(address) for target, address in addresses.items()}
results = {}
for key, call in calls.items():
    try:
        results[key] = {"ok": infer(clients[call["target"]], call)}
    except InferenceServerException as exc:
        results[key] = {"error": (str(exc.status()), exc.message())}
for client in clients.values():
    client.close()
pickle.dump(results, sys.stdout.buffer)
"""


@dataclass
class Served:
    suite: Suite
    addresses: dict[str, str]


def _model(datatype: str) -> str:
    return f"id_{datatype.lower()}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """One suite for the module, an Identity model [batch, n] per datatype, and the worker's direct service."""
    suite = await Suite(redis_server.url, tmp_path_factory.mktemp("datatypes")).start()
    for name, dt in DATATYPES.items():
        await suite.push(_model(name), identity_model(dt.onnx, ["batch", "n"]))
    assert suite.worker is not None
    settings = InferenceSettings(port=0, redis_url=redis_server.url, registry_address=suite.registry_address)
    direct: GrpcServer = create_server(settings, suite.worker)
    await direct.server.start()
    yield Served(suite, {"gateway": suite.gateway_address, "worker": f"127.0.0.1:{direct.port}"})
    await direct.server.stop(None)
    await suite.stop()
    client = create_redis(redis_server.url, timeout_s=5)  # the next module expects an empty database
    await client.flushdb()
    await client.aclose()


def _call(target: str, model: str, datatype: str, array: npt.NDArray[Any], field: str | None) -> dict[str, Any]:
    return {"target": target, "model": model, "datatype": datatype, "array": array, "field": field}


def _calls() -> dict[str, dict[str, Any]]:
    calls: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        for name, mode in ROUND_TRIPS:
            field = DATATYPES[name].contents_field if mode == "typed" else None
            calls[f"{target}/{name}/{mode}"] = _call(target, _model(name), name, VALUES[name], field)
        calls[f"{target}/FP16/fp32_contents"] = _call(target, "id_fp16", "FP16", VALUES["FP16"], "fp32_contents")
        calls[f"{target}/not_utf8/raw"] = _call(target, "id_bytes", "BYTES", NOT_UTF8, None)
        calls[f"{target}/not_utf8/typed"] = _call(target, "id_bytes", "BYTES", NOT_UTF8, "bytes_contents")
        calls[f"{target}/bf16"] = _call(target, "id_fp32", "BF16", np.ones((1, 2), np.float32), None)
        for name, value in OVERFLOWS.items():
            array = np.array([[value]], dtype=object)
            calls[f"{target}/overflow/{name}"] = _call(
                target, _model(name), name, array, DATATYPES[name].contents_field
            )
    return calls


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def results(served: Served) -> dict[str, dict[str, Any]]:
    """Every call of the module, made by an unmodified tritonclient in one child process."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(90):
        stdout, stderr = await child.communicate(pickle.dumps((_calls(), served.addresses)))
    assert child.returncode == 0, f"tritonclient child failed: {stderr.decode()[-3000:]}"
    found: dict[str, dict[str, Any]] = pickle.loads(stdout)
    return found


def _ok(results: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    result = results[key]
    assert "ok" in result, f"{key}: {result}"
    value: dict[str, Any] = result["ok"]
    return value


def _error(results: dict[str, dict[str, Any]], key: str) -> tuple[str, str]:
    result = results[key]
    assert "error" in result, f"{key}: expected an error, got {result}"
    status, message = result["error"]
    return str(status), str(message)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("datatype", "mode"), ROUND_TRIPS)
async def test_datatype_round_trips_exactly(
    results: dict[str, dict[str, Any]], target: str, datatype: str, mode: str
) -> None:
    got = _ok(results, f"{target}/{datatype}/{mode}")
    want = VALUES[datatype]
    assert got["datatype"] == datatype
    assert got["shape"] == list(want.shape)
    array = got["array"]
    assert array.shape == want.shape
    if datatype == "BYTES":
        assert array.tolist() == want.tolist()
    else:  # bit for bit: NaN, -0.0 and subnormals included
        assert array.dtype == want.dtype
        assert array.tobytes() == want.tobytes()


@pytest.mark.parametrize("target", TARGETS)
async def test_fp16_has_no_typed_contents(results: dict[str, dict[str, Any]], target: str) -> None:
    status, message = _error(results, f"{target}/FP16/fp32_contents")
    assert status == INVALID_ARGUMENT
    assert "input 'inp': FP16 tensors must be sent in raw_input_contents" in message


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode", ["raw", "typed"])
async def test_bytes_that_are_not_utf8_are_refused_naming_the_element(
    results: dict[str, dict[str, Any]], target: str, mode: str
) -> None:
    status, message = _error(results, f"{target}/not_utf8/{mode}")
    assert status == INVALID_ARGUMENT
    assert "input 'inp': BYTES element 1 is not UTF-8 text (byte 0 is 0xff)" in message
    assert "UINT8" in message


@pytest.mark.parametrize("target", TARGETS)
async def test_bf16_request_is_refused_with_the_reason(results: dict[str, dict[str, Any]], target: str) -> None:
    status, message = _error(results, f"{target}/bf16")
    assert status == INVALID_ARGUMENT
    assert "datatype 'BF16' is not supported: the workers run ONNX Runtime's Python API" in message
    assert "use FP16 or FP32" in message


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("datatype", list(OVERFLOWS))
async def test_typed_value_out_of_range_is_refused(
    results: dict[str, dict[str, Any]], target: str, datatype: str
) -> None:
    status, message = _error(results, f"{target}/overflow/{datatype}")
    assert status == INVALID_ARGUMENT
    assert f"input 'inp': a value in contents.{DATATYPES[datatype].contents_field} does not fit {datatype}" in message


async def test_bf16_model_is_refused_at_push(served: Served) -> None:
    registry = served.suite.registry
    await registry.create_model("bf16")
    with pytest.raises(InvalidArgument) as info:
        await registry.upload_version("bf16", identity_model(TensorProto.BFLOAT16, ["n"]))
    assert "input 'inp': ONNX type tensor(bfloat16) is not supported: the workers run ONNX Runtime" in (
        info.value.message
    )
