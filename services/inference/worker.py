"""The inference worker: reconcile deployments into loaded models with queue consumers, heartbeat, drain.

The model source (the registry in production) is injected, so the worker runs against any
object that lists deployments and downloads artifacts.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.common import events, generation, keys, stats
from services.common.errors import FailedPrecondition, MaasError, NotFound
from services.common.metadata import DeploymentRecord, VersionRecord
from services.common.queue import now_ms
from services.common.tasks import finish_tasks
from services.inference import queue_metrics
from services.inference.consumer import QueueConsumer, sleep_unless, supervise
from services.inference.direct_replies import DirectReplies
from services.inference.generation import GenerationConsumer, GenerationModel, GenerationPool
from services.inference.runtime import InferRequest, InferResult, ModelRuntime, parse_version
from services.inference.settings import InferenceSettings

log = structlog.get_logger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_RECONCILE_RETRY_S = 2.0
"""Wait before retrying a reconcile whose deployment listing failed (registry down)."""
_RETIRE_CHECK_S = 0.5
"""How often a retiring model version's queue is checked for being empty."""
_RETIRE_GRACE_S = 2.0
"""Least time a version stays loaded after leaving the deployment: a gateway may still enqueue
for it meanwhile (a call resolved just before the registry's event reached it)."""


class ModelSource(Protocol):
    """Where deployments and artifacts come from (``RegistryClient`` in production)."""

    async def list_deployments(self, pool: str = "") -> list[DeploymentRecord]:
        """List deployments of ``pool`` (every pool if empty)."""
        ...

    async def get_version(self, model: str, version: int = 0) -> VersionRecord:
        """Get one version's record (sha256 and signature)."""
        ...

    async def download_version(self, model: str, version: int, dest: Path) -> VersionRecord:
        """Write the version's artifact to ``dest`` atomically, sha256 verified."""
        ...

    async def download_bundle(self, model: str, version: int, dest: Path) -> VersionRecord:
        """Write a bundle version's files into the directory ``dest``, each sha256 verified (complete ones skipped)."""
        ...


@dataclass
class _Served:
    """A loaded model version and the consumer of its queue."""

    runtime: ModelRuntime | GenerationModel
    consumer: QueueConsumer


def _desired(deployments: Iterable[DeploymentRecord]) -> dict[tuple[str, int], DeploymentRecord]:
    """Map each (model, version) to serve to its deployment: every version with weight or an alias."""
    return {(d.model, version): replace(d, version=version) for d in deployments for version in d.served_versions}


def _cache_path(cache_dir: Path, record: VersionRecord) -> Path:
    """Where a version's .onnx file is cached: a single file, or the entry point in the bundle's directory."""
    if record.is_bundle:
        return cache_dir / record.model / f"{record.version}-{record.sha256[:12]}" / record.entry_file
    return cache_dir / record.model / f"{record.version}-{record.sha256[:12]}.onnx"


def _check_budget(record: VersionRecord, max_model_bytes: int) -> None:
    """Refuse a version larger than the worker's memory budget (0: none).

    Raises:
        FailedPrecondition: It is larger (the message names both sizes and the setting).
    """
    if max_model_bytes and record.size_bytes > max_model_bytes:
        raise FailedPrecondition(
            f"refused: {record.size_bytes} bytes of model files exceed this worker's memory budget of "
            f"{max_model_bytes} bytes (max_model_bytes)"
        )


class InferenceWorker:
    """Serves every deployment of its pool: one loaded runtime and one queue consumer each."""

    def __init__(self, settings: InferenceSettings, redis: aioredis.Redis, source: ModelSource) -> None:
        self.settings = settings
        self.grpc_port = 0
        """Port of the direct gRPC service, published in the heartbeat (set by server.py)."""
        self._redis = redis
        self._source = source
        self._served: dict[tuple[str, int], _Served] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._is_ready = False
        self._is_drained = False
        self._executor: ThreadPoolExecutor | None = None
        self._generations: GenerationPool | None = None
        self._direct = DirectReplies(settings.direct_reply_timeout_s) if settings.direct_replies else None
        """Connections to the gateways' reply listeners, shared by every consumer."""
        self._run_stats = stats.RunStats(redis, interval_s=settings.stats_flush_ms / 1000)
        """The statistics of the batches every consumer answered, not yet in Redis."""
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._progress: asyncio.Event | None = None
        self._events_id = "$"
        self._retiring: dict[tuple[str, int], float] = {}
        self._load_errors: dict[tuple[str, int], str] = {}
        """Why each desired version that is not served failed to load (heartbeat: ``maas status``)."""
        """Served versions no longer deployed, unloaded once idle and past their time (``_retire_at``)."""

    @property
    def is_ready(self) -> bool:
        """Whether a reconcile has completed (every loadable deployment is loaded)."""
        return self._is_ready and not self._is_drained

    @property
    def served_models(self) -> list[str]:
        """``name:version`` of every model version served, sorted."""
        return sorted(f"{model}:{version}" for model, version in self._served)

    async def start(self) -> None:
        """Load the deployed models (first reconcile), then start the background loops."""
        # One thread more than a queue may use: another model's run never waits behind its runs.
        self._executor = ThreadPoolExecutor(self.settings.max_concurrent_batches + 1, thread_name_prefix="ort-run")
        self._generations = GenerationPool(self.settings.max_generations)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._progress = asyncio.Event()
        self._events_id = await self._last_event_id()
        await self._run_stats.start()
        queue_metrics.watch_worker(self, self.settings.pool, lambda: self.served_models, self._redis)
        await self.reconcile()
        self._loops = [
            asyncio.create_task(supervise("reconcile", self._reconcile_loop, self._stop)),
            asyncio.create_task(supervise("events", self._follow_events, self._stop)),
            asyncio.create_task(supervise("heartbeat", self._heartbeat_loop, self._stop)),
        ]
        log.info("worker_started", worker_id=self.settings.worker_id, models=self.served_models)

    # Reconcile ---------------------------------------------------------------------------

    async def reconcile(self) -> bool:
        """Make the served models match the pool's deployments.

        Returns:
            Whether the deployments could be listed (a failed load is retried next time).
        """
        assert self._lock is not None
        async with self._lock:
            if self._is_drained:
                return False
            try:
                deployments = await self._source.list_deployments(self.settings.pool)
            except MaasError as exc:
                log.warning("reconcile_failed", reason=exc.message)
                return False
            desired = _desired(d for d in deployments if d.pool in (self.settings.pool, ""))
            before = self.served_models
            self._retiring = {key: self._retire_at(key, desired) for key in self._served if key not in desired}
            for key in list(self._retiring):
                await self._retire(key)
            self._load_errors = {key: reason for key, reason in self._load_errors.items() if key in desired}
            for key, deployment in desired.items():
                await self._apply(key, deployment)
            self._is_ready = True
        if self.served_models != before and self._stop is not None:
            # Publish at once so the gateway's ModelReady follows the change without a beat's delay.
            await self._beat_or_warn()
        return True

    async def _beat_or_warn(self) -> None:
        try:
            await self.beat()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("heartbeat_failed", error=str(exc))

    async def _apply(self, key: tuple[str, int], deployment: DeploymentRecord) -> None:
        served = self._served.get(key)
        if served is not None:
            served.consumer.deployment = deployment
            return
        try:
            runtime = await self._load(deployment)
        except Exception as exc:  # a bad model must not stop the others; retried next reconcile
            reason = exc.message if isinstance(exc, MaasError) else repr(exc)
            self._load_errors[key] = reason
            # A version over the memory budget is this worker's choice, not a failure: a warning.
            level = log.warning if isinstance(exc, FailedPrecondition) else log.error
            event = "model_refused" if isinstance(exc, FailedPrecondition) else "model_load_failed"
            level(event, model=deployment.model, version=deployment.version, reason=reason)
            return
        self._load_errors.pop(key, None)
        assert self._progress is not None and self._generations is not None
        consumer: QueueConsumer
        if isinstance(runtime, GenerationModel):
            consumer = GenerationConsumer(
                self._redis, runtime, deployment, self.settings, self._generations,
                run_stats=self._run_stats, progress=self._progress,
            )  # fmt: skip
        else:
            consumer = QueueConsumer(
                self._redis, runtime, deployment, self.settings,
                run_stats=self._run_stats, progress=self._progress, direct=self._direct,
            )  # fmt: skip
        consumer.start()
        self._served[key] = _Served(runtime, consumer)

    async def _load(self, deployment: DeploymentRecord) -> ModelRuntime | GenerationModel:
        assert self._executor is not None
        started = time.perf_counter()
        record = await self._source.get_version(deployment.model, deployment.version)
        _check_budget(record, self.settings.max_model_bytes)
        path = _cache_path(self.settings.cache_dir, record)
        if record.is_bundle:  # resumable: the files already complete in the cache are skipped
            await self._source.download_bundle(deployment.model, deployment.version, path.parent)
        elif not await asyncio.to_thread(path.exists):
            await self._source.download_version(deployment.model, deployment.version, path)
        if generation.is_generative(record.platform):
            model = await GenerationModel.load(path.parent, model=deployment.model, version=deployment.version)
            log.info("model_loaded", model=deployment.model, version=deployment.version, platform=record.platform)
            return model
        runtime = await ModelRuntime.load(
            path,
            model=deployment.model,
            version=deployment.version,
            providers=self.settings.providers,
            intra_op_threads=self.settings.intra_op_threads,
            executor=self._executor,
            inline_run_max_s=self.settings.inline_run_max_us / 1e6,
            spinning=self.settings.ort_spinning,
            class_labels=record.class_labels,
            custom_ops=record.custom_ops,
            prepacking=not record.is_bundle or self.settings.prepack_bundle_weights,
        )
        load_s = time.perf_counter() - started
        queue_metrics.MODEL_LOAD_SECONDS.labels(model=deployment.model, version=str(deployment.version)).observe(load_s)
        log.info(
            "model_loaded",
            model=deployment.model,
            version=deployment.version,
            providers=runtime.providers,
            is_batchable=runtime.signature.is_batchable,
            load_ms=round(load_s * 1000, 3),
        )
        return runtime

    async def _retire(self, key: tuple[str, int]) -> None:
        # NOTE: requests already queued for a replaced or undeployed version are served before
        # it is unloaded; unloading at once would leave them to time out. The gateway stops
        # sending to it as soon as the registry's event reaches it.
        served = self._served[key]
        try:
            is_idle = await served.consumer.is_idle()
        except _REDIS_ERRORS:
            is_idle = False
        if not is_idle:
            log.info("model_retiring", model=key[0], version=key[1])
        elif time.monotonic() >= self._retiring[key]:
            await self._unload(key)
            del self._retiring[key]

    def _retire_at(self, key: tuple[str, int], desired: dict[tuple[str, int], DeploymentRecord]) -> float:
        """When a version that left the deployments may be unloaded once idle (``time.monotonic``)."""
        if key in self._retiring:
            return self._retiring[key]
        # A version replaced within a deployment (a split or an alias change) gets the grace; an
        # undeployed model's queues were failed by the registry, so nothing more can come.
        is_deployed = any(model == key[0] for model, _ in desired)
        return time.monotonic() + (_RETIRE_GRACE_S if is_deployed else 0.0)

    async def _unload(self, key: tuple[str, int]) -> None:
        # NOTE: removed from _served only once stopped, so a drain that cancels this still stops it.
        served = self._served[key]
        await served.consumer.stop(self.settings.shutdown_grace_s)
        await self._delete_consumer(served.consumer)
        del self._served[key]
        log.info("model_unloaded", model=key[0], version=key[1])

    async def _delete_consumer(self, consumer: QueueConsumer) -> None:
        try:
            await consumer.delete_consumer()
        except _REDIS_ERRORS as exc:
            log.warning("consumer_delete_failed", queue=consumer.queue, error=str(exc))

    async def _reconcile_loop(self) -> None:
        assert self._wake is not None and self._stop is not None
        is_ok = True
        while not self._stop.is_set():
            wait_s = self.settings.reconcile_interval_s if is_ok else _RECONCILE_RETRY_S
            if self._retiring:
                wait_s = min(wait_s, _RETIRE_CHECK_S)
            await sleep_unless(self._wake, wait_s)
            self._wake.clear()
            is_ok = await self.reconcile()

    async def _last_event_id(self) -> str:
        try:
            return await events.last_event_id(self._redis)
        except _REDIS_ERRORS as exc:
            log.warning("redis_unreachable", loop="events", error=str(exc))
            return "$"

    async def _follow_events(self) -> None:
        # NOTE: resumes from the last event id seen (set before the first reconcile), so a
        # deployment published between that reconcile, or during a Redis outage, is not missed.
        assert self._wake is not None
        async for event in events.follow(self._redis, last_id=self._events_id, block_ms=self.settings.block_ms):
            self._events_id = event.id
            log.debug("registry_event", kind=event.kind, model=event.model)
            self._wake.set()

    # Heartbeat ---------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._stop is not None
        while True:
            await self.beat()
            if await sleep_unless(self._stop, self.settings.heartbeat_interval_s):
                return

    async def beat(self) -> None:
        """Publish the heartbeat key: who this worker is and what it serves (gateway's ModelReady)."""
        payload = {
            "worker_id": self.settings.worker_id,
            "pool": self.settings.pool,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "port": self.grpc_port,
            "models": self.served_models,
            "providers": sorted({p for served in self._served.values() for p in served.runtime.providers}),
            "in_flight": sum(served.consumer.in_flight for served in self._served.values()),
            "load_errors": [f"{model}:{version}: {reason}" for (model, version), reason in self._load_errors.items()],
            "ts_ms": now_ms(),
        }
        if self._generations is not None and any(
            isinstance(served.consumer, GenerationConsumer) for served in self._served.values()
        ):
            payload |= {"generations": self._generations.running, "max_generations": self._generations.max_generations}
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        await self._redis.set(keys.worker(self.settings.worker_id), json.dumps(payload), px=ttl_ms)

    # Drain -------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop reading, finish in-flight batches, delete idle consumers and the heartbeat.

        Idempotent; safe to call if ``start`` never ran or failed half-way.
        """
        if self._is_drained:
            return
        self._is_drained = True
        queue_metrics.unwatch_worker(self)
        log.info("worker_draining", worker_id=self.settings.worker_id)
        if self._stop is not None:
            self._stop.set()
        # NOTE: reconcile, events and heartbeat hold no work: cancel them at once.
        await finish_tasks(self._loops, 0)
        served = list(self._served.values())
        grace_s = self.settings.shutdown_grace_s
        await asyncio.gather(*(entry.consumer.stop(grace_s) for entry in served))
        for entry in served:
            await self._delete_consumer(entry.consumer)
        await self._run_stats.stop()  # the answered batches' statistics that are left
        try:
            await self._redis.delete(keys.worker(self.settings.worker_id))
        except _REDIS_ERRORS as exc:
            log.warning("heartbeat_delete_failed", error=str(exc))
        self._served.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._generations is not None:
            self._generations.shutdown()
        if self._direct is not None:
            await self._direct.close()
        log.info("worker_drained", worker_id=self.settings.worker_id)

    async def run_until_empty(self, timeout_s: float = 30.0) -> None:
        """Wait until every served queue is empty, nothing read is unanswered and its statistics are sent (for tests).

        Raises:
            TimeoutError: Work remained after ``timeout_s``.
        """
        assert self._progress is not None
        async with asyncio.timeout(timeout_s):
            while True:
                self._progress.clear()
                if await self._is_idle():
                    break
                await self._progress.wait()
            await self._run_stats.flush()  # what was answered is counted in Redis too

    async def _is_idle(self) -> bool:
        states = await asyncio.gather(*(entry.consumer.is_idle() for entry in self._served.values()))
        return all(states)

    # Direct (queue-less) inference --------------------------------------------------------

    def runtime(self, model: str, version: int = 0) -> ModelRuntime:
        """Return the loaded runtime of ``model`` (version 0: the highest loaded).

        Raises:
            NotFound: This worker has not loaded that model version.
        """
        versions = self.versions(model)
        if not versions:
            raise NotFound(f"model '{model}' is not loaded on this worker")
        chosen = version or versions[-1]
        if chosen not in versions:
            raise NotFound(f"model '{model}' version {version} is not loaded on this worker")
        runtime = self._served[(model, chosen)].runtime
        if isinstance(runtime, GenerationModel):
            raise FailedPrecondition(
                f"model '{model}' is generative: call it through the gateway (ModelStreamInfer streams its tokens)"
            )
        return runtime

    def versions(self, model: str) -> list[int]:
        """Loaded versions of ``model``, ascending."""
        return sorted(version for name, version in self._served if name == model)

    def is_model_ready(self, model: str, version: int = 0) -> bool:
        """Whether ``model`` (that version, or any if 0) is loaded and served."""
        versions = self.versions(model)
        return bool(versions) and (version == 0 or version in versions)

    async def infer(self, request: InferRequest) -> InferResult:
        """Run one request directly on the loaded runtime (no queue, no batching).

        Raises:
            InvalidArgument: The request does not fit the model's signature.
            NotFound: The model version is not loaded here.
            MaasError: The run failed.
        """
        runtime = self.runtime(request.model, parse_version(request.version))
        runtime.signature.validate(request)
        names = request.outputs or runtime.signature.output_names
        outputs = await runtime.run(request.inputs, names)
        return InferResult(runtime.model, runtime.version, request.id, runtime.classify(outputs, request))
