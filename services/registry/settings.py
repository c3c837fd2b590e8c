"""Settings of the registry service (environment variables ``MAAS_REGISTRY_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.grpc_server import MAX_MESSAGE_BYTES
from services.common.settings import ServiceSettings

_MIB = 1024 * 1024


class RegistrySettings(ServiceSettings):
    """Where the registry listens, where it keeps artifacts and how large they may be."""

    # NOTE: ``redis_url`` keeps the base's validation alias, so it reads MAAS_REDIS_URL (shared by
    # every service), not MAAS_REGISTRY_REDIS_URL.
    model_config = SettingsConfigDict(env_prefix="MAAS_REGISTRY_", extra="ignore", populate_by_name=True)

    port: int = 8002
    """gRPC port; 0 picks a free one."""
    data_dir: Path = Path(".maas/registry")
    """Root of the local blob store: artifacts live at ``<data_dir>/<model>/<version>.onnx``."""
    max_artifact_bytes: int = Field(default=2 * 1024 * _MIB, gt=0)
    """Largest artifact an upload may announce (2 GiB: the protobuf limit of one ONNX file); a stream
    that passes its announced size is refused at once, so no upload ever holds more."""
    max_bundle_bytes: int = Field(default=64 * 1024 * _MIB, gt=0)
    """Largest bundle (the total of its files; a tar upload may add its headers): files beyond
    2 GiB stream to disk a chunk at a time, so the limit is the disk's, not the registry's memory."""
    max_bundle_file_bytes: int = Field(default=32 * 1024 * _MIB, gt=0)
    """Largest single file of a bundle (e.g. an external-data weights file)."""
    max_bundle_files: int = Field(default=1000, ge=1, le=100_000)
    """Most files a bundle may hold (the tar members that are files)."""
    chunk_bytes: int = Field(default=_MIB, gt=0, le=MAX_MESSAGE_BYTES // 2)
    """Size of one download chunk."""
    validate_timeout_s: float = Field(default=60.0, gt=0)
    """Longest load of an uploaded artifact in ONNX Runtime (in a child process, killed after it)."""
    validate_memory_bytes: int = Field(default=4 * 1024 * _MIB, ge=256 * _MIB)
    """Address space of that child process (``RLIMIT_AS``): an upload that needs more is refused.
    Loading takes about twice the artifact's size on top of ~250 MiB: raise it for models over ~1.5 GiB."""
    validate_concurrency: int = Field(default=2, ge=1)
    """Uploads validated at once (each may use ``validate_memory_bytes``); more wait their turn."""
    blob_store: Literal["local", "s3"] = "local"
    """Where artifacts live: ``local`` (``data_dir``) or ``s3`` (an S3-compatible bucket; uploads are
    still staged in ``data_dir/.tmp``)."""
    s3_endpoint_url: str | None = None
    """S3 endpoint, e.g. ``http://seaweedfs:8333``; unset: AWS S3 of ``s3_region``."""
    s3_bucket: str = ""
    """Bucket of the artifacts (must exist); required with ``blob_store=s3``."""
    s3_region: str = "us-east-1"
    """Region of the bucket."""
    s3_access_key_id: str = ""
    """Access key; empty: boto3's default credential chain (``AWS_*`` variables, the pod's IAM role)."""
    s3_secret_access_key: SecretStr = SecretStr("")
    """Secret key of ``s3_access_key_id``."""
    s3_prefix: str = ""
    """Prepended to every object key (e.g. ``maas/``)."""
    s3_part_bytes: int = Field(default=64 * _MIB, ge=5 * _MIB)
    """Part size of multipart uploads (S3's minimum is 5 MiB); smaller artifacts take one PUT."""
    s3_timeout_s: float = Field(default=30.0, gt=0)
    """Connect and read timeout of one S3 call."""
    system_keys_file: Path | None = None
    """``name=key`` lines (mode 0600) of the built-in ``system`` keys (``admin``, ``gateway``,
    ``worker``), created at start unless they exist: ``maas up`` writes it, deploy/ mounts it."""

    optimize_timeout_s: float = Field(default=600.0, gt=0)
    """Longest run of one optimisation transform (a child process, killed after it): the operation
    ends FAILED with DEADLINE_EXCEEDED."""
    optimize_memory_bytes: int = Field(default=8 * 1024 * _MIB, ge=512 * _MIB)
    """Address space of a transform's child process (``RLIMIT_AS``): the source, the variant, the
    quantiser's copies and two ONNX Runtime sessions; about 6x the model's size on top of ~500 MiB."""
    optimize_concurrency: int = Field(default=1, ge=1)
    """Optimisation operations run at once by this registry; more stay PENDING until a slot frees."""
    optimize_latency_iterations: int = Field(default=50, ge=1, le=10_000)
    """Timed runs per model and batch size for a report's p50 latency (after 2 warm-up runs)."""
    optimize_max_calibration_bytes: int = Field(default=64 * _MIB, gt=0, le=MAX_MESSAGE_BYTES // 2)
    """Largest calibration .npz an OptimizeVersion request may carry."""
    operation_ttl_s: int = Field(default=86_400, ge=60)
    """How long an operation stays readable after it ends (and the longest any operation is kept)."""
    operation_lease_s: float = Field(default=30.0, ge=1)
    """A running operation's lease, renewed every third of it: a reader that finds it expired (the
    registry running it died) marks the operation FAILED."""

    @model_validator(mode="after")
    def _check_s3(self) -> RegistrySettings:
        if self.blob_store == "s3" and not self.s3_bucket:
            raise ValueError("s3_bucket (MAAS_REGISTRY_S3_BUCKET) is required when blob_store is 's3'")
        return self
