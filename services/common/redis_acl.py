"""Redis ACL users, one per service role: the single source of truth for what each may do.

Each role gets the commands its service sends (redis-py's connection set-up included) and only
the ``maas:v1:`` key patterns it touches (``services.common.keys``); nobody gets pub/sub
channels (MaaS uses none). The same rules render as ``ACL SETUSER`` arguments (for a running
Redis) and as ``users.acl`` lines (``aclfile``); passwords appear only as SHA-256 (``#<hex>``).

- ``gateway``: the enqueue script (EVAL: XLEN + XADD on a queue, and the tenant quota: TIME,
  HMGET/HSET/PEXPIRE on its token bucket, ZREMRANGEBYSCORE/ZCARD/ZADD on its in-flight set;
  on a Redis Cluster the give-back script's EXISTS + HINCRBYFLOAT),
  in-flight releases (ZREM), tenant records (HGET) and usage (HINCRBY), its own reply stream,
  generations' cancel flags (SET),
  statistics (HINCRBY, the max script, HGETALL), heartbeats (SCAN + GET) and registry events.
- ``worker``: its queues (consumer group, XREADGROUP, claims, XACK + XDEL in a MULTI with the
  reply XADDs and statistics HINCRBYs), dead-letter XADDs, its heartbeat and registry events;
  generations' cancel flags (EXISTS).
- ``registry``: models, versions and deployments (its scripts run with EVALSHA), events
  (WatchEvents: XREAD, XRANGE, XREVRANGE), version deletion (WATCH, HKEYS, MULTI), and
  on undeploy or delete: failing a queue (WATCH, XRANGE, reply XADDs, DEL) and deleting stats;
  the cluster status (heartbeats: SCAN + GET; queues: XLEN, XPENDING, XRANGE; stats windows);
  optimisation operations (HSET + PEXPIRE in a MULTI, HGET, WATCH to fail an abandoned one).
- ``monitor``: read-only (KEDA's XLEN/XPENDING/XINFO, benchmarks' heartbeat reads).

NOTE: Redis 6.2 (the embedded one) has no ACL selectors, so a role's commands apply to all of
its key patterns (e.g. a worker may XADD to the events stream). Redis >= 7 selectors could
narrow that; the rules stay 6.2-compatible. Scripts run with the caller's permissions, so a
script's own commands are listed too. Key patterns do not restrict SCAN (it names no key).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from services.common import keys

ADMIN = "default"
"""Redis's own user: keeps every permission, behind a password (``maas up``)."""

_CONNECTION = ("hello", "ping", "client|setinfo")
"""What redis-py sends on connect (HELLO 3 AUTH, CLIENT SETINFO) and for health checks (PING).

NOTE: not ``client|maint_notifications``, which redis-py 8 also sends (and goes on without when
refused): Redis >= 7 rejects a rule naming a subcommand it lacks, and only Redis 8 has it.
``client|setinfo`` needs Redis 6.2 (any first argument) or >= 7.2 (DESIGN.md's minimum).
"""


@dataclass(frozen=True)
class Role:
    """One Redis user: the commands a service role sends and the keys it may touch."""

    name: str
    commands: tuple[str, ...]
    """Lower-case command names; ``container|subcommand`` allows one subcommand only."""
    key_patterns: tuple[str, ...]
    """Glob patterns of the keys the commands may name."""
    channel_patterns: tuple[str, ...] = ()
    """Pub/sub channel patterns (none: MaaS uses no pub/sub)."""


ROLES: dict[str, Role] = {
    role.name: role
    for role in (
        Role(
            "gateway",
            (*_CONNECTION, "eval", "xlen", "xadd", "xdel", "xtrim", "xread", "expire", "exists", "del",
             "hincrby", "hget", "hset", "hgetall", "scan", "get", "time", "hmget", "pexpire",
             "zremrangebyscore", "zcard", "zadd", "zrem", "hincrbyfloat", "set"),
            (f"{keys.QUEUE_PREFIX}*", f"{keys.REPLIES_PREFIX}*", f"{keys.STATS_PREFIX}*",
             f"{keys.WORKER_PREFIX}*", keys.EVENTS, keys.API_KEYS, keys.TENANTS, f"{keys.QUOTA_PREFIX}*",
             f"{keys.USAGE_PREFIX}*", f"{keys.GENERATION_CANCEL_PREFIX}*"),
        ),
        Role(
            "worker",
            (*_CONNECTION, "xgroup|create", "xgroup|delconsumer", "xreadgroup", "xack", "xdel", "xclaim",
             "xautoclaim", "xpending", "xlen", "xrange", "xadd", "multi", "exec", "discard", "hincrby",
             "set", "del", "xread", "xrevrange", "hget", "exists"),
            (f"{keys.QUEUE_PREFIX}*", f"{keys.DEAD_LETTER_PREFIX}*", f"{keys.REPLIES_PREFIX}*",
             f"{keys.STATS_PREFIX}*", f"{keys.WORKER_PREFIX}*", keys.EVENTS, keys.API_KEYS, f"{keys.USAGE_PREFIX}*",
             f"{keys.GENERATION_CANCEL_PREFIX}*"),
        ),
        Role(
            "registry",
            (*_CONNECTION, "evalsha", "script|load", "exists", "hset", "hget", "hgetall", "hincrby", "hvals",
             "hdel", "zadd", "zrange", "zrem", "del", "xadd", "xrange", "xdel", "multi", "exec", "discard",
             "watch", "unwatch", "hsetnx", "hexists", "xread", "xrevrange", "hkeys", "scan", "get", "xlen",
             "xpending", "pexpire"),
            (keys.MODELS, f"{keys.MODEL_PREFIX}*", keys.DEPLOYMENTS, keys.EVENTS, f"{keys.QUEUE_PREFIX}*",
             f"{keys.REPLIES_PREFIX}*", f"{keys.STATS_PREFIX}*", keys.TENANTS, keys.API_KEYS, f"{keys.USAGE_PREFIX}*",
             f"{keys.WORKER_PREFIX}*", f"{keys.OPERATION_PREFIX}*"),
        ),
        Role(
            "monitor",
            (*_CONNECTION, "scan", "get", "exists", "type", "pttl", "xlen", "xpending", "xinfo", "xrange",
             "xrevrange", "hget", "hgetall", "hvals", "zrange"),
            (f"{keys.PREFIX}*",),
        ),
    )
}  # fmt: skip
"""Every role, by user name."""

SERVICE_ROLES = {"registry": "registry", "gateway": "gateway", "inference": "worker"}
"""The role each service (``maas <service> serve``) connects as."""


def password_hash(password: str) -> str:
    """Return the SHA-256 hex digest Redis stores for ``password`` (ACL ``#<hex>``)."""
    return hashlib.sha256(password.encode()).hexdigest()


def new_passwords(names: Iterable[str] = (ADMIN, *ROLES)) -> dict[str, str]:
    """Return a fresh random password (``secrets.token_urlsafe(32)``) for each user name."""
    return {name: secrets.token_urlsafe(32) for name in names}


def role_rules(role: Role, password: str) -> list[str]:
    """Return the ACL rules of ``role`` with ``password`` (stored hashed), for SETUSER or a file.

    Channels are reset explicitly: Redis 6.2 grants every channel by default, 7.x none.
    """
    return [
        "on",
        f"#{password_hash(password)}",
        "resetchannels",
        *(f"&{pattern}" for pattern in role.channel_patterns),
        *(f"~{pattern}" for pattern in role.key_patterns),
        "-@all",
        *(f"+{command}" for command in role.commands),
    ]


def admin_rules(password: str) -> list[str]:
    """Return the rules of the default user: every permission, behind ``password``."""
    return ["on", f"#{password_hash(password)}", "~*", "&*", "+@all"]


def setuser_commands(passwords: Mapping[str, str]) -> list[list[str]]:
    """Return one ``ACL SETUSER`` command per role that has a password in ``passwords``.

    Each starts with ``reset``, so running them again replaces the users' rules. The default
    user is left alone (an external Redis keeps its own administration).
    """
    return [["ACL", "SETUSER", role.name, "reset", *role_rules(role, passwords[role.name])]
            for role in ROLES.values() if role.name in passwords]  # fmt: skip


def acl_file(passwords: Mapping[str, str]) -> str:
    """Return ``users.acl`` text for the roles in ``passwords`` (and the default user, if given).

    Without a ``default`` password the file locks the default user out (``off``, no rights):
    then only the role users can log in.
    """
    lines = [f"user {role.name} {' '.join(role_rules(role, passwords[role.name]))}"
             for role in ROLES.values() if role.name in passwords]  # fmt: skip
    admin = passwords.get(ADMIN)
    lines.append(f"user {ADMIN} {' '.join(admin_rules(admin) if admin else ['off', 'resetpass', '-@all'])}")
    return "\n".join(lines) + "\n"


def role_url(base_url: str, user: str, password: str) -> str:
    """Return ``base_url`` (``redis://host:port/db``) with ``user`` and ``password`` in it."""
    parts = urlsplit(base_url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """Return ``url`` with its password (if any) replaced by ``***``, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urlunsplit((parts.scheme, f"{name}:***@{host}", parts.path, parts.query, parts.fragment))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable and writable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def read_passwords(path: Path) -> dict[str, str]:
    """Read ``user=password`` lines (``#`` comments and blank lines skipped)."""
    passwords = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, password = line.partition("=")
            passwords[name.strip()] = password.strip()
    return passwords


def write_passwords(path: Path, passwords: Mapping[str, str]) -> None:
    """Write ``user=password`` lines to ``path`` with mode 0600 (``kubectl --from-env-file``)."""
    write_private(path, "".join(f"{name}={password}\n" for name, password in passwords.items()))
