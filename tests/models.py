"""Tiny ONNX models the tests build with onnx.helper (nothing is downloaded)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from services.cli.examples import affine_model

__all__ = ["affine_model", "identity_model", "slow_model", "two_io_model"]


def _finish(graph: onnx.GraphProto, opset: int = 13) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def two_io_model() -> bytes:
    """Sum = a + b (INT64 [-1, 3]) and prod = a * b, plus neg = -c (FP64 [2])."""
    a = helper.make_tensor_value_info("a", TensorProto.INT64, ["batch", 3])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 3])
    s = helper.make_tensor_value_info("sum", TensorProto.INT64, ["batch", 3])
    p = helper.make_tensor_value_info("prod", TensorProto.INT64, ["batch", 3])
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["prod"])]
    return _finish(helper.make_graph(nodes, "two_io", [a, b], [s, p]))


def identity_model(elem_type: int, shape: list[int | str]) -> bytes:
    """Out = Identity(inp) for any element type and shape."""
    inp = helper.make_tensor_value_info("inp", elem_type, shape)
    out = helper.make_tensor_value_info("out", elem_type, shape)
    return _finish(helper.make_graph([helper.make_node("Identity", ["inp"], ["out"])], "ident", [inp], [out]))


def slow_model(size: int = 1024, steps: int = 48) -> bytes:
    """Y = x @ x @ ... @ x (``steps`` MatMuls of [size, size]): about half a second on one thread."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
    names = ["x", *(f"a{i}" for i in range(1, steps)), "y"]
    nodes = [helper.make_node("MatMul", [names[i], "x"], [names[i + 1]]) for i in range(steps)]
    return _finish(helper.make_graph(nodes, "slow", [x], [y]))
