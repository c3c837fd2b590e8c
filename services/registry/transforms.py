"""The child-process side of optimisation: run one transform, then compare the variant with its source.

``services.registry.optimize`` starts ``python -m services.registry.transforms <memory_bytes>``
(``childproc.limit_self`` caps it), waits for ``ready``, writes one JSON job line and reads JSON
lines back: ``{"progress": ..., "percent": ...}`` while it works, then one ``{"report": ...}`` or
``{"error": ..., "code": ...}`` (``{"memory": true}`` when it ran out of memory).

Transforms (each writes the variant as one self-contained .onnx file):

- ``graph``: ONNX Runtime's offline graph optimisation (``optimized_model_filepath``). Level
  ``extended`` for ``cpu`` (default there): its fusions (e.g. FusedMatMul, FusedGemm) are
  com.microsoft contrib ops that the CPU execution provider implements on every machine, and a
  worker always has the CPU provider to fall back on. Level ``basic`` for ``gpu`` (default there):
  only standard ONNX rewrites (constant folding, redundant nodes), so the CUDA provider runs every
  node instead of copying tensors to CPU-only fused ops. ``all`` (NCHWc layouts) is never used: it
  bakes in the deriving machine's SIMD width, which is not portable.
- ``int8-dynamic``: ``quantize_dynamic``, weights INT8 (activations quantised at run time).
- ``int8-static``: ``quantize_static`` in QDQ format, calibrated (MinMax) on the .npz rows or on
  random inputs that respect the signature (a warning in the report).
- ``fp16``: ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``, bundled with
  ONNX Runtime, so no new dependency) with ``keep_io_types=True``: inputs and outputs stay FP32.

The report compares both models on the same rows (the .npz, else seeded random ones) and times
both at batch 1 and 8 (8 only when every input's first dimension is variable) on one thread.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument, MaasError
from services.registry.childproc import answer_once, limit_self

RANDOM_ROWS = 32
"""Rows of random inputs when no .npz is given."""
MAX_ROWS = 256
"""Most .npz rows the outputs are compared on."""
_WARMUP_RUNS = 2
_BATCH = 8

_np: Any = None
_ort: Any = None


def _progress(message: str, percent: int) -> None:
    print(json.dumps({"progress": message, "percent": percent}), flush=True)


# Transforms


def _graph(job: Mapping[str, Any], source: Path, variant: Path, rows: Mapping[str, Any]) -> list[str]:
    options = _ort.SessionOptions()
    level = job["options"].get("level") or ("basic" if job["device"] == "gpu" else "extended")
    options.graph_optimization_level = (
        _ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if level == "extended"
        else _ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    options.optimized_model_filepath = str(variant)
    _ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return []


def _one_opset_per_domain(source: Path) -> Any:
    """Return ``source``, or its model with one opset import per domain (the highest) if it has more.

    skl2onnx names the default domain twice (the models of ``maas models convert``): ONNX Runtime
    runs such a model, but its quantiser refuses it ("Failed to find proper ai.onnx domain").
    """
    import onnx

    model = onnx.load(str(source))
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        versions[domain] = max(versions.get(domain, 0), opset.version)
    if len(versions) == len(model.opset_import):
        return source
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())
    return model


def _int8_dynamic(job: Mapping[str, Any], source: Path, variant: Path, rows: Mapping[str, Any]) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        _one_opset_per_domain(source),
        variant,
        weight_type=QuantType.QInt8,
        per_channel=_flag(job, "per_channel"),
        reduce_range=_flag(job, "reduce_range"),
    )
    return []


def _int8_static(job: Mapping[str, Any], source: Path, variant: Path, rows: Mapping[str, Any]) -> list[str]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = list(_batches(rows, _BATCH if _is_batchable(source) else 1))

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._batches, None)

    quantize_static(
        _one_opset_per_domain(source),
        variant,
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=_flag(job, "per_channel"),
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    if job["calibration"]:
        return []
    return [f"int8-static: calibrated on {len(next(iter(rows.values())))} random rows (no .npz given): "
            "activation ranges may not match real data"]  # fmt: skip


def _fp16(job: Mapping[str, Any], source: Path, variant: Path, rows: Mapping[str, Any]) -> list[str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(variant))
    return []


_TRANSFORMS: dict[str, Callable[[Mapping[str, Any], Path, Path, Mapping[str, Any]], list[str]]] = {
    "graph": _graph,
    "int8-dynamic": _int8_dynamic,
    "int8-static": _int8_static,
    "fp16": _fp16,
}


def _flag(job: Mapping[str, Any], name: str) -> bool:
    return bool(job["options"].get(name, "false") == "true")


# Inputs


def _is_batchable(path: Path) -> bool:
    session = _session(path, "cpu")
    return all(len(i.shape) > 0 and not isinstance(i.shape[0], int) for i in session.get_inputs())


def _rows(job: Mapping[str, Any], source: Path) -> tuple[dict[str, Any], list[str]]:
    """Return the comparison rows (one array per input) and warnings about them."""
    session = _session(source, "cpu")
    if job["calibration"]:
        return _npz_rows(Path(job["calibration"]), session), []
    rng = _np.random.default_rng(0)
    rows = {i.name: _random(rng, i) for i in session.get_inputs()}
    return rows, [f"outputs compared on {RANDOM_ROWS} random rows (no .npz given)"]


def _npz_rows(path: Path, session: Any) -> dict[str, Any]:
    try:
        with _np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as exc:  # zipfile's, numpy's or a pickle refusal
        raise InvalidArgument(f"calibration_npz is not a readable .npz without pickles: {exc}") from None
    rows = {}
    for spec in session.get_inputs():
        if spec.name not in arrays:
            held = ", ".join(sorted(arrays)) or "nothing"
            raise InvalidArgument(f"calibration_npz has no array for input '{spec.name}' (it holds: {held})")
        wanted = _numpy_type(spec.type)
        array = arrays[spec.name]
        if array.dtype != wanted:
            raise InvalidArgument(
                f"calibration_npz array '{spec.name}' is {array.dtype}, the input expects {_np.dtype(wanted)}"
            )
        rows[spec.name] = array[:MAX_ROWS]
    counts = {len(a) for a in rows.values()}
    if len(counts) != 1 or 0 in counts:
        raise InvalidArgument("calibration_npz arrays must have the same number (>= 1) of rows")
    return rows


def _numpy_type(ort_type: str) -> Any:
    from services.common.dtypes import from_ort

    return from_ort(ort_type).numpy


def _random(rng: Any, spec: Any) -> Any:
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    rows = RANDOM_ROWS if spec.shape and not isinstance(spec.shape[0], int) else shape[0] if shape else 1
    dtype = _numpy_type(spec.type)
    full = [rows, *shape[1:]] if shape else []
    if dtype.kind == "f":
        return rng.standard_normal(full).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, full).astype(dtype)
    return rng.integers(0, 10, full).astype(dtype)


def _batches(rows: Mapping[str, Any], size: int) -> Iterator[dict[str, Any]]:
    count = len(next(iter(rows.values())))
    for start in range(0, count, size):
        yield {name: array[start : start + size] for name, array in rows.items()}


# Measurements


def _session(path: Path, device: str) -> Any:
    options = _ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "gpu" else ["CPUExecutionProvider"]
    return _ort.InferenceSession(str(path), options, providers=providers)


def _outputs(session: Any, rows: Mapping[str, Any], batch: int) -> dict[str, Any]:
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[Any]] = {name: [] for name in names}
    for feed in _batches(rows, batch):
        for name, value in zip(names, session.run(names, feed), strict=True):
            parts[name].append(value)
    return {name: _np.concatenate(values) if values[0].ndim else values[0] for name, values in parts.items()}


def _compare(source: Mapping[str, Any], variant: Mapping[str, Any]) -> list[dict[str, Any]]:
    diffs = []
    for name, expected in source.items():
        got = variant[name]
        if expected.shape != got.shape:
            raise FailedPrecondition(
                f"output '{name}' has shape {list(got.shape)}, the source's {list(expected.shape)}"
            )
        delta = _np.abs(expected.astype(_np.float64) - got.astype(_np.float64))
        diff: dict[str, Any] = {
            "name": name,
            "max_abs_diff": float(delta.max()) if delta.size else 0.0,
            "mean_abs_diff": float(delta.mean()) if delta.size else 0.0,
            "top1_agreement": None,
        }
        if expected.ndim == 2 and expected.shape[1] >= 2 and expected.dtype.kind == "f":
            diff["top1_agreement"] = float((expected.argmax(axis=1) == got.argmax(axis=1)).mean())
        diffs.append(diff)
    return diffs


def _p50_ms(session: Any, feed: Mapping[str, Any], iterations: int) -> float:
    for _ in range(_WARMUP_RUNS):
        session.run(None, feed)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(_np.median(times))


def _latency(
    sessions: tuple[Any, Any], rows: Mapping[str, Any], batchable: bool, iterations: int
) -> list[dict[str, Any]]:
    sizes = (1, _BATCH) if batchable else (1,)
    measured = []
    for size in sizes:
        if batchable:
            feed = {name: _np.resize(array, (size, *array.shape[1:])) for name, array in rows.items()}
        else:
            feed = {name: array[:1] if array.ndim and len(array) > 1 else array for name, array in rows.items()}
        source, variant = (_p50_ms(s, feed, iterations) for s in sessions)
        measured.append({"batch_size": size, "source_p50_ms": source, "variant_p50_ms": variant})
    return measured


def _device(session: Any, wanted: str) -> tuple[str, list[str]]:
    provider = session.get_providers()[0]
    if wanted == "gpu" and provider != "CUDAExecutionProvider":
        return f"cpu ({provider}, 1 thread)", ["no GPU on the registry: latencies measured on the CPU"]
    return f"{wanted} ({provider}, 1 thread)" if wanted == "cpu" else f"gpu ({provider})", []


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one transform job and return its report (``OptimizationReport`` fields).

    Raises:
        FailedPrecondition: The transform failed (the message says why and names the transform).
        InvalidArgument: The calibration .npz does not fit the model.
    """
    source, variant, transform = Path(job["source"]), Path(job["variant"]), job["transform"]
    _progress(f"{transform}: preparing inputs", 5)
    rows, warnings = _rows(job, source)
    _progress(f"{transform}: transforming", 15)
    try:
        warnings += _TRANSFORMS[transform](job, source, variant, rows)
    except MaasError:
        raise
    except Exception as exc:  # the converter's or quantiser's own error: its message names the cause
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FailedPrecondition(f"{transform} failed: {type(exc).__name__}: {reason}") from None
    _progress(f"{transform}: comparing outputs", 55)
    sessions = (_session(source, job["device"]), _session(variant, job["device"]))
    batchable = _is_batchable(source)
    batch = _BATCH if batchable else 1
    outputs = _compare(_outputs(sessions[0], rows, batch), _outputs(sessions[1], rows, batch))
    _progress(f"{transform}: measuring latency", 70)
    device, device_warnings = _device(sessions[1], job["device"])
    return {
        "transform": transform,
        "outputs": outputs,
        "source_size_bytes": source.stat().st_size,
        "variant_size_bytes": variant.stat().st_size,
        "latency": _latency(sessions, rows, batchable, job["iterations"]),
        "device": device,
        "samples": len(next(iter(rows.values()))) if rows else 0,
        "warnings": warnings + device_warnings,
    }


def tool_versions() -> dict[str, str]:
    """Return the versions of the tools a transform uses (imports them)."""
    import numpy
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}


def _child_main(memory_bytes: int) -> int:
    def prepare() -> None:
        global _np, _ort
        import numpy
        import onnxruntime

        _np, _ort = numpy, onnxruntime
        onnxruntime.set_default_logger_severity(3)

    def work() -> dict[str, Any]:
        job = json.loads(sys.stdin.readline())
        limit_self(memory_bytes, timeout_s=job["timeout_s"] + 5)  # backstop if the parent died
        return {"report": run_job(job) | {"tool_versions": tool_versions()}}

    return answer_once(memory_bytes, prepare, work)


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1])))
