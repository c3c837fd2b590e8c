"""The public ``inference.GRPCInferenceService`` (KServe v2 + the Triton extensions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from services.common.errors import Unimplemented
from services.gateway import convert
from services.gateway.router import Router
from services.gateway.streams import Streams

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(rpc: str) -> Unimplemented:
    return Unimplemented(f"{rpc} is not supported by the MaaS gateway; use ModelInfer with tensors in the request")


class GRPCInferenceServiceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 inference over the MaaS queue."""

    def __init__(self, router: Router, streams: Streams) -> None:
        self._router = router
        self._streams = streams

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

    async def _infer(self, request: pb.ModelInferRequest, time_remaining_s: float | None) -> pb.ModelInferResponse:
        # NOTE: the one path of a request, for ModelInfer and each request of ModelStreamInfer.
        self._router.check_request_size(convert.request_size(request))
        payload = await self._router.infer(convert.infer_call(request), time_remaining_s)
        return convert.infer_response(payload)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        """Describe a model as a Triton model configuration."""
        version, deployment = await self._router.model_config(request.name, request.version)
        return convert.model_config(version, deployment, self._router.limits)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        """Report this gateway's cumulative statistics."""
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

        async def infer(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
            return await self._infer(request, context.time_remaining())

        async for request, response, error in self._streams.serve(request_iterator, infer):
            yield convert.stream_response(request, response, error)

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        """Not supported: tensors travel in the request."""
        raise _unimplemented("SystemSharedMemoryStatus")

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        """Not supported: tensors travel in the request."""
        raise _unimplemented("SystemSharedMemoryRegister")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        """Not supported: tensors travel in the request."""
        raise _unimplemented("SystemSharedMemoryUnregister")

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        """Not supported: tensors travel in the request."""
        raise _unimplemented("CudaSharedMemoryStatus")

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        """Not supported: tensors travel in the request."""
        raise _unimplemented("CudaSharedMemoryRegister")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        """Not supported: tensors travel in the request."""
        raise _unimplemented("CudaSharedMemoryUnregister")

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        """Not supported: use the JSON logs and Prometheus metrics."""
        raise Unimplemented("TraceSetting is not supported by MaaS; use its JSON logs and Prometheus metrics")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        """Not supported: set MAAS_GATEWAY_LOG_LEVEL."""
        raise Unimplemented("LogSettings is not supported by MaaS; set MAAS_GATEWAY_LOG_LEVEL and restart")
