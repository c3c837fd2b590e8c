"""Redis access shared by the services: one client factory and one error translation.

Why the client is not plain ``Redis.from_url`` (redis-py 8.1, measured across graceful Redis
restarts under load):

- ``from_url`` gives every connection ``Retry(NoBackoff(), 0)``: a command on a pooled
  connection that the old server closed fails once, even though Redis is back.
- redis-py 8 speaks RESP3 by default and then turns maintenance notifications on ("auto");
  with them on, ``ConnectionPool.ensure_connection`` skips its check for a connection the
  server closed, so such a connection is handed out and its next command fails.
- asyncio keeps a socket open after the peer's FIN (``StreamReaderProtocol.eof_received``
  returns true), and an idle pooled connection is only looked at when it is used again: the
  connections a burst left in the pool stay in CLOSE_WAIT after a restart, forever.

So: one retry on a fresh connection after a connection error (at-least-once, see DESIGN.md),
a socket is closed as soon as the server closes its end, a dead connection is never handed
out, and connections idle for longer than ``max_idle_s`` are closed.

Redis behind Sentinels (a ``redis+sentinel://`` URL, docs/redis.md): redis-py's
``Sentinel.master_for`` pool, which asks the Sentinels for the master on every new connection.

Redis Cluster (``cluster=True``, docs/redis.md): the client is redis-py's ``RedisCluster``
(slot routing, MOVED/ASK, topology refresh are its own), returned typed as ``Redis`` because
every command MaaS uses has the same signature on both. ``send_commands`` then groups its
commands by the node that owns each command's slot (a MULTI block goes whole to its first
keyed command's slot) and makes one raw exchange per node, concurrently.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from prometheus_client import Counter
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.crc import key_slot

from services.common.errors import Unavailable

log = structlog.get_logger(__name__)

MAX_IDLE_S = 30.0
"""Close a pooled connection unused for this long (the pool shrinks back after a burst)."""

_SWEEP_INTERVAL_S = 1.0
"""How often a pool in use looks through its idle connections."""

_RETRIES = 1

REDIS_ERRORS = Counter(
    "maas_redis_errors",
    "Redis errors caught by this process, by redis-py exception class (ConnectionError, TimeoutError, ...).",
    ["error"],
)

_HIREDIS_PACKER = HiredisRespSerializer()
"""redis-py's own hiredis command packer (its sync client's; the asyncio one packs in Python)."""
"""Retries of a command after a connection error, each on a freshly opened connection."""


def create_redis(
    url: str, timeout_s: float, *, max_idle_s: float = MAX_IDLE_S, cluster: bool = False
) -> aioredis.Redis:
    """Return an asyncio Redis client (bytes replies) with bounded connect and command times.

    A command that fails with a connection error (the server closed or reset the connection,
    or refused a new one) is sent once more on a new connection, so a command may run twice.
    A timeout is not retried: every connect, write and read is bounded by ``timeout_s`` and
    there is one retry at most, so a call ends within a few ``timeout_s`` (at once when Redis
    refuses connections).

    Args:
        url: A ``redis://`` or ``rediss://`` URL, or
            ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/db]``:
            the master that those Sentinels name (found again after a failover).
        timeout_s: Connect and command timeout; blocking reads must block for less.
        max_idle_s: Close pooled connections unused for this long.
        cluster: ``url`` names any node of a Redis Cluster: return a ``RedisCluster``.
    """
    if cluster:
        return _create_cluster(url, timeout_s)
    if url.startswith(SENTINEL_SCHEME):
        return _create_sentinel_client(url, timeout_s)
    pool = _Pool.from_url(url, **_connection_options(timeout_s), max_connections=256, max_idle_s=max_idle_s)
    return aioredis.Redis.from_pool(pool)


def _connection_options(timeout_s: float) -> dict[str, Any]:
    """Timeouts, health checks and retries of every connection, whatever the mode."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 15,
        "retry": Retry(NoBackoff(), _RETRIES, supported_errors=(redis.exceptions.ConnectionError,)),
    }


SENTINEL_SCHEME = "redis+sentinel://"
"""URL scheme of a Redis behind Sentinels (redis-py has no URL form for it; ``create_redis``)."""


def _create_sentinel_client(url: str, timeout_s: float) -> aioredis.Redis:
    parts = urlsplit(url)
    path = [part for part in parts.path.split("/") if part]
    if not path or not parts.netloc:
        raise ValueError(f"expected {SENTINEL_SCHEME}host:port[,host:port...]/<master name>[/db], got {url!r}")
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = [(host, int(port or 26379)) for host, _, port in (item.partition(":") for item in hosts.split(","))]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels,
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
        **_connection_options(timeout_s),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=int(path[1]) if len(path) > 1 else 0,
    )
    return cast(aioredis.Redis, sentinel.master_for(path[0], connection_pool_class=_SentinelPool))


class _SentinelPool(SentinelConnectionPool):
    """The master's pool; closing it also closes the connections to the Sentinels."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Disconnect from the master and from the Sentinels."""
        await super().disconnect(inuse_connections)
        for client in self.sentinel_manager.sentinels:
            await client.aclose()


def _create_cluster(url: str, timeout_s: float) -> aioredis.Redis:
    client = RedisCluster.from_url(url, **_connection_options(timeout_s), max_connections=256)
    # NOTE: not a Redis subclass, but every command MaaS sends has the same signature on both
    # (the services are typed against Redis; is_cluster tells the few places that differ).
    return cast(aioredis.Redis, client)


def is_cluster(client: aioredis.Redis) -> bool:
    """Whether ``client`` talks to a Redis Cluster (``create_redis(..., cluster=True)``)."""
    return isinstance(client, RedisCluster)


def _closed_by_server(connection: AbstractConnection) -> bool:
    """Whether a connected connection's socket saw EOF or an error, or is being closed."""
    reader, writer = connection._reader, connection._writer
    if reader is None or writer is None:
        return False
    return reader.at_eof() or reader.exception() is not None or writer.transport.is_closing()


def _has_unread_data(connection: AbstractConnection) -> bool:
    """Whether bytes the server sent are still waiting to be read (a command not read to its end).

    What redis-py's ``can_read`` finds, without its read attempt: the parser's buffer and the
    stream's (asyncio moves what the socket holds into the stream before any task runs).
    """
    reader, parser = connection._reader, connection._parser
    if reader is not None and reader._buffer:  # type: ignore[attr-defined]
        return True
    hiredis_reader = getattr(parser, "_reader", None)
    return isinstance(hiredis_reader, hiredis.Reader) and bool(hiredis_reader.has_data())


class _Pool(ConnectionPool):
    """A connection pool that never hands out, nor keeps, a connection the server closed."""

    def __init__(self, *, max_idle_s: float = MAX_IDLE_S, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_idle_s = max_idle_s
        self._idle_since: weakref.WeakKeyDictionary[AbstractConnection, float] = weakref.WeakKeyDictionary()
        self._sweeper: asyncio.Task[None] | None = None

    def make_connection(self) -> AbstractConnection:
        """Create a connection whose socket closes when the server closes its end."""
        connection: AbstractConnection = super().make_connection()  # type: ignore[no-untyped-call]
        connection.register_connect_callback(self._on_connect)  # type: ignore[no-untyped-call]
        # NOTE: redis-py's asyncio connection packs commands in Python (its sync one uses
        # hiredis): a tenth of the gateway's and the worker's time per call went there.
        connection.pack_command = _HIREDIS_PACKER.pack  # type: ignore[method-assign,assignment]
        return connection

    def _on_connect(self, connection: AbstractConnection) -> None:
        # NOTE: asyncio's StreamReaderProtocol answers the peer's FIN with "keep open" (for
        # half-closed writers), which leaves the socket in CLOSE_WAIT until redis-py touches
        # the connection again. Redis never half-closes: close the transport on EOF instead
        # (the documented Protocol.eof_received contract); buffered replies stay readable.
        writer = connection._writer
        if writer is None:
            return
        protocol = writer.transport.get_protocol()
        if not isinstance(protocol, asyncio.Protocol):
            return
        eof_received = protocol.eof_received

        def close_on_eof() -> bool:
            eof_received()
            return False

        protocol.eof_received = close_on_eof  # type: ignore[method-assign]

    # NOTE: get_connection, ensure_connection and release replace redis-py's (8.1), which take an
    # asyncio.Lock (nothing awaits between taking a connection and marking it in use), record
    # OpenTelemetry gauges MaaS does not turn on, dispatch a release event for credential
    # providers it does not use, and look for unread data with a read under a zero timeout.
    # Together 4-5 % of the gateway's CPU at 32 clients, for one round trip per enqueue.

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AbstractConnection:
        """Get a connected, live connection (and make sure idle ones are looked after).

        Raises:
            MaxConnectionsError: ``max_connections`` are in use.
        """
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(
                _sweep_every(weakref.ref(self)), name="redis-pool-sweeper", context=contextvars.Context()
            )
        try:
            connection = self._available_connections.pop()
        except IndexError:
            if len(self._in_use_connections) >= self.max_connections:
                raise redis.exceptions.MaxConnectionsError("Too many connections") from None
            connection = self.make_connection()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        """Connect ``connection``, afresh if the server closed it or a reply was left unread."""
        if _closed_by_server(connection) or _has_unread_data(connection):
            await connection.disconnect(nowait=True)
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]

    async def release(self, connection: AbstractConnection) -> None:
        """Return a connection to the pool and note when it went idle."""
        self._idle_since[connection] = asyncio.get_running_loop().time()
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():  # type: ignore[no-untyped-call]
            await connection.disconnect()
        self._available_connections.append(connection)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Disconnect the pool's connections and stop looking after idle ones until the next use."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper is not asyncio.current_task():
            sweeper.cancel()
            await asyncio.wait([sweeper])
        await super().disconnect(inuse_connections)

    async def sweep(self) -> None:
        """Drop the idle connections that are closed, dead, or unused for ``max_idle_s``."""
        now = asyncio.get_running_loop().time()
        async with self._lock:
            idle = self._available_connections
            closing = [
                connection
                for connection in idle
                if not connection.is_connected
                or _closed_by_server(connection)
                or now - self._idle_since.get(connection, now) > self._max_idle_s
            ]
            if not closing:
                return
            idle[:] = [connection for connection in idle if connection not in closing]
        # NOTE: shielded: these connections already left the pool, a cancelled sweep must not
        # leave their sockets open.
        await asyncio.shield(_disconnect_all(closing))


async def _sweep_every(pool_ref: weakref.ref[_Pool]) -> None:
    # NOTE: a weak reference, so that a client dropped without aclose() is still collected.
    while True:
        await asyncio.sleep(_SWEEP_INTERVAL_S)
        pool = pool_ref()
        if pool is None:
            return
        try:
            await pool.sweep()
        except Exception as exc:  # a supervised loop: log and go on
            log.warning("redis_pool_sweep_failed", error=str(exc))
        del pool


async def _disconnect_all(connections: list[AbstractConnection]) -> None:
    await asyncio.gather(*(c.disconnect(nowait=True) for c in connections), return_exceptions=True)


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate Redis connectivity errors into ``Unavailable`` naming ``what`` failed.

    Raises:
        Unavailable: Redis could not be reached or timed out.
    """
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        count_redis_error(exc)
        raise Unavailable(f"{what}: redis unreachable") from exc


def count_redis_error(exc: BaseException) -> None:
    """Count ``exc`` in ``maas_redis_errors_total`` if it is a Redis error (others are ignored)."""
    if isinstance(exc, redis.exceptions.RedisError):
        REDIS_ERRORS.labels(error=type(exc).__name__).inc()


async def send_commands(
    client: aioredis.Redis,
    commands: Sequence[Sequence[Any]],
    *,
    early: int = 0,
    on_early: Callable[[list[Any]], None] | None = None,
) -> list[Any]:
    """Send ``commands`` in one write on one pooled connection and return their raw replies.

    The request path's round trips use this instead of redis-py's ``Pipeline``, whose per-call
    machinery (response callbacks, retry wrapper, instrumentation) cost about 100 µs a round
    trip here, more than the round trip itself. Replies are as hiredis parses them (RESP3 maps,
    flat field lists: see ``queue.stream_entries``); an error reply is returned as its
    ``ResponseError``, in place; a connection error is retried once on a fresh connection (the
    commands may then run twice: at-least-once, as everywhere in MaaS).

    ``on_early`` is called with the first ``early`` replies as soon as they are read, before the
    others: commands followed by a blocking read learn their outcome without waiting for it (again
    after a retry; on a Redis Cluster, once every reply is in).

    Raises:
        redis.exceptions.ConnectionError: Redis could not be reached, twice.
        redis.exceptions.TimeoutError: A reply took longer than the client's socket timeout.
    """
    if isinstance(client, RedisCluster):
        replies = await _send_by_node(client, commands)
        if on_early is not None:
            on_early(replies[:early])
        return replies
    pool = client.connection_pool
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]

    async def exchange() -> list[Any]:
        return await _exchange(connection, commands, early, on_early)

    async def drop(_error: Exception) -> None:
        await connection.disconnect(nowait=True)  # the retry reconnects it

    try:
        # NOTE: the pool's own retry policy (see create_redis), as redis-py's commands use it.
        result: list[Any] = await connection.retry.call_with_retry(exchange, drop)
        return result
    except BaseException:
        # NOTE: a reply half read (timeout, cancellation) leaves the connection unusable.
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


def _packed(command: Sequence[Any]) -> bytes:
    """One command in RESP, packed by hiredis (a multi-word name such as "CLIENT LIST" split).

    ``_HIREDIS_PACKER.pack`` does the same through a generator and a list per command: too dear
    on the request path, where a worker's MULTI packs 17 commands.
    """
    name = command[0]
    args = (*name.split(), *command[1:]) if isinstance(name, str) and " " in name else tuple(command)
    packed: bytes = hiredis.pack_command(args)
    return packed


async def _exchange(
    connection: AbstractConnection,
    commands: Sequence[Sequence[Any]],
    early: int = 0,
    on_early: Callable[[list[Any]], None] | None = None,
) -> list[Any]:
    """Write ``commands`` in one go and read their replies (errors in place).

    With hiredis (a dependency), straight through the connection's parser: what redis-py's
    ``send_packed_command`` + ``read_response`` do, minus their costs per reply (a timeout
    context, a task for the write's timeout, its checks; a worker's MULTI has 17 replies):
    measured here on that MULTI, 430 -> 240 µs a round trip and 300 -> 160 µs of CPU. One
    timeout bounds the whole exchange, and the errors raised are redis-py's, so the retry and
    the pool treat them as before.
    """
    parser = connection._parser
    if not isinstance(parser, _AsyncHiredisParser):
        await connection.send_packed_command(connection.pack_commands(commands))
        return await _read_replies(lambda: _read_reply(connection), len(commands), early, on_early)
    if not connection.is_connected:
        await connection.connect()  # type: ignore[no-untyped-call]
    await connection.check_health()  # type: ignore[no-untyped-call]
    writer = connection._writer
    assert writer is not None
    try:
        async with asyncio.timeout(connection.socket_timeout):
            writer.writelines([_packed(command) for command in commands])
            await writer.drain()
            replies = await _read_replies(parser.read_response, len(commands), early, on_early)
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise redis.exceptions.TimeoutError("Timeout in an exchange with redis") from None
    except OSError as exc:
        await connection.disconnect(nowait=True)
        raise redis.exceptions.ConnectionError(f"Error in an exchange with redis: {exc}") from exc
    if connection.health_check_interval:
        connection.next_health_check = asyncio.get_running_loop().time() + connection.health_check_interval
    return replies


async def _read_replies(
    read: Callable[[], Awaitable[Any]], count: int, early: int, on_early: Callable[[list[Any]], None] | None
) -> list[Any]:
    """Read ``count`` replies with ``read``, handing the first ``early`` to ``on_early`` before the rest."""
    first = [await read() for _index in range(min(early, count))]
    if on_early is not None:
        on_early(first)
    return first + [await read() for _index in range(count - len(first))]


async def _read_reply(connection: AbstractConnection) -> Any:
    try:
        return await connection.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc


_Unit = list[int]
"""Indexes into ``send_commands``' commands that must go to one node together (a MULTI block)."""

_REDIRECTS = 2
"""Times a unit is re-sent after a MOVED reply (a failover moved its slot to another node)."""


def _command_key(command: Sequence[Any]) -> Any:
    """The key that routes ``command`` (its first key), or None for a command without one."""
    name = str(command[0]).upper() if command else ""
    if name in ("EVAL", "EVALSHA"):
        return command[3] if int(command[2]) > 0 else None
    if name in ("XREAD", "XREADGROUP"):
        words = [str(word).upper() for word in command]
        return command[words.index("STREAMS") + 1]
    if name in ("MULTI", "EXEC", "DISCARD", "TIME", "PING") or len(command) < 2:
        return None
    return command[1]


def command_slot(command: Sequence[Any]) -> int | None:
    """The cluster hash slot ``command`` goes to (its first key's), None for a command without a key."""
    key = _command_key(command)
    return None if key is None else key_slot(key if isinstance(key, bytes) else str(key).encode())


def _units(commands: Sequence[Sequence[Any]]) -> list[tuple[_Unit, Any]]:
    """Split ``commands`` into units (one command, or MULTI ... EXEC) with the key that routes each."""
    units: list[tuple[_Unit, Any]] = []
    block: _Unit | None = None
    for index, command in enumerate(commands):
        name = str(command[0]).upper()
        if name == "MULTI":
            block = []
        if block is None:
            units.append(([index], _command_key(command)))
            continue
        block.append(index)
        if name in ("EXEC", "DISCARD"):
            key = next((k for k in (_command_key(commands[i]) for i in block) if k is not None), None)
            units.append((block, key))
            block = None
    if block is not None:
        units.append((block, None))
    return units


async def _send_by_node(client: RedisCluster, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``send_commands`` on a cluster: one exchange per node, re-sending units that were MOVED."""
    await client.initialize()
    replies: list[Any] = [None] * len(commands)
    todo = _units(commands)
    for attempt in range(_REDIRECTS + 1):
        by_node: dict[ClusterNode, list[tuple[_Unit, Any]]] = {}
        for unit, key in todo:
            by_node.setdefault(_node_of(client, key), []).append((unit, key))
        exchanged = await asyncio.gather(
            *(_exchange_on(node, [commands[i] for unit, _ in units for i in unit]) for node, units in by_node.items())
        )
        todo = []
        for units, node_replies in zip(by_node.values(), exchanged, strict=True):
            flat = iter(node_replies)
            for unit, key in units:
                unit_replies = [next(flat) for _ in unit]
                moved = next((r for r in unit_replies if isinstance(r, redis.exceptions.MovedError)), None)
                if moved is not None and attempt < _REDIRECTS:
                    # NOTE: a MOVED command did not run (nor did its MULTI block): safe to re-send.
                    await client.nodes_manager.move_slot(moved)
                    todo.append((unit, key))
                    continue
                for index, reply in zip(unit, unit_replies, strict=True):
                    replies[index] = reply
        if not todo:
            break
    return replies


def _node_of(client: RedisCluster, key: Any) -> ClusterNode:
    if key is None:
        return client.get_default_node()
    return client.nodes_manager.get_node_from_slot(client.keyslot(key))


async def _exchange_on(node: ClusterNode, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """One write of ``commands`` to ``node`` and their replies (errors in place), as ``send_commands``."""
    for attempt in range(_RETRIES + 1):
        connection = node.acquire_connection()
        try:
            return await _exchange(connection, commands)
        except redis.exceptions.ConnectionError:
            await connection.disconnect(nowait=True)
            if attempt == _RETRIES:
                raise
        except BaseException:
            await connection.disconnect(nowait=True)  # a reply half read leaves it unusable
            raise
        finally:
            node.release(connection)
    raise AssertionError("unreachable")
