"""Multi-file model versions (bundles): pushed as a directory or a tar, validated, served, pulled.

The weights live in an external-data file larger than the registry's gRPC message limit (2 MiB
here), so only the chunked, file-by-file paths can carry them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY as METRICS

from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.client.aio import AsyncMaasClient
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import InvalidArgument
from services.inference.worker import _cache_path
from tests.integration.suite import Suite, run_cli
from tests.models import affine_model

_MIB = 1024 * 1024
WEIGHTS_BYTES = 6 * _MIB
"""The external-data file: three times the registry's message limit, six download chunks."""
WEIGHT = 0.5
REGISTRY = {
    "max_message_bytes": 2 * _MIB,
    "chunk_bytes": _MIB,
    "max_bundle_files": 8,
    "max_bundle_file_bytes": 16 * _MIB,
    "max_bundle_bytes": 20 * _MIB,
}


def save_bundle(root: Path, weights_bytes: int = WEIGHTS_BYTES, location: str = "weights.bin") -> Path:
    """Write y = x + sum(w) with w (``weights_bytes`` of 0.5s) in an external-data file, plus extra files."""
    count = weights_bytes // 4
    weights = numpy_helper.from_array(np.full(count, WEIGHT, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "external", [x], [y], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    root.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, str(root / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
        location=location, size_threshold=0,
    )  # fmt: skip
    (root / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "labels.txt").write_text("a\nb\n")
    return root


def expected_sum(weights_bytes: int = WEIGHTS_BYTES) -> float:
    return WEIGHT * (weights_bytes // 4)


def relink(root: Path, location: str) -> None:
    """Point the model's external data at ``location`` (the data file itself is left as it is)."""
    model = onnx.load(str(root / "model.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    (root / "model.onnx").write_bytes(model.SerializeToString())


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path, registry=REGISTRY).start()
    yield running
    await running.stop()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return save_bundle(tmp_path / "bundle")


async def test_directory_bundle_is_served_and_pulled_resumably(suite: Suite, bundle: Path, tmp_path: Path) -> None:
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version = await client.push("big", bundle)
        assert version.entry_point == "model.onnx"
        assert [(f.path, f.size_bytes) for f in version.files] == [
            ("config/labels.txt", 4), ("model.onnx", (bundle / "model.onnx").stat().st_size),
            ("tokenizer.json", 26), ("weights.bin", WEIGHTS_BYTES),
        ]  # fmt: skip
        assert version.size_bytes == sum(f.size_bytes for f in version.files)
        await client.deploy("big", version.version)
        assert suite.worker is not None
        await suite.worker.reconcile()
        result = await client.infer("big", {"x": np.ones((2, 4), np.float32)})
        assert result["y"].tolist() == [[1 + expected_sum()] * 4] * 2

        pulled = tmp_path / "pulled"
        await client.pull("big", pulled)
        for file in version.files:
            assert (pulled / file.path).read_bytes() == (bundle / file.path).read_bytes()
        (pulled / "tokenizer.json").unlink()
        (pulled / "config" / "labels.txt").write_text("corrupted")
        received: list[tuple[int, int]] = []
        await client.pull("big", pulled, progress=lambda done, total: received.append((done, total)))
    assert received[-1] == (26 + 4, 26 + 4)  # only the two missing files came again, not the weights
    assert (pulled / "tokenizer.json").read_bytes() == (bundle / "tokenizer.json").read_bytes()
    assert (pulled / "config" / "labels.txt").read_text() == "a\nb\n"


async def test_tar_bundle_is_extracted_and_validated(suite: Suite, bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "model.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname=".")
    await suite.registry.create_model("tarred")
    version = await suite.registry.upload_tar("tarred", archive)
    assert version.entry_point == "model.onnx"
    assert {f.path for f in version.files} == {"model.onnx", "weights.bin", "tokenizer.json", "config/labels.txt"}
    assert [s.name for s in version.inputs] == ["x"]
    weights = next(f for f in version.files if f.path == "weights.bin")
    assert weights.sha256 == hashlib.sha256((bundle / "weights.bin").read_bytes()).hexdigest()


BAD_TARS = {
    "absolute": ([(member("/etc/model.onnx"), b"x")], "/etc/model.onnx"),
    "dotdot": ([(member("../model.onnx"), b"x")], "../model.onnx"),
    "symlink": ([(member("model.onnx", tarfile.SYMTYPE, "/etc/passwd"), b"")], "symbolic link"),
    "hardlink": ([(member("model.onnx", tarfile.LNKTYPE, "x"), b"")], "hard link"),
    "device": ([(member("model.onnx", tarfile.CHRTYPE), b"")], "device or fifo"),
    "fifo": ([(member("model.onnx", tarfile.FIFOTYPE), b"")], "device or fifo"),
    "too many files": ([(member(f"f{i}.txt"), b"x") for i in range(9)], "more than 8 files"),
    "too big": ([(member("model.onnx"), b"x" * (17 * _MIB))], "tar member 'model.onnx' has 17825792 bytes"),
    "duplicate": ([(member("model.onnx"), b"x"), (member("./model.onnx"), b"y")], "'model.onnx' appears twice"),
}


@pytest.mark.parametrize("case", BAD_TARS)
async def test_unsafe_tars_are_refused_naming_the_member(suite: Suite, tmp_path: Path, case: str) -> None:
    members, named = BAD_TARS[case]
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_of(members))
    await suite.registry.create_model("bad")
    with pytest.raises(InvalidArgument, match="tar") as raised:
        await suite.registry.upload_tar("bad", archive)
    assert named in raised.value.message
    assert not any((suite.data_dir / "blobs" / ".tmp").iterdir())  # nothing left staged


def bundle_requests(root: Path, tamper: str = "") -> Iterator[registry_pb2.UploadVersionRequest]:
    """A BUNDLE upload of ``root``'s files; the file named ``tamper`` is announced with a wrong sha256."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    files = [
        registry_pb2.BundleFile(
            path=p.relative_to(root).as_posix(), size_bytes=p.stat().st_size,
            sha256=("0" * 64) if p.name == tamper else hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in paths
    ]  # fmt: skip
    header = registry_pb2.UploadVersionHeader(
        model="m", size_bytes=sum(f.size_bytes for f in files), format=registry_pb2.ARTIFACT_FORMAT_BUNDLE, files=files
    )
    yield registry_pb2.UploadVersionRequest(header=header)
    for file, path in zip(files, paths, strict=True):
        yield registry_pb2.UploadVersionRequest(file=file)
        data = path.read_bytes()
        for offset in range(0, len(data), _MIB):
            yield registry_pb2.UploadVersionRequest(chunk=data[offset : offset + _MIB])


async def upload_raw(suite: Suite, requests: Iterator[registry_pb2.UploadVersionRequest]) -> str:
    import grpc

    stub = registry_pb2_grpc.ModelRegistryStub(suite.registry._channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.UploadVersion(iter(requests))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(raised.value.details())


async def test_a_sha256_mismatch_is_refused_naming_the_file(suite: Suite, bundle: Path) -> None:
    await suite.registry.create_model("m")
    details = await upload_raw(suite, bundle_requests(bundle, tamper="weights.bin"))
    assert "sha256 mismatch in file 'weights.bin'" in details


@pytest.mark.parametrize(
    ("location", "reason"),
    [("../weights.bin", "outside the upload"), ("absent.bin", "which is not a file of the bundle")],
)
async def test_external_data_outside_the_bundle_is_refused(
    suite: Suite, bundle: Path, location: str, reason: str
) -> None:
    relink(bundle, location)
    await suite.registry.create_model("m")
    with pytest.raises(InvalidArgument, match=reason):
        await suite.registry.upload_bundle("m", bundle)


async def test_bundle_paths_and_entry_points_are_checked(suite: Suite, bundle: Path) -> None:
    await suite.registry.create_model("m")
    (bundle / "second.onnx").write_bytes(affine_model())
    with pytest.raises(InvalidArgument, match=r"exactly one \.onnx file"):
        await suite.registry.upload_bundle("m", bundle)
    version = await suite.registry.upload_bundle("m", bundle, entry_point="second.onnx")
    assert version.entry_point == "second.onnx"
    with pytest.raises(InvalidArgument, match=r"entry_point 'weights\.bin' is not an \.onnx file"):
        await suite.registry.upload_bundle("m", bundle, entry_point="weights.bin")
    (bundle / "weights.bin.part").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match=r"'weights\.bin\.part' is where a download keeps 'weights\.bin'"):
        await suite.registry.upload_bundle("m", bundle, entry_point="second.onnx")


async def test_a_refused_upload_answers_its_status_even_while_the_client_is_still_sending(
    suite: Suite, tmp_path: Path
) -> None:
    # The refusal (two .onnx files, no entry point) comes right after the header while the
    # client streams 16 MiB: each push must get that INVALID_ARGUMENT, not a racing write's INTERNAL.
    bundle = save_bundle(tmp_path / "large", weights_bytes=16 * _MIB)
    (bundle / "second.onnx").write_bytes(affine_model())
    await suite.registry.create_model("m")
    for _attempt in range(8):
        with pytest.raises(InvalidArgument, match=r"exactly one \.onnx file"):
            await suite.registry.upload_bundle("m", bundle)


async def test_upload_memory_stays_bounded(suite: Suite, tmp_path: Path) -> None:
    bundle = save_bundle(tmp_path / "large", weights_bytes=16 * _MIB)
    await suite.registry.create_model("m")
    tracemalloc.start()
    try:
        version = await suite.registry.upload_bundle("m", bundle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert version.size_bytes > 16 * _MIB
    assert peak < 8 * _MIB, f"the upload held {peak} bytes at its peak"


async def test_a_bundle_over_the_worker_budget_is_refused_in_status(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path, bundle: Path
) -> None:
    running = await Suite(redis_server.url, tmp_path, registry=REGISTRY).start(with_worker=False)
    try:
        worker = await running.start_worker(max_model_bytes=_MIB)
        await running.registry.create_model("big")
        version = await running.registry.upload_bundle("big", bundle)
        await running.registry.deploy("big", version.version)
        await worker.reconcile()
        await worker.beat()
        status = await running.registry.get_cluster_status()
        text_code, text, _ = await run_cli(running, "status")
        json_code, as_json, _ = await run_cli(running, "status", "--json")
    finally:
        await running.stop()
    assert worker.served_models == []
    refusal = (
        f"big:1: refused: {version.size_bytes} bytes of model files exceed this worker's memory budget of "
        f"{_MIB} bytes (max_model_bytes)"
    )
    (errors,) = [w.load_errors for w in status.workers]
    assert errors == (refusal,)
    assert (text_code, json_code) == (0, 0)
    assert f"not loaded {refusal}" in " ".join(text.split())  # the table wraps the cell over lines
    assert [w["load_errors"] for w in json.loads(as_json)["workers"]] == [[refusal]]


async def test_cli_pushes_a_directory_and_pulls_it_into_one(suite: Suite, bundle: Path, tmp_path: Path) -> None:
    code, out, err = await run_cli(suite, "models", "push", f"{bundle}/", "--name", "cli", "--no-deploy")
    assert code == 0, err
    assert "pushed model 'cli' version 1" in out
    code, out, err = await run_cli(suite, "models", "pull", "cli", "-o", str(tmp_path / "pulled"))
    assert code == 0, err
    assert (tmp_path / "pulled" / "weights.bin").read_bytes() == (bundle / "weights.bin").read_bytes()
    assert (tmp_path / "pulled" / "config" / "labels.txt").read_text() == "a\nb\n"


def sent_bytes() -> float:
    """File bytes the registry has sent by downloads so far (``maas_registry_download_bytes``)."""
    return METRICS.get_sample_value("maas_registry_download_bytes_total") or 0.0


def write_part(path: Path, data: bytes) -> None:
    """Leave ``data`` as ``path``'s partial file, as an interrupted download does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".part").write_bytes(data)


PARTS = {
    # the partial file -> the weights' bytes the registry sends again
    "half": (lambda w: w[: len(w) // 2], lambda w: len(w) - len(w) // 2),
    "whole, not yet renamed": (lambda w: w, lambda w: 0),
    "not a prefix": (lambda w: bytes(len(w) // 2), lambda w: len(w) - len(w) // 2 + len(w)),
}


@pytest.mark.parametrize("case", PARTS)
async def test_a_pull_resumes_a_cut_part_file_from_its_length(
    suite: Suite, bundle: Path, tmp_path: Path, case: str
) -> None:
    part_of, resent = PARTS[case]
    weights = (bundle / "weights.bin").read_bytes()
    pulled = tmp_path / "pulled"
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        await client.push("big", bundle)
        await client.pull("big", pulled)
        (pulled / "weights.bin").unlink()
        write_part(pulled / "weights.bin", part_of(weights))
        before = sent_bytes()
        await client.pull("big", pulled)
    assert sent_bytes() - before == resent(weights)  # a prefix is resumed; a wrong one is sent again whole
    assert (pulled / "weights.bin").read_bytes() == weights
    assert not (pulled / "weights.bin.part").exists()


async def test_a_worker_resumes_a_cut_download_in_its_cache(suite: Suite, bundle: Path) -> None:
    await suite.registry.create_model("big")
    version = await suite.registry.upload_bundle("big", bundle)
    assert suite.worker is not None and suite.worker_settings is not None
    cached = _cache_path(suite.worker_settings.cache_dir, version).parent
    weights = (bundle / "weights.bin").read_bytes()
    write_part(cached / "weights.bin", weights[: _MIB + 5])  # killed mid-download
    before = sent_bytes()
    await suite.registry.deploy("big", version.version)
    await suite.worker.reconcile()
    assert suite.worker.served_models == ["big:1"]
    assert sent_bytes() - before == version.size_bytes - (_MIB + 5)
    assert hashlib.sha256((cached / "weights.bin").read_bytes()).hexdigest() == hashlib.sha256(weights).hexdigest()


def single_file_model() -> bytes:
    """An .onnx file of three download chunks (its weights inside): y = x + sum(w)."""
    count = (5 * _MIB // 2) // 4
    weights = numpy_helper.from_array(np.full(count, WEIGHT, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "inline", [x], [y], initializer=[weights]))
    model.opset_import[0].version = 13
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("case", PARTS)
async def test_a_single_file_pull_resumes_a_cut_part_file_from_its_length(
    suite: Suite, tmp_path: Path, case: str
) -> None:
    part_of, resent = PARTS[case]
    model = single_file_model()
    await suite.registry.create_model("one")
    await suite.registry.upload_version("one", model)
    pulled = tmp_path / "out" / "one.onnx"
    write_part(pulled, part_of(model))
    before = sent_bytes()
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        await client.pull("one", pulled)
    assert sent_bytes() - before == resent(model)  # a prefix is resumed; a wrong one is sent again whole
    assert pulled.read_bytes() == model
    assert [path.name for path in pulled.parent.iterdir()] == ["one.onnx"]  # no partial or lock file left


async def test_a_single_file_download_cut_in_transit_keeps_its_part_and_the_next_one_resumes(
    suite: Suite, tmp_path: Path
) -> None:
    model = single_file_model()
    await suite.registry.create_model("one")
    await suite.registry.upload_version("one", model)
    dest = tmp_path / "cache" / "one.onnx"

    def cut(received: int, _total: int) -> None:
        raise ConnectionResetError(f"cut after {received} bytes")

    with pytest.raises(ConnectionResetError):
        await suite.registry.download_version("one", 1, dest, progress=cut)
    kept = dest.with_name("one.onnx.part").stat().st_size
    assert 0 < kept < len(model) and not dest.exists()
    seen: list[tuple[int, int]] = []
    await suite.registry.download_version("one", 1, dest, progress=lambda *p: seen.append(p))
    assert seen[-1] == (len(model) - kept, len(model) - kept)  # only the rest was asked for and received
    assert dest.read_bytes() == model
    assert [path.name for path in dest.parent.iterdir()] == ["one.onnx"]
    before = sent_bytes()
    await suite.registry.download_version("one", 1, dest)  # already in place: nothing is sent
    assert sent_bytes() == before


@pytest.mark.parametrize(
    ("paths", "offsets", "named"),
    [
        ([], {"weights.bin": WEIGHTS_BYTES + 1}, f"offset {WEIGHTS_BYTES + 1} of file 'weights.bin' is outside 0.."),
        ([], {"weights.bin": -1}, "offset -1 of file 'weights.bin' is outside 0.."),
        (["tokenizer.json"], {"weights.bin": 1}, "has no file 'weights.bin' in this download"),
    ],
)
async def test_an_offset_outside_its_file_is_refused_naming_the_path(
    suite: Suite, bundle: Path, paths: list[str], offsets: dict[str, int], named: str
) -> None:
    await suite.registry.create_model("big")
    await suite.registry.upload_bundle("big", bundle)
    stub = registry_pb2_grpc.ModelRegistryStub(suite.registry._channel)
    request = registry_pb2.DownloadVersionRequest(model="big", paths=paths, offsets=offsets)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.DownloadVersion(request):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in str(raised.value.details())


def file_sizes(root: Path) -> set[tuple[str, int]]:
    return {(p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file()}


async def test_a_tar_gz_bundle_is_pushed_and_served(suite: Suite, bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname=".")
    expected = file_sizes(bundle)
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version = await client.push("gz", archive)
        assert {(f.path, f.size_bytes) for f in version.files} == expected
        await client.deploy("gz", version.version)
        assert suite.worker is not None
        await suite.worker.reconcile()
        result = await client.infer("gz", {"x": np.ones((1, 4), np.float32)})
    assert result["y"].tolist() == [[1 + expected_sum()] * 4]


def mapped_bytes(path: Path) -> int:
    """Resident bytes of this process's memory mappings of the file at ``path`` (Linux smaps)."""
    resident, is_it = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            is_it = line.endswith(" " + str(path))
        elif is_it and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return resident


async def test_a_workers_bundle_weights_stay_memory_mapped(suite: Suite, tmp_path: Path) -> None:
    side = 1024  # a MatMul weight: what ORT would prepack into a private copy
    root = tmp_path / "matmul"
    root.mkdir()
    w = numpy_helper.from_array(np.full((side, side), 0.5, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", side])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True, location="weights.bin")
    await suite.registry.create_model("mm")
    version = await suite.registry.upload_bundle("mm", root)
    await suite.registry.deploy("mm", version.version)
    assert suite.worker is not None and suite.worker_settings is not None
    await suite.worker.reconcile()  # loads, then warms up: every page of the weights is read
    assert suite.worker.served_models == ["mm:1"]
    cached = _cache_path(suite.worker_settings.cache_dir, version).parent / "weights.bin"
    assert mapped_bytes(cached) == side * side * 4  # served from the file's pages, not a prepacked copy
