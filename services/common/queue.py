"""The data-plane wire format between gateways and inference workers (Redis Streams).

A request entry goes to the model version's queue stream (``keys.queue``); its reply goes to
the gateway's reply stream (``keys.replies``). Tensor bytes travel inside the serialized
``ModelInferRequest``/``ModelInferResponse`` untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

ENQUEUE_MANY_LUA = """
-- KEYS[1]: queue stream; ARGV[1]: max queue length; ARGV[2]: reply stream of every entry;
-- ARGV[3..]: the entries, 4 values each: id, deadline_ms, rid, req (QueuedRequest's fields).
-- Returns one reply per entry: its stream id, or 0 when the queue was full. The length is
-- checked before each XADD, atomically with it: trimming with MAXLEN would drop unread requests.
local limit = tonumber(ARGV[1])
local length = redis.call('XLEN', KEYS[1])
local ids = {}
for first = 3, #ARGV, 4 do
  if length >= limit then
    ids[#ids + 1] = 0
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'id', ARGV[first], 'reply', ARGV[2],
      'deadline_ms', ARGV[first + 1], 'rid', ARGV[first + 2], 'req', ARGV[first + 3])
    length = length + 1
  end
end
return ids
"""
"""Admission script: enqueue several entries to one queue, each unless the queue is full."""


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

    def enqueue_args(self) -> tuple[str, int, str, bytes]:
        """Return this entry's values as ``ENQUEUE_MANY_LUA`` takes them (after its reply stream)."""
        return self.id, self.deadline_ms, self.request_id, self.payload

    def to_fields(self) -> dict[str, bytes | str | int]:
        """Return the stream entry's fields."""
        return {
            "id": self.id,
            "reply": self.reply_to,
            "deadline_ms": self.deadline_ms,
            "rid": self.request_id,
            "req": self.payload,
        }

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
        )


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one ``QueuedRequest``."""

    id: str
    code: int
    """gRPC status code value; 0 (OK) means ``payload`` holds the response."""
    message: str = ""
    payload: bytes = b""
    """Serialized ``inference.ModelInferResponse`` when ``code`` is 0."""

    def to_fields(self) -> dict[str, bytes | str | int]:
        """Return the stream entry's fields."""
        return {"id": self.id, "code": self.code, "msg": self.message, "resp": self.payload}

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
        )
