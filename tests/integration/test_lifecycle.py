"""Version lifecycle (issue 7, point 3), WatchEvents (point 5) and the CLI's --json, on a real registry and Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common import keys
from services.common.errors import FailedPrecondition, Unauthenticated
from services.common.registry_client import RegistryClient
from tests.integration.suite import Suite, run_cli
from tests.integration.test_redis_acl import AclRedis, _denials
from tests.integration.test_registry import rpc_error, running_registry, upload_messages
from tests.models import affine_model

pytestmark = pytest.mark.integration

AFFINE = affine_model()
Stub = registry_pb2_grpc.ModelRegistryStub


@pytest.fixture
async def stub(redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Stub]:
    async with running_registry(redis_client, tmp_path / "blobs") as registry:
        yield registry


async def push(stub: Stub, model: str, *, description: str = "", **labels: str) -> registry_pb2.Version:
    """Create ``model`` if needed and upload a version with a description and labels."""
    try:
        await stub.CreateModel(registry_pb2.CreateModelRequest(name=model))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
    messages = upload_messages(model, AFFINE)
    messages[0].header.description = description
    messages[0].header.labels.update(labels)
    return (await stub.UploadVersion(iter(messages))).version


async def list_all_models(stub: Stub, page_size: int, **filters: Any) -> tuple[list[str], int]:
    """Follow next_page_token to the end; return the names and the number of pages."""
    names: list[str] = []
    token, pages = "", 0
    while True:
        request = registry_pb2.ListModelsRequest(page_size=page_size, page_token=token, **filters)
        reply = await stub.ListModels(request)
        names += [model.name for model in reply.models]
        pages += 1
        token = reply.next_page_token
        if not token:
            return names, pages


# Push and update


async def test_push_records_description_labels_and_who_pushed(stub: Stub) -> None:
    version = await push(stub, "m", description="first cut", stage="dev", team="fraud")

    assert version.description == "first cut"
    assert dict(version.labels) == {"stage": "dev", "team": "fraud"}
    assert version.pushed_by == "anonymous"  # the registry checks no keys here
    got = (await stub.GetVersion(registry_pb2.GetVersionRequest(model="m", version=1))).version
    assert got == version


async def test_push_with_an_invalid_label_is_invalid_argument(stub: Stub) -> None:
    await stub.CreateModel(registry_pb2.CreateModelRequest(name="m"))
    for labels, expected in [
        ({"bad key": "v"}, "labels key 'bad key' is invalid"),
        ({"k": "x" * 257}, "labels 'k' has a value of 257 characters, at most 256 are allowed"),
        ({"k": "a\nb"}, "labels 'k' value 'a\\nb' has control characters"),
        ({f"k{i}": "v" for i in range(65)}, "labels has 65 labels, at most 64 are allowed"),
    ]:
        messages = upload_messages("m", AFFINE)
        messages[0].header.labels.update(labels)
        error = await rpc_error(stub.UploadVersion(iter(messages)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in (error.details() or "")
    messages = upload_messages("m", AFFINE)
    messages[0].header.description = "d" * 1025
    error = await rpc_error(stub.UploadVersion(iter(messages)))
    assert error.details() == "description has 1025 characters, at most 1024 are allowed"


async def test_update_version_sets_clears_and_removes(stub: Stub) -> None:
    await push(stub, "m", description="first", stage="dev", team="fraud")

    def update(**fields: Any) -> Any:
        return stub.UpdateVersion(registry_pb2.UpdateVersionRequest(model="m", version=1, **fields))

    changed = (await update(labels={"stage": "prod", "owner": "ana"}, remove_labels=["team"])).version
    assert changed.description == "first"  # unset: unchanged
    assert dict(changed.labels) == {"stage": "prod", "owner": "ana"}
    cleared = (await update(description="")).version
    assert cleared.description == ""
    assert dict(cleared.labels) == {"stage": "prod", "owner": "ana"}
    assert cleared.sha256 == changed.sha256 and cleared.pushed_by == "anonymous"
    stored = (await stub.GetVersion(registry_pb2.GetVersionRequest(model="m", version=1))).version
    assert stored == cleared


async def test_update_version_errors(stub: Stub) -> None:
    await push(stub, "m")
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        ({"model": "m", "version": 0}, grpc.StatusCode.INVALID_ARGUMENT, "version must be >= 1, got 0"),
        ({"model": "m", "version": 7}, grpc.StatusCode.NOT_FOUND, "model 'm' has no version 7"),
        ({"model": "ghost", "version": 1}, grpc.StatusCode.NOT_FOUND, "model 'ghost' not found"),
        ({"model": "bad name", "version": 1}, grpc.StatusCode.INVALID_ARGUMENT, "model name 'bad name' is invalid"),
        (
            {"model": "m", "version": 1, "labels": {"k": "v"}, "remove_labels": ["k"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "label 'k' is both in labels and in remove_labels",
        ),
        (
            {"model": "m", "version": 1, "remove_labels": ["no way"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "remove_labels key 'no way' is invalid",
        ),
    ]
    for fields, code, message in cases:
        error = await rpc_error(stub.UpdateVersion(registry_pb2.UpdateVersionRequest(**fields)))
        assert (error.code(), message in (error.details() or "")) == (code, True), error.details()


# Listing: filters and pages


async def test_list_models_pages_and_filters(stub: Stub) -> None:
    for name in ("a1", "a2", "a3", "a4", "a5", "b1"):
        await push(stub, name, stage="prod" if name in ("a2", "a5", "b1") else "dev")
    await push(stub, "a3", stage="prod")  # a second version of a3 carries the label

    names, pages = await list_all_models(stub, 2)
    assert (names, pages) == (["a1", "a2", "a3", "a4", "a5", "b1"], 3)
    assert await list_all_models(stub, 2, name_prefix="a") == (["a1", "a2", "a3", "a4", "a5"], 3)
    assert await list_all_models(stub, 2, labels={"stage": "prod"}) == (["a2", "a3", "a5", "b1"], 2)
    assert await list_all_models(stub, 0, name_prefix="a", labels={"stage": "prod"}) == (["a2", "a3", "a5"], 1)
    assert await list_all_models(stub, 0, labels={"stage": "none"}) == ([], 1)


async def test_list_models_refuses_a_bad_page_size_or_token(stub: Stub) -> None:
    await push(stub, "a1")
    await push(stub, "a2")
    first = await stub.ListModels(registry_pb2.ListModelsRequest(page_size=1))
    assert first.next_page_token
    bad_token = "page_token is invalid: pass the next_page_token of the previous page, with the same filters"
    for request, message in [
        (registry_pb2.ListModelsRequest(page_size=-1), "page_size must be 0..1000 (0 means 100), got -1"),
        (registry_pb2.ListModelsRequest(page_size=1001), "page_size must be 0..1000 (0 means 100), got 1001"),
        (registry_pb2.ListModelsRequest(page_token="not a token"), bad_token),
        (registry_pb2.ListModelsRequest(page_token="e30="), bad_token),  # valid base64 of "{}"
        (registry_pb2.ListModelsRequest(page_token=first.next_page_token, name_prefix="a"), bad_token),
        (registry_pb2.ListModelsRequest(labels={"bad key": "v"}), "labels key 'bad key' is invalid"),
    ]:
        error = await rpc_error(stub.ListModels(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (error.details() or ""), error.details()


async def test_list_versions_pages_and_filters(stub: Stub) -> None:
    for number in range(1, 6):
        await push(stub, "m", parity="even" if number % 2 == 0 else "odd")
    versions: list[int] = []
    token = ""
    while True:
        request = registry_pb2.ListVersionsRequest(model="m", page_size=2, page_token=token)
        reply = await stub.ListVersions(request)
        versions += [v.version for v in reply.versions]
        token = reply.next_page_token
        if not token:
            break
    assert versions == [1, 2, 3, 4, 5]
    odd = await stub.ListVersions(registry_pb2.ListVersionsRequest(model="m", labels={"parity": "odd"}))
    assert [v.version for v in odd.versions] == [1, 3, 5]
    await push(stub, "n")
    models_token = (await stub.ListModels(registry_pb2.ListModelsRequest(page_size=1))).next_page_token
    error = await rpc_error(stub.ListVersions(registry_pb2.ListVersionsRequest(model="m", page_token=models_token)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(stub.ListVersions(registry_pb2.ListVersionsRequest(model="ghost")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_the_client_reads_every_page(suite: Suite) -> None:
    for number in range(105):  # more than one default page (100)
        await suite.registry.create_model(f"m{number:03d}")
    assert len(await suite.registry.list_models()) == 105
    assert [m.name for m in await suite.registry.list_models(prefix="m10")] == [f"m{n}" for n in range(100, 105)]


# Deleting versions and models


async def test_delete_version_rules(stub: Stub, tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    await push(stub, "m")
    await push(stub, "m")
    await push(stub, "m")
    await stub.Deploy(registry_pb2.DeployRequest(model="m", version=2))

    def delete(version: int, model: str = "m") -> Any:
        return stub.DeleteVersion(registry_pb2.DeleteVersionRequest(model=model, version=version))

    serving = await rpc_error(delete(2))
    assert serving.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'm' version 2 serves traffic" in (serving.details() or "")
    for version, model, code, message in [
        (9, "m", grpc.StatusCode.NOT_FOUND, "model 'm' has no version 9"),
        (1, "ghost", grpc.StatusCode.NOT_FOUND, "model 'ghost' not found"),
        (0, "m", grpc.StatusCode.INVALID_ARGUMENT, "version must be >= 1, got 0"),
        (-1, "m", grpc.StatusCode.INVALID_ARGUMENT, "version must be >= 1, got -1"),
    ]:
        error = await rpc_error(delete(version, model))
        assert (error.code(), error.details()) == (code, message)

    assert (blob_dir / "m" / "3.onnx").exists()
    await delete(3)  # the latest: latest_version falls back to 2
    assert not (blob_dir / "m" / "3.onnx").exists()
    model = (await stub.GetModel(registry_pb2.GetModelRequest(name="m"))).model
    assert model.latest_version == 2
    assert (await rpc_error(delete(3))).code() == grpc.StatusCode.NOT_FOUND
    await stub.Undeploy(registry_pb2.UndeployRequest(model="m"))
    await delete(2)
    assert not (blob_dir / "m" / "2.onnx").exists()
    listed = await stub.ListVersions(registry_pb2.ListVersionsRequest(model="m"))
    assert [v.version for v in listed.versions] == [1]
    assert (await push(stub, "m")).version == 4  # numbers are never reused


async def test_delete_version_an_alias_points_to_is_failed_precondition(stub: Stub) -> None:
    await push(stub, "m")
    await push(stub, "m")
    await stub.SetAlias(registry_pb2.SetAliasRequest(model="m", alias="production", version=1))

    error = await rpc_error(stub.DeleteVersion(registry_pb2.DeleteVersionRequest(model="m", version=1)))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "model 'm' version 1 is the target of alias 'production': move or delete it first"
    await stub.SetAlias(registry_pb2.SetAliasRequest(model="m", alias="production", version=2))
    await stub.DeleteVersion(registry_pb2.DeleteVersionRequest(model="m", version=1))


async def test_delete_model_force(stub: Stub, redis_client: aioredis.Redis) -> None:
    await push(stub, "m")
    await stub.Deploy(registry_pb2.DeployRequest(model="m"))

    refused = await rpc_error(stub.DeleteModel(registry_pb2.DeleteModelRequest(name="m", force=False)))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details() == "model 'm' is deployed: undeploy it first (`maas undeploy m`) or delete with force"
    await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="m", force=True))
    assert not await redis_client.hexists(keys.DEPLOYMENTS, "m")
    assert (await rpc_error(stub.GetModel(registry_pb2.GetModelRequest(name="m")))).code() == grpc.StatusCode.NOT_FOUND
    kinds = [fields[b"kind"] for _id, fields in await redis_client.xrange(keys.EVENTS)]
    assert kinds[-2:] == [b"undeployed", b"model_deleted"]
    # Unset force: the behaviour from before the field (a deployed model is undeployed and deleted).
    await push(stub, "m")
    await stub.Deploy(registry_pb2.DeployRequest(model="m"))
    await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="m"))
    await push(stub, "n")
    await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="n", force=False))  # not deployed: fine


# WatchEvents


async def watch(stub: Stub, after_id: str, **fields: Any) -> list[registry_pb2.Event]:
    request = registry_pb2.WatchEventsRequest(after_id=after_id, **fields)
    return [reply.event async for reply in stub.WatchEvents(request, timeout=10)]


async def test_watch_events_from_a_position_in_order(stub: Stub, redis_client: aioredis.Redis) -> None:
    await push(stub, "m", stage="dev")
    await stub.Deploy(registry_pb2.DeployRequest(model="m"))
    await stub.UpdateVersion(registry_pb2.UpdateVersionRequest(model="m", version=1, description="x"))
    await push(stub, "n")

    every = await watch(stub, "0")

    assert [(e.kind, e.model, e.version) for e in every] == [
        ("model_created", "m", 0),
        ("version_uploaded", "m", 1),
        ("deployed", "m", 1),
        ("version_updated", "m", 1),
        ("model_created", "n", 0),
        ("version_uploaded", "n", 1),
    ]
    stored = [entry_id.decode() for entry_id, _ in await redis_client.xrange(keys.EVENTS)]
    assert [e.id for e in every] == stored
    assert all(abs(e.time_ms - time.time() * 1000) < 60_000 for e in every)
    assert [e.kind for e in await watch(stub, every[3].id)] == ["model_created", "version_uploaded"]
    assert [e.kind for e in await watch(stub, "0", model="n")] == ["model_created", "version_uploaded"]
    assert await watch(stub, "") == []  # from now on, and not following: nothing
    assert await watch(stub, every[-1].id) == []


async def test_watch_events_resumes_after_a_dropped_connection(suite: Suite) -> None:
    address = suite.registry_address
    channel = grpc.aio.insecure_channel(address)
    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    await push(stub, "m")
    received: list[registry_pb2.Event] = []
    follower = registry_pb2_grpc.ModelRegistryStub(channel)
    stream = follower.WatchEvents(registry_pb2.WatchEventsRequest(after_id="0", follow=True))
    async for reply in stream:
        received.append(reply.event)
        if len(received) == 2:
            break
    # Changes go on while the connection drops mid-stream (the stream was still open).
    writer = asyncio.create_task(_changes(suite))
    await asyncio.sleep(0.05)
    await channel.close()
    await writer

    async with grpc.aio.insecure_channel(address) as again:
        request = registry_pb2.WatchEventsRequest(after_id=received[-1].id, follow=True)
        stream = registry_pb2_grpc.ModelRegistryStub(again).WatchEvents(request)
        stored = [entry_id.decode() for entry_id, _ in await suite.redis.xrange(keys.EVENTS)]
        async with asyncio.timeout(10):
            async for reply in stream:
                received.append(reply.event)
                if len(received) == len(stored):
                    break
        stream.cancel()

    assert [e.id for e in received] == stored  # in order, no gap, no duplicate
    assert len(stored) > 5


async def _changes(suite: Suite) -> None:
    for number in range(3):
        version = await suite.registry.upload_version("m", AFFINE, labels={"n": str(number)})
        await suite.registry.deploy("m", version.version)


async def test_watch_events_positions_that_are_not_kept(stub: Stub, redis_client: aioredis.Redis) -> None:
    for _ in range(5):
        await push(stub, "m")
    ids = [entry_id.decode() for entry_id, _ in await redis_client.xrange(keys.EVENTS)]
    await redis_client.xtrim(keys.EVENTS, maxlen=2, approximate=False)  # what MAX_EVENTS trimming does, sooner

    trimmed = await rpc_error(watch(stub, ids[3]))
    assert trimmed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"after_id {ids[3]} is older than the oldest event kept ({ids[-2]}" in (trimmed.details() or "")
    future = await rpc_error(watch(stub, "99999999999999-0"))
    assert future.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is newer than the newest event" in (future.details() or "")
    for bad in ("abc", "1-2-3", "-1", "12345"):
        error = await rpc_error(watch(stub, bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"after_id '{bad}' is invalid" in (error.details() or "")
    error = await rpc_error(watch(stub, "0", model="bad name"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [e.id for e in await watch(stub, "0")] == ids[-2:]  # "0": from the oldest kept


async def test_the_client_watches_and_resumes(suite: Suite) -> None:
    await suite.registry.create_model("m")
    seen = [event async for event in suite.registry.watch_events("0")]
    await suite.registry.upload_version("m", AFFINE, description="d", labels={"k": "v"})
    more = [event async for event in suite.registry.watch_events(seen[-1].id)]
    assert [(e.kind, e.version) for e in more] == [("version_uploaded", 1)]
    with pytest.raises(FailedPrecondition):
        async for _event in suite.registry.watch_events("99999999999999-0"):
            pass


# Gateways and workers follow the events stream


@pytest.mark.serial  # a latency bound: tests running beside it would measure the machine
async def test_gateway_and_worker_react_to_a_deploy_within_100_ms(suite: Suite) -> None:
    await suite.push("m", AFFINE)
    request = pb.ModelMetadataRequest(name="m")
    assert (await suite.inference.ModelMetadata(request, timeout=5)).versions == ["1"]  # cached (30 s TTL)
    version = await suite.registry.upload_version("m", AFFINE)
    assert suite.worker is not None

    await suite.registry.deploy("m", version.version)
    deployed_at = time.monotonic()
    gateway_s = worker_s = None
    async with asyncio.timeout(5):
        while gateway_s is None or worker_s is None:
            if gateway_s is None and (await suite.inference.ModelMetadata(request, timeout=5)).versions == ["2"]:
                gateway_s = time.monotonic() - deployed_at
            if worker_s is None and "m:2" in suite.worker.served_models:
                worker_s = time.monotonic() - deployed_at
            await asyncio.sleep(0.005)

    assert gateway_s < 0.1 and worker_s < 0.1, (gateway_s, worker_s)


# CLI


async def test_cli_lifecycle_and_json(suite: Suite, tmp_path: Path) -> None:
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(AFFINE)

    async def cli(*args: str) -> str:
        code, stdout, stderr = await run_cli(suite, *args)
        assert code == 0, stderr
        return stdout

    push_args = ["models", "push", str(model_file), "--name", "fraud", "--description", "v1 of fraud"]
    await cli(*push_args, "--label", "stage=dev", "--label", "team=risk", "--no-deploy")
    await cli(*push_args, "--label", "stage=prod")
    await suite.registry.create_model("other")

    listed = json.loads(await cli("models", "ls", "--json", "--label", "stage=dev"))
    assert [m["name"] for m in listed] == ["fraud"]
    assert json.loads(await cli("models", "ls", "--json", "--prefix", "oth"))[0]["name"] == "other"
    shown = json.loads(await cli("models", "show", "fraud", "--json"))
    assert shown["description"] == "v1 of fraud" and shown["deployment"]["version"] == 2
    first = shown["versions"][0]
    assert (first["labels"], first["description"], first["pushed_by"]) == (
        {"stage": "dev", "team": "risk"},
        "v1 of fraud",
        "anonymous",
    )
    text = await cli("models", "show", "fraud")
    assert "pushed by anonymous" in text and "stage=dev, team=risk" in text

    update = ["models", "versions", "update", "fraud", "1", "--description", "old", "--label", "stage=old"]
    updated = json.loads(await cli(*update, "--remove-label", "team", "--json"))
    assert (updated["labels"], updated["description"]) == ({"stage": "old"}, "old")
    await cli("models", "versions", "rm", "fraud", "1")
    assert [v.version for v in await suite.registry.list_versions("fraud")] == [2]

    status = json.loads(await cli("status", "--json"))
    assert {m["model"]: m["deployment"] is not None for m in status["models"]} == {"fraud": True, "other": False}
    assert isinstance(json.loads(await cli("keys", "ls", "--json")), list)
    events = [json.loads(line) for line in (await cli("events", "--json", "--model", "fraud")).splitlines()]
    assert [e["kind"] for e in events][-2:] == ["version_updated", "version_deleted"]
    assert all(e["id"] and e["time_ms"] > 0 for e in events)

    code, _, stderr = await run_cli(suite, "models", "rm", "fraud")
    assert code == 1
    assert "FAILED_PRECONDITION: model 'fraud' is deployed" in " ".join(stderr.split())
    await cli("models", "rm", "fraud", "--force")
    assert [m.name for m in await suite.registry.list_models()] == ["other"]


async def test_pushed_by_names_the_api_key(redis_server: Any, redis_client: aioredis.Redis, tmp_path: Path) -> None:
    running = await Suite(redis_server.url, tmp_path, auth={}).start(with_worker=False)
    try:
        await running.registry.create_model("m")
        version = await running.registry.upload_version("m", AFFINE)
        assert version.pushed_by == "system/admin"
        events = [e async for e in running.registry.watch_events("0")]
        assert [e.kind for e in events][:2] == ["model_created", "version_uploaded"]
        reader = RegistryClient(running.registry_address)
        try:
            with pytest.raises(Unauthenticated):
                async for _event in reader.watch_events("0"):
                    pass
        finally:
            await reader.close()
    finally:
        await running.stop()


async def test_lifecycle_and_watch_work_on_the_registry_redis_user(tmp_path: Path) -> None:
    acl = AclRedis(tmp_path / "redis")
    admin = aioredis.Redis(port=acl.server.port)
    running = await Suite(acl.server.url, tmp_path, role_urls=acl.urls).start(with_worker=False)
    try:
        registry = running.registry
        await registry.create_model("m")
        for _ in range(2):
            await registry.upload_version("m", AFFINE, labels={"k": "v"})
        await registry.update_version("m", 1, description="d", remove_labels=["k"])
        assert [v.version for v in await registry.list_versions("m", {"k": "v"})] == [2]
        await registry.delete_version("m", 1)
        kinds = [event.kind async for event in registry.watch_events("0", model="m")]
        assert kinds == ["model_created", "version_uploaded", "version_uploaded", "version_updated", "version_deleted"]
        assert [event async for event in registry.watch_events("")] == []
        await registry.delete_model("m", force=False)
    finally:
        await running.stop()
        acl_log = await admin.execute_command("ACL", "LOG")
        await admin.aclose()
        acl.server.stop()
    assert _denials(acl_log) == []
