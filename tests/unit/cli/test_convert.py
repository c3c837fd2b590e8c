"""`maas infer` input parsing and conversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from services.cli import convert
from services.common.errors import InvalidArgument

METADATA = pb.ModelMetadataResponse(
    name="m",
    inputs=[
        pb.ModelMetadataResponse.TensorMetadata(name="x", datatype="FP32", shape=[-1, 2]),
        pb.ModelMetadataResponse.TensorMetadata(name="s", datatype="BYTES", shape=[-1]),
    ],
)


def test_json_and_npy_inputs(tmp_path: Path) -> None:
    name, array = convert.parse_input("x=[[1, 2], [3, 4]]")
    assert name == "x" and array.tolist() == [[1, 2], [3, 4]]
    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 2), np.float32))
    assert convert.parse_input(f"x={path}")[1].dtype == np.float32


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("x", "expected name=JSON or name=FILE.npy"),
        ("=[1]", "expected name=JSON or name=FILE.npy"),
        ("x=[1,", "value is not JSON"),
        ("x=missing.npy", "file missing.npy does not exist"),
    ],
)
def test_bad_inputs(spec: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        convert.parse_input(spec)


def test_request_casts_to_declared_datatypes_and_result_decodes() -> None:
    arrays = {"x": np.array([[1, 2]]), "s": np.array(["hé", "b"])}
    request = convert.infer_request("m", "", arrays, METADATA)
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("x", "FP32", [1, 2]), ("s", "BYTES", [2])]
    assert np.frombuffer(request.raw_input_contents[0], np.float32).tolist() == [1.0, 2.0]
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="s", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(request.raw_input_contents[1])
    assert convert.infer_result(response)["outputs"]["s"]["data"] == ["hé", "b"]


def test_unknown_input_name() -> None:
    with pytest.raises(InvalidArgument, match=r"--input 'z': model 'm' has inputs \['s', 'x'\]"):
        convert.infer_request("m", "", {"z": np.array([1])}, METADATA)


def test_floats_are_not_silently_truncated_to_integers() -> None:
    metadata = pb.ModelMetadataResponse(
        name="m", inputs=[pb.ModelMetadataResponse.TensorMetadata(name="i", datatype="INT64", shape=[-1])]
    )
    with pytest.raises(InvalidArgument, match="values of type float64 cannot be sent as INT64"):
        convert.infer_request("m", "", {"i": np.array([1.5])}, metadata)
