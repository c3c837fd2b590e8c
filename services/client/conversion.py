"""scikit-learn estimators to ONNX on the user's own machine, checked against the estimator before a push.

``maas models convert`` and ``MaasClient.convert_and_push`` build on it. A file is loaded here,
never on the server: a skops file only with the types it holds confirmed as trusted, a pickle
(``.joblib``/``.pkl``) only when the caller allows it, since unpickling runs the file's code.
skl2onnx converts the estimator (classifiers without ZipMap, so their outputs are tensors: the label
and the probabilities); ONNX Runtime then runs the ONNX model on sample rows and every output is
compared with the estimator's own ``predict``/``predict_proba``/``transform``. A difference over
the tolerance refuses the conversion, naming the output and by how much.

Needs the ``convert`` extra: ``pip install 'maas[convert]'`` (scikit-learn, skl2onnx, skops).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from services.common.errors import FailedPrecondition, InvalidArgument

INPUT_NAME = "input"
"""Name of the converted model's one input: a [-1, n_features] matrix."""
DEFAULT_TOLERANCE = 1e-4
"""Default of ``tolerance``: |onnx - estimator| <= tol + tol * |estimator| (float32 against float64)."""
DEFAULT_OPSET = 17
"""ONNX opset of converted models: one that every ONNX Runtime >= 1.14 (workers may be older) runs."""
RANDOM_ROWS = 64
"""Rows checked when no sample is given."""
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
"""Files loaded with joblib (unpickling: runs code; only with ``allow_pickle``)."""
SAMPLE_SUFFIXES = (".npy", ".npz", ".csv")
"""Sample files ``load_sample`` reads."""
_INSTALL_HINT = "pip install 'maas[convert]'"

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class OutputCheck:
    """One ONNX output compared with what the estimator computes on the same rows."""

    name: str
    """The ONNX output's name (``label``, ``probabilities``, ``variable``)."""
    reference: str
    """The estimator method it was compared with (``predict``, ``predict_proba``, ``transform``)."""
    max_abs_diff: float
    """Largest absolute difference (inf when the shapes differ; 0 or 1 for labels)."""
    differing: int
    """Values over the tolerance (labels: rows whose label differs)."""
    is_label: bool = False
    """Whether the output is a label, compared for equality."""

    @property
    def is_ok(self) -> bool:
        """Whether every value is within the tolerance."""
        return self.differing == 0


@dataclass(frozen=True)
class Conversion:
    """A converted estimator: the ONNX bytes, its class labels and the checks it passed."""

    model: bytes
    class_labels: tuple[str, ...]
    """``classes_`` as text, by class index, for a classifier (Triton's classification extension)."""
    checks: tuple[OutputCheck, ...]
    rows_checked: int
    is_random_sample: bool
    """Whether the rows were random (no sample given): real rows check the conversion better."""
    estimator_type: str


def _require(module: str) -> ModuleType:
    """Import ``module`` of the ``convert`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FailedPrecondition(f"converting scikit-learn models needs {module}: {_INSTALL_HINT}") from None


def untrusted_types(path: Path) -> list[str]:
    """Return the types in a skops file that skops does not trust by default (each must be confirmed).

    Raises:
        InvalidArgument: The file is not a skops file.
    """
    sio = _require("skops.io")
    try:
        return sorted(sio.get_untrusted_types(file=path))
    except Exception as exc:  # skops raises zipfile, KeyError or json errors for a broken file
        raise InvalidArgument(f"{path.name}: not a skops file ({exc})") from None


def load_estimator(
    path: Path, *, trusted: Sequence[str] = (), trust_all: bool = False, allow_pickle: bool = False
) -> Any:
    """Load a scikit-learn estimator saved with skops (``.skops``) or joblib (``.joblib``/``.pkl``).

    Args:
        path: The file.
        trusted: Types of the skops file the caller confirms as trusted (see ``untrusted_types``).
        trust_all: Trust every type of the skops file.
        allow_pickle: Load a pickle: it runs whatever code the file holds, on this machine.

    Returns:
        The estimator.

    Raises:
        FailedPrecondition: The skops file holds types not confirmed as trusted (it names them), a
            pickle without ``allow_pickle``, or the ``convert`` extra is missing.
        InvalidArgument: The file's kind is unknown, or it cannot be loaded.
    """
    suffix = path.suffix.lower()
    if suffix == ".skops":
        return _load_skops(path, trusted, trust_all=trust_all)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FailedPrecondition(
                f"{path.name} is a pickle: loading it runs any code it holds. Load only files you trust, with "
                "--allow-pickle (allow_pickle=True), or save the estimator with skops instead"
            )
        joblib = _require("joblib")
        try:
            return joblib.load(path)
        except Exception as exc:  # unpickling raises anything the file's code raises
            raise InvalidArgument(f"{path.name}: cannot be loaded with joblib ({exc!r})") from None
    raise InvalidArgument(f"{path.name}: expected a .skops, .joblib or .pkl file")


def _load_skops(path: Path, trusted: Sequence[str], *, trust_all: bool) -> Any:
    found = untrusted_types(path)
    missing = [name for name in found if name not in trusted]
    if missing and not trust_all:
        raise FailedPrecondition(
            f"{path.name} holds types skops does not trust by default: {', '.join(missing)}. Check them, then "
            f"confirm each with --trust {' --trust '.join(missing)} (trusted=[...]), or --trust-all"
        )
    sio = _require("skops.io")
    try:
        return sio.load(path, trusted=found)
    except Exception as exc:  # skops raises many kinds for a broken or hostile file
        raise InvalidArgument(f"{path.name}: cannot be loaded with skops ({exc})") from None


def load_sample(path: Path) -> Array:
    """Read sample rows: a ``.npy`` matrix, a ``.npz`` (its array ``X``, or its only one), or a ``.csv``.

    A CSV is read as float32; a first line that is not numbers is taken as a header.

    Raises:
        InvalidArgument: The file is missing, of another kind, or not a 2-D matrix.
    """
    suffix = path.suffix.lower()
    if suffix not in SAMPLE_SUFFIXES or not path.is_file():
        raise InvalidArgument(f"--sample {path}: expected an existing .npy, .npz or .csv file")
    try:
        rows = _read_rows(path, suffix)
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"--sample {path.name}: cannot be read ({exc})") from None
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise InvalidArgument(f"--sample {path.name}: expected a matrix of rows [n, features], got shape {rows.shape}")
    return rows


def _read_rows(path: Path, suffix: str) -> Array:
    if suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.keys())
            if "X" not in names and len(names) != 1:
                raise ValueError(f"expected an array named X or a single array, found {names}")
            return np.asarray(archive["X" if "X" in names else names[0]])
    try:
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError:
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2, skiprows=1)


def random_sample(n_features: int, rows: int = RANDOM_ROWS, seed: int = 0) -> Array:
    """Return ``rows`` standard-normal float32 rows of ``n_features`` (when the user gives no sample)."""
    return np.random.default_rng(seed).standard_normal((rows, n_features)).astype(np.float32)


def n_features_of(estimator: Any, n_features: int | None = None) -> int:
    """Return the estimator's input width: ``n_features``, else its ``n_features_in_``.

    Raises:
        InvalidArgument: Neither is known.
    """
    width = n_features if n_features is not None else getattr(estimator, "n_features_in_", None)
    if not isinstance(width, int | np.integer) or width < 1:
        raise InvalidArgument("the estimator does not tell its number of features: give --n-features or --sample")
    return int(width)


def _tensor_type(dtype: np.dtype[Any], width: int) -> Any:
    types = _require("skl2onnx.common.data_types")
    if dtype == np.float64:
        return types.DoubleTensorType([None, width])
    if dtype.kind in "iu":
        return types.Int64TensorType([None, width])
    if dtype == np.float32:
        return types.FloatTensorType([None, width])
    raise InvalidArgument(f"sample rows of dtype {dtype}: expected float32, float64 or integers")


def to_onnx(estimator: Any, rows: Array, *, opset: int = DEFAULT_OPSET) -> bytes:
    """Convert ``estimator`` with skl2onnx, its input typed as ``rows`` (dtype, width; any number of rows).

    Raises:
        InvalidArgument: skl2onnx cannot convert it (an estimator or option it does not support).
    """
    skl2onnx = _require("skl2onnx")
    sklearn_base = _require("sklearn.base")
    initial = [(INPUT_NAME, _tensor_type(rows.dtype, rows.shape[1]))]
    options = {id(estimator): {"zipmap": False}} if sklearn_base.is_classifier(estimator) else None
    try:
        model = skl2onnx.convert_sklearn(estimator, initial_types=initial, options=options, target_opset=opset)
    except Exception as exc:  # skl2onnx raises RuntimeError, NotImplementedError, MissingShapeCalculator...
        raise InvalidArgument(f"skl2onnx cannot convert {type(estimator).__name__}: {exc}") from None
    return bytes(model.SerializeToString())


def _references(estimator: Any, rows: Array) -> list[tuple[str, Array]]:
    """What each ONNX output should equal, in output order: (estimator method, its result)."""
    sklearn_base = _require("sklearn.base")
    if sklearn_base.is_classifier(estimator):
        return [("predict", estimator.predict(rows)), ("predict_proba", estimator.predict_proba(rows))]
    if hasattr(estimator, "predict"):
        return [("predict", estimator.predict(rows))]
    if hasattr(estimator, "transform"):
        return [("transform", estimator.transform(rows))]
    raise InvalidArgument(f"cannot check a {type(estimator).__name__}: it has no predict or transform method")


def _compare(name: str, method: str, got: Array, expected: Array, tolerance: float) -> OutputCheck:
    got, expected = np.asarray(got), np.asarray(expected)
    if got.size != expected.size:
        return OutputCheck(name, method, float("inf"), differing=max(got.size, expected.size))
    got, expected = got.reshape(-1), expected.reshape(-1)
    if _is_label(got) or _is_label(expected):
        unequal = got.astype(str) != expected.astype(str)
        return OutputCheck(name, method, float(unequal.any()), int(np.count_nonzero(unequal)), is_label=True)
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    allowed = tolerance + tolerance * np.abs(expected.astype(np.float64))
    return OutputCheck(name, method, float(diff.max(initial=0.0)), int(np.count_nonzero(~(diff <= allowed))))


def _is_label(values: Array) -> bool:
    """Whether values are labels (text, bool or integers), compared for equality rather than closeness."""
    return values.dtype.kind in "OUSbiu"


def check_outputs(estimator: Any, model: bytes, rows: Array, *, tolerance: float) -> tuple[OutputCheck, ...]:
    """Run ``model`` with ONNX Runtime (CPU) on ``rows`` and compare each output with the estimator's.

    Raises:
        InvalidArgument: ONNX Runtime cannot run the model, or the estimator has no method to compare with.
    """
    import onnxruntime as ort  # heavy: imported by a conversion only, not by every client user

    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        results = session.run(None, {INPUT_NAME: rows})
    except Exception as exc:  # ORT raises its own Fail/InvalidArgument/RuntimeException classes
        raise InvalidArgument(f"ONNX Runtime cannot run the converted model: {exc}") from None
    names = [output.name for output in session.get_outputs()]
    references = _references(estimator, rows)
    return tuple(
        _compare(name, method, got, expected, tolerance)
        for name, got, (method, expected) in zip(names, results, references, strict=False)
    )


def _mismatch_message(checks: Sequence[OutputCheck], tolerance: float) -> str:
    parts = []
    for check in checks:
        if check.is_ok:
            continue
        if check.is_label:
            parts.append(f"output '{check.name}' differs from {check.reference}() on {check.differing} rows")
        else:
            parts.append(
                f"output '{check.name}' differs from {check.reference}() by up to {check.max_abs_diff:.3g} on "
                f"{check.differing} values (allowed: {tolerance:g} + {tolerance:g} x |value|)"
            )
    return "the ONNX model does not match the estimator: " + "; ".join(parts) + ". Nothing was pushed"


def convert_estimator(
    estimator: Any,
    sample: Array | None = None,
    *,
    n_features: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
) -> Conversion:
    """Convert an estimator (an object: works from a notebook) and check it on sample rows.

    Args:
        estimator: A fitted scikit-learn estimator or pipeline.
        sample: Rows [n, features] it is typed and checked on; None: random rows (``is_random_sample``).
        n_features: The input width when there is no sample and the estimator does not tell it.
        tolerance: Allowed |onnx - estimator| per value: ``tolerance + tolerance * |estimator|``;
            labels must be equal.
        opset: The ONNX opset.

    Returns:
        The ONNX model, its class labels and the checks.

    Raises:
        FailedPrecondition: An output differs from the estimator's over the tolerance (named, with
            the difference), or the ``convert`` extra is missing.
        InvalidArgument: The sample, the estimator or the tolerance cannot be used.
    """
    if not tolerance >= 0:
        raise InvalidArgument(f"tolerance must be >= 0, got {tolerance}")
    rows = random_sample(n_features_of(estimator, n_features)) if sample is None else np.asarray(sample)
    if rows.ndim != 2:
        raise InvalidArgument(f"sample: expected a matrix of rows [n, features], got shape {rows.shape}")
    model = to_onnx(estimator, rows, opset=opset)
    checks = check_outputs(estimator, model, rows, tolerance=tolerance)
    if not all(check.is_ok for check in checks):
        raise FailedPrecondition(_mismatch_message(checks, tolerance))
    return Conversion(
        model=model,
        class_labels=_class_labels(estimator),
        checks=checks,
        rows_checked=rows.shape[0],
        is_random_sample=sample is None,
        estimator_type=type(estimator).__name__,
    )


def _class_labels(estimator: Any) -> tuple[str, ...]:
    if not _require("sklearn.base").is_classifier(estimator):
        return ()
    return tuple(str(label) for label in getattr(estimator, "classes_", ()))
