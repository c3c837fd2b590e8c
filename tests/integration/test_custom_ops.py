"""Text in through onnxruntime-extensions custom operators (issue 11 point 2), end to end.

A model built here (tests/models.py ``text_embedding_model``) tokenises BYTES text with the
ai.onnx.contrib GPT2Tokenizer (byte-level BPE, a batch padded to its longest string), embeds the
tokens and averages them under the attention mask; it is pushed with ``custom_ops=["onnxruntime-extensions"]``,
served, and called with strings from tritonclient, the Python client and raw typed contents.
Without the declaration, or with any other library, the upload is refused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime_extensions import get_library_path

from inference import grpc_service_pb2 as pb
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.client import AsyncMaasClient, InvalidArgument
from services.common.custom_ops import EXTENSIONS
from services.common.dtypes import DATATYPES, decode_raw
from tests.integration.suite import Suite, run_cli
from tests.models import TEXT_EMBEDDING_DIM, identity_model, text_embedding_model
from tests.triton import triton_calls

pytestmark = pytest.mark.integration

TEXTS = ["Hello world", "hello", "", "The quick brown fox", "héllo wörld 😀", "  spaced   out  "]


def _direct(model: bytes, texts: list[str]) -> npt.NDArray[np.float32]:
    """The same model run in ONNX Runtime in this process, the library registered by hand."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    (out,) = session.run(["embedding"], {"text": np.array(texts, dtype=object)})
    return np.asarray(out, dtype=np.float32)


async def test_text_in_served_end_to_end(suite: Suite) -> None:
    model = text_embedding_model()
    expected = _direct(model, TEXTS)
    assert not np.allclose(expected[0], expected[1])  # the words matter: a test that can fail
    alone = np.concatenate([_direct(model, [text]) for text in TEXTS])
    np.testing.assert_allclose(expected, alone, rtol=1e-6, atol=1e-6)  # the padding of a batch is masked out
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        version = await client.push("embed", model, custom_ops=[EXTENSIONS, EXTENSIONS])
        assert version.custom_ops == (EXTENSIONS,)
        assert (await suite.registry.get_version("embed", version.version)).custom_ops == (EXTENSIONS,)
        await client.deploy("embed", version.version, max_batch_size=8)
        assert suite.worker is not None
        await suite.worker.reconcile()
        result = await client.infer("embed", {"text": np.array(TEXTS)})
        metadata = await client.model_metadata("embed")
    np.testing.assert_allclose(result["embedding"], expected, rtol=1e-6, atol=1e-6)
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("text", "BYTES", (-1,))]
    assert [(t.name, t.datatype, t.shape) for t in metadata.outputs] == [
        ("embedding", "FP32", (-1, TEXT_EMBEDDING_DIM))
    ]

    typed = pb.ModelInferRequest(model_name="embed")
    tensor = typed.inputs.add(name="text", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend(text.encode() for text in TEXTS[3:5])
    reply = await suite.inference.ModelInfer(typed, timeout=20)
    embedding = decode_raw(DATATYPES["FP32"], tuple(reply.outputs[0].shape), reply.raw_output_contents[0], name="e")
    np.testing.assert_allclose(embedding, expected[3:5], rtol=1e-6, atol=1e-6)

    triton_input = {"text": {"data": TEXTS, "dtype": "object"}}
    infer, meta = await asyncio.to_thread(
        triton_calls,
        suite.gateway_address,
        [{"op": "infer", "model": "embed", "inputs": triton_input}, {"op": "metadata", "model": "embed"}],
    )
    np.testing.assert_allclose(np.array(infer["ok"]["outputs"]["embedding"]), expected, rtol=1e-6, atol=1e-6)
    assert meta["ok"]["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]


async def test_undeclared_custom_ops_are_refused_naming_op_and_domain(suite: Suite) -> None:
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        with pytest.raises(InvalidArgument) as refused:
            await client.push("embed", text_embedding_model())
    message = refused.value.message
    assert "operator 'GPT2Tokenizer' of domain 'ai.onnx.contrib'" in message
    assert f"custom_ops=['{EXTENSIONS}']" in message
    assert (await suite.registry.list_versions("embed")) == []


async def test_other_libraries_are_refused(suite: Suite) -> None:
    async with AsyncMaasClient(suite.gateway_address, suite.registry_address) as client:
        with pytest.raises(InvalidArgument) as refused:
            await client.push("plain", identity_model(TensorProto.FLOAT, [-1, 2]), custom_ops=["/tmp/libevil.so"])
        # The declaration is harmless on a model that uses no custom operator.
        version = await client.push("plain", identity_model(TensorProto.FLOAT, [-1, 2]), custom_ops=[EXTENSIONS])
    assert refused.value.message == (
        "custom_ops: '/tmp/libevil.so' is not supported; the only custom-operator library is "
        "'onnxruntime-extensions' (no other native code is loaded for uploaded models)"
    )
    assert version.custom_ops == (EXTENSIONS,)


async def test_operators_of_unknown_domains_are_refused_with_a_hint(suite: Suite) -> None:
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    await suite.registry.create_model("odd")
    with pytest.raises(InvalidArgument) as refused:
        await suite.registry.upload_version("odd", model.SerializeToString(), custom_ops=[EXTENSIONS])
    assert "com.example:Frobnicate" in refused.value.message
    assert f"the only custom operators MaaS loads are {EXTENSIONS}'s" in refused.value.message


async def test_cli_push_declares_custom_ops(suite: Suite, tmp_path: Path) -> None:
    path = tmp_path / "embed.onnx"
    path.write_bytes(text_embedding_model())
    code, out, err = await run_cli(
        suite, "models", "push", str(path), "--name", "embed", "--custom-ops", EXTENSIONS, "--no-deploy"
    )
    assert code == 0, err
    assert "pushed model 'embed' version 1" in out
    code, out, err = await run_cli(suite, "models", "push", str(path), "--name", "embed", "--custom-ops", "x")
    assert code != 0
    assert "custom_ops: 'x' is not supported" in out + err
    assert (await suite.registry.get_version("embed", 0)).custom_ops == (EXTENSIONS,)


async def test_unsupported_status_code_is_invalid_argument(suite: Suite) -> None:
    """Through the raw registry API, the refusal is INVALID_ARGUMENT (what any language's stub sees)."""
    await suite.registry.create_model("raw")
    header = registry_pb2.UploadVersionHeader(model="raw", sha256="0" * 64, size_bytes=1, custom_ops=["cuda-ops"])
    async with grpc.aio.insecure_channel(suite.registry_address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.UploadVersion(iter([registry_pb2.UploadVersionRequest(header=header)]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "custom_ops: 'cuda-ops' is not supported" in (refused.value.details() or "")
