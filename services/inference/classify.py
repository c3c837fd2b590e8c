"""Triton's classification extension: an output's top-k classes as BYTES strings.

A requested output with the ``classification`` parameter (tritonclient's ``class_count``) is
returned as BYTES strings ``"<value>:<index>[:<label>]"`` instead of its raw tensor, highest
value first, as Triton's ``TopkClassifications`` builds them:

- ``<value>`` is formatted like C++ ``std::to_string``: ``%f`` (six decimals) for floating
  point outputs, the plain integer for integer outputs.
- ``<index>`` is the class index: the element's position in the row, flattened when the row
  has more than one dimension.
- ``:<label>`` follows only when the version has a non-empty label for that index.
- A batched model (first dimension variable) is classified row by row: shape ``[rows, k]``;
  any other output as a whole: shape ``[k]``. ``k`` is ``min(class_count, classes)``.
- Equal values keep the lower index first (Triton's order of ties is unspecified); NaN ranks
  as -inf. FP16 is accepted (Triton refuses it); BOOL and BYTES are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from services.common.errors import InvalidArgument

PARAMETER = "classification"
"""Name of the requested-output parameter (an ``int64_param``) that asks for classification."""
_REFUSED_KINDS = frozenset("bOSUV")
"""numpy dtype kinds without an order Triton classifies: bool, object, bytes, str, void."""

Array = npt.NDArray[np.generic]


def is_classifiable(datatype: str) -> bool:
    """Whether an output of KServe v2 ``datatype`` can be classified (numeric, not BOOL)."""
    return datatype not in ("BOOL", "BYTES")


def check_class_count(output: str, kind: str | None, value: int) -> int:
    """Check the ``classification`` parameter of a requested output and return the class count.

    Args:
        output: The output's name (for the message).
        kind: Which ``InferParameter`` field is set (``int64_param``, ...; None if none).
        value: The ``int64_param`` value (ignored for other kinds).

    Raises:
        InvalidArgument: It is not an ``int64_param``, or not >= 1.
    """
    if kind != "int64_param":
        raise InvalidArgument(
            f"output '{output}': parameter '{PARAMETER}' (class_count) must be an int64_param, got {kind or 'no value'}"
        )
    if value < 1:
        raise InvalidArgument(f"output '{output}': parameter '{PARAMETER}' (class_count) must be >= 1, got {value}")
    return value


def top_k_classes(array: Array, class_count: int, labels: Sequence[str] = (), *, batched: bool) -> Array:
    """Return the ``class_count`` highest classes of ``array`` as a BYTES (object) array.

    Args:
        array: The model's output.
        class_count: How many classes to return (>= 1); fewer if the output has fewer.
        labels: Class labels by index; an index without a (non-empty) label gets no suffix.
        batched: Whether the first dimension is the batch: each row is classified on its own.

    Returns:
        UTF-8 ``b"<value>:<index>[:<label>]"`` elements, shape ``[rows, k]`` if ``batched``
        (and the array has a dimension), else ``[k]``.

    Raises:
        InvalidArgument: The output is BOOL, BYTES or another type without numeric order.
    """
    if array.dtype.kind in _REFUSED_KINDS:
        raise InvalidArgument(f"class_count needs a numeric output, got numpy dtype {array.dtype}")
    is_rows = batched and array.ndim > 0
    classes = math.prod(array.shape[1:]) if is_rows else array.size
    rows = array.reshape(array.shape[0] if is_rows else 1, classes)
    k = min(class_count, classes)
    order = _descending(rows)[:, :k]
    is_float = array.dtype.kind == "f"
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        row = rows[r]
        for j in range(k):
            index = int(order[r, j])
            value = f"{float(row[index]):f}" if is_float else str(int(row[index]))
            label = labels[index] if index < len(labels) else ""
            text = f"{value}:{index}:{label}" if label else f"{value}:{index}"
            out[r, j] = text.encode()
    return out if is_rows else out.reshape(k)


def _descending(rows: Array) -> npt.NDArray[np.intp]:
    """Indexes of each row's elements by value, highest first, equal values lowest index first."""
    # NOTE: a stable ascending sort of the reversed row, reversed again, orders equal values by
    # ascending index, with no negation (which would overflow unsigned and minimum integers).
    reversed_rows = rows[:, ::-1]
    if rows.dtype.kind == "f":
        reversed_rows = np.where(np.isnan(reversed_rows), -np.inf, reversed_rows)
    ascending: npt.NDArray[np.intp] = np.argsort(reversed_rows, axis=1, kind="stable")
    descending: npt.NDArray[np.intp] = rows.shape[1] - 1 - ascending[:, ::-1]
    return descending


def classify_outputs(
    outputs: Mapping[str, Array], class_counts: Mapping[str, int], labels: Sequence[str], *, batched: bool
) -> Mapping[str, Array]:
    """Replace each output named in ``class_counts`` by its top classes (``top_k_classes``).

    Returns ``outputs`` itself when nothing is classified (the common case costs nothing).
    """
    if not class_counts:
        return outputs
    return {
        name: top_k_classes(array, class_counts[name], labels, batched=batched) if name in class_counts else array
        for name, array in outputs.items()
    }
