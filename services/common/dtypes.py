"""KServe v2 datatypes <-> numpy <-> ONNX, and the raw tensor byte codec.

Raw tensors are little-endian, row-major. A BYTES tensor is the concatenation of its
elements, each preceded by its length as a 4-byte little-endian unsigned integer (the
encoding tritonclient and Triton use).

BF16 is refused everywhere with one reason (``BF16_UNSUPPORTED``): ONNX Runtime's Python API has
no numpy type for bfloat16. BYTES reach a model as UTF-8 text only (``check_utf8``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class DataType:
    """One KServe v2 datatype and its numpy and ONNX equivalents."""

    name: str
    numpy: np.dtype[np.generic]
    onnx: int
    """``onnx.TensorProto.DataType`` value."""
    ort: str
    """ONNX Runtime's type string, e.g. ``tensor(float)``."""
    itemsize: int | None
    """Bytes per element; None for BYTES (variable length)."""
    contents_field: str | None
    """Field of ``InferTensorContents`` that carries it as typed values (FP16 has none: raw only)."""


def _dt(name: str, np_type: str, onnx: int, ort: str, contents: str | None, variable: bool = False) -> DataType:
    dtype = np.dtype(np_type).newbyteorder("<") if not variable else np.dtype(object)
    field = f"{contents}_contents" if contents else None
    return DataType(name, dtype, onnx, f"tensor({ort})", None if variable else dtype.itemsize, field)


DATATYPES: dict[str, DataType] = {
    dt.name: dt
    for dt in (
        _dt("BOOL", "bool", 9, "bool", "bool"),
        _dt("UINT8", "uint8", 2, "uint8", "uint"),
        _dt("UINT16", "uint16", 4, "uint16", "uint"),
        _dt("UINT32", "uint32", 12, "uint32", "uint"),
        _dt("UINT64", "uint64", 13, "uint64", "uint64"),
        _dt("INT8", "int8", 3, "int8", "int"),
        _dt("INT16", "int16", 5, "int16", "int"),
        _dt("INT32", "int32", 6, "int32", "int"),
        _dt("INT64", "int64", 7, "int64", "int64"),
        _dt("FP16", "float16", 10, "float16", None),
        _dt("FP32", "float32", 1, "float", "fp32"),
        _dt("FP64", "float64", 11, "double", "fp64"),
        _dt("BYTES", "object", 8, "string", "bytes", variable=True),
    )
}
_BY_ORT = {dt.ort: dt for dt in DATATYPES.values()}
_BY_ONNX = {dt.onnx: dt for dt in DATATYPES.values()}
SUPPORTED = ", ".join(DATATYPES)
_LENGTH = struct.Struct("<I")
_BF16_ONNX = 16
"""``onnx.TensorProto.BFLOAT16``."""
BF16_UNSUPPORTED = (
    "the workers run ONNX Runtime's Python API, which has no numpy type for bfloat16 and can neither "
    "take nor return such tensors as arrays; use FP16 or FP32"
)
"""Why every BF16 tensor, in a model or a request, is refused."""


def datatype(name: str) -> DataType:
    """Return the datatype called ``name``.

    Raises:
        InvalidArgument: ``name`` is not a KServe v2 datatype MaaS supports.
    """
    try:
        return DATATYPES[name]
    except KeyError:
        if name == "BF16":
            raise InvalidArgument(f"datatype 'BF16' is not supported: {BF16_UNSUPPORTED}") from None
        raise InvalidArgument(f"datatype '{name}' is not supported; expected one of {SUPPORTED}") from None


def from_ort(ort_type: str) -> DataType:
    """Return the datatype of an ONNX Runtime type string such as ``tensor(float)``.

    Raises:
        InvalidArgument: The type has no KServe v2 equivalent (e.g. bfloat16, sequences, maps).
    """
    try:
        return _BY_ORT[ort_type]
    except KeyError:
        if ort_type == "tensor(bfloat16)":
            raise InvalidArgument(f"ONNX type {ort_type} is not supported: {BF16_UNSUPPORTED}") from None
        message = f"ONNX type {ort_type} is not supported; expected tensors of {SUPPORTED}"
        raise InvalidArgument(message) from None


def from_onnx(elem_type: int) -> DataType:
    """Return the datatype of an ``onnx.TensorProto`` element type.

    Raises:
        InvalidArgument: The element type has no KServe v2 equivalent.
    """
    try:
        return _BY_ONNX[elem_type]
    except KeyError:
        if elem_type == _BF16_ONNX:
            raise InvalidArgument(
                f"ONNX element type {elem_type} (bfloat16) is not supported: {BF16_UNSUPPORTED}"
            ) from None
        raise InvalidArgument(f"ONNX element type {elem_type} is not supported") from None


def from_numpy(dtype: np.dtype[np.generic]) -> DataType:
    """Return the datatype of a numpy dtype (str, bytes and object arrays are BYTES).

    Raises:
        InvalidArgument: numpy dtype has no KServe v2 equivalent.
    """
    if dtype.kind in "OSU":
        return DATATYPES["BYTES"]
    found = _BY_NUMPY.get(dtype)
    if found is not None:
        return found
    for dt in DATATYPES.values():
        if dt.itemsize is not None and dt.numpy == dtype.newbyteorder("<"):
            _BY_NUMPY[dtype] = dt
            return dt
    raise InvalidArgument(f"numpy dtype {dtype} is not supported; expected one of {SUPPORTED}")


_BY_NUMPY: dict[np.dtype[np.generic], DataType] = {}
"""``from_numpy``'s answers for fixed-size dtypes (a handful: each byte order of each type), as found.

The search compares with every datatype in turn, each through a byte-order conversion: 5 µs
twice a request on the worker's path (its check of the inputs, the encoding of the outputs)."""


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of ``shape``."""
    return math.prod(shape)


def decode_raw(dt: DataType, shape: Sequence[int], raw: bytes, *, name: str) -> npt.NDArray[np.generic]:
    """Decode a raw tensor into a numpy array of ``shape``.

    Args:
        dt: The tensor's datatype.
        shape: The tensor's shape (no -1).
        raw: The raw bytes.
        name: The tensor's name, for error messages.

    Raises:
        InvalidArgument: The byte size does not match the shape and datatype.
    """
    count = element_count(shape)
    if dt.itemsize is None:
        return decode_bytes(raw, count, name=name).reshape(shape)
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input '{name}': raw contents have {len(raw)} bytes, expected {expected} "
            f"({count} x {dt.name} of {dt.itemsize} bytes for shape {list(shape)})"
        )
    return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)


def _bytes_spans(raw: bytes, count: int, name: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input '{name}': BYTES contents end before element {i} of {count}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"input '{name}': BYTES element {i} claims {length} bytes past the end")
        spans.append((offset, offset + length))
        offset += length
    if offset != len(raw):
        raise InvalidArgument(f"input '{name}': BYTES contents have {len(raw) - offset} bytes after {count} elements")
    return spans


def check_bytes(raw: bytes, count: int, *, name: str) -> None:
    """Check that ``raw`` holds exactly ``count`` length-prefixed BYTES elements, without copying them.

    Raises:
        InvalidArgument: The buffer is truncated or has bytes left over.
    """
    _bytes_spans(raw, count, name)


def decode_bytes(raw: bytes, count: int, *, name: str) -> npt.NDArray[np.object_]:
    """Decode ``count`` length-prefixed BYTES elements.

    Raises:
        InvalidArgument: The buffer is truncated or has bytes left over.
    """
    out = np.empty(count, dtype=object)
    for i, (start, end) in enumerate(_bytes_spans(raw, count, name)):
        out[i] = raw[start:end]
    return out


def check_utf8(array: npt.NDArray[np.generic], *, name: str) -> None:
    """Check that every element of a decoded BYTES tensor is UTF-8 text: the only bytes a model can get.

    ONNX Runtime's Python API builds each string-tensor element from ``str(element)`` encoded as
    UTF-8 and decodes string outputs as UTF-8, so only UTF-8 text can reach a model and come back
    (empty elements and embedded NULs included); other bytes are refused here, per request.

    Args:
        array: Decoded BYTES elements (``bytes``; other objects are taken as text).
        name: The tensor's name, for error messages.

    Raises:
        InvalidArgument: An element is not UTF-8 text (the message names the input and the element).
    """
    for index, item in enumerate(array.reshape(-1)):
        if not isinstance(item, bytes):
            continue
        try:
            item.decode()
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"input '{name}': BYTES element {index} is not UTF-8 text "
                f"(byte {exc.start} is {item[exc.start]:#04x}); "
                "ONNX Runtime's Python API passes string tensors as UTF-8 text only, so arbitrary bytes cannot "
                "reach the model: encode them (e.g. base64) or send them as a UINT8 tensor"
            ) from None


def encode_raw(array: npt.NDArray[np.generic]) -> bytes:
    """Encode a numpy array as raw tensor bytes (BYTES for str/bytes/object arrays)."""
    if array.dtype.kind in "OSU":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode() if isinstance(item, str) else bytes(cast(bytes, item))
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
