"""The registry through a real gRPC server, a real Redis and a blob store in tmp_path."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto
from prometheus_client import REGISTRY

from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common import keys
from services.common.embedded_redis import EmbeddedRedis
from services.common.queue import QueuedRequest, Reply, now_ms
from services.common.redis_conn import create_redis
from services.registry.server import create_server, create_store
from services.registry.settings import RegistrySettings
from tests.models import affine_model, identity_model

pytestmark = pytest.mark.integration

AFFINE = affine_model()
DOWNLOAD_CHUNK_BYTES = 64
NAME_RULE = "expected 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"

Stub = registry_pb2_grpc.ModelRegistryStub


@asynccontextmanager
async def running_registry(redis: aioredis.Redis, data_dir: Path) -> AsyncIterator[Stub]:
    """Serve the registry on a free port and yield a stub on a real channel."""
    settings = RegistrySettings(host="127.0.0.1", port=0, data_dir=data_dir, chunk_bytes=DOWNLOAD_CHUNK_BYTES)
    store = create_store(settings, redis)
    handle = create_server(settings, store)
    await handle.server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            yield registry_pb2_grpc.ModelRegistryStub(channel)
    finally:
        await handle.server.stop(None)
        await store.close()


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
async def stub(redis_client: aioredis.Redis, blob_dir: Path) -> AsyncIterator[Stub]:
    async with running_registry(redis_client, blob_dir) as registry:
        yield registry


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def upload_messages(
    model: str,
    data: bytes,
    *,
    sha256: str | None = None,
    size_bytes: int | None = None,
    chunk_bytes: int = 100,
) -> list[registry_pb2.UploadVersionRequest]:
    header = registry_pb2.UploadVersionHeader(
        model=model,
        sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
        size_bytes=len(data) if size_bytes is None else size_bytes,
    )
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    return [
        registry_pb2.UploadVersionRequest(header=header),
        *(registry_pb2.UploadVersionRequest(chunk=chunk) for chunk in chunks),
    ]


async def upload(stub: Stub, model: str, data: bytes = AFFINE, **header: Any) -> registry_pb2.Version:
    response = await stub.UploadVersion(iter(upload_messages(model, data, **header)))
    return response.version


async def create(stub: Stub, name: str = "affine", description: str = "") -> registry_pb2.Model:
    response = await stub.CreateModel(registry_pb2.CreateModelRequest(name=name, description=description))
    return response.model


async def deploy(stub: Stub, model: str = "affine", **fields: Any) -> registry_pb2.Deployment:
    response = await stub.Deploy(registry_pb2.DeployRequest(model=model, **fields))
    return response.deployment


def staged_files(blob_dir: Path) -> list[Path]:
    return list((blob_dir / ".tmp").glob("*"))


def uploads_total(result: str) -> float:
    return REGISTRY.get_sample_value("maas_registry_uploads_total", {"result": result}) or 0.0


# Models


async def test_create_get_list_delete_model(stub: Stub) -> None:
    before_ms = now_ms()
    created = await create(stub, "resnet", "an image classifier")
    await create(stub, "alpha")

    assert created.name == "resnet"
    assert created.description == "an image classifier"
    assert created.latest_version == 0
    assert created.created_at_ms >= before_ms
    assert not created.HasField("deployment")
    got = (await stub.GetModel(registry_pb2.GetModelRequest(name="resnet"))).model
    assert got == created
    listed = (await stub.ListModels(registry_pb2.ListModelsRequest())).models
    assert [m.name for m in listed] == ["alpha", "resnet"]

    await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="resnet"))

    error = await rpc_error(stub.GetModel(registry_pb2.GetModelRequest(name="resnet")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 'resnet' not found"
    listed = (await stub.ListModels(registry_pb2.ListModelsRequest())).models
    assert [m.name for m in listed] == ["alpha"]


async def test_create_taken_name_is_already_exists(stub: Stub) -> None:
    await create(stub, "affine")

    error = await rpc_error(create(stub, "affine", "again"))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details() == "model 'affine' already exists"


@pytest.mark.parametrize("name", ["", "-dash-first", ".dot-first", "a" * 65, "with space", "a/b", "a:b", "naïve"])
async def test_invalid_model_name_is_invalid_argument(stub: Stub, name: str) -> None:
    error = await rpc_error(create(stub, name))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"model name '{name}' is invalid: {NAME_RULE}"


@pytest.mark.parametrize(
    ("name", "shown"), [("abc\n", "abc\\n"), ("a\x00b", "a\\x00b"), ("../x", "../x"), ("\uff41bc", "\uff41bc")]
)
async def test_names_with_newlines_nul_paths_or_look_alikes_are_refused(stub: Stub, name: str, shown: str) -> None:
    error = await rpc_error(create(stub, name))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"model name '{shown}' is invalid: {NAME_RULE}"
    listed = await stub.ListModels(registry_pb2.ListModelsRequest())
    assert not listed.models


async def test_delete_unknown_model_is_not_found(stub: Stub) -> None:
    error = await rpc_error(stub.DeleteModel(registry_pb2.DeleteModelRequest(name="ghost")))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 'ghost' not found"


async def test_delete_model_removes_versions_artifacts_and_deployment(stub: Stub, blob_dir: Path) -> None:
    await create(stub)
    await upload(stub, "affine")
    await deploy(stub)
    assert (blob_dir / "affine" / "1.onnx").read_bytes() == AFFINE

    await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="affine"))
    await create(stub)

    error = await rpc_error(stub.GetVersion(registry_pb2.GetVersionRequest(model="affine", version=1)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert not (blob_dir / "affine").exists()
    deployments = (await stub.ListDeployments(registry_pb2.ListDeploymentsRequest())).deployments
    assert list(deployments) == []
    assert (await upload(stub, "affine")).version == 1


# Uploads


async def test_upload_in_chunks_stores_version_with_signature(stub: Stub) -> None:
    await create(stub)
    ok_before = uploads_total("ok")

    version = await upload(stub, "affine", chunk_bytes=50)

    assert len(AFFINE) > 3 * 50
    assert version.model == "affine"
    assert version.version == 1
    assert version.sha256 == hashlib.sha256(AFFINE).hexdigest()
    assert version.size_bytes == len(AFFINE)
    assert version.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in version.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in version.outputs] == [("y", "FP32", [-1, 4])]
    assert uploads_total("ok") == ok_before + 1
    latest = await stub.GetVersion(registry_pb2.GetVersionRequest(model="affine", version=0))
    assert latest.version == version
    model = (await stub.GetModel(registry_pb2.GetModelRequest(name="affine"))).model
    assert model.latest_version == 1


async def test_second_upload_is_version_two(stub: Stub) -> None:
    await create(stub)
    first = await upload(stub, "affine")

    second = await upload(stub, "affine", affine_model(width=8))

    assert second.version == 2
    assert [list(t.shape) for t in second.inputs] == [[-1, 8]]
    versions = (await stub.ListVersions(registry_pb2.ListVersionsRequest(model="affine"))).versions
    assert [v.version for v in versions] == [1, 2]
    assert versions[0] == first
    latest = await stub.GetVersion(registry_pb2.GetVersionRequest(model="affine"))
    assert latest.version.version == 2


async def test_concurrent_uploads_get_distinct_versions(stub: Stub) -> None:
    await create(stub)

    versions = await asyncio.gather(*(upload(stub, "affine", affine_model(scale=i)) for i in range(5)))

    assert sorted(v.version for v in versions) == [1, 2, 3, 4, 5]
    by_number = {v.version: v.sha256 for v in versions}
    stored = (await stub.ListVersions(registry_pb2.ListVersionsRequest(model="affine"))).versions
    assert [(v.version, v.sha256) for v in stored] == sorted(by_number.items())
    model = (await stub.GetModel(registry_pb2.GetModelRequest(name="affine"))).model
    assert model.latest_version == 5


OTHER_SHA = hashlib.sha256(b"something else").hexdigest()


@pytest.mark.parametrize(
    ("header", "details"),
    [
        pytest.param(
            {"sha256": OTHER_SHA},
            f"sha256 mismatch: the header announced {OTHER_SHA}, the artifact has {hashlib.sha256(AFFINE).hexdigest()}",
            id="sha256",
        ),
        pytest.param(
            {"size_bytes": len(AFFINE) - 1},
            f"artifact is larger than the announced size_bytes {len(AFFINE) - 1}",
            id="more-bytes",
        ),
        pytest.param(
            {"size_bytes": len(AFFINE) + 10},
            f"artifact has {len(AFFINE)} bytes, but the header announced size_bytes {len(AFFINE) + 10}",
            id="fewer-bytes",
        ),
    ],
)
async def test_upload_not_matching_header_is_invalid_argument(
    stub: Stub, blob_dir: Path, header: dict[str, Any], details: str
) -> None:
    await create(stub)
    invalid_before = uploads_total("invalid")

    error = await rpc_error(upload(stub, "affine", **header))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(details)
    assert uploads_total("invalid") == invalid_before + 1
    versions = (await stub.ListVersions(registry_pb2.ListVersionsRequest(model="affine"))).versions
    assert list(versions) == []
    assert staged_files(blob_dir) == []


async def test_upload_of_corrupt_bytes_is_invalid_argument(stub: Stub, blob_dir: Path) -> None:
    await create(stub)

    error = await rpc_error(upload(stub, "affine", os.urandom(1000)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("artifact is not a loadable ONNX model: ")
    assert str(blob_dir) not in error.details()
    assert "\n" not in error.details()
    assert staged_files(blob_dir) == []
    model = (await stub.GetModel(registry_pb2.GetModelRequest(name="affine"))).model
    assert model.latest_version == 0


async def test_upload_with_unsupported_datatype_names_the_tensor(stub: Stub) -> None:
    await create(stub)

    error = await rpc_error(upload(stub, "affine", identity_model(TensorProto.BFLOAT16, ["n", 2])))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("input 'inp': ONNX type tensor(bfloat16) is not supported")


@pytest.mark.parametrize(
    ("header", "details"),
    [
        ({"sha256": "AB" * 32}, f"sha256 must be 64 lower-case hex characters, got '{'AB' * 32}'"),
        ({"sha256": "abc"}, "sha256 must be 64 lower-case hex characters, got 'abc'"),
        ({"size_bytes": 0}, f"size_bytes must be 1..{2 * 1024**3}, got 0"),
        ({"size_bytes": 2 * 1024**3 + 1}, f"size_bytes must be 1..{2 * 1024**3}, got {2 * 1024**3 + 1}"),
    ],
)
async def test_invalid_upload_header_is_invalid_argument(stub: Stub, header: dict[str, Any], details: str) -> None:
    await create(stub)

    error = await rpc_error(upload(stub, "affine", **header))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == details


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([registry_pb2.UploadVersionRequest(chunk=AFFINE)], id="chunk-first"),
        pytest.param([], id="empty-stream"),
    ],
)
async def test_upload_without_header_is_invalid_argument(
    stub: Stub, messages: list[registry_pb2.UploadVersionRequest]
) -> None:
    await create(stub)

    error = await rpc_error(stub.UploadVersion(iter(messages)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the first UploadVersion message must carry the header"


async def test_upload_with_second_header_is_invalid_argument(stub: Stub, blob_dir: Path) -> None:
    await create(stub)
    messages = upload_messages("affine", AFFINE)

    error = await rpc_error(stub.UploadVersion(iter([*messages[:2], messages[0], *messages[2:]])))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "only the first UploadVersion message may carry a header"
    assert staged_files(blob_dir) == []


async def test_upload_to_unknown_model_is_not_found(stub: Stub) -> None:
    error = await rpc_error(upload(stub, "ghost"))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 'ghost' not found"


# Versions and downloads


async def test_download_round_trip(stub: Stub) -> None:
    await create(stub)
    uploaded = await upload(stub, "affine")

    parts = [p async for p in stub.DownloadVersion(registry_pb2.DownloadVersionRequest(model="affine"))]

    assert parts[0].WhichOneof("part") == "version"
    assert parts[0].version == uploaded
    # A single-file version is a one-file bundle: its file message, then its chunks.
    assert parts[1].file == registry_pb2.BundleFile(path="model.onnx", size_bytes=len(AFFINE), sha256=uploaded.sha256)
    assert all(p.WhichOneof("part") == "chunk" for p in parts[2:])
    assert [len(p.chunk) for p in parts[2:-1]] == [DOWNLOAD_CHUNK_BYTES] * (len(parts) - 3)
    assert b"".join(p.chunk for p in parts[2:]) == AFFINE


@pytest.mark.parametrize(
    ("version", "code", "details"),
    [
        (0, grpc.StatusCode.NOT_FOUND, "model 'affine' has no versions"),
        (3, grpc.StatusCode.NOT_FOUND, "model 'affine' has no version 3"),
        (-1, grpc.StatusCode.INVALID_ARGUMENT, "version must be >= 0 (0 means the latest), got -1"),
    ],
)
async def test_missing_version_errors(stub: Stub, version: int, code: grpc.StatusCode, details: str) -> None:
    await create(stub)

    get_error = await rpc_error(stub.GetVersion(registry_pb2.GetVersionRequest(model="affine", version=version)))
    download = stub.DownloadVersion(registry_pb2.DownloadVersionRequest(model="affine", version=version))
    download_error = await rpc_error(download.read())

    for error in (get_error, download_error):
        assert error.code() == code
        assert error.details() == details


async def test_versions_of_unknown_model_are_not_found(stub: Stub) -> None:
    list_error = await rpc_error(stub.ListVersions(registry_pb2.ListVersionsRequest(model="ghost")))
    get_error = await rpc_error(stub.GetVersion(registry_pb2.GetVersionRequest(model="ghost", version=1)))

    for error in (list_error, get_error):
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "model 'ghost' not found"


# Deployments


async def test_deploy_defaults(stub: Stub) -> None:
    await create(stub)
    await upload(stub, "affine")
    await upload(stub, "affine")
    before_ms = now_ms()

    deployment = await deploy(stub)

    assert deployment.model == "affine"
    assert deployment.version == 2
    assert deployment.max_batch_size == 8
    assert deployment.max_wait_ms == 0
    assert deployment.pool == "default"
    assert deployment.max_queue_length == 1000
    assert deployment.updated_at_ms >= before_ms
    model = (await stub.GetModel(registry_pb2.GetModelRequest(name="affine"))).model
    assert model.deployment == deployment


async def test_deploy_explicit_values(stub: Stub) -> None:
    await create(stub)
    await upload(stub, "affine")
    await upload(stub, "affine")

    deployment = await deploy(
        stub, version=1, max_batch_size=1, max_wait_ms=5, pool="gpu-a100", max_queue_length=1_000_000
    )

    assert (deployment.version, deployment.max_batch_size, deployment.max_wait_ms) == (1, 1, 5)
    assert (deployment.pool, deployment.max_queue_length) == ("gpu-a100", 1_000_000)
    model = (await stub.GetModel(registry_pb2.GetModelRequest(name="affine"))).model
    assert model.deployment == deployment


@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be 1..1024, got 0"),
        ({"max_batch_size": 1025}, "max_batch_size must be 1..1024, got 1025"),
        ({"max_wait_ms": -1}, "max_wait_ms must be 0..1000, got -1"),
        ({"max_wait_ms": 1001}, "max_wait_ms must be 0..1000, got 1001"),
        ({"max_queue_length": 0}, "max_queue_length must be 1..1000000, got 0"),
        ({"max_queue_length": 1_000_001}, "max_queue_length must be 1..1000000, got 1000001"),
        ({"pool": ""}, f"pool '' is invalid: {NAME_RULE}"),
        ({"version": -2}, "version must be >= 0 (0 means the latest), got -2"),
    ],
)
async def test_deploy_out_of_range_is_invalid_argument(stub: Stub, fields: dict[str, Any], details: str) -> None:
    await create(stub)
    await upload(stub, "affine")

    error = await rpc_error(deploy(stub, **fields))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == details


async def test_deploy_without_versions_is_failed_precondition(stub: Stub) -> None:
    await create(stub)

    error = await rpc_error(deploy(stub))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "model 'affine' has no versions"


@pytest.mark.parametrize(
    ("model", "version", "details"),
    [("affine", 7, "model 'affine' has no version 7"), ("ghost", 0, "model 'ghost' not found")],
)
async def test_deploy_of_unknown_version_is_not_found(stub: Stub, model: str, version: int, details: str) -> None:
    await create(stub)
    await upload(stub, "affine")

    error = await rpc_error(deploy(stub, model, version=version))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == details


async def test_list_deployments_filters_by_pool(stub: Stub) -> None:
    for name, pool in (("b-model", "gpu"), ("a-model", "cpu"), ("c-model", "gpu")):
        await create(stub, name)
        await upload(stub, name)
        await deploy(stub, name, pool=pool)

    every = (await stub.ListDeployments(registry_pb2.ListDeploymentsRequest())).deployments
    gpu = (await stub.ListDeployments(registry_pb2.ListDeploymentsRequest(pool="gpu"))).deployments
    none = (await stub.ListDeployments(registry_pb2.ListDeploymentsRequest(pool="tpu"))).deployments

    assert [d.model for d in every] == ["a-model", "b-model", "c-model"]
    assert [d.model for d in gpu] == ["b-model", "c-model"]
    assert list(none) == []


async def test_redeploy_replaces_the_deployment(stub: Stub) -> None:
    await create(stub)
    await upload(stub, "affine")
    await deploy(stub, max_batch_size=4)

    await deploy(stub, max_batch_size=16)

    deployments = (await stub.ListDeployments(registry_pb2.ListDeploymentsRequest())).deployments
    assert [(d.model, d.max_batch_size) for d in deployments] == [("affine", 16)]


async def test_undeploy_fails_queued_requests(stub: Stub, redis_client: aioredis.Redis) -> None:
    await create(stub)
    await upload(stub, "affine")
    await deploy(stub)
    reply_stream, gone_stream, queue = keys.replies("gw-1"), keys.replies("gw-gone"), keys.queue("affine", 1)
    await redis_client.xadd(reply_stream, {"init": "1"})
    for request_id, reply_to in (("req-1", reply_stream), ("req-2", gone_stream)):
        request = QueuedRequest(id=request_id, reply_to=reply_to, deadline_ms=now_ms() + 60_000, payload=b"x")
        await redis_client.xadd(queue, request.to_fields())
    await redis_client.xadd(queue, {"garbage": "1"})

    await stub.Undeploy(registry_pb2.UndeployRequest(model="affine"))

    model = (await stub.GetModel(registry_pb2.GetModelRequest(name="affine"))).model
    assert not model.HasField("deployment")
    entries = await redis_client.xrange(reply_stream)
    replies = [Reply.from_fields(fields) for _id, fields in entries if b"code" in fields]
    assert replies == [
        Reply(id="req-1", code=grpc.StatusCode.UNAVAILABLE.value[0], message="model 'affine' version 1 was undeployed")
    ]
    assert not await redis_client.exists(queue)
    assert not await redis_client.exists(gone_stream)
    error = await rpc_error(stub.Undeploy(registry_pb2.UndeployRequest(model="affine")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 'affine' is not deployed"


async def test_delete_model_fails_queued_requests(stub: Stub, redis_client: aioredis.Redis) -> None:
    await create(stub)
    await upload(stub, "affine")
    await deploy(stub)
    reply_stream, queue = keys.replies("gw-1"), keys.queue("affine", 1)
    await redis_client.xadd(reply_stream, {"init": "1"})
    request = QueuedRequest(id="req-1", reply_to=reply_stream, deadline_ms=now_ms() + 60_000, payload=b"x")
    await redis_client.xadd(queue, request.to_fields())

    await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="affine"))

    _id, fields = (await redis_client.xrange(reply_stream))[-1]
    assert Reply.from_fields(fields).code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert not await redis_client.exists(queue)


async def test_changes_are_published_as_events(stub: Stub, redis_client: aioredis.Redis) -> None:
    await create(stub)
    await upload(stub, "affine")
    await deploy(stub)
    await stub.Undeploy(registry_pb2.UndeployRequest(model="affine"))
    await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="affine"))

    entries = await redis_client.xrange(keys.EVENTS)

    assert [(f[b"kind"], f[b"model"]) for _id, f in entries] == [
        (b"model_created", b"affine"),
        (b"version_uploaded", b"affine"),
        (b"deployed", b"affine"),
        (b"undeployed", b"affine"),
        (b"model_deleted", b"affine"),
    ]


# Faults


async def test_redis_unreachable_is_unavailable(tmp_path: Path) -> None:
    own_redis = EmbeddedRedis(tmp_path / "redis").start()
    client = create_redis(own_redis.url, timeout_s=1)
    try:
        async with running_registry(client, tmp_path / "blobs") as registry:
            await create(registry, "affine")
            own_redis.stop()

            create_error = await rpc_error(create(registry, "other"))
            get_error = await rpc_error(registry.GetModel(registry_pb2.GetModelRequest(name="affine")))
    finally:
        own_redis.stop()
        await client.aclose()

    for error in (create_error, get_error):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error.details() == "model store: redis unreachable"
