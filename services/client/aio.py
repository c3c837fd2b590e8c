"""``AsyncMaasClient``: inference through the gateway and model management through the registry, on asyncio."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import grpc
import numpy.typing as npt

from inference import grpc_service_pb2_grpc
from services.client import convert
from services.client.results import InferResult, ModelMetadata
from services.common.auth import ApiKeyRecord, TenantRecord
from services.common.errors import AlreadyExists
from services.common.metadata import DeploymentRecord, ModelRecord, VersionRecord
from services.common.registry_client import (
    MetadataSource,
    ProgressCallback,
    RegistryClient,
    call_upstream,
    create_channel,
    resolve_metadata,
)


class DeploySettings(TypedDict, total=False):
    """Deployment options; an option left out takes the registry's default."""

    max_batch_size: int
    max_wait_ms: int
    pool: str
    max_queue_length: int


class ClientOptions(TypedDict, total=False):
    """Keyword options of both clients; see ``AsyncMaasClient``."""

    credentials: grpc.ChannelCredentials | None
    metadata: MetadataSource
    timeout_s: float
    registry_timeout_s: float


class AsyncMaasClient:
    """A typed client of a MaaS gateway (KServe v2 inference) and registry (models, versions, deployments).

    Every failure is raised as a ``services.common.errors`` class whose ``grpc_code`` is the call's
    status: ``NotFound`` for an unknown model, ``InvalidArgument`` for a wrong shape or datatype,
    ``FailedPrecondition`` when nothing is deployed, ``Unavailable`` when a service cannot be reached.

    Aliases (e.g. ``production`` -> 3) are not offered: the registry has no alias RPC yet (issue 7).

    Args:
        gateway: host:port of the gateway.
        registry: host:port of the registry.
        credentials: TLS credentials for both channels; plaintext when None.
        metadata: Sent with every call: fixed ``(key, value)`` pairs, or a hook returning them before
            each call (e.g. for a token that expires).
        timeout_s: Default deadline of an inference call, in seconds.
        registry_timeout_s: Deadline of a registry call (uploads get at least 300 s).
    """

    def __init__(
        self,
        gateway: str = "127.0.0.1:8001",
        registry: str = "127.0.0.1:8002",
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: MetadataSource = (),
        timeout_s: float = 60.0,
        registry_timeout_s: float = 30.0,
    ) -> None:
        self.timeout_s = timeout_s
        self._metadata = metadata
        self._channel = create_channel(gateway, credentials)
        self._inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._registry = RegistryClient(
            registry, timeout_s=registry_timeout_s, credentials=credentials, metadata=metadata
        )

    async def close(self) -> None:
        """Close both channels."""
        await self._channel.close()
        await self._registry.close()

    async def __aenter__(self) -> AsyncMaasClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _gateway_call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        return await call_upstream(
            method,
            request,
            upstream="gateway",
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            metadata=resolve_metadata(self._metadata),
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        version: int | str | None = None,
        outputs: Iterable[str] = (),
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run a model once (KServe v2 ModelInfer with raw contents) and return its outputs.

        Args:
            model: The model's name.
            inputs: Arrays by input name; each one's numpy dtype picks its datatype (str, bytes and
                object arrays are BYTES).
            version: The version to run; None runs the deployed one.
            outputs: Names of the outputs to return; empty returns them all.
            timeout_s: Deadline of this call (the client's ``timeout_s`` when None).

        Returns:
            The outputs by name (a dict), with ``model_name`` and ``model_version`` of the model that answered.

        Raises:
            NotFound: The model or version does not exist.
            InvalidArgument: An input's name, datatype or shape does not match the model.
            FailedPrecondition: The model, or that version, is not deployed.
            ResourceExhausted: The model's queue is full.
            DeadlineExceeded: No reply by the deadline.
        """
        request = convert.infer_request(model, inputs, version=convert.version_string(version), outputs=outputs)
        return convert.infer_result(await self._gateway_call(self._inference.ModelInfer, request, timeout_s))

    async def model_metadata(
        self, model: str, *, version: int | str | None = None, timeout_s: float | None = None
    ) -> ModelMetadata:
        """Return a model's signature (of ``version``, or of the deployed one).

        Raises:
            NotFound: The model or version does not exist.
        """
        request = convert.metadata_request(model, convert.version_string(version))
        return convert.metadata_from_proto(await self._gateway_call(self._inference.ModelMetadata, request, timeout_s))

    async def model_ready(
        self, model: str, *, version: int | str | None = None, timeout_s: float | None = None
    ) -> bool:
        """Whether a live worker serves the model (``version``, or the deployed one)."""
        request = convert.ready_request(model, convert.version_string(version))
        return bool((await self._gateway_call(self._inference.ModelReady, request, timeout_s)).ready)

    async def push(
        self,
        name: str,
        artifact: bytes | str | os.PathLike[str],
        *,
        description: str | None = None,
        progress: ProgressCallback | None = None,
        class_labels: Sequence[str] = (),
    ) -> VersionRecord:
        """Upload an ONNX model as a new version of ``name``, creating the model if it does not exist.

        Concurrent pushes of a new name all succeed, each with its own version.

        Args:
            name: The model's name.
            artifact: The .onnx bytes, or the path of a file (streamed, never read whole into memory).
            description: Set when this call creates the model.
            progress: Called as ``progress(sent_bytes, total_bytes)`` as chunks are sent (on the
                event loop; on the client's loop thread for ``MaasClient``).
            class_labels: Labels of the classification extension, by class index (``class_count``).

        Returns:
            The new version (its number is ``.version``).

        Raises:
            InvalidArgument: The artifact is not an ONNX model that ONNX Runtime can load.
        """
        # Create-if-missing without a read first: when concurrent pushes race to create it, one wins
        # and the others' AlreadyExists is just as good (issue 7).
        with contextlib.suppress(AlreadyExists):
            await self._registry.create_model(name, description or "")
        data = artifact if isinstance(artifact, bytes) else Path(artifact)
        return await self._registry.upload_version(name, data, progress=progress, class_labels=class_labels)

    async def deploy(self, name: str, version: int = 0, **settings: Unpack[DeploySettings]) -> DeploymentRecord:
        """Deploy a version (0: the latest), replacing the model's current deployment.

        Raises:
            NotFound: The model or version does not exist.
            InvalidArgument: A setting is out of range.
        """
        return await self._registry.deploy(name, version, **settings)

    async def undeploy(self, name: str) -> None:
        """Remove a model's deployment."""
        await self._registry.undeploy(name)

    async def list_models(self) -> list[ModelRecord]:
        """List every model with its latest version and deployment."""
        return await self._registry.list_models()

    async def get_model(self, name: str) -> ModelRecord:
        """Return one model with its latest version and deployment (NotFound if absent)."""
        return await self._registry.get_model(name)

    async def list_versions(self, name: str) -> list[VersionRecord]:
        """List a model's versions, oldest first, with their signatures."""
        return await self._registry.list_versions(name)

    async def get_version(self, name: str, version: int = 0) -> VersionRecord:
        """Return one version (0: the latest) with its signature, size and sha256."""
        return await self._registry.get_version(name, version)

    async def delete_model(self, name: str) -> None:
        """Delete a model with all its versions and its deployment."""
        await self._registry.delete_model(name)

    async def create_tenant(self, name: str, description: str = "") -> TenantRecord:
        """Create a tenant (needs a key with the ``admin`` scope).

        Raises:
            AlreadyExists: The name is taken.
        """
        return await self._registry.create_tenant(name, description)

    async def list_tenants(self) -> list[TenantRecord]:
        """List the tenants by name (``admin`` scope)."""
        return await self._registry.list_tenants()

    async def create_api_key(
        self, tenant: str, name: str, scopes: Sequence[str], *, models: Sequence[str] = (), expires_at_ms: int = 0
    ) -> tuple[ApiKeyRecord, str]:
        """Create an API key of ``tenant`` (``admin`` scope) and return its record and the key itself.

        Args:
            tenant: An existing tenant.
            name: A name for people and the audit log.
            scopes: Any of ``infer``, ``read``, ``write``, ``admin``.
            models: Model-name glob patterns the key may use (empty: every model).
            expires_at_ms: Unix time in ms after which the key is refused (0: never).

        Returns:
            The record and the key, which is shown only this once.

        Raises:
            NotFound: No such tenant.
            InvalidArgument: A name, scope, pattern or the expiry is invalid.
        """
        return await self._registry.create_api_key(tenant, name, scopes, models, expires_at_ms)

    async def list_api_keys(self, tenant: str = "") -> list[ApiKeyRecord]:
        """List API keys (of ``tenant``, or of all), never their secrets (``admin`` scope)."""
        return await self._registry.list_api_keys(tenant)

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord:
        """Revoke an API key by id (``admin`` scope); every server refuses it within about a second."""
        return await self._registry.revoke_api_key(key_id)
