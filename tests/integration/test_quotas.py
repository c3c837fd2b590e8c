"""Tenant quotas: token bucket and in-flight cap, atomic across gateways, fair under a flood, counted per tenant."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from services.cli.main import app
from services.common import keys
from services.common.auth import SCOPES, TenantQuota, bearer
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.queue import QueuedRequest, now_ms
from services.common.redis_conn import create_redis
from services.common.registry_client import RegistryClient
from services.gateway.admission import Admission
from tests.integration.suite import Suite, start_gateway_process
from tests.integration.test_redis_acl import AclRedis
from tests.models import affine_model, slow_model

pytestmark = pytest.mark.integration

SLOW_SIZE = 512


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    """The suite with API keys on, a fast model and a slow one (one request per run)."""
    running = await Suite(redis_server.url, tmp_path, auth={"auth_failures_burst": 100_000}).start()
    await running.push("affine", affine_model())
    await running.push("slow", slow_model(size=SLOW_SIZE, steps=96), max_batch_size=1, max_wait_ms=0)
    yield running
    await running.stop()


async def _tenant_key(suite: Suite, tenant: str, **quota: Any) -> str:
    """Create ``tenant`` with ``quota`` and return a key of it that may infer."""
    await suite.registry.create_tenant(tenant)
    if quota:
        await suite.registry.set_tenant_quota(tenant, TenantQuota(**quota))
    return (await suite.registry.create_api_key(tenant, "caller", ["infer", "read"]))[1]


def _affine() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


def _slow() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[SLOW_SIZE, SLOW_SIZE])
    request.raw_input_contents.append(np.eye(SLOW_SIZE, dtype=np.float32).tobytes())
    return request


Outcome = tuple[grpc.StatusCode, str, dict[str, str]]


async def _infer(stub: Any, key: str, request: pb.ModelInferRequest, timeout_s: float = 20) -> Outcome:
    """Call ModelInfer; return its code, details and trailing metadata."""
    try:
        call = stub.ModelInfer(request, metadata=bearer(key), timeout=timeout_s)
        await call
        return grpc.StatusCode.OK, "", dict(await call.trailing_metadata())
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())


async def _eventually_ok(stub: Any, key: str, within_s: float) -> float:
    """Retry a fast call until it is admitted; return how long that took (fails after ``within_s``)."""
    started = time.monotonic()
    async with asyncio.timeout(within_s):
        while (await _infer(stub, key, _affine()))[0] is not grpc.StatusCode.OK:
            await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_burst_passes_and_the_rest_is_refused_with_a_retry_hint(suite: Suite) -> None:
    key = await _tenant_key(suite, "team-a", rps=1.0, burst=5)
    outcomes = await asyncio.gather(*(_infer(suite.inference, key, _affine()) for _ in range(12)))
    codes = [code for code, _details, _trailers in outcomes]
    assert codes.count(grpc.StatusCode.OK) == 5, outcomes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 7, outcomes
    for code, details, trailers in outcomes:
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            wait_ms = int(trailers["retry-after-ms"])
            assert 0 < wait_ms <= 1000
            assert details == f"tenant 'team-a' is over its rate limit of 1 calls/s (burst 5); retry in {wait_ms} ms"
    wait_ms = max(int(trailers.get("retry-after-ms", 0)) for _c, _d, trailers in outcomes)
    await asyncio.sleep(wait_ms / 1000 + 0.05)
    assert (await _infer(suite.inference, key, _affine()))[0] is grpc.StatusCode.OK
    refused = await _infer(suite.inference, key, _affine())
    assert refused[0] is grpc.StatusCode.RESOURCE_EXHAUSTED  # the token it earned is spent


async def test_the_in_flight_cap_refuses_one_call_over_it_and_frees_slots_when_calls_end(suite: Suite) -> None:
    key = await _tenant_key(suite, "team-a", max_in_flight=2)
    outcomes = await asyncio.gather(*(_infer(suite.inference, key, _slow()) for _ in range(3)))
    codes = sorted(code.name for code, _details, _trailers in outcomes)
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED"], outcomes
    [(_code, details, trailers)] = [o for o in outcomes if o[0] is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert (
        details
        == "tenant 'team-a' has 2 calls in flight, its limit (max_in_flight 2); retry in 100 ms or when a call ends"
    )
    assert trailers["retry-after-ms"] == "100"
    # Completed: both slots are free again.
    assert [o[0] for o in await asyncio.gather(*(_infer(suite.inference, key, _affine()) for _ in range(2)))] == [
        grpc.StatusCode.OK
    ] * 2


async def test_a_slot_is_freed_at_the_deadline_and_on_client_cancel(suite: Suite) -> None:
    key = await _tenant_key(suite, "team-a", max_in_flight=1)
    # Deadline: the gateway answers DEADLINE_EXCEEDED while the worker still computes.
    code, _details, _trailers = await _infer(suite.inference, key, _slow(), timeout_s=0.05)
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _eventually_ok(suite.inference, key, within_s=2) < 2  # not the call's 20 s expiry
    # Client cancel: the slot is free long before the slow call would have finished.
    call = suite.inference.ModelInfer(_slow(), metadata=bearer(key), timeout=20)
    async with asyncio.timeout(2):  # until the slow call holds the only slot
        while (await _infer(suite.inference, key, _affine()))[0] is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            await asyncio.sleep(0.01)
    call.cancel()
    assert await _eventually_ok(suite.inference, key, within_s=2) < 2
    assert await suite.redis.zcard(keys.quota_in_flight("team-a")) == 0


async def _gateway_process(suite: Suite, tmp_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Another gateway of the suite, in its own process, checking keys."""
    return await start_gateway_process(
        suite, tmp_path / "ready.json", auth_enabled="true", auth_secret=suite.auth_secret or "",
        registry_api_key=suite.system_keys["gateway"], log_level="warning",
    )  # fmt: skip


async def test_two_gateways_share_one_bucket(suite: Suite, tmp_path: Path) -> None:
    key = await _tenant_key(suite, "team-a", rps=0.1, burst=6)
    process, address = await _gateway_process(suite, tmp_path)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            other = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stubs = [suite.inference, other] * 6
            outcomes = await asyncio.gather(*(_infer(stub, key, _affine()) for stub in stubs))
            by_gateway = [[o[0] for o in outcomes[start::2]] for start in (0, 1)]
    finally:
        process.terminate()
        await process.wait()
    codes = [code for codes in by_gateway for code in codes]
    assert codes.count(grpc.StatusCode.OK) == 6, by_gateway
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6, by_gateway


async def _paced(stub: Any, key: str, rate: float, seconds: float) -> list[tuple[grpc.StatusCode, float]]:
    """Call at ``rate`` calls/s for ``seconds`` (open loop); return each call's code and latency."""
    results: list[tuple[grpc.StatusCode, float]] = []

    async def one() -> None:
        started = time.perf_counter()
        code = (await _infer(stub, key, _affine()))[0]
        results.append((code, time.perf_counter() - started))

    tasks = []
    started = time.monotonic()
    for index in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return results


def _p99(results: list[tuple[grpc.StatusCode, float]]) -> float:
    return float(np.percentile([latency for _code, latency in results], 99))


_FLOOD = """
import asyncio, collections, json, os, sys, time
import grpc
import numpy as np
from inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc

async def main(address, key, rate, seconds):
    os.nice(19)  # the flooder's own client would run elsewhere: let it not slow the servers
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    codes = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        async def one():
            try:
                await stub.ModelInfer(request, metadata=(("authorization", "Bearer " + key),), timeout=20)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
        started, tasks = time.monotonic(), []
        for index in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    codes["rate"] = round(len(tasks) / (time.monotonic() - started))
    print(json.dumps(codes))

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
"""
"""Tenant A's flood, from its own process (its client's work must not slow the measuring loop)."""


async def _flood(address: str, key: str, rate: float, seconds: float) -> dict[str, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FLOOD, address, key, str(rate), str(seconds), stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    codes: dict[str, int] = json.loads(stdout)
    return codes


@pytest.mark.timeout(120)
@pytest.mark.serial  # a p99 comparison: other tests running beside it would measure the machine
async def test_a_flooding_tenant_does_not_starve_another(suite: Suite, tmp_path: Path) -> None:
    # B runs at 40 calls/s under its own quota (50/s), for enough samples that p99 is not just the
    # slowest call; A floods at 50/s, 10 x its quota of 5/s (on 2 cores the flooding client itself
    # competes with the servers for the CPU: its rate is kept to what the issue asks, 10 x).
    flooder = await _tenant_key(suite, "team-a", rps=5.0, burst=5, max_in_flight=5)
    steady = await _tenant_key(suite, "team-b", rps=50.0, burst=50, max_in_flight=50)
    # The gateway in its own process, as in production: the measuring loop runs the worker and team B.
    process, address = await _gateway_process(suite, tmp_path)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await _paced(stub, steady, 40, 1)  # warm up
            quiet = await _paced(stub, steady, 40, 6)
            flood, loaded = await asyncio.gather(
                _flood(address, flooder, 50, 6.5),  # 10 x its quota (the process starts for ~0.5 s)
                _paced(stub, steady, 40, 6),
            )
            # The quiet baseline is measured on both sides of the flood: this machine's own noise
            # drifts over seconds, and the slower of the two is the fairer yardstick.
            quiet_after = await _paced(stub, steady, 40, 6)
    finally:
        process.terminate()
        await process.wait()
    assert flood.pop("rate") >= 45, flood  # about 10 x its quota
    assert flood.get("RESOURCE_EXHAUSTED", 0) > sum(flood.values()) / 2, flood  # the flood was refused
    assert set(flood) <= {"OK", "RESOURCE_EXHAUSTED"}, flood
    # A itself still gets its quota, and no more: its burst, then 5/s while it floods (its calls
    # last ~6.5 s; the bounds leave room for the process start and the last calls' latency).
    assert 5 + 5 * 4 <= flood.get("OK", 0) <= 5 + 5 * 8, flood
    successes = sum(code is grpc.StatusCode.OK for code, _latency in loaded)
    assert successes >= 0.99 * len(loaded), loaded
    baseline = max(_p99(quiet), _p99(quiet_after))
    print(
        f"team-b p99: quiet {_p99(quiet) * 1000:.2f} ms before, {_p99(quiet_after) * 1000:.2f} ms after, "
        f"during the flood {_p99(loaded) * 1000:.2f} ms; A: {flood}"
    )
    assert _p99(loaded) <= 2 * baseline


async def test_usage_is_counted_per_tenant(suite: Suite) -> None:
    key = await _tenant_key(suite, "team-a", rps=1.0, burst=2)
    codes = [(await _infer(suite.inference, key, _affine()))[0] for _ in range(3)]
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    async with asyncio.timeout(5):
        while True:
            report = {tenant.name: usage for tenant, usage in await suite.registry.tenant_report()}
            used = report["team-a"]
            if used.calls == 3:
                break
            await asyncio.sleep(0.1)
    assert used.errors == 1
    assert used.compute_ns > 0
    assert report["system"].calls == 0


async def test_set_tenant_quota_checks_its_input_and_scope(suite: Suite) -> None:
    await suite.registry.create_tenant("team-a")
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        await suite.registry.set_tenant_quota("nobody", TenantQuota(rps=1, burst=1))
    for quota, message in [
        (TenantQuota(rps=-1, burst=1), "quota rps must be between 0 (off) and 1000000, got -1"),
        (TenantQuota(max_in_flight=2_000_000), "quota max_in_flight must be between 0 (off) and 1000000"),
        (TenantQuota(rps=2.5), "quota burst must be >= 1 with rps 2.5 (e.g. 3)"),
        (TenantQuota(burst=3), "quota burst needs rps"),
    ]:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            await suite.registry.set_tenant_quota("team-a", quota)
    reader = (await suite.registry.create_api_key("team-a", "reader", [s for s in SCOPES if s != "admin"]))[1]
    client = RegistryClient(suite.registry_address, metadata=bearer(reader))
    try:
        with pytest.raises(PermissionDenied, match="lacks scope 'admin'"):
            await client.set_tenant_quota("team-a", TenantQuota(rps=1, burst=1))
    finally:
        await client.close()


async def test_cli_sets_a_quota_and_shows_usage(suite: Suite) -> None:
    await suite.registry.create_tenant("team-a")
    env = {
        "MAAS_REGISTRY": suite.registry_address,
        "MAAS_GATEWAY": suite.gateway_address,
        "MAAS_API_KEY": suite.admin_key,
    }
    runner = CliRunner()
    command = ["tenants", "set-quota", "team-a", "--rps", "100", "--burst", "200", "--max-in-flight", "50"]
    result = await asyncio.to_thread(runner.invoke, app, command, env=env)
    assert result.exit_code == 0, result.output
    assert "tenant 'team-a' quota: 100/s burst 200, 50 in flight" in result.output
    [tenant] = [t for t in await suite.registry.list_tenants() if t.name == "team-a"]
    assert tenant.quota == TenantQuota(rps=100, burst=200, max_in_flight=50)
    key = (await suite.registry.create_api_key("team-a", "caller", ["infer"]))[1]
    assert (await _infer(suite.inference, key, _affine()))[0] is grpc.StatusCode.OK
    async with asyncio.timeout(5):
        while True:
            status = await asyncio.to_thread(runner.invoke, app, ["status"], env=env)
            assert status.exit_code == 0, status.output
            rows = [line.split() for line in status.output.splitlines() if "team-a" in line]
            if rows and "1" in rows[0]:
                break
            await asyncio.sleep(0.2)
    assert "100/s" in status.output
    refused = await asyncio.to_thread(runner.invoke, app, ["tenants", "set-quota", "team-a", "--rps", "-1"], env=env)
    assert refused.exit_code != 0
    assert "quota rps must be between 0 (off) and 1000000" in refused.output


async def test_quota_changes_reach_the_gateway_by_event(suite: Suite) -> None:
    key = await _tenant_key(suite, "team-a", rps=0.1, burst=1)
    assert (await _infer(suite.inference, key, _affine()))[0] is grpc.StatusCode.OK
    assert (await _infer(suite.inference, key, _affine()))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    await suite.registry.set_tenant_quota("team-a", TenantQuota())  # limits off
    assert await _eventually_ok(suite.inference, key, within_s=2) < 2  # the cache keeps quotas 5 s


async def test_the_quota_script_runs_as_the_gateway_redis_user(tmp_path: Path) -> None:
    acl = AclRedis(tmp_path / "redis")
    gateway = create_redis(acl.urls["gateway"], timeout_s=2)
    admin = aioredis.Redis(port=acl.server.port)
    admission = Admission(gateway)
    await admission.start()
    try:
        quota = TenantQuota(rps=1, burst=2, max_in_flight=1)
        queue, replies = keys.queue("m", 1), keys.replies("g")
        first, second = (
            QueuedRequest(id=str(i), reply_to=replies, deadline_ms=now_ms() + 60_000, payload=b"x", tenant="team-a")
            for i in (1, 2)
        )
        assert await admission.enqueue(queue, 10, first, quota)
        admission.send_soon([("ZREM", keys.quota_in_flight("team-a"), f"{replies}:1")])
        admission.send_soon([("HINCRBY", keys.usage("team-a"), "calls", 1)])
        assert await admission.enqueue(queue, 10, second, quota)  # after the release: the cap is 1
        [(_id, fields)] = (await admin.xrange(queue))[:1]
        assert fields[b"tenant"] == b"team-a"
        assert await admin.hget(keys.usage("team-a"), "calls") == b"1"
        assert await admin.zrange(keys.quota_in_flight("team-a"), 0, -1) == [f"{replies}:2".encode()]
        denials = [e for e in await admin.execute_command("ACL", "LOG") if e[b"object"] != b"client"]
        assert denials == []
    finally:
        await admission.stop()
        await gateway.aclose()
        await admin.aclose()
        acl.server.stop()
