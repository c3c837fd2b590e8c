"""API keys: their records, verification (cached, invalidated by events) and the check on every RPC.

A key is ``maas_<key id>_<secret>``: the id (64 random bits, hex) finds the record in Redis
(``keys.API_KEYS``), the secret (192 random bits) is compared as an HMAC-SHA256 keyed with the
server secret (``MAAS_AUTH_SECRET``), so a copy of Redis holds no usable key. The registry
creates and revokes keys (``services.registry.identities``); every server verifies them here.

``AuthInterceptor`` runs inside the ``ErrorInterceptor``'s scope, so what it raises maps to a
status: no key, or an unknown, revoked or expired one, is ``Unauthenticated`` with one message
whatever the reason; a valid key without the RPC's scope, or whose model patterns do not match
the model a request names, is ``PermissionDenied`` naming the scope or the patterns. The model
check looks at the name only, so a model the key may not use answers the same whether it exists
or not. The caller's identity is in a contextvar (``current_identity``) for the code that
filters lists. Health and (unless closed by a setting) reflection stay open.

Administration is per tenant: a key with the ``admin`` scope administers its own tenant (its
keys, its usage), and only an ``admin`` key of the built-in ``system`` tenant (``maas up``'s
bootstrap key) administers the whole service: every tenant and model, tenants and quotas (rules
with ``is_global``), and sees the whole cluster status (a tenant administrator sees its tenant's
models there). ``administered_tenant`` and ``check_administers``
tell the identity store which tenant a caller may administer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import grpc
import redis.asyncio as aioredis
import structlog
from pydantic import SecretStr

from services.common import events, keys
from services.common.errors import MaasError, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from services.common.interceptors import WrappingInterceptor
from services.common.metadata import ModelRecord, shown
from services.common.redis_conn import redis_errors
from services.common.settings import ServiceSettings
from services.common.tasks import finish_tasks

log = structlog.get_logger(__name__)

INFER, READ, WRITE, ADMIN = "infer", "read", "write", "admin"
SCOPES = (INFER, READ, WRITE, ADMIN)
"""``infer``: inference; ``read``: metadata, lists, status; ``write``: push, deploy, delete, share;
``admin``: the keys of its tenant (every tenant, tenants and quotas for the ``system`` tenant's keys)."""
TOKEN_PREFIX = "maas_"
MIN_SECRET_CHARS = 32
"""Shortest server secret accepted (``auth_secret``)."""
SYSTEM_TENANT = "system"
"""The built-in tenant of the administrator's and the services' keys: it sees every model, the
models its keys create have no owner (every tenant sees them), and its ``admin`` keys are the
global administrators."""
IDENTITY_EVENTS = frozenset({"api_key_revoked"})
"""Registry events after which every process forgets the keys it verified."""

_T = TypeVar("_T")
_UNAUTHENTICATED = "missing or invalid API key: send 'authorization: Bearer <key>' (or 'x-api-key: <key>')"
_MAX_CACHED = 10_000
_MAX_PEERS = 10_000


def secret_hmac(auth_secret: str, secret: str) -> str:
    """Return the hex HMAC-SHA256 of a key's ``secret``, keyed with the server's ``auth_secret``."""
    return hmac.new(auth_secret.encode(), secret.encode(), hashlib.sha256).hexdigest()


def new_token() -> tuple[str, str, str]:
    """Return a fresh ``(key id, secret, token)``: 64 random bits of id, 192 of secret."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
    return key_id, secret, f"{TOKEN_PREFIX}{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """Split a token into ``(key id, secret)``; None if it is not shaped like a MaaS key."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    key_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not sep or len(key_id) != 16 or not secret or not all(c in "0123456789abcdef" for c in key_id):
        return None
    return key_id, secret


def now_ms() -> int:
    """Return the wall-clock time in milliseconds (expiry times are wall-clock)."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored: never its secret, only the secret's HMAC."""

    id: str
    tenant: str
    name: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] = ("*",)
    """Model-name glob patterns (``fnmatch.fnmatchcase``) the key may use."""
    secret_hmac: str = field(default="", repr=False)
    created_at_ms: int = 0
    expires_at_ms: int = 0
    """0: never."""
    revoked: bool = False

    def is_expired(self, at_ms: int) -> bool:
        """Whether the key has expired at ``at_ms``."""
        return self.expires_at_ms != 0 and at_ms >= self.expires_at_ms

    def to_json(self) -> str:
        """Serialize for storage."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ApiKeyRecord:
        """Deserialize what ``to_json`` wrote."""
        data: dict[str, Any] = json.loads(raw)
        data["scopes"] = tuple(data["scopes"])
        data["models"] = tuple(data["models"])
        return cls(**data)


QUOTA_EVENT = "tenant_quota_set"
"""Registry event after which every gateway forgets the tenant quotas it read."""


@dataclass(frozen=True)
class TenantQuota:
    """A tenant's limits at the gateways (``services.gateway.quotas``); 0 turns a limit off."""

    rps: float = 0.0
    """Calls admitted per second (token bucket refill rate)."""
    burst: int = 0
    """Calls admitted at once after a quiet spell (token bucket size)."""
    max_in_flight: int = 0
    """Calls admitted and not yet answered, across every gateway."""

    @property
    def is_limited(self) -> bool:
        """Whether any limit is on."""
        return self.rps > 0 or self.max_in_flight > 0


@dataclass(frozen=True)
class TenantRecord:
    """A group of API keys (a team, a customer)."""

    name: str
    description: str = ""
    created_at_ms: int = 0
    quota: TenantQuota = TenantQuota()

    def to_json(self) -> str:
        """Serialize for storage."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> TenantRecord:
        """Deserialize what ``to_json`` wrote."""
        data: dict[str, Any] = json.loads(raw)
        data["quota"] = TenantQuota(**data.get("quota", {}))
        return cls(**data)


@dataclass(frozen=True)
class Identity:
    """Who is calling: a verified key's tenant, name, scopes and model patterns."""

    key_id: str
    key_name: str
    tenant: str
    scopes: frozenset[str]
    models: tuple[str, ...]
    expires_at_ms: int = 0
    """0: never."""

    @classmethod
    def of(cls, record: ApiKeyRecord) -> Identity:
        """Return the identity a key record grants."""
        return cls(record.id, record.name, record.tenant, frozenset(record.scopes), record.models, record.expires_at_ms)

    @property
    def is_admin(self) -> bool:
        """Whether the key administers the whole service: the ``admin`` scope on a ``system`` tenant key.

        An ``admin`` key of another tenant administers that tenant only (``check_administers``).
        """
        return ADMIN in self.scopes and self.tenant == SYSTEM_TENANT

    def may_use(self, model: str) -> bool:
        """Whether one of the key's model patterns matches ``model``."""
        return any(fnmatchcase(model, pattern) for pattern in self.models)


_identity: ContextVar[Identity | None] = ContextVar("maas_identity", default=None)


def current_identity() -> Identity | None:
    """Return the calling key's identity; None when the server checks no keys (auth off)."""
    return _identity.get()


def check_model(model: str, identity: Identity | None = None) -> None:
    """Refuse a model the calling key's patterns do not match (judged by the name alone).

    An empty name passes: it means "every model" (filtered with ``visible``) or is refused by
    the RPC's own validation.

    Raises:
        PermissionDenied: The key's patterns do not match ``model``.
    """
    identity = identity or _identity.get()
    if identity is None or not model or identity.may_use(model):
        return
    patterns = ", ".join(f"'{pattern}'" for pattern in identity.models)
    raise PermissionDenied(
        f"API key '{identity.key_name}' may not use model '{shown(model)}': its model patterns are {patterns}"
    )


def visible(items: Iterable[_T], name: Callable[[_T], str]) -> list[_T]:
    """Return the items whose model ``name`` the calling key may use (all when auth is off)."""
    identity = _identity.get()
    if identity is None:
        return list(items)
    return [item for item in items if identity.may_use(name(item))]


def model_not_found(name: str) -> NotFound:
    """Return the one error for a model that does not exist or that the calling key may not see."""
    return NotFound(f"model '{name}' not found")


def _sees_every_model(identity: Identity | None) -> bool:
    """Auth off, or a ``system`` key (the global administrator's, the gateway's and the workers')."""
    return identity is None or identity.tenant == SYSTEM_TENANT


def administered_tenant() -> str | None:
    """Return the one tenant the calling key administers; None when it administers every tenant.

    None: auth off or a ``system`` tenant key (the global administrator); otherwise the key's tenant.
    """
    identity = _identity.get()
    return None if _sees_every_model(identity) or identity is None else identity.tenant


def check_administers(tenant: str) -> None:
    """Refuse to administer ``tenant`` for a tenant administrator of another tenant.

    Raises:
        PermissionDenied: The calling key administers another tenant only; the message names both.
    """
    own = administered_tenant()
    if own is not None and tenant != own:
        identity = _identity.get()
        assert identity is not None
        raise PermissionDenied(
            f"API key '{identity.key_name}' administers tenant '{own}' only, not tenant '{shown(tenant)}'"
        )


def check_grantable(scopes: Sequence[str], models: Sequence[str], expires_at_ms: int = 0) -> None:
    """Refuse a new key that could do more than the calling tenant administrator's own key.

    A tenant administrator grants only scopes it has, and, unless its key may use every model
    (``*``), only model patterns its key has; a key of its that expires makes only keys that
    expire no later (``expires_at_ms``, 0: never); the global administrator grants anything.

    Raises:
        PermissionDenied: A scope, a model pattern or a lifetime the calling key lacks; the
            message names it.
    """
    identity = _identity.get()
    if administered_tenant() is None or identity is None:
        return
    if identity.expires_at_ms and not 0 < expires_at_ms <= identity.expires_at_ms:
        raise PermissionDenied(
            f"API key '{identity.key_name}' may not grant a key that outlives it: set expires_at_ms to at most "
            f"{identity.expires_at_ms} (its own expiry), got {expires_at_ms or 'never'}"
        )
    for scope in scopes:
        if scope not in identity.scopes:
            raise PermissionDenied(f"API key '{identity.key_name}' may not grant scope '{shown(scope)}': it lacks it")
    if "*" in identity.models:
        return
    for pattern in models or ("*",):
        if pattern not in identity.models:
            raise PermissionDenied(
                f"API key '{identity.key_name}' may not grant model pattern '{shown(pattern)}': "
                f"it may grant only its own patterns {', '.join(repr(p) for p in identity.models)}"
            )


def new_model_owner() -> str:
    """Return the owner of a model the calling key creates: its tenant ("" for ``system`` or auth off)."""
    identity = _identity.get()
    return "" if identity is None or identity.tenant == SYSTEM_TENANT else identity.tenant


def is_restricted() -> bool:
    """Whether the calling key sees only some models by owner (not an admin, ``system`` or auth off)."""
    return not _sees_every_model(_identity.get())


def _is_owner(identity: Identity | None, owner: str) -> bool:
    """Whether ``identity`` may do anything its scopes allow with a model of ``owner``."""
    return not owner or _sees_every_model(identity) or (identity is not None and identity.tenant == owner)


def check_owner(name: str, owner: str, shared_with: Sequence[str], *, is_write: bool = False) -> None:
    """Refuse a model the calling key's tenant may not see (or, with ``is_write``, change).

    A model is seen by its owner tenant, the tenants it is shared with (read and infer only) and
    the ``system`` tenant (global admins included); a model without an owner by every key.

    Raises:
        NotFound: The tenant may not see it: the same error as for a missing model.
        PermissionDenied: ``is_write``, and the tenant only has it shared.
    """
    identity = _identity.get()
    if identity is None or _is_owner(identity, owner):
        return
    if identity.tenant not in shared_with:
        raise model_not_found(name)
    if is_write:
        raise PermissionDenied(
            f"model '{name}' is shared with tenant '{identity.tenant}' to read and infer only; "
            f"only its owner tenant '{owner}' or a global admin may change it"
        )


def may_see(record: ModelRecord) -> bool:
    """Whether the calling key may see ``record``: its patterns match it and ``check_owner`` allows it."""
    identity = _identity.get()
    if identity is None:
        return True
    is_shared = identity.tenant in record.shared_with
    return identity.may_use(record.name) and (is_shared or _is_owner(identity, record.owner))


def visible_models(records: Iterable[ModelRecord]) -> list[ModelRecord]:
    """Return the models the calling key may see (``may_see``), in order."""
    return [record for record in records if may_see(record)]


class KeyVerifier:
    """Verifies tokens against the key records in Redis, caching each verified key briefly.

    Revocations reach the cache through the registry's events stream (``start`` follows it), so
    a revoked key stops working within about a second; the TTL bounds staleness if an event is
    missed, and the cache is dropped whenever following the stream fails.

    Args:
        redis: Client whose socket timeout exceeds one second (events are read with XREAD BLOCK).
        auth_secret: The server secret the keys' HMACs are keyed with.
        cache_ttl_s: How long a verified key is trusted without reading its record again.
    """

    def __init__(self, redis: aioredis.Redis, auth_secret: str, *, cache_ttl_s: float = 5.0) -> None:
        self._redis = redis
        self._secret = auth_secret
        self._ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, str, Identity]] = {}
        self._generation = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start following registry events (revocations)."""
        self._task = asyncio.create_task(self._follow_events(), name="auth-events")

    async def stop(self) -> None:
        """Stop following events."""
        if self._task is not None:
            await finish_tasks([self._task], 0)

    def invalidate(self) -> None:
        """Forget every verified key (a verification in flight is not cached either)."""
        self._generation += 1
        self._cache.clear()

    async def _follow_events(self) -> None:
        await events.invalidate_on(self._redis, IDENTITY_EVENTS, self.invalidate, cache="api_keys")

    async def verify(self, token: str | None) -> Identity:
        """Return the identity of a valid token.

        Raises:
            Unauthenticated: No token, or an unknown, revoked or expired one (one message for all).
            Unavailable: Redis cannot be reached.
        """
        parsed = parse_token(token) if token else None
        if parsed is None:
            raise Unauthenticated(_UNAUTHENTICATED)
        key_id, secret = parsed
        digest = secret_hmac(self._secret, secret)
        now = asyncio.get_running_loop().time()
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now and hmac.compare_digest(cached[1], digest):
            return cached[2]
        generation = self._generation
        with redis_errors("identity store"):
            raw = await self._redis.hget(keys.API_KEYS, key_id)
        record = ApiKeyRecord.from_json(raw) if raw is not None else None
        at_ms = now_ms()
        if record is None or record.revoked or record.is_expired(at_ms):
            raise Unauthenticated(_UNAUTHENTICATED)
        if not hmac.compare_digest(record.secret_hmac, digest):
            raise Unauthenticated(_UNAUTHENTICATED)
        identity = Identity.of(record)
        if generation == self._generation:
            ttl_s = self._ttl_s if not record.expires_at_ms else min(self._ttl_s, (record.expires_at_ms - at_ms) / 1000)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[key_id] = (now + ttl_s, digest, identity)
        return identity


class FailureLimiter:
    """A token bucket of failed authentications per peer address (in memory, per process).

    Args:
        burst: Failures a peer may make at once.
        per_s: Failures a peer earns back each second.
    """

    def __init__(self, burst: int, per_s: float) -> None:
        self._burst = burst
        self._per_s = per_s
        self._buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, peer: str, now: float) -> float:
        tokens, at = self._buckets.get(peer, (float(self._burst), now))
        return min(float(self._burst), tokens + (now - at) * self._per_s)

    def retry_after_s(self, peer: str) -> float:
        """Return how long ``peer`` must wait before trying again (0: it may try now)."""
        now = time.monotonic()
        tokens = self._tokens(peer, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._per_s

    def failed(self, peer: str) -> None:
        """Count a failed authentication of ``peer``."""
        now = time.monotonic()
        if len(self._buckets) >= _MAX_PEERS:
            self._buckets = {p: b for p, b in self._buckets.items() if self._tokens(p, now) < self._burst}
        self._buckets[peer] = (self._tokens(peer, now) - 1.0, now)


@dataclass(frozen=True)
class Rule:
    """What one RPC needs: one of ``scopes`` (none: any valid key) and the model its request names."""

    scopes: tuple[str, ...]
    model_field: str | None = None
    """Dotted path of the request field naming the model (e.g. ``header.model``); each message of
    a request stream is checked when the field is set on it."""
    checked_by_handler: bool = False
    """The handler checks the model of each request itself (``check_model``), so that a refused
    request of a stream is that request's answer, not the stream's end."""
    is_global: bool = False
    """Only the ``system`` tenant's keys may call it (global administration: tenants, quotas);
    a tenant administrator gets PERMISSION_DENIED."""

    def refusal(self, identity: Identity, rpc: str) -> str | None:
        """Return why ``identity`` may not call ``rpc`` (a message naming what it lacks); None if it may."""
        if self.scopes and identity.scopes.isdisjoint(self.scopes):
            needed = " or ".join(f"'{scope}'" for scope in self.scopes)
            return f"API key '{identity.key_name}' lacks scope {needed}, which {rpc} needs"
        if self.is_global and identity.tenant != SYSTEM_TENANT:
            return (
                f"API key '{identity.key_name}' administers tenant '{identity.tenant}' only; {rpc} needs "
                f"an admin key of the '{SYSTEM_TENANT}' tenant"
            )
        return None

    @property
    def is_audited(self) -> bool:
        """Whether calls are written to the audit log (writes and administration)."""
        return WRITE in self.scopes or ADMIN in self.scopes


_ANY_KEY = Rule(())
_INFERENCE = "/inference.GRPCInferenceService/"
_REGISTRY = "/maas.registry.v1.ModelRegistry/"

INFERENCE_RULES: dict[str, Rule] = {
    f"{_INFERENCE}{method}": rule
    for method, rule in {
        "ServerLive": _ANY_KEY,
        "ServerReady": _ANY_KEY,
        "ServerMetadata": _ANY_KEY,
        "ModelReady": Rule((INFER, READ), "name"),
        "ModelMetadata": Rule((INFER, READ), "name"),
        "ModelConfig": Rule((INFER, READ), "name"),
        "ModelStatistics": Rule((READ,), "name"),
        "RepositoryIndex": Rule((READ,)),
        "RepositoryModelLoad": Rule((WRITE,), "model_name"),
        "RepositoryModelUnload": Rule((WRITE,), "model_name"),
        "ModelInfer": Rule((INFER,), "model_name"),
        "ModelStreamInfer": Rule((INFER,), "model_name", checked_by_handler=True),
        "SystemSharedMemoryStatus": Rule((INFER,)),
        "SystemSharedMemoryRegister": Rule((INFER,)),
        "SystemSharedMemoryUnregister": Rule((INFER,)),
        "CudaSharedMemoryStatus": Rule((INFER,)),
        "CudaSharedMemoryRegister": Rule((INFER,)),
        "CudaSharedMemoryUnregister": Rule((INFER,)),
        "TraceSetting": Rule((ADMIN,)),
        "LogSettings": Rule((ADMIN,)),
    }.items()
}
"""``inference.GRPCInferenceService`` (the gateway, and a worker's direct service): scope and model field."""

REGISTRY_RULES: dict[str, Rule] = {
    f"{_REGISTRY}{method}": rule
    for method, rule in {
        "CreateModel": Rule((WRITE,), "name"),
        "GetModel": Rule((READ,), "name"),
        "ListModels": Rule((READ,)),
        "DeleteModel": Rule((WRITE,), "name"),
        "UploadVersion": Rule((WRITE,), "header.model"),
        "GetVersion": Rule((READ,), "model"),
        "ListVersions": Rule((READ,), "model"),
        "UpdateVersion": Rule((WRITE,), "model"),
        "DeleteVersion": Rule((WRITE,), "model"),
        "WatchEvents": Rule((READ,), "model"),
        "DownloadVersion": Rule((READ,), "model"),
        "Deploy": Rule((WRITE,), "model"),
        "Undeploy": Rule((WRITE,), "model"),
        "ListDeployments": Rule((READ,)),
        "Rollback": Rule((WRITE,), "model"),
        "SetAlias": Rule((WRITE,), "model"),
        "DeleteAlias": Rule((WRITE,), "model"),
        "ListAliases": Rule((READ,), "model"),
        "ShareModel": Rule((WRITE,), "name"),
        "UnshareModel": Rule((WRITE,), "name"),
        "OptimizeVersion": Rule((WRITE,), "model"),
        # NOTE: operations name no model: the registry checks the operation's model itself (optimize.py).
        "GetOperation": Rule((READ,)),
        "WatchOperation": Rule((READ,)),
        "CreateTenant": Rule((ADMIN,), is_global=True),
        "ListTenants": Rule((ADMIN,)),
        "CreateApiKey": Rule((ADMIN,)),
        "ListApiKeys": Rule((ADMIN,)),
        "RevokeApiKey": Rule((ADMIN,)),
        "SetTenantQuota": Rule((ADMIN,), is_global=True),
        "GetClusterStatus": Rule((ADMIN,)),  # a tenant admin: its tenant's models only (cluster_status.py)
    }.items()
}
"""``maas.registry.v1.ModelRegistry``: scope and model field of each RPC."""

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
REFLECTION_SERVICES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def _model_of(message: Any, path: str) -> str | None:
    """Return the model a message names at ``path`` (None when a message on the way is unset)."""
    obj = message
    *parents, leaf = path.split(".")
    for part in parents:
        if not obj.HasField(part):
            return None
        obj = getattr(obj, part)
    value = getattr(obj, leaf, None)
    return value if isinstance(value, str) else None


def _version_of(request: Any, response: Any) -> int | str | None:
    """Return the model version a write named or produced, for the audit log."""
    for holder in (getattr(response, "version", None), getattr(response, "deployment", None)):
        number = getattr(holder, "version", None)
        if isinstance(number, int) and number:
            return number
    number = getattr(request, "version", None)
    return number if isinstance(number, int | str) and number else None


def _targets_of(rpc: str, request: Any, response: Any) -> dict[str, str]:
    """Return the tenant and the API key an administration or sharing call acted on, for the audit log."""
    targets: dict[str, str] = {}
    tenant = getattr(request, "name" if rpc.endswith("/CreateTenant") else "tenant", "")
    if isinstance(tenant, str) and tenant:
        targets["target_tenant"] = shown(tenant)
    if rpc.endswith("ApiKey"):
        key_id = getattr(getattr(response, "api_key", None), "id", "") or getattr(request, "id", "")
        if isinstance(key_id, str) and key_id:
            targets["target_key_id"] = shown(key_id)
    return targets


def _token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if key == "authorization":
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
        elif key == "x-api-key":
            return text.strip()
    return None


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4`` (failures are counted per address, not connection)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class _Call:
    """One authorized call: its identity and rule, and its audit line when it writes."""

    __slots__ = ("identity", "model", "rpc", "rule")

    def __init__(self, rpc: str, rule: Rule, identity: Identity) -> None:
        self.rpc = rpc
        self.rule = rule
        self.identity = identity
        self.model: str | None = None

    def check(self, message: Any) -> Any:
        """Check the model ``message`` names (if the rule names a field); return the message."""
        if self.rule.model_field is not None and not self.rule.checked_by_handler:
            model = _model_of(message, self.rule.model_field)
            if model is not None:
                self.model = model
                check_model(model, self.identity)
        return message

    async def check_each(self, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Check each message of a request stream as it is read."""
        async for message in messages:
            yield self.check(message)

    def audit(self, request: Any, response: Any, exc: BaseException | None) -> None:
        """Write the audit line of a write or administration call."""
        if not self.rule.is_audited:
            return
        if exc is None:
            code = "OK"
        elif isinstance(exc, MaasError):
            code = exc.grpc_code.name
        elif isinstance(exc, asyncio.CancelledError):
            code = "CANCELLED"
        else:
            code = "INTERNAL"
        log.info(
            "audit", audit=True, rpc=self.rpc, key=self.identity.key_name, key_id=self.identity.key_id,
            tenant=self.identity.tenant, model=self.model, version=_version_of(request, response), result=code,
            **_targets_of(self.rpc, request, response),
        )  # fmt: skip


class AuthInterceptor(WrappingInterceptor):
    """Authenticate every RPC but health (and open reflection) and check its scope and model.

    RPCs without a rule in ``rules`` are refused (a new RPC is closed until it gets one).

    Args:
        verifier: Verifies tokens.
        rules: The rule of each RPC, by full method name (``INFERENCE_RULES``, ``REGISTRY_RULES``).
        limiter: Failed authentications per peer address.
        is_reflection_open: Serve server reflection without a key.
    """

    def __init__(
        self, verifier: KeyVerifier, rules: Mapping[str, Rule], limiter: FailureLimiter, *, is_reflection_open: bool
    ) -> None:
        self._verifier = verifier
        self._rules = rules
        self._limiter = limiter
        super().__init__(self._wrap, OPEN_SERVICES + (REFLECTION_SERVICES if is_reflection_open else ()))

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> _Call:
        """Authenticate the caller and check the RPC's scope; bind the identity to this call.

        Raises:
            ResourceExhausted: The peer made too many failed authentications lately.
            Unauthenticated: No valid key.
            PermissionDenied: The key lacks the scope, or no rule allows the RPC.
        """
        peer = _peer_host(context.peer() or "")
        wait_s = self._limiter.retry_after_s(peer)
        if wait_s > 0:
            raise ResourceExhausted(
                f"too many failed authentications from this address; retry in {math.ceil(wait_s)} s"
            )
        try:
            identity = await self._verifier.verify(_token(context.invocation_metadata()))
        except Unauthenticated:
            self._limiter.failed(peer)
            log.info("auth_failed", peer=peer, rpc=rpc)
            raise
        _identity.set(identity)
        structlog.contextvars.bind_contextvars(caller=f"{identity.tenant}/{identity.key_name}")
        rule = self._rules.get(rpc)
        if rule is None:
            raise PermissionDenied(f"{rpc} is not open to any API key")
        call = _Call(rpc, rule, identity)
        refusal = rule.refusal(identity, rpc)
        if refusal is not None:
            denied = PermissionDenied(refusal)
            call.audit(None, None, denied)
            raise denied
        return call

    def _wrap(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            guarded = self._guard(handler.unary_unary, rpc, streamed_in=False)
            return grpc.unary_unary_rpc_method_handler(
                guarded, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            guarded = self._guard(handler.stream_unary, rpc, streamed_in=True)
            return grpc.stream_unary_rpc_method_handler(
                guarded, handler.request_deserializer, handler.response_serializer
            )
        return self._wrap_stream_out(handler, rpc)

    def _guard(
        self, inner: Callable[[Any, Any], Awaitable[Any]], rpc: str, *, streamed_in: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        """``inner`` (a unary-out behaviour) behind the key check, audited."""
        authorize = self._authorize

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = await authorize(context, rpc)
            response, failure = None, None
            try:
                response = await inner(call.check_each(request) if streamed_in else call.check(request), context)
                return response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                call.audit(None if streamed_in else request, response, failure)

        return guarded

    def _wrap_stream_out(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        streaming = handler.unary_stream or handler.stream_stream
        assert streaming is not None
        is_unary_in = handler.unary_stream is not None
        authorize = self._authorize

        async def stream_out(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = await authorize(context, rpc)
            incoming = call.check(request) if is_unary_in else call.check_each(request)
            failure = None
            try:
                async for reply in streaming(incoming, context):
                    yield reply
            except BaseException as exc:
                failure = exc
                raise
            finally:
                call.audit(request if is_unary_in else None, None, failure)

        factory = grpc.unary_stream_rpc_method_handler if is_unary_in else grpc.stream_stream_rpc_method_handler
        return factory(stream_out, handler.request_deserializer, handler.response_serializer)


class AuthConfigError(ValueError):
    """Auth is on, but the server secret is missing or too short."""


@dataclass(frozen=True)
class ServerAuth:
    """A server's key check: the interceptor, and the verifier whose event follower must run."""

    verifier: KeyVerifier
    interceptor: AuthInterceptor

    async def start(self) -> None:
        """Start following revocations."""
        await self.verifier.start()

    async def stop(self) -> None:
        """Stop following revocations."""
        await self.verifier.stop()


def auth_secret(settings: ServiceSettings) -> str | None:
    """Return the server secret of ``settings`` (None if unset)."""
    return settings.auth_secret.get_secret_value() if settings.auth_secret is not None else None


def create_server_auth(
    settings: ServiceSettings, redis: aioredis.Redis, rules: Mapping[str, Rule], *, service: str
) -> ServerAuth | None:
    """Build the key check of a server from its settings; None (and a warning) when auth is off.

    Raises:
        AuthConfigError: Auth is on and ``MAAS_AUTH_SECRET`` is missing or shorter than 32 characters.
    """
    if not settings.auth_enabled:
        log.warning("auth_disabled", service=service, hint="every caller may use every RPC")
        return None
    secret = auth_secret(settings) or ""
    if len(secret) < MIN_SECRET_CHARS:
        raise AuthConfigError(
            f"{service}: auth is on, but MAAS_AUTH_SECRET is unset or shorter than {MIN_SECRET_CHARS} characters"
        )
    verifier = KeyVerifier(redis, secret, cache_ttl_s=settings.auth_cache_ttl_s)
    limiter = FailureLimiter(settings.auth_failures_burst, settings.auth_failures_per_s)
    interceptor = AuthInterceptor(verifier, rules, limiter, is_reflection_open=settings.auth_reflection_open)
    return ServerAuth(verifier, interceptor)


def bearer(token: str | SecretStr | None) -> tuple[tuple[str, str], ...]:
    """Return the call metadata that sends the API key ``token`` (none without one)."""
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    return (("authorization", f"Bearer {token}"),) if token else ()
