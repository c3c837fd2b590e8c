"""Version lifecycle: descriptions and labels after upload, deletion of versions, paged listings.

A version that serves traffic (it is in its model's deployment split, whatever its weight) or
that an alias points to cannot be deleted (FAILED_PRECONDITION): move the traffic or the alias
first. A deleted version's number is never reused (``next_version`` only grows), its artifact
and statistics go with it, and ``latest_version`` falls back to the newest version left (0: none).

Read-check-write changes run under WATCH (optimistic transactions): a concurrent change of the
same keys makes them read again, so a deploy or an alias move that lands first is seen.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.common import auth, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.metadata import DeploymentRecord, ModelRecord, VersionRecord, check_name
from services.common.redis_conn import redis_errors
from services.registry import rollout
from services.registry.blobs import BlobStore
from services.registry.labels import check_description, has_labels, updated_labels
from services.registry.pages import Page, PageQuery, take_page

if TYPE_CHECKING:
    from services.registry.store import ModelStore

log = structlog.get_logger(__name__)

Publish = Callable[[str, str, int], Awaitable[None]]
"""Publishes a registry event: ``publish(kind, model, version)``."""

_WHAT = "model store"
_MAX_ATTEMPTS = 20
"""Optimistic transaction attempts before giving up (each one lost to a concurrent writer)."""
_LABEL_SCAN_CHUNK = 100
"""Models whose versions are read per round trip when ListModels filters by label."""


@dataclass(frozen=True)
class VersionUpdate:
    """What UpdateVersion changes."""

    description: str | None = None
    """None: unchanged; "" clears it."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels to add or overwrite."""
    remove_labels: tuple[str, ...] = ()
    """Keys of labels to remove (absent ones are ignored)."""


def _check_number(version: int) -> None:
    if version < 1:
        raise InvalidArgument(f"version must be >= 1, got {version}")


def _version_not_found(model: str, version: int) -> NotFound:
    return NotFound(f"model '{model}' has no version {version}")


def _refuse_in_use(model: str, version: int, deployment: DeploymentRecord | None, aliases: dict[str, int]) -> None:
    """Refuse to delete a version that serves traffic or that an alias points to.

    Raises:
        FailedPrecondition: It does, saying what to change first.
    """
    if deployment is not None and version in {number for number, _ in deployment.split}:
        raise FailedPrecondition(
            f"model '{model}' version {version} serves traffic: deploy another version or undeploy "
            f"`maas undeploy {model}` first"
        )
    pointing = sorted(alias for alias, number in aliases.items() if number == version)
    if pointing:
        names = ", ".join(f"'{alias}'" for alias in pointing)
        raise FailedPrecondition(
            f"model '{model}' version {version} is the target of alias {names}: move or delete it first"
        )


class VersionLifecycle:
    """Update and delete versions, and list models and versions a page at a time.

    Args:
        store: The model store (reads, ownership and pattern checks).
        blobs: Where artifacts are kept.
        publish: Announces a change (``ModelStore``'s events).
    """

    def __init__(self, store: ModelStore, blobs: BlobStore, publish: Publish) -> None:
        self._store = store
        self._blobs = blobs
        self._publish = publish

    @property
    def _redis(self) -> aioredis.Redis:
        return self._store.redis

    async def _writable_model(self, model: str) -> ModelRecord:
        """Return the model if the calling key may change it.

        Raises:
            InvalidArgument: The name is invalid.
            NotFound: No such model (or one the caller may not see).
            PermissionDenied: The caller may only read it.
        """
        check_name(model)
        record = await self._store.get_model(model)
        auth.check_owner(model, record.owner, record.shared_with, is_write=True)
        return record

    # Listings

    async def list_models(self, query: PageQuery) -> Page[ModelRecord]:
        """Return one page of the models the caller may see, by name, filtered by prefix and labels.

        Raises:
            InvalidArgument: The page size, token or label filter is invalid.
            Unavailable: Redis cannot be reached.
        """
        query.check()
        after = query.after("models")
        models = [
            model
            for model in await self._store.list_models()
            if model.name.startswith(query.name_prefix) and (after is None or model.name > after)
        ]
        if query.labels:
            models = await self._labelled(models, query.labels, query.size() + 1)
        return take_page(query, "models", models, lambda model: model.name)

    async def _labelled(self, models: list[ModelRecord], wanted: Mapping[str, str], needed: int) -> list[ModelRecord]:
        """Return the first ``needed`` of ``models`` with a version that carries ``wanted``."""
        found: list[ModelRecord] = []
        for start in range(0, len(models), _LABEL_SCAN_CHUNK):
            chunk = models[start : start + _LABEL_SCAN_CHUNK]
            with redis_errors(_WHAT):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for model in chunk:
                        pipe.hvals(keys.versions(model.name))
                    all_versions: list[list[bytes]] = await pipe.execute()
            for model, raw_versions in zip(chunk, all_versions, strict=True):
                if any(has_labels(VersionRecord.from_json(raw).labels, wanted) for raw in raw_versions):
                    found.append(model)
            if len(found) >= needed:
                break
        return found

    async def list_versions(self, model: str, query: PageQuery) -> Page[VersionRecord]:
        """Return one page of a model's versions, oldest first, filtered by labels.

        Raises:
            InvalidArgument: The name, page size, token or label filter is invalid.
            NotFound: No such model.
            Unavailable: Redis cannot be reached.
        """
        query.check()
        listing = f"versions:{model}"
        after = query.after(listing)
        if after is not None and not after.isdigit():
            raise InvalidArgument("page_token is invalid: it was not made by ListVersions")
        versions = await self._store.list_versions(model)
        matches = (
            version
            for version in versions
            if (after is None or version.version > int(after)) and has_labels(version.labels, query.labels)
        )
        return take_page(query, listing, matches, lambda version: str(version.version))

    # Changes

    async def update_version(self, model: str, version: int, update: VersionUpdate) -> VersionRecord:
        """Change a version's description and labels.

        Raises:
            InvalidArgument: The name, version, description or a label is invalid.
            NotFound: No such model or version.
            PermissionDenied: The caller may only read the model.
            Unavailable: Redis cannot be reached, or the version kept changing under the update.
        """
        _check_number(version)
        if update.description is not None:
            check_description(update.description)
        await self._writable_model(model)
        for _attempt in range(_MAX_ATTEMPTS):
            with redis_errors(_WHAT):
                record = await self._try_update(model, version, update)
            if record is not None:
                log.info("version_updated", model=model, version=version)
                await self._publish("version_updated", model, version)
                return record
        raise Unavailable(f"model '{model}' version {version} kept changing; try again")

    async def _try_update(self, model: str, version: int, update: VersionUpdate) -> VersionRecord | None:
        """One optimistic attempt; None when a concurrent write got in first."""
        key = keys.versions(model)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.hget(key, str(version))
            if raw is None:
                raise _version_not_found(model, version)
            current = VersionRecord.from_json(raw)
            labels = updated_labels(current.labels, update.labels, update.remove_labels)
            description = current.description if update.description is None else update.description
            record = replace(current, description=description, labels=labels)
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            pipe.hset(key, str(version), record.to_json())
            try:
                await pipe.execute()
            except redis.exceptions.WatchError:
                return None
        return record

    async def delete_version(self, model: str, version: int) -> None:
        """Delete a version, its artifact and its statistics.

        Raises:
            InvalidArgument: The name or version is invalid.
            NotFound: No such model or version.
            FailedPrecondition: The version serves traffic, or an alias points to it.
            PermissionDenied: The caller may only read the model.
            Unavailable: Redis cannot be reached, or the model kept changing under the deletion.
        """
        _check_number(version)
        await self._writable_model(model)
        for _attempt in range(_MAX_ATTEMPTS):
            with redis_errors(_WHAT):
                is_deleted = await self._try_delete(model, version)
            if is_deleted:
                await self._blobs.delete_version(model, version)
                log.info("version_deleted", model=model, version=version)
                await self._publish("version_deleted", model, version)
                return
        raise Unavailable(f"model '{model}' kept changing while version {version} was deleted; try again")

    async def _try_delete(self, model: str, version: int) -> bool:
        """One optimistic attempt; False when a concurrent write got in first."""
        model_key, versions_key, aliases_key = keys.model(model), keys.versions(model), keys.aliases(model)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(model_key, versions_key, aliases_key, keys.DEPLOYMENTS)
            if not await pipe.exists(model_key):
                raise auth.model_not_found(model)
            numbers = [int(raw) for raw in await pipe.hkeys(versions_key)]
            if version not in numbers:
                raise _version_not_found(model, version)
            raw_deployment = await pipe.hget(keys.DEPLOYMENTS, model)
            raw_aliases: dict[Any, Any] = await pipe.hgetall(aliases_key)
            deployment = None if raw_deployment is None else DeploymentRecord.from_json(raw_deployment)
            aliases = {alias: version for alias, version in rollout.aliases_from_hash(raw_aliases)}
            _refuse_in_use(model, version, deployment, aliases)
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            pipe.hdel(versions_key, str(version))
            pipe.hset(model_key, "latest_version", _newest(number for number in numbers if number != version))
            try:
                await pipe.execute()
            except redis.exceptions.WatchError:
                return False
        # NOTE: outside the MULTI: the version's statistics are in its own Redis Cluster slot.
        await self._redis.delete(keys.stats(model, version))
        return True


def _newest(numbers: Iterable[int]) -> int:
    return max(numbers, default=0)
