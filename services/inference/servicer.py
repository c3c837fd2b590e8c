"""``inference.GRPCInferenceService`` served by a worker directly (queue-less: debugging, benchmarks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn, TypeAlias

import grpc

from inference import grpc_service_pb2 as pb
from services.common.errors import Unimplemented
from services.inference import convert
from services.inference.access import DirectAccess
from services.inference.runtime import parse_version
from services.inference.worker import InferenceWorker

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(rpc: str) -> NoReturn:
    raise Unimplemented(f"{rpc} is not served by inference workers; use the gateway")


class GRPCInferenceServiceServicer:
    """Health, metadata and inference of the models this worker has loaded.

    A model the calling key's tenant may not see answers as on the gateway (``DirectAccess``).
    """

    def __init__(self, worker: InferenceWorker, access: DirectAccess) -> None:
        self._worker = worker
        self._access = access

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        """Report the process is live."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        """Report whether the first reconcile has loaded the deployments."""
        return pb.ServerReadyResponse(ready=self._worker.is_ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        """Report whether a model version is loaded here."""
        await self._access.check(request.name)
        is_ready = self._worker.is_model_ready(request.name, parse_version(request.version))
        return pb.ModelReadyResponse(ready=is_ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        """Describe a loaded model's signature."""
        await self._access.check(request.name)
        runtime = self._worker.runtime(request.name, parse_version(request.version))
        return convert.model_metadata_to_proto(runtime, self._worker.versions(request.name))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        """Run one request on the loaded model, without queue or batching."""
        await self._access.check(request.model_name)
        result = await self._worker.infer(convert.infer_request_from_proto(request))
        return convert.infer_response_to_proto(result)

    async def ServerMetadata(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("ServerMetadata")

    async def ModelStreamInfer(self, request_iterator: Any, context: Context) -> AsyncIterator[Any]:
        """Not served here."""
        _unimplemented("ModelStreamInfer")
        yield  # makes this an async generator, as streaming handlers must be

    async def ModelConfig(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("ModelConfig")

    async def ModelStatistics(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("ModelStatistics")

    async def RepositoryIndex(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("RepositoryIndex")

    async def RepositoryModelLoad(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("RepositoryModelLoad")

    async def RepositoryModelUnload(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("RepositoryModelUnload")

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("SystemSharedMemoryStatus")

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("SystemSharedMemoryRegister")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("SystemSharedMemoryUnregister")

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("CudaSharedMemoryStatus")

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("CudaSharedMemoryRegister")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("CudaSharedMemoryUnregister")

    async def TraceSetting(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("TraceSetting")

    async def LogSettings(self, request: Any, context: Context) -> NoReturn:
        """Not served here."""
        _unimplemented("LogSettings")
