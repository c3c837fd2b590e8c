"""The public ``inference.GRPCInferenceService`` (KServe v2 + the Triton extensions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from services.common import auth
from services.common.errors import DeadlineExceeded, Unimplemented
from services.gateway import convert
from services.gateway.clients import Target
from services.gateway.router import Router
from services.gateway.shm import SharedMemoryRegistry
from services.gateway.streams import EndStream, Streams

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_STREAM_DEADLINE_S = 0.05
"""A stream request that times out this close to (or after) its stream's own deadline ends the
stream DEADLINE_EXCEEDED: as an answer it could reach the client before its deadline, or not."""


def _no_cuda() -> Unimplemented:
    return Unimplemented(
        "CUDA shared memory is not supported: the MaaS gateway has no GPU; "
        "use system shared memory or send tensors in the request"
    )


class GRPCInferenceServiceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 inference over the MaaS queue."""

    def __init__(self, router: Router, streams: Streams, shared_memory: SharedMemoryRegistry) -> None:
        self._router = router
        self._streams = streams
        self._shared_memory = shared_memory

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        """Report liveness."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        """Report readiness (Redis reachable)."""
        return pb.ServerReadyResponse(ready=await self._router.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        """Report whether a live worker serves the model's deployed version."""
        return pb.ModelReadyResponse(ready=await self._router.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        """Describe the server."""
        return convert.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        """Describe a model's signature."""
        return convert.model_metadata(*await self._router.model_metadata(request.name, request.version))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        """Run inference through the model's queue."""
        return await self._infer(request, context.time_remaining())

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining_s: float | None, target: Target | None = None
    ) -> pb.ModelInferResponse:
        # NOTE: the one path of a request, for ModelInfer and each request of ModelStreamInfer;
        # the key's model check is here so a refused request of a stream is that request's answer.
        auth.check_model(request.model_name)
        use = convert.shared_memory_use(request)
        self._router.check_request_size(convert.request_size(request) + use.input_bytes)
        with self._shared_memory.lease(use) as lease:  # inputs read before, outputs written after
            if use:
                convert.put_shared_memory_inputs(request, lease.read_inputs())
            payload = await self._router.infer(convert.infer_call(request), time_remaining_s, target)
            response = convert.infer_response(payload)
            if use.outputs:
                lease.write_outputs(convert.take_shared_memory_outputs(response, use))
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        """Describe a model as a Triton model configuration."""
        version, deployment = await self._router.model_config(request.name, request.version)
        return convert.model_config(version, deployment, self._router.limits)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        """Report cluster-wide cumulative statistics (kept in Redis by workers and gateways)."""
        return convert.model_statistics(await self._router.model_statistics(request.name, request.version))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        """List the registry's models."""
        return convert.repository_index(await self._router.repository_index())

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        """Deploy a model's latest version unless it is deployed; apply a ``config`` parameter's changes."""
        await self._router.load(request.model_name, convert.load_overrides(request))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        """Undeploy a model."""
        await self._router.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Run each request of the stream through the queue; answer each as it completes."""
        # NOTE: headers go out at once (the key was accepted by now), so a client can wait for
        # them before writing: a write racing a refused stream's end makes the client library
        # report INTERNAL ("Internal error from Core") instead of the server's status.
        await context.send_initial_metadata(())

        async def answers(request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
            try:
                async for response in self._stream_answers(request, context):
                    yield response
            except DeadlineExceeded as exc:
                remaining = context.time_remaining()
                if remaining is not None and remaining < _STREAM_DEADLINE_S:
                    raise EndStream(exc) from None
                raise

        async for request, response, error in self._streams.serve(request_iterator, answers):
            yield convert.stream_response(request, response, error)

    async def _stream_answers(
        self, request: pb.ModelInferRequest, context: Context
    ) -> AsyncIterator[pb.ModelInferResponse]:
        """The answers to one request of a stream: one response, or a generation's several."""
        auth.check_model(request.model_name)
        # NOTE: resolved once: a split's pick decides both the kind of answer and where it runs.
        target = await self._router.resolve(request.model_name, request.model_version)
        if not target.is_generative:
            yield await self._infer(request, context.time_remaining(), target)
            return
        self._router.check_request_size(convert.request_size(request))  # as _infer does for the others
        async for piece in self._router.generate(convert.infer_call(request), context.time_remaining(), target):
            yield convert.generation_response(request, piece)

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        """Describe a registered system shared memory region (every region when no name is given)."""
        return convert.shared_memory_status(self._shared_memory.status(request.name))

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        """Register a region of a POSIX shared memory object on the gateway's host."""
        self._shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        """Unregister a system shared memory region (every region when no name is given)."""
        self._shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        """Not supported: the gateway has no GPU."""
        raise _no_cuda()

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        """Not supported: the gateway has no GPU."""
        raise _no_cuda()

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        """Not supported: the gateway has no GPU."""
        raise _no_cuda()

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        """Not supported: use the JSON logs and Prometheus metrics."""
        raise Unimplemented("TraceSetting is not supported by MaaS; use its JSON logs and Prometheus metrics")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        """Not supported: set MAAS_GATEWAY_LOG_LEVEL."""
        raise Unimplemented("LogSettings is not supported by MaaS; set MAAS_GATEWAY_LOG_LEVEL and restart")
