"""Tiny ONNX models the tests build with onnx.helper (nothing is downloaded)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.cli.examples import affine_model
from tests.genai_model import byte_encoder

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
TEXT_MERGES = ("h e", "l l", "he ll", "hell o", "\u0120 w", "o r", "t h", "\u0120 th", "\u0120th e")
"""The BPE merges of ``text_embedding_model``'s tokenizer ("\u0120" is GPT-2's stand-in for a space)."""


def _byte_level_vocab(merges: tuple[str, ...]) -> dict[str, int]:
    """GPT-2's byte-level vocabulary: one token per byte (its printable stand-in), then one per merge."""
    stand_in = byte_encoder()
    vocab = {stand_in[byte]: byte for byte in range(256)}
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def text_embedding_model(seed: int = 0) -> bytes:
    """Text in, embeddings out: a real tokenizer (onnxruntime-extensions, domain ai.onnx.contrib), then an encoder.

    ``text`` (BYTES [-1]) -> GPT2Tokenizer (byte-level BPE with a small inline vocabulary and
    ``TEXT_MERGES``; a batch of strings comes out as token ids padded to the longest, with an
    attention mask) -> Gather over a random embedding table (the encoder) -> the mean of each
    string's token vectors under the mask (zeros for an empty string) -> ``embedding`` (FP32
    [-1, TEXT_EMBEDDING_DIM]).
    """
    contrib = "ai.onnx.contrib"
    vocab = _byte_level_vocab(TEXT_MERGES)
    table = np.random.default_rng(seed).standard_normal((len(vocab), TEXT_EMBEDDING_DIM)).astype(np.float32)
    constants = {
        "table": table,
        "token_axis": np.array([1], dtype=np.int64),
        "last_axis": np.array([2], dtype=np.int64),
        "one": np.array(1.0, dtype=np.float32),
    }
    tokenizer = helper.make_node(
        "GPT2Tokenizer", ["text"], ["ids", "mask"], name="tokenize", domain=contrib,
        vocab=json.dumps(vocab), merges="\n".join(TEXT_MERGES), padding_length=-1,
    )  # fmt: skip
    nodes = [
        tokenizer,
        helper.make_node("Gather", ["table", "ids"], ["vectors"], name="encode"),
        helper.make_node("Cast", ["mask"], ["weights"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["weights", "last_axis"], ["weights3"]),
        helper.make_node("Mul", ["vectors", "weights3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "token_axis"], ["sums"], keepdims=0),
        helper.make_node("ReduceSum", ["weights", "token_axis"], ["tokens"], keepdims=1),
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
