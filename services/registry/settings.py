"""Settings of the registry service (environment variables ``MAAS_REGISTRY_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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
    """Largest artifact an upload may announce (2 GiB: the protobuf limit of one ONNX file)."""
    chunk_bytes: int = Field(default=_MIB, gt=0, le=MAX_MESSAGE_BYTES // 2)
    """Size of one download chunk."""
    system_keys_file: Path | None = None
    """``name=key`` lines (mode 0600) of the built-in ``system`` keys (``admin``, ``gateway``,
    ``worker``), created at start unless they exist: ``maas up`` writes it, deploy/ mounts it."""
