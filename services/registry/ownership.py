"""Model ownership and sharing between tenants, as stored in the model hash.

A model belongs to the tenant whose key created it (field ``owner`` of ``keys.model(name)``;
empty: nobody, so every tenant sees it: models of the built-in ``system`` tenant, of a registry
without keys, and those created before models had owners). Each tenant it is shared with is a
field ``share:<tenant>``, so sharing and unsharing are one atomic HSET or HDEL each, and
deleting the model deletes its shares with it. Who may see or change what is decided in one
place, ``services.common.auth.check_owner``; this module reads and writes the fields.
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis
import structlog

from services.common import auth, keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.metadata import ModelRecord, check_name
from services.common.redis_conn import redis_errors

log = structlog.get_logger(__name__)

OWNER_FIELD = "owner"
"""Field of the model hash that names the owner tenant."""
SHARE_PREFIX = "share:"
"""Prefix of the model hash's fields that name a tenant the model is shared with."""

_WHAT = "model store"
_SHARE_LUA = """
-- KEYS[1]: model hash; ARGV[1]: the share field, ARGV[2]: '1' to share, '0' to unshare.
-- Returns -1 when the model is gone (HSET would recreate its hash), else HSET's or HDEL's count.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[2] == '1' then return redis.call('HSET', KEYS[1], ARGV[1], '1') end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


def owner_of(fields: dict[bytes, bytes]) -> tuple[str, tuple[str, ...]]:
    """Return the owner tenant and the tenants shared with (by name) of a model hash's fields."""
    prefix = SHARE_PREFIX.encode()
    shared = sorted(field[len(prefix) :].decode() for field in fields if field.startswith(prefix))
    return fields.get(OWNER_FIELD.encode(), b"").decode(), tuple(shared)


class ModelSharing:
    """Reads a model's owner for the access check, and shares it with tenants or stops sharing it.

    Args:
        redis: Client of the registry's metadata.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._share = redis.register_script(_SHARE_LUA)

    async def check(self, name: str, *, is_write: bool = False) -> None:
        """Refuse a model the calling key may not see (or change); no Redis read for keys that see all.

        Raises:
            NotFound: No such model, or the key's tenant may not see it (one message for both).
            PermissionDenied: ``is_write`` and the tenant only has the model shared.
            Unavailable: Redis cannot be reached.
        """
        if not auth.is_restricted():
            return
        with redis_errors(_WHAT):
            fields = cast(dict[bytes, bytes], await self._redis.hgetall(keys.model(name)))
        if not fields:
            raise auth.model_not_found(name)
        owner, shared_with = owner_of(fields)
        auth.check_owner(name, owner, shared_with, is_write=is_write)

    async def change(self, model: ModelRecord, tenant: str, *, is_shared: bool) -> None:
        """Share ``model`` (a record the caller may see) with ``tenant``, or stop sharing it.

        Raises:
            InvalidArgument: The tenant name is invalid, or it is the owner.
            PermissionDenied: The caller's tenant only has the model shared.
            FailedPrecondition: The model has no owner: every tenant sees it.
            NotFound: No such tenant (sharing), the model is not shared with it (unsharing), or
                the model was deleted meanwhile.
            Unavailable: Redis cannot be reached.
        """
        check_name(tenant, "tenant name")
        auth.check_owner(model.name, model.owner, model.shared_with, is_write=True)
        if not model.owner:
            raise FailedPrecondition(f"model '{model.name}' has no owner tenant: every tenant sees it already")
        if tenant == model.owner:
            raise InvalidArgument(f"tenant '{tenant}' owns model '{model.name}': share it with another tenant")
        if is_shared:
            await self._require_tenant(tenant)
        elif tenant not in model.shared_with:
            raise NotFound(f"model '{model.name}' is not shared with tenant '{tenant}'")
        with redis_errors(_WHAT):
            changed = await self._share(keys=[keys.model(model.name)], args=[SHARE_PREFIX + tenant, int(is_shared)])
        if changed == -1:
            raise auth.model_not_found(model.name)
        log.info("model_shared" if is_shared else "model_unshared", model=model.name, tenant=tenant)

    async def _require_tenant(self, name: str) -> None:
        with redis_errors(_WHAT):
            is_known = await self._redis.hexists(keys.TENANTS, name)
        if not is_known:
            raise NotFound(f"tenant '{name}' not found")
