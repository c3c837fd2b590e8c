"""Redis ACL users per service role: the whole suite works on them, and they refuse the rest."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions

from inference import grpc_service_pb2 as pb
from services.common import keys, redis_acl
from services.common.embedded_redis import EmbeddedRedis
from services.common.queue import QueuedRequest, now_ms
from tests.integration.suite import Suite
from tests.models import affine_model
from tests.triton import triton_calls

pytestmark = pytest.mark.integration

MAAS = [sys.executable, "-m", "services.cli"]
SERVICE_ROLES = ("gateway", "worker", "registry")
WORKER_ID = "acl-worker"
POISON_REPLIES = f"{keys.REPLIES_PREFIX}acl-test"


class AclRedis:
    """An own Redis with the role users created through ``ACL SETUSER`` (the default user stays admin)."""

    def __init__(self, data_dir: Path) -> None:
        self.server = EmbeddedRedis(data_dir).start()
        self.passwords = redis_acl.new_passwords(redis_acl.ROLES)
        admin = redis.Redis(port=self.server.port)
        try:
            for command in redis_acl.setuser_commands(self.passwords):
                assert admin.execute_command(*command) == b"OK"
            admin.execute_command("ACL", "LOG", "RESET")
        finally:
            admin.close()
        self.urls = {role: redis_acl.role_url(self.server.url, role, self.passwords[role]) for role in redis_acl.ROLES}

    def client(self, role: str) -> redis.Redis:
        """A synchronous client logged in as ``role``."""
        return redis.Redis.from_url(self.urls[role], socket_timeout=5)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    own = AclRedis(tmp_path_factory.mktemp("acl") / "redis")
    yield own
    own.server.stop()


@pytest.fixture
async def admin(acl_redis: AclRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=acl_redis.server.port)
    yield client
    await client.flushdb()
    await client.aclose()


def _affine_request(name: str = "affine") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.array([[1, 2, 3, 4]], np.float32).tobytes())
    return request


async def _plant_poison(admin: aioredis.Redis) -> None:
    """Queue an entry that three workers already died on, pending for ``WORKER_ID`` (a restart)."""
    queue = keys.queue("affine", 1)
    await admin.xdel(POISON_REPLIES, await admin.xadd(POISON_REPLIES, {"hello": "1"}))
    await admin.xgroup_create(queue, keys.QUEUE_GROUP, id="0", mkstream=True)
    entry = QueuedRequest(
        id="poison",
        reply_to=POISON_REPLIES,
        deadline_ms=now_ms() + 60_000,
        payload=_affine_request().SerializeToString(),
    )
    poison_id = await admin.xadd(queue, entry.to_fields())
    await admin.xreadgroup(keys.QUEUE_GROUP, WORKER_ID, {queue: ">"})
    await admin.xclaim(queue, keys.QUEUE_GROUP, WORKER_ID, 0, [poison_id], retrycount=3)


async def _wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_the_whole_suite_runs_on_role_users(acl_redis: AclRedis, admin: aioredis.Redis, tmp_path: Path) -> None:
    await admin.execute_command("ACL", "LOG", "RESET")
    role_urls = {role: acl_redis.urls[role] for role in SERVICE_ROLES}
    running = await Suite(acl_redis.server.url, tmp_path, role_urls=role_urls).start(with_worker=False)
    try:
        await running.push("affine", affine_model())  # registry: scripts, metadata, events
        await _plant_poison(admin)
        await running.start_worker(worker_id=WORKER_ID, max_deliveries=3)  # its own pending entry first

        async def dead_lettered() -> bool:
            return bool(await admin.xlen(keys.dead_letter("affine", 1)))

        await _wait_for(dead_lettered)
        [(_id, reply)] = (await admin.xread({POISON_REPLIES: "0-0"}))[0][1]
        assert reply[b"id"] == b"poison" and b"dead-letter" in reply[b"msg"]

        response = await running.inference.ModelInfer(_affine_request(), timeout=20)  # gateway + worker
        assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [3.0, 5.0, 7.0, 9.0]
        ready = await running.inference.ModelReady(pb.ModelReadyRequest(name="affine"), timeout=5)
        assert ready.ready  # the gateway reads the worker's heartbeat
        assert running.worker is not None
        await running.worker.run_until_empty()  # its statistics go with the entry's ack, after the reply
        statistics = await running.inference.ModelStatistics(pb.ModelStatisticsRequest(name="affine"), timeout=5)
        [model_stats] = statistics.model_stats
        assert model_stats.inference_stats.success.count == 1
        assert model_stats.execution_count >= 1  # the worker's HINCRBYs in its reply MULTI
        await running.gateway.stats.flush()  # the gateway's HINCRBYs and max script

        await running.registry.undeploy("affine")  # fails the (empty) queue: WATCH, XRANGE, DEL
        await running.registry.delete_model("affine")  # deletes metadata and statistics
        assert not await admin.exists(keys.model("affine"), keys.stats("affine", 1))
    finally:
        await running.stop()
    # Nothing the services sent was refused, not even what they log and carry on after.
    assert _denials(await admin.execute_command("ACL", "LOG")) == []


def _denials(acl_log: list[dict[bytes, Any]]) -> list[tuple[bytes, bytes]]:
    """The (user, command or key) of ACL LOG entries, but CLIENT's.

    NOTE: redis-py 8 sends CLIENT MAINT_NOTIFICATIONS ON on connect ("auto": it goes on when
    refused). Redis < 8 has no such subcommand, and Redis >= 7 refuses ACL rules that name an
    unknown subcommand, so the roles do not allow it.
    """
    return [(entry[b"username"], entry[b"object"]) for entry in acl_log if entry[b"object"] != b"client"]


@pytest.mark.parametrize("role", sorted(redis_acl.ROLES))
@pytest.mark.parametrize(
    "command",
    [["FLUSHALL"], ["FLUSHDB"], ["CONFIG", "SET", "maxmemory", "1"], ["KEYS", "*"], ["ACL", "LIST"], ["SHUTDOWN"],
     ["DEBUG", "SLEEP", "0"], ["EVAL", "return 1", "0"] , ["SUBSCRIBE", "x"]],
)  # fmt: skip
def test_no_role_may_run_admin_commands(acl_redis: AclRedis, role: str, command: list[str]) -> None:
    client = acl_redis.client(role)
    error: type[redis.exceptions.ResponseError] = redis.exceptions.NoPermissionError
    try:
        if role == "gateway" and command[0] == "EVAL":
            # The gateway may run scripts, but a script runs with the caller's rights.
            command, error = ["EVAL", "return redis.call('FLUSHALL')", "0"], redis.exceptions.ResponseError
        with pytest.raises(error, match=r"permissions|can't run this command"):
            client.execute_command(*command)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("role", "command"),
    [
        ("gateway", ["GET", "other:key"]),
        ("gateway", ["DEL", keys.DEPLOYMENTS]),
        ("gateway", ["HSET", keys.DEPLOYMENTS, "m", "{}"]),  # HSET: for the statistics script only
        ("gateway", ["EVAL", "return 1", "1", keys.MODELS]),
        ("worker", ["SET", "other:key", "1"]),
        ("worker", ["DEL", keys.DEPLOYMENTS]),
        ("worker", ["XADD", keys.model("affine"), "*", "a", "b"]),
        ("registry", ["DEL", "other:key"]),
        ("registry", ["DEL", keys.quota_bucket("t1")]),
        ("monitor", ["GET", "other:key"]),
    ],
)
def test_roles_touch_only_their_keys(acl_redis: AclRedis, role: str, command: list[str]) -> None:
    client = acl_redis.client(role)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError, match="keys"):
            client.execute_command(*command)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("role", "command"),
    [
        ("gateway", ["XREADGROUP", "GROUP", keys.QUEUE_GROUP, "g", "STREAMS", keys.queue("m", 1), ">"]),
        ("gateway", ["HDEL", keys.DEPLOYMENTS, "m"]),
        ("gateway", ["XACK", keys.queue("m", 1), keys.QUEUE_GROUP, "1-1"]),
        ("worker", ["HSET", keys.DEPLOYMENTS, "m", "{}"]),
        ("worker", ["HGETALL", keys.model("m")]),
        ("worker", ["ZADD", keys.MODELS, "1", "m"]),
        ("worker", ["XGROUP", "DESTROY", keys.queue("m", 1), keys.QUEUE_GROUP]),
        ("registry", ["XREADGROUP", "GROUP", keys.QUEUE_GROUP, "r", "STREAMS", keys.queue("m", 1), ">"]),
        ("registry", ["SET", keys.worker("w1"), "{}"]),
        ("monitor", ["XADD", keys.queue("m", 1), "*", "a", "b"]),
        ("monitor", ["DEL", keys.worker("w1")]),
    ],
)
def test_roles_run_only_their_commands(acl_redis: AclRedis, role: str, command: list[str]) -> None:
    client = acl_redis.client(role)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError, match="command"):
            client.execute_command(*command)
    finally:
        client.close()


def test_a_wrong_password_is_refused_without_echoing_it(acl_redis: AclRedis) -> None:
    url = redis_acl.role_url(acl_redis.server.url, "worker", "not-the-password")
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError) as info:
            client.ping()
        assert "not-the-password" not in str(info.value)
    finally:
        client.close()


def test_rules_carry_hashes_and_key_patterns_follow_keys() -> None:
    passwords = redis_acl.new_passwords()
    text = redis_acl.acl_file(passwords) + str(redis_acl.setuser_commands(passwords))
    for password in passwords.values():
        assert password not in text
        assert redis_acl.password_hash(password) in text
    assert keys.queue("m", 1).startswith(keys.QUEUE_PREFIX)
    assert keys.dead_letter("m", 1).startswith(keys.DEAD_LETTER_PREFIX)
    assert keys.stats("m", 1).startswith(keys.STATS_PREFIX)
    assert keys.replies("g").startswith(keys.REPLIES_PREFIX)
    assert keys.versions("m").startswith(keys.MODEL_PREFIX) and keys.model("m").startswith(keys.MODEL_PREFIX)
    assert "user default off resetpass -@all" in redis_acl.acl_file({r: passwords[r] for r in redis_acl.ROLES})


def test_redact_url_hides_only_the_password() -> None:
    assert redis_acl.redact_url("redis://worker:s3cret@h:6379/0") == "redis://worker:***@h:6379/0"
    assert redis_acl.redact_url("rediss://:s3cret@h:6379/0") == "rediss://:***@h:6379/0"
    assert redis_acl.redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redis_acl.role_url("redis://h:6379/0", "gateway", "p") == "redis://gateway:p@h:6379/0"
    assert redis_acl.role_url("redis://:old@h:6379/0", "gateway", "p") == "redis://gateway:p@h:6379/0"


def test_redis_acl_command_prints_rules_from_a_passwords_file(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords.env"
    done = subprocess.run(
        [*MAAS, "redis", "acl", "--passwords", str(passwords)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600
    written = redis_acl.read_passwords(passwords)
    assert set(written) == {redis_acl.ADMIN, *redis_acl.ROLES}
    assert done.stdout == redis_acl.acl_file(written)
    commands = subprocess.run(
        [*MAAS, "redis", "acl", "--passwords", str(passwords), "--format", "commands"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert commands.returncode == 0, commands.stderr
    assert commands.stdout.splitlines() == [" ".join(c) for c in redis_acl.setuser_commands(written)]
    bad = subprocess.run(
        [*MAAS, "redis", "acl", "--passwords", str(passwords), "--format", "yaml"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "expected 'file' or 'commands'" in bad.stderr


@pytest.mark.timeout(240)
def test_maas_up_runs_every_service_as_its_own_user(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            [*MAAS, "up", "--workers", "1", "--gateway-port", "0", "--registry-port", "0", "--data-dir", str(data_dir)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        endpoints = _wait_endpoints(data_dir / "run" / "endpoints.json", process, log)
        passwords = redis_acl.read_passwords(data_dir / "redis" / "passwords.env")
        for private in ("redis/passwords.env", "redis/users.acl", "run/endpoints.json"):
            assert stat.S_IMODE((data_dir / private).stat().st_mode) == 0o600, private
        users_acl = (data_dir / "redis" / "users.acl").read_text()
        assert not any(password in users_acl for password in passwords.values())

        monitor_url = str(endpoints["redis_url"])
        assert monitor_url.startswith("redis://monitor:")
        port = redis.Redis.from_url(monitor_url).connection_pool.connection_kwargs["port"]
        _assert_default_user_is_locked(port, passwords[redis_acl.ADMIN], monitor_url)
        for child, role in (("gateway", "gateway"), ("registry", "registry"), ("worker-0", "worker")):
            pid = endpoints["pids"][child]  # type: ignore[index]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            # over the embedded Redis's Unix socket (UpOptions.unix_sockets)
            assert f"MAAS_REDIS_URL=unix://{role}:{passwords[role]}@/".encode() in b"\n".join(environ)

        model = tmp_path / "affine.onnx"
        model.write_bytes(affine_model())
        key_file = data_dir / "auth" / "admin.key"  # API keys are on: services read keys from Redis too
        cli_env = env | {"MAAS_GATEWAY": str(endpoints["gateway"]), "MAAS_REGISTRY": str(endpoints["registry"]),
                         "MAAS_API_KEY_FILE": str(key_file)}  # fmt: skip
        pushed = subprocess.run(
            [*MAAS, "models", "push", str(model), "--name", "affine"], env=cli_env, capture_output=True, text=True
        )
        assert pushed.returncode == 0, pushed.stderr
        [result] = triton_calls(
            str(endpoints["gateway"]),
            [{"op": "infer", "model": "affine", "inputs": {"x": {"data": [[1, 2, 3, 4]], "dtype": "float32"}},
              "timeout_s": 60}],
            api_key=key_file.read_text().strip(),
        )  # fmt: skip
        assert result["ok"]["outputs"]["y"] == [[3.0, 5.0, 7.0, 9.0]], result
        admin = redis.Redis(port=port, password=passwords[redis_acl.ADMIN])
        try:
            assert _denials(admin.execute_command("ACL", "LOG")) == []
        finally:
            admin.close()
    finally:
        process.send_signal(2)
        process.wait(90)
    output = log.read_text()
    assert "redis://monitor:***@" in output
    assert not any(password in output for password in passwords.values())


def _wait_endpoints(path: Path, process: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if path.exists():
            endpoints: dict[str, object] = json.loads(path.read_text())
            return endpoints
        assert process.poll() is None, f"maas up exited: {log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"maas up not ready: {log.read_text()[-3000:]}")


def _assert_default_user_is_locked(port: int, admin_password: str, monitor_url: str) -> None:
    anonymous = redis.Redis(port=port, socket_timeout=5)
    monitor = redis.Redis.from_url(monitor_url, socket_timeout=5)
    admin = redis.Redis(port=port, password=admin_password, socket_timeout=5)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.execute_command("FLUSHALL")
        with pytest.raises(redis.exceptions.NoPermissionError):
            monitor.execute_command("FLUSHALL")
        assert admin.ping()
        admin.execute_command("ACL", "LOG", "RESET")  # forget the refusal just provoked
    finally:
        for client in (anonymous, monitor, admin):
            client.close()


def test_deploy_ships_the_rules_of_redis_acl() -> None:
    manifest = (Path(__file__).parents[2] / "deploy" / "k8s" / "redis-users.yaml").read_text()
    shipped = manifest.split("users.acl: |\n", 1)[1]
    placeholders = {name: f"placeholder-{name}" for name in (*redis_acl.ROLES, redis_acl.ADMIN)}
    expected = redis_acl.acl_file(placeholders)
    for name, password in placeholders.items():
        label = "ADMIN" if name == redis_acl.ADMIN else name.upper()
        expected = expected.replace(redis_acl.password_hash(password), f"REPLACE-WITH-SHA256-OF-THE-{label}-PASSWORD")
    assert [line.strip() for line in shipped.splitlines()] == expected.splitlines()
    for role in redis_acl.ROLES:
        assert f"  {role}: REPLACE-WITH-THE-{role.upper()}-PASSWORD\n" in manifest
