"""Gauges computed at scrape time by an async refresh on a service's event loop, cached briefly.

The metrics HTTP endpoint (``prometheus_client.start_http_server``) scrapes in its own thread,
while Redis is reached through the service's ``redis.asyncio`` client on the event loop. A
``LoopCollector`` runs each registered source's refresh on that source's loop
(``asyncio.run_coroutine_threadsafe``), waits at most ``timeout_s`` for it, and keeps the
result for ``max_age_s``: a scrape costs at most one round trip per source and second, and a
service that nobody scrapes sends nothing. A refresh that fails or is late leaves the last
values (a Redis error is counted by ``redis_conn.count_redis_error``).

Several sources may share a process (the test suite runs workers side by side): each family
merges their samples with ``sum`` (workers per pool) or ``max`` (the same queue seen twice).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from services.common.redis_conn import count_redis_error

log = structlog.get_logger(__name__)

Samples = dict[str, dict[tuple[str, ...], float]]
"""Family name -> label values (in the family's label order) -> value."""
Refresh = Callable[[], Awaitable[Samples]]


@dataclass(frozen=True)
class GaugeSpec:
    """One gauge family a ``LoopCollector`` exposes."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    merge: Literal["sum", "max"] = "max"
    """How samples with the same labels from several sources combine."""


@dataclass
class _Source:
    loop: asyncio.AbstractEventLoop
    refresh: Refresh
    samples: Samples = field(default_factory=dict)
    refreshed_at: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)


class LoopCollector(Collector):
    """Expose ``specs`` from the sources added with ``add``; register it once per process.

    Args:
        specs: The families, always exposed (empty while no source has samples).
        max_age_s: How long a source's samples are reused before it is refreshed again.
        timeout_s: Longest wait for one refresh inside a scrape.
    """

    def __init__(self, specs: Sequence[GaugeSpec], *, max_age_s: float = 1.0, timeout_s: float = 0.5) -> None:
        self._specs = tuple(specs)
        self._max_age_s = max_age_s
        self._timeout_s = timeout_s
        self._sources: dict[int, _Source] = {}

    def add(self, owner: object, refresh: Refresh) -> None:
        """Expose what ``refresh`` returns, run on the running loop, until ``remove(owner)``."""
        self._sources[id(owner)] = _Source(asyncio.get_running_loop(), refresh)

    def remove(self, owner: object) -> None:
        """Stop exposing ``owner``'s samples."""
        self._sources.pop(id(owner), None)

    def describe(self) -> list[GaugeMetricFamily]:
        """Name the families without refreshing (the registry checks names for duplicates)."""
        return [GaugeMetricFamily(spec.name, spec.documentation, labels=spec.labels) for spec in self._specs]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Refresh stale sources (on their loops) and yield every family, merged."""
        merged: Samples = {spec.name: {} for spec in self._specs}
        for source in list(self._sources.values()):
            for name, samples in self._samples(source).items():
                self._merge(merged, name, samples)
        for spec in self._specs:
            family = GaugeMetricFamily(spec.name, spec.documentation, labels=spec.labels)
            for labels, value in sorted(merged[spec.name].items()):
                family.add_metric(labels, value)
            yield family

    def _merge(self, merged: Samples, name: str, samples: dict[tuple[str, ...], float]) -> None:
        spec = next((spec for spec in self._specs if spec.name == name), None)
        if spec is None:
            return
        into = merged[name]
        for labels, value in samples.items():
            old = into.get(labels)
            if old is None:
                into[labels] = value
            else:
                into[labels] = old + value if spec.merge == "sum" else max(old, value)

    def _samples(self, source: _Source) -> Samples:
        with source.lock:
            is_stale = time.monotonic() - source.refreshed_at >= self._max_age_s
            if is_stale and _may_wait_for(source.loop):
                self._refresh(source)
            return source.samples

    def _refresh(self, source: _Source) -> None:
        future = asyncio.run_coroutine_threadsafe(_call(source.refresh), source.loop)
        try:
            source.samples = future.result(self._timeout_s)
        except Exception as exc:  # a scrape must never fail: keep the last values
            future.cancel()
            count_redis_error(exc)
            log.warning("metrics_refresh_failed", error=repr(exc))
            return
        source.refreshed_at = time.monotonic()


async def _call(refresh: Refresh) -> Samples:
    return await refresh()


def _may_wait_for(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread may block on ``loop`` (not its own thread, and it still runs)."""
    if loop.is_closed() or not loop.is_running():
        return False
    try:
        return asyncio.get_running_loop() is not loop
    except RuntimeError:  # no loop in this thread: the metrics server's
        return True


def register(collector: LoopCollector) -> LoopCollector:
    """Register ``collector`` in the default registry (once, at import) and return it."""
    REGISTRY.register(collector)
    return collector
