"""The gateway's view of the registry: model resolution, cached and invalidated by events."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from services.common import events, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.metadata import DeploymentRecord, ModelRecord, VersionRecord
from services.common.redis_conn import redis_errors
from services.common.registry_client import RegistryClient
from services.common.tasks import finish_tasks
from services.gateway.overrides import DeployOverrides

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Target:
    """Where a call goes: the deployed version of a model and its signature."""

    model: ModelRecord
    version: VersionRecord
    deployment: DeploymentRecord

    @property
    def queue(self) -> str:
        """The version's request stream."""
        return keys.queue(self.model.name, self.version.version)


def _first(*values: Any) -> Any:
    """The first value that is not None (a falsy 0 or "" counts), else None."""
    return next((value for value in values if value is not None), None)


def parse_version(model: str, version: str) -> int:
    """Parse a KServe ``model_version`` string ("" means the deployed version: 0).

    Raises:
        InvalidArgument: It is not a positive integer.
    """
    if version == "":
        return 0
    # NOTE: isdigit() alone takes superscripts (int() refuses them) and any length (the registry's int64 does not).
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) < 2**63:
        raise InvalidArgument(f"model_version for model '{model}' must be a positive integer, got '{version}'")
    return int(version)


class ModelCatalog:
    """Resolves model names and versions through the registry, with a short-lived cache."""

    def __init__(self, registry: RegistryClient, redis: aioredis.Redis, *, ttl_s: float) -> None:
        self._registry = registry
        self._redis = redis
        self._ttl_s = ttl_s
        self._models: dict[str, tuple[float, ModelRecord]] = {}
        self._versions: dict[tuple[str, int], VersionRecord] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start following registry events to invalidate the cache."""
        self._task = asyncio.create_task(self._follow_events(), name="catalog-events")

    async def stop(self) -> None:
        """Stop following events."""
        if self._task is not None:
            await finish_tasks([self._task], 0)

    async def _follow_events(self) -> None:
        while True:
            try:
                async for event in events.follow(self._redis):
                    self.invalidate(event.model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a supervised loop: log, drop the cache, restart
                log.warning("catalog_events_failed", error=str(exc))
                self._models.clear()
                await asyncio.sleep(1.0)

    def invalidate(self, model: str) -> None:
        """Forget what is cached about ``model`` (a deleted and recreated model reuses numbers)."""
        self._models.pop(model, None)
        for key in [key for key in self._versions if key[0] == model]:
            del self._versions[key]

    async def model(self, name: str) -> ModelRecord:
        """Return a model's record (NotFound if it does not exist)."""
        now = asyncio.get_running_loop().time()
        cached = self._models.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        record = await self._registry.get_model(name)
        self._models[name] = (now + self._ttl_s, record)
        return record

    async def version(self, name: str, version: int) -> VersionRecord:
        """Return a version's record; versions are immutable, so they stay cached until an event."""
        key = (name, version)
        if key not in self._versions:
            self._versions[key] = await self._registry.get_version(name, version)
        return self._versions[key]

    async def metadata_version(self, name: str, version: str) -> tuple[ModelRecord, VersionRecord]:
        """Resolve a version for metadata: the requested, else the deployed, else the latest."""
        model = await self.model(name)
        number = parse_version(name, version)
        if number == 0:
            number = model.deployment.version if model.deployment else model.latest_version
        if number == 0:
            raise NotFound(f"model '{name}' has no versions")
        return model, await self.version(name, number)

    async def resolve(self, name: str, version: str) -> Target:
        """Resolve a call's model and version to its deployed target.

        Raises:
            NotFound: The model, or the version asked for, does not exist.
            FailedPrecondition: It is not deployed, or another version is.
            InvalidArgument: The version string is malformed.
        """
        model = await self.model(name)
        number = parse_version(name, version)
        if number:
            await self.version(name, number)  # NotFound for a version that does not exist
        deployment = model.deployment
        if deployment is None:
            raise FailedPrecondition(f"model '{name}' is not deployed; deploy it with `maas deploy {name}`")
        if number not in (0, deployment.version):
            raise FailedPrecondition(
                f"model '{name}' version {number} is not deployed; the deployed version is {deployment.version}"
            )
        return Target(model, await self.version(name, deployment.version), deployment)

    async def list_models(self) -> list[ModelRecord]:
        """List every model of the registry (uncached)."""
        return await self._registry.list_models()

    async def load(self, name: str, overrides: DeployOverrides) -> None:
        """Deploy the latest version of a model that is not deployed; apply ``overrides`` to it.

        Settings ``overrides`` leaves unset keep the current deployment's values.
        """
        current = (await self._registry.get_model(name)).deployment
        if current is not None and overrides == DeployOverrides():
            return
        await self._registry.deploy(
            name,
            current.version if current else 0,
            max_batch_size=_first(overrides.max_batch_size, current and current.max_batch_size),
            max_wait_ms=_first(overrides.max_wait_ms, current and current.max_wait_ms),
            pool=_first(overrides.pool, current and current.pool),
            max_queue_length=current.max_queue_length if current else None,
        )
        self.invalidate(name)

    async def unload(self, name: str) -> None:
        """Undeploy a model."""
        await self._registry.undeploy(name)
        self.invalidate(name)

    async def ready_workers(self, name: str, version: int) -> int:
        """Count live workers (fresh heartbeats) that have ``name`` at ``version`` loaded."""
        wanted = f"{name}:{version}"
        count = 0
        with redis_errors("worker heartbeats"):
            async for key in self._redis.scan_iter(match=f"{keys.WORKER_PREFIX}*", count=100):
                raw = await self._redis.get(key)
                beat: dict[str, Any] = json.loads(raw) if raw else {}
                count += wanted in beat.get("models", [])
        return count
