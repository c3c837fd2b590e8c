"""ONNX Runtime sessions: load off the event loop, validate requests, run on a sized thread pool.

Also holds the domain objects a run works on (``InferRequest``, ``InferResult``), so that
convert.py, batcher.py and the worker share them without protobuf.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from services.common.custom_ops import register_custom_ops
from services.common.dtypes import datatype, from_numpy, from_ort
from services.common.errors import FailedPrecondition, InvalidArgument, MaasError
from services.common.metadata import TensorSpec
from services.inference.classify import classify_outputs, is_classifiable
from services.inference.settings import ProviderSetting

Array = npt.NDArray[np.generic]

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia")


def parse_version(text: str) -> int:
    """Parse a ``model_version`` string ("" is 0: whichever version is loaded).

    Raises:
        InvalidArgument: The version is not a non-negative integer.
    """
    if not text:
        return 0
    # NOTE: isdigit() alone takes superscripts (int() refuses them); the registry's versions are int64.
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**63:
        raise InvalidArgument(f"model_version '{text}' is not a version number")
    return int(text)


@dataclass(frozen=True)
class InferRequest:
    """One decoded inference request: numpy inputs by name and the outputs it wants."""

    id: str
    """The client's request id (``ModelInferRequest.id``), echoed in the response."""
    inputs: Mapping[str, Array]
    outputs: tuple[str, ...] = ()
    """Requested output names; empty means every output of the model."""
    model: str = ""
    version: str = ""
    """Version as the client sent it ("" for the default)."""
    class_counts: Mapping[str, int] = field(default_factory=dict)
    """Requested outputs to return as their top classes (``class_count``), by output name."""
    parameters: tuple[tuple[str, str | None, object], ...] = ()
    """The request's parameters: (name, kind such as ``int64_param``, value); generative models read them."""


@dataclass(frozen=True)
class InferResult:
    """The outputs of one request, in the order they are returned."""

    model: str
    version: int
    id: str
    outputs: Mapping[str, Array]


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs; -1 marks a variable dimension."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    # NOTE: cached (frozen fields): read for every request and batch on the worker's path.
    @cached_property
    def output_names(self) -> tuple[str, ...]:
        """Every output name, in the model's order."""
        return tuple(t.name for t in self.outputs)

    @cached_property
    def is_batchable(self) -> bool:
        """Whether every input and output has a variable first dimension."""
        return all(t.is_batchable for t in (*self.inputs, *self.outputs))

    @cached_property
    def _input_specs(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.inputs}

    def validate(self, request: InferRequest) -> None:
        """Check a request's input names, datatypes and shapes and its requested outputs.

        Raises:
            InvalidArgument: The request does not fit the signature (the message names the tensor).
        """
        specs = self._input_specs
        for name, array in request.inputs.items():
            spec = specs.get(name)
            if spec is None:
                raise InvalidArgument(f"unknown input '{name}'; the model's inputs are {_names(self.inputs)}")
            _check_tensor(spec, array)
        missing = [name for name in specs if name not in request.inputs]
        if missing:
            raise InvalidArgument(f"missing input '{missing[0]}'; the model's inputs are {_names(self.inputs)}")
        for name in request.outputs:
            if name not in self.output_names:
                raise InvalidArgument(
                    f"unknown requested output '{name}'; the model's outputs are {_names(self.outputs)}"
                )
        for spec in self.outputs:
            if spec.name in request.class_counts and not is_classifiable(spec.datatype):
                raise InvalidArgument(f"output '{spec.name}': class_count needs a numeric output, not {spec.datatype}")


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"'{t.name}'" for t in specs)


def _check_tensor(spec: TensorSpec, array: Array) -> None:
    datatype = from_numpy(array.dtype).name
    if datatype != spec.datatype:
        raise InvalidArgument(f"input '{spec.name}': datatype {datatype}, expected {spec.datatype}")
    shape = list(array.shape)
    if len(shape) != len(spec.shape):
        raise InvalidArgument(f"input '{spec.name}': shape {shape} has rank {len(shape)}, expected {list(spec.shape)}")
    for index, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want >= 0 and got != want:
            raise InvalidArgument(
                f"input '{spec.name}': dimension {index} is {got}, expected {want} (shape {list(spec.shape)})"
            )


def has_gpu_driver() -> bool:
    """Whether an NVIDIA driver is present (so the CUDA provider can work at all)."""
    return any(os.path.exists(path) for path in _GPU_DRIVER_PATHS)


def select_providers(setting: ProviderSetting, available: Sequence[str], *, has_gpu: bool) -> list[str]:
    """Return the ONNX Runtime providers to ask for, in priority order.

    Args:
        setting: ``auto`` (CUDA only if ORT has it and a GPU driver is present), ``cpu`` or ``cuda``.
        available: ``onnxruntime.get_available_providers()``.
        has_gpu: Whether a GPU driver is present.
    """
    # NOTE: onnxruntime-gpu lists CUDA as available even on machines without a GPU; asking for
    # it there costs a failed library load and an error log on every session, so "auto" does not.
    is_cuda = setting == "cuda" or (setting == "auto" and _CUDA in available and has_gpu)
    return [_CUDA, _CPU] if is_cuda else [_CPU]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _translate(exc: Exception) -> MaasError:
    message = f"model run failed: {_first_line(exc)}"
    if isinstance(exc, UnicodeDecodeError):
        # ONNX Runtime's Python API decodes string outputs as UTF-8: the model made other bytes.
        return FailedPrecondition(
            f"model run failed: a BYTES output is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "ONNX Runtime's Python API can only return UTF-8 strings"
        )
    if isinstance(exc, OrtInvalidArgument) or "INVALID_ARGUMENT" in str(exc):
        return InvalidArgument(message)
    return MaasError(message)


def _ort_feed(name: str, array: Array) -> Array:
    """Return ``array`` as ONNX Runtime takes it: BYTES elements become text."""
    if array.dtype != np.dtype(object):
        return array
    # NOTE: ORT builds string tensors with str(element), so bytes would arrive as "b'...'".
    try:
        text = [item.decode() if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidArgument(f"input '{name}': BYTES elements must be UTF-8 text for this model") from None
    out = np.empty(len(text), dtype=object)
    out[:] = text
    return out.reshape(array.shape)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(name=arg.name, datatype=from_ort(arg.type).name, shape=dims)


def _create_session(
    path: Path,
    providers: list[str],
    intra_op_threads: int,
    spinning: bool,
    custom_ops: Sequence[str] = (),
    prepacking: bool = True,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # NOTE: only for versions that declare a library (checked at upload): others get a plain session.
    register_custom_ops(options, custom_ops)
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        # NOTE: ORT memory-maps external-data files on the CPU, but prepacking MatMul/Gemm/Conv
        # weights copies them into private memory (200 MiB of weights: +200 MiB anonymous).
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=providers)


_RECENT_RUNS = 8


class RunTimes:
    """The wall-clock times of a session's recent runs, and how long a run typically takes now.

    A run's measured time can only be too long, never too short: a run on the thread pool also
    waits to get the GIL back from the busy event loop, and any run may be preempted on a loaded
    machine. An average takes such outliers in, and a fast model whose runs went to the pool for
    one of them could then stay there, each hand-off measured as slow again. The typical time is
    therefore the shortest of the last ``_RECENT_RUNS``: it follows a model whose runs really got
    longer (larger batches) within that many runs, and one slow run does not move it.
    """

    __slots__ = ("_recent",)

    def __init__(self, first_s: float = math.inf) -> None:
        """``first_s``: the warm-up's time (infinite: unknown, as when the warm-up failed)."""
        self._recent: collections.deque[float] = collections.deque((first_s,), maxlen=_RECENT_RUNS)

    def add(self, run_s: float) -> None:
        """Count one run's wall-clock time."""
        self._recent.append(run_s)

    @property
    def typical_s(self) -> float:
        """The shortest recent run, in seconds (infinite while only an unknown warm-up is known)."""
        return min(self._recent)


@dataclass
class ModelRuntime:
    """One loaded model version: an ``InferenceSession`` and the executor its runs use."""

    model: str
    version: int
    signature: Signature
    providers: list[str]
    """The providers the session actually got (CPU when CUDA failed to load)."""
    _session: ort.InferenceSession = field(repr=False)
    _executor: Executor = field(repr=False)
    inline_run_max_s: float = 0.0
    """Runs expected to be shorter than this execute on the event loop (see ``run``)."""
    run_times: RunTimes = field(default_factory=RunTimes, repr=False)
    """Recent run times, starting with the warm-up's at load."""
    class_labels: tuple[str, ...] = ()
    """The version's labels for the classification extension, by class index."""

    @classmethod
    async def load(
        cls,
        path: Path,
        *,
        model: str,
        version: int,
        providers: ProviderSetting,
        intra_op_threads: int,
        executor: Executor,
        inline_run_max_s: float = 0.0,
        spinning: bool = False,
        class_labels: tuple[str, ...] = (),
        custom_ops: Sequence[str] = (),
        prepacking: bool = True,
    ) -> ModelRuntime:
        """Create a session for the ONNX file at ``path`` in a thread (never on the event loop).

        ``custom_ops`` are the custom-operator libraries the version declares (registered in its session).
        ``prepacking`` False keeps weights in external-data files memory-mapped (ORT's prepacked
        copies are not made), at the cost of slower batched MatMul/Gemm/Conv kernels.

        Raises:
            InvalidArgument: The model uses a type KServe v2 cannot carry.
            MaasError: ONNX Runtime could not load the file.
        """
        wanted = select_providers(providers, ort.get_available_providers(), has_gpu=has_gpu_driver())
        try:
            session = await asyncio.to_thread(
                _create_session, path, wanted, intra_op_threads, spinning, custom_ops, prepacking
            )
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise MaasError(f"model '{model}' version {version} failed to load: {_first_line(exc)}") from exc
        if providers == "cuda" and _CUDA not in session.get_providers():
            # NOTE: ORT silently falls back to CPU; a GPU pool running on CPU must be loud instead.
            raise MaasError(
                f"model '{model}' version {version} failed to load: providers=cuda, but ONNX Runtime could not "
                "use CUDA (see its log for the missing CUDA/cuDNN library); use providers=auto to allow CPU"
            )
        signature = Signature(
            inputs=tuple(_spec(arg) for arg in session.get_inputs()),
            outputs=tuple(_spec(arg) for arg in session.get_outputs()),
        )
        runtime = cls(model, version, signature, list(session.get_providers()), session, executor, inline_run_max_s)
        runtime.class_labels = class_labels
        runtime.run_times = RunTimes(await asyncio.to_thread(runtime._warm_up))
        return runtime

    def _warm_up(self) -> float:
        """Run twice on zeros (variable dimensions 1); return the second run's time, inf if it failed.

        The first run of a session allocates its buffers; its time also tells whether later runs
        are short enough to run on the event loop (measured here, alone, not under a busy loop).
        """
        feeds: dict[str, Array] = {}
        for spec in self.signature.inputs:
            shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
            dt = datatype(spec.datatype)
            feeds[spec.name] = np.full(shape, "", object) if dt.itemsize is None else np.zeros(shape, dt.numpy)
        try:
            self._timed_run(list(self.signature.output_names), feeds)  # first run: allocations
            return self._timed_run(list(self.signature.output_names), feeds)[1]
        except Exception:  # a model whose inputs zeros do not fit (e.g. data-dependent shapes)
            return math.inf

    async def run(self, feeds: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        """Run the model on the executor and return the outputs by name.

        Args:
            feeds: Input arrays by name (already validated against the signature).
            output_names: Outputs to compute; empty computes every output.

        Raises:
            InvalidArgument: ONNX Runtime rejected the inputs.
            MaasError: The run failed otherwise.
        """
        names = list(output_names) or list(self.signature.output_names)
        ort_feeds = {name: _ort_feed(name, array) for name, array in feeds.items()}
        try:
            if self.run_times.typical_s < self.inline_run_max_s:
                # NOTE: handing a run to a thread and back costs two wake-ups and a self-pipe
                # write (tens of microseconds, more on a busy machine): for a model that runs
                # faster than that, running on the event loop is cheaper and blocks it less.
                values, run_s = self._timed_run(names, ort_feeds)
            else:
                loop = asyncio.get_running_loop()
                values, run_s = await loop.run_in_executor(self._executor, self._timed_run, names, ort_feeds)
        except Exception as exc:  # ORT's exception types share no base class but Exception
            raise _translate(exc) from exc
        self.run_times.add(run_s)
        return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}

    def classify(self, outputs: Mapping[str, Array], request: InferRequest) -> Mapping[str, Array]:
        """Return ``outputs`` with those the request asked a ``class_count`` of as top classes (BYTES)."""
        if not request.class_counts:
            return outputs
        batched = self.signature.is_batchable
        return classify_outputs(outputs, request.class_counts, self.class_labels, batched=batched)

    def _timed_run(self, names: list[str], feeds: dict[str, Array]) -> tuple[list[Any], float]:
        started = time.perf_counter()
        values = self._session.run(names, feeds)
        return values, time.perf_counter() - started
