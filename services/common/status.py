"""What ``maas status`` and ``maas top`` show: live workers and each deployed model version's queue.

The registry builds it from Redis (``services.registry.cluster_status``) and answers
``GetClusterStatus``; the client and the CLI receive the same records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.stats import CallWindow

WAITING_FOR_A_WORKER = "waiting for a worker"
"""State of a deployed version no live worker has loaded: its calls wait in its queue (scale to zero)."""
SERVING = "serving"
"""State of a deployed version that at least one live worker has loaded."""


@dataclass(frozen=True)
class WorkerStatus:
    """One live inference worker, as its last heartbeat tells."""

    worker_id: str
    pool: str
    host: str = ""
    providers: tuple[str, ...] = ()
    """ONNX Runtime providers of its loaded models (the device: CUDA or CPU)."""
    models: tuple[str, ...] = ()
    """Loaded model versions, ``name:version``."""
    in_flight: int = 0
    """Queue entries read and not yet answered."""
    heartbeat_age_ms: int = 0
    load_errors: tuple[str, ...] = ()
    """Model versions it refused or failed to load, ``name:version: reason`` (retried each reconcile)."""
    generations: int = 0
    """Generations it runs now, across its generative models."""
    max_generations: int = 0
    """Generations it runs at once at most (``max_generations``); 0: it serves no generative model."""


@dataclass(frozen=True)
class QueueStatus:
    """One deployed model version: its queue, the workers that serve it, its calls over the last minute."""

    model: str
    version: int
    pool: str
    workers: int = 0
    """Live workers that have this version loaded."""
    length: int = 0
    """Entries in the queue, read or not (answered entries are deleted)."""
    pending: int = 0
    """Entries read by a worker and not yet answered."""
    oldest_age_ms: int = 0
    """Age of the oldest entry (0: the queue is empty)."""
    calls: CallWindow = field(default_factory=CallWindow)

    @property
    def state(self) -> str:
        """``serving``, or ``waiting for a worker`` when no live worker has the version loaded."""
        return SERVING if self.workers else WAITING_FOR_A_WORKER


@dataclass(frozen=True)
class ClusterStatus:
    """Workers by id and queues by model and version, read at ``time_ms``."""

    workers: tuple[WorkerStatus, ...] = ()
    queues: tuple[QueueStatus, ...] = ()
    time_ms: int = 0
