"""Conversions for ``maas infer``: user input -> ModelInferRequest, ModelInferResponse -> JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference import grpc_service_pb2 as pb
from services.common import dtypes
from services.common.errors import InvalidArgument


def parse_input(spec: str) -> tuple[str, npt.NDArray[Any]]:
    """Parse ``name=VALUE`` where VALUE is JSON (a nested list or a scalar) or a ``.npy`` path.

    Raises:
        InvalidArgument: The option is malformed.
    """
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise InvalidArgument(f"--input '{spec}': expected name=JSON or name=FILE.npy")
    if value.endswith(".npy"):
        path = Path(value)
        if not path.is_file():
            raise InvalidArgument(f"--input '{name}': file {value} does not exist")
        return name, np.load(path, allow_pickle=False)
    try:
        return name, np.asarray(json.loads(value))
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"--input '{name}': value is not JSON ({exc.msg}) nor a .npy file") from exc


def _cast(name: str, array: npt.NDArray[Any], datatype: str) -> npt.NDArray[Any]:
    dt = dtypes.datatype(datatype)
    if dt.itemsize is None:
        encoded: npt.NDArray[Any] = np.vectorize(
            lambda v: v if isinstance(v, bytes) else str(v).encode(), otypes=[object]
        )(array)
        return encoded
    try:
        return array.astype(dt.numpy, casting="same_kind" if array.dtype.kind != "i" else "unsafe")
    except TypeError as exc:
        raise InvalidArgument(f"--input '{name}': values of type {array.dtype} cannot be sent as {datatype}") from exc


def infer_request(
    model: str, version: str, arrays: dict[str, npt.NDArray[Any]], metadata: pb.ModelMetadataResponse
) -> pb.ModelInferRequest:
    """Build a request, casting each array to the datatype the model declares for it.

    Raises:
        InvalidArgument: An input name is not one of the model's.
    """
    declared = {tensor.name: tensor.datatype for tensor in metadata.inputs}
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in arrays.items():
        if name not in declared:
            raise InvalidArgument(f"--input '{name}': model '{model}' has inputs {sorted(declared)}")
        cast = _cast(name, array, declared[name])
        request.inputs.add(name=name, datatype=declared[name], shape=cast.shape)
        request.raw_input_contents.append(dtypes.encode_raw(cast))
    return request


def _jsonable(array: npt.NDArray[Any]) -> Any:
    if array.dtype == object:
        return np.vectorize(lambda b: b.decode(errors="replace"), otypes=[object])(array).tolist()
    return array.tolist()


def infer_result(response: pb.ModelInferResponse) -> dict[str, Any]:
    """Decode every output into a JSON-ready dict."""
    outputs: dict[str, Any] = {}
    for index, tensor in enumerate(response.outputs):
        dt = dtypes.datatype(tensor.datatype)
        array = dtypes.decode_raw(dt, tuple(tensor.shape), response.raw_output_contents[index], name=tensor.name)
        outputs[tensor.name] = {"datatype": tensor.datatype, "shape": list(tensor.shape), "data": _jsonable(array)}
    return {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}


def metadata_request(model: str, version: str) -> pb.ModelMetadataRequest:
    """Build a ModelMetadata request."""
    return pb.ModelMetadataRequest(name=model, version=version)


def ready_request(model: str) -> pb.ModelReadyRequest:
    """Build a ModelReady request."""
    return pb.ModelReadyRequest(name=model)
