"""Every taxonomy class reaches clients through a live server with its own code and message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from structlog.testing import capture_logs

from services.common import errors
from services.common.grpc_server import GrpcServer, create_grpc_server
from services.common.settings import ServiceSettings

pytestmark = pytest.mark.integration

TAXONOMY = [
    errors.MaasError,
    errors.InvalidArgument,
    errors.NotFound,
    errors.AlreadyExists,
    errors.FailedPrecondition,
    errors.Unavailable,
    errors.ResourceExhausted,
    errors.DeadlineExceeded,
    errors.Unimplemented,
]


async def _raise(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    name = request.decode()
    if name == "ValueError":
        raise ValueError("secret internals")
    if name == "ok":
        return b"fine"
    raise getattr(errors, name)(f"{name} happened")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    def add(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(_raise)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Errors", {"Raise": handler})])

    handle: GrpcServer = create_grpc_server(ServiceSettings(port=0), ["test.Errors"], add)
    await handle.server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as chan:
        yield chan
    await handle.server.stop(None)


@pytest.mark.parametrize("cls", TAXONOMY, ids=lambda c: c.__name__)
async def test_taxonomy_maps_to_status(channel: grpc.aio.Channel, cls: type[errors.MaasError]) -> None:
    call = channel.unary_unary("/test.Errors/Raise")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(cls.__name__.encode(), metadata=(("x-request-id", "req-42"),))
    assert info.value.code() == cls.grpc_code
    assert info.value.details() == f"{cls.__name__} happened"
    assert ("x-request-id", "req-42") in tuple(info.value.trailing_metadata() or ())


async def test_unexpected_error_is_internal_with_request_id_and_logged_once(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary("/test.Errors/Raise")
    with capture_logs() as logs:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"ValueError", metadata=(("x-request-id", "req-7"),))
        # The client sees the status before the server's interceptor writes its last line.
        async with asyncio.timeout(5):
            while not any(entry["event"] == "rpc_finished" for entry in logs):
                await asyncio.sleep(0.01)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error (request_id=req-7)"
    assert "secret" not in info.value.details()
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["rpc_internal_error"]
    finished = [entry for entry in logs if entry["event"] == "rpc_finished"]
    assert [entry["code"] for entry in finished] == ["INTERNAL"]


async def test_request_id_is_generated_and_returned(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary("/test.Errors/Raise")
    rpc = call(b"ok")
    assert await rpc == b"fine"
    ids = [value for key, value in await rpc.trailing_metadata() if key == "x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 32
