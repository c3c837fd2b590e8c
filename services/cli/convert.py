"""Conversions for ``maas infer``: user input -> ModelInferRequest, ModelInferResponse -> JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference import grpc_service_pb2 as pb
from services.client import convert as client_convert
from services.client.results import InferResult, ModelMetadata
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


def cast_inputs(
    model: str, arrays: dict[str, npt.NDArray[Any]], signature: ModelMetadata
) -> dict[str, npt.NDArray[Any]]:
    """Cast each array to the datatype the model declares for it.

    Raises:
        InvalidArgument: An input name is not one of the model's, or its values cannot be cast.
    """
    declared = {tensor.name: tensor.datatype for tensor in signature.inputs}
    cast: dict[str, npt.NDArray[Any]] = {}
    for name, array in arrays.items():
        if name not in declared:
            raise InvalidArgument(f"--input '{name}': model '{model}' has inputs {sorted(declared)}")
        cast[name] = _cast(name, array, declared[name])
    return cast


def _jsonable(array: npt.NDArray[Any]) -> Any:
    if array.dtype == object:
        return np.vectorize(lambda b: b.decode(errors="replace"), otypes=[object])(array).tolist()
    return array.tolist()


def result_json(result: InferResult) -> dict[str, Any]:
    """Return a reply as a JSON-ready dict (BYTES decoded as UTF-8)."""
    outputs = {
        name: {"datatype": dtypes.from_numpy(array.dtype).name, "shape": list(array.shape), "data": _jsonable(array)}
        for name, array in result.items()
    }
    return {"model_name": result.model_name, "model_version": result.model_version, "outputs": outputs}


def infer_request(
    model: str, version: str, arrays: dict[str, npt.NDArray[Any]], metadata: pb.ModelMetadataResponse
) -> pb.ModelInferRequest:
    """Build the request ``maas infer`` sends: ``cast_inputs``, then the client's encoding."""
    cast = cast_inputs(model, arrays, client_convert.metadata_from_proto(metadata))
    return client_convert.infer_request(model, cast, version=version, outputs=())


def infer_result(response: pb.ModelInferResponse) -> dict[str, Any]:
    """Decode a reply as ``maas infer`` prints it: the client's decoding, then ``result_json``."""
    return result_json(client_convert.infer_result(response))
