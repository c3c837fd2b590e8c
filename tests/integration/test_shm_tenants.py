"""System shared memory regions belong to the tenant whose key registered them.

Two tenants on one gateway (real servers, real Redis, real /dev/shm objects): tenant B neither
sees, uses, unregisters nor re-registers tenant A's region or object, and every refusal is the
answer a region or object that does not exist gets.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from services.common.auth import SCOPES, bearer
from services.common.embedded_redis import EmbeddedRedis
from tests.integration.suite import Suite
from tests.models import affine_model

SHM_DIR = Path("/dev/shm")
MODEL = "affine"
ROW = 4 * 4  # one [1, 4] FP32 tensor

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory objects live in /dev/shm (Linux)"),
]


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path, auth={"auth_failures_burst": 100_000}).start()
    await running.push(MODEL, affine_model())  # a system model: every tenant may call it
    yield running
    await running.stop()


@pytest.fixture
async def keys(suite: Suite) -> dict[str, tuple[tuple[str, str], ...]]:
    """Call metadata of ``a`` and ``b`` (two tenants' keys, no admin scope) and ``system`` (the admin)."""
    made = {"system": bearer(suite.admin_key)}
    for tenant in ("team-a", "team-b"):
        await suite.registry.create_tenant(tenant)
        key = (await suite.registry.create_api_key(tenant, "k", [s for s in SCOPES if s != "admin"]))[1]
        made[tenant[-1]] = bearer(key)
    return made


@pytest.fixture
def objects() -> Iterator[dict[str, str]]:
    """Two shared memory objects, ``a`` holding [1, 2, 3, 4] and ``b`` holding [10, 20, 30, 40]: their keys."""
    made = {}
    for name, values in (("a", [1, 2, 3, 4]), ("b", [10, 20, 30, 40])):
        key = f"/maas-test-{uuid.uuid4().hex[:12]}-{name}"
        (SHM_DIR / key[1:]).write_bytes(np.array(values, np.float32).tobytes() + bytes(ROW))  # input, then output
        made[name] = key
    yield made
    for key in made.values():
        (SHM_DIR / key[1:]).unlink(missing_ok=True)


def _call(region: str) -> pb.ModelInferRequest:
    """Call y = 2x + 1 with x read from ``region`` at 0 and y written to it at ROW."""
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = ROW
    output = request.outputs.add(name="y")
    output.parameters["shared_memory_region"].string_param = region
    output.parameters["shared_memory_byte_size"].int64_param = ROW
    output.parameters["shared_memory_offset"].int64_param = ROW
    return request


async def _failure(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code(), caught.value.details() or ""


async def _names(suite: Suite, metadata: tuple[tuple[str, str], ...]) -> list[str]:
    reply = await suite.inference.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=metadata)
    return sorted(reply.regions)


def _output(key: str) -> list[float]:
    return np.frombuffer((SHM_DIR / key[1:]).read_bytes()[ROW:], np.float32).tolist()


async def test_regions_are_per_tenant(
    suite: Suite, keys: dict[str, tuple[tuple[str, str], ...]], objects: dict[str, str]
) -> None:
    register, stub = pb.SystemSharedMemoryRegisterRequest, suite.inference
    await stub.SystemSharedMemoryRegister(register(name="r", key=objects["a"], byte_size=2 * ROW), metadata=keys["a"])
    assert await _names(suite, keys["a"]) == ["r"]
    assert await _names(suite, keys["b"]) == []
    # B naming A's region: the answers of a region that is not registered at all
    status_b = await _failure(
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="r"), metadata=keys["b"])
    )
    infer_b = await _failure(stub.ModelInfer(_call("r"), metadata=keys["b"]))
    assert infer_b[0] == grpc.StatusCode.NOT_FOUND and "shared memory region 'r' is not registered" in infer_b[1]
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="r"), metadata=keys["b"])
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=keys["b"])  # "all"
    assert await _names(suite, keys["a"]) == ["r"]  # B's unregisters left A's region alone
    # B may use the same name for its own region; each call reads and writes its own tenant's
    await stub.SystemSharedMemoryRegister(register(name="r", key=objects["b"], byte_size=2 * ROW), metadata=keys["b"])
    await stub.ModelInfer(_call("r"), metadata=keys["a"])
    await stub.ModelInfer(_call("r"), metadata=keys["b"])
    assert _output(objects["a"]) == [3.0, 5.0, 7.0, 9.0]
    assert _output(objects["b"]) == [21.0, 41.0, 61.0, 81.0]
    # the global administrator lists every tenant's regions, others' as <tenant>/<name>
    assert await _names(suite, keys["system"]) == ["team-a/r", "team-b/r"]
    # once A's region is gone, B's earlier answers are what a missing region gets, byte for byte
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=keys["b"])
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="r"), metadata=keys["a"])
    assert await _names(suite, keys["system"]) == []
    await stub.SystemSharedMemoryRegister(register(name="r", key=objects["a"], byte_size=2 * ROW), metadata=keys["a"])
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="r"), metadata=keys["a"])
    assert status_b == await _failure(
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="r"), metadata=keys["b"])
    )
    assert infer_b == await _failure(stub.ModelInfer(_call("r"), metadata=keys["b"]))


async def test_another_tenants_object_answers_as_a_missing_one(
    suite: Suite, keys: dict[str, tuple[tuple[str, str], ...]], objects: dict[str, str]
) -> None:
    register, stub = pb.SystemSharedMemoryRegisterRequest, suite.inference
    await stub.SystemSharedMemoryRegister(register(name="r", key=objects["a"], byte_size=2 * ROW), metadata=keys["a"])
    taken = await _failure(
        stub.SystemSharedMemoryRegister(register(name="s", key=objects["a"], byte_size=ROW), metadata=keys["b"])
    )
    missing_key = "/maas-test-no-such-object"
    missing = await _failure(
        stub.SystemSharedMemoryRegister(register(name="s", key=missing_key, byte_size=ROW), metadata=keys["b"])
    )
    assert taken == (missing[0], missing[1].replace(missing_key, objects["a"]))
    assert taken[0] == grpc.StatusCode.NOT_FOUND
    assert await _names(suite, keys["b"]) == []
    # the same tenant may map its object twice; once A lets go of it, B may register it
    await stub.SystemSharedMemoryRegister(register(name="r2", key=objects["a"], byte_size=ROW), metadata=keys["a"])
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=keys["a"])
    await stub.SystemSharedMemoryRegister(register(name="s", key=objects["a"], byte_size=ROW), metadata=keys["b"])
    assert await _names(suite, keys["b"]) == ["s"]
