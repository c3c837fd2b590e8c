"""Settings of an inference worker (env prefix ``MAAS_INFERENCE_``)."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

ProviderSetting = Literal["auto", "cpu", "cuda"]
"""Which ONNX Runtime execution providers a worker asks for."""


def default_worker_id() -> str:
    """Return a worker id unique across hosts and restarts: ``<hostname>-<pid>-<random4>``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class InferenceSettings(ServiceSettings):
    """What one inference worker needs on top of the common server settings."""

    model_config = SettingsConfigDict(env_prefix="MAAS_INFERENCE_", extra="ignore", populate_by_name=True)

    registry_address: str = "127.0.0.1:8002"
    """``host:port`` of the registry's gRPC server (deployments and artifacts)."""
    registry_api_key: SecretStr | None = None
    """API key this worker sends to the registry (the built-in ``system`` key ``worker``: scope
    read); needed when the registry checks keys."""
    registry_tls_ca_file: Path | None = None
    """PEM CA that signed the registry's certificate: set it (or the two below) to call the registry over TLS."""
    registry_tls_cert_file: Path | None = None
    """PEM client certificate presented to the registry (when it requires mutual TLS)."""
    registry_tls_key_file: Path | None = None
    """PEM private key of ``registry_tls_cert_file`` (never logged)."""
    registry_min_transfer_bytes_per_s: float = Field(default=1024 * 1024, gt=0)
    """Slowest registry link a model download is given time for: its deadline is 300 s plus the
    download's size at this throughput (1 MiB/s: a 10 GiB bundle gets 300 s + 10240 s)."""
    pool: str = "default"
    """Pool of deployments this worker serves (pools group models by hardware class)."""
    worker_id: str = Field(default_factory=default_worker_id)
    """Consumer name in every queue's group and heartbeat key; unique per process."""
    cache_dir: Path = Path(".maas/inference-cache")
    """Directory of downloaded model artifacts (``<model>/<version>-<sha256[:12]>.onnx``; a bundle:
    the directory ``<model>/<version>-<sha256[:12]>/`` with its files)."""
    max_model_bytes: int = Field(default=0, ge=0)
    """Memory budget of one model version: a version whose files (a bundle's total) are larger is
    not loaded, with the reason in ``maas status``; 0: no budget."""
    prepack_bundle_weights: bool = False
    """Let ONNX Runtime prepack the weights of bundle versions: False keeps a bundle's external-data
    weights memory-mapped from the cache (clean file pages, shared by the workers of a host and
    reclaimable: 200 MiB of MatMul weights add 0 MiB of private memory instead of 200 MiB), at the
    cost of ORT's prepacked MatMul/Gemm/Conv kernels (measured here: as fast at batch 1, about 2x
    slower at batch 16); True copies them into each worker's memory for speed."""
    providers: ProviderSetting = "auto"
    """ONNX Runtime providers: auto (CUDA only if a GPU driver is present), cpu or cuda."""
    intra_op_threads: int = 0
    """Threads ONNX Runtime uses inside one operator; 0 keeps its default (one per core)."""
    inline_run_max_us: int = Field(default=200, ge=0)
    """Runs whose recent shortest time is below this (in µs) execute on the event loop instead of
    the thread pool, whose hand-off costs more than such a run; 0 always uses the thread pool."""
    max_concurrent_batches: int = Field(default=1, ge=1)
    """Batches of one queue whose model runs go on at once (the run thread pool has one thread more).

    A batch's replies are written while the next batch is read and run. On a CPU one run
    already uses every core (``intra_op_threads``), and a later read takes a fuller batch.
    """
    max_generations: int = Field(default=4, ge=1)
    """Generations (generative versions, ONNX Runtime GenAI) running at once on this worker; each
    has a thread of its own, and more requests wait in their queue."""
    ort_spinning: bool = False
    """Let ONNX Runtime's threads spin-wait for work between runs: a little lower latency on
    cores the worker has to itself, CPU burnt that Redis, the gateway or neighbours need otherwise."""
    busy_fill_us: int = Field(default=1500, ge=0, le=1_000_000)
    """Under load, how long (in µs) a partial batch waits for more requests before it runs; 0: never.

    It waits only when requests are queuing up: the read after a batch finds ``busy_fill_min`` or
    more already waiting (a request reaching an idle worker runs at once), and only for a model
    whose batches run for less than this (a slower model's batches fill up while it runs). Each
    batch costs the worker, Redis and the gateways a few round trips whatever its size: fewer,
    fuller batches leave more CPU for the calls. A deployment's ``max_wait_ms`` > 0 replaces it."""
    busy_fill_min: int = Field(default=4, ge=1)
    """Requests found waiting after a batch that mean the queue is backing up (``busy_fill_us``)."""
    block_ms: int = Field(default=1000, ge=1, le=1000)
    """How long one XREADGROUP blocks, in ms; at most 1000 so a drain is seen within a second."""
    direct_replies: bool = True
    """Hand replies to the gateways' reply listeners when their queue entries name one, before
    acking the entries; their reply streams take what a listener does not acknowledge
    (services/inference/direct_replies.py)."""
    direct_reply_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """How long a connect to a reply listener, or its acknowledgement of a batch's replies, may
    take before the replies go to the reply stream instead (a listener that failed is left alone
    for 5 s)."""
    held_ack_ms: int = Field(default=10, ge=0, le=10_000)
    """How long (in ms) the acks of a batch whose replies all reached reply listeners may wait to
    go with the next XREADGROUP, in the same write, before they are sent alone; 0 sends them at
    once, one round trip more a batch (services/inference/acks.py). Meanwhile the entries stay
    pending and count as in flight."""
    stats_flush_ms: int = Field(default=100, ge=1, le=60_000)
    """How often (in ms) the statistics of the batches answered and acked (``ModelStatistics``' queue and
    compute times, counts by batch size) are added to Redis, in one round trip for every model
    version, instead of with each batch's ack (services/common/stats.py, ``RunStats``); a worker
    killed loses at most this much of them."""
    reclaim_idle_ms: int = Field(default=15000, ge=100)
    """Idle time, in ms, after which another worker's pending entry is reclaimed.

    Live workers re-claim their in-flight entries every third of it, so a long batch is never
    stolen; this bounds how long the requests of a dead worker wait before another runs them.
    """
    reclaim_interval_s: float = 5.0
    """Seconds between two XAUTOCLAIM sweeps of each queue."""
    max_deliveries: int = Field(default=3, ge=1)
    """Deliveries after which an entry is poison: error reply and dead-letter stream."""
    heartbeat_interval_s: float = 2.0
    """Seconds between two heartbeats (the gateway reads them for ModelReady)."""
    heartbeat_ttl_s: float = 10.0
    """Seconds a heartbeat key lives without renewal."""
    reconcile_interval_s: float = 30.0
    """Seconds between two full reconciles with the registry (events trigger one sooner)."""
    port: int = 0
    """gRPC port of the direct, queue-less inference service; 0 picks a free one."""
