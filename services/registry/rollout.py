"""Aliases and traffic splits: names for versions, canaries, promotions and rollbacks.

Redis layout (names from ``services.common.keys``):

- ``keys.aliases(name)``: hash, alias name -> version number, for one model.
- ``keys.DEPLOYMENTS``: each ``DeploymentRecord`` carries its split (``traffic``: versions and
  weights summing to 100) and the split before the last change (``previous_traffic``), which
  ``rollback`` restores.

How a call finds its version (the gateway, ``services.gateway.clients``): a number is that
version; an alias is the version it points to; no version is the ``default`` alias if the model
has one (``metadata.DEFAULT_ALIAS``), else a weighted random pick from the split. Workers load
every version of the split and every version an alias of a deployed model points to
(``DeploymentRecord.served_versions``), so moving an alias never sends calls to a version nobody
will load. An explicit version or alias bypasses the split.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

import redis.asyncio as aioredis
import structlog

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.metadata import DeploymentRecord, Split, check_name, shown
from services.common.queue import now_ms
from services.common.redis_conn import redis_errors

log = structlog.get_logger(__name__)

TOTAL_WEIGHT = 100
"""The weights of a split sum to this (percent)."""

Alias = tuple[str, int]
"""An alias and the version it points to."""
Publish = Callable[..., Awaitable[None]]
"""Publishes a registry event: ``publish(kind, model, version)``."""
Authorize = Callable[..., Awaitable[None]]
"""Refuses a model the calling key may not see or change: ``await authorize(model, is_write=...)``."""

_WHAT = "model store"
_MAX_ATTEMPTS = 20
"""Compare-and-set attempts of a deployment change before giving up (each loses to another writer)."""

_SET_ALIAS_LUA = """
-- KEYS[1]: model hash, KEYS[2]: versions hash, KEYS[3]: aliases hash; ARGV: alias, version.
-- Returns 1 when set, 0 when the model is gone, -1 when the version is.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return -1 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""
_DELETE_ALIAS_LUA = """
-- KEYS[1]: model hash, KEYS[2]: aliases hash; ARGV: alias. 1 deleted, 0 no model, -1 no alias.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return -1 end
return 1
"""
_REPLACE_DEPLOYMENT_LUA = """
-- KEYS[1]: model hash, KEYS[2]: deployments hash; ARGV: model name, expected JSON ('' = none), new JSON.
-- Returns 1 when stored, 0 when the model is gone, -1 when the deployment changed meanwhile.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[2], ARGV[1])
if (current or '') ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""


def check_alias(alias: str) -> None:
    """Refuse an alias that does not follow the name rule, or that reads as a version number.

    Raises:
        InvalidArgument: It does, naming the alias and the rule.
    """
    check_name(alias, "alias name")
    if alias.isdigit():
        raise InvalidArgument(
            f"alias name '{alias}' is invalid: it must not be a number (model_version '{alias}' means version {alias})"
        )


def check_traffic(traffic: Iterable[tuple[int, int]]) -> Split:
    """Validate a traffic split and return it ordered by version.

    Raises:
        InvalidArgument: It is empty, names a version twice or a version < 1, has a weight outside
            1..100, or its weights do not sum to 100.
    """
    split = tuple(sorted(traffic))
    if not split:
        raise InvalidArgument("traffic must name at least one version")
    versions = [version for version, _ in split]
    for version, weight in split:
        if version < 1:
            raise InvalidArgument(f"traffic: version must be >= 1, got {version}")
        if not 1 <= weight <= TOTAL_WEIGHT:
            raise InvalidArgument(f"traffic: the weight of version {version} must be 1..{TOTAL_WEIGHT}, got {weight}")
    if len(set(versions)) != len(versions):
        raise InvalidArgument(f"traffic names a version more than once: {versions}")
    total = sum(weight for _, weight in split)
    if total != TOTAL_WEIGHT:
        raise InvalidArgument(f"traffic weights must sum to {TOTAL_WEIGHT}, got {total} ({_shown_split(split)})")
    return split


def primary_version(split: Split) -> int:
    """Return the version with the largest weight (the newest among equals)."""
    return max(split, key=lambda pair: (pair[1], pair[0]))[0]


def aliases_from_hash(raw: dict[bytes, bytes]) -> tuple[Alias, ...]:
    """Convert the aliases hash as redis-py returns it into (alias, version) pairs by alias."""
    return tuple(sorted((name.decode(), int(version)) for name, version in raw.items()))


def with_aliases(deployment: DeploymentRecord, aliases: Iterable[Alias]) -> DeploymentRecord:
    """Return ``deployment`` with ``aliased_versions``: the versions ``aliases`` point to."""
    return replace(deployment, aliased_versions=tuple(sorted({version for _, version in aliases})))


def _shown_split(split: Split) -> str:
    return ", ".join(f"{version}={weight}" for version, weight in split)


class Rollouts:
    """Aliases and deployment changes that must see the current deployment (rollbacks, splits).

    Args:
        redis: Client of the metadata.
        publish: Announces a change to gateways and workers (``ModelStore``'s events).
        authorize: The model access check of the calling key (``ModelSharing.check``).
    """

    def __init__(self, redis: aioredis.Redis, publish: Publish, authorize: Authorize) -> None:
        self._redis = redis
        self._publish = publish
        self._authorize = authorize
        # Script objects reload themselves after NOSCRIPT (e.g. a Redis restart).
        self._set_alias = redis.register_script(_SET_ALIAS_LUA)
        self._delete_alias = redis.register_script(_DELETE_ALIAS_LUA)
        self._replace = redis.register_script(_REPLACE_DEPLOYMENT_LUA)

    # Aliases

    async def set_alias(self, model: str, alias: str, version: int) -> Alias:
        """Point ``alias`` at an existing version of ``model``, creating or moving it.

        Raises:
            InvalidArgument: The model name, alias or version is invalid.
            NotFound: No such model or version.
            Unavailable: Redis cannot be reached.
        """
        check_name(model)
        check_alias(alias)
        if version < 1:
            raise InvalidArgument(f"version must be >= 1, got {version}")
        await self._authorize(model, is_write=True)
        with redis_errors(_WHAT):
            result = await self._set_alias(
                keys=[keys.model(model), keys.versions(model), keys.aliases(model)], args=[alias, version]
            )
        if result == 0:
            raise NotFound(f"model '{model}' not found")
        if result == -1:
            raise NotFound(f"model '{model}' has no version {version}")
        log.info("alias_set", model=model, alias=alias, version=version)
        await self._publish("alias_set", model, version)
        return alias, version

    async def delete_alias(self, model: str, alias: str) -> None:
        """Remove an alias of ``model``.

        Raises:
            InvalidArgument: The model name or alias is invalid.
            NotFound: No such model or alias.
            Unavailable: Redis cannot be reached.
        """
        check_name(model)
        check_alias(alias)
        await self._authorize(model, is_write=True)
        with redis_errors(_WHAT):
            result = await self._delete_alias(keys=[keys.model(model), keys.aliases(model)], args=[alias])
        if result == 0:
            raise NotFound(f"model '{model}' not found")
        if result == -1:
            raise NotFound(f"model '{model}' has no alias '{shown(alias)}'")
        log.info("alias_deleted", model=model, alias=alias)
        await self._publish("alias_deleted", model)

    async def list_aliases(self, model: str) -> tuple[Alias, ...]:
        """Return a model's aliases by name.

        Raises:
            InvalidArgument: The model name is invalid.
            NotFound: No such model.
            Unavailable: Redis cannot be reached.
        """
        check_name(model)
        await self._authorize(model, is_write=False)
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(keys.model(model))
                pipe.hgetall(keys.aliases(model))
                exists, raw = await pipe.execute()
        if not exists:
            raise NotFound(f"model '{model}' not found")
        return aliases_from_hash(raw)

    # Deployments

    async def replace_deployment(
        self, model: str, build: Callable[[DeploymentRecord | None], Awaitable[DeploymentRecord]]
    ) -> DeploymentRecord:
        """Store ``await build(current deployment)`` unless another change lands first (then build again).

        Raises:
            NotFound: No such model.
            Unavailable: Redis cannot be reached, or the deployment kept changing.
            MaasError: What ``build`` raises.
        """
        for _ in range(_MAX_ATTEMPTS):
            with redis_errors(_WHAT):
                raw = await self._redis.hget(keys.DEPLOYMENTS, model)
            record = await build(None if raw is None else DeploymentRecord.from_json(raw))
            expected = b"" if raw is None else raw
            with redis_errors(_WHAT):
                result = await self._replace(
                    keys=[keys.model(model), keys.DEPLOYMENTS], args=[model, expected, record.to_json()]
                )
            if result == 0:
                raise NotFound(f"model '{model}' not found")
            if result == 1:
                return record
        raise FailedPrecondition(f"the deployment of model '{model}' changed {_MAX_ATTEMPTS} times meanwhile; retry")

    async def rollback(self, model: str) -> DeploymentRecord:
        """Swap a deployment's split with its previous one, keeping its batching and pool.

        Raises:
            InvalidArgument: The model name is invalid.
            NotFound: No such model, or it is not deployed.
            FailedPrecondition: There is no previous split, or one of its versions was deleted.
            Unavailable: Redis cannot be reached.
        """
        check_name(model)
        await self._authorize(model, is_write=True)

        async def build(current: DeploymentRecord | None) -> DeploymentRecord:
            if current is None:
                with redis_errors(_WHAT):
                    exists = await self._redis.exists(keys.model(model))
                raise NotFound(f"model '{model}' is not deployed" if exists else f"model '{model}' not found")
            if not current.previous_traffic:
                raise FailedPrecondition(f"model '{model}' has no previous traffic split to roll back to")
            previous = current.previous_traffic
            await self._require_versions(model, previous)
            return replace(
                current,
                version=primary_version(previous),
                traffic=previous,
                previous_traffic=current.split,
                updated_at_ms=now_ms(),
            )

        record = await self.replace_deployment(model, build)
        log.info("rolled_back", model=model, traffic=_shown_split(record.split))
        await self._publish("rolled_back", model, record.version)
        return record

    async def _require_versions(self, model: str, split: Split) -> None:
        """Check that every version of ``split`` exists (a rollback may name a deleted one).

        Raises:
            FailedPrecondition: One does not.
        """
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=False) as pipe:
                for version, _ in split:
                    pipe.hexists(keys.versions(model), str(version))
                present = await pipe.execute()
        missing = [version for (version, _), exists in zip(split, present, strict=True) if not exists]
        if missing:
            raise FailedPrecondition(
                f"model '{model}' cannot roll back to {_shown_split(split)}: version {missing[0]} no longer exists"
            )
