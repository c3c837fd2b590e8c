"""The registry's domain logic: models, versions and deployments in Redis, artifacts in a blob store.

Redis layout (names from ``services.common.keys``):

- ``keys.MODELS``: sorted set of model names.
- ``keys.model(name)``: hash with ``description``, ``created_at_ms``, ``next_version`` (the
  counter versions are allocated from), ``latest_version`` (the newest stored version), ``owner``
  and ``share:<tenant>`` fields (``services.registry.ownership``).
- ``keys.versions(name)``: hash, version number -> ``VersionRecord`` JSON.
- ``keys.DEPLOYMENTS``: hash, model name -> ``DeploymentRecord`` JSON.
- ``keys.aliases(name)``: hash, alias -> version (``services.registry.rollout``).

Writes that must see the model still exist run as Lua scripts, so a model deleted in the
middle of an upload or a deploy leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from prometheus_client import Counter

from services.common import auth, events, generation, keys
from services.common.bundles import entry_point_of, manifest_json, manifest_sha256
from services.common.collectors import GaugeSpec, LoopCollector, Samples, register
from services.common.custom_ops import check_custom_ops
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    Unavailable,
)
from services.common.metadata import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_LENGTH,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_POOL,
    MAX_CLASS_LABEL_BYTES,
    MAX_CLASS_LABELS,
    PLATFORM,
    BundleFile,
    DeploymentRecord,
    ModelRecord,
    VersionRecord,
    check_name,
    shown,
)
from services.common.optimization import Lineage, OptimizationReport
from services.common.queue import MalformedEntry, QueuedRequest, Reply, now_ms
from services.common.redis_conn import redis_errors
from services.registry import rollout
from services.registry.blobs import BlobStore, BlobUpload, verified_chunks
from services.registry.bundle_upload import BundleLimits, check_announced, chunks_only, extract_tar, receive_files
from services.registry.events_watch import EventWatch
from services.registry.labels import check_description, check_labels
from services.registry.lifecycle import VersionLifecycle
from services.registry.ownership import ModelSharing, owner_of
from services.registry.sandbox import ArtifactValidator
from services.registry.signature import Signature

log = structlog.get_logger(__name__)

UPLOADS = Counter("maas_registry_uploads", "Version uploads by result (ok, invalid, failed).", ["result"])
UPLOAD_BYTES = Counter("maas_registry_upload_bytes", "Artifact bytes received by uploads.")
DOWNLOAD_BYTES = Counter("maas_registry_download_bytes", "Artifact bytes sent by downloads.")
DEPLOYED_VERSIONS = "maas_registry_deployed_versions"
_DEPLOYED = GaugeSpec(DEPLOYED_VERSIONS, "1 per model version deployed to workers.", ("model", "version", "pool"))
DEPLOYMENTS = register(LoopCollector([_DEPLOYED]))

_WHAT = "model store"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FAIL_PAGE = 500
"""Queue entries failed per Redis transaction when a deployment goes away."""

_RANGES: dict[str, tuple[int, int]] = {
    "max_batch_size": (1, 1024),
    "max_wait_ms": (0, 1000),
    "max_queue_length": (1, 1_000_000),
}

_CREATE_MODEL_LUA = """
-- KEYS[1]: model hash, KEYS[2]: models set; ARGV: name, description, created_at_ms, owner
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'description', ARGV[2], 'created_at_ms', ARGV[3],
           'next_version', 0, 'latest_version', 0, 'owner', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""
_ALLOCATE_VERSION_LUA = """
-- KEYS[1]: model hash. Returns the new version number, nil if the model is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'next_version', 1)
"""
_ADD_VERSION_LUA = """
-- KEYS[1]: model hash, KEYS[2]: versions hash; ARGV: version, version JSON.
-- latest_version only moves forward: concurrent uploads may finish out of order.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if tonumber(redis.call('HGET', KEYS[1], 'latest_version')) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'latest_version', ARGV[1])
end
return 1
"""


@dataclass(frozen=True)
class UploadHeader:
    """What an upload announces before its chunks."""

    model: str
    sha256: str
    """Lower-case hex sha256 of the whole artifact."""
    size_bytes: int
    class_labels: tuple[str, ...] = ()
    """Labels of the classification extension, by class index."""
    description: str = ""
    """The version's description (``services.registry.labels`` has the rules)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """The version's labels."""
    format: Literal["onnx", "bundle", "tar"] = "onnx"
    """One .onnx file, a stream of announced files, or a tar archive (``bundle_upload``)."""
    entry_point: str = ""
    """A bundle's .onnx file to load; empty: its only top-level .onnx file."""
    files: tuple[BundleFile, ...] = ()
    """The files a ``bundle`` upload announces (then ``size_bytes`` is their total)."""
    custom_ops: tuple[str, ...] = ()
    """Custom-operator libraries the model needs (``services.common.custom_ops``)."""
    lineage: Lineage | None = None
    """Set by the registry itself for a version OptimizeVersion derives (never by a client)."""
    report: OptimizationReport | None = None
    """The derived version's report (``services.registry.optimize``)."""


@dataclass(frozen=True)
class DeploySpec:
    """A deploy request; None means the documented default."""

    model: str
    version: int = 0
    """0 means the latest version."""
    max_batch_size: int | None = None
    max_wait_ms: int | None = None
    pool: str | None = None
    max_queue_length: int | None = None
    traffic: tuple[tuple[int, int], ...] = ()
    """(version, weight) pairs serving several versions; then ``version`` must be 0."""


def _check_version(version: int) -> None:
    if version < 0:
        raise InvalidArgument(f"version must be >= 0 (0 means the latest), got {version}")


def _model_not_found(name: str) -> NotFound:
    return auth.model_not_found(name)


def _in_range(field: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    low, high = _RANGES[field]
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be {low}..{high}, got {value}")
    return value


def _deployment(spec: DeploySpec) -> DeploymentRecord:
    """Validate ``spec`` and fill in the defaults (the version is resolved later).

    Raises:
        InvalidArgument: A value is out of its documented range.
    """
    pool = DEFAULT_POOL if spec.pool is None else spec.pool
    check_name(pool, "pool")
    return DeploymentRecord(
        model=spec.model,
        version=spec.version,
        max_batch_size=_in_range("max_batch_size", spec.max_batch_size, DEFAULT_MAX_BATCH_SIZE),
        max_wait_ms=_in_range("max_wait_ms", spec.max_wait_ms, DEFAULT_MAX_WAIT_MS),
        pool=pool,
        max_queue_length=_in_range("max_queue_length", spec.max_queue_length, DEFAULT_MAX_QUEUE_LENGTH),
    )


def _check_header(header: UploadHeader, max_artifact_bytes: int) -> None:
    check_name(header.model)
    if not _SHA256_RE.match(header.sha256):
        raise InvalidArgument(f"sha256 must be 64 lower-case hex characters, got '{shown(header.sha256)}'")
    if not 1 <= header.size_bytes <= max_artifact_bytes:
        raise InvalidArgument(f"size_bytes must be 1..{max_artifact_bytes}, got {header.size_bytes}")
    _check_class_labels(header.class_labels)
    check_description(header.description)
    check_labels(header.labels)
    check_custom_ops(header.custom_ops)


def _check_bundle_header(header: UploadHeader, limits: BundleLimits) -> None:
    """Check a bundle upload's header (TAR: the archive's sha256 and size; BUNDLE: its files).

    Raises:
        InvalidArgument: A field breaks its rule or a bundle limit (the message names it).
    """
    if header.format == "tar":
        _check_header(header, limits.max_tar_bytes)
        if header.files:
            raise InvalidArgument("files must be empty in a TAR upload: the tar's members are the files")
        return
    check_announced(header.files, header.size_bytes, limits)
    digest = manifest_sha256(entry_point_of(header.files, header.entry_point), header.files)
    if header.sha256 not in ("", digest):
        raise InvalidArgument(f"sha256 of a BUNDLE upload must be empty or its manifest's sha256 {digest}")
    _check_header(replace(header, sha256=digest), limits.max_total_bytes)


def _wanted_files(record: VersionRecord, paths: Sequence[str]) -> tuple[BundleFile, ...]:
    """Return the files of ``record`` a download asks for (``paths``; empty: all), in the version's order.

    Raises:
        InvalidArgument: A path is not a file of the version.
    """
    files = record.bundle_files
    known = {f.path for f in files}
    for path in paths:
        if path not in known:
            raise InvalidArgument(f"paths: model '{record.model}' version {record.version} has no file '{shown(path)}'")
    return tuple(f for f in files if not paths or f.path in paths)


def _check_offsets(record: VersionRecord, wanted: Sequence[BundleFile], offsets: Mapping[str, int]) -> None:
    """Check a resumed download's ``offsets`` (path -> byte offset) against the files it asks for.

    Raises:
        InvalidArgument: A path is not downloaded, or its offset is below 0 or beyond the file's size.
    """
    sizes = {f.path: f.size_bytes for f in wanted}
    for path, offset in offsets.items():
        if path not in sizes:
            raise InvalidArgument(
                f"offsets: model '{record.model}' version {record.version} has no file '{shown(path)}' in this download"
            )
        if not 0 <= offset <= sizes[path]:
            raise InvalidArgument(
                f"offsets: offset {offset} of file '{shown(path)}' is outside 0..{sizes[path]} (the file's size)"
            )


async def _counted(parts: AsyncIterator[bytes | BundleFile]) -> AsyncIterator[bytes | BundleFile]:
    """Pass a bundle upload's parts on, counting its bytes in ``maas_registry_upload_bytes``."""
    async for part in parts:
        if isinstance(part, bytes):
            UPLOAD_BYTES.inc(len(part))
        yield part


def _check_class_labels(labels: tuple[str, ...]) -> None:
    if len(labels) > MAX_CLASS_LABELS:
        raise InvalidArgument(f"class_labels has {len(labels)} labels, at most {MAX_CLASS_LABELS} are allowed")
    size = sum(len(label.encode()) for label in labels)
    if size > MAX_CLASS_LABEL_BYTES:
        raise InvalidArgument(f"class_labels hold {size} bytes of UTF-8, at most {MAX_CLASS_LABEL_BYTES} are allowed")


def _pusher() -> str:
    """Who uploads: the calling API key as ``tenant/key name``, or ``anonymous`` when keys are off."""
    identity = auth.current_identity()
    return "anonymous" if identity is None else f"{identity.tenant}/{identity.key_name}"


def _check_received(header: UploadHeader, sha256: str, size_bytes: int) -> None:
    if size_bytes != header.size_bytes:
        raise InvalidArgument(
            f"artifact has {size_bytes} bytes, but the header announced size_bytes {header.size_bytes}"
        )
    if sha256 != header.sha256:
        raise InvalidArgument(f"sha256 mismatch: the header announced {header.sha256}, the artifact has {sha256}")


def _model_record(
    name: str, fields: dict[bytes, bytes], deployment: bytes | None, raw_aliases: dict[bytes, bytes]
) -> ModelRecord:
    aliases = rollout.aliases_from_hash(raw_aliases)
    owner, shared_with = owner_of(fields)
    return ModelRecord(
        name=name,
        description=fields.get(b"description", b"").decode(),
        latest_version=int(fields.get(b"latest_version", 0)),
        created_at_ms=int(fields.get(b"created_at_ms", 0)),
        deployment=_deployment_record(deployment, aliases),
        aliases=aliases,
        owner=owner,
        shared_with=shared_with,
    )


def _deployment_record(raw: bytes | None, aliases: tuple[rollout.Alias, ...]) -> DeploymentRecord | None:
    return None if raw is None else rollout.with_aliases(DeploymentRecord.from_json(raw), aliases)


_Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it (bytes replies): id and fields."""


def _waiting_requests(entries: Iterable[_Entry]) -> list[QueuedRequest]:
    requests = []
    for entry_id, fields in entries:
        try:
            requests.append(QueuedRequest.from_fields(fields))
        except MalformedEntry as exc:
            log.warning("queue_entry_malformed", entry_id=entry_id.decode(), reason=str(exc))
    return requests


class ModelStore:
    """Models, versions and deployments: every rule of the registry, independent of gRPC.

    Args:
        redis: Client for metadata, events and queues.
        blobs: Where artifacts are kept.
        max_artifact_bytes: Largest artifact an upload may announce.
        chunk_bytes: Size of one download chunk.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        blobs: BlobStore,
        *,
        max_artifact_bytes: int = 2 * 1024**3,
        chunk_bytes: int = 1024**2,
        validator: ArtifactValidator | None = None,
        bundle_limits: BundleLimits | None = None,
    ) -> None:
        self._redis = redis
        self._bundle_limits = bundle_limits or BundleLimits()
        self._blobs = blobs
        self._validator = validator or ArtifactValidator()
        self._max_artifact_bytes = max_artifact_bytes
        self._chunk_bytes = chunk_bytes
        # Script objects reload themselves after NOSCRIPT (e.g. a Redis restart).
        self._create_model = redis.register_script(_CREATE_MODEL_LUA)
        self._allocate_version = redis.register_script(_ALLOCATE_VERSION_LUA)
        self._add_version = redis.register_script(_ADD_VERSION_LUA)
        self._sharing = ModelSharing(redis)
        self.rollouts = rollout.Rollouts(redis, self._publish, self._sharing.check)
        self.lifecycle = VersionLifecycle(self, blobs, self._publish)
        self.event_watch = EventWatch(redis)
        """Aliases, rollbacks and compare-and-set deployment changes."""

    @property
    def redis(self) -> aioredis.Redis:
        """The client of the metadata (other registry stores share it)."""
        return self._redis

    async def start(self) -> None:
        """Prepare the blob store before serving (removes the staged uploads of a crashed registry).

        Raises:
            Unavailable: The blob store cannot be used.
        """
        await self._blobs.start()
        DEPLOYMENTS.add(self, self._deployment_samples)

    async def _deployment_samples(self) -> Samples:
        deployments = await self.list_deployments()
        versions: dict[tuple[str, ...], float] = {
            (d.model, str(v), d.pool): 1.0 for d in deployments for v in d.served_versions
        }
        return {DEPLOYED_VERSIONS: versions}

    @property
    def validator(self) -> ArtifactValidator:
        """The upload validator (its spare child is idle between uploads)."""
        return self._validator

    async def close(self) -> None:
        """Stop the upload validator's spare child process."""
        DEPLOYMENTS.remove(self)
        await self._validator.close()

    # Models

    async def create_model(self, name: str, description: str = "") -> ModelRecord:
        """Create a model with no versions.

        Raises:
            InvalidArgument: The name is invalid.
            AlreadyExists: The name is taken.
            Unavailable: Redis cannot be reached.
        """
        check_name(name)
        created_at_ms = now_ms()
        # NOTE: names are global (queues, streams and workers know models by name alone), so a
        # name another tenant owns is ALREADY_EXISTS too: README, "Model ownership".
        owner = auth.new_model_owner()
        with redis_errors(_WHAT):
            is_created = await self._create_model(
                keys=[keys.model(name), keys.MODELS], args=[name, description, created_at_ms, owner]
            )
        if not is_created:
            raise AlreadyExists(f"model '{name}' already exists")
        log.info("model_created", model=name)
        await self._publish("model_created", name)
        return ModelRecord(name=name, description=description, created_at_ms=created_at_ms, owner=owner)

    async def get_model(self, name: str) -> ModelRecord:
        """Return one model with its latest version number and deployment.

        Raises:
            InvalidArgument: The name is invalid.
            NotFound: No such model.
            Unavailable: Redis cannot be reached.
        """
        check_name(name)
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys.model(name))
                pipe.hget(keys.DEPLOYMENTS, name)
                pipe.hgetall(keys.aliases(name))
                fields, deployment, aliases = await pipe.execute()
        if not fields:
            raise _model_not_found(name)
        record = _model_record(name, fields, deployment, aliases)
        auth.check_owner(name, record.owner, record.shared_with)
        return record

    async def list_models(self) -> list[ModelRecord]:
        """Return every model the calling API key may use (``auth.visible``), ordered by name.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrange(keys.MODELS, 0, -1)
                pipe.hgetall(keys.DEPLOYMENTS)
                raw_names, deployments = await pipe.execute()
            names = sorted(raw.decode() for raw in raw_names)
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(keys.model(name))
                    pipe.hgetall(keys.aliases(name))
                hashes = await pipe.execute()
        # A model deleted between the two round trips has an empty hash: it is left out.
        records = [
            _model_record(name, fields, deployments.get(name.encode()), aliases)
            for name, fields, aliases in zip(names, hashes[::2], hashes[1::2], strict=True)
            if fields
        ]
        return auth.visible_models(records)  # only the models the calling key may see

    async def delete_model(self, name: str, *, force: bool | None = None) -> None:
        """Delete a model, its versions, its artifacts, its deployment and its statistics.

        Requests still queued for the deployed versions fail with UNAVAILABLE.

        Args:
            name: The model.
            force: True (or None, the behaviour from before the flag) undeploys a deployed model
                first; False refuses it. NOTE: a deploy racing with a refusing delete may still
                be deleted, as with True.

        Raises:
            InvalidArgument: The name is invalid.
            NotFound: No such model.
            FailedPrecondition: ``force`` is False and the model is deployed.
            Unavailable: Redis cannot be reached.
        """
        check_name(name)
        await self._sharing.check(name, is_write=True)
        with redis_errors(_WHAT):
            if force is False and await self._redis.hexists(keys.DEPLOYMENTS, name):
                raise FailedPrecondition(
                    f"model '{name}' is deployed: undeploy it first (`maas undeploy {name}`) or delete with force"
                )
            allocated = int(await self._redis.hget(keys.model(name), "next_version") or 0)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hget(keys.DEPLOYMENTS, name)
                pipe.hgetall(keys.aliases(name))
                pipe.delete(keys.model(name), keys.versions(name), keys.aliases(name))
                pipe.hdel(keys.DEPLOYMENTS, name)
                pipe.zrem(keys.MODELS, name)
                deployment, aliases, deleted_keys, _undeployed, is_listed = await pipe.execute()
            # Statistics of every version ever allocated (a recreated model reuses the numbers);
            # NOTE: outside the MULTI: each version's keys are in their own cluster slot.
            await self._redis.delete(*(keys.stats(name, version) for version in range(allocated + 1)))
        if not deleted_keys and not is_listed:
            raise _model_not_found(name)
        failed = 0
        served = _deployment_record(deployment, rollout.aliases_from_hash(aliases))
        if served is not None:
            await self._publish("undeployed", name, served.version)
            failed = await self._fail_queues(name, served.served_versions, "deleted")
        await self._blobs.delete_model(name)
        log.info("model_deleted", model=name, failed_requests=failed)
        await self._publish("model_deleted", name)

    # Versions

    async def upload_version(self, header: UploadHeader, chunks: AsyncIterator[bytes | BundleFile]) -> VersionRecord:
        """Store a new version from a stream of chunks, once it matches ``header`` and loads.

        A ``bundle`` upload's stream starts each file with its ``BundleFile``; the others are bytes.

        Raises:
            InvalidArgument: The header is invalid, or the artifact does not match it, references
                external data, or does not load in ONNX Runtime within the validation limits.
            NotFound: No such model.
            Unavailable: Redis cannot be reached.
        """
        try:
            record = await self._upload(header, chunks)
        except InvalidArgument as exc:
            UPLOADS.labels(result="invalid").inc()
            log.info("upload_rejected", model=shown(header.model), reason=exc.message)
            raise
        except BaseException:
            UPLOADS.labels(result="failed").inc()
            raise
        UPLOADS.labels(result="ok").inc()
        log.info(
            "version_uploaded",
            model=record.model,
            version=record.version,
            size_bytes=record.size_bytes,
            sha256=record.sha256,
        )
        await self._publish("version_uploaded", record.model, record.version)
        return record

    async def _upload(self, header: UploadHeader, chunks: AsyncIterator[bytes | BundleFile]) -> VersionRecord:
        if header.format != "onnx":
            return await self._upload_bundle(header, chunks)
        _check_header(header, self._max_artifact_bytes)
        await self._sharing.check(header.model, is_write=True)
        await self._require_model(header.model)
        async with self._blobs.upload() as staged:
            sha256, size_bytes = await self._receive(header, chunks_only(chunks), staged)
            _check_received(header, sha256, size_bytes)
            path = await staged.finish()
            # NOTE: ONNX Runtime loads untrusted uploads only in a child process with a time and a
            # memory limit (sandbox.py): a hostile model cannot hang or exhaust the registry.
            signature = await self._validator.validate(path, custom_ops=header.custom_ops)
            version = await self._next_version(header.model)
            await staged.commit(header.model, version)
        record = self._version_record(header, version, signature)
        await self._store_version(record)
        return record

    async def _upload_bundle(self, header: UploadHeader, parts: AsyncIterator[bytes | BundleFile]) -> VersionRecord:
        """Store a bundle: files staged in a directory, validated there, committed with their manifest."""
        _check_bundle_header(header, self._bundle_limits)
        await self._sharing.check(header.model, is_write=True)
        await self._require_model(header.model)
        async with self._blobs.stage_bundle() as staged:
            files = tuple(sorted(await self._receive_bundle(header, parts, staged.directory), key=lambda f: f.path))
            entry = entry_point_of(files, header.entry_point)
            is_generative = any(f.path == generation.CONFIG_FILE for f in files)
            signature = await self._validator.validate(
                staged.directory / entry,
                custom_ops=header.custom_ops,
                bundle_root=staged.directory,
                generative=is_generative,
            )
            version = await self._next_version(header.model)
            await staged.commit(header.model, version, manifest_json(entry, files))
        record = replace(
            self._version_record(header, version, signature),
            sha256=manifest_sha256(entry, files),
            size_bytes=sum(f.size_bytes for f in files),
            files=files,
            entry_point=entry,
            platform=generation.PLATFORM if is_generative else PLATFORM,
        )
        await self._store_version(record)
        return record

    async def _receive_bundle(
        self, header: UploadHeader, parts: AsyncIterator[bytes | BundleFile], directory: Path
    ) -> Sequence[BundleFile]:
        """Write the bundle's files under ``directory``: streamed as announced, or extracted from a tar."""
        if header.format == "bundle":
            await receive_files(header.files, _counted(parts), directory)
            return header.files
        async with self._blobs.upload() as staged:
            sha256, size_bytes = await self._receive(header, chunks_only(parts), staged)
            _check_received(header, sha256, size_bytes)
            archive = await staged.finish()
            return await asyncio.to_thread(extract_tar, archive, directory, self._bundle_limits)

    async def _receive(self, header: UploadHeader, chunks: AsyncIterator[bytes], staged: BlobUpload) -> tuple[str, int]:
        """Write ``chunks`` to ``staged``; return their sha256 and total size."""
        loop = asyncio.get_running_loop()
        digest = hashlib.sha256()
        size_bytes = 0
        async for chunk in chunks:
            size_bytes += len(chunk)
            UPLOAD_BYTES.inc(len(chunk))
            if size_bytes > header.size_bytes:
                raise InvalidArgument(
                    f"artifact is larger than the announced size_bytes {header.size_bytes} "
                    f"({size_bytes} bytes received so far)"
                )
            # hashlib releases the GIL on large buffers: hashing runs beside the event loop.
            await loop.run_in_executor(None, digest.update, chunk)
            await staged.write(chunk)
        return digest.hexdigest(), size_bytes

    @staticmethod
    def _version_record(header: UploadHeader, version: int, signature: Signature) -> VersionRecord:
        return VersionRecord(
            model=header.model,
            version=version,
            sha256=header.sha256,
            size_bytes=header.size_bytes,
            inputs=signature.inputs,
            outputs=signature.outputs,
            created_at_ms=now_ms(),
            class_labels=header.class_labels,
            description=header.description,
            labels=dict(header.labels),
            pushed_by=_pusher(),
            custom_ops=check_custom_ops(header.custom_ops),
            lineage=header.lineage,
            report=header.report,
        )

    async def _require_model(self, name: str) -> None:
        with redis_errors(_WHAT):
            if not await self._redis.exists(keys.model(name)):
                raise _model_not_found(name)

    async def _next_version(self, name: str) -> int:
        """Allocate a version number; numbers are never reused, even after a failed upload."""
        with redis_errors(_WHAT):
            version = await self._allocate_version(keys=[keys.model(name)])
        if version is None:
            raise _model_not_found(name)
        return int(version)

    async def _store_version(self, record: VersionRecord) -> None:
        """Store the record of a committed artifact, deleting the artifact if that fails."""
        try:
            with redis_errors(_WHAT):
                is_stored = await self._add_version(
                    keys=[keys.model(record.model), keys.versions(record.model)],
                    args=[record.version, record.to_json()],
                )
            if not is_stored:
                raise _model_not_found(record.model)
        except BaseException:
            await self._blobs.delete_version(record.model, record.version)
            raise

    async def get_version(self, model: str, version: int) -> VersionRecord:
        """Return one version (0: the latest).

        Raises:
            InvalidArgument: The name or version is invalid.
            NotFound: No such model or version, or the model has no versions.
            Unavailable: Redis cannot be reached.
        """
        check_name(model)
        _check_version(version)
        await self._sharing.check(model)
        return await self._find_version(model, version, no_versions=NotFound)

    async def _find_version(self, model: str, version: int, *, no_versions: type[MaasError]) -> VersionRecord:
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hget(keys.model(model), "latest_version")
                pipe.hget(keys.versions(model), str(version))
                latest, raw = await pipe.execute()
        if latest is None:
            raise _model_not_found(model)
        if version == 0:
            if int(latest) == 0:
                raise no_versions(f"model '{model}' has no versions")
            return await self._find_version(model, int(latest), no_versions=no_versions)
        if raw is None:
            raise NotFound(f"model '{model}' has no version {version}")
        return VersionRecord.from_json(raw)

    async def list_versions(self, model: str) -> list[VersionRecord]:
        """Return a model's versions, oldest first (empty while none was uploaded).

        Raises:
            InvalidArgument: The name is invalid.
            NotFound: No such model.
            Unavailable: Redis cannot be reached.
        """
        check_name(model)
        await self._sharing.check(model)
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(keys.model(model))
                pipe.hvals(keys.versions(model))
                exists, raw_versions = await pipe.execute()
        if not exists:
            raise _model_not_found(model)
        return sorted((VersionRecord.from_json(raw) for raw in raw_versions), key=lambda r: r.version)

    async def download_version(
        self, model: str, version: int, paths: Sequence[str] = (), offsets: Mapping[str, int] | None = None
    ) -> AsyncGenerator[VersionRecord | BundleFile | bytes, None]:
        """Yield the version's record (0: the latest), then each file: its ``BundleFile``, then its chunks.

        A single-file version is one file, ``model.onnx``; ``paths`` (empty: all) selects files;
        ``offsets`` (path -> byte offset) resumes files: their chunks start at the offset.

        Raises:
            InvalidArgument: The name or version is invalid, a path is not a file of the version, or
                an offset is not within its file (the message names the path).
            NotFound: No such model, version or artifact.
            FailedPrecondition: The stored artifact does not match the version's sha256 or size
                (raised instead of its last chunk, so a corrupted artifact is never served whole).
            Unavailable: Redis or the blob store cannot be reached.
        """
        record = await self.get_version(model, version)
        wanted = _wanted_files(record, paths)
        _check_offsets(record, wanted, offsets or {})
        yield record
        for file in wanted:
            yield file
            offset = (offsets or {}).get(file.path, 0)
            if offset == file.size_bytes:  # the caller holds it all: nothing to read (S3 refuses an empty range)
                continue
            what = f"model '{model}' version {record.version}"
            if record.is_bundle:
                what = f"file '{file.path}' of {what}"
                stored = self._blobs.read_file(model, record.version, file.path, self._chunk_bytes, offset)
            else:
                stored = self._blobs.read(model, record.version, self._chunk_bytes, offset)
            checked = verified_chunks(stored, file.sha256, file.size_bytes, what, offset)
            async with aclosing(stored), aclosing(checked) as chunks:
                async for chunk in chunks:
                    DOWNLOAD_BYTES.inc(len(chunk))
                    yield chunk

    # Sharing

    async def share_model(self, name: str, tenant: str, *, is_shared: bool = True) -> ModelRecord:
        """Share a model with a tenant (read and infer), or stop sharing it (``is_shared`` False).

        Raises:
            InvalidArgument: A name is invalid, or ``tenant`` owns the model.
            NotFound: No such model (or one the caller may not see), no such tenant, or (unsharing)
                the model is not shared with it.
            PermissionDenied: The caller's tenant only has the model shared.
            FailedPrecondition: The model has no owner.
            Unavailable: Redis cannot be reached.
        """
        model = await self.get_model(name)
        await self._sharing.change(model, tenant, is_shared=is_shared)
        await self._publish("model_shared" if is_shared else "model_unshared", name)
        return await self.get_model(name)

    # Deployments

    async def deploy(self, spec: DeploySpec) -> DeploymentRecord:
        """Set the deployment of a model, replacing the previous one.

        The replaced deployment's split is kept as ``previous_traffic`` (what ``rollouts.rollback``
        restores), unless the split stays the same.

        Raises:
            InvalidArgument: A value is invalid or out of its documented range, or both a version
                and a traffic split are given.
            NotFound: No such model or version.
            FailedPrecondition: The latest version is asked for, but the model has none.
            Unavailable: Redis cannot be reached.
        """
        check_name(spec.model)
        _check_version(spec.version)
        wanted = _deployment(spec)
        await self._sharing.check(spec.model, is_write=True)
        split = await self._split(spec)
        record = replace(wanted, version=rollout.primary_version(split), traffic=split, updated_at_ms=now_ms())

        async def build(current: DeploymentRecord | None) -> DeploymentRecord:
            previous = () if current is None else current.split
            if previous == split:
                previous = current.previous_traffic if current is not None else ()
            return replace(record, previous_traffic=previous)

        stored = await self.rollouts.replace_deployment(spec.model, build)
        log.info("deployed", model=stored.model, version=stored.version, traffic=stored.traffic, pool=stored.pool)
        await self._publish("deployed", stored.model, stored.version)
        return stored

    async def _split(self, spec: DeploySpec) -> tuple[tuple[int, int], ...]:
        """Return the split a deploy asks for: its traffic (versions checked), else its one version."""
        if not spec.traffic:
            record = await self._find_version(spec.model, spec.version, no_versions=FailedPrecondition)
            return ((record.version, rollout.TOTAL_WEIGHT),)
        if spec.version:
            raise InvalidArgument(f"set version or traffic, not both (version {spec.version} with a traffic split)")
        split = rollout.check_traffic(spec.traffic)
        for version, _ in split:
            await self._find_version(spec.model, version, no_versions=NotFound)
        return split

    async def undeploy(self, model: str) -> None:
        """Remove a model's deployment; requests still queued for it fail with UNAVAILABLE.

        Raises:
            InvalidArgument: The name is invalid.
            NotFound: No such model, or it is not deployed.
            Unavailable: Redis cannot be reached.
        """
        check_name(model)
        await self._sharing.check(model, is_write=True)
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(keys.model(model))
                pipe.hget(keys.DEPLOYMENTS, model)
                pipe.hdel(keys.DEPLOYMENTS, model)
                pipe.hgetall(keys.aliases(model))
                exists, raw, _, aliases = await pipe.execute()
        if not exists:
            raise _model_not_found(model)
        deployment = _deployment_record(raw, rollout.aliases_from_hash(aliases))
        if deployment is None:
            raise NotFound(f"model '{model}' is not deployed")
        await self._publish("undeployed", model, deployment.version)
        failed = await self._fail_queues(model, deployment.served_versions, "undeployed")
        log.info("undeployed", model=model, version=deployment.version, failed_requests=failed)

    async def list_deployments(self, pool: str = "") -> list[DeploymentRecord]:
        """Return the deployments ordered by model name, only those of ``pool`` unless it is empty.

        Only deployments of models the calling API key may see are returned (``auth.may_see``).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        with redis_errors(_WHAT):
            raw = await self._redis.hvals(keys.DEPLOYMENTS)
            records = await self._with_aliases([DeploymentRecord.from_json(value) for value in raw])
        wanted = sorted((r for r in records if not pool or r.pool == pool), key=lambda r: r.model)
        if auth.is_restricted():  # a tenant's key: its own models and those shared with it
            seen = {model.name for model in await self.list_models()}
            wanted = [record for record in wanted if record.model in seen]
        return auth.visible(wanted, lambda record: record.model)  # only the calling key's models

    async def _with_aliases(self, records: list[DeploymentRecord]) -> list[DeploymentRecord]:
        """Fill in each deployment's ``aliased_versions`` (workers load them too)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.hgetall(keys.aliases(record.model))
            aliases = await pipe.execute()
        return [
            rollout.with_aliases(record, rollout.aliases_from_hash(raw))
            for record, raw in zip(records, aliases, strict=True)
        ]

    async def _fail_queues(self, model: str, versions: Iterable[int], reason: str) -> int:
        """Fail the queues of ``versions`` of ``model`` (``_fail_queue``); return how many requests."""
        failed = 0
        for version in versions:
            failed += await self._fail_queue(DeploymentRecord(model=model, version=version), reason)
        return failed

    async def _fail_queue(self, deployment: DeploymentRecord, reason: str) -> int:
        """Answer every request in the deployment's queue with UNAVAILABLE, then delete the queue.

        Returns:
            How many requests were answered.
        """
        key = keys.queue(deployment.model, deployment.version)
        message = f"model '{deployment.model}' version {deployment.version} was {reason}"
        failed = 0
        is_done = False
        while not is_done:
            with redis_errors(_WHAT):
                is_done, count = await self._fail_page(key, message)
            failed += count
        return failed

    async def _fail_page(self, key: str, message: str) -> tuple[bool, int]:
        """Fail up to one page of the queue; delete the queue with the last page.

        WATCH makes the deletion one transaction with the read, so a request enqueued meanwhile
        is never deleted unanswered: the page is read again instead. The replies go out after
        the transaction (NOTE: each reply stream is its own Redis Cluster slot, which a MULTI on
        the queue cannot span); a registry that dies in between leaves those callers to their
        deadline, as any call ends.

        Returns:
            Whether the queue is gone, and how many requests were answered.
        """
        code: int = Unavailable.grpc_code.value[0]
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            entries = cast(list[_Entry], await pipe.xrange(key, count=_FAIL_PAGE))
            requests = _waiting_requests(entries)
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            is_last = len(entries) < _FAIL_PAGE
            if is_last:
                pipe.delete(key)
            else:
                pipe.xdel(key, *(entry_id for entry_id, _ in entries))
            try:
                await pipe.execute()
            except redis.exceptions.WatchError:
                return False, 0
        if requests:
            async with self._redis.pipeline(transaction=False) as pipe:
                for request in requests:
                    fields: dict[Any, Any] = Reply(id=request.id, code=code, message=message).to_fields()
                    # NOMKSTREAM: a gateway that is gone must not get its reply stream recreated.
                    pipe.xadd(request.reply_to, fields, nomkstream=True)
                await pipe.execute(raise_on_error=False)
        return is_last, len(requests)

    async def _publish(self, kind: str, model: str, version: int = 0) -> None:
        # NOTE: events are hints (followers also refresh periodically), and the change they
        # announce is already stored: failing the call now would make clients retry a done change.
        try:
            with redis_errors(_WHAT):
                await events.publish(self._redis, kind, model, version)
        except MaasError as exc:
            log.warning("event_not_published", kind=kind, model=model, reason=exc.message)
