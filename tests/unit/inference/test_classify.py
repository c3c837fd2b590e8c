"""Triton's classification extension as a pure function: top-k classes as BYTES strings."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.metadata import TensorSpec, parse_class_labels
from services.inference import convert
from services.inference.classify import check_class_count, classify_outputs, top_k_classes
from services.inference.runtime import InferRequest, Signature


def strings(array: np.ndarray[Any, Any]) -> list[Any]:
    decoded: list[Any] = np.vectorize(bytes.decode, otypes=[object])(array).tolist() if array.size else []
    return decoded


def test_triton_documented_example() -> None:
    # extension_classification.md: [1, 5, 10, 4] -> top-2 by index is [2, 1].
    got = top_k_classes(np.array([1, 5, 10, 4], np.float32), 2, batched=False)
    assert got.dtype == np.dtype(object)
    assert got.shape == (2,)
    assert strings(got) == ["10.000000:2", "5.000000:1"]


def test_labels_are_appended_only_where_a_label_exists() -> None:
    scores = np.array([0.1, 0.4, 0.3, 0.2], np.float32)
    got = top_k_classes(scores, 4, ("zero", "", "two"), batched=False)
    # index 1: empty label, index 3: past the end of the labels -> no suffix.
    assert strings(got) == ["0.400000:1", "0.300000:2:two", "0.200000:3", "0.100000:0:zero"]


def test_ties_keep_the_lower_index_first() -> None:
    got = top_k_classes(np.array([2, 7, 2, 7, 2], np.int32), 5, batched=False)
    assert strings(got) == ["7:1", "7:3", "2:0", "2:2", "2:4"]


def test_a_class_count_above_the_classes_returns_every_class() -> None:
    got = top_k_classes(np.array([[3.0, 1.0, 2.0]]), 1000, batched=True)
    assert got.shape == (1, 3)
    assert strings(got) == [["3.000000:0", "2.000000:2", "1.000000:1"]]


def test_batched_outputs_are_classified_row_by_row() -> None:
    scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]], np.float32)
    got = top_k_classes(scores, 2, ("a", "b", "c"), batched=True)
    assert got.shape == (2, 2)
    assert strings(got) == [["0.900000:1:b", "0.500000:2:c"], ["0.800000:0:a", "0.300000:2:c"]]


def test_a_row_with_several_dimensions_is_flattened_like_triton() -> None:
    # Triton classifies the whole (batch-1) tensor: the index is the flattened position.
    batched = top_k_classes(np.array([[[1, 9], [8, 2]]], np.int64), 2, batched=True)
    assert batched.shape == (1, 2)
    assert strings(batched) == [["9:1", "8:2"]]
    whole = top_k_classes(np.array([[1, 9], [8, 2]], np.int64), 3, batched=False)
    assert whole.shape == (3,)
    assert strings(whole) == ["9:1", "8:2", "2:3"]


def test_an_empty_batch_and_a_scalar() -> None:
    assert top_k_classes(np.zeros((0, 3), np.float32), 2, batched=True).shape == (0, 2)
    assert strings(top_k_classes(np.array(2.5), 3, batched=True)) == ["2.500000:0"]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        # the float widened to double, printed exactly as glibc does
        (
            np.array([0.5, -1.25, 3.0e38], np.float32),
            ["300000000549775575777803994281145270272.000000:2", "0.500000:0"],
        ),
        (np.array([0.5, -1.25, 1e-9], np.float64), ["0.500000:0", "0.000000:2"]),
        (np.array([0.5, -1.5, 65504.0], np.float16), ["65504.000000:2", "0.500000:0"]),
        (np.array([0, 255, 7], np.uint8), ["255:1", "7:2"]),
        (np.array([-128, 127, 0], np.int8), ["127:1", "0:2"]),
        (np.array([0, 2**64 - 1, 2**63], np.uint64), ["18446744073709551615:1", "9223372036854775808:2"]),
        (np.array([-(2**63), 2**63 - 1, 0], np.int64), ["9223372036854775807:1", "0:2"]),
        (np.array([1, -2, 3], np.int16), ["3:2", "1:0"]),
        (np.array([1, -2, 3], np.int32), ["3:2", "1:0"]),
        (np.array([1, 2, 3], np.uint16), ["3:2", "2:1"]),
        (np.array([1, 2, 3], np.uint32), ["3:2", "2:1"]),
    ],
    ids=lambda value: str(value.dtype) if isinstance(value, np.ndarray) else "",
)
def test_values_are_formatted_like_std_to_string(array: np.ndarray[Any, Any], expected: list[str]) -> None:
    assert strings(top_k_classes(array, 2, batched=False)) == expected


def test_nan_ranks_last_and_infinities_keep_their_order() -> None:
    got = top_k_classes(np.array([np.nan, 1.0, -np.inf, np.inf], np.float32), 4, batched=False)
    assert strings(got) == ["inf:3", "1.000000:1", "nan:0", "-inf:2"]


def test_labels_are_utf8() -> None:
    got = top_k_classes(np.array([1.0]), 1, ("été",), batched=False)
    assert got.tolist() == ["1.000000:0:été".encode()]


@pytest.mark.parametrize("array", [np.array([True, False]), np.array([b"a", b"b"], dtype=object)])
def test_outputs_without_numeric_order_are_refused(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(InvalidArgument, match="class_count needs a numeric output"):
        top_k_classes(array, 1, batched=False)


def test_classify_outputs_replaces_only_the_outputs_asked_for() -> None:
    raw = np.array([[1, 2]], np.int32)
    outputs = {"a": raw, "b": raw}
    got = classify_outputs(outputs, {"a": 1}, (), batched=True)
    assert strings(got["a"]) == [["2:1"]]
    assert got["b"] is raw
    assert classify_outputs(outputs, {}, (), batched=True) is outputs


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        (None, 0, "output 'y': parameter 'classification' (class_count) must be an int64_param, got no value"),
        ("string_param", 0, "must be an int64_param, got string_param"),
        ("int64_param", 0, "output 'y': parameter 'classification' (class_count) must be >= 1, got 0"),
        ("int64_param", -3, "must be >= 1, got -3"),
    ],
)
def test_bad_class_counts_are_refused(kind: str | None, value: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        check_class_count("y", kind, value)


def test_the_request_conversion_reads_class_count_from_the_output_parameters() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.outputs.add(name="y").parameters["classification"].int64_param = 3
    request.outputs.add(name="z")
    decoded = convert.infer_request_from_proto(request)
    assert decoded.outputs == ("y", "z")
    assert decoded.class_counts == {"y": 3}
    request.outputs[1].parameters["classification"].string_param = "3"
    with pytest.raises(InvalidArgument, match=r"output 'z': .* must be an int64_param, got string_param"):
        convert.infer_request_from_proto(request)


def test_the_signature_refuses_class_count_on_a_bool_output() -> None:
    signature = Signature(inputs=(), outputs=(TensorSpec("flags", "BOOL", (-1, 3)),))
    with pytest.raises(InvalidArgument, match="output 'flags': class_count needs a numeric output, not BOOL"):
        signature.validate(InferRequest(id="r", inputs={}, outputs=("flags",), class_counts={"flags": 1}))


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("", ()),
        ("cat\ndog\n", ("cat", "dog")),
        ("cat\r\n\r\ndog", ("cat", "", "dog")),
        ("\n", ("",)),
        ("a b\tc\n", ("a b\tc",)),
    ],
)
def test_labels_files_are_split_into_lines(text: str, labels: tuple[str, ...]) -> None:
    assert parse_class_labels(text) == labels
