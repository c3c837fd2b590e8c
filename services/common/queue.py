"""The data-plane wire format between gateways and inference workers (Redis Streams).

A request entry goes to the model version's queue stream (``keys.queue``); its reply goes to
the gateway's reply stream (``keys.replies``), or straight to the gateway over its reply
listener when the entry names one (``reply_addr``: ``services.gateway.direct_replies``; the
frames are below). Tensor bytes travel inside the serialized ``ModelInferRequest``/
``ModelInferResponse`` untouched.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ENQUEUE_MANY_LUA = """
-- KEYS[1]: queue stream; with a tenant quota also KEYS[2]: the tenant's token bucket (hash:
-- tokens, at_ms) and KEYS[3]: its calls in flight (sorted set: '<reply stream>:<call id>' scored
-- by the call's deadline in epoch ms, so a crashed gateway's calls expire by themselves).
-- ARGV[1]: max queue length; ARGV[2]: reply stream of every entry; ARGV[3]: tenant ('': none);
-- ARGV[4]: requests/s (0: no rate limit); ARGV[5]: burst; ARGV[6]: max in flight (0: no cap);
-- ARGV[7]: the gateway's reply listener of every entry ('': none);
-- ARGV[8..]: the entries, 5 values each: id, deadline_ms, rid, req, traceparent ('': none)
-- (QueuedRequest's fields).
-- Returns one reply per entry: its stream id; 0 when the queue was full; {1, wait ms} when the
-- tenant's bucket was empty; {2, calls in flight} at the tenant's cap. The queue length, the
-- bucket and the in-flight count are checked before each XADD, atomically with it (trimming
-- with MAXLEN would drop unread requests); a refused entry takes nothing.
-- With 2 KEYS, the bucket and the in-flight set alone (Redis Cluster: the tenant's slot is not
-- the queue's), the quota is taken and nothing is queued: an admitted entry's reply is 1.
local queue = #KEYS ~= 2 and KEYS[1]
local bucket, flight = KEYS[#KEYS - 1], KEYS[#KEYS]
local limit = tonumber(ARGV[1])
local length = queue and redis.call('XLEN', queue) or 0
local rate, burst, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, tokens, in_flight
if #KEYS >= 2 then
  redis.replicate_commands()  -- Redis 6.2: TIME before writes needs effects replication
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  if rate > 0 then
    local saved = redis.call('HMGET', bucket, 'tokens', 'at_ms')
    local at = tonumber(saved[2]) or now
    tokens = math.min(burst, (tonumber(saved[1]) or burst) + math.max(0, now - at) * rate / 1000)
  end
  if cap > 0 then
    redis.call('ZREMRANGEBYSCORE', flight, '-inf', now)
    in_flight = redis.call('ZCARD', flight)
  end
end
local ids = {}
for first = 8, #ARGV, 5 do
  if length >= limit then
    ids[#ids + 1] = 0
  elseif tokens and tokens < 1 then
    ids[#ids + 1] = {1, math.ceil((1 - tokens) * 1000 / rate)}
  elseif in_flight and in_flight >= cap then
    ids[#ids + 1] = {2, in_flight}
  elseif not queue then
    ids[#ids + 1] = 1
  else
    local fields = {'id', ARGV[first], 'reply', ARGV[2], 'deadline_ms', ARGV[first + 1], 'rid', ARGV[first + 2],
      'req', ARGV[first + 3]}
    if ARGV[3] ~= '' then
      fields[#fields + 1] = 'tenant'
      fields[#fields + 1] = ARGV[3]
    end
    if ARGV[first + 4] ~= '' then
      fields[#fields + 1] = 'traceparent'
      fields[#fields + 1] = ARGV[first + 4]
    end
    if ARGV[7] ~= '' then
      fields[#fields + 1] = 'raddr'
      fields[#fields + 1] = ARGV[7]
    end
    ids[#ids + 1] = redis.call('XADD', queue, '*', unpack(fields))
    length = length + 1
  end
  if ids[#ids] ~= 0 and type(ids[#ids]) ~= 'table' then
    if tokens then tokens = tokens - 1 end
    if in_flight then
      redis.call('ZADD', flight, ARGV[first + 1], ARGV[2] .. ':' .. ARGV[first])
      in_flight = in_flight + 1
    end
  end
end
if tokens then
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at_ms', now)
  redis.call('PEXPIRE', bucket, math.ceil(burst * 1000 / rate) + 1000)
end
return ids
"""
"""Admission script: enqueue several entries to one queue, each unless the queue is full or the
tenant's quota (token bucket, in-flight cap) says no (or, with the quota's keys alone, take the
quota of each: ``services.gateway.admission`` on a Redis Cluster)."""


Entry = tuple[bytes, dict[bytes, bytes]]
"""One stream entry: its id and fields."""


def stream_entries(reply: Any) -> list[Entry]:
    """Flatten an XREAD/XREADGROUP reply: RESP2 ``[[stream, entries]]``, RESP3 ``{stream: entries}``, or None.

    Fields come as a dict (redis-py's parsing), a flat ``[name, value, ...]`` list (the raw
    reply), or None (an entry deleted while pending): the result always holds a dict.
    """
    streams = reply.items() if isinstance(reply, dict) else reply or []
    return [(entry_id, _field_dict(fields)) for _stream, entries in streams for entry_id, fields in entries]


def _field_dict(fields: Any) -> dict[bytes, bytes]:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {}


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (deadlines cross processes and hosts)."""
    return int(time.time() * 1000)


class MalformedEntry(ValueError):
    """A stream entry lacks a field or has one of the wrong type."""


def _text(fields: dict[bytes, bytes], key: bytes) -> str:
    try:
        return fields[key].decode()
    except (KeyError, UnicodeDecodeError) as exc:
        raise MalformedEntry(f"field {key.decode()} missing or not UTF-8") from exc


def _int(fields: dict[bytes, bytes], key: bytes) -> int:
    try:
        return int(fields[key])
    except (KeyError, ValueError) as exc:
        raise MalformedEntry(f"field {key.decode()} missing or not an integer") from exc


@dataclass(frozen=True)
class QueuedRequest:
    """One inference request waiting in a model version's queue."""

    id: str
    """Unique id of this call, chosen by the gateway; the reply carries it back."""
    reply_to: str
    """Reply stream key of the gateway that waits for it."""
    deadline_ms: int
    """Absolute deadline, epoch ms: after it nobody waits for the reply."""
    payload: bytes
    """Serialized ``inference.ModelInferRequest``."""
    request_id: str = ""
    """The caller's request id (``x-request-id``), for logs."""
    tenant: str = ""
    """The calling key's tenant ('' when the gateway checks no keys), for per-tenant usage."""
    traceparent: str = ""
    """The W3C trace context of the gateway's span ('' when not traced), parent of the worker's spans."""
    reply_addr: str = ""
    """The gateway's reply listener, ``host:port/token`` ('' when it has none): replies go there
    first, and to ``reply_to`` when it cannot be reached (``services.gateway.direct_replies``)."""

    def enqueue_args(self) -> tuple[str, int, str, bytes, str]:
        """Return this entry's values as ``ENQUEUE_MANY_LUA`` takes them (after its reply stream)."""
        return self.id, self.deadline_ms, self.request_id, self.payload, self.traceparent

    def to_fields(self) -> dict[str, bytes | str | int]:
        """Return the stream entry's fields (``tenant``, ``traceparent`` only when set, as the script writes them)."""
        fields: dict[str, bytes | str | int] = {
            "id": self.id,
            "reply": self.reply_to,
            "deadline_ms": self.deadline_ms,
            "rid": self.request_id,
            "req": self.payload,
        }
        if self.tenant:
            fields["tenant"] = self.tenant
        if self.traceparent:
            fields["traceparent"] = self.traceparent
        if self.reply_addr:
            fields["raddr"] = self.reply_addr
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> QueuedRequest:
        """Parse a stream entry.

        Raises:
            MalformedEntry: A field is missing or malformed.
        """
        if b"req" not in fields:
            raise MalformedEntry("field req missing")
        return cls(
            id=_text(fields, b"id"),
            reply_to=_text(fields, b"reply"),
            deadline_ms=_int(fields, b"deadline_ms"),
            payload=fields[b"req"],
            request_id=fields.get(b"rid", b"").decode(errors="replace"),
            tenant=fields.get(b"tenant", b"").decode(errors="replace"),
            traceparent=fields.get(b"traceparent", b"").decode(errors="replace"),
            reply_addr=fields.get(b"raddr", b"").decode(errors="replace"),
        )


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one ``QueuedRequest``."""

    id: str
    code: int
    """gRPC status code value; 0 (OK) means ``payload`` holds the response."""
    message: str = ""
    payload: bytes = b""
    """Serialized ``inference.ModelInferResponse`` when ``code`` is 0 (a partial reply: on the final one only)."""
    seq: int = -1
    """A generation's partial reply (``services.common.generation``): the index of its token; -1: a whole reply."""
    attempt: int = 0
    """A partial reply's delivery of the queue entry that produced it (1: the first)."""
    piece: bytes = b""
    """A partial reply's text (UTF-8): its token's piece of the generated text."""
    is_final: bool = False
    """Whether this partial reply is the generation's last."""
    finish_reason: str = ""
    """A final partial reply's reason (``services.common.generation.FINISH_*``)."""

    def to_fields(self) -> dict[str, bytes | str | int]:
        """Return the stream entry's fields (a partial reply's only when it is one)."""
        fields: dict[str, bytes | str | int] = {
            "id": self.id,
            "code": self.code,
            "msg": self.message,
            "resp": self.payload,
        }
        if self.seq >= 0:
            fields.update(
                seq=self.seq, att=self.attempt, piece=self.piece, fin=int(self.is_final), why=self.finish_reason
            )
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Reply:
        """Parse a reply stream entry.

        Raises:
            MalformedEntry: A field is missing or malformed.
        """
        return cls(
            id=_text(fields, b"id"),
            code=_int(fields, b"code"),
            message=fields.get(b"msg", b"").decode(errors="replace"),
            payload=fields.get(b"resp", b""),
            seq=_int(fields, b"seq") if b"seq" in fields else -1,
            attempt=_int(fields, b"att") if b"att" in fields else 0,
            piece=fields.get(b"piece", b""),
            is_final=fields.get(b"fin") == b"1",
            finish_reason=fields.get(b"why", b"").decode(errors="replace"),
        )


# The reply listener's frames (``services.gateway.direct_replies``), on one connection (TCP, or
# a Unix socket on the gateway's host) per worker and gateway:
# - the worker opens with HELLO + the token's length (u16) + the token; the gateway answers
#   WELCOME, or closes the connection (wrong token);
# - then each frame is a count (u32) of replies, each a header (``_REPLY_HEADER``: id length,
#   gRPC code, message length, payload length) and those three fields' bytes;
# - the gateway answers each frame with one ACK byte, in order, once its replies reached the
#   calls waiting for them (or were dropped as late): only then may the worker ack the entries.
HELLO = b"MAAS-REPLIES/1 "
WELCOME = b"+"
ACK = b"."
_TOKEN_LENGTH = struct.Struct("<H")
MAX_TOKEN_BYTES = 256
_COUNT = struct.Struct("<I")
_REPLY_HEADER = struct.Struct("<HBII")
MAX_FRAME_REPLIES = 65_536
"""Most replies one frame may hold (a batch holds at most a deployment's max_batch_size)."""


class FrameError(ValueError):
    """A reply frame that breaks the format or the gateway's limits."""


@dataclass(frozen=True)
class ReplyAddress:
    """Where a gateway's reply listener is: what its queue entries carry (``reply_addr``).

    ``host:port/token`` (IPv6 hosts in brackets), then ``;path@hostname`` when the listener also
    binds a Unix socket: a worker on that host connects there, for about half the CPU per frame.
    """

    host: str
    port: int
    token: bytes
    socket_path: str = ""
    socket_host: str = ""
    """The host name (``socket.gethostname``) whose processes can reach ``socket_path``."""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        local = f";{self.socket_path}@{self.socket_host}" if self.socket_path else ""
        return f"{host}:{self.port}/{self.token.decode()}{local}"

    @classmethod
    def parse(cls, text: str) -> ReplyAddress:
        """Read an address ``str`` wrote.

        Raises:
            ValueError: It is not of that form.
        """
        location, _slash, rest = text.partition("/")
        token, semicolon, local = rest.partition(";")
        host, _colon, port = location.rpartition(":")
        path, _at, socket_host = local.rpartition("@")
        if not host or not token or not port.isdigit() or (semicolon and not (path and socket_host)):
            raise ValueError(f"reply address {text!r} is not host:port/token[;path@hostname]")
        return cls(host.strip("[]"), int(port), token.encode(), path, socket_host)

    def local_socket(self) -> str:
        """The Unix socket to use from this host ('': none, or the listener is on another host)."""
        return self.socket_path if self.socket_path and self.socket_host == socket.gethostname() else ""


def hello(token: bytes) -> bytes:
    """A worker's first bytes on a reply connection: HELLO, the token's length, the token."""
    return HELLO + _TOKEN_LENGTH.pack(len(token)) + token


async def read_hello(reader: asyncio.StreamReader) -> bytes:
    """The token a connection opened with (``hello``); b'' when it did not open with HELLO, or its token is too long.

    Raises:
        asyncio.IncompleteReadError: The connection closed first.
    """
    opening = await reader.readexactly(len(HELLO) + _TOKEN_LENGTH.size)
    (length,) = _TOKEN_LENGTH.unpack(opening[len(HELLO) :])
    if not opening.startswith(HELLO) or length > MAX_TOKEN_BYTES:
        return b""
    return await reader.readexactly(length)


def pack_replies(replies: Sequence[Reply]) -> list[bytes]:
    """One frame of whole replies (not a generation's partial ones), as parts for ``writelines``."""
    parts = [_COUNT.pack(len(replies))]
    for reply in replies:
        assert reply.seq < 0, "a generation's partial replies go through the reply stream, in order"
        reply_id, message = reply.id.encode(), reply.message.encode()
        parts += [_REPLY_HEADER.pack(len(reply_id), reply.code, len(message), len(reply.payload)), reply_id, message]
        parts.append(reply.payload)
    return parts


async def read_replies(reader: asyncio.StreamReader, max_payload_bytes: int) -> list[Reply]:
    """Read one frame (``pack_replies``).

    Raises:
        FrameError: Too many replies, or one larger than ``max_payload_bytes``.
        asyncio.IncompleteReadError: The connection closed in the middle of a frame (or before it).
    """
    (count,) = _COUNT.unpack(await reader.readexactly(_COUNT.size))
    if count > MAX_FRAME_REPLIES:
        raise FrameError(f"a frame of {count} replies, more than {MAX_FRAME_REPLIES}")
    replies = []
    for _ in range(count):
        id_length, code, message_length, payload_length = _REPLY_HEADER.unpack(
            await reader.readexactly(_REPLY_HEADER.size)
        )
        if payload_length > max_payload_bytes or message_length > max_payload_bytes:
            raise FrameError(f"a reply of {payload_length} bytes, more than this gateway's {max_payload_bytes}")
        body = await reader.readexactly(id_length + message_length + payload_length)
        try:
            reply_id = body[:id_length].decode()
            message = body[id_length : id_length + message_length].decode(errors="replace")
        except UnicodeDecodeError as exc:
            raise FrameError("a reply id that is not UTF-8") from exc
        replies.append(Reply(id=reply_id, code=code, message=message, payload=body[id_length + message_length :]))
    return replies
