"""Generative versions on a worker: ONNX Runtime GenAI generators, token by token, onto the reply stream.

A generative version's queue is read one entry at a time (generations do not batch with the
ONNX Runtime session path). Each generation runs ``og.Generator`` in a thread of its own pool
(``generate_next_token`` is blocking C++), at most ``max_generations`` at once per worker. Its
tokens go to the caller's gateway as partial replies (``services.common.queue.Reply``): every
token that is ready is written at once (one round trip for all of them), the last one is held
back and sent as the final reply, with the finish reason and the whole response, in the same
MULTI as the entry's XACK + XDEL. So an entry is acked only after its final reply; a worker that
dies mid-generation leaves it pending, and the reclaim of another worker runs it again (its
replies then carry the next delivery number, ``attempt``: services.gateway.generation resumes or
fails the stream).

A generation stops early, between two tokens, when its call's deadline passes or the gateway
sets the call's cancel flag (``keys.generation_cancel``: the client cancelled or disconnected).

Traced as a batch of one (``services.common.tracing``): ``maas.queue_wait``, then
``maas.generation`` (its token count and finish reason) instead of the batch's assembly and model
run, then ``maas.reply`` (the final reply, written with the ack).

A generation that ran counts as a batch of one: in the version's statistics (ModelStatistics),
the queue-wait, run and batch-size metrics, and the caller's tenant usage (its decode, generation
and encode time), written in the MULTI that sends its final reply.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime_genai as og
import redis.asyncio as aioredis
import structlog
from prometheus_client import Gauge

from services.common import generation, keys, stats, tracing, usage
from services.common.errors import DeadlineExceeded, InvalidArgument, MaasError
from services.common.metadata import DeploymentRecord
from services.common.queue import Entry, MalformedEntry, QueuedRequest, Reply, now_ms
from services.common.redis_conn import send_commands
from services.inference import convert
from services.inference.consumer import QueueConsumer, _Answer, _error_answer, _flat, _malformed_answer
from services.inference.runtime import InferRequest, InferResult, Signature
from services.inference.settings import InferenceSettings

log = structlog.get_logger(__name__)

GENERATIONS_IN_FLIGHT = Gauge(
    "maas_worker_generations_in_flight", "Generations (ONNX Runtime GenAI) running on this worker now"
)
_NO_CAP = 2**31
"""The worker takes the max_new_tokens the gateway checked (against its own cap)."""


@dataclass
class GenerationPool:
    """What a worker's generations share: their threads and the bound on how many run at once."""

    max_generations: int
    executor: ThreadPoolExecutor = field(init=False)
    slots: asyncio.Semaphore = field(init=False)
    running: int = field(init=False, default=0)
    """Generations that hold a slot now (the heartbeat's ``generations``)."""

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(self.max_generations, thread_name_prefix="genai")
        self.slots = asyncio.Semaphore(self.max_generations)

    def shutdown(self) -> None:
        """Stop the threads (generations still running end at their next token: the flag is the consumer's)."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Done:
    """The generator thread's last word: the finish reason, or its failure."""

    def __init__(self, reason: str = "", error: BaseException | None = None) -> None:
        self.reason = reason
        self.error = error


@dataclass
class GenerationModel:
    """One loaded generative version: an ``og.Model`` and its tokenizer."""

    model: str
    version: int
    context_length: int
    _og_model: Any = field(repr=False)
    _tokenizer: Any = field(repr=False)
    signature: Signature = field(default_factory=lambda: Signature(generation.INPUTS, generation.OUTPUTS))
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    """What the heartbeat reports (onnxruntime-genai's providers come from genai_config.json)."""

    @classmethod
    async def load(cls, directory: Path, *, model: str, version: int) -> GenerationModel:
        """Load the bundle in ``directory`` in a thread and generate one token (the warm-up).

        Raises:
            MaasError: onnxruntime-genai could not load it or generate.
        """
        try:
            loaded = await asyncio.to_thread(cls._load, directory, model, version)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError and its own types
            raise MaasError(f"model '{model}' version {version} failed to load: {_first_line(exc)}") from exc
        return loaded

    @classmethod
    def _load(cls, directory: Path, model: str, version: int) -> GenerationModel:
        config = json.loads((directory / generation.CONFIG_FILE).read_text())
        og_model = og.Model(str(directory))
        loaded = cls(model, version, int(config["model"]["context_length"]), og_model, og.Tokenizer(og_model))
        loaded.generate(loaded.encode("a"), generation.GenerationParams(max_new_tokens=1), lambda _piece: None, bool)
        return loaded

    def encode(self, prompt: str) -> Sequence[int]:
        """Tokenize a prompt."""
        return list(self._tokenizer.encode(prompt))

    def generate(
        self,
        tokens: Sequence[int],
        params: generation.GenerationParams,
        emit: Callable[[str], object],
        should_stop: Callable[[], bool],
    ) -> str:
        """Generate after ``tokens``, calling ``emit`` with each token's text; return the finish reason.

        Blocking (run it in a thread). ``should_stop`` is asked before each token.
        """
        params = generation.GenerationParams(
            **{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, self.context_length - len(tokens))}
        )
        og_params = og.GeneratorParams(self._og_model)
        og_params.set_search_options(**params.search_options(len(tokens)))
        generator = og.Generator(self._og_model, og_params)
        generator.append_tokens(np.asarray(tokens, np.int32))
        stream = self._tokenizer.create_stream()
        count = 0
        while not generator.is_done():
            if should_stop():
                return generation.FINISH_CANCELLED
            generator.generate_next_token()
            emit(stream.decode(int(generator.get_next_tokens()[0])))
            count += 1
            # NOTE: onnxruntime-genai keeps the GIL while it computes a token, and the event loop
            # (which writes the tokens out) did not get it back until the generation ended: every
            # token came at the end (bench/generation.py showed it). Yield it once per token.
            time.sleep(0)
        return generation.FINISH_LENGTH if count >= params.max_new_tokens else generation.FINISH_STOP


def _prompt(request: InferRequest) -> str:
    array = request.inputs.get(generation.PROMPT)
    if array is None or array.shape != (1,):
        raise InvalidArgument(f"input '{generation.PROMPT}' must be one BYTES element (shape [1])")
    item = array.reshape(-1)[0]
    try:
        return item.decode() if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise InvalidArgument(f"input '{generation.PROMPT}' must be UTF-8 text") from None


@dataclass
class _Times:
    """Where one generation's time went (ns), as a batch's requests are measured for the statistics."""

    queue_ns: int
    decode_ns: int = 0
    """Decoding the request and tokenizing the prompt."""
    run_ns: int = 0
    """Generating (the model's runs, token by token, and writing the tokens)."""
    encode_ns: int = 0
    tenant: str = ""
    run_started_ns: int = 0
    """When the generation started and ended (epoch ns, for its trace span)."""
    run_ended_ns: int = 0
    tokens: int = 0
    """Tokens generated."""
    reason: str = ""
    """Its finish reason."""

    @property
    def has_run(self) -> bool:
        """Whether the generation ran (it has something to count)."""
        return self.run_ns > 0


@dataclass
class _Call:
    """One generation under way: where its tokens go and what stops it."""

    entry_id: bytes
    queued: QueuedRequest
    attempt: int
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    """Tokens written to the reply stream so far (the next one's ``seq``)."""
    held: str = ""
    """The last token's text, held back for the final reply."""
    has_held: bool = False
    text: list[str] = field(default_factory=list)

    def partial(self, piece: str) -> Reply:
        reply = Reply(id=self.queued.id, code=0, seq=self.sent, attempt=self.attempt, piece=piece.encode())
        self.sent += 1
        return reply


class GenerationConsumer(QueueConsumer):
    """The queue consumer of a generative version: one entry at a time, each a streamed generation."""

    def __init__(
        self,
        redis: aioredis.Redis,
        model: GenerationModel,
        deployment: DeploymentRecord,
        settings: InferenceSettings,
        pool: GenerationPool,
        *,
        run_stats: stats.RunStats,
        progress: asyncio.Event | None = None,
    ) -> None:
        """Create a consumer of ``model``'s queue whose generations run in ``pool``."""
        super().__init__(redis, None, deployment, settings, run_stats=run_stats, progress=progress)
        self._model = model
        self._pool = pool

    def _concurrent_batches(self) -> int:
        return self._pool.max_generations

    def _read_size(self) -> int:
        return 1

    async def _process(self, entries: Sequence[Entry], *, ran: Callable[[], None] | None = None) -> None:
        try:
            for entry_id, fields in entries:
                # As a batch of one: the tenant's compute goes in the MULTI that ends it, and once
                # acked, its statistics count in the worker's.
                started_ns = time.time_ns()
                trace = tracing.batch_trace([(entry_id, fields)], started_ns, self._labels)  # None: tracing off
                times = _Times(queue_ns=max(0, started_ns - stats.entry_time_ns(entry_id)))
                self._queue_wait.observe(times.queue_ns / 1e9)
                answer = await self._generate(entry_id, fields, times)
                if trace is not None and times.has_run:
                    trace.generated(entry_id, times.run_started_ns, times.run_ended_ns, times.tokens, times.reason)
                batch_stats, charges = self._accounting(answer, times)
                await self._send_all([answer], first=charges, batch_stats=batch_stats)
                if trace is not None:
                    trace.replied({entry_id: answer.code.name}, time.time_ns())
        finally:
            if ran is not None:
                ran()

    def _accounting(self, answer: _Answer, times: _Times) -> tuple[stats.BatchStats, list[tuple[Any, ...]]]:
        """Count a generation that ran in the metrics; return its statistics and the tenant's HINCRBYs."""
        batch_stats, charges = stats.BatchStats(), usage.ComputeCharges(self._labels)
        if answer.code is not grpc.StatusCode.OK or not times.has_run:
            return batch_stats, []
        batch_stats.group_ran(
            [(times.queue_ns, times.decode_ns, times.encode_ns, 1)], input_ns=0, output_ns=0, runs=[(1, times.run_ns)]
        )
        charges.charge(times.tenant, times.decode_ns + times.run_ns + times.encode_ns)
        self._batch_size.observe(1)
        self._run_seconds.observe(times.run_ns / 1e9)
        return batch_stats, charges.commands()

    async def _generate(self, entry_id: bytes, fields: dict[bytes, bytes], times: _Times) -> _Answer:
        try:
            queued = QueuedRequest.from_fields(fields)
        except MalformedEntry as exc:
            return _malformed_answer(entry_id, fields, exc)
        try:
            if queued.deadline_ms <= now_ms():
                raise DeadlineExceeded("deadline exceeded before the generation started")
            started = time.perf_counter_ns()
            request = convert.decode_infer_request(queued.payload)
            params = generation.parse_parameters(request.parameters, _NO_CAP)
            tokens = self._model.encode(_prompt(request))
            if len(tokens) >= self._model.context_length:
                raise InvalidArgument(
                    f"input '{generation.PROMPT}': the prompt has {len(tokens)} tokens; the model's context "
                    f"length is {self._model.context_length}"
                )
            times.decode_ns = time.perf_counter_ns() - started
            attempt = (await self._delivery_counts([entry_id])).get(entry_id, 1)
            call = _Call(entry_id, queued, attempt)
            async with self._pool.slots:
                GENERATIONS_IN_FLIGHT.inc()
                self._pool.running += 1
                started, times.run_started_ns = time.perf_counter_ns(), time.time_ns()
                try:
                    reason = await self._run(call, tokens, params)
                finally:
                    times.run_ns = time.perf_counter_ns() - started
                    times.run_ended_ns, times.tokens = time.time_ns(), len(call.text)
                    GENERATIONS_IN_FLIGHT.dec()
                    self._pool.running -= 1
        except MaasError as exc:
            log.info("generation_failed", request_id=queued.request_id, reason=exc.message)
            return _error_answer(entry_id, queued, exc)
        times.tenant, times.reason = queued.tenant, reason
        return self._final(call, request, reason, times)

    def _final(self, call: _Call, request: InferRequest, reason: str, times: _Times) -> _Answer:
        started = time.perf_counter_ns()
        text = "".join(call.text).encode()
        result = InferResult(self._model.model, self._model.version, request.id, {generation.TEXT: _bytes_array(text)})
        reply = Reply(
            id=call.queued.id,
            code=0,
            payload=convert.encode_generation_response(result, reason),
            seq=max(0, call.sent),
            attempt=call.attempt,
            piece=call.held.encode(),
            is_final=True,
            finish_reason=reason,
        )
        times.encode_ns = time.perf_counter_ns() - started
        log.debug("generation_done", request_id=call.queued.request_id, tokens=len(call.text), reason=reason)
        return _Answer(call.entry_id, call.queued.reply_to, reply, grpc.StatusCode.OK)

    async def _run(self, call: _Call, tokens: Sequence[int], params: generation.GenerationParams) -> str:
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[str | _Done] = asyncio.Queue()

        def run() -> None:
            try:
                reason = self._model.generate(
                    tokens, params, lambda piece: loop.call_soon_threadsafe(ready.put_nowait, piece), call.stop.is_set
                )
            except Exception as exc:  # reported to the caller as the generation's error
                loop.call_soon_threadsafe(ready.put_nowait, _Done(error=exc))
            else:
                loop.call_soon_threadsafe(ready.put_nowait, _Done(reason))

        running = loop.run_in_executor(self._pool.executor, run)
        try:
            return await self._forward(call, ready)
        finally:
            call.stop.set()  # a cancelled consumer (drain) stops its thread at the next token
            await asyncio.shield(running)

    async def _forward(self, call: _Call, ready: asyncio.Queue[str | _Done]) -> str:
        while True:
            items = [await ready.get()]
            while not ready.empty():
                items.append(ready.get_nowait())
            replies: list[Reply] = []
            for item in items:
                if isinstance(item, _Done):
                    await self._write(call, replies)
                    if item.error is not None:
                        raise MaasError(f"generation failed: {_first_line(item.error)}") from item.error
                    return item.reason
                if call.has_held:
                    replies.append(call.partial(call.held))
                call.held, call.has_held = item, True
                call.text.append(item)
            await self._write(call, replies)

    async def _write(self, call: _Call, replies: Sequence[Reply]) -> None:
        """Write partial replies and read the call's cancel flag in one round trip; stop the call if it is over."""
        commands: list[tuple[Any, ...]] = [
            ("XADD", call.queued.reply_to, "NOMKSTREAM", "*", *_flat(reply.to_fields())) for reply in replies
        ]
        commands.append(("EXISTS", keys.generation_cancel(call.queued.id)))
        results = await send_commands(self._redis, commands)
        is_gone = any(result is None for result in results[:-1])  # NOMKSTREAM: the gateway is gone
        if results[-1] or is_gone or now_ms() >= call.queued.deadline_ms:
            call.stop.set()


def _bytes_array(value: bytes) -> np.ndarray[Any, np.dtype[np.object_]]:
    array = np.empty(1, dtype=object)
    array[0] = value
    return array
