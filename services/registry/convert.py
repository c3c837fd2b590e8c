"""Pure conversions between ``maas.registry.v1`` messages and the registry's domain records."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import grpc

from maas.registry.v1 import registry_pb2
from services.common.auth import ApiKeyRecord, TenantQuota, TenantRecord
from services.common.errors import InvalidArgument
from services.common.events import Event
from services.common.metadata import BundleFile, DeploymentRecord, ModelRecord, Split, TensorSpec, VersionRecord
from services.common.optimization import Lineage, OperationRecord, OptimizationReport
from services.common.status import ClusterStatus, QueueStatus, WorkerStatus
from services.common.usage import TenantUsage
from services.registry.events_watch import WatchRequest
from services.registry.identities import NewApiKey
from services.registry.lifecycle import VersionUpdate
from services.registry.optimize import OptimizeRequest
from services.registry.pages import PageQuery
from services.registry.rollout import Alias
from services.registry.store import DeploySpec, UploadHeader


def cluster_status_to_pb(status: ClusterStatus) -> registry_pb2.GetClusterStatusResponse:
    """Convert the cluster status (``GetClusterStatus``)."""
    return registry_pb2.GetClusterStatusResponse(
        workers=[_worker_to_pb(worker) for worker in status.workers],
        queues=[_queue_to_pb(queue) for queue in status.queues],
        time_ms=status.time_ms,
    )


def _worker_to_pb(worker: WorkerStatus) -> registry_pb2.WorkerStatus:
    return registry_pb2.WorkerStatus(
        worker_id=worker.worker_id,
        pool=worker.pool,
        host=worker.host,
        providers=list(worker.providers),
        models=list(worker.models),
        in_flight=worker.in_flight,
        heartbeat_age_ms=worker.heartbeat_age_ms,
        load_errors=list(worker.load_errors),
        generations=worker.generations,
        max_generations=worker.max_generations,
    )


def _queue_to_pb(queue: QueueStatus) -> registry_pb2.QueueStatus:
    calls = queue.calls
    return registry_pb2.QueueStatus(
        model=queue.model,
        version=queue.version,
        pool=queue.pool,
        workers=queue.workers,
        length=queue.length,
        pending=queue.pending,
        oldest_age_ms=queue.oldest_age_ms,
        window_s=calls.window_s,
        calls_per_s=calls.calls_per_s,
        errors_per_s=calls.errors_per_s,
        p50_ms=calls.p50_ms,
        p99_ms=calls.p99_ms,
    )


def tensor_to_pb(spec: TensorSpec) -> registry_pb2.TensorSpec:
    """Convert a signature tensor."""
    return registry_pb2.TensorSpec(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def deployment_to_pb(record: DeploymentRecord) -> registry_pb2.Deployment:
    """Convert a deployment."""
    return registry_pb2.Deployment(
        model=record.model,
        version=record.version,
        max_batch_size=record.max_batch_size,
        max_wait_ms=record.max_wait_ms,
        pool=record.pool,
        max_queue_length=record.max_queue_length,
        updated_at_ms=record.updated_at_ms,
        traffic=split_to_pb(record.traffic),
        previous_traffic=split_to_pb(record.previous_traffic),
        aliased_versions=record.aliased_versions,
    )


def split_to_pb(split: Split) -> list[registry_pb2.VersionWeight]:
    """Convert a traffic split."""
    return [registry_pb2.VersionWeight(version=version, weight=weight) for version, weight in split]


def alias_to_pb(alias: Alias) -> registry_pb2.Alias:
    """Convert an (alias, version) pair."""
    return registry_pb2.Alias(name=alias[0], version=alias[1])


def model_to_pb(record: ModelRecord) -> registry_pb2.Model:
    """Convert a model; ``deployment`` stays unset while it is not deployed."""
    model = registry_pb2.Model(
        name=record.name,
        description=record.description,
        latest_version=record.latest_version,
        created_at_ms=record.created_at_ms,
        aliases=[alias_to_pb(alias) for alias in record.aliases],
        owner=record.owner,
        shared_with=record.shared_with,
    )
    if record.deployment is not None:
        model.deployment.CopyFrom(deployment_to_pb(record.deployment))
    return model


def version_to_pb(record: VersionRecord) -> registry_pb2.Version:
    """Convert a version with its signature."""
    return registry_pb2.Version(
        model=record.model,
        version=record.version,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        inputs=[tensor_to_pb(spec) for spec in record.inputs],
        outputs=[tensor_to_pb(spec) for spec in record.outputs],
        created_at_ms=record.created_at_ms,
        platform=record.platform,
        class_labels=record.class_labels,
        description=record.description,
        labels=record.labels,
        pushed_by=record.pushed_by,
        custom_ops=record.custom_ops,
        files=[bundle_file_to_pb(f) for f in record.bundle_files],
        entry_point=record.entry_file,
        lineage=lineage_to_pb(record.lineage),
        report=report_to_pb(record.report),
    )


def bundle_file_to_pb(file: BundleFile) -> registry_pb2.BundleFile:
    """Convert one file of a bundle."""
    return registry_pb2.BundleFile(path=file.path, size_bytes=file.size_bytes, sha256=file.sha256)


def bundle_file(msg: registry_pb2.BundleFile) -> BundleFile:
    """Convert one announced file of a bundle upload."""
    return BundleFile(path=msg.path, size_bytes=msg.size_bytes, sha256=msg.sha256)


def download_part_to_pb(part: VersionRecord | BundleFile | bytes) -> registry_pb2.DownloadVersionResponse:
    """Convert one item of a download: the version first, then each file and its chunks."""
    if isinstance(part, VersionRecord):
        return registry_pb2.DownloadVersionResponse(version=version_to_pb(part))
    if isinstance(part, BundleFile):
        return registry_pb2.DownloadVersionResponse(file=bundle_file_to_pb(part))
    return registry_pb2.DownloadVersionResponse(chunk=part)


def deploy_spec(request: registry_pb2.DeployRequest) -> DeploySpec:
    """Convert a deploy request; an unset optional field becomes None (its documented default)."""
    has = request.HasField
    return DeploySpec(
        model=request.model,
        version=request.version,
        max_batch_size=request.max_batch_size if has("max_batch_size") else None,
        max_wait_ms=request.max_wait_ms if has("max_wait_ms") else None,
        pool=request.pool if has("pool") else None,
        max_queue_length=request.max_queue_length if has("max_queue_length") else None,
        traffic=tuple((pair.version, pair.weight) for pair in request.traffic),
    )


_FORMATS: dict[int, Literal["onnx", "bundle", "tar"]] = {
    registry_pb2.ARTIFACT_FORMAT_UNSPECIFIED: "onnx",
    registry_pb2.ARTIFACT_FORMAT_BUNDLE: "bundle",
    registry_pb2.ARTIFACT_FORMAT_TAR: "tar",
}


def upload_header(header: registry_pb2.UploadVersionHeader) -> UploadHeader:
    """Convert an upload's header.

    Raises:
        InvalidArgument: The format is not one of ``ArtifactFormat``'s values.
    """
    if header.format not in _FORMATS:
        raise InvalidArgument(f"format must be one of ArtifactFormat's values (0, 1, 2), got {header.format}")
    return UploadHeader(
        model=header.model,
        sha256=header.sha256,
        size_bytes=header.size_bytes,
        class_labels=tuple(header.class_labels),
        description=header.description,
        labels=dict(header.labels),
        custom_ops=tuple(header.custom_ops),
        format=_FORMATS.get(header.format, "onnx"),
        entry_point=header.entry_point,
        files=tuple(bundle_file(f) for f in header.files),
    )


async def upload_stream(
    requests: AsyncIterator[registry_pb2.UploadVersionRequest],
) -> tuple[UploadHeader, AsyncIterator[bytes | BundleFile]]:
    """Split an upload's request stream into its header and its chunks.

    Raises:
        InvalidArgument: The first message is not a header (here), or a later one is (while
            the chunks are read).
    """
    first = await anext(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first UploadVersion message must carry the header")
    return upload_header(first.header), _chunks(requests)


async def _chunks(requests: AsyncIterator[registry_pb2.UploadVersionRequest]) -> AsyncIterator[bytes | BundleFile]:
    async for request in requests:
        part = request.WhichOneof("part")
        if part == "header":
            raise InvalidArgument("only the first UploadVersion message may carry a header")
        yield bundle_file(request.file) if part == "file" else request.chunk


def page_query(request: registry_pb2.ListModelsRequest | registry_pb2.ListVersionsRequest) -> PageQuery:
    """Convert the paging and filters of a list request (ListVersions has no name prefix)."""
    prefix = request.name_prefix if isinstance(request, registry_pb2.ListModelsRequest) else ""
    return PageQuery(
        page_size=request.page_size, page_token=request.page_token, name_prefix=prefix, labels=dict(request.labels)
    )


def version_update(request: registry_pb2.UpdateVersionRequest) -> VersionUpdate:
    """Convert an UpdateVersion request; an unset description stays unchanged (None)."""
    return VersionUpdate(
        description=request.description if request.HasField("description") else None,
        labels=dict(request.labels),
        remove_labels=tuple(request.remove_labels),
    )


def delete_force(request: registry_pb2.DeleteModelRequest) -> bool | None:
    """Return DeleteModel's ``force``: None when unset (the behaviour from before the field)."""
    return request.force if request.HasField("force") else None


def watch_request(request: registry_pb2.WatchEventsRequest) -> WatchRequest:
    """Convert a WatchEvents request."""
    return WatchRequest(after_id=request.after_id, is_following=request.follow, model=request.model)


def event_to_pb(event: Event) -> registry_pb2.WatchEventsResponse:
    """Convert one event into a WatchEvents message."""
    return registry_pb2.WatchEventsResponse(
        event=registry_pb2.Event(
            id=event.id, kind=event.kind, model=event.model, version=event.version, time_ms=event.time_ms
        )
    )


def tenant_to_pb(record: TenantRecord, usage: TenantUsage | None = None) -> registry_pb2.Tenant:
    """Convert a tenant, with its usage if given."""
    quota = record.quota
    tenant = registry_pb2.Tenant(
        name=record.name,
        description=record.description,
        created_at_ms=record.created_at_ms,
        quota=registry_pb2.TenantQuota(rps=quota.rps, burst=quota.burst, max_in_flight=quota.max_in_flight),
    )
    if usage is not None:
        tenant.usage.CopyFrom(
            registry_pb2.TenantUsage(calls=usage.calls, errors=usage.errors, compute_seconds=usage.compute_ns / 1e9)
        )
    return tenant


def tenant_quota(request: registry_pb2.SetTenantQuotaRequest) -> TenantQuota:
    """Convert a SetTenantQuota request's quota."""
    return TenantQuota(rps=request.quota.rps, burst=request.quota.burst, max_in_flight=request.quota.max_in_flight)


def api_key_to_pb(record: ApiKeyRecord) -> registry_pb2.ApiKey:
    """Convert an API key's record (it holds no secret)."""
    return registry_pb2.ApiKey(
        id=record.id,
        tenant=record.tenant,
        name=record.name,
        scopes=list(record.scopes),
        models=list(record.models),
        created_at_ms=record.created_at_ms,
        expires_at_ms=record.expires_at_ms,
        revoked=record.revoked,
    )


def new_api_key(request: registry_pb2.CreateApiKeyRequest) -> NewApiKey:
    """Convert a key creation request."""
    return NewApiKey(
        tenant=request.tenant,
        name=request.name,
        scopes=tuple(request.scopes),
        models=tuple(request.models),
        expires_at_ms=request.expires_at_ms,
    )


# Optimisation


def lineage_to_pb(lineage: Lineage | None) -> registry_pb2.Lineage | None:
    """Convert a derived version's lineage (None stays unset)."""
    if lineage is None:
        return None
    return registry_pb2.Lineage(
        source_version=lineage.source_version,
        transform=lineage.transform,
        options=dict(lineage.options),
        tool_versions=dict(lineage.tool_versions),
        operation_id=lineage.operation_id,
    )


def report_to_pb(report: OptimizationReport | None) -> registry_pb2.OptimizationReport | None:
    """Convert an optimisation report (None stays unset)."""
    if report is None:
        return None
    return registry_pb2.OptimizationReport(
        transform=report.transform,
        outputs=[
            registry_pb2.OutputComparison(
                name=o.name, max_abs_diff=o.max_abs_diff, mean_abs_diff=o.mean_abs_diff, top1_agreement=o.top1_agreement
            )
            for o in report.outputs
        ],
        source_size_bytes=report.source_size_bytes,
        variant_size_bytes=report.variant_size_bytes,
        latency=[
            registry_pb2.LatencyComparison(
                batch_size=m.batch_size, source_p50_ms=m.source_p50_ms, variant_p50_ms=m.variant_p50_ms
            )
            for m in report.latency
        ],
        device=report.device,
        samples=report.samples,
        warnings=report.warnings,
        error=report.error,
        version=report.version,
    )


def operation_to_pb(record: OperationRecord) -> registry_pb2.Operation:
    """Convert an operation; its error code becomes the google.rpc.Code number."""
    code = grpc.StatusCode[record.error_code].value[0] if record.error_code else 0
    return registry_pb2.Operation(
        id=record.id,
        model=record.model,
        source_version=record.source_version,
        transforms=record.transforms,
        state=registry_pb2.Operation.State.Value(record.state.value),
        progress_message=record.progress_message,
        progress_percent=record.progress_percent,
        result_versions=record.result_versions,
        reports=[report_to_pb(r) for r in record.reports],
        error_code=code,
        error_message=record.error_message,
        created_at_ms=record.created_at_ms,
        updated_at_ms=record.updated_at_ms,
        device=record.device,
    )


def optimize_request(request: registry_pb2.OptimizeVersionRequest) -> OptimizeRequest:
    """Convert an OptimizeVersion request; an unset max_abs_diff is no limit (None)."""
    return OptimizeRequest(
        model=request.model,
        version=request.version,
        transform=request.transform,
        is_auto=request.auto,
        device=request.device,
        max_abs_diff=request.max_abs_diff if request.HasField("max_abs_diff") else None,
        options=dict(request.options),
        calibration_npz=request.calibration_npz,
    )
