"""Tiny ONNX models the tests build with onnx.helper (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.cli.examples import affine_model

__all__ = ["affine_model", "identity_model", "slow_model", "text_embedding_model", "two_io_model"]


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


TEXT_EMBEDDING_DIM = 8
"""Width of ``text_embedding_model``'s embeddings."""


def text_embedding_model(buckets: int = 64, seed: int = 0) -> bytes:
    """Text in, embeddings out, through onnxruntime-extensions string operators (domain ai.onnx.contrib).

    ``text`` (BYTES [-1]) -> StringLower -> StringSplit on spaces -> StringToHashBucketFast (a hashing
    tokenizer: word -> id in 0..buckets-1) -> Gather over a random embedding table -> the mean of each
    string's token vectors (a one-hot segment sum divided by the token count; zeros for no token)
    -> ``embedding`` (FP32 [-1, TEXT_EMBEDDING_DIM]).
    """
    contrib = "ai.onnx.contrib"
    table = np.random.default_rng(seed).standard_normal((buckets, TEXT_EMBEDDING_DIM)).astype(np.float32)
    constants = {
        "table": table,
        "sep": np.array([" "], dtype=object),
        "skip_empty": np.array([True]),
        "buckets": np.array([buckets], dtype=np.int64),
        "row_column": np.array(0, dtype=np.int64),
        "off_on": np.array([0.0, 1.0], dtype=np.float32),
        "one": np.array(1.0, dtype=np.float32),
        "token_axis": np.array([1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("StringLower", ["text"], ["lower"], name="lower", domain=contrib),
        helper.make_node(
            "StringSplit", ["lower", "sep", "skip_empty"], ["where", "words", "dense"], name="split", domain=contrib
        ),
        helper.make_node("StringToHashBucketFast", ["words", "buckets"], ["ids"], name="tokenize", domain=contrib),
        helper.make_node("Gather", ["table", "ids"], ["vectors"]),
        helper.make_node("Gather", ["where", "row_column"], ["rows"], axis=1),
        helper.make_node("Shape", ["text"], ["count"]),
        helper.make_node("OneHot", ["rows", "count", "off_on"], ["membership"], axis=0),
        helper.make_node("MatMul", ["membership", "vectors"], ["sums"]),
        helper.make_node("ReduceSum", ["membership", "token_axis"], ["tokens"], keepdims=1),
        helper.make_node("Max", ["tokens", "one"], ["divisor"]),
        helper.make_node("Div", ["sums", "divisor"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "text_embedding",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", TEXT_EMBEDDING_DIM])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid(contrib, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
