"""Stopping background tasks for good (shared by the gateway and the inference worker)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog

log = structlog.get_logger(__name__)

_CANCEL_ATTEMPTS = 50
_CANCEL_RETRY_S = 0.1


async def finish_tasks(tasks: Iterable[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``tasks``, then cancel those still running until they end."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    if pending:
        _done, pending = await asyncio.wait(pending, timeout=timeout_s)
    for _attempt in range(_CANCEL_ATTEMPTS):
        if not pending:
            break
        # NOTE: on Python 3.11 asyncio.wait_for (redis-py wraps every socket write in it) can
        # swallow a cancellation that lands as the write completes; the task then runs on, so
        # cancel again until it ends.
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=_CANCEL_RETRY_S)
    if pending:
        log.error("tasks_not_cancelled", tasks=sorted(task.get_name() for task in pending))
    await asyncio.gather(*(task for task in tasks if task.done()), return_exceptions=True)
