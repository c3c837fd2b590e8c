"""API keys on every RPC of the gateway and the registry: real servers, real Redis, real keys."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from inference import grpc_service_pb2 as pb
from maas.registry.v1 import registry_pb2
from services.common import keys
from services.common.auth import INFERENCE_RULES, REGISTRY_RULES, SCOPES, bearer
from services.common.embedded_redis import EmbeddedRedis
from services.common.registry_client import RegistryClient
from services.gateway import server as gateway_server
from services.gateway.settings import GatewaySettings
from tests.integration.suite import Suite, run_cli
from tests.models import affine_model

pytestmark = pytest.mark.integration

ALLOWED, HIDDEN, MISSING = "fraud-a", "secret-model", "secret-missing"
UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send 'authorization: Bearer <key>' (or 'x-api-key: <key>')"
_PACKAGES = {"inference": pb, "maas.registry.v1": registry_pb2}
_SERVICES = {
    "/inference.GRPCInferenceService/": pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    "/maas.registry.v1.ModelRegistry/": registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"],
}


class Keys:
    """The keys a test calls with, created through the registry's own API."""

    def __init__(self) -> None:
        self.by_name: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        return self.by_name[name]


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    """The suite with API keys on: a long cache TTL, so only events can make a revocation seen in time."""
    running = await Suite(
        redis_server.url, tmp_path, auth={"auth_failures_burst": 100_000, "auth_cache_ttl_s": 60}
    ).start()
    await running.push(ALLOWED, affine_model())
    await running.push(HIDDEN, affine_model())
    yield running
    await running.stop()


@pytest.fixture
async def api_keys(suite: Suite) -> Keys:
    """Keys: ``all``, ``fraud`` (models 'fraud-*'), ``no-<scopes>`` (lacking those), ``revoked``, ``expired``."""
    made = Keys()
    admin = suite.registry
    await admin.create_tenant("team-a")
    made.by_name["all"] = (await admin.create_api_key("team-a", "all", SCOPES))[1]
    made.by_name["fraud"] = (await admin.create_api_key("team-a", "fraud", SCOPES, ["fraud-*"]))[1]
    for rule in (*INFERENCE_RULES.values(), *REGISTRY_RULES.values()):
        name = "no-" + "-".join(rule.scopes)
        if rule.scopes and name not in made.by_name:
            others = [scope for scope in SCOPES if scope not in rule.scopes]
            made.by_name[name] = (await admin.create_api_key("team-a", name, others))[1]
    record, made.by_name["revoked"] = await admin.create_api_key("team-a", "revoked", SCOPES)
    await admin.revoke_api_key(record.id)
    expires_at_ms = int(time.time() * 1000) + 300
    made.by_name["expired"] = (await admin.create_api_key("team-a", "expired", SCOPES, expires_at_ms=expires_at_ms))[1]
    await asyncio.sleep(0.4)
    return made


def _infer_request(model: str, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


def _request(path: str, model: str) -> Any:
    """A request of the RPC at ``path`` that would succeed (or change something) for ``model``."""
    prefix = path[: path.rindex("/") + 1]
    method = _SERVICES[prefix].methods_by_name[path[len(prefix) :]]
    if method.name in ("ModelInfer", "ModelStreamInfer"):
        return _infer_request(model)
    if method.name == "UploadVersion":
        data = affine_model()
        header = registry_pb2.UploadVersionHeader(
            model=model, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
        )
        return [registry_pb2.UploadVersionRequest(header=header), registry_pb2.UploadVersionRequest(chunk=data)]
    request = getattr(_PACKAGES[method.input_type.file.package], method.input_type.name)()
    rule = {**INFERENCE_RULES, **REGISTRY_RULES}[path]
    if rule.model_field is not None:
        setattr(request, rule.model_field, model)
    if method.name == "CreateApiKey":
        request.tenant, request.name, request.scopes[:] = "team-a", "made", ["infer"]
    if method.name in ("CreateTenant",):
        request.name = "made-tenant"
    if method.name == "SystemSharedMemoryRegister":
        request.name, request.key, request.byte_size = "region", "/maas-test-none", 16
    return request


async def _call(channel: grpc.aio.Channel, path: str, request: Any, key: str | None) -> tuple[grpc.StatusCode, str]:
    """Call ``path`` with ``key`` (None: no key) and return its status code and details."""
    prefix = path[: path.rindex("/") + 1]
    method = _SERVICES[prefix].methods_by_name[path[len(prefix) :]]
    output = getattr(_PACKAGES[method.output_type.file.package], method.output_type.name)
    kwargs: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": output.FromString,
    }
    metadata = bearer(key) or None
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, **kwargs)(metadata=metadata, timeout=10)
            # Write only once the server has accepted the stream (its headers): a write racing a
            # refusal makes grpc.aio report INTERNAL instead of the server's status.
            await call.initial_metadata()
            if call.done():
                return await call.code(), await call.details() or ""
            await call.write(request)
            await call.done_writing()
            replies = [reply async for reply in call]
            errors = [r.error_message for r in replies if r.error_message]
            if errors:
                return grpc.StatusCode.PERMISSION_DENIED, errors[0]
        elif method.client_streaming:
            requests = request if isinstance(request, list) else [request]
            await channel.stream_unary(path, **kwargs)(iter(requests), metadata=metadata, timeout=10)
        elif method.server_streaming:
            [_ async for _ in channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10)]
        else:
            await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _state(redis: aioredis.Redis) -> dict[str, Any]:
    """What a refused call must not change: models, versions, deployments, identities, queue lengths."""
    names = sorted(name.decode() for name in await redis.zrange(keys.MODELS, 0, -1))
    return {
        "models": {name: await redis.hgetall(keys.model(name)) for name in names},
        "versions": {name: await redis.hgetall(keys.versions(name)) for name in names},
        "deployments": await redis.hgetall(keys.DEPLOYMENTS),
        "tenants": await redis.hgetall(keys.TENANTS),
        "api_keys": await redis.hgetall(keys.API_KEYS),
        "queues": {name: await redis.xlen(keys.queue(name, 1)) for name in names},
    }


def _targets(suite: Suite) -> list[tuple[str, str]]:
    return [(path, "gateway") for path in INFERENCE_RULES] + [(path, "registry") for path in REGISTRY_RULES]


async def test_every_rpc_has_a_rule() -> None:
    for prefix, service in _SERVICES.items():
        rules = INFERENCE_RULES if prefix.startswith("/inference") else REGISTRY_RULES
        assert {f"{prefix}{m.name}" for m in service.methods} == set(rules)


async def test_every_rpc_refuses_bad_keys_and_changes_nothing(suite: Suite, api_keys: Keys) -> None:
    registry = grpc.aio.insecure_channel(suite.registry_address)
    channels = {"gateway": suite.channel, "registry": registry}
    before = await _state(suite.redis)
    try:
        for path, server in _targets(suite):
            channel, request = channels[server], _request(path, HIDDEN)
            for key in (None, "maas_0123456789abcdef_guessed", "not-a-key", api_keys["revoked"], api_keys["expired"]):
                code, details = await _call(channel, path, request, key)
                assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE), (path, key)
            rule = {**INFERENCE_RULES, **REGISTRY_RULES}[path]
            if rule.scopes:
                name = "no-" + "-".join(rule.scopes)
                code, details = await _call(channel, path, request, api_keys[name])
                assert code == grpc.StatusCode.PERMISSION_DENIED, (path, details)
                assert f"API key '{name}' lacks scope '{rule.scopes[0]}'" in details
            if rule.model_field is not None:
                answers = [
                    await _call(channel, path, _request(path, model), api_keys["fraud"]) for model in (HIDDEN, MISSING)
                ]
                for (code, details), model in zip(answers, (HIDDEN, MISSING), strict=True):
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (path, details)
                    assert details == f"API key 'fraud' may not use model '{model}': its model patterns are 'fraud-*'"
        assert await _state(suite.redis) == before
    finally:
        await registry.close()


async def test_a_valid_key_works_and_writes_are_audited(suite: Suite, api_keys: Keys) -> None:
    with capture_logs() as logs:
        code, _ = await _call(
            suite.channel, "/inference.GRPCInferenceService/ModelInfer", _infer_request(ALLOWED), api_keys["fraud"]
        )
        assert code == grpc.StatusCode.OK
        client = RegistryClient(suite.registry_address, metadata=bearer(api_keys["fraud"]))
        try:
            await client.deploy(ALLOWED, 1, max_batch_size=4)
        finally:
            await client.close()
    audit = [line for line in logs if line.get("audit")]
    assert audit == [
        {
            "event": "audit", "audit": True, "log_level": "info", "rpc": "/maas.registry.v1.ModelRegistry/Deploy",
            "key": "fraud", "key_id": api_keys["fraud"].split("_")[1], "tenant": "team-a", "model": ALLOWED,
            "version": 1, "result": "OK",
        }
    ]  # fmt: skip
    secrets = [key.split("_", 2)[2] for key in api_keys.by_name.values()]
    assert not [line for line in logs if any(secret in repr(line) for secret in secrets)]


async def test_x_api_key_header_works(suite: Suite, api_keys: Keys) -> None:
    reply = await suite.inference.ModelMetadata(
        pb.ModelMetadataRequest(name=ALLOWED), metadata=(("x-api-key", api_keys["fraud"]),)
    )
    assert reply.name == ALLOWED


async def test_health_and_reflection_stay_open(suite: Suite) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(suite.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_lists_show_only_the_models_of_the_key(suite: Suite, api_keys: Keys) -> None:
    fraud = bearer(api_keys["fraud"])
    index = await suite.inference.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=fraud)
    assert [model.name for model in index.models] == [ALLOWED]
    await suite.inference.ModelInfer(_infer_request(ALLOWED), metadata=bearer(api_keys["all"]))
    await suite.inference.ModelInfer(_infer_request(HIDDEN), metadata=bearer(api_keys["all"]))
    stats = await suite.inference.ModelStatistics(pb.ModelStatisticsRequest(), metadata=fraud)
    assert {entry.name for entry in stats.model_stats} <= {ALLOWED}
    client = RegistryClient(suite.registry_address, metadata=fraud)
    try:
        assert [model.name for model in await client.list_models()] == [ALLOWED]
        assert [deployment.model for deployment in await client.list_deployments()] == [ALLOWED]
    finally:
        await client.close()
    every = await suite.registry.list_models()
    assert [model.name for model in every] == [ALLOWED, HIDDEN]


async def test_stream_requests_are_checked_one_by_one(suite: Suite, api_keys: Keys) -> None:
    requests = [_infer_request(ALLOWED, "1"), _infer_request(HIDDEN, "2"), _infer_request(ALLOWED, "3")]

    async def stream() -> AsyncIterator[pb.ModelInferRequest]:
        for request in requests:
            yield request

    call = suite.inference.ModelStreamInfer(stream(), metadata=bearer(api_keys["fraud"]), timeout=20)
    answers = {reply.infer_response.id: reply.error_message async for reply in call}
    assert answers == {
        "1": "",
        "2": f"API key 'fraud' may not use model '{HIDDEN}': its model patterns are 'fraud-*'",
        "3": "",
    }
    assert await suite.redis.xlen(keys.queue(HIDDEN, 1)) == 0


async def test_a_revoked_key_is_refused_within_a_second_on_every_gateway(suite: Suite, api_keys: Keys) -> None:
    second = await _second_gateway(suite)
    try:
        channels = [suite.channel, second[0]]
        request = pb.ModelMetadataRequest(name=ALLOWED)
        key = api_keys["fraud"]
        for channel in channels:  # verified once: now cached (for 60 s) by each gateway
            await pb_grpc_stub(channel).ModelMetadata(request, metadata=bearer(key))
        [record] = [r for r in await suite.registry.list_api_keys("team-a") if r.name == "fraud"]
        await suite.registry.revoke_api_key(record.id)
        deadline = time.monotonic() + 1.0
        refused: set[int] = set()
        while len(refused) < len(channels) and time.monotonic() < deadline:
            for index, channel in enumerate(channels):
                code, _ = await _call(channel, "/inference.GRPCInferenceService/ModelMetadata", request, key)
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    refused.add(index)
            await asyncio.sleep(0.02)
        assert refused == {0, 1}
    finally:
        await _stop_second(second)


def pb_grpc_stub(channel: grpc.aio.Channel) -> Any:
    from inference import grpc_service_pb2_grpc

    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


async def _second_gateway(suite: Suite) -> tuple[grpc.aio.Channel, Any, Any, Any, Any]:
    settings = GatewaySettings(
        port=0, redis_url=suite.redis_url, registry_address=suite.registry_address, redis_timeout_s=2, block_ms=200,
        auth_enabled=True, auth_secret=suite.auth_secret, auth_cache_ttl_s=60,
        registry_api_key=suite.system_keys["gateway"],
    )  # fmt: skip
    registry = RegistryClient(suite.registry_address, metadata=bearer(settings.registry_api_key))
    gateway = gateway_server.create_gateway(settings, suite.redis, registry)
    auth = gateway_server.create_auth(settings, suite.redis)
    assert auth is not None
    handle = gateway_server.create_server(settings, gateway, auth)
    await gateway.start()
    await auth.start()
    await handle.server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}")
    return channel, handle, gateway, auth, registry


async def _stop_second(second: tuple[grpc.aio.Channel, Any, Any, Any, Any]) -> None:
    channel, handle, gateway, auth, registry = second
    await channel.close()
    await handle.server.stop(None)
    await gateway.stop(timeout_s=1)
    await auth.stop()
    await registry.close()


async def test_failed_authentications_are_rate_limited_per_peer(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    suite = await Suite(
        redis_server.url, tmp_path, auth={"auth_failures_burst": 3, "auth_failures_per_s": 0.01}
    ).start()
    try:
        path, request = "/inference.GRPCInferenceService/ServerReady", pb.ServerReadyRequest()
        with capture_logs() as logs:
            codes = [(await _call(suite.channel, path, request, "maas_0123456789abcdef_wrong"))[0] for _ in range(4)]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        code, details = await _call(suite.channel, path, request, suite.admin_key)  # a valid key waits too
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many failed authentications" in details
        failures = [line for line in logs if line["event"] == "auth_failed"]
        assert len(failures) == 3 and all("wrong" not in repr(line) for line in failures)
    finally:
        await suite.stop()


async def test_identity_rpcs_validate_their_input(suite: Suite) -> None:
    admin = suite.registry
    from services.common.errors import AlreadyExists, InvalidArgument, NotFound

    await admin.create_tenant("t")
    with pytest.raises(AlreadyExists):
        await admin.create_tenant("t")
    for bad in ("../x", "a/b", "x\n", "a" * 65, ""):
        with pytest.raises(InvalidArgument):
            await admin.create_tenant(bad)
    with pytest.raises(InvalidArgument, match="scope 'root' is unknown"):
        await admin.create_api_key("t", "k", ["root"])
    with pytest.raises(InvalidArgument, match="at least one"):
        await admin.create_api_key("t", "k", [])
    with pytest.raises(InvalidArgument, match="model pattern"):
        await admin.create_api_key("t", "k", ["infer"], ["a b"])
    with pytest.raises(InvalidArgument, match="expires_at_ms"):
        await admin.create_api_key("t", "k", ["infer"], expires_at_ms=1)
    with pytest.raises(NotFound, match="tenant 'nobody'"):
        await admin.create_api_key("nobody", "k", ["infer"])
    with pytest.raises(NotFound):
        await admin.revoke_api_key("0123456789abcdef")
    record, key = await admin.create_api_key("t", "k", ["infer"])
    listed = await admin.list_api_keys("t")
    assert [(r.id, r.name, r.scopes, r.models, r.secret_hmac) for r in listed] == [
        (record.id, "k", ("infer",), ("*",), "")
    ]
    stored = (await suite.redis.hget(keys.API_KEYS, record.id)).decode()
    assert key.split("_", 2)[2] not in stored and key not in stored


async def test_cli_tenants_and_keys(suite: Suite) -> None:
    admin = suite.admin_key
    assert (await run_cli(suite, "tenants", "create", "cli-team", key=admin))[0] == 0
    code, stdout, _ = await run_cli(suite, "tenants", "ls", key=admin)
    assert code == 0 and "cli-team" in stdout and "system" in stdout
    code, key, stderr = await run_cli(
        suite, "keys", "create", "--tenant", "cli-team", "--name", "bot", "--scope", "infer", "--scope", "read",
        "--models", "fraud-*", "--expires-in", "30d", key=admin,
    )  # fmt: skip
    assert code == 0, stderr
    key = key.strip()
    assert key.startswith("maas_") and "not shown again" in stderr
    key_id = key.split("_")[1]
    code, stdout, _ = await run_cli(suite, "keys", "ls", "--tenant", "cli-team", key=admin)
    assert code == 0 and key_id in stdout and "bot" in stdout and "active" in stdout
    assert key.split("_", 2)[2] not in stdout
    code, stdout, _ = await run_cli(suite, "infer", ALLOWED, "--input", "x=[[1, 2, 3, 4]]", key=key)
    assert code == 0 and '"data": [[3.0, 5.0, 7.0, 9.0]]' in stdout
    code, _, stderr = await run_cli(suite, "keys", "ls", key=key)
    assert code == 1 and "PERMISSION_DENIED" in stderr and "lacks scope 'admin'" in stderr
    assert (await run_cli(suite, "keys", "revoke", key_id, key=admin))[0] == 0
    await asyncio.sleep(0.2)
    code, _, stderr = await run_cli(suite, "models", "ls", key=key)
    assert code == 1 and "UNAUTHENTICATED" in stderr
