"""The benchmark's ONNX models, built with onnx.helper (nothing is downloaded).

Both take input ``x`` and give output ``y``, FP32 ``[-1, width]``, so every request is a
``[1, width]`` tensor and every system can stack them along the batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TINY_WIDTH = 16
HEAVY_WIDTH = 2048
SHORT_HEAVY_WIDTH = 256
HEAVY_LAYERS = 4


@dataclass(frozen=True)
class BenchModel:
    """One model of the benchmark: its name (also its MaaS name), input width and ONNX bytes."""

    name: str
    width: int
    data: bytes
    description: str


def _finish(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _io(width: int) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    return x, y


def tiny_model(width: int = TINY_WIDTH) -> bytes:
    """Y = 2x + 1 on FP32 [-1, width]: almost no compute, so serving overhead dominates."""
    x, y = _io(width)
    nodes = [helper.make_node("Mul", ["x", "two"], ["h"]), helper.make_node("Add", ["h", "one"], ["y"])]
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    return _finish(helper.make_graph(nodes, "tiny", [x], [y], inits))


def heavy_model(width: int = HEAVY_WIDTH, layers: int = HEAVY_LAYERS) -> bytes:
    """``layers`` x (Gemm width x width + Relu) on FP32 [-1, width], random weights (64 MiB at 2048)."""
    rng = np.random.default_rng(0)
    x, y = _io(width)
    nodes, inits = [], []
    for i in range(layers):
        source = "x" if i == 0 else f"r{i - 1}"
        target = "y" if i == layers - 1 else f"r{i}"
        weight = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        bias = (rng.standard_normal(width, dtype=np.float32) / 16).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes += [
            helper.make_node("Gemm", [source, f"w{i}", f"b{i}"], [f"g{i}"]),
            helper.make_node("Relu", [f"g{i}"], [target]),
        ]
    return _finish(helper.make_graph(nodes, "heavy", [x], [y], inits))


def build(names: list[str], heavy_width: int = HEAVY_WIDTH) -> list[BenchModel]:
    """Build the named models ("tiny", "heavy") in the order given.

    Raises:
        ValueError: An unknown model name.
    """
    models = []
    for name in names:
        if name == "tiny":
            models.append(BenchModel("tiny", TINY_WIDTH, tiny_model(), f"y = 2x + 1, FP32 [-1, {TINY_WIDTH}]"))
        elif name == "heavy":
            desc = f"{HEAVY_LAYERS} x (Gemm {heavy_width}x{heavy_width} + Relu), FP32 [-1, {heavy_width}]"
            models.append(BenchModel("heavy", heavy_width, heavy_model(heavy_width), desc))
        else:
            raise ValueError(f"unknown model '{name}' (choose from tiny, heavy)")
    return models
