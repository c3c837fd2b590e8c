"""Model ownership and sharing between tenants: real servers, real Redis, real keys.

Tenant A creates and serves a model; tenant B's key (every scope, every model pattern) must not
learn that it exists until A shares it, and then may read and infer it, not change it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from inference import grpc_service_pb2 as pb
from services.common import keys
from services.common.auth import INFERENCE_RULES, REGISTRY_RULES, SCOPES, bearer
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.common.queue import Reply
from services.common.registry_client import RegistryClient
from tests.integration.suite import Suite, run_cli
from tests.integration.test_auth import _SERVICES, _request, _state
from tests.models import affine_model

pytestmark = pytest.mark.integration

OWNED, PUBLIC = "a-private", "public-model"
CREATE_MODEL = "/maas.registry.v1.ModelRegistry/CreateModel"
_NOT_FOUND_RPCS = [f"/inference.GRPCInferenceService/{rpc}" for rpc in (
    "ModelMetadata", "ModelConfig", "ModelStatistics", "ModelInfer", "RepositoryModelLoad", "RepositoryModelUnload",
)] + [f"/maas.registry.v1.ModelRegistry/{rpc}" for rpc in (
    "GetModel", "DeleteModel", "UploadVersion", "GetVersion", "ListVersions", "DownloadVersion", "Deploy",
    "Undeploy", "ShareModel", "UnshareModel",
)]  # fmt: skip
"""RPCs that answer a missing model NOT_FOUND (ModelReady answers "not ready"; CreateModel creates it)."""


class Tenants:
    """Keys of three tenants and registry clients that call with them."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.key: dict[str, str] = {}
        self.clients: dict[str, RegistryClient] = {}

    async def add(self, tenant: str, scopes: tuple[str, ...] = SCOPES) -> RegistryClient:
        await self.suite.registry.create_tenant(tenant)
        self.key[tenant] = (await self.suite.registry.create_api_key(tenant, "all", scopes))[1]
        client = RegistryClient(self.suite.registry_address, metadata=bearer(self.key[tenant]))
        self.clients[tenant] = client
        return client

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    """The suite with keys on; the gateway caches models for 30 s, so only events make a change seen."""
    running = await Suite(redis_server.url, tmp_path, auth={"auth_failures_burst": 100_000}).start()
    yield running
    await running.stop()


@pytest.fixture
async def tenants(suite: Suite) -> AsyncIterator[Tenants]:
    """Tenant ``team-a`` owns OWNED (deployed, served); ``team-b`` owns nothing; ``team-c`` has an admin key.

    A model created by the ``system`` administrator (PUBLIC) has no owner.
    """
    made = Tenants(suite)
    team_a = await made.add("team-a", tuple(scope for scope in SCOPES if scope != "admin"))
    await made.add("team-b", tuple(scope for scope in SCOPES if scope != "admin"))
    await made.add("team-c")
    await team_a.create_model(OWNED)
    version = await team_a.upload_version(OWNED, affine_model())
    await team_a.deploy(OWNED, version.version)
    await suite.push(PUBLIC, affine_model())
    assert suite.worker is not None
    await suite.worker.reconcile()
    yield made
    await made.close()


def _infer_request(model: str, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


_STRINGS = {"tenant": "team-b", "version": "1", "alias": "prod", "after_id": "0"}
"""Values of the string fields a request needs to succeed for the model's owner."""


def _method(path: str) -> Any:
    prefix = path[: path.rindex("/") + 1]
    return _SERVICES[prefix].methods_by_name[path[len(prefix) :]]


def _for(path: str, model: str) -> Any:
    """A request of ``path`` naming ``model``, with the other fields its owner would fill in."""
    request = _request(path, model)
    if isinstance(request, pb.ModelInferRequest):
        return _infer_request(model, "r1")
    if isinstance(request, list):
        return request
    for field in request.DESCRIPTOR.fields:
        value = getattr(request, field.name)
        if field.type == field.TYPE_INT64 and value == 0:
            setattr(request, field.name, 1)  # a version that exists
        elif field.type == field.TYPE_STRING and value == "" and field.name in _STRINGS:
            setattr(request, field.name, _STRINGS[field.name])
    return request


async def _reply(channel: grpc.aio.Channel, path: str, request: Any, key: str) -> tuple[str, str, list[bytes]]:
    """Call ``path``; return its status code, details and serialized replies (what a client sees)."""
    method = _method(path)
    kwargs: dict[str, Any] = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": bytes}
    call_kwargs: dict[str, Any] = {"metadata": bearer(key), "timeout": 10}
    replies: list[bytes] = []
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, **kwargs)(iter([request]), **call_kwargs)
            replies = [reply async for reply in call]
        elif method.client_streaming:
            requests = request if isinstance(request, list) else [request]
            replies = [await channel.stream_unary(path, **kwargs)(iter(requests), **call_kwargs)]
        elif method.server_streaming:
            replies = [reply async for reply in channel.unary_stream(path, **kwargs)(request, **call_kwargs)]
        else:
            replies = [await channel.unary_unary(path, **kwargs)(request, **call_kwargs)]
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or "", replies
    return "OK", "", replies


async def _replies(suite: Suite, key: str, model: str) -> dict[str, tuple[str, str, list[bytes]]]:
    """What ``key`` gets from every RPC that names a model (but CreateModel), for ``model``."""
    registry = grpc.aio.insecure_channel(suite.registry_address)
    try:
        return {
            path: await _reply(
                suite.channel if path.startswith("/inference.") else registry, path, _for(path, model), key
            )
            for path, rule in {**INFERENCE_RULES, **REGISTRY_RULES}.items()
            if rule.model_field and path != CREATE_MODEL
        }
    finally:
        await registry.close()


async def _until_gone(suite: Suite, model: str) -> None:
    """Wait until the gateway has seen ``model``'s deletion (its cache follows events)."""
    request = pb.ModelMetadataRequest(name=model)
    for _ in range(100):
        try:
            await suite.inference.ModelMetadata(request, metadata=bearer(suite.admin_key))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway still serves {model}")


async def test_another_tenant_gets_what_a_missing_model_gets_and_changes_nothing(
    suite: Suite, tenants: Tenants
) -> None:
    before = await _state(suite.redis)
    hidden = await _replies(suite, tenants.key["team-b"], OWNED)
    assert await _state(suite.redis) == before
    assert await suite.redis.xlen(keys.queue(OWNED, 1)) == 0
    for path in _NOT_FOUND_RPCS:
        assert hidden[path] == ("NOT_FOUND", f"model '{OWNED}' not found", []), path
    await suite.registry.delete_model(OWNED)
    await _until_gone(suite, OWNED)
    missing = await _replies(suite, tenants.key["team-b"], OWNED)
    for path, reply in hidden.items():
        assert reply == missing[path], path  # byte for byte: code, details and every reply message


async def test_a_late_reply_on_a_reused_reply_stream_reaches_no_new_call(suite: Suite, tenants: Tenants) -> None:
    # A gateway restarted under a fixed MAAS_GATEWAY_GATEWAY_ID reads the same reply stream as its
    # previous process, whose requests workers may still answer: such a reply must not resolve a
    # new call (another tenant's, maybe) that happens to get the same call id.
    await suite.registry.deploy(PUBLIC, 1, pool="nobody")  # no worker: the call waits for a reply
    assert suite.worker is not None
    await suite.worker.reconcile()
    call = suite.inference.ModelInfer(_infer_request(PUBLIC), metadata=bearer(tenants.key["team-b"]), timeout=2)
    stream = keys.replies(suite.gateway_settings.gateway_id)
    payload = pb.ModelInferResponse(model_name="previous-process", id="leaked").SerializeToString()
    async with asyncio.timeout(5):
        while await suite.redis.xlen(keys.queue(PUBLIC, 1)) == 0:
            await asyncio.sleep(0.01)
    for call_id in range(1, 1001):  # what the previous process's callers were waiting for
        fields: dict[Any, Any] = Reply(id=str(call_id), code=0, payload=payload).to_fields()
        await suite.redis.xadd(stream, fields)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def _names(suite: Suite, key: str) -> dict[str, set[str]]:
    """The models ``key`` sees in every list: registry models and deployments, gateway index and statistics."""
    metadata = bearer(key)
    client = RegistryClient(suite.registry_address, metadata=metadata)
    try:
        models = {model.name for model in await client.list_models()}
        deployments = {deployment.model for deployment in await client.list_deployments()}
    finally:
        await client.close()
    index = await suite.inference.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata)
    stats = await suite.inference.ModelStatistics(pb.ModelStatisticsRequest(), metadata=metadata)
    return {
        "ListModels": models,
        "ListDeployments": deployments,
        "RepositoryIndex": {model.name for model in index.models},
        "ModelStatistics": {entry.name for entry in stats.model_stats},
    }


async def test_lists_show_a_tenant_its_own_shared_and_ownerless_models(suite: Suite, tenants: Tenants) -> None:
    for key in (tenants.key["team-a"], tenants.key["team-b"]):  # statistics exist for both models
        await suite.inference.ModelInfer(_infer_request(PUBLIC), metadata=bearer(key))
    await suite.inference.ModelInfer(_infer_request(OWNED), metadata=bearer(tenants.key["team-a"]))
    everything = {OWNED, PUBLIC}
    assert await _names(suite, tenants.key["team-a"]) == _everywhere(everything)
    assert await _names(suite, tenants.key["team-b"]) == _everywhere({PUBLIC})
    assert await _names(suite, tenants.key["team-c"]) == _everywhere({PUBLIC})  # its tenant's admin: no more
    assert await _names(suite, suite.admin_key) == _everywhere(everything)
    await tenants.clients["team-a"].share_model(OWNED, "team-b")
    assert await _names(suite, tenants.key["team-b"]) == _everywhere(everything)


def _everywhere(models: set[str]) -> dict[str, set[str]]:
    return {name: models for name in ("ListModels", "ListDeployments", "RepositoryIndex", "ModelStatistics")}


async def test_owner_is_recorded_and_names_are_global(suite: Suite, tenants: Tenants) -> None:
    team_a, team_b = tenants.clients["team-a"], tenants.clients["team-b"]
    model = await team_a.get_model(OWNED)
    assert (model.owner, model.shared_with) == ("team-a", ())
    public = await team_b.get_model(PUBLIC)  # created by the system tenant: no owner
    assert (public.owner, public.shared_with) == ("", ())
    with pytest.raises(AlreadyExists, match=f"^model '{OWNED}' already exists$"):
        await team_b.create_model(OWNED)
    assert (await team_a.get_model(OWNED)).owner == "team-a"
    assert (await team_b.create_model("b-own")).owner == "team-b"
    with pytest.raises(NotFound, match=r"^model 'b-own' not found$"):
        await team_a.get_model("b-own")


async def test_a_model_without_an_owner_field_is_seen_by_every_tenant(suite: Suite, tenants: Tenants) -> None:
    # Models created before models had owners have no 'owner' field: they stay visible to all.
    await suite.redis.hdel(keys.model(OWNED), "owner")
    assert (await tenants.clients["team-b"].get_model(OWNED)).owner == ""
    reply = await suite.inference.ModelInfer(_infer_request(OWNED), metadata=bearer(tenants.key["team-b"]))
    assert reply.model_name == OWNED


async def test_sharing_grants_read_and_infer_only_and_unsharing_revokes_within_a_second(
    suite: Suite, tenants: Tenants
) -> None:
    team_a, team_b = tenants.clients["team-a"], tenants.clients["team-b"]
    b = bearer(tenants.key["team-b"])
    a = bearer(tenants.key["team-a"])
    await suite.inference.ModelMetadata(pb.ModelMetadataRequest(name=OWNED), metadata=a)  # cached for 30 s
    shared = await team_a.share_model(OWNED, "team-b")
    assert (shared.owner, shared.shared_with) == ("team-a", ("team-b",))
    assert (await team_a.share_model(OWNED, "team-b")).shared_with == ("team-b",)  # twice is fine
    deadline = time.monotonic() + 1.0
    reply = await _infer_until(suite, b, "OK", deadline)
    assert reply is not None and reply.model_name == OWNED
    assert (await team_b.get_model(OWNED)).shared_with == ("team-b",)
    assert [v.version for v in await team_b.list_versions(OWNED)] == [1]
    assert suite.worker is not None
    await suite.worker.run_until_empty()  # the OK call's entry is acked after its reply
    before = await _state(suite.redis)
    denied = f"model '{OWNED}' is shared with tenant 'team-b' to read and infer only; only its owner tenant 'team-a'"
    for write in (
        team_b.deploy(OWNED, 1),
        team_b.undeploy(OWNED),
        team_b.delete_model(OWNED),
        team_b.upload_version(OWNED, affine_model()),
        team_b.share_model(OWNED, "team-c"),
        team_b.unshare_model(OWNED, "team-b"),
    ):
        with pytest.raises(PermissionDenied, match=f"^{denied}"):
            await write
    for load in (
        suite.inference.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=OWNED), metadata=b),
        suite.inference.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=OWNED), metadata=b),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await load
        assert (caught.value.code(), caught.value.details()[: len(denied)]) == (
            grpc.StatusCode.PERMISSION_DENIED,
            denied,
        )
    assert await _state(suite.redis) == before
    unshared = await team_a.unshare_model(OWNED, "team-b")
    assert unshared.shared_with == ()
    deadline = time.monotonic() + 1.0
    assert await _infer_until(suite, b, "NOT_FOUND", deadline) is None
    with pytest.raises(NotFound, match=f"^model '{OWNED}' not found$"):
        await team_b.get_model(OWNED)


async def _infer_until(suite: Suite, metadata: Any, code: str, deadline: float) -> pb.ModelInferResponse | None:
    """Infer OWNED until the call ends with ``code`` (before ``deadline``); return the reply if OK."""
    last = ""
    while time.monotonic() < deadline:
        try:
            reply = await suite.inference.ModelInfer(_infer_request(OWNED), metadata=metadata)
            last = "OK"
        except grpc.aio.AioRpcError as exc:
            reply, last = None, exc.code().name
        if last == code:
            return reply
        await asyncio.sleep(0.02)
    raise AssertionError(f"still {last} after the deadline, expected {code}")


async def test_share_and_unshare_say_what_is_wrong(suite: Suite, tenants: Tenants) -> None:
    team_a = tenants.clients["team-a"]
    with pytest.raises(NotFound, match=r"^tenant 'team-z' not found$"):
        await team_a.share_model(OWNED, "team-z")
    with pytest.raises(InvalidArgument, match=r"^tenant name 'a/b' is invalid"):
        await team_a.share_model(OWNED, "a/b")
    with pytest.raises(InvalidArgument, match=f"^tenant 'team-a' owns model '{OWNED}'"):
        await team_a.share_model(OWNED, "team-a")
    with pytest.raises(NotFound, match=f"^model '{OWNED}' is not shared with tenant 'team-b'$"):
        await team_a.unshare_model(OWNED, "team-b")
    with pytest.raises(FailedPrecondition, match=f"^model '{PUBLIC}' has no owner tenant"):
        await team_a.share_model(PUBLIC, "team-b")
    admin = RegistryClient(suite.registry_address, metadata=bearer(tenants.key["team-c"]))
    try:  # an admin of another tenant administers its own tenant only: the model is not there for it
        with pytest.raises(NotFound, match=f"^model '{OWNED}' not found$"):
            await admin.share_model(OWNED, "team-c")
    finally:
        await admin.close()
    assert (await suite.registry.share_model(OWNED, "team-c")).shared_with == ("team-c",)  # the global admin


async def test_workers_serve_every_tenants_models(suite: Suite, tenants: Tenants) -> None:
    for tenant in ("team-a", "team-b"):
        client = tenants.clients[tenant]
        name = f"{tenant}-served"
        await client.create_model(name)
        await client.upload_version(name, affine_model())
        await client.deploy(name, 1)
    assert suite.worker is not None
    await suite.worker.reconcile()
    for tenant in ("team-a", "team-b"):
        reply = await suite.inference.ModelInfer(
            _infer_request(f"{tenant}-served"), metadata=bearer(tenants.key[tenant])
        )
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [1.0, 3.0, 5.0, 7.0]


async def test_cli_shares_and_shows_the_owner(suite: Suite, tenants: Tenants) -> None:
    key_a = tenants.key["team-a"]
    code, stdout, stderr = await run_cli(suite, "models", "share", OWNED, "--tenant", "team-b", key=key_a)
    assert code == 0, stderr
    assert f"shared model '{OWNED}' with tenant 'team-b'" in stdout
    code, stdout, _ = await run_cli(suite, "models", "show", OWNED, key=tenants.key["team-b"])
    assert code == 0 and "owner: team-a  shared with: team-b" in stdout
    code, stdout, _ = await run_cli(suite, "models", "unshare", OWNED, "--tenant", "team-b", key=key_a)
    assert code == 0 and "shared with: no other tenant" in stdout
    code, _, stderr = await run_cli(suite, "models", "show", OWNED, key=tenants.key["team-b"])
    assert code == 1 and f"NOT_FOUND: model '{OWNED}' not found" in stderr


async def test_a_tenant_admin_sees_the_cluster_through_its_tenants_models(suite: Suite, tenants: Tenants) -> None:
    team_c = tenants.clients["team-c"]  # an admin key of a tenant that owns nothing
    status = await team_c.get_cluster_status()
    assert [queue.model for queue in status.queues] == [PUBLIC]
    [worker] = status.workers  # the shared worker, without team-a's model on it
    assert (worker.worker_id, worker.models) == (suite.worker_settings.worker_id, (f"{PUBLIC}:1",))
    full = await suite.registry.get_cluster_status()  # a global admin sees everything
    assert [queue.model for queue in full.queues] == sorted([OWNED, PUBLIC])
    assert sorted(full.workers[0].models) == sorted([f"{OWNED}:1", f"{PUBLIC}:1"])
    with pytest.raises(PermissionDenied, match=r"lacks scope 'admin', which .*GetClusterStatus needs"):
        await tenants.clients["team-a"].get_cluster_status()  # the owner's key without the admin scope
    code, stdout, stderr = await run_cli(suite, "status", "--json", key=tenants.key["team-c"])
    assert code == 0, stderr
    assert OWNED not in stdout and [q["model"] for q in json.loads(stdout)["queues"]] == [PUBLIC]
    await tenants.clients["team-a"].share_model(OWNED, "team-c")  # now team-c sees it there too
    status = await team_c.get_cluster_status()
    assert [queue.model for queue in status.queues] == sorted([OWNED, PUBLIC])
    assert sorted(status.workers[0].models) == sorted([f"{OWNED}:1", f"{PUBLIC}:1"])
    code, stdout, stderr = await run_cli(suite, "status", key=tenants.key["team-c"])
    assert code == 0 and f"{OWNED}:1" in stdout and "live worker" in stdout, stderr
