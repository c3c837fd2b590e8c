"""OptimizeVersion: transforms derive normal versions with lineage and report, served through the gateway."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto, helper, numpy_helper

from services.client import AsyncMaasClient, FailedPrecondition, InvalidArgument, NotFound
from services.common import keys
from services.common.auth import SCOPES, bearer
from services.common.custom_ops import EXTENSIONS
from services.common.embedded_redis import EmbeddedRedis
from services.common.optimization import OperationRecord, OperationState
from services.common.queue import now_ms
from services.common.registry_client import RegistryClient
from services.registry.operations import OperationStore, new_operation_id
from tests.integration.suite import Suite, run_cli
from tests.models import affine_model, text_embedding_model

pytestmark = pytest.mark.integration

FEATURES, HIDDEN, CLASSES = 256, 256, 10


def mlp_model() -> bytes:
    """X [N, 256] -> MatMul 256x256 -> Relu -> MatMul 256x10 -> y [N, 10] (fixed-seed random weights)."""
    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array((rng.standard_normal((FEATURES, HIDDEN)) / 16).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((HIDDEN, CLASSES)) / 16).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def npz(rows: int = 16) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(1).standard_normal((rows, FEATURES)).astype(np.float32))
    return buffer.getvalue()


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    """The whole suite, with few latency iterations per report (the test is about function, not speed)."""
    running = await Suite(redis_server.url, tmp_path, registry={"optimize_latency_iterations": 3}).start()
    yield running
    await running.stop()


@pytest.fixture
async def client(suite: Suite) -> AsyncIterator[AsyncMaasClient]:
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as maas:
        await maas.push("mlp", mlp_model())
        await maas.deploy("mlp", 1)
        yield maas


async def _optimize(client: AsyncMaasClient, transform: str = "", **options: object) -> OperationRecord:
    started = await client.optimize("mlp", 1, transform, **options)  # type: ignore[arg-type]
    assert started.state in (OperationState.PENDING, OperationState.RUNNING)
    return await client.wait_operation(started.id)


async def test_each_transform_derives_a_version_with_lineage_and_report_served_close_to_the_source(
    suite: Suite, client: AsyncMaasClient
) -> None:
    x = np.random.default_rng(3).standard_normal((4, FEATURES)).astype(np.float32)
    expected = (await client.infer("mlp", {"x": x}, version=1))["y"]
    tolerances = {"graph": 1e-4, "int8-dynamic": 0.1, "int8-static": 0.2, "fp16": 0.02}
    for transform, tolerance in tolerances.items():
        operation = await _optimize(client, transform, max_abs_diff=tolerance)
        assert operation.state == OperationState.SUCCEEDED, operation.error_message
        (derived,) = operation.result_versions
        version = await client.get_version("mlp", derived)
        assert version.lineage is not None and version.report is not None
        assert version.lineage.source_version == 1 and version.lineage.transform == transform
        assert set(version.lineage.tool_versions) == {"onnx", "onnxruntime", "numpy"}
        assert operation.reports[0].version == derived and [o.name for o in version.report.outputs] == ["y"]
        assert version.report.outputs[0].max_abs_diff <= tolerance
        assert version.report.outputs[0].top1_agreement is not None
        assert [m.batch_size for m in version.report.latency] == [1, 8]
        assert [(t.name, t.datatype) for t in version.inputs] == [("x", "FP32")]  # fp16 keeps FP32 io
        assert [(t.name, t.datatype) for t in version.outputs] == [("y", "FP32")]
        if transform.startswith("int8"):
            assert version.report.variant_size_bytes * 3 <= version.report.source_size_bytes
        # A derived version is a normal version: a canary split with its source, called by number.
        await client.deploy("mlp", traffic={1: 50, derived: 50})
        assert suite.worker is not None
        await suite.worker.reconcile()
        got = (await client.infer("mlp", {"x": x}, version=derived))["y"]
        np.testing.assert_allclose(got, expected, atol=tolerance * 4)
    assert [v.version for v in await client.list_versions("mlp")] == [1, 2, 3, 4, 5]


async def test_a_tolerance_too_tight_fails_with_failed_precondition_and_creates_nothing(
    client: AsyncMaasClient,
) -> None:
    operation = await _optimize(client, "int8-dynamic", max_abs_diff=1e-9)
    assert operation.state == OperationState.FAILED and operation.error_code == "FAILED_PRECONDITION"
    assert "int8-dynamic: output 'y' max abs diff" in operation.error_message and "> 1e-09" in operation.error_message
    assert operation.result_versions == () and operation.reports[0].error
    assert [v.version for v in await client.list_versions("mlp")] == [1]


async def test_int8_static_calibrates_on_the_npz_or_on_random_rows_with_a_warning(client: AsyncMaasClient) -> None:
    with_npz = await _optimize(client, "int8-static", calibration=npz(), options={"per_channel": "true"})
    random = await _optimize(client, "int8-static")
    assert with_npz.state == random.state == OperationState.SUCCEEDED
    assert with_npz.reports[0].samples == 16 and not with_npz.reports[0].warnings
    assert any("random" in warning for warning in random.reports[0].warnings)
    lineage = (await client.get_version("mlp", with_npz.result_versions[0])).lineage
    assert lineage is not None and lineage.options["calibration"] == "npz" and lineage.options["per_channel"] == "true"


async def test_auto_keeps_the_fastest_and_reports_every_transform_tried(client: AsyncMaasClient) -> None:
    operation = await _optimize(client, auto=True, max_abs_diff=0.5)
    assert operation.state == OperationState.SUCCEEDED, operation.error_message
    assert [r.transform for r in operation.reports] == ["graph", "int8-dynamic", "int8-static"]
    (kept,) = [r for r in operation.reports if r.version]
    assert operation.result_versions == (kept.version,)
    fastest = min((r for r in operation.reports if not r.error), key=lambda r: r.p50_ms(1) or 0.0)
    assert kept.transform == fastest.transform


BAD_REQUESTS: list[tuple[dict[str, object], str]] = [
    ({"transform": "int4"}, "transform 'int4' is unknown"),
    ({"transform": ""}, "set transform"),
    ({"transform": "graph", "auto": True}, "set transform"),
    ({"transform": "graph", "device": "tpu"}, "device 'tpu' is unknown"),
    ({"transform": "graph", "max_abs_diff": -1.0}, "max_abs_diff must be >= 0"),
    ({"transform": "fp16", "options": {"per_channel": "true"}}, "options['per_channel'] is not an option of fp16"),
    ({"transform": "int8-dynamic", "options": {"per_channel": "yes"}}, "options['per_channel'] must be one of"),
]


async def test_bad_requests_are_invalid_argument_naming_the_field_and_unknown_ones_not_found(
    client: AsyncMaasClient,
) -> None:
    for options, message in BAD_REQUESTS:
        with pytest.raises(InvalidArgument) as caught:
            await client.optimize("mlp", 1, **options)  # type: ignore[arg-type]
        assert message in caught.value.message
    assert [v.version for v in await client.list_versions("mlp")] == [1]
    with pytest.raises(InvalidArgument, match="not an operation id"):
        await client.get_operation("nope")
    with pytest.raises(NotFound, match="operation"):
        await client.get_operation(new_operation_id())
    with pytest.raises(NotFound, match="version 9"):
        await client.optimize("mlp", 9, "graph")


async def test_versions_with_custom_operators_are_refused_before_any_operation(client: AsyncMaasClient) -> None:
    version = await client.push("embed", text_embedding_model(), custom_ops=[EXTENSIONS])
    with pytest.raises(FailedPrecondition, match=r"needs custom operators \(onnxruntime-extensions\)"):
        await client.optimize("embed", version.version, "int8-dynamic")
    assert [v.version for v in await client.list_versions("embed")] == [version.version]


async def test_an_abandoned_operation_is_failed_by_the_next_reader(suite: Suite, client: AsyncMaasClient) -> None:
    record = OperationRecord(
        id=new_operation_id(), model="mlp", source_version=1, transforms=("graph",), device="cpu",
        state=OperationState.RUNNING, created_at_ms=now_ms(),
    )  # fmt: skip
    stored = await OperationStore(suite.redis, ttl_s=60, lease_s=30).save(record)  # a live registry's lease
    assert (await client.get_operation(record.id)).state == OperationState.RUNNING
    expired = replace(stored, lease_until_ms=now_ms() - 1)  # its registry died: nobody renewed it
    await suite.redis.hset(keys.operation(record.id), "record", expired.to_json())
    seen = await client.get_operation(record.id)
    assert seen.state == OperationState.FAILED and seen.error_code == "UNAVAILABLE"
    assert "lease expired" in seen.error_message
    assert (await client.get_operation(record.id)) == seen


async def test_a_transform_past_its_time_limit_is_stopped_and_the_registry_keeps_serving(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    suite = await Suite(redis_server.url, tmp_path, registry={"optimize_timeout_s": 0.01}).start(with_worker=False)
    try:
        async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
            await client.push("mlp", mlp_model())
            operation = await _optimize(client, "int8-static")
            assert operation.state == OperationState.FAILED and operation.error_code == "DEADLINE_EXCEEDED"
            assert "optimize_timeout_s" in operation.error_message
            assert (await client.get_model("mlp")).latest_version == 1
    finally:
        await suite.stop()


async def test_the_cli_optimizes_polls_and_shows_lineage_and_report(suite: Suite, client: AsyncMaasClient) -> None:
    code, out, err = await run_cli(suite, "models", "optimize", "mlp", "--version", "1", "--transform", "graph")
    assert code == 0, err
    assert "SUCCEEDED" in out and "new version(s): 2" in out and "graph" in out
    code, out, err = await run_cli(
        suite, "models", "optimize", "mlp", "--transform", "int8-dynamic", "--option", "per_channel=true", "--no-wait"
    )
    assert code == 0, err
    operation_id = out.split()[1]
    code, out, err = await run_cli(suite, "models", "operation", operation_id, "--wait")
    assert code == 0, err
    assert "SUCCEEDED" in out and "new version(s): 3" in out
    code, out, err = await run_cli(suite, "models", "operation", operation_id)
    assert code == 0 and "SUCCEEDED" in out, err
    code, out, err = await run_cli(suite, "models", "show", "mlp", "--version", "3")
    assert code == 0, err
    assert "derived from v2 by int8-dynamic" in out and "per_channel=true" in out and "v3 report" in out


async def test_another_tenant_cannot_see_an_operation_until_the_model_is_shared(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    suite = await Suite(redis_server.url, tmp_path, registry={"optimize_latency_iterations": 3}, auth={}).start(
        with_worker=False
    )
    scopes = tuple(scope for scope in SCOPES if scope != "admin")
    clients: dict[str, RegistryClient] = {}
    try:
        for tenant in ("team-a", "team-b"):
            await suite.registry.create_tenant(tenant)
            key = (await suite.registry.create_api_key(tenant, "all", scopes))[1]
            clients[tenant] = RegistryClient(suite.registry_address, metadata=bearer(key))
        team_a, team_b = clients["team-a"], clients["team-b"]
        await team_a.create_model("owned")
        await team_a.upload_version("owned", affine_model())
        started = await team_a.optimize_version("owned", 1, "graph")
        for _ in range(2):  # while it runs, and once it ended
            with pytest.raises(NotFound, match=f"operation '{started.id}' not found"):
                await team_b.get_operation(started.id)
            with pytest.raises(NotFound, match=f"operation '{started.id}' not found"):
                async for _seen in team_b.watch_operation(started.id):
                    pass
            async for ended in team_a.watch_operation(started.id):  # noqa: B007  # the last one is kept
                pass
            assert ended.state == OperationState.SUCCEEDED, ended
        await team_a.share_model("owned", "team-b")
        assert (await team_b.get_operation(started.id)) == ended
    finally:
        for client in clients.values():
            await client.close()
        await suite.stop()


async def test_a_model_naming_the_default_domain_twice_is_quantised(client: AsyncMaasClient) -> None:
    model = onnx.load_from_string(mlp_model())
    model.opset_import.append(helper.make_opsetid("", 13))  # as skl2onnx writes them (maas models convert)
    version = await client.push("twice", model.SerializeToString())
    for transform in ("int8-dynamic", "int8-static"):
        started = await client.optimize("twice", version.version, transform)
        operation = await client.wait_operation(started.id)
        assert operation.state == OperationState.SUCCEEDED, operation.error_message
