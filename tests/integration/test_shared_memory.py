"""System shared memory (Triton's extension) through an unmodified tritonclient on the gateway's host.

tritonclient cannot share a process with MaaS's generated ``inference.*`` modules (see
tests/triton_probe.py), so this module is also the client: ``python -m
tests.integration.test_shared_memory URL SCENARIO PREFIX`` runs one scenario the way Triton's
``simple_grpc_shm_client.py`` does (its shared memory objects' keys start with PREFIX) and prints
what the client saw as JSON. The tests assert on that, and on what the gateway's own stub sees.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest

from tests.models import affine_model, two_io_model

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from services.common.embedded_redis import EmbeddedRedis
    from tests.integration.suite import Suite

SHM_DIR = Path("/dev/shm")
ROOT = Path(__file__).resolve().parents[2]
ROW = 3 * 8  # one [1, 3] INT64 tensor of two_io_model
NO_GPU = (
    "CUDA shared memory is not supported: the MaaS gateway has no GPU; "
    "use system shared memory or send tensors in the request"
)

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory objects live in /dev/shm (Linux)")


# ---------------------------------------------------------------------------------------------
# The client side (child process): tritonclient.grpc + tritonclient.utils.shared_memory.
# ---------------------------------------------------------------------------------------------


class _Client:
    """A tritonclient, the regions it created, and its calls' results or errors."""

    def __init__(self, url: str, prefix: str) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        self.grpc, self.shm, self.failure = grpcclient, shm, InferenceServerException
        self.client = grpcclient.InferenceServerClient(url)
        self.prefix = prefix
        self.handles: list[Any] = []

    def region(self, name: str, byte_size: int, *arrays: np.ndarray[Any, Any]) -> tuple[Any, str]:
        """Create a shared memory object (key /PREFIX_name) holding ``arrays`` one after the other."""
        key = f"/{self.prefix}_{name}"
        handle = self.shm.create_shared_memory_region(name, key, byte_size, create_only=True)
        self.handles.append(handle)
        if arrays:
            self.shm.set_shared_memory_region(handle, list(arrays))
        return handle, key

    def call(self, fn: Callable[[], Any]) -> dict[str, Any]:
        try:
            return {"ok": fn()}
        except self.failure as exc:
            return {"error": {"status": str(exc.status()), "message": exc.message()}}

    def status(self, name: str = "") -> Any:
        return self.call(lambda: self.client.get_system_shared_memory_status(name, as_json=True))

    def close(self) -> None:
        self.client.close()
        for handle in self.handles:
            self.shm.destroy_shared_memory_region(handle)

    def inputs(self, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> list[Any]:
        tensors = [self.grpc.InferInput("a", [1, 3], "INT64"), self.grpc.InferInput("b", [1, 3], "INT64")]
        tensors[0].set_data_from_numpy(a)
        tensors[1].set_data_from_numpy(b)
        return tensors

    def outputs(self) -> list[Any]:
        return [self.grpc.InferRequestedOutput("sum"), self.grpc.InferRequestedOutput("prod")]


def _read(c: _Client, handle: Any, offset: int = 0) -> list[list[int]]:
    return c.shm.get_contents_as_numpy(handle, np.int64, [1, 3], offset=offset).tolist()  # type: ignore[no-any-return]


def _raw_sizes(result: Any) -> list[int]:
    return [len(raw) for raw in result.get_response().raw_output_contents]


def _all_in_shared_memory(c: _Client) -> dict[str, Any]:
    a, b = np.array([[1, 2, 3]], np.int64), np.array([[10, 20, 30]], np.int64)
    _, in_key = c.region("input_data", 2 * ROW, a, b)
    out, out_key = c.region("output_data", 2 * ROW)
    c.client.register_system_shared_memory("input_data", in_key, 2 * ROW)
    c.client.register_system_shared_memory("output_data", out_key, 2 * ROW)
    inputs, outputs = c.inputs(a, b), c.outputs()
    inputs[0].set_shared_memory("input_data", ROW)
    inputs[1].set_shared_memory("input_data", ROW, offset=ROW)
    outputs[0].set_shared_memory("output_data", ROW)
    outputs[1].set_shared_memory("output_data", ROW, offset=ROW)
    result = c.client.infer("two_io", inputs, outputs=outputs, client_timeout=30)
    seen = {
        "extensions": c.client.get_server_metadata(as_json=True)["extensions"],
        "status": c.status(),
        "response_outputs": [(o.name, list(o.shape)) for o in result.get_response().outputs],
        "raw_sizes": _raw_sizes(result),
        "sum": _read(c, out),
        "prod": _read(c, out, ROW),
    }
    c.client.unregister_system_shared_memory()
    seen["status_after"] = c.status()
    return seen


def _mixed(c: _Client) -> dict[str, Any]:
    a, b = np.array([[1, 2, 3]], np.int64), np.array([[4, 5, 6]], np.int64)
    handle, in_key = c.region("in", 4096 + ROW)
    c.shm.set_shared_memory_region(handle, [a], offset=4096)
    out, out_key = c.region("out", ROW)
    c.client.register_system_shared_memory("in", in_key, ROW, offset=4096)
    c.client.register_system_shared_memory("out", out_key, ROW)
    inputs, outputs = c.inputs(a, b), c.outputs()
    inputs[0].set_shared_memory("in", ROW)
    outputs[0].set_shared_memory("out", ROW)
    result = c.client.infer("two_io", inputs, outputs=outputs, client_timeout=30)
    return {"sum": _read(c, out), "prod": result.as_numpy("prod").tolist(), "raw_sizes": _raw_sizes(result)}


def _stream(c: _Client) -> dict[str, Any]:
    a, b = np.array([[2, 2, 2]], np.int64), np.array([[3, 4, 5]], np.int64)
    _, in_key = c.region("in", 2 * ROW, a, b)
    out, out_key = c.region("out", 2 * ROW)
    c.client.register_system_shared_memory("in", in_key, 2 * ROW)
    c.client.register_system_shared_memory("out", out_key, 2 * ROW)
    inputs, outputs = c.inputs(a, b), c.outputs()
    inputs[0].set_shared_memory("in", ROW)
    inputs[1].set_shared_memory("in", ROW, offset=ROW)
    outputs[0].set_shared_memory("out", ROW)
    outputs[1].set_shared_memory("out", ROW, offset=ROW)
    answers: list[Any] = []
    c.client.start_stream(callback=lambda result, error: answers.append(error or result))
    c.client.async_stream_infer("two_io", inputs, outputs=outputs, request_id="s1")
    c.client.stop_stream()  # waits for the answers of the requests sent
    return {"answers": [type(x).__name__ for x in answers], "sum": _read(c, out), "prod": _read(c, out, ROW)}


def _status_and_unregister(c: _Client) -> dict[str, Any]:
    _, key = c.region("object", 64)
    c.client.register_system_shared_memory("first", key, 32)
    c.client.register_system_shared_memory("second", key, 16, offset=32)
    seen = {"all": c.status(), "second": c.status("second")}
    c.client.unregister_system_shared_memory("first")
    seen["after_one"] = c.status()
    seen["unknown"] = c.status("first")
    seen["unregister_unknown"] = c.call(lambda: c.client.unregister_system_shared_memory("first"))
    c.client.unregister_system_shared_memory()
    seen["after_all"] = c.status()
    return seen


def _infer_errors(c: _Client) -> dict[str, Any]:
    a, b = np.array([[1, 2, 3]], np.int64), np.array([[1, 1, 1]], np.int64)
    _, key = c.region("data", 2 * ROW, a, b)
    c.client.register_system_shared_memory("data", key, 2 * ROW)

    def infer(a_region: tuple[str, int, int] | None, sum_region: tuple[str, int, int] | None) -> Any:
        inputs, outputs = c.inputs(a, b), c.outputs()
        if a_region:
            inputs[0].set_shared_memory(a_region[0], a_region[1], offset=a_region[2])
        if sum_region:
            outputs[0].set_shared_memory(sum_region[0], sum_region[1], offset=sum_region[2])
        return c.call(lambda: c.client.infer("two_io", inputs, outputs=outputs, client_timeout=30).as_numpy("prod"))

    return {
        "unknown_region": infer(("nowhere", ROW, 0), None),
        "offset_out_of_range": infer(("data", ROW, 2 * ROW), None),
        "past_the_end": infer(("data", ROW, ROW + 8), None),
        "wrong_byte_size": infer(("data", ROW - 8, 0), None),
        "output_too_small": infer(None, ("data", ROW - 8, 0)),
        "still_works": c.call(lambda: infer(("data", ROW, 0), None)["ok"].tolist()),
    }


def _register_errors(c: _Client) -> dict[str, Any]:
    _, key = c.region("object", 64)
    register = c.client.register_system_shared_memory
    c.client.register_system_shared_memory("taken", key, 64)
    return {
        "twice": c.call(lambda: register("taken", key, 64)),
        "no_such_key": c.call(lambda: register("r1", f"/{c.prefix}_missing", 64)),
        "bad_key": c.call(lambda: register("r2", "/a/b", 64)),
        "too_large": c.call(lambda: register("r3", key, 64, offset=8)),
        "empty": c.call(lambda: register("r4", key, 0)),
        "cuda_status": c.call(lambda: c.client.get_cuda_shared_memory_status()),
        "cuda_register": c.call(lambda: c.client.register_cuda_shared_memory("g", b"aGFuZGxl", 0, 64)),
        "cuda_unregister": c.call(lambda: c.client.unregister_cuda_shared_memory()),
    }


SCENARIOS: dict[str, Callable[[_Client], dict[str, Any]]] = {
    "all_in_shared_memory": _all_in_shared_memory,
    "mixed": _mixed,
    "stream": _stream,
    "status_and_unregister": _status_and_unregister,
    "infer_errors": _infer_errors,
    "register_errors": _register_errors,
}


def main() -> None:
    url, scenario, prefix = sys.argv[1:4]
    client = _Client(url, prefix)
    try:
        seen = SCENARIOS[scenario](client)
    finally:
        client.close()
    json.dump(seen, sys.stdout)


# ---------------------------------------------------------------------------------------------
# The tests (pytest process): the suite in this event loop, the client in a child process.
# ---------------------------------------------------------------------------------------------


def _leftovers(prefix: str) -> list[Path]:
    return list(SHM_DIR.glob(f"{prefix}*"))


async def _client(suite: Suite, scenario: str) -> dict[str, Any]:
    prefix = f"maas_test_{uuid.uuid4().hex[:12]}"
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.test_shared_memory", suite.gateway_address, scenario, prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=90)
        assert process.returncode == 0, f"client failed: {err.decode()[-3000:]}"
        assert not await asyncio.to_thread(_leftovers, prefix), "the client left shared memory objects behind"
        result: dict[str, Any] = json.loads(out)
        return result
    finally:
        for path in await asyncio.to_thread(_leftovers, prefix):
            path.unlink()


def _error(code: str, *fragments: str) -> Callable[[dict[str, Any]], bool]:
    def check(result: dict[str, Any]) -> bool:
        error = result.get("error") or {}
        return error.get("status") == f"StatusCode.{code}" and all(f in error.get("message", "") for f in fragments)

    return check


async def test_inputs_and_outputs_in_shared_memory(suite: Suite) -> None:
    await suite.push("two_io", two_io_model())
    seen = await _client(suite, "all_in_shared_memory")
    assert "system_shared_memory" in seen["extensions"]
    regions = seen["status"]["ok"]["regions"]
    assert sorted(regions) == ["input_data", "output_data"]
    assert regions["input_data"]["byte_size"] == str(2 * ROW)
    assert regions["input_data"]["key"].endswith("_input_data")
    assert seen["sum"] == [[11, 22, 33]]
    assert seen["prod"] == [[10, 40, 90]]
    assert seen["response_outputs"] == [["sum", [1, 3]], ["prod", [1, 3]]]
    assert seen["raw_sizes"] == [0, 0]  # as Triton: an empty entry for each output written to a region
    assert seen["status_after"] == {"ok": {}}


async def test_one_input_and_one_output_in_shared_memory_at_an_offset(suite: Suite) -> None:
    await suite.push("two_io", two_io_model())
    seen = await _client(suite, "mixed")
    assert seen["sum"] == [[5, 7, 9]]
    assert seen["prod"] == [[4, 10, 18]]
    assert seen["raw_sizes"] == [0, ROW]


async def test_streamed_requests_use_shared_memory_too(suite: Suite) -> None:
    await suite.push("two_io", two_io_model())
    seen = await _client(suite, "stream")
    assert seen["answers"] == ["InferResult"]
    assert seen["sum"] == [[5, 6, 7]]
    assert seen["prod"] == [[6, 8, 10]]


async def test_status_and_unregister(suite: Suite) -> None:
    seen = await _client(suite, "status_and_unregister")
    assert sorted(seen["all"]["ok"]["regions"]) == ["first", "second"]
    second = seen["second"]["ok"]["regions"]["second"]
    assert (second["name"], second["offset"], second["byte_size"]) == ("second", "32", "16")
    assert sorted(seen["after_one"]["ok"]["regions"]) == ["second"]
    assert _error("NOT_FOUND", "'first'")(seen["unknown"])
    assert seen["unregister_unknown"] == {"ok": None}
    assert seen["after_all"] == {"ok": {}}


async def test_infer_errors_name_the_tensor_and_the_region(suite: Suite) -> None:
    await suite.push("two_io", two_io_model())
    seen = await _client(suite, "infer_errors")
    assert _error("NOT_FOUND", "input 'a'", "'nowhere'", "not registered")(seen["unknown_region"])
    assert _error("INVALID_ARGUMENT", "input 'a'", "shared_memory_offset 48 is out of range", "48 bytes")(
        seen["offset_out_of_range"]
    )
    assert _error("INVALID_ARGUMENT", "input 'a'", "beyond the end", "'data'")(seen["past_the_end"])
    assert _error("INVALID_ARGUMENT", "input 'a'", "16 bytes, expected 24")(seen["wrong_byte_size"])
    assert _error("INVALID_ARGUMENT", "output 'sum'", "24 bytes", "16 bytes", "'data'")(seen["output_too_small"])
    assert seen["still_works"] == {"ok": [[1, 2, 3]]}


async def test_register_errors_and_cuda_is_unimplemented(suite: Suite) -> None:
    seen = await _client(suite, "register_errors")
    assert _error("ALREADY_EXISTS", "'taken'")(seen["twice"])
    assert _error("NOT_FOUND", "_missing", "same host")(seen["no_such_key"])
    assert _error("INVALID_ARGUMENT", "'/a/b'")(seen["bad_key"])
    assert _error("INVALID_ARGUMENT", "offset 8 + byte_size 64", "(64 bytes)")(seen["too_large"])
    assert _error("INVALID_ARGUMENT", "byte_size must be > 0")(seen["empty"])
    for rpc in ("cuda_status", "cuda_register", "cuda_unregister"):
        assert _error("UNIMPLEMENTED", NO_GPU)(seen[rpc]), seen[rpc]


# ---------------------------------------------------------------------------------------------
# Through the gateway's own stub: what a region's life does to calls in flight.
# ---------------------------------------------------------------------------------------------


@contextmanager
def _shm_object(size: int) -> Iterator[tuple[str, mmap.mmap]]:
    path = SHM_DIR / f"maas_test_{uuid.uuid4().hex[:12]}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mapping:
            yield f"/{path.name}", mapping
    finally:
        os.close(fd)
        path.unlink()


def _affine_request(pb: Any, region: str) -> Any:
    def shm(offset: int) -> dict[str, Any]:
        return {
            "shared_memory_region": pb.InferParameter(string_param=region),
            "shared_memory_byte_size": pb.InferParameter(int64_param=16),
            "shared_memory_offset": pb.InferParameter(int64_param=offset),
        }

    return pb.ModelInferRequest(
        model_name="affine",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4], parameters=shm(0))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y", parameters=shm(16))],
    )


async def test_a_region_unregistered_while_its_call_is_queued_still_gets_the_output(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    from inference import grpc_service_pb2 as pb
    from services.common import keys
    from tests.integration.suite import Suite

    running = await Suite(redis_server.url, tmp_path).start(with_worker=False)
    try:
        version = await running.push("affine", affine_model())
        with _shm_object(32) as (key, mapping):
            mapping[:16] = np.array([1, 2, 3, 4], np.float32).tobytes()
            register = pb.SystemSharedMemoryRegisterRequest(name="io", key=key, byte_size=32)
            await running.inference.SystemSharedMemoryRegister(register, timeout=5)
            call = asyncio.ensure_future(running.inference.ModelInfer(_affine_request(pb, "io"), timeout=60))
            async with asyncio.timeout(30):
                while not await redis_client.xlen(keys.queue("affine", version)):
                    await asyncio.sleep(0.02)
            await running.inference.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=5)
            status = await running.inference.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5)
            assert dict(status.regions) == {}
            worker = await running.start_worker()
            await worker.reconcile()
            response = await call
            assert np.frombuffer(mapping[16:32], np.float32).tolist() == [3.0, 5.0, 7.0, 9.0]
            assert list(response.raw_output_contents) == [b""]
    finally:
        await running.stop()


async def test_an_object_that_shrank_is_refused_not_a_crash(suite: Suite) -> None:
    from inference import grpc_service_pb2 as pb

    await suite.push("affine", affine_model())
    with _shm_object(32) as (key, _mapping):
        register = pb.SystemSharedMemoryRegisterRequest(name="io", key=key, byte_size=32)
        await suite.inference.SystemSharedMemoryRegister(register, timeout=5)
        os.truncate(SHM_DIR / key.lstrip("/"), 8)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.inference.ModelInfer(_affine_request(pb, "io"), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "input 'x'" in (info.value.details() or "")
    assert "shrank to 8 bytes" in (info.value.details() or "")


def _malformed(pb: Any, case: str) -> Any:
    request = _affine_request(pb, "io")
    x, y = request.inputs[0], request.outputs[0]
    if case == "no_byte_size":
        del x.parameters["shared_memory_byte_size"]
    elif case == "no_region":
        del y.parameters["shared_memory_region"]
    elif case == "negative_offset":
        x.parameters["shared_memory_offset"].int64_param = -8
    elif case == "region_not_a_string":
        x.parameters["shared_memory_region"].int64_param = 1
    elif case == "contents_too":
        x.contents.fp32_contents.extend([1, 2, 3, 4])
    elif case == "class_count_too":
        y.parameters["classification"].int64_param = 1
    return request


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_byte_size", "input 'x': parameter 'shared_memory_byte_size' must be given along with"),
        ("no_region", "output 'y': parameter 'shared_memory_byte_size' cannot be given without"),
        ("negative_offset", "input 'x': parameter 'shared_memory_offset' is -8, expected a value >= 0"),
        ("region_not_a_string", "input 'x': parameter 'shared_memory_region' must be a non-empty string_param"),
        ("contents_too", "input 'x': contents are set, but its data is in shared memory"),
        ("class_count_too", "output 'y': 'shared_memory_region' and 'classification' cannot both be set"),
    ],
)
async def test_malformed_shared_memory_parameters_are_refused(suite: Suite, case: str, message: str) -> None:
    from inference import grpc_service_pb2 as pb

    await suite.push("affine", affine_model())
    with _shm_object(32) as (key, _mapping):
        register = pb.SystemSharedMemoryRegisterRequest(name="io", key=key, byte_size=32)
        await suite.inference.SystemSharedMemoryRegister(register, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.inference.ModelInfer(_malformed(pb, case), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


if __name__ == "__main__":
    main()
