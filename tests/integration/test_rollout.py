"""Aliases, canary splits, promotion and rollback, as clients see them (issue 7, points 1 and 2).

Each version of the test model answers a different constant (y = 2x + bias with x = 0, bias =
version), so a reply tells which version computed it, independently of the version it reports.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from services.common.errors import FailedPrecondition, InvalidArgument, MaasError, NotFound
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration

CLIENTS = 8
LOAD_S = 2.0


def _versioned(version: int, width: int = 4) -> bytes:
    """The model of ``version``: it answers ``version`` for an input of zeros."""
    return affine_model(width=width, bias=float(version))


async def _push_versions(suite: Suite, count: int, **deploy: int | str) -> None:
    """Create model 'm' with versions 1..count; deploy version 1."""
    await suite.push("m", _versioned(1), **deploy)
    for version in range(2, count + 1):
        await suite.registry.upload_version("m", _versioned(version))


async def _call(suite: Suite, version: str = "") -> int:
    """Call model 'm' and return the version that computed the answer (checked against the reply's)."""
    request = pb.ModelInferRequest(model_name="m", model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    reply = await suite.inference.ModelInfer(request, timeout=20)
    computed = np.frombuffer(reply.raw_output_contents[0], np.float32)
    assert len(set(computed.tolist())) == 1
    assert int(reply.model_version) == int(computed[0]), "the reply names another version than computed it"
    return int(computed[0])


async def _ready(suite: Suite, version: str = "") -> bool:
    return bool((await suite.inference.ModelReady(pb.ModelReadyRequest(name="m", version=version))).ready)


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.05)


async def _load(suite: Suite, version: str, changes: Callable[[], Awaitable[None]]) -> list[tuple[float, int]]:
    """Run CLIENTS callers of ``version`` for LOAD_S while ``changes`` runs; return (start, version) per call."""
    calls: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            started = time.monotonic()
            calls.append((started, await _call(suite, version)))

    async def change_then_stop() -> None:
        await changes()
        await asyncio.sleep(LOAD_S / 2)
        stop.set()

    await asyncio.gather(change_then_stop(), *(caller() for _ in range(CLIENTS)))
    return calls


# Aliases in the registry ----------------------------------------------------------------------


async def test_an_alias_is_set_moved_listed_and_deleted(suite: Suite) -> None:
    await _push_versions(suite, 2)
    assert await suite.registry.set_alias("m", "production", 1) == ("production", 1)
    assert await suite.registry.set_alias("m", "staging", 2) == ("staging", 2)
    assert await suite.registry.set_alias("m", "production", 2) == ("production", 2)
    assert await suite.registry.list_aliases("m") == [("production", 2), ("staging", 2)]
    model = await suite.registry.get_model("m")
    assert model.aliases == (("production", 2), ("staging", 2))
    assert model.deployment is not None and model.deployment.aliased_versions == (2,)
    await suite.registry.delete_alias("m", "staging")
    assert await suite.registry.list_aliases("m") == [("production", 2)]
    [deployment] = await suite.registry.list_deployments()
    assert deployment.served_versions == (1, 2)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda r: r.set_alias("nope", "prod", 1), NotFound, "model 'nope' not found"),
        (lambda r: r.set_alias("m", "prod", 9), NotFound, "model 'm' has no version 9"),
        (lambda r: r.set_alias("m", "3", 1), InvalidArgument, "alias name '3' is invalid: it must not be a number"),
        (lambda r: r.set_alias("m", "a b", 1), InvalidArgument, "alias name 'a b' is invalid"),
        (lambda r: r.set_alias("m", "prod", 0), InvalidArgument, "version must be >= 1, got 0"),
        (lambda r: r.delete_alias("m", "prod"), NotFound, "model 'm' has no alias 'prod'"),
        (lambda r: r.delete_alias("nope", "prod"), NotFound, "model 'nope' not found"),
        (lambda r: r.list_aliases("nope"), NotFound, "model 'nope' not found"),
        (lambda r: r.rollback("m"), FailedPrecondition, "model 'm' has no previous traffic split"),
        (lambda r: r.rollback("idle"), NotFound, "model 'idle' is not deployed"),
        (lambda r: r.rollback("nope"), NotFound, "model 'nope' not found"),
        (lambda r: r.deploy("m", traffic=[(1, 90), (2, 20)]), InvalidArgument, "weights must sum to 100, got 110"),
        (lambda r: r.deploy("m", traffic=[(1, 100), (2, 0)]), InvalidArgument, "version 2 must be 1..100, got 0"),
        (lambda r: r.deploy("m", traffic=[(1, 50), (9, 50)]), NotFound, "model 'm' has no version 9"),
        (lambda r: r.deploy("m", 1, traffic=[(1, 100)]), InvalidArgument, "set version or traffic, not both"),
    ],
)
async def test_every_new_rpc_answers_its_error_codes(
    suite: Suite, call: Callable[..., Awaitable[object]], error: type[MaasError], message: str
) -> None:
    await _push_versions(suite, 2)
    await suite.registry.create_model("idle")
    with pytest.raises(MaasError) as info:
        await call(suite.registry)
    assert type(info.value) is error
    assert message in info.value.message


async def test_deleting_a_model_deletes_its_aliases(suite: Suite) -> None:
    await _push_versions(suite, 1)
    await suite.registry.set_alias("m", "production", 1)
    await suite.registry.delete_model("m")
    await suite.registry.create_model("m")
    assert await suite.registry.list_aliases("m") == []


# Resolution by the gateway ------------------------------------------------------------------


async def test_calls_resolve_a_number_an_alias_and_the_default_alias(suite: Suite) -> None:
    await _push_versions(suite, 3)
    await suite.registry.set_alias("m", "canary", 2)  # not in the split: the worker loads it
    assert await _call(suite, "canary") == 2
    assert await _call(suite, "") == 1
    assert await _call(suite, "1") == 1
    await suite.registry.set_alias("m", "default", 3)
    await _eventually(lambda: _ready(suite, "3"))
    assert {await _call(suite, "") for _ in range(5)} == {3}
    await suite.registry.delete_alias("m", "default")
    assert {await _call(suite, "") for _ in range(5)} == {1}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(suite, "nightly")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "model_version for model 'm' must be a positive integer, got 'nightly', "
        "which is not an alias of the model either (its aliases: canary)"
    )


async def test_a_version_neither_weighted_nor_aliased_is_failed_precondition(suite: Suite) -> None:
    await _push_versions(suite, 3)
    await suite.registry.deploy("m", traffic=[(1, 50), (2, 50)])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(suite, "3")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "model 'm' version 3 is not deployed; the deployed versions are 1, 2"


async def test_model_ready_and_metadata_answer_per_version_and_alias(suite: Suite) -> None:
    await _push_versions(suite, 1)
    await suite.registry.upload_version("m", _versioned(2, width=3))
    assert not await _ready(suite, "2")
    await suite.registry.set_alias("m", "narrow", 2)
    await _eventually(lambda: _ready(suite, "narrow"))
    assert await _ready(suite, "2") and await _ready(suite, "1") and await _ready(suite)

    async def metadata(version: str) -> tuple[list[str], list[int]]:
        reply = await suite.inference.ModelMetadata(pb.ModelMetadataRequest(name="m", version=version))
        return list(reply.versions), list(reply.inputs[0].shape)

    assert await metadata("") == (["1"], [-1, 4])
    assert await metadata("narrow") == (["2"], [-1, 3])
    assert await metadata("2") == (["2"], [-1, 3])
    config = await suite.inference.ModelConfig(pb.ModelConfigRequest(name="m", version="narrow"))
    assert [list(i.dims) for i in config.config.input] == [[3]]
    await suite.registry.set_alias("m", "default", 2)
    assert await metadata("") == (["2"], [-1, 3])


# Under load -----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_an_alias_move_under_load_fails_and_misroutes_no_call(suite: Suite) -> None:
    await _push_versions(suite, 2)
    await suite.registry.set_alias("m", "production", 1)
    moved_at: list[float] = []

    async def move() -> None:
        await asyncio.sleep(LOAD_S / 2)
        await suite.registry.set_alias("m", "production", 2)
        moved_at.append(time.monotonic())

    calls = await _load(suite, "production", move)  # _call checks every reply against its output
    assert len(calls) > 20
    # The bound: every call started 100 ms after the move is served by the new version.
    late = [version for started, version in calls if started > moved_at[0] + 0.1]
    assert late and set(late) == {2}
    assert {version for started, version in calls if started < moved_at[0] - 0.5} == {1}


@pytest.mark.timeout(120)
async def test_a_90_10_split_holds_within_3_percent_over_2000_calls(suite: Suite) -> None:
    await _push_versions(suite, 2)
    await suite.registry.deploy("m", traffic=[(1, 90), (2, 10)])
    await _eventually(lambda: _ready(suite))
    limit = asyncio.Semaphore(16)

    async def one() -> int:
        async with limit:
            return await _call(suite)

    counts = Counter(await asyncio.gather(*(one() for _ in range(2000))))
    assert set(counts) == {1, 2}
    assert abs(counts[2] / 2000 - 0.10) <= 0.03, counts
    # An explicit version or alias bypasses the split.
    await suite.registry.set_alias("m", "candidate", 2)
    assert {await _call(suite, "2") for _ in range(30)} == {2}
    assert {await _call(suite, "candidate") for _ in range(30)} == {2}
    assert {await _call(suite, "1") for _ in range(30)} == {1}


@pytest.mark.timeout(120)
async def test_promote_and_rollback_under_load_fail_no_call(suite: Suite) -> None:
    await _push_versions(suite, 2, max_batch_size=4)
    await suite.registry.deploy("m", traffic=[(1, 90), (2, 10)], max_batch_size=4)
    await _eventually(lambda: _ready(suite))
    marks: dict[str, float] = {}

    async def promote_then_roll_back() -> None:
        await asyncio.sleep(LOAD_S / 3)
        await suite.registry.deploy("m", traffic=[(2, 100)], max_batch_size=4)
        marks["promoted"] = time.monotonic()
        await asyncio.sleep(LOAD_S / 3)
        marks["rolling_back"] = time.monotonic()  # calls started later may see the rollback
        rolled = await suite.registry.rollback("m")
        marks["rolled_back"] = time.monotonic()
        assert rolled.split == ((1, 90), (2, 10)) and rolled.previous_traffic == ((2, 100),)
        assert rolled.max_batch_size == 4

    calls = await _load(suite, "", promote_then_roll_back)  # any failed call raises out of gather
    promoted = [v for started, v in calls if marks["promoted"] + 0.1 < started < marks["rolling_back"]]
    assert promoted and set(promoted) == {2}
    assert {v for started, v in calls if started > marks["rolled_back"] + 0.1} == {1, 2}
    # The version that lost its weight is unloaded once its queue is empty (after a short grace).
    assert suite.worker is not None
    await suite.registry.deploy("m", traffic=[(2, 100)], max_batch_size=4)
    await _eventually(lambda: _served(suite, ["m:2"]))
    model = await suite.registry.get_model("m")
    assert model.deployment is not None and model.deployment.previous_traffic == ((1, 90), (2, 10))


async def _served(suite: Suite, expected: list[str]) -> bool:
    assert suite.worker is not None
    await suite.worker.reconcile()
    return suite.worker.served_models == expected
