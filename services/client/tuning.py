"""``maas tune``: measure a deployed model under a short closed-loop load at a few deployment settings.

For each setting of the grid the user allows (max batch size x max wait x pool), the deployment is
replaced with the existing Deploy (the traffic split and queue limit kept), the tuner waits until a
live worker of that pool serves every version of the split, sends warm-up calls (which also give
the workers time to apply the new batching: a registry event reaches them within about 100 ms),
then ``concurrency`` callers each send one call after the other through the gateway for
``seconds``. Throughput counts answered calls; p50/p99 are their latencies as the client saw them.

The recommendation is the setting with the highest throughput whose p99 is within the budget and
that had no errors. At the end the original deployment is put back (its split, batching, pool and
queue limit), also after an error or a stop request, unless ``apply`` deploys the recommendation.
Both are new deploys, so ``maas rollback`` afterwards goes back to the same split.

MaaS starts no workers: a pool stands for the workers that SREs run for it; the tuner reports how
many live workers each pool has (``GetClusterStatus``, admin scope; unknown without it).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from services.client.results import ModelMetadata
from services.common import dtypes
from services.common.errors import FailedPrecondition, InvalidArgument, MaasError, PermissionDenied
from services.common.metadata import DeploymentRecord

if TYPE_CHECKING:
    from services.client.aio import AsyncMaasClient

Array = npt.NDArray[Any]
StopCheck = Callable[[], bool]
"""Returns True once the caller wants the tuning stopped (e.g. after Ctrl-C); polled between calls."""

DEFAULT_SECONDS = 5.0
DEFAULT_CONCURRENCY = 8
DEFAULT_WARMUP_S = 0.5
DEFAULT_READY_TIMEOUT_S = 60.0
_POLL_S = 0.2
"""Interval between checks that a worker serves a setting."""
_CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TuneSetting:
    """One point of the grid: the deployment's batching and pool."""

    max_batch_size: int
    max_wait_ms: int
    pool: str

    def describe(self) -> str:
        """Return the setting for people: ``batch 8, wait 2 ms, pool default``."""
        return f"batch {self.max_batch_size}, wait {self.max_wait_ms} ms, pool {self.pool}"


@dataclass(frozen=True)
class TuneResult:
    """What one setting measured (or why it was not measured: ``skipped``)."""

    setting: TuneSetting
    calls: int = 0
    """Answered calls in the measured window."""
    errors: int = 0
    """Calls that ended with an error in the measured window."""
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    workers: int | None = None
    """Live workers of the pool that served it (None: unknown without the admin scope)."""
    skipped: str = ""

    @property
    def rps(self) -> float:
        """Answered calls per second."""
        return self.calls / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TuneReport:
    """Every setting's result, the recommendation for the budget, and what was left deployed."""

    model: str
    p99_budget_ms: float
    results: tuple[TuneResult, ...]
    recommended: TuneResult | None
    original: DeploymentRecord
    pool_workers: Mapping[str, int] | None
    """Live workers by pool (None: unknown without the admin scope)."""
    is_applied: bool = False
    """Whether the recommendation was deployed (otherwise the original deployment was put back)."""
    is_stopped: bool = False
    """Whether a stop request ended the tuning early."""


def settings_grid(
    current: DeploymentRecord,
    max_batch_sizes: Sequence[int] = (),
    max_wait_ms: Sequence[int] = (),
    pools: Sequence[str] = (),
) -> list[TuneSetting]:
    """Return every combination of the given values; a dimension left empty keeps the current value."""
    return [
        TuneSetting(batch, wait, pool)
        for batch, wait, pool in itertools.product(
            max_batch_sizes or (current.max_batch_size,),
            max_wait_ms or (current.max_wait_ms,),
            pools or (current.pool,),
        )
    ]


def recommend(results: Sequence[TuneResult], p99_budget_ms: float) -> TuneResult | None:
    """Return the highest-throughput result without errors whose p99 is within the budget, or None."""
    fitting = [r for r in results if not r.skipped and r.calls and not r.errors and r.p99_ms <= p99_budget_ms]
    return max(fitting, key=lambda r: r.rps, default=None)


def random_inputs(signature: ModelMetadata, seed: int = 0) -> dict[str, Array]:
    """Return one random tensor per input of the signature; variable dimensions become 1."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, Array] = {}
    for spec in signature.inputs:
        shape = tuple(1 if size < 0 else size for size in spec.shape)
        dt = dtypes.datatype(spec.datatype)
        if dt.itemsize is None:
            inputs[spec.name] = np.full(shape, b"maas", dtype=object)
        elif dt.numpy.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif dt.numpy.kind in "iu":
            inputs[spec.name] = rng.integers(0, 10, shape).astype(dt.numpy)
        else:
            inputs[spec.name] = rng.standard_normal(shape).astype(dt.numpy)
    return inputs


def sample_inputs(path: Path, signature: ModelMetadata) -> dict[str, Array]:
    """Read the tensors every call sends: a ``.npz`` with one array per input name, or a ``.npy`` (one input).

    Raises:
        InvalidArgument: The file is missing or of another kind, or its arrays do not name the inputs.
    """
    names = [spec.name for spec in signature.inputs]
    try:
        if path.suffix == ".npy" and len(names) == 1:
            return {names[0]: np.load(path, allow_pickle=False)}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: np.asarray(archive[name]) for name in archive.keys()}  # noqa: SIM118 - NpzFile
        else:
            raise InvalidArgument(f"--sample {path.name}: expected a .npz (one array per input) or a .npy (one input)")
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"--sample {path.name}: cannot be read ({exc})") from None
    if sorted(arrays) != sorted(names):
        raise InvalidArgument(f"--sample {path.name}: has arrays {sorted(arrays)}, the model's inputs are {names}")
    return arrays


async def measure(
    client: AsyncMaasClient,
    model: str,
    inputs: Mapping[str, Array],
    *,
    seconds: float,
    concurrency: int,
    is_stopped: StopCheck = lambda: False,
) -> tuple[list[float], int, float]:
    """Run ``concurrency`` callers, each sending one call after the other, for ``seconds``.

    Returns:
        The latencies of answered calls (s), the number of failed calls, and the seconds measured.
    """
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < deadline and not is_stopped():
            sent = time.perf_counter()
            try:
                await client.infer(model, inputs, timeout_s=_CALL_TIMEOUT_S)
            except MaasError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def _pool_workers(client: AsyncMaasClient) -> dict[str, int] | None:
    """Live workers by pool, or None when this key may not read the cluster status."""
    try:
        status = await client.cluster_status()
    except PermissionDenied:
        return None
    counts: dict[str, int] = {}
    for worker in status.workers:
        counts[worker.pool] = counts.get(worker.pool, 0) + 1
    return counts


async def _serving_workers(client: AsyncMaasClient, model: str, versions: Sequence[int], pool: str) -> int | None:
    """Live workers of ``pool`` that serve every version (None: unknown; then 1 if the gateway says ready)."""
    try:
        status = await client.cluster_status()
    except PermissionDenied:
        ready = [await client.model_ready(model, version=v, timeout_s=5) for v in versions]
        return 1 if all(ready) else 0
    wanted = {f"{model}:{version}" for version in versions}
    return sum(1 for w in status.workers if (w.pool == pool or not pool) and wanted <= set(w.models))


async def wait_until_serving(
    client: AsyncMaasClient,
    model: str,
    deployment: DeploymentRecord,
    *,
    timeout_s: float,
    is_stopped: StopCheck = lambda: False,
) -> int:
    """Wait until a live worker of the deployment's pool serves every version of its split.

    Returns:
        The number of such workers (0: none by ``timeout_s``, or stopped).
    """
    versions = [version for version, _ in deployment.split]
    deadline = time.monotonic() + timeout_s
    while True:
        count = await _serving_workers(client, model, versions, deployment.pool) or 0
        if count or time.monotonic() >= deadline or is_stopped():
            return count
        await asyncio.sleep(_POLL_S)


async def _deploy(client: AsyncMaasClient, original: DeploymentRecord, setting: TuneSetting) -> DeploymentRecord:
    return await client.deploy(
        original.model, traffic=dict(original.split), max_batch_size=setting.max_batch_size,
        max_wait_ms=setting.max_wait_ms, pool=setting.pool, max_queue_length=original.max_queue_length,
    )  # fmt: skip


def _percentile_ms(latencies: Sequence[float], q: float) -> float:
    return float(np.percentile(latencies, q)) * 1000 if latencies else 0.0


@dataclass(frozen=True)
class TuneOptions:
    """How to measure each setting."""

    seconds: float = DEFAULT_SECONDS
    concurrency: int = DEFAULT_CONCURRENCY
    warmup_s: float = DEFAULT_WARMUP_S
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S

    def validate(self) -> None:
        """Refuse values that cannot measure anything.

        Raises:
            InvalidArgument: A value out of range, named.
        """
        if not self.seconds > 0:
            raise InvalidArgument(f"seconds must be > 0, got {self.seconds}")
        if self.concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.warmup_s >= 0 or not self.ready_timeout_s > 0:
            raise InvalidArgument("warm-up must be >= 0 s and the ready timeout > 0 s")


class Tuner:
    """Measures one deployed model at each setting of a grid; see the module docstring."""

    def __init__(
        self,
        client: AsyncMaasClient,
        model: str,
        inputs: Mapping[str, Array],
        options: TuneOptions,
        *,
        is_stopped: StopCheck = lambda: False,
    ) -> None:
        self._client, self._model, self._inputs = client, model, inputs
        self._options, self._is_stopped = options, is_stopped

    async def _measure(self, seconds: float) -> tuple[list[float], int, float]:
        return await measure(
            self._client, self._model, self._inputs, seconds=seconds, concurrency=self._options.concurrency,
            is_stopped=self._is_stopped,
        )  # fmt: skip

    async def run_setting(self, original: DeploymentRecord, setting: TuneSetting) -> TuneResult:
        """Deploy ``setting`` (keeping the split), wait for a worker, warm up, then measure it."""
        deployment = await _deploy(self._client, original, setting)
        opts = self._options
        workers = await wait_until_serving(
            self._client, self._model, deployment, timeout_s=opts.ready_timeout_s, is_stopped=self._is_stopped
        )
        if not workers:
            why = "stopped" if self._is_stopped() else f"no worker of pool '{setting.pool}' served it"
            return TuneResult(setting, skipped=f"{why} within {opts.ready_timeout_s:g} s")
        if opts.warmup_s:
            await self._measure(opts.warmup_s)
        latencies, errors, elapsed = await self._measure(opts.seconds)
        return TuneResult(
            setting, calls=len(latencies), errors=errors, seconds=elapsed, p50_ms=_percentile_ms(latencies, 50),
            p99_ms=_percentile_ms(latencies, 99), workers=workers,
        )  # fmt: skip


async def tune(
    client: AsyncMaasClient,
    model: str,
    grid: Sequence[TuneSetting],
    *,
    p99_budget_ms: float,
    inputs: Mapping[str, Array] | None = None,
    options: TuneOptions | None = None,
    apply: bool = False,
    is_stopped: StopCheck = lambda: False,
    on_result: Callable[[TuneResult], None] = lambda result: None,
) -> TuneReport:
    """Measure ``model`` at each setting, recommend one for the p99 budget, then restore or apply.

    Args:
        client: The client whose gateway and registry to use.
        model: A deployed model.
        grid: The settings to try (``settings_grid``).
        p99_budget_ms: The latency budget the recommendation must meet.
        inputs: The tensors each call sends; None: random ones matching the deployed signature.
        options: Seconds per setting, concurrency, warm-up, ready timeout.
        apply: Deploy the recommendation at the end (when there is one) instead of the original.
        is_stopped: Polled between calls: True ends the tuning early (the deployment is still restored).
        on_result: Called with each setting's result as soon as it is measured.

    Returns:
        The report.

    Raises:
        FailedPrecondition: The model is not deployed.
        InvalidArgument: An option or a setting is out of range (the registry names it).
    """
    options = options or TuneOptions()
    options.validate()
    original = (await client.get_model(model)).deployment
    if original is None:
        raise FailedPrecondition(f"model '{model}' is not deployed: deploy it before tuning")
    if not grid or not p99_budget_ms > 0:
        raise InvalidArgument("give at least one setting to try and a p99 budget > 0 ms")
    if inputs is None:
        inputs = random_inputs(await client.model_metadata(model))
    pool_workers = await _pool_workers(client)
    tuner = Tuner(client, model, inputs, options, is_stopped=is_stopped)
    results: list[TuneResult] = []
    is_applied = False
    try:
        for setting in grid:
            if is_stopped():
                break
            results.append(await tuner.run_setting(original, setting))
            on_result(results[-1])
        best = recommend(results, p99_budget_ms)
        if apply and best is not None and not is_stopped():
            await _deploy(client, original, best.setting)
            is_applied = True
    finally:
        if not is_applied:
            await _restore(client, original)
    return TuneReport(
        model, p99_budget_ms, tuple(results), recommend(results, p99_budget_ms), original, pool_workers,
        is_applied=is_applied, is_stopped=is_stopped(),
    )  # fmt: skip


async def _restore(client: AsyncMaasClient, original: DeploymentRecord) -> None:
    # NOTE: shielded, so a cancellation that ends the tuning cannot also stop the deployment being put back.
    setting = TuneSetting(original.max_batch_size, original.max_wait_ms, original.pool)
    await asyncio.shield(_deploy(client, original, setting))
