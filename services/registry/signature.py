"""Validate an uploaded artifact in ONNX Runtime and read its input/output signature."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from services.common import dtypes
from services.common.custom_ops import EXTENSIONS, register_custom_ops
from services.common.errors import InvalidArgument
from services.common.metadata import TensorSpec

_UNKNOWN_OP = "is not a registered function/op"
"""ONNX Runtime's words for an operator that no domain it knows implements."""


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs of a model, as ONNX Runtime reports them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def read_signature(path: Path, *, custom_ops: Sequence[str] = ()) -> Signature:
    """Load the ONNX model at ``path`` on the CPU and return its signature.

    Blocks for as long as ONNX Runtime takes to load the model: call it in an executor.

    Args:
        path: The .onnx file.
        custom_ops: Custom-operator libraries to register (``services.common.custom_ops``).

    Raises:
        InvalidArgument: ONNX Runtime cannot load the file, a tensor's type has no KServe v2
            datatype, or a custom-operator library is not supported.
    """
    options = ort.SessionOptions()
    register_custom_ops(options, custom_ops)
    # NOTE: only loading is checked here; optimising the graph would only cost time.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # NOTE: it runs in the validation sandbox (sandbox.py), where thread pools would only reserve
    # address space under its memory limit.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as exc:  # ORT raises one pybind class per status code, with no common base.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # NOTE: ORT's message names the staging file; that path is an internal detail.
        reason = reason.replace(str(path), "the artifact")
        if _UNKNOWN_OP in reason:
            reason += f" (the only custom operators MaaS loads are {EXTENSIONS}'s, declared in custom_ops)"
        raise InvalidArgument(f"artifact is not a loadable ONNX model: {reason}") from exc
    return Signature(
        inputs=_specs("input", session.get_inputs()),
        outputs=_specs("output", session.get_outputs()),
    )


def _specs(kind: str, args: Sequence[Any]) -> tuple[TensorSpec, ...]:
    return tuple(_spec(kind, arg) for arg in args)


def _spec(kind: str, arg: Any) -> TensorSpec:
    try:
        datatype = dtypes.from_ort(arg.type)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{kind} '{arg.name}': {exc.message}") from None
    # Symbolic dimensions are strings ('batch'), unknown ones None: both are variable (-1).
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape or ())
    return TensorSpec(name=str(arg.name), datatype=datatype.name, shape=shape)
