"""Settings shared by every service; each service subclasses ``ServiceSettings``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What every MaaS server needs: where to listen, Redis, logging and shutdown."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    """Address the gRPC server binds."""
    port: int = 0
    """gRPC port; 0 picks a free one (reported in the log and the ready file)."""
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="maas_redis_url")
    """Redis URL, shared by all services (env ``MAAS_REDIS_URL``); with ``redis_cluster``, any node's;
    ``redis+sentinel://host:port[,host:port...]/<master name>`` for a Redis behind Sentinel (docs/redis.md)."""
    redis_cluster: bool = Field(default=False, validation_alias="maas_redis_cluster")
    """Redis Cluster mode (env ``MAAS_REDIS_CLUSTER=1``): ``redis_url`` names any node of the
    cluster; keys are hash-tagged so every script and transaction stays in one slot (docs/redis.md)."""
    redis_timeout_s: float = 5.0
    """Timeout of one Redis command (blocking reads add their block time)."""
    log_json: bool = True
    """JSON log lines (False: human-readable console lines)."""
    log_level: str = "info"
    """Lowest level logged: debug, info, warning, error."""
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024, le=1024 * 1024 * 1024)
    """Largest gRPC message this server accepts or sends, counted after decompression (larger:
    RESOURCE_EXHAUSTED, refused before it is held in memory)."""
    access_log_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of successful RPCs that log their ``rpc_finished`` line (failed ones always do)."""
    shutdown_grace_s: float = 10.0
    """How long in-flight RPCs may run after SIGTERM before they are cancelled."""
    auth_enabled: bool = False
    """Check an API key on every RPC but health (and reflection, see ``auth_reflection_open``).

    Off by default in the class because tests and embedding code build services without a
    secret; both supported launchers turn it on: ``maas up`` (unless ``--no-auth``) and the
    manifests in deploy/. A server with it off logs an ``auth_disabled`` warning at start."""
    auth_secret: SecretStr | None = Field(default=None, validation_alias="maas_auth_secret")
    """Server secret the API keys' HMAC-SHA256 is keyed with; the same on every service (env
    ``MAAS_AUTH_SECRET``), at least 32 characters. Required when ``auth_enabled``."""
    auth_cache_ttl_s: float = Field(default=5.0, gt=0, le=60)
    """How long a verified key is trusted without reading it again (revocations reach every
    replica through registry events within a second, sooner than this)."""
    auth_reflection_open: bool = True
    """Serve server reflection without a key (grpcurl's ``list``); False checks it like any RPC."""
    auth_failures_burst: int = Field(default=20, ge=1)
    """Failed authentications one peer address may make in a burst before it is refused for a while."""
    auth_failures_per_s: float = Field(default=1.0, gt=0)
    """Rate at which a peer address earns back failed authentications."""
    metrics_port: int | None = None
    """Port of the Prometheus metrics HTTP endpoint; 0 picks a free one, unset disables it."""
    ready_file: Path | None = None
    """If set, a JSON file with the bound ports, written once the server is SERVING."""
    tls_cert_file: Path | None = None
    """PEM certificate chain; with ``tls_key_file`` the server serves TLS only (read at start)."""
    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file`` (never logged)."""
    tls_client_ca_file: Path | None = None
    """PEM CA(s) of client certificates; when set, clients must present one (mutual TLS)."""
    tracing_enabled: bool = False
    """Record OpenTelemetry traces (services/common/tracing.py; the gateway and inference workers,
    the registry records none yet), exported as ``OTEL_TRACES_EXPORTER`` says (otlp when unset).
    Off, the request path has no tracing cost."""
    otel_traces_exporter: str = Field(default="", validation_alias="otel_traces_exporter")
    """Span exporters, comma-separated: otlp (the ``maas[otlp]`` extra), console, none (env
    ``OTEL_TRACES_EXPORTER``, shared by all services); any but none turns tracing on."""
    otel_service_name: str = Field(default="", validation_alias="otel_service_name")
    """The traces' ``service.name`` (env ``OTEL_SERVICE_NAME``); empty: ``maas-<service>``."""
