"""A worker's direct inference service checks keys and model ownership as the gateway does.

Tenant A owns a served model; tenant B's key (every scope but admin) calls the worker's own port
and gets the gateway's answer for it: NOT_FOUND, as for a model that does not exist. Reflection
stays open unless a setting closes it; health stays open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from services.common.auth import INFERENCE_RULES, SCOPES, bearer, create_server_auth
from services.common.embedded_redis import EmbeddedRedis
from services.common.registry_client import RegistryClient
from services.inference import server as inference_server
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration

OWNED = "a-private"


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path, auth={"auth_failures_burst": 100_000}).start()
    yield running
    await running.stop()


class Direct:
    """A worker's direct server (auth on, the worker's registry key), a stub on it, and tenants' keys."""

    def __init__(self, suite: Suite, **settings: Any) -> None:
        self.suite = suite
        self.settings = suite.worker_settings.model_copy(update=settings)
        self.registry = RegistryClient(suite.registry_address, metadata=bearer(suite.system_keys["worker"]))
        self.auth = create_server_auth(self.settings, suite.redis, INFERENCE_RULES, service="inference")
        assert self.auth is not None and suite.worker is not None
        self.handle = inference_server.create_server(self.settings, suite.worker, self.auth, self.registry)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.handle.port}")
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def start(self) -> Direct:
        assert self.auth is not None
        await self.auth.start()
        await self.handle.server.start()
        await self.handle.set_serving(True)
        return self

    async def stop(self) -> None:
        assert self.auth is not None
        await self.channel.close()
        await self.handle.server.stop(None)
        await self.auth.stop()
        await self.registry.close()


@pytest.fixture
async def direct(suite: Suite) -> AsyncIterator[Direct]:
    running = await Direct(suite).start()
    yield running
    await running.stop()


@pytest.fixture
async def keys(suite: Suite) -> dict[str, tuple[tuple[str, str], ...]]:
    """Call metadata of tenants ``a`` (owns OWNED, deployed and loaded) and ``b``."""
    made = {}
    for tenant in ("team-a", "team-b"):
        await suite.registry.create_tenant(tenant)
        key = (await suite.registry.create_api_key(tenant, "k", [s for s in SCOPES if s != "admin"]))[1]
        made[tenant[-1]] = bearer(key)
    owner = RegistryClient(suite.registry_address, metadata=made["a"])
    try:
        await owner.create_model(OWNED)
        await owner.deploy(OWNED, (await owner.upload_version(OWNED, affine_model())).version)
    finally:
        await owner.close()
    assert suite.worker is not None
    await suite.worker.reconcile()
    return made


def _infer(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


async def _answer(call: Any) -> tuple[str, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


async def test_another_tenant_gets_the_gateways_not_found(
    suite: Suite, direct: Direct, keys: dict[str, tuple[tuple[str, str], ...]]
) -> None:
    not_found = ("NOT_FOUND", f"model '{OWNED}' not found")
    for stub in (suite.inference, direct.stub):  # the gateway, then the worker's own port
        assert await _answer(stub.ModelInfer(_infer(OWNED), metadata=keys["b"])) == not_found
        assert await _answer(stub.ModelMetadata(pb.ModelMetadataRequest(name=OWNED), metadata=keys["b"])) == not_found
    assert await _answer(direct.stub.ModelReady(pb.ModelReadyRequest(name=OWNED), metadata=keys["b"])) == not_found
    missing = await _answer(direct.stub.ModelInfer(_infer("no-such-model"), metadata=keys["b"]))
    assert missing == ("NOT_FOUND", "model 'no-such-model' not found")
    reply = await direct.stub.ModelInfer(_infer(OWNED), metadata=keys["a"])
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [1.0, 3.0, 5.0, 7.0]
    assert (await direct.stub.ModelReady(pb.ModelReadyRequest(name=OWNED), metadata=bearer(suite.admin_key))).ready
    owner = RegistryClient(suite.registry_address, metadata=keys["a"])
    try:
        await owner.share_model(OWNED, "team-b")
    finally:
        await owner.close()
    assert (await direct.stub.ModelInfer(_infer(OWNED), metadata=keys["b"])).model_name == OWNED
    assert await _answer(direct.stub.ModelInfer(_infer(OWNED))) == (
        "UNAUTHENTICATED",
        "missing or invalid API key: send 'authorization: Bearer <key>' (or 'x-api-key: <key>')",
    )


async def _services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return sorted([s.name async for reply in call for s in reply.list_services_response.service])


async def test_health_and_reflection_are_open_unless_reflection_is_closed(suite: Suite, direct: Direct) -> None:
    for channel in (suite.channel, direct.channel):
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert "inference.GRPCInferenceService" in await _services(channel)
    closed = await Direct(suite, auth_reflection_open=False).start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _services(closed.channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        check = await health_pb2_grpc.HealthStub(closed.channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await closed.stop()
