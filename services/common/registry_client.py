"""Async client of ``maas.registry.v1.ModelRegistry``, used by the gateway, workers and the CLI.

It speaks domain records (metadata.py) and raises taxonomy errors, never ``AioRpcError``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.errors import InvalidArgument, map_rpc_error
from services.common.grpc_server import MAX_MESSAGE_BYTES
from services.common.metadata import DeploymentRecord, ModelRecord, TensorSpec, VersionRecord

_T = TypeVar("_T")
UPLOAD_CHUNK_BYTES = 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _spec(msg: registry_pb2.TensorSpec) -> TensorSpec:
    return TensorSpec(name=msg.name, datatype=msg.datatype, shape=tuple(msg.shape))


def version_from_proto(msg: registry_pb2.Version) -> VersionRecord:
    """Convert a ``Version`` message into a domain record."""
    return VersionRecord(
        model=msg.model,
        version=msg.version,
        sha256=msg.sha256,
        size_bytes=msg.size_bytes,
        inputs=tuple(_spec(t) for t in msg.inputs),
        outputs=tuple(_spec(t) for t in msg.outputs),
        created_at_ms=msg.created_at_ms,
        platform=msg.platform,
    )


def deployment_from_proto(msg: registry_pb2.Deployment) -> DeploymentRecord:
    """Convert a ``Deployment`` message into a domain record."""
    return DeploymentRecord(
        model=msg.model,
        version=msg.version,
        max_batch_size=msg.max_batch_size,
        max_wait_ms=msg.max_wait_ms,
        pool=msg.pool,
        max_queue_length=msg.max_queue_length,
        updated_at_ms=msg.updated_at_ms,
    )


def model_from_proto(msg: registry_pb2.Model) -> ModelRecord:
    """Convert a ``Model`` message into a domain record."""
    return ModelRecord(
        name=msg.name,
        description=msg.description,
        latest_version=msg.latest_version,
        created_at_ms=msg.created_at_ms,
        deployment=deployment_from_proto(msg.deployment) if msg.HasField("deployment") else None,
    )


class RegistryClient:
    """A ``grpc.aio`` channel to the registry with a timeout on every call."""

    def __init__(self, address: str, *, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def _call(self, method: Callable[..., Awaitable[_T]], request: Any) -> _T:
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "registry") from exc

    async def create_model(self, name: str, description: str = "") -> ModelRecord:
        """Create a model (AlreadyExists if taken)."""
        req = registry_pb2.CreateModelRequest(name=name, description=description)
        return model_from_proto((await self._call(self._stub.CreateModel, req)).model)

    async def get_model(self, name: str) -> ModelRecord:
        """Get a model with its deployment (NotFound if absent)."""
        req = registry_pb2.GetModelRequest(name=name)
        return model_from_proto((await self._call(self._stub.GetModel, req)).model)

    async def list_models(self) -> list[ModelRecord]:
        """List every model."""
        reply = await self._call(self._stub.ListModels, registry_pb2.ListModelsRequest())
        return [model_from_proto(m) for m in reply.models]

    async def delete_model(self, name: str) -> None:
        """Delete a model with its versions and deployment."""
        await self._call(self._stub.DeleteModel, registry_pb2.DeleteModelRequest(name=name))

    async def get_version(self, model: str, version: int = 0) -> VersionRecord:
        """Get one version (0: the latest)."""
        req = registry_pb2.GetVersionRequest(model=model, version=version)
        return version_from_proto((await self._call(self._stub.GetVersion, req)).version)

    async def list_versions(self, model: str) -> list[VersionRecord]:
        """List a model's versions, oldest first."""
        reply = await self._call(self._stub.ListVersions, registry_pb2.ListVersionsRequest(model=model))
        return [version_from_proto(v) for v in reply.versions]

    async def deploy(
        self,
        model: str,
        version: int = 0,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: int | None = None,
        pool: str | None = None,
        max_queue_length: int | None = None,
    ) -> DeploymentRecord:
        """Deploy a version (0: the latest); unset options take the registry's defaults."""
        req = registry_pb2.DeployRequest(
            model=model,
            version=version,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            pool=pool,
            max_queue_length=max_queue_length,
        )
        return deployment_from_proto((await self._call(self._stub.Deploy, req)).deployment)

    async def undeploy(self, model: str) -> None:
        """Remove a model's deployment."""
        await self._call(self._stub.Undeploy, registry_pb2.UndeployRequest(model=model))

    async def list_deployments(self, pool: str = "") -> list[DeploymentRecord]:
        """List deployments, of one pool if ``pool`` is given."""
        reply = await self._call(self._stub.ListDeployments, registry_pb2.ListDeploymentsRequest(pool=pool))
        return [deployment_from_proto(d) for d in reply.deployments]

    async def upload_version(self, model: str, data: bytes) -> VersionRecord:
        """Upload ``data`` as a new version of ``model`` in chunks, with its sha256 and size."""
        header = registry_pb2.UploadVersionHeader(
            model=model, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
        )

        async def requests() -> AsyncIterator[registry_pb2.UploadVersionRequest]:
            yield registry_pb2.UploadVersionRequest(header=header)
            for offset in range(0, len(data), UPLOAD_CHUNK_BYTES):
                yield registry_pb2.UploadVersionRequest(chunk=data[offset : offset + UPLOAD_CHUNK_BYTES])

        try:
            reply = await self._stub.UploadVersion(requests(), timeout=max(self.timeout_s, 300.0))
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "registry") from exc
        return version_from_proto(reply.version)

    async def download_version(self, model: str, version: int, dest: Path) -> VersionRecord:
        """Download a version's artifact to ``dest`` (written atomically, sha256 verified).

        Raises:
            InvalidArgument: The downloaded bytes do not match the version's sha256 or size.
        """
        req = registry_pb2.DownloadVersionRequest(model=model, version=version)
        record: VersionRecord | None = None
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        try:
            async for part in self._stub.DownloadVersion(req, timeout=max(self.timeout_s, 300.0)):
                if part.HasField("version"):
                    record = version_from_proto(part.version)
                else:
                    digest.update(part.chunk)
                    chunks.append(part.chunk)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "registry") from exc
        if record is None or digest.hexdigest() != record.sha256:
            message = f"download of model '{model}' version {version} is corrupt (sha256 mismatch)"
            raise InvalidArgument(message)
        await asyncio.get_running_loop().run_in_executor(None, _write_atomic, dest, b"".join(chunks))
        return record


def _write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
