"""The request path: validate against the model's signature, admit, enqueue, await the reply."""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Gauge, Histogram

from services.common import auth, dtypes, generation, tracing
from services.common.auth import TenantQuota
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    code_from_value,
    error_for_code,
)
from services.common.metadata import DeploymentRecord, ModelRecord, TensorSpec, VersionRecord
from services.common.queue import QueuedRequest, now_ms
from services.common.stats import CallStats, VersionStats
from services.gateway.admission import Admission
from services.gateway.clients import ModelCatalog, Target, parse_version
from services.gateway.direct_replies import ReplyListener
from services.gateway.generation import GenerationPiece, TokenOrder, cancel
from services.gateway.overrides import DeployOverrides
from services.gateway.quotas import Quotas, RateLimited
from services.gateway.replies import ReplyReader

log = structlog.get_logger(__name__)

REQUESTS = Counter(
    "maas_gateway_requests_total", "Inference calls by model, version and final code", ["model", "version", "code"]
)
LATENCY = Histogram(
    "maas_gateway_request_duration_seconds",
    "Inference call latency inside the gateway (end to end: admission, queue, run, reply), in seconds",
    ["model", "version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge("maas_gateway_in_flight_requests", "Calls waiting for a worker's reply")


@dataclass(frozen=True)
class InputView:
    """What the gateway needs of an input tensor to validate it, without decoding its data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw_bytes: int | None
    """Size of its raw_input_contents entry, if raw contents are used."""
    content_count: int | None
    """Number of elements in its typed ``contents`` field, if that is used."""
    raw: bytes | None = field(default=None, repr=False)
    """Its raw_input_contents entry (a reference, not a copy), for the BYTES framing check."""
    has_both: bool = False
    """Whether raw_input_contents and typed ``contents`` are both set for it."""
    parameters: tuple[str, ...] = ()
    """Names of its ``parameters``."""


@dataclass(frozen=True)
class InferCall:
    """An inference call as the router sees it; ``payload`` is the serialized request."""

    model: str
    version: str
    inputs: tuple[InputView, ...]
    outputs: tuple[str, ...]
    raw_count: int
    payload: bytes = field(repr=False)
    parameters: tuple[str, ...] = ()
    """Names of the request's ``parameters``."""
    output_parameters: tuple[tuple[str, str], ...] = ()
    """(output name, parameter name) of every requested output's ``parameters``."""
    class_counts: tuple[tuple[str, str | None, int], ...] = ()
    """(output name, value kind, int64 value) of each requested output's ``classification`` parameter."""
    typed_parameters: tuple[generation.TypedParameter, ...] = ()
    """The request's parameters with their kinds and values (a generative model's generation parameters)."""


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"'{s.name}'" for s in specs)


def _check_shape(view: InputView, spec: TensorSpec) -> None:
    expected = list(spec.shape)
    if len(view.shape) != len(spec.shape):
        raise InvalidArgument(
            f"input '{view.name}': shape {list(view.shape)} has rank {len(view.shape)}, "
            f"expected rank {len(spec.shape)} (model shape {expected})"
        )
    for axis, (got, want) in enumerate(zip(view.shape, spec.shape, strict=True)):
        if got < 0:
            raise InvalidArgument(f"input '{view.name}': dimension {axis} is {got}, expected a size >= 0")
        if want >= 0 and got != want:
            raise InvalidArgument(
                f"input '{view.name}': dimension {axis} is {got}, expected {want} (model shape {expected})"
            )


def _check_data(view: InputView, dt: dtypes.DataType) -> None:
    count = math.prod(view.shape)
    if view.has_both:
        raise InvalidArgument(
            f"input '{view.name}': both raw_input_contents and contents are set; send the data in one of them"
        )
    if view.raw_bytes is not None:
        if dt.itemsize is not None and view.raw_bytes != count * dt.itemsize:
            raise InvalidArgument(
                f"input '{view.name}': raw_input_contents has {view.raw_bytes} bytes, expected "
                f"{count * dt.itemsize} ({count} x {dt.name} of {dt.itemsize} bytes for shape {list(view.shape)})"
            )
        if dt.itemsize is None:
            dtypes.check_bytes(view.raw or b"", count, name=view.name)
    elif view.content_count is not None:
        if dt.contents_field is None:
            raise InvalidArgument(f"input '{view.name}': {dt.name} tensors must be sent in raw_input_contents")
        if view.content_count != count:
            raise InvalidArgument(
                f"input '{view.name}': contents has {view.content_count} elements, expected {count} "
                f"for shape {list(view.shape)}"
            )
    else:
        raise InvalidArgument(f"input '{view.name}' has no data: set raw_input_contents or contents")


_SEQUENCE_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end"})
CLASSIFICATION = "classification"
"""The requested-output parameter of Triton's classification extension (tritonclient's class_count)."""


def _unsupported(where: str, name: str) -> InvalidArgument:
    if name in _SEQUENCE_PARAMETERS:
        why = "MaaS serves stateless models only (no sequence batching)"
    elif name.startswith("shared_memory"):
        why = "shared memory is not supported; send tensors in the request"
    else:
        why = "MaaS does not implement it; remove it"
    return InvalidArgument(f"{where}parameter '{name}' is not supported: {why}")


def _check_parameters(call: InferCall, version: VersionRecord) -> None:
    # NOTE: an ignored parameter is a silent wrong answer (a sequence run as stateless calls, a
    # classification returned as the raw tensor): refuse every one MaaS does not implement.
    # A generative model's request parameters are its generation's (checked by parse_parameters).
    for name in () if generation.is_generative(version.platform) else call.parameters:
        raise _unsupported("", name)
    for view in call.inputs:
        for name in view.parameters:
            raise _unsupported(f"input '{view.name}': ", name)
    for output, name in call.output_parameters:
        if name != CLASSIFICATION:
            raise _unsupported(f"output '{output}': ", name)


def _check_class_counts(call: InferCall, version: VersionRecord) -> None:
    """Check Triton's classification extension: ``class_count`` is an int64 >= 1 on a numeric output."""
    datatypes = {spec.name: spec.datatype for spec in version.outputs}
    for output, kind, value in call.class_counts:
        if kind != "int64_param":
            raise InvalidArgument(
                f"output '{output}': parameter '{CLASSIFICATION}' (class_count) must be an int64_param, "
                f"got {kind or 'no value'}"
            )
        if value < 1:
            raise InvalidArgument(
                f"output '{output}': parameter '{CLASSIFICATION}' (class_count) must be >= 1, got {value}"
            )
        if datatypes[output] in ("BOOL", "BYTES"):
            raise InvalidArgument(f"output '{output}': class_count needs a numeric output, not {datatypes[output]}")


def _check_batch(call: InferCall, version: VersionRecord, max_batch_size: int) -> None:
    if max_batch_size <= 0 or not version.is_batchable:
        return
    for view in call.inputs:
        if view.shape and view.shape[0] > max_batch_size:
            raise InvalidArgument(
                f"input '{view.name}': batch size {view.shape[0]} exceeds the deployment's "
                f"max_batch_size {max_batch_size}; split the request"
            )


def _check_input(view: InputView, spec: TensorSpec) -> None:
    try:
        dt = dtypes.datatype(view.datatype)
    except InvalidArgument as exc:
        raise InvalidArgument(f"input '{view.name}': {exc.message}") from None
    if view.datatype != spec.datatype:
        raise InvalidArgument(
            f"input '{view.name}': datatype {view.datatype} does not match the model, expected {spec.datatype}"
        )
    _check_shape(view, spec)
    _check_data(view, dt)


def validate(call: InferCall, version: VersionRecord, max_batch_size: int = 0) -> None:
    """Check a call's parameters, inputs and requested outputs against the version's signature.

    Args:
        call: The call.
        version: The version it goes to.
        max_batch_size: The deployment's largest batch (rows of one request); 0: no limit.

    Raises:
        InvalidArgument: The first problem found, naming the tensor and what was expected.
    """
    _check_parameters(call, version)
    if call.raw_count and call.raw_count != len(call.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {call.raw_count} entries, expected one per input ({len(call.inputs)})"
        )
    given = {view.name: view for view in call.inputs}
    if len(given) != len(call.inputs):
        raise InvalidArgument("inputs: each input name may appear only once")
    specs = {spec.name: spec for spec in version.inputs}
    for name in given.keys() - specs.keys():
        raise InvalidArgument(f"unknown input '{name}': model '{call.model}' expects {_names(version.inputs)}")
    for spec in version.inputs:
        if spec.name not in given:
            raise InvalidArgument(f"missing input '{spec.name}': model '{call.model}' expects {_names(version.inputs)}")
        _check_input(given[spec.name], spec)
    outputs = {spec.name for spec in version.outputs}
    for name in call.outputs:
        if name not in outputs:
            raise InvalidArgument(f"unknown output '{name}': model '{call.model}' has {_names(version.outputs)}")
    _check_class_counts(call, version)
    _check_batch(call, version, max_batch_size)


class _Outcome:
    """One call's outcome, recorded when it ends: per model version (once resolved) and per tenant.

    The code is the gRPC code of what the call raised (OK when it ended otherwise); its duration
    runs from its resolution to its end.
    """

    __slots__ = ("_finished", "_started", "_target", "tenant")

    def __init__(self, finished: Callable[[Target | None, str, str, int], None]) -> None:
        """``finished(target, tenant, code, duration_ns)`` records it."""
        identity = auth.current_identity()
        self.tenant = identity.tenant if identity is not None else ""
        """The calling key's tenant ('' when the gateway checks no keys)."""
        self._finished = finished
        self._target: Target | None = None
        self._started = 0

    def resolved(self, target: Target) -> Target:
        """Note the version the call goes to (its duration starts now); return it."""
        self._target, self._started = target, time.perf_counter_ns()
        return target

    def __enter__(self) -> _Outcome:
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        code = getattr(exc, "grpc_code", grpc.StatusCode.INTERNAL).name if isinstance(exc, Exception) else "OK"
        self._finished(self._target, self.tenant, code, time.perf_counter_ns() - self._started)


class Router:
    """Sends validated calls to their model version's queue and waits for the reply."""

    def __init__(
        self,
        redis: aioredis.Redis,
        catalog: ModelCatalog,
        replies: ReplyReader,
        admission: Admission,
        *,
        default_timeout_s: float,
        max_request_tensor_bytes: int,
        max_message_bytes: int,
        stats: CallStats,
        quotas: Quotas,
        max_new_tokens: int = 1024,
        listener: ReplyListener | None = None,
    ) -> None:
        self._redis = redis
        self._listener = listener
        self._max_new_tokens = max_new_tokens
        self._catalog = catalog
        self._replies = replies
        self._admission = admission
        IN_FLIGHT.set_function(lambda: replies.in_flight)
        self._default_timeout_s = default_timeout_s
        self.limits = {"max_request_tensor_bytes": max_request_tensor_bytes, "max_message_bytes": max_message_bytes}
        """The gateway's size limits, reported in ModelConfig's parameters."""
        # NOTE: a random prefix per process, not just a counter: a gateway restarted under a fixed
        # gateway_id reads its predecessor's reply stream, and a late reply to the predecessor's
        # call N would resolve this process's call N (README, "Reply isolation").
        self._call_prefix = secrets.token_hex(8) + "-"
        self._call_ids = itertools.count(1)
        self._metrics: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        self._stats = stats
        self._quotas = quotas

    async def server_ready(self) -> bool:
        """Whether this gateway can take calls: Redis answers."""
        try:
            return bool(await self._redis.ping())
        except Exception:  # any failure means not ready; readiness must never raise
            return False

    async def model_ready(self, name: str, version: str) -> bool:
        """Whether calls to the model can be served now: deployed and loaded by a live worker.

        ``version`` may be a number or an alias; without one, every version the call may go to
        (the ``default`` alias's, or each of the split's) must be loaded.
        """
        try:
            _model, _deployment, split = await self._catalog.candidates(name, version)
        except (NotFound, FailedPrecondition):
            return False
        for number, _weight in split:
            if await self._catalog.ready_workers(name, number) == 0:
                return False
        return True

    async def model_metadata(self, name: str, version: str) -> tuple[ModelRecord, VersionRecord]:
        """Return a model and the version its metadata describes."""
        return await self._catalog.metadata_version(name, version)

    async def model_config(self, name: str, version: str) -> tuple[VersionRecord, DeploymentRecord | None]:
        """Return the version a config describes and the model's deployment, if any."""
        model, record = await self._catalog.metadata_version(name, version)
        return record, model.deployment

    async def model_statistics(self, name: str, version: str) -> list[VersionStats]:
        """Return the cluster-wide statistics of every model, or of one model (and version) if ``name`` is given.

        Versions that nothing was counted for are left out.

        Raises:
            NotFound: The model, or that version of it, does not exist.
            Unavailable: Redis cannot be reached.
        """
        number = parse_version(name, version) if name else 0
        if number:
            await self._catalog.version(name, number)
            return await self._stats.read([(name, number)])
        models = [await self._catalog.model(name)] if name else await self.repository_index()
        # NOTE: version numbers are never reused and run 1..latest_version (failed uploads leave gaps).
        return await self._stats.read(
            (model.name, number) for model in models for number in range(1, model.latest_version + 1)
        )

    async def repository_index(self) -> list[ModelRecord]:
        """List the registry's models that the calling key may use."""
        return auth.visible_models(await self._catalog.list_models())

    async def load(self, name: str, overrides: DeployOverrides) -> None:
        """Deploy a model's latest version unless it is deployed already, with ``overrides`` applied."""
        await self._catalog.load(name, overrides)

    async def unload(self, name: str) -> None:
        """Undeploy a model."""
        await self._catalog.unload(name)

    async def infer(self, call: InferCall, time_remaining_s: float | None, target: Target | None = None) -> bytes:
        """Run one call; return the worker's serialized ``ModelInferResponse``.

        ``target``: the call's version, when the caller resolved it already (``resolve``).

        Raises:
            NotFound, FailedPrecondition, InvalidArgument: From resolution and validation.
            ResourceExhausted: The model's queue is full, or the tenant is over its quota.
            DeadlineExceeded: No reply by the deadline.
            Unavailable: Redis cannot be reached.
        """
        with _Outcome(self._finished) as outcome:
            target = outcome.resolved(target or await self._catalog.resolve(call.model, call.version))
            validate(call, target.version, target.deployment.max_batch_size)
            if target.is_generative:
                return await self._whole_text(call, target, time_remaining_s, outcome.tenant)
            return await self._send(call, target, time_remaining_s, outcome.tenant)

    def check_request_size(self, size_bytes: int) -> None:
        """Refuse a call whose serialized request (its tensors, mostly) is over the limit.

        Called before the request is converted, so an oversized call costs no further copies.

        Raises:
            ResourceExhausted: It is larger than ``max_request_tensor_bytes``.
        """
        limit = self.limits["max_request_tensor_bytes"]
        if size_bytes > limit:
            raise ResourceExhausted(
                f"the request holds {size_bytes} bytes, more than this gateway's limit of {limit} "
                "(max_request_tensor_bytes); split the request"
            )

    async def _begin(
        self, call: InferCall, target: Target, time_remaining_s: float | None, tenant: str
    ) -> tuple[float, QueuedRequest, TenantQuota | None]:
        """A queued call's timeout (the caller's, capped by the default), entry and tenant quota."""
        timeout_s = min(time_remaining_s or self._default_timeout_s, self._default_timeout_s)
        entry = self._entry(call, timeout_s, tenant, is_generative=target.is_generative)
        tracing.annotate(model=target.model.name, version=target.version.version, tenant=tenant)
        return timeout_s, entry, await self._quotas.quota(tenant) if tenant else None

    def _end(self, entry: QueuedRequest, is_holding_slot: bool) -> None:
        """Stop waiting for ``entry``'s replies; give back its in-flight slot if admission took one."""
        self._replies.forget(entry.id)
        if is_holding_slot:
            self._quotas.release(entry.tenant, entry.reply_to, entry.id)

    def _entry(self, call: InferCall, timeout_s: float, tenant: str, *, is_generative: bool) -> QueuedRequest:
        # NOTE: a generation's replies all take the reply stream, which keeps its pieces in order.
        return QueuedRequest(
            id=f"{self._call_prefix}{next(self._call_ids)}",
            reply_to=self._replies.stream,
            deadline_ms=now_ms() + int(timeout_s * 1000),
            payload=call.payload,
            request_id=str(structlog.contextvars.get_contextvars().get("request_id", "")),
            tenant=tenant,
            traceparent=tracing.traceparent(),
            reply_addr=self._listener.address if self._listener is not None and not is_generative else "",
        )

    async def resolve(self, name: str, version: str) -> Target:
        """The version a call to the model goes to now (a split picks one per call).

        Raises:
            NotFound, FailedPrecondition, InvalidArgument: The model or version does not exist,
                is not deployed, or the version is neither a number nor an alias.
        """
        return await self._catalog.resolve(name, version)

    async def generate(
        self, call: InferCall, time_remaining_s: float | None, target: Target | None = None
    ) -> AsyncIterator[GenerationPiece]:
        """Run a generative model's call; yield its text piece by piece, the last one final.

        ``target``: the call's version, when the caller resolved it already (``resolve``).

        Raises:
            NotFound, FailedPrecondition, InvalidArgument: From resolution and validation.
            ResourceExhausted: The model's queue is full, or the tenant is over its quota.
            DeadlineExceeded: The generation did not end by the deadline.
            Unavailable: Redis cannot be reached, or the worker died during an unseeded sampling.
        """
        with _Outcome(self._finished) as outcome:
            target = outcome.resolved(target or await self._catalog.resolve(call.model, call.version))
            validate(call, target.version, target.deployment.max_batch_size)
            params = generation.parse_parameters(call.typed_parameters, self._max_new_tokens)
            order = TokenOrder(is_deterministic=params.is_deterministic)
            async for piece in self._pieces(call, target, time_remaining_s, outcome.tenant, order):
                piece = replace(piece, version=target.version.version)
                if piece.is_final and params.empty_final:
                    if piece.text:
                        yield replace(piece, is_final=False, finish_reason="", payload=b"")
                    piece = replace(piece, text=b"", has_output=False)
                yield piece

    async def _whole_text(self, call: InferCall, target: Target, time_remaining_s: float | None, tenant: str) -> bytes:
        generation.parse_parameters(call.typed_parameters, self._max_new_tokens)
        # NOTE: nothing reaches the client before the end, so a redelivered sampling may start over.
        async for piece in self._pieces(call, target, time_remaining_s, tenant, TokenOrder(is_deterministic=True)):
            if piece.is_final:
                return piece.payload
        raise AssertionError("a generation ends with its final piece")  # _pieces returns only after it

    async def _pieces(
        self, call: InferCall, target: Target, time_remaining_s: float | None, tenant: str, order: TokenOrder
    ) -> AsyncIterator[GenerationPiece]:
        timeout_s, entry, quota = await self._begin(call, target, time_remaining_s, tenant)
        model, version = target.model.name, target.version.version
        replies = self._replies.expect_many(entry.id)
        deadline = asyncio.get_running_loop().time() + timeout_s
        is_holding_slot = is_done = False
        try:
            async with asyncio.timeout(timeout_s):
                with tracing.span("maas.admission", model=model, version=version, tenant=tenant):
                    await self._admit(target, entry, quota)
            is_holding_slot = quota is not None and quota.max_in_flight > 0
            # NOTE: not a current span: the loop yields to the caller, whose code would run inside it.
            with tracing.detached_span("maas.reply_wait", model=model, version=version) as wait:
                while not is_done:
                    # NOTE: a timeout per read, not around the loop: the loop yields to the caller.
                    reply = await asyncio.wait_for(replies.get(), deadline - asyncio.get_running_loop().time())
                    piece = order.accept(reply)
                    if piece is not None:
                        is_done = piece.is_final
                        yield piece
                wait.set_attribute("maas.tokens", order.forwarded)
        except TimeoutError:
            raise await self._deadline_error(target, timeout_s) from None
        finally:
            self._end(entry, is_holding_slot)
            if not is_done:  # cancelled, disconnected, past the deadline or failed: stop the worker
                await cancel(self._redis, entry.id)

    async def _send(self, call: InferCall, target: Target, time_remaining_s: float | None, tenant: str) -> bytes:
        timeout_s, entry, quota = await self._begin(call, target, time_remaining_s, tenant)
        model, version = target.model.name, target.version.version
        future = self._replies.expect(entry.id)
        is_holding_slot = False
        try:
            async with asyncio.timeout(timeout_s):
                with tracing.span("maas.admission", model=model, version=version, tenant=tenant):
                    await self._admit(target, entry, quota)
                is_holding_slot = quota is not None and quota.max_in_flight > 0
                with tracing.span("maas.reply_wait", model=model, version=version):
                    reply = await future
        except TimeoutError:
            raise await self._deadline_error(target, timeout_s) from None
        finally:
            self._end(entry, is_holding_slot)  # the call ends here: reply, error, deadline or client cancel
        if reply.code != 0:
            raise error_for_code(code_from_value(reply.code), reply.message)
        return reply.payload

    async def _admit(self, target: Target, entry: QueuedRequest, quota: TenantQuota | None) -> None:
        if quota is not None:
            self._quotas.check_bucket(entry.tenant, quota)
        try:
            is_queued = await self._admission.enqueue(target.queue, target.deployment.max_queue_length, entry, quota)
        except RateLimited as exc:
            self._quotas.bucket_empty(entry.tenant, exc.retry_after_ms)
            raise
        if not is_queued:
            raise ResourceExhausted(
                f"model '{target.model.name}' is overloaded: {target.deployment.max_queue_length} requests "
                "are already queued; retry with backoff"
            )

    async def _deadline_error(self, target: Target, timeout_s: float) -> DeadlineExceeded:
        name, version = target.model.name, target.version.version
        try:
            workers = await self._catalog.ready_workers(name, version)
        except Exception:  # the hint is best effort; the deadline error stands either way
            workers = -1
        hint = f"; no live worker has model '{name}' version {version} loaded" if workers == 0 else ""
        return DeadlineExceeded(f"no reply from a worker within {timeout_s:g} s{hint}")

    def _finished(self, target: Target | None, tenant: str, code: str, duration_ns: int) -> None:
        """Record a call's outcome: per model version (if it was resolved) and per tenant (if any)."""
        if target is not None:
            self._record(target, code, duration_ns)
        if tenant:
            self._quotas.record(tenant, code)

    def _record(self, target: Target, code: str, duration_ns: int) -> None:
        self._stats.record(target.model.name, target.version.version, code == "OK", duration_ns)
        counter, latency = self._model_metrics(target.model.name, target.version.version, code)
        counter.inc()
        latency.observe(duration_ns / 1e9)

    def _model_metrics(self, model: str, version: int, code: str) -> tuple[Any, Any]:
        # NOTE: .labels() takes a lock and builds a tuple on every call: keep the children.
        children = self._metrics.get((model, version, code))
        if children is None:
            children = self._metrics[(model, version, code)] = (
                REQUESTS.labels(model=model, version=str(version), code=code),
                LATENCY.labels(model=model, version=str(version)),
            )
        return children
