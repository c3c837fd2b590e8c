"""Example models for the quickstart, built with onnx.helper (nothing is downloaded)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def affine_model(width: int = 4, scale: float = 2.0, bias: float = 1.0) -> bytes:
    """Return y = scale * x + bias on FP32 [-1, width] (input "x", output "y") as ONNX bytes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["y"]),
    ]
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("bias", TensorProto.FLOAT, [], [bias]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "affine", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
