"""Tenants and API keys: the registry owns them, every server verifies keys (``services.common.auth``).

Redis layout (names from ``services.common.keys``):

- ``keys.TENANTS``: hash, tenant name -> ``TenantRecord`` JSON.
- ``keys.API_KEYS``: hash, key id -> ``ApiKeyRecord`` JSON (the secret only as its HMAC).

A key's secret exists in clear only in the reply that creates it. Revoking publishes an
``api_key_revoked`` event, on which every process forgets the keys it verified.

A tenant administrator (an ``admin`` key of a tenant other than ``system``) sees and manages only
its own tenant (``auth.administered_tenant``): its tenant in the lists, its keys; another
tenant's key answers as an unknown one. Creating tenants and setting quotas are for the global
administrator only (``auth.Rule.is_global``), so a tenant cannot raise its own quota.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

import redis.asyncio as aioredis
import structlog

from services.common import auth, events, keys
from services.common.auth import (
    QUOTA_EVENT,
    READ,
    SCOPES,
    SYSTEM_TENANT,
    WRITE,
    ApiKeyRecord,
    TenantQuota,
    TenantRecord,
    new_token,
    now_ms,
    parse_token,
    secret_hmac,
)
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.metadata import check_name, shown
from services.common.redis_conn import redis_errors
from services.common.usage import TenantUsage

log = structlog.get_logger(__name__)

SYSTEM_KEYS: dict[str, tuple[str, ...]] = {"admin": SCOPES, "gateway": (READ, WRITE), "worker": (READ,)}
"""Scopes of the built-in keys, by name: the first administrator, and the services' credentials
towards the registry (the gateway deploys for RepositoryModelLoad; workers only read)."""

_WHAT = "identity store"
_Record = TypeVar("_Record", TenantRecord, ApiKeyRecord)
_PATTERN_RE = re.compile(r"[A-Za-z0-9._\-*?\[\]!]{1,128}")
_MAX_PATTERNS = 64
_MAX_LIMIT = 1_000_000
"""Largest value of each quota limit."""


@dataclass(frozen=True)
class NewApiKey:
    """What a new API key may do."""

    tenant: str
    name: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] = ()
    """Empty: every model."""
    expires_at_ms: int = 0
    """0: never."""


def _checked_scopes(scopes: tuple[str, ...]) -> tuple[str, ...]:
    if not scopes:
        raise InvalidArgument(f"scopes: give at least one of {', '.join(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise InvalidArgument(f"scope '{shown(scope)}' is unknown: expected one of {', '.join(SCOPES)}")
    return tuple(scope for scope in SCOPES if scope in scopes)


def _checked_models(models: tuple[str, ...]) -> tuple[str, ...]:
    if len(models) > _MAX_PATTERNS:
        raise InvalidArgument(f"models: {len(models)} patterns, at most {_MAX_PATTERNS} are allowed")
    for pattern in models:
        if not _PATTERN_RE.fullmatch(pattern):
            raise InvalidArgument(
                f"model pattern '{shown(pattern)}' is invalid: expected 1-128 letters, digits, "
                "'.', '_', '-' and the glob characters '*', '?', '[', ']', '!'"
            )
    return tuple(dict.fromkeys(models)) or ("*",)


def _check_quota(quota: TenantQuota) -> None:
    limits = {"rps": quota.rps, "burst": quota.burst, "max_in_flight": quota.max_in_flight}
    for field_name, value in limits.items():
        if not 0 <= value <= _MAX_LIMIT:  # NaN fails too
            raise InvalidArgument(f"quota {field_name} must be between 0 (off) and {_MAX_LIMIT}, got {value:g}")
    if quota.rps > 0 and quota.burst < 1:
        raise InvalidArgument(f"quota burst must be >= 1 with rps {quota.rps:g} (e.g. {math.ceil(quota.rps)})")
    if quota.rps == 0 and quota.burst:
        raise InvalidArgument("quota burst needs rps: a token bucket without a refill rate is not supported")


class IdentityStore:
    """Tenants and API keys in Redis.

    Args:
        redis: Client for the records and events.
        auth_secret: The server secret keys are hashed with; None when this registry runs without
            one (then keys can be neither created nor verified).
    """

    def __init__(self, redis: aioredis.Redis, auth_secret: str | None) -> None:
        self._redis = redis
        self._secret = auth_secret

    def _require_secret(self) -> str:
        if not self._secret:
            raise FailedPrecondition("API keys need a server secret: start the registry with MAAS_AUTH_SECRET")
        return self._secret

    async def create_tenant(self, name: str, description: str = "") -> TenantRecord:
        """Create a tenant.

        Raises:
            InvalidArgument: The name is invalid.
            AlreadyExists: The name is taken.
            Unavailable: Redis cannot be reached.
        """
        check_name(name, "tenant name")
        record = TenantRecord(name=name, description=description, created_at_ms=now_ms())
        with redis_errors(_WHAT):
            is_created = await self._redis.hsetnx(keys.TENANTS, name, record.to_json())
        if not is_created:
            raise AlreadyExists(f"tenant '{name}' already exists")
        log.info("tenant_created", tenant=name)
        return record

    async def list_tenants(self) -> list[TenantRecord]:
        """Return every tenant, ordered by name (a tenant administrator's own only).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        own = auth.administered_tenant()
        with redis_errors(_WHAT):
            raw = await self._redis.hvals(keys.TENANTS)
        tenants = (TenantRecord.from_json(value) for value in raw)
        return sorted((t for t in tenants if own is None or t.name == own), key=lambda t: t.name)

    async def tenant_report(self) -> list[tuple[TenantRecord, TenantUsage]]:
        """Return the tenants ``list_tenants`` lists, with their cluster-wide usage (one more round trip).

        Raises:
            Unavailable: Redis cannot be reached.
        """
        tenants = await self.list_tenants()
        with redis_errors(_WHAT):
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    pipe.hgetall(keys.usage(tenant.name))
                hashes: list[dict[bytes, bytes]] = await pipe.execute()
        return [(tenant, TenantUsage.parse(raw)) for tenant, raw in zip(tenants, hashes, strict=True)]

    async def set_tenant_quota(self, name: str, quota: TenantQuota) -> TenantRecord:
        """Set a tenant's quota; every gateway applies it on the ``tenant_quota_set`` event.

        Raises:
            InvalidArgument: The name is invalid, a limit is negative or too large, a rate limit
                has no burst, or a burst no rate limit.
            NotFound: No such tenant.
            Unavailable: Redis cannot be reached.
        """
        check_name(name, "tenant name")
        _check_quota(quota)
        record = await self._rewrite(
            keys.TENANTS, name, lambda raw: replace(TenantRecord.from_json(raw), quota=quota),
            missing=f"tenant '{name}' not found", event=QUOTA_EVENT,
        )  # fmt: skip
        log.info("tenant_quota_set", tenant=name, rps=quota.rps, burst=quota.burst, max_in_flight=quota.max_in_flight)
        return record

    async def create_api_key(self, spec: NewApiKey) -> tuple[ApiKeyRecord, str]:
        """Create an API key; return its record and the key itself (never stored in clear).

        Raises:
            InvalidArgument: A name, scope, pattern or the expiry is invalid.
            PermissionDenied: A tenant administrator names another tenant, or grants a scope, a
                model pattern or a lifetime its own key lacks.
            NotFound: No such tenant.
            FailedPrecondition: The registry has no server secret.
            Unavailable: Redis cannot be reached.
        """
        secret_key = self._require_secret()
        check_name(spec.tenant, "tenant name")
        check_name(spec.name, "key name")
        auth.check_administers(spec.tenant)
        scopes, models = _checked_scopes(spec.scopes), _checked_models(spec.models)
        created_at_ms = now_ms()
        if spec.expires_at_ms < 0 or 0 < spec.expires_at_ms <= created_at_ms:
            raise InvalidArgument(f"expires_at_ms must be 0 (never) or in the future, got {spec.expires_at_ms}")
        auth.check_grantable(scopes, models, spec.expires_at_ms)
        await self._require_tenant(spec.tenant)
        key_id, secret, token = new_token()
        record = ApiKeyRecord(
            id=key_id, tenant=spec.tenant, name=spec.name, scopes=scopes, models=models,
            secret_hmac=secret_hmac(secret_key, secret), created_at_ms=created_at_ms,
            expires_at_ms=spec.expires_at_ms,
        )  # fmt: skip
        with redis_errors(_WHAT):
            await self._redis.hsetnx(keys.API_KEYS, key_id, record.to_json())
        log.info("api_key_created", key_id=key_id, tenant=spec.tenant, key=spec.name, scopes=list(scopes))
        return record, token

    async def list_api_keys(self, tenant: str = "") -> list[ApiKeyRecord]:
        """Return the API keys of ``tenant`` (every tenant if empty), by tenant, name and id.

        A tenant administrator's list is of its own tenant (empty ``tenant``: its own).

        Raises:
            InvalidArgument: The tenant name is invalid.
            PermissionDenied: A tenant administrator names another tenant.
            Unavailable: Redis cannot be reached.
        """
        if tenant:
            check_name(tenant, "tenant name")
            auth.check_administers(tenant)
        tenant = tenant or auth.administered_tenant() or ""
        with redis_errors(_WHAT):
            raw = await self._redis.hvals(keys.API_KEYS)
        records = (ApiKeyRecord.from_json(value) for value in raw)
        return sorted((r for r in records if not tenant or r.tenant == tenant), key=lambda r: (r.tenant, r.name, r.id))

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord:
        """Revoke an API key; every process forgets it on the ``api_key_revoked`` event.

        Raises:
            NotFound: No key has this id, or (for a tenant administrator) a key of another tenant
                has it: one message for both.
            Unavailable: Redis cannot be reached.
        """
        missing = f"API key '{shown(key_id)}' not found"
        own = auth.administered_tenant()

        def revoked(raw: bytes | str) -> ApiKeyRecord:
            record = ApiKeyRecord.from_json(raw)
            if own is not None and record.tenant != own:
                raise NotFound(missing)
            return replace(record, revoked=True)

        record = await self._rewrite(keys.API_KEYS, key_id, revoked, missing=missing, event="api_key_revoked")
        log.info("api_key_revoked", key_id=key_id, tenant=record.tenant, key=record.name)
        return record

    async def _rewrite(
        self, hash_key: str, field: str, change: Callable[[bytes | str], _Record], *, missing: str, event: str
    ) -> _Record:
        """Replace one record of ``hash_key`` with ``change(stored JSON)`` and publish ``event``.

        Raises:
            NotFound: No record ``field`` (``missing`` is the message).
            Unavailable: Redis cannot be reached.
        """
        with redis_errors(_WHAT):
            raw = await self._redis.hget(hash_key, field)
            if raw is None:
                raise NotFound(missing)
            record = change(raw)
            await self._redis.hset(hash_key, field, record.to_json())
            await events.publish(self._redis, event, "")
        return record

    async def ensure_system_keys(self, tokens: Mapping[str, str]) -> None:
        """Create the ``system`` tenant and its built-in keys (``SYSTEM_KEYS``) unless they exist.

        A key that exists is left as it is, so one an administrator revoked stays revoked.

        Args:
            tokens: The key of each built-in name (``maas up`` generates them; deploy/ keeps them
                in a Secret).

        Raises:
            InvalidArgument: A name is not built in, or a token is not shaped like a MaaS key.
            Unavailable: Redis cannot be reached.
        """
        secret_key = self._require_secret()
        tenant = TenantRecord(SYSTEM_TENANT, "built-in: the administrator's and the services' keys", now_ms())
        records = {}
        for name, token in tokens.items():
            parsed = parse_token(token)
            if name not in SYSTEM_KEYS or parsed is None:
                raise InvalidArgument(f"system key '{shown(name)}': expected one of {sorted(SYSTEM_KEYS)} with a key")
            key_id, secret = parsed
            records[key_id] = ApiKeyRecord(
                id=key_id, tenant=SYSTEM_TENANT, name=name, scopes=SYSTEM_KEYS[name],
                secret_hmac=secret_hmac(secret_key, secret), created_at_ms=tenant.created_at_ms,
            ).to_json()  # fmt: skip
        with redis_errors(_WHAT):
            await self._redis.hsetnx(keys.TENANTS, SYSTEM_TENANT, tenant.to_json())
            for key_id, raw in records.items():
                await self._redis.hsetnx(keys.API_KEYS, key_id, raw)

    async def _require_tenant(self, name: str) -> None:
        with redis_errors(_WHAT):
            is_known = await self._redis.hexists(keys.TENANTS, name)
        if not is_known:
            raise NotFound(f"tenant '{name}' not found")


def system_tokens() -> dict[str, str]:
    """Return a fresh key for each built-in name (``SYSTEM_KEYS``)."""
    return {name: new_token()[2] for name in SYSTEM_KEYS}
