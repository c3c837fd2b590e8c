"""The gateway's view of the registry: model resolution, cached and invalidated by events."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog

from services.common import auth, events, generation, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.metadata import (
    DEFAULT_ALIAS,
    MODEL_NAME_RE,
    DeploymentRecord,
    ModelRecord,
    Split,
    VersionRecord,
    shown,
)
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

    @property
    def is_generative(self) -> bool:
        """Whether the version generates text token by token (ONNX Runtime GenAI)."""
        return generation.is_generative(self.version.platform)


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


def version_number(model: ModelRecord, version: str) -> int:
    """Resolve a KServe ``model_version``: a number, an alias of the model, or "" (0).

    Raises:
        InvalidArgument: It is neither a positive integer nor an alias of the model.
    """
    aliased = model.alias_version(version)
    if aliased is not None:
        return aliased
    if version == "" or version.isdigit() or not MODEL_NAME_RE.fullmatch(version):
        return parse_version(model.name, version)
    names = ", ".join(alias for alias, _ in model.aliases) or "none"
    raise InvalidArgument(
        f"model_version for model '{model.name}' must be a positive integer, got '{shown(version)}', "
        f"which is not an alias of the model either (its aliases: {names})"
    )


def _not_served(name: str, number: int, deployment: DeploymentRecord) -> FailedPrecondition:
    served = deployment.served_versions
    which = f"version is {served[0]}" if len(served) == 1 else f"versions are {', '.join(map(str, served))}"
    return FailedPrecondition(f"model '{name}' version {number} is not deployed; the deployed {which}")


class ModelCatalog:
    """Resolves model names and versions through the registry, with a short-lived cache."""

    def __init__(self, registry: RegistryClient, redis: aioredis.Redis, *, ttl_s: float) -> None:
        self._registry = registry
        self._redis = redis
        self._ttl_s = ttl_s
        self._models: dict[str, tuple[float, ModelRecord]] = {}
        self._versions: dict[tuple[str, int], VersionRecord] = {}
        self._generations: dict[str, int] = {}
        """Invalidations per model: a lookup that overlapped one must not cache what it read."""
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
        self._generations[model] = self._generations.get(model, 0) + 1
        for key in [key for key in self._versions if key[0] == model]:
            del self._versions[key]

    async def model(self, name: str, *, is_write: bool = False) -> ModelRecord:
        """Return a model's record if the calling key may see it (or, with ``is_write``, change it).

        The cache holds what the registry told this gateway's ``system`` key (every model); the
        owner check (``auth.check_owner``) runs on every call, for the caller's tenant.

        Raises:
            NotFound: It does not exist, or the caller's tenant may not see it (the same error).
            PermissionDenied: ``is_write``, and the caller's tenant only has it shared.
        """
        now = asyncio.get_running_loop().time()
        cached = self._models.get(name)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            generation = self._generations.get(name, 0)
            record = await self._registry.get_model(name)
            # NOTE: an alias move or a deploy published while get_model was in flight may be missing
            # from ``record``: caching it would serve the old version until the TTL ends.
            if self._generations.get(name, 0) == generation:
                self._models[name] = (now + self._ttl_s, record)
        auth.check_owner(name, record.owner, record.shared_with, is_write=is_write)
        return record

    async def version(self, name: str, version: int) -> VersionRecord:
        """Return a version's record; versions are immutable, so they stay cached until an event.

        Raises:
            NotFound: No such model or version, or the caller may not see the model.
        """
        await self.model(name)  # the owner check, before anything of the version is told
        key = (name, version)
        if key not in self._versions:
            self._versions[key] = await self._registry.get_version(name, version)
        return self._versions[key]

    async def metadata_version(self, name: str, version: str) -> tuple[ModelRecord, VersionRecord]:
        """Resolve a version for metadata: the requested, else ``default``'s, else the deployed, else the latest.

        The requested version may be a number or an alias; the deployed one is the split's largest weight.
        """
        model = await self.model(name)
        number = version_number(model, version) or model.alias_version(DEFAULT_ALIAS) or 0
        if number == 0:
            number = model.deployment.version if model.deployment else model.latest_version
        if number == 0:
            raise NotFound(f"model '{name}' has no versions")
        return model, await self.version(name, number)

    async def resolve(self, name: str, version: str) -> Target:
        """Resolve a call's model and version to its deployed target.

        A number or an alias names one version (bypassing the split); no version is the model's
        ``default`` alias if set, else a weighted random pick from the deployment's split, per call.

        Raises:
            NotFound: The model, or the version asked for, does not exist.
            FailedPrecondition: It is not deployed, or not that version.
            InvalidArgument: The version is neither a number nor an alias of the model.
        """
        model, deployment, split = await self.candidates(name, version)
        versions, weights = zip(*split, strict=True)
        number = versions[0] if len(versions) == 1 else random.choices(versions, weights)[0]
        return Target(model, await self.version(name, number), deployment)

    async def candidates(self, name: str, version: str) -> tuple[ModelRecord, DeploymentRecord, Split]:
        """Return the model, its deployment and the (version, weight) pairs a call may go to.

        Raises:
            NotFound: The model, or the version asked for, does not exist.
            FailedPrecondition: It is not deployed, or not that version.
            InvalidArgument: The version is neither a number nor an alias of the model.
        """
        model = await self.model(name)
        number = version_number(model, version)
        if number:
            await self.version(name, number)  # NotFound for a version that does not exist
        deployment = model.deployment
        if deployment is None:
            raise FailedPrecondition(f"model '{name}' is not deployed; deploy it with `maas deploy {name}`")
        number = number or model.alias_version(DEFAULT_ALIAS) or 0
        if number == 0:
            return model, deployment, deployment.split
        if number not in deployment.served_versions:
            raise _not_served(name, number, deployment)
        return model, deployment, ((number, 100),)

    async def list_models(self) -> list[ModelRecord]:
        """List every model of the registry (uncached)."""
        return await self._registry.list_models()

    async def load(self, name: str, overrides: DeployOverrides) -> None:
        """Deploy the latest version of a model that is not deployed; apply ``overrides`` to it.

        Settings ``overrides`` leaves unset keep the current deployment's values, and so does its split.
        """
        model = await self._registry.get_model(name)
        auth.check_owner(name, model.owner, model.shared_with, is_write=True)
        current = model.deployment
        if current is not None and overrides == DeployOverrides():
            return
        await self._registry.deploy(
            name,
            traffic=current.split if current else (),
            max_batch_size=_first(overrides.max_batch_size, current and current.max_batch_size),
            max_wait_ms=_first(overrides.max_wait_ms, current and current.max_wait_ms),
            pool=_first(overrides.pool, current and current.pool),
            max_queue_length=current.max_queue_length if current else None,
        )
        self.invalidate(name)

    async def unload(self, name: str) -> None:
        """Undeploy a model."""
        await self.model(name, is_write=True)
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
