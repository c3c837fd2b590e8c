"""Custom-operator declarations: the allowed library, and the upload check of a model's operators."""

from __future__ import annotations

import re

import onnx
import pytest
from onnx import TensorProto, helper

from services.common.custom_ops import EXTENSIONS, check_custom_ops, undeclared_extension_op
from services.common.errors import InvalidArgument
from services.registry.sandbox import check_declared_ops
from tests.models import text_embedding_model


def test_only_onnxruntime_extensions_is_accepted_and_duplicates_collapse() -> None:
    assert check_custom_ops([]) == ()
    assert check_custom_ops([EXTENSIONS, EXTENSIONS]) == (EXTENSIONS,)
    with pytest.raises(InvalidArgument, match=re.escape("custom_ops: 'libcustom.so' is not supported; the only")):
        check_custom_ops([EXTENSIONS, "libcustom.so"])
    with pytest.raises(InvalidArgument, match=r"custom_ops: 'a\\nb' is not supported"):
        check_custom_ops(["a\nb"])  # echoed escaped


@pytest.mark.parametrize("domain", ["ai.onnx.contrib", "com.microsoft.extensions"])
def test_an_extension_domain_needs_the_declaration(domain: str) -> None:
    nodes = [("n0", "Add", ""), ("tok", "GPT2Tokenizer", domain)]
    reason = undeclared_extension_op(nodes, ())
    assert reason is not None
    assert reason.startswith(f"node 'tok' uses operator 'GPT2Tokenizer' of domain '{domain}'")
    assert undeclared_extension_op(nodes, (EXTENSIONS,)) is None
    assert undeclared_extension_op([("n0", "Add", ""), ("q", "QLinearAdd", "com.microsoft")], ()) is None


def _if_model_with_contrib_in_branch() -> onnx.ModelProto:
    """An If whose then-branch lowers a string with ai.onnx.contrib's StringLower (a subgraph)."""
    out = helper.make_tensor_value_info("out", TensorProto.STRING, [1])
    then_graph = helper.make_graph(
        [helper.make_node("StringLower", ["text"], ["out"], name="deep", domain="ai.onnx.contrib")], "then", [], [out]
    )
    else_graph = helper.make_graph([helper.make_node("Identity", ["text"], ["out"])], "else", [], [out])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph(
        [node],
        "branchy",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("text", TensorProto.STRING, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [1])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.contrib", 1)]
    )


def _function_model() -> onnx.ModelProto:
    """A model-local function whose body uses ai.onnx.contrib's StringUpper."""
    upper = helper.make_node("StringUpper", ["x"], ["y"], name="inner", domain="ai.onnx.contrib")
    function = helper.make_function(
        "local", "Shout", ["x"], ["y"], [upper], [helper.make_opsetid("ai.onnx.contrib", 1)]
    )
    graph = helper.make_graph(
        [helper.make_node("Shout", ["text"], ["y"], domain="local")],
        "functional",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [1])],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("local", 1), helper.make_opsetid("ai.onnx.contrib", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[function])


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (onnx.load_from_string(text_embedding_model()), "node 'tokenize' uses operator 'GPT2Tokenizer'"),
        (_if_model_with_contrib_in_branch(), "node 'deep' uses operator 'StringLower'"),
        (_function_model(), "node 'inner' uses operator 'StringUpper'"),
    ],
)
def test_the_upload_check_finds_extension_operators_anywhere(model: onnx.ModelProto, named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        check_declared_ops(model, ())
    check_declared_ops(model, (EXTENSIONS,))
