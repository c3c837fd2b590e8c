"""Validate uploaded artifacts in a child process with a time and a memory limit.

An upload is untrusted input: ONNX Runtime may hang on it, allocate without bound or crash while
loading it. So the registry never loads one itself. Each validation runs in a fresh child process
(``python -m services.registry.sandbox``) that:

1. caps its own address space (``RLIMIT_AS``) at ``memory_bytes`` and disables core dumps,
2. reports ``ready`` once ONNX Runtime is imported, then reads the artifact's path from stdin,
3. refuses external data (see ``check_external_data``), loads the model in ONNX Runtime on the
   CPU (one thread, no graph optimisation), and writes the signature or the refusal as one JSON
   line to stdout.

The parent gives the load ``timeout_s`` (counted from ``ready``, so interpreter start-up is not
charged to the model) and kills the child when it passes; a child that dies (e.g. on an
allocation failure outside Python) is a refusal too. Every refusal is ``InvalidArgument`` naming
the limit, and the registry keeps serving.

External data: an upload is one self-contained ``.onnx`` file. A tensor that keeps its data in
another file is refused, whatever the path: an absolute path or one with ``..`` would read any
file of the registry's host, and even a plain relative name would resolve inside the registry's
staging directory, i.e. read another upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import structlog

from services.common.errors import InvalidArgument, Unavailable
from services.common.metadata import TensorSpec
from services.registry.signature import Signature

log = structlog.get_logger(__name__)

_READY = "ready"
_START_TIMEOUT_S = 60.0
"""Longest wait for a child to import ONNX Runtime; not charged to the model's ``timeout_s``."""
_MEMORY_EXIT = 3
"""Exit status of a child that ran out of memory before it could report it."""
_REPORT_LIMIT_BYTES = 64 * 1024 * 1024
"""Longest report line (a signature with many tensors, or a long load error)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one validation may use."""

    timeout_s: float = 60.0
    """Longest load of one artifact, from the moment the child is ready."""
    memory_bytes: int = 4 * 1024**3
    """Address space of the child process (``RLIMIT_AS``)."""
    concurrency: int = 2
    """Validations running at once; more uploads wait for a slot."""


class ArtifactValidator:
    """Loads artifacts in child processes, ``limits.concurrency`` at a time.

    Args:
        limits: The time, memory and concurrency limits.
    """

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        # NOTE: asyncio primitives bind to a loop on first use (Python >= 3.10), not here.
        self._slots = asyncio.Semaphore(self.limits.concurrency)
        self._spare: asyncio.subprocess.Process | None = None
        """A child started during the last validation: it imports ONNX Runtime (about 1 s) while
        the registry waits for the next upload, which then costs only its own load."""

    async def validate(self, path: Path) -> Signature:
        """Load the artifact at ``path`` in a child process and return its signature.

        Raises:
            InvalidArgument: The artifact does not load, references external data, takes longer
                than ``timeout_s`` or needs more than ``memory_bytes`` (the message names the limit).
            Unavailable: The child process could not be started.
        """
        async with self._slots:
            # NOTE: every await below sits inside the try, so a cancelled upload kills its child; a
            # spawn cancelled midway is cleaned up by asyncio itself.
            process, self._spare = self._spare, None
            try:
                if process is None or process.returncode is not None:
                    process = await self._spawn()
                with contextlib.suppress(Unavailable):  # no spare: the next upload starts its own child
                    self._spare = await self._spawn()
                result = await self._run(process, path)
            finally:
                if process is not None:
                    await _kill(process)
        return self._signature(result, process.returncode)

    @property
    def spare_pid(self) -> int | None:
        """Process id of the idle spare child, if one is running."""
        return self._spare.pid if self._spare is not None and self._spare.returncode is None else None

    async def close(self) -> None:
        """Stop the spare child (validations in progress stop their own)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            await _kill(spare)

    async def _spawn(self) -> asyncio.subprocess.Process:
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, str(self.limits.memory_bytes),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                limit=_REPORT_LIMIT_BYTES,
            )  # fmt: skip
        except OSError as exc:
            raise Unavailable("the upload validation process could not be started") from exc
        return process

    async def _run(self, process: asyncio.subprocess.Process, path: Path) -> dict[str, Any] | None:
        """Wait for ``ready``, send ``path`` and return the child's report (None: it died or went silent)."""
        assert process.stdin is not None and process.stdout is not None
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                ready = await process.stdout.readline()
        except TimeoutError:
            raise Unavailable("the upload validation process did not start in time") from None
        if ready.decode().strip() != _READY:
            return None  # it died while importing: under the memory limit, or broken
        process.stdin.write(f"{path}\n".encode())
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                await process.stdin.drain()
                line = await process.stdout.readline()
                await process.wait()
        except TimeoutError:
            raise InvalidArgument(
                f"artifact did not load within the registry's validation time limit of "
                f"{self.limits.timeout_s:g} s (validate_timeout_s)"
            ) from None
        except ConnectionError:
            return None
        try:
            report: dict[str, Any] = json.loads(line)
        except ValueError:  # nothing, or half a line: the child died while writing
            return None
        return report

    def _signature(self, result: dict[str, Any] | None, returncode: int | None) -> Signature:
        if result is not None and "error" in result:
            raise InvalidArgument(str(result["error"]))
        if result is None or result.get("memory") or returncode == _MEMORY_EXIT:
            log.info("validation_process_failed", returncode=returncode)
            raise InvalidArgument(
                f"artifact could not be loaded within the registry's validation memory limit of "
                f"{self.limits.memory_bytes} bytes (validate_memory_bytes)"
                + ("" if result is not None or returncode == _MEMORY_EXIT else f"; the loader exited with {returncode}")
            )
        return Signature(inputs=_specs(result["inputs"]), outputs=_specs(result["outputs"]))


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    # NOTE: shielded so that a cancelled upload still reaps its child (no zombie, no orphan).
    await asyncio.shield(process.wait())


def _specs(raw: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=s["name"], datatype=s["datatype"], shape=tuple(s["shape"])) for s in raw)


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


# The child process


def check_external_data(model: Any) -> None:
    """Refuse a model (an ``onnx.ModelProto``) with any tensor whose data lives in another file.

    Raises:
        InvalidArgument: A tensor has external data; the message names it and its location.
    """
    from onnx import TensorProto  # only the child imports onnx

    for tensor in _tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if _is_outside(location):
            raise InvalidArgument(
                f"tensor '{tensor.name}' references external data outside the upload ('{location}'): "
                "absolute paths and '..' are not allowed"
            )
        raise InvalidArgument(
            f"tensor '{tensor.name}' keeps its data in an external file ('{location}'): upload one "
            "self-contained .onnx file (onnx.save(model, path, save_as_external_data=False))"
        )


def _is_outside(location: str) -> bool:
    paths = (PurePosixPath(location), PureWindowsPath(location))
    return any(path.is_absolute() or path.anchor or ".." in path.parts for path in paths)


def _tensors(model: Any) -> Iterator[Any]:
    """Yield every tensor of ``model``: initialisers, sparse ones, attributes, subgraphs, functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for sparse in attribute.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for graph in attribute.graphs:
                yield from _graph_tensors(graph)


def _validate(path: Path) -> dict[str, Any]:
    """Check and load the artifact; return the report the parent reads."""
    import onnx

    from services.registry.signature import read_signature

    parse_error = ""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except MemoryError:
        raise
    except Exception as exc:  # protobuf's DecodeError, or onnx's own
        # NOTE: under the memory limit, protobuf reports a parse error, not an allocation failure:
        # ONNX Runtime's load below tells the two apart (bad_alloc, or its own parse error).
        parse_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        check_external_data(model)
        del model  # free the parse before ONNX Runtime loads the file again
    try:
        signature = read_signature(path)
    except InvalidArgument as exc:
        if "bad_alloc" in exc.message:  # ORT turns std::bad_alloc into a load failure
            raise MemoryError from None
        raise
    if parse_error:  # never accept what the external-data check could not read
        raise InvalidArgument(f"artifact is not a loadable ONNX model: {parse_error}")
    return {"inputs": [_spec_json(s) for s in signature.inputs], "outputs": [_spec_json(s) for s in signature.outputs]}


def _child_main(memory_bytes: int) -> int:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of `maas up` is the parent's to handle
    try:
        import onnxruntime  # noqa: F401  # imported before `ready`: not charged to the model

        print(_READY, flush=True)
        path = Path(sys.stdin.readline().strip())
        report = _validate(path)
    except InvalidArgument as exc:
        report = {"error": exc.message}
    except MemoryError:
        report = {"memory": True}
    try:
        print(json.dumps(report), flush=True)
    except MemoryError:
        return _MEMORY_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1])))
