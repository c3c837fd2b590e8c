"""Async client of ``maas.registry.v1.ModelRegistry``, used by the gateway, workers and the CLI.

It speaks domain records (metadata.py) and raises taxonomy errors, never ``AioRpcError``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc

from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.auth import ApiKeyRecord, TenantQuota, TenantRecord
from services.common.bundle_files import (
    BundleWriter,
    directory_lock,
    file_digest,
    is_complete,
    part_lock,
    part_sizes,
    scan_directory,
)
from services.common.errors import InvalidArgument, map_rpc_error
from services.common.events import Event
from services.common.grpc_server import MAX_MESSAGE_BYTES
from services.common.metadata import (
    SINGLE_FILE_ENTRY,
    BundleFile,
    DeploymentRecord,
    ModelRecord,
    Split,
    TensorSpec,
    VersionRecord,
)
from services.common.optimization import OperationRecord
from services.common.optimization_proto import lineage_from_proto, operation_from_proto, version_report_from_proto
from services.common.stats import CallWindow
from services.common.status import ClusterStatus, QueueStatus, WorkerStatus
from services.common.usage import TenantUsage

_T = TypeVar("_T")
UPLOAD_CHUNK_BYTES = 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
CallMetadata: TypeAlias = Sequence[tuple[str, str]]
MetadataSource: TypeAlias = CallMetadata | Callable[[], CallMetadata]
"""Metadata sent with every call: fixed pairs, or a hook called before each call (e.g. a fresh token)."""
_GrpcMetadata: TypeAlias = tuple[tuple[str, str], ...] | None
ProgressCallback: TypeAlias = Callable[[int, int], None]
"""Called as ``progress(sent_bytes, total_bytes)`` after each uploaded chunk."""
TRANSFER_BASE_S = 300.0
"""Least deadline of an upload or download, whatever its size."""
DEFAULT_MIN_TRANSFER_BYTES_PER_S = 1024 * 1024
"""Slowest link an upload or download is given time for (1 MiB/s: 1 s more per MiB)."""


def transfer_timeout_s(size_bytes: int, timeout_s: float, min_bytes_per_s: float) -> float:
    """Return the deadline of an upload or download of ``size_bytes``.

    ``max(timeout_s, TRANSFER_BASE_S)`` plus the time the bytes take at ``min_bytes_per_s``, so a
    multi-GiB bundle on a slow link is not cut off (a 10 GiB bundle at 1 MiB/s: 300 s + 10240 s).
    """
    return max(timeout_s, TRANSFER_BASE_S) + size_bytes / min_bytes_per_s


def create_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """Open a ``grpc.aio`` channel with MaaS's message size limits (TLS when ``credentials`` are given)."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)


def resolve_metadata(source: MetadataSource) -> _GrpcMetadata:
    """Return the metadata to send with the next call (the hook's answer, if ``source`` is one)."""
    return tuple(source() if callable(source) else source) or None


async def call_upstream(
    method: Callable[..., Awaitable[_T]], request: Any, *, upstream: str, timeout_s: float, metadata: _GrpcMetadata
) -> _T:
    """Await one unary call, raising its failure as a taxonomy error.

    Raises:
        MaasError: The subclass matching the call's status code (see ``map_rpc_error``).
    """
    try:
        return await method(request, timeout=timeout_s, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        raise map_rpc_error(exc, upstream) from exc


def _spec(msg: registry_pb2.TensorSpec) -> TensorSpec:
    return TensorSpec(name=msg.name, datatype=msg.datatype, shape=tuple(msg.shape))


def _bundle_file(msg: registry_pb2.BundleFile) -> BundleFile:
    return BundleFile(path=msg.path, size_bytes=msg.size_bytes, sha256=msg.sha256)


def _bundle_file_to_pb(file: BundleFile) -> registry_pb2.BundleFile:
    return registry_pb2.BundleFile(path=file.path, size_bytes=file.size_bytes, sha256=file.sha256)


def _files(msg: registry_pb2.Version) -> tuple[BundleFile, ...]:
    """A version's files; empty for a single-file version (one ``model.onnx`` with the version's sha256)."""
    files = tuple(_bundle_file(f) for f in msg.files)
    is_single = len(files) == 1 and files[0].path == SINGLE_FILE_ENTRY and files[0].sha256 == msg.sha256
    return () if is_single else files


def version_from_proto(msg: registry_pb2.Version) -> VersionRecord:
    """Convert a ``Version`` message into a domain record."""
    files = _files(msg)
    return VersionRecord(
        model=msg.model,
        version=msg.version,
        sha256=msg.sha256,
        size_bytes=msg.size_bytes,
        inputs=tuple(_spec(t) for t in msg.inputs),
        outputs=tuple(_spec(t) for t in msg.outputs),
        created_at_ms=msg.created_at_ms,
        platform=msg.platform,
        class_labels=tuple(msg.class_labels),
        description=msg.description,
        labels=dict(msg.labels),
        pushed_by=msg.pushed_by,
        custom_ops=tuple(msg.custom_ops),
        files=files,
        entry_point=msg.entry_point if files else "",
        lineage=lineage_from_proto(msg),
        report=version_report_from_proto(msg),
    )


def event_from_proto(msg: registry_pb2.Event) -> Event:
    """Convert an ``Event`` message into a domain record (its time is in its id)."""
    return Event(id=msg.id, kind=msg.kind, model=msg.model, version=msg.version)


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
        traffic=_split(msg.traffic),
        previous_traffic=_split(msg.previous_traffic),
        aliased_versions=tuple(msg.aliased_versions),
    )


def _split(pairs: Iterable[registry_pb2.VersionWeight]) -> Split:
    return tuple((pair.version, pair.weight) for pair in pairs)


def model_from_proto(msg: registry_pb2.Model) -> ModelRecord:
    """Convert a ``Model`` message into a domain record."""
    return ModelRecord(
        name=msg.name,
        description=msg.description,
        latest_version=msg.latest_version,
        created_at_ms=msg.created_at_ms,
        deployment=deployment_from_proto(msg.deployment) if msg.HasField("deployment") else None,
        aliases=tuple((alias.name, alias.version) for alias in msg.aliases),
        owner=msg.owner,
        shared_with=tuple(msg.shared_with),
    )


def tenant_from_proto(msg: registry_pb2.Tenant) -> TenantRecord:
    """Convert a ``Tenant`` message into a domain record."""
    quota = TenantQuota(rps=msg.quota.rps, burst=msg.quota.burst, max_in_flight=msg.quota.max_in_flight)
    return TenantRecord(name=msg.name, description=msg.description, created_at_ms=msg.created_at_ms, quota=quota)


def usage_from_proto(msg: registry_pb2.TenantUsage) -> TenantUsage:
    """Convert a ``TenantUsage`` message into a domain record."""
    return TenantUsage(calls=msg.calls, errors=msg.errors, compute_ns=round(msg.compute_seconds * 1e9))


def cluster_status_from_proto(msg: registry_pb2.GetClusterStatusResponse) -> ClusterStatus:
    """Convert a ``GetClusterStatusResponse`` into a domain record."""
    workers = tuple(
        WorkerStatus(
            w.worker_id,
            w.pool,
            w.host,
            tuple(w.providers),
            tuple(w.models),
            w.in_flight,
            w.heartbeat_age_ms,
            tuple(w.load_errors),
            w.generations,
            w.max_generations,
        )
        for w in msg.workers
    )
    queues = tuple(
        QueueStatus(
            q.model, q.version, q.pool, q.workers, q.length, q.pending, q.oldest_age_ms,
            CallWindow(q.window_s, q.calls_per_s, q.errors_per_s, q.p50_ms, q.p99_ms),
        )
        for q in msg.queues
    )  # fmt: skip
    return ClusterStatus(workers=workers, queues=queues, time_ms=msg.time_ms)


def api_key_from_proto(msg: registry_pb2.ApiKey) -> ApiKeyRecord:
    """Convert an ``ApiKey`` message into a domain record (it carries no secret)."""
    return ApiKeyRecord(
        id=msg.id,
        tenant=msg.tenant,
        name=msg.name,
        scopes=tuple(msg.scopes),
        models=tuple(msg.models),
        created_at_ms=msg.created_at_ms,
        expires_at_ms=msg.expires_at_ms,
        revoked=msg.revoked,
    )


class RegistryClient:
    """A ``grpc.aio`` channel to the registry with a timeout on every call."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: MetadataSource = (),
        min_transfer_bytes_per_s: float = DEFAULT_MIN_TRANSFER_BYTES_PER_S,
    ) -> None:
        if min_transfer_bytes_per_s <= 0:
            raise ValueError(f"min_transfer_bytes_per_s must be > 0, got {min_transfer_bytes_per_s}")
        self.address = address
        self.timeout_s = timeout_s
        self.min_transfer_bytes_per_s = min_transfer_bytes_per_s
        """Uploads and downloads get ``transfer_timeout_s`` for their size at this throughput."""
        self._metadata_source = metadata
        self._channel = create_channel(address, credentials)
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    def transfer_timeout_s(self, size_bytes: int) -> float:
        """Return the deadline of an upload or download of ``size_bytes`` (see ``transfer_timeout_s``)."""
        return transfer_timeout_s(size_bytes, self.timeout_s, self.min_transfer_bytes_per_s)

    async def _call(self, method: Callable[..., Awaitable[_T]], request: Any) -> _T:
        metadata = resolve_metadata(self._metadata_source)
        return await call_upstream(method, request, upstream="registry", timeout_s=self.timeout_s, metadata=metadata)

    async def create_model(self, name: str, description: str = "") -> ModelRecord:
        """Create a model (AlreadyExists if taken)."""
        req = registry_pb2.CreateModelRequest(name=name, description=description)
        return model_from_proto((await self._call(self._stub.CreateModel, req)).model)

    async def get_model(self, name: str) -> ModelRecord:
        """Get a model with its deployment (NotFound if absent)."""
        req = registry_pb2.GetModelRequest(name=name)
        return model_from_proto((await self._call(self._stub.GetModel, req)).model)

    async def list_models(self, prefix: str = "", labels: Mapping[str, str] | None = None) -> list[ModelRecord]:
        """List every model (whose name starts with ``prefix``, with a version carrying ``labels``), page by page."""
        return await _all_pages(lambda token: self.list_models_page(prefix, labels, page_token=token))

    async def list_models_page(
        self, prefix: str = "", labels: Mapping[str, str] | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ModelRecord], str]:
        """List one page of models by name; return them and the next page's token ("" after the last)."""
        req = registry_pb2.ListModelsRequest(
            page_size=page_size, page_token=page_token, name_prefix=prefix, labels=dict(labels or {})
        )
        reply = await self._call(self._stub.ListModels, req)
        return [model_from_proto(m) for m in reply.models], reply.next_page_token

    async def delete_model(self, name: str, *, force: bool | None = None) -> None:
        """Delete a model with its versions and deployment.

        Args:
            name: The model.
            force: True undeploys a deployed model first, False refuses it (FailedPrecondition),
                None leaves it to the registry's default (the same as True).
        """
        await self._call(self._stub.DeleteModel, registry_pb2.DeleteModelRequest(name=name, force=force))

    async def get_version(self, model: str, version: int = 0) -> VersionRecord:
        """Get one version (0: the latest)."""
        req = registry_pb2.GetVersionRequest(model=model, version=version)
        return version_from_proto((await self._call(self._stub.GetVersion, req)).version)

    async def list_versions(self, model: str, labels: Mapping[str, str] | None = None) -> list[VersionRecord]:
        """List a model's versions (those carrying ``labels``), oldest first, page by page."""
        return await _all_pages(lambda token: self.list_versions_page(model, labels, page_token=token))

    async def list_versions_page(
        self, model: str, labels: Mapping[str, str] | None = None, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[VersionRecord], str]:
        """List one page of a model's versions; return them and the next page's token ("" after the last)."""
        req = registry_pb2.ListVersionsRequest(
            model=model, page_size=page_size, page_token=page_token, labels=dict(labels or {})
        )
        reply = await self._call(self._stub.ListVersions, req)
        return [version_from_proto(v) for v in reply.versions], reply.next_page_token

    async def update_version(
        self,
        model: str,
        version: int,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        remove_labels: Sequence[str] = (),
    ) -> VersionRecord:
        """Change a version's description (None: unchanged, "": cleared) and labels (set, then removed keys)."""
        req = registry_pb2.UpdateVersionRequest(
            model=model,
            version=version,
            description=description,
            labels=dict(labels or {}),
            remove_labels=list(remove_labels),
        )
        return version_from_proto((await self._call(self._stub.UpdateVersion, req)).version)

    async def delete_version(self, model: str, version: int) -> None:
        """Delete a version (FailedPrecondition while it serves traffic or an alias points to it)."""
        await self._call(self._stub.DeleteVersion, registry_pb2.DeleteVersionRequest(model=model, version=version))

    async def watch_events(
        self, after_id: str = "", *, follow: bool = False, model: str = ""
    ) -> AsyncGenerator[Event, None]:
        """Yield the registry's events after ``after_id`` ("": from now on, "0": the oldest kept), in order.

        Without ``follow`` it ends after the events recorded so far; with it, it runs until closed
        (no deadline). To resume after an error, call it again with the id of the last event seen.

        Raises:
            FailedPrecondition: ``after_id`` is no longer kept (start again from "0" or "").
        """
        req = registry_pb2.WatchEventsRequest(after_id=after_id, follow=follow, model=model)
        timeout_s = None if follow else self.timeout_s
        call = self._stub.WatchEvents(req, timeout=timeout_s, metadata=resolve_metadata(self._metadata_source))
        try:
            async for reply in call:
                yield event_from_proto(reply.event)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "registry") from exc
        finally:
            call.cancel()

    async def deploy(
        self,
        model: str,
        version: int = 0,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: int | None = None,
        pool: str | None = None,
        max_queue_length: int | None = None,
        traffic: Iterable[tuple[int, int]] = (),
    ) -> DeploymentRecord:
        """Deploy a version (0: the latest), or a ``traffic`` split of (version, weight) pairs.

        Unset options take the registry's defaults.
        """
        req = registry_pb2.DeployRequest(
            model=model,
            version=version,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            pool=pool,
            max_queue_length=max_queue_length,
            traffic=[registry_pb2.VersionWeight(version=v, weight=w) for v, w in traffic],
        )
        return deployment_from_proto((await self._call(self._stub.Deploy, req)).deployment)

    async def rollback(self, model: str) -> DeploymentRecord:
        """Go back to the deployment's previous traffic split (FailedPrecondition if there is none)."""
        reply = await self._call(self._stub.Rollback, registry_pb2.RollbackRequest(model=model))
        return deployment_from_proto(reply.deployment)

    async def set_alias(self, model: str, alias: str, version: int) -> tuple[str, int]:
        """Point ``alias`` at a version of ``model`` (created or moved); return (alias, version)."""
        reply = await self._call(
            self._stub.SetAlias, registry_pb2.SetAliasRequest(model=model, alias=alias, version=version)
        )
        return reply.alias.name, reply.alias.version

    async def delete_alias(self, model: str, alias: str) -> None:
        """Remove an alias (NotFound if the model has no such alias)."""
        await self._call(self._stub.DeleteAlias, registry_pb2.DeleteAliasRequest(model=model, alias=alias))

    async def list_aliases(self, model: str) -> list[tuple[str, int]]:
        """List a model's aliases as (alias, version), by alias."""
        reply = await self._call(self._stub.ListAliases, registry_pb2.ListAliasesRequest(model=model))
        return [(alias.name, alias.version) for alias in reply.aliases]

    async def undeploy(self, model: str) -> None:
        """Remove a model's deployment."""
        await self._call(self._stub.Undeploy, registry_pb2.UndeployRequest(model=model))

    async def list_deployments(self, pool: str = "") -> list[DeploymentRecord]:
        """List deployments, of one pool if ``pool`` is given."""
        reply = await self._call(self._stub.ListDeployments, registry_pb2.ListDeploymentsRequest(pool=pool))
        return [deployment_from_proto(d) for d in reply.deployments]

    async def share_model(self, name: str, tenant: str) -> ModelRecord:
        """Share a model with a tenant (read and infer; the owner tenant's key or an admin's)."""
        req = registry_pb2.ShareModelRequest(name=name, tenant=tenant)
        return model_from_proto((await self._call(self._stub.ShareModel, req)).model)

    async def unshare_model(self, name: str, tenant: str) -> ModelRecord:
        """Stop sharing a model with a tenant (NotFound if it is not shared with it)."""
        req = registry_pb2.UnshareModelRequest(name=name, tenant=tenant)
        return model_from_proto((await self._call(self._stub.UnshareModel, req)).model)

    async def create_tenant(self, name: str, description: str = "") -> TenantRecord:
        """Create a tenant (admin scope; AlreadyExists if taken)."""
        req = registry_pb2.CreateTenantRequest(name=name, description=description)
        return tenant_from_proto((await self._call(self._stub.CreateTenant, req)).tenant)

    async def list_tenants(self) -> list[TenantRecord]:
        """List the tenants (admin scope)."""
        reply = await self._call(self._stub.ListTenants, registry_pb2.ListTenantsRequest())
        return [tenant_from_proto(t) for t in reply.tenants]

    async def tenant_report(self) -> list[tuple[TenantRecord, TenantUsage]]:
        """List the tenants with their cluster-wide usage (admin scope)."""
        reply = await self._call(self._stub.ListTenants, registry_pb2.ListTenantsRequest())
        return [(tenant_from_proto(t), usage_from_proto(t.usage)) for t in reply.tenants]

    async def get_cluster_status(self) -> ClusterStatus:
        """Return live workers and every deployed version's queue and last-minute calls (admin scope)."""
        reply = await self._call(self._stub.GetClusterStatus, registry_pb2.GetClusterStatusRequest())
        return cluster_status_from_proto(reply)

    async def set_tenant_quota(self, tenant: str, quota: TenantQuota) -> TenantRecord:
        """Set a tenant's quota at the gateways (admin scope)."""
        limits = registry_pb2.TenantQuota(rps=quota.rps, burst=quota.burst, max_in_flight=quota.max_in_flight)
        req = registry_pb2.SetTenantQuotaRequest(tenant=tenant, quota=limits)
        return tenant_from_proto((await self._call(self._stub.SetTenantQuota, req)).tenant)

    async def create_api_key(
        self, tenant: str, name: str, scopes: Sequence[str], models: Sequence[str] = (), expires_at_ms: int = 0
    ) -> tuple[ApiKeyRecord, str]:
        """Create an API key (admin scope); return its record and the key, shown only this once."""
        req = registry_pb2.CreateApiKeyRequest(
            tenant=tenant, name=name, scopes=list(scopes), models=list(models), expires_at_ms=expires_at_ms
        )
        reply = await self._call(self._stub.CreateApiKey, req)
        return api_key_from_proto(reply.api_key), reply.key

    async def list_api_keys(self, tenant: str = "") -> list[ApiKeyRecord]:
        """List API keys, of one tenant if ``tenant`` is given (admin scope; never their secrets)."""
        reply = await self._call(self._stub.ListApiKeys, registry_pb2.ListApiKeysRequest(tenant=tenant))
        return [api_key_from_proto(k) for k in reply.api_keys]

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord:
        """Revoke an API key by id (admin scope)."""
        reply = await self._call(self._stub.RevokeApiKey, registry_pb2.RevokeApiKeyRequest(id=key_id))
        return api_key_from_proto(reply.api_key)

    async def optimize_version(
        self,
        model: str,
        version: int = 0,
        transform: str = "",
        *,
        is_auto: bool = False,
        device: str = "",
        max_abs_diff: float | None = None,
        options: Mapping[str, str] | None = None,
        calibration_npz: bytes = b"",
    ) -> OperationRecord:
        """Start an optimisation (``OptimizeVersion``); return the operation, PENDING."""
        request = registry_pb2.OptimizeVersionRequest(
            model=model, version=version, transform=transform, auto=is_auto, device=device,
            max_abs_diff=max_abs_diff, options=dict(options or {}), calibration_npz=calibration_npz,
        )  # fmt: skip
        reply = await self._call(self._stub.OptimizeVersion, request)
        return operation_from_proto(reply.operation)

    async def get_operation(self, operation_id: str) -> OperationRecord:
        """Return an optimisation operation (NotFound: unknown, expired or not visible)."""
        reply = await self._call(self._stub.GetOperation, registry_pb2.GetOperationRequest(id=operation_id))
        return operation_from_proto(reply.operation)

    async def watch_operation(self, operation_id: str) -> AsyncGenerator[OperationRecord, None]:
        """Yield an operation now and at each change until it ends (no deadline: it lasts the operation)."""
        req = registry_pb2.WatchOperationRequest(id=operation_id)
        call = self._stub.WatchOperation(req, metadata=resolve_metadata(self._metadata_source))
        try:
            async for reply in call:
                yield operation_from_proto(reply.operation)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "registry") from exc
        finally:
            call.cancel()

    async def upload_version(
        self,
        model: str,
        data: bytes | Path,
        *,
        progress: ProgressCallback | None = None,
        class_labels: Sequence[str] = (),
        description: str = "",
        labels: Mapping[str, str] | None = None,
        custom_ops: Sequence[str] = (),
    ) -> VersionRecord:
        """Upload ``data`` as a new version of ``model`` in chunks, with its sha256 and size.

        Args:
            model: The model, which must exist.
            data: The artifact, or the path of a file read chunk by chunk (never whole in memory).
            progress: Called as ``progress(sent_bytes, total_bytes)`` as chunks are sent; the last call
                has ``sent_bytes == total_bytes`` unless the registry refuses the upload first.
            class_labels: Labels of the classification extension, by class index (``class_count``).
            description: The version's description.
            labels: The version's labels.
            custom_ops: Custom-operator libraries the model needs (only ``onnxruntime-extensions``).

        Returns:
            The stored version.
        """
        sha256, size = await asyncio.to_thread(_digest, data)
        header = registry_pb2.UploadVersionHeader(
            model=model,
            sha256=sha256,
            size_bytes=size,
            class_labels=list(class_labels),
            description=description,
            labels=dict(labels or {}),
            custom_ops=list(custom_ops),
        )

        return await self._send_upload(header, [(None, data)], progress)

    async def download_version(
        self, model: str, version: int, dest: Path, *, progress: ProgressCallback | None = None
    ) -> VersionRecord:
        """Download a single-file version's artifact to ``dest``: streamed to disk, sha256 verified, moved in place.

        Memory stays at one chunk whatever the artifact's size; ``dest`` appears only whole and
        verified. Meanwhile ``<dest>.part`` holds the bytes: a download cut in transit keeps it,
        and the next one resumes from its length (the registry sends the rest; the whole file's
        sha256 is still checked, and a partial file that was not a prefix of it is downloaded
        again from its start). Processes downloading to one ``dest`` (workers sharing a cache)
        take turns on that file (``part_lock``): the later ones find ``dest`` in place.

        Args:
            model: The model.
            version: The version (0: the latest).
            dest: Where to write the artifact.
            progress: Called as ``progress(received_bytes, total_bytes)`` over the bytes still to come.

        Raises:
            InvalidArgument: The version is a bundle, or the downloaded bytes do not match its sha256 or size.
        """
        record = await self.get_version(model, version)
        if record.is_bundle:
            raise InvalidArgument(
                f"model '{model}' version {record.version} is a bundle of {len(record.files)} files: "
                "download it to a directory (download_bundle, `maas models pull NAME DIR/`)"
            )
        [file] = record.bundle_files
        local = BundleFile(dest.name, file.size_bytes, file.sha256)
        places = {file.path: dest.name}
        async with part_lock(dest):
            if await asyncio.to_thread(is_complete, dest.parent, local):
                return record
            resumable = await asyncio.to_thread(part_sizes, dest.parent, [local])
            offsets = {file.path: resumable[local.path]} if local.path in resumable else {}
            try:
                await self._download_files(record, [file], dest.parent, offsets, progress, places)
            except InvalidArgument:
                if not offsets:
                    raise
                await self._download_files(record, [file], dest.parent, {}, progress, places)
        return record

    async def upload_bundle(
        self,
        model: str,
        directory: Path,
        *,
        entry_point: str = "",
        progress: ProgressCallback | None = None,
        class_labels: Sequence[str] = (),
        description: str = "",
        labels: Mapping[str, str] | None = None,
        custom_ops: Sequence[str] = (),
    ) -> VersionRecord:
        """Upload every file under ``directory`` as one bundle version of ``model`` (format BUNDLE).

        Each file is hashed first (the header announces every file's sha256), then streamed a chunk
        at a time: memory stays at one chunk whatever the sizes.

        Args:
            model: The model, which must exist.
            directory: The bundle's root: the .onnx file, its external data, any other files.
            entry_point: Path of the .onnx file to load; empty: the only .onnx file at the top.
            progress: Called as ``progress(sent_bytes, total_bytes)`` as chunks are sent.
            class_labels: Labels of the classification extension, by class index.
            description: The version's description.
            labels: The version's labels.
            custom_ops: Custom-operator libraries the model needs (only ``onnxruntime-extensions``).

        Raises:
            InvalidArgument: A file is a link or breaks the path rule, or the registry refuses the bundle.
        """
        found = await asyncio.to_thread(scan_directory, directory)
        files = [file for file, _ in found]
        header = registry_pb2.UploadVersionHeader(
            model=model, size_bytes=sum(f.size_bytes for f in files), format=registry_pb2.ARTIFACT_FORMAT_BUNDLE,
            entry_point=entry_point, files=[_bundle_file_to_pb(f) for f in files], class_labels=list(class_labels),
            description=description, labels=dict(labels or {}), custom_ops=list(custom_ops),
        )  # fmt: skip

        return await self._send_upload(header, found, progress)

    async def upload_tar(
        self,
        model: str,
        archive: Path,
        *,
        entry_point: str = "",
        progress: ProgressCallback | None = None,
        class_labels: Sequence[str] = (),
        description: str = "",
        labels: Mapping[str, str] | None = None,
        custom_ops: Sequence[str] = (),
    ) -> VersionRecord:
        """Upload a tar archive of a bundle (format TAR); the registry extracts it safely.

        Arguments as ``upload_bundle``'s, with ``archive`` the .tar file (streamed in chunks).

        Raises:
            InvalidArgument: The registry refuses the archive (the message names the member).
        """
        sha256, size = await asyncio.to_thread(_digest, archive)
        header = registry_pb2.UploadVersionHeader(
            model=model, sha256=sha256, size_bytes=size, format=registry_pb2.ARTIFACT_FORMAT_TAR,
            entry_point=entry_point, class_labels=list(class_labels), description=description,
            labels=dict(labels or {}), custom_ops=list(custom_ops),
        )  # fmt: skip

        return await self._send_upload(header, [(None, archive)], progress)

    async def _send_upload(
        self,
        header: registry_pb2.UploadVersionHeader,
        parts: Sequence[tuple[BundleFile | None, bytes | Path]],
        progress: ProgressCallback | None,
    ) -> VersionRecord:
        """Send ``header`` and ``parts`` (``_upload_requests``) with a deadline that grows with the size."""
        metadata = resolve_metadata(self._metadata_source)
        timeout_s = self.transfer_timeout_s(header.size_bytes)
        requests = _upload_requests(header, parts, progress)
        try:
            reply = await self._stub.UploadVersion(requests, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "registry") from exc
        return version_from_proto(reply.version)

    async def download_bundle(
        self, model: str, version: int, dest: Path, *, progress: ProgressCallback | None = None
    ) -> VersionRecord:
        """Download a version's files into the directory ``dest`` (a single-file version: ``model.onnx``).

        Processes sharing ``dest`` take turns (``directory_lock``): the later ones find the files.
        Resumable: a file already in ``dest`` with the right size and sha256 is skipped (only the
        missing files are asked for); a partial file (``<path>.part``, left by an interrupted
        download) is resumed from its length, and the whole file's sha256 checked at the end. If a
        resumed file turns out corrupt (its partial file was not a prefix of it), the files still
        missing are downloaded once more from their start. Each file appears at its path only
        whole and verified.

        Args:
            model: The model.
            version: The version (0: the latest).
            dest: The version's directory (created if missing).
            progress: Called as ``progress(received_bytes, total_bytes)`` over the bytes still to come.

        Raises:
            InvalidArgument: A downloaded file does not match its size or sha256.
        """
        record = await self.get_version(model, version)
        async with directory_lock(dest):  # another process filling dest (a shared cache) goes first
            missing = await asyncio.to_thread(_missing_files, dest, record.bundle_files)
            if not missing:
                return record
            offsets = await asyncio.to_thread(part_sizes, dest, missing)
            try:
                await self._download_files(record, missing, dest, offsets, progress)
            except InvalidArgument:
                if not offsets:
                    raise
                missing = await asyncio.to_thread(_missing_files, dest, missing)
                await self._download_files(record, missing, dest, {}, progress)
        return record

    async def _download_files(
        self,
        record: VersionRecord,
        missing: Sequence[BundleFile],
        dest: Path,
        offsets: Mapping[str, int],
        progress: ProgressCallback | None,
        places: Mapping[str, str] | None = None,
    ) -> None:
        """Download ``missing`` files of ``record`` into ``dest``, each from its offset (0 if none).

        ``places``: where a file goes under ``dest`` by its bundle path, if not there (``BundleWriter``).
        """
        model = record.model
        paths = [] if len(missing) == len(record.bundle_files) else [f.path for f in missing]
        req = registry_pb2.DownloadVersionRequest(model=model, version=record.version, paths=paths, offsets=offsets)
        writer = BundleWriter(dest, f"model '{model}' version {record.version}", places)
        total = sum(f.size_bytes for f in missing) - sum(offsets.values())
        received = started = 0
        try:
            call = self._stub.DownloadVersion(
                req, timeout=self.transfer_timeout_s(total), metadata=resolve_metadata(self._metadata_source)
            )
            async for part in call:
                kind = part.WhichOneof("part")
                if kind == "file":
                    started += 1
                    await asyncio.to_thread(writer.start, _bundle_file(part.file), offsets.get(part.file.path, 0))
                elif kind == "chunk":
                    await asyncio.to_thread(writer.write, part.chunk)
                    received += len(part.chunk)
                    if progress is not None:
                        progress(received, total)
            await asyncio.to_thread(writer.finish)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "registry") from exc
        finally:
            await asyncio.to_thread(writer.discard)
        if started != len(missing):
            raise InvalidArgument(f"download of model '{model}' version {record.version} ended before its last file")


def _missing_files(dest: Path, files: Sequence[BundleFile]) -> list[BundleFile]:
    """The ``files`` not yet in ``dest`` whole and verified (blocking: hashes those present)."""
    return [file for file in files if not is_complete(dest, file)]


async def _all_pages(page: Callable[[str], Awaitable[tuple[list[_T], str]]]) -> list[_T]:
    """Return the items of every page: ``page(token)`` returns one page and the next token."""
    items, token = await page("")
    while token:
        more, token = await page(token)
        items.extend(more)
    return items


def _digest(data: bytes | Path) -> tuple[str, int]:
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest(), len(data)
    return file_digest(data)


async def _upload_requests(
    header: registry_pb2.UploadVersionHeader,
    parts: Sequence[tuple[BundleFile | None, bytes | Path]],
    progress: ProgressCallback | None,
) -> AsyncIterator[registry_pb2.UploadVersionRequest]:
    """An upload's request stream: the header, then each part (its ``BundleFile`` if any, then its chunks)."""
    yield registry_pb2.UploadVersionRequest(header=header)
    sent = 0
    for file, data in parts:
        if file is not None:
            yield registry_pb2.UploadVersionRequest(file=_bundle_file_to_pb(file))
        async for chunk in _chunks(data):
            yield registry_pb2.UploadVersionRequest(chunk=chunk)
            sent += len(chunk)
            if progress is not None:
                progress(sent, header.size_bytes)


async def _chunks(data: bytes | Path) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        for offset in range(0, len(data), UPLOAD_CHUNK_BYTES):
            yield data[offset : offset + UPLOAD_CHUNK_BYTES]
        return
    file = await asyncio.to_thread(data.open, "rb")
    try:
        while chunk := await asyncio.to_thread(file.read, UPLOAD_CHUNK_BYTES):
            yield chunk
    finally:
        file.close()
