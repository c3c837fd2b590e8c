"""Child processes with a time and a memory limit: what upload validation and optimisation share.

The parent starts ``python -m <module> <memory_bytes> ...``; the child calls ``limit_self`` first
thing, so a hostile or runaway model can only exhaust its own address space. The parent kills the
child when its time is up (``kill``), and a child also arms ``SIGALRM`` as a backstop so it ends
even when its parent died without killing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import signal
from collections.abc import Callable
from typing import Any

from services.common.errors import MaasError

READY = "ready"
"""The child's first line: its imports are done, the time limit may start."""
MEMORY_EXIT = 3
"""Exit status of a child that ran out of memory before it could report it."""


def limit_self(memory_bytes: int, timeout_s: float | None = None) -> None:
    """Cap this process's address space, disable core dumps and leave Ctrl-C to the parent.

    Args:
        memory_bytes: ``RLIMIT_AS`` of this process.
        timeout_s: If given, end the process with SIGALRM after this many seconds.
    """
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of `maas up` is the parent's to handle
    if timeout_s is not None:
        signal.alarm(max(1, math.ceil(timeout_s)))


def answer_once(memory_bytes: int, prepare: Callable[[], None], work: Callable[[], dict[str, Any]]) -> int:
    """The child's side of the protocol: limit, import, say ``READY``, answer one job as one JSON line.

    Args:
        memory_bytes: ``RLIMIT_AS`` of this process.
        prepare: Imports and setup done before ``READY`` (not charged to the job's time).
        work: Reads its job from stdin and returns the answer; a ``MaasError`` it raises becomes
            ``{"error": message, "code": grpc code name}``, a ``MemoryError`` ``{"memory": true}``.

    Returns:
        The process exit status (``MEMORY_EXIT`` when even the answer could not be written).
    """
    limit_self(memory_bytes)
    try:
        prepare()
        print(READY, flush=True)
        answer = work()
    except MaasError as exc:
        answer = {"error": exc.message, "code": exc.grpc_code.name}
    except MemoryError:
        answer = {"memory": True}
    try:
        print(json.dumps(answer), flush=True)
    except MemoryError:
        return MEMORY_EXIT
    return 0


async def kill(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` unless it ended, and reap it even if the caller is cancelled meanwhile."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    # NOTE: shielded so that a cancelled caller still reaps its child (no zombie, no orphan).
    await asyncio.shield(process.wait())
