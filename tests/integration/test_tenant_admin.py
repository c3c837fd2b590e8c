"""Administration per tenant: a tenant's ``admin`` key manages its own tenant only; ``system``'s manages all.

Real registry, gateway and worker, real Redis, real keys. Tenant ``team-a`` has an administrator
(``boss``, every scope) and tenant ``team-b`` a key of its own; the suite's bootstrap key is the
``system`` tenant's administrator.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from services.common.auth import ADMIN, INFER, SCOPES, TenantQuota, bearer, new_token, parse_token
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import NotFound, PermissionDenied, Unauthenticated
from services.common.registry_client import RegistryClient
from tests.integration.suite import Suite, run_cli
from tests.models import affine_model

pytestmark = pytest.mark.integration


@dataclass
class Admins:
    """Registry clients of team-a's administrator and team-b's key, and team-b's key id."""

    boss: RegistryClient
    boss_key: str
    team_b: RegistryClient
    team_b_key_id: str


@pytest.fixture
async def suite(redis_server: EmbeddedRedis, redis_client: aioredis.Redis, tmp_path: Path) -> AsyncIterator[Suite]:
    running = await Suite(redis_server.url, tmp_path, auth={"auth_failures_burst": 100_000}).start(with_worker=False)
    yield running
    await running.stop()


@pytest.fixture
async def admins(suite: Suite) -> AsyncIterator[Admins]:
    for tenant in ("team-a", "team-b"):
        await suite.registry.create_tenant(tenant)
    _, boss_key = await suite.registry.create_api_key("team-a", "boss", SCOPES)
    record, b_key = await suite.registry.create_api_key("team-b", "b-all", SCOPES)
    made = Admins(
        RegistryClient(suite.registry_address, metadata=bearer(boss_key)), boss_key,
        RegistryClient(suite.registry_address, metadata=bearer(b_key)), record.id,
    )  # fmt: skip
    yield made
    await made.boss.close()
    await made.team_b.close()


async def test_a_tenant_admin_creates_keys_of_its_own_tenant_only(suite: Suite, admins: Admins) -> None:
    record, _ = await admins.boss.create_api_key("team-a", "app", [INFER], ["app-*"])
    assert (record.tenant, record.scopes, record.models) == ("team-a", ("infer",), ("app-*",))
    for tenant in ("team-b", "system", "no-such-tenant"):  # the same answer whether the tenant exists
        with pytest.raises(
            PermissionDenied, match=f"^API key 'boss' administers tenant 'team-a' only, not tenant '{tenant}'$"
        ):
            await admins.boss.create_api_key(tenant, "mine", [INFER])
    assert {r.tenant for r in await suite.registry.list_api_keys()} == {"system", "team-a", "team-b"}
    # a narrower administrator grants nothing it lacks: no other scope, no wider model pattern
    _, narrow_key = await admins.boss.create_api_key("team-a", "narrow", [ADMIN], ["fraud-*"])
    narrow = RegistryClient(suite.registry_address, metadata=bearer(narrow_key))
    try:
        with pytest.raises(PermissionDenied, match=r"^API key 'narrow' may not grant scope 'infer': it lacks it$"):
            await narrow.create_api_key("team-a", "x", [INFER])
        with pytest.raises(PermissionDenied, match=r"^API key 'narrow' may not grant model pattern '\*'"):
            await narrow.create_api_key("team-a", "x", [ADMIN])
        assert (await narrow.create_api_key("team-a", "x", [ADMIN], ["fraud-*"]))[0].models == ("fraud-*",)
    finally:
        await narrow.close()


async def test_a_tenant_admin_lists_its_own_tenant_and_keys(suite: Suite, admins: Admins) -> None:
    assert {r.tenant for r in await admins.boss.list_api_keys()} == {"team-a"}
    assert {r.tenant for r in await admins.boss.list_api_keys("team-a")} == {"team-a"}
    with pytest.raises(PermissionDenied, match="administers tenant 'team-a' only, not tenant 'team-b'"):
        await admins.boss.list_api_keys("team-b")
    assert [tenant.name for tenant in await admins.boss.list_tenants()] == ["team-a"]
    assert [tenant.name for tenant, _ in await admins.boss.tenant_report()] == ["team-a"]
    assert [t.name for t in await suite.registry.list_tenants()] == ["system", "team-a", "team-b"]


async def test_another_tenants_key_cannot_be_revoked_and_answers_as_unknown(suite: Suite, admins: Admins) -> None:
    unknown = "0123456789abcdef"
    with pytest.raises(NotFound) as missing:
        await admins.boss.revoke_api_key(unknown)
    with pytest.raises(NotFound) as foreign:
        await admins.boss.revoke_api_key(admins.team_b_key_id)
    assert str(foreign.value) == str(missing.value).replace(unknown, admins.team_b_key_id)
    assert not [r for r in await suite.registry.list_api_keys("team-b") if r.revoked]
    assert (await admins.team_b.list_models()) == []  # team-b's key still works
    record, _ = await admins.boss.create_api_key("team-a", "temp", [INFER])
    assert (await admins.boss.revoke_api_key(record.id)).revoked


async def test_tenants_and_quotas_are_for_the_system_admin(suite: Suite, admins: Admins) -> None:
    needs_system = "^API key 'boss' administers tenant 'team-a' only; /maas.registry.v1.ModelRegistry/{} needs"
    with pytest.raises(PermissionDenied, match=needs_system.format("SetTenantQuota")):
        await admins.boss.set_tenant_quota("team-a", TenantQuota(rps=1000, burst=1000))  # not even its own
    with pytest.raises(PermissionDenied, match=needs_system.format("CreateTenant")):
        await admins.boss.create_tenant("team-c")
    assert (await admins.boss.get_cluster_status()).queues == ()  # its tenant's view (test_ownership.py)
    [(team_a, _)] = await admins.boss.tenant_report()
    assert not team_a.quota.is_limited
    assert (await suite.registry.set_tenant_quota("team-a", TenantQuota(rps=5, burst=5))).quota.rps == 5
    assert (await suite.registry.get_cluster_status()).time_ms > 0


async def test_a_tenant_admin_sees_only_its_tenants_models(suite: Suite, admins: Admins) -> None:
    await admins.team_b.create_model("b-model")
    await admins.boss.create_model("a-model")
    assert [m.name for m in await admins.boss.list_models()] == ["a-model"]
    with pytest.raises(NotFound, match=r"^model 'b-model' not found$"):
        await admins.boss.get_model("b-model")
    with pytest.raises(NotFound, match=r"^model 'b-model' not found$"):
        await admins.boss.share_model("b-model", "team-a")
    assert [m.name for m in await suite.registry.list_models()] == ["a-model", "b-model"]


async def test_cli_status_and_keys_of_a_tenant_admin(suite: Suite, admins: Admins) -> None:
    await suite.push("shared-model", affine_model())
    code, stdout, stderr = await run_cli(suite, "status", key=admins.boss_key)
    assert code == 0, stderr
    assert "team-a" in stdout and "team-b" not in stdout and "system" not in stdout
    assert "need a key with the admin scope" not in stdout and "live worker" in stdout  # usage, cluster
    code, stdout, _ = await run_cli(suite, "keys", "ls", key=admins.boss_key)
    assert code == 0 and "boss" in stdout and "b-all" not in stdout
    code, _, stderr = await run_cli(suite, "tenants", "set-quota", "team-a", "--rps", "100", key=admins.boss_key)
    said = " ".join(stderr.split())  # the terminal width wraps it
    assert code == 1 and "PERMISSION_DENIED" in said and "needs an admin key of the 'system' tenant" in said
    code, stdout, stderr = await run_cli(suite, "status", key=suite.admin_key)
    assert code == 0 and "team-b" in stdout and "live worker" in stdout, stderr


async def test_a_revoked_key_is_refused_by_the_registry_within_a_second(suite: Suite, admins: Admins) -> None:
    record, key = await admins.boss.create_api_key("team-a", "doomed", SCOPES)
    client = RegistryClient(suite.registry_address, metadata=bearer(key))
    try:
        await client.list_models()  # verified once: now cached by the registry
        await admins.boss.revoke_api_key(record.id)
        deadline = time.monotonic() + 1.0
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                await client.list_models()
            except Unauthenticated:
                refused = True
            await asyncio.sleep(0.02)
        assert refused
    finally:
        await client.close()


async def test_an_expiring_tenant_admin_cannot_make_a_key_that_outlives_it(suite: Suite, admins: Admins) -> None:
    expires_at_ms = int(time.time() * 1000) + 3_600_000
    _, temp_key = await admins.boss.create_api_key("team-a", "temp-admin", SCOPES, expires_at_ms=expires_at_ms)
    temp = RegistryClient(suite.registry_address, metadata=bearer(temp_key))
    try:
        for later in (0, expires_at_ms + 1):  # never, or after its own expiry
            with pytest.raises(PermissionDenied, match=r"^API key 'temp-admin' may not grant a key that outlives it"):
                await temp.create_api_key("team-a", "forever", SCOPES, expires_at_ms=later)
        made, _ = await temp.create_api_key("team-a", "shorter", [INFER], expires_at_ms=expires_at_ms - 1000)
        assert made.expires_at_ms == expires_at_ms - 1000
    finally:
        await temp.close()
    assert (await suite.registry.create_api_key("team-a", "forever", SCOPES))[0].expires_at_ms == 0  # global admin


def test_keys_carry_at_least_128_random_bits() -> None:
    tokens = [new_token()[2] for _ in range(100)]
    assert len(set(tokens)) == 100
    for token in tokens:
        parsed = parse_token(token)
        assert parsed is not None
        secret = base64.urlsafe_b64decode(parsed[1] + "=" * (-len(parsed[1]) % 4))
        assert len(secret) * 8 >= 128  # the secret alone; the key id adds 64 bits that only find the record


async def test_administration_is_audited_with_its_target(suite: Suite, admins: Admins) -> None:
    with capture_logs() as logs:
        record, _ = await admins.boss.create_api_key("team-a", "audited", [INFER])
        await admins.boss.revoke_api_key(record.id)
        with pytest.raises(PermissionDenied):
            await admins.boss.create_api_key("team-b", "sneaky", [INFER])
        await suite.registry.create_tenant("team-c")
    audit = [
        {k: line.get(k) for k in ("rpc", "key", "tenant", "target_tenant", "target_key_id", "result")}
        for line in logs
        if line.get("audit")
    ]
    registry = "/maas.registry.v1.ModelRegistry/"
    assert audit == [
        {"rpc": f"{registry}CreateApiKey", "key": "boss", "tenant": "team-a", "target_tenant": "team-a",
         "target_key_id": record.id, "result": "OK"},
        {"rpc": f"{registry}RevokeApiKey", "key": "boss", "tenant": "team-a", "target_tenant": None,
         "target_key_id": record.id, "result": "OK"},
        {"rpc": f"{registry}CreateApiKey", "key": "boss", "tenant": "team-a", "target_tenant": "team-b",
         "target_key_id": None, "result": "PERMISSION_DENIED"},
        {"rpc": f"{registry}CreateTenant", "key": "admin", "tenant": "system", "target_tenant": "team-c",
         "target_key_id": None, "result": "OK"},
    ]  # fmt: skip
