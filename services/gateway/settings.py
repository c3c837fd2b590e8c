"""Gateway settings (env prefix ``MAAS_GATEWAY_``; ``MAAS_REDIS_URL`` for Redis)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


def _default_gateway_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class GatewaySettings(ServiceSettings):
    """Settings of one gateway process."""

    model_config = SettingsConfigDict(env_prefix="MAAS_GATEWAY_", extra="ignore", populate_by_name=True)

    port: int = 8001
    """gRPC port of the public inference endpoint."""
    registry_address: str = "127.0.0.1:8002"
    """host:port of the registry's gRPC endpoint."""
    registry_api_key: SecretStr | None = None
    """API key this gateway sends to the registry (the built-in ``system`` key ``gateway``:
    scopes read and write); needed when the registry checks keys."""
    registry_tls_ca_file: Path | None = None
    """PEM CA that signed the registry's certificate: set it (or the two below) to call the registry over TLS."""
    registry_tls_cert_file: Path | None = None
    """PEM client certificate presented to the registry (when it requires mutual TLS)."""
    registry_tls_key_file: Path | None = None
    """PEM private key of ``registry_tls_cert_file`` (never logged)."""
    gateway_id: str = Field(default_factory=_default_gateway_id)
    """Unique id of this process; names its reply stream."""
    default_timeout_s: float = 60.0
    """Deadline of a call whose client set none (also the cap on client deadlines)."""
    registry_timeout_s: float = 5.0
    """Timeout of one registry call."""
    metadata_cache_ttl_s: float = 30.0
    """How long model metadata is cached; registry events invalidate it sooner."""
    quota_cache_ttl_s: float = 5.0
    """How long a tenant's quota is cached; the registry's ``tenant_quota_set`` event clears it sooner."""
    reply_stream_ttl_s: float = 60.0
    """TTL kept alive on the reply stream; it expires if this process dies."""
    block_ms: int = 1000
    """How long one XREAD on the reply stream blocks."""
    direct_replies: bool = True
    """Take workers' replies over a TCP listener of this gateway, one process hop fewer than the
    Redis reply stream, which stays the fallback (services/gateway/direct_replies.py). Off when
    the gateway serves TLS (the listener has none yet) or binds every address without
    ``reply_advertise_host``."""
    reply_host: str = ""
    """Address the reply listener binds ('': the gateway's ``host``)."""
    reply_port: int = Field(default=0, ge=0, le=65535)
    """Port of the reply listener; 0 picks a free one (workers learn it from the queue entries)."""
    reply_advertise_host: str = ""
    """Host workers connect to for replies ('': the bound address; in Kubernetes, the pod's IP)."""
    reply_socket: str = ""
    """A Unix socket the reply listener binds too ('': none); workers on this host (same host
    name) connect there instead, for about half the CPU per reply frame. ``maas up`` sets it."""
    max_request_tensor_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """Most bytes one inference request may hold (its tensors, plus a few bytes of names and
    shapes); larger calls get RESOURCE_EXHAUSTED before they are copied or written to Redis."""
    max_stream_in_flight: int = Field(default=64, ge=1)
    """Most requests of one ModelStreamInfer stream in flight at once; the gateway reads the
    stream's next request only when one of them is answered (backpressure)."""
    max_new_tokens: int = Field(default=1024, ge=1)
    """Largest ``max_new_tokens`` a call to a generative model may ask for (its default: 128, or this if lower)."""
    drain_delay_s: float = 2.0
    """After SIGTERM, keep serving this long while load balancers remove the endpoint."""

    @model_validator(mode="after")
    def _message_limit_follows_the_request_limit(self) -> GatewaySettings:
        # NOTE: gRPC refuses a message over max_message_bytes before Python copies it; above the
        # request limit a message is refused anyway, so by default refuse it there (1 MiB for the
        # rest of the message), not after three copies (measured: about 5x its size in Python).
        if "max_message_bytes" not in self.model_fields_set:
            self.max_message_bytes = self.max_request_tensor_bytes + 1024 * 1024
        return self
