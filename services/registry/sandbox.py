"""Validate uploaded artifacts in a child process with a time and a memory limit.

An upload is untrusted input: ONNX Runtime may hang on it, allocate without bound or crash while
loading it. So the registry never loads one itself. Each validation runs in a fresh child process
(``python -m services.registry.sandbox``) that:

1. caps its own address space (``RLIMIT_AS``) at ``memory_bytes`` and disables core dumps,
2. reports ``ready`` once ONNX Runtime is imported, then reads the artifact's path from stdin,
3. refuses external data (see ``check_external_data``) and custom operators the version does not
   declare (``check_declared_ops``), loads the model in ONNX Runtime on the CPU (one thread, no
   graph optimisation, the declared custom-operator libraries registered), and writes the
   signature or the refusal as one JSON line to stdout.

The parent gives the load ``timeout_s`` (counted from ``ready``, so interpreter start-up is not
charged to the model) and kills the child when it passes; a child that dies (e.g. on an
allocation failure outside Python) is a refusal too. Every refusal is ``InvalidArgument`` naming
the limit, and the registry keeps serving.

External data: a single-file upload is one self-contained ``.onnx`` file. A tensor that keeps its
data in another file is refused, whatever the path: an absolute path or one with ``..`` would read
any file of the registry's host, and even a plain relative name would resolve inside the
registry's staging directory, i.e. read another upload. A bundle (``bundle_upload.py``) is staged
in a directory of its own: there a tensor's external data must name a regular file inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import structlog

from services.common.custom_ops import undeclared_extension_op
from services.common.errors import InvalidArgument, Unavailable
from services.common.metadata import TensorSpec
from services.registry.childproc import MEMORY_EXIT, READY, answer_once
from services.registry.childproc import kill as _kill
from services.registry.signature import Signature

log = structlog.get_logger(__name__)

_START_TIMEOUT_S = 60.0
"""Longest wait for a child to import ONNX Runtime; not charged to the model's ``timeout_s``."""
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

    async def validate(
        self, path: Path, *, custom_ops: Sequence[str] = (), bundle_root: Path | None = None, generative: bool = False
    ) -> Signature:
        """Load the artifact at ``path`` in a child process and return its signature.

        Args:
            path: The artifact.
            custom_ops: Custom-operator libraries the version declares (``services.common.custom_ops``);
                the child registers them, and refuses a model using their operators without them.
            bundle_root: The staged directory of a bundle holding ``path``: external data must then
                name a file inside it (``check_external_data``); None refuses any external data.
            generative: The bundle is an ONNX Runtime GenAI model (``services.common.generation``):
                the child loads it with onnxruntime-genai and generates one token.

        Raises:
            InvalidArgument: The artifact does not load, references external data, uses custom
                operators it does not declare, takes longer than ``timeout_s`` or needs more than
                ``memory_bytes`` (the message names the limit).
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
                result = await self._run(process, path, custom_ops, bundle_root, generative)
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

    async def _run(
        self,
        process: asyncio.subprocess.Process,
        path: Path,
        custom_ops: Sequence[str],
        bundle_root: Path | None,
        generative: bool = False,
    ) -> dict[str, Any] | None:
        """Wait for ``ready``, send ``path`` and return the child's report (None: it died or went silent)."""
        assert process.stdin is not None and process.stdout is not None
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                ready = await process.stdout.readline()
        except TimeoutError:
            raise Unavailable("the upload validation process did not start in time") from None
        if ready.decode().strip() != READY:
            return None  # it died while importing: under the memory limit, or broken
        # NOTE: the names are checked (check_custom_ops) before an upload gets here: no comma, no newline.
        root = "" if bundle_root is None else str(bundle_root)  # staged paths: no newline in them
        process.stdin.write(f"{path}\n{','.join(custom_ops)}\n{root}\n{int(generative)}\n".encode())
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
        if result is None or result.get("memory") or returncode == MEMORY_EXIT:
            log.info("validation_process_failed", returncode=returncode)
            raise InvalidArgument(
                f"artifact could not be loaded within the registry's validation memory limit of "
                f"{self.limits.memory_bytes} bytes (validate_memory_bytes)"
                + ("" if result is not None or returncode == MEMORY_EXIT else f"; the loader exited with {returncode}")
            )
        return Signature(inputs=_specs(result["inputs"]), outputs=_specs(result["outputs"]))


def _specs(raw: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=s["name"], datatype=s["datatype"], shape=tuple(s["shape"])) for s in raw)


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


# The child process


def check_external_data(model: Any, model_path: Path | None = None, bundle_root: Path | None = None) -> None:
    """Refuse a model (an ``onnx.ModelProto``) with a tensor whose data lives outside its upload.

    Args:
        model: The parsed model (external data not loaded).
        model_path: Where the model file is (external locations are relative to its directory).
        bundle_root: The bundle's directory; None (a single-file upload) refuses any external data.

    Raises:
        InvalidArgument: A tensor's external data is not a file of the bundle (or, for a single
            file, exists at all); the message names the tensor and its location.
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
        if bundle_root is not None and model_path is not None:
            _check_bundle_location(tensor.name, location, model_path, bundle_root)
            continue
        raise InvalidArgument(
            f"tensor '{tensor.name}' keeps its data in an external file ('{location}'): upload one "
            "self-contained .onnx file (onnx.save(model, path, save_as_external_data=False))"
        )


def _check_bundle_location(tensor: str, location: str, model_path: Path, bundle_root: Path) -> None:
    target = (model_path.parent / location).resolve()
    root = bundle_root.resolve()
    # NOTE: bundles hold no links (their files are written by the registry itself), so resolve()
    # only normalises; a location that names no regular file of the bundle is refused here rather
    # than left to ONNX Runtime's less precise error.
    if not target.is_relative_to(root) or target == root:
        raise InvalidArgument(f"tensor '{tensor}' references external data outside the bundle ('{location}')")
    if not target.is_file():
        raise InvalidArgument(
            f"tensor '{tensor}' references external data '{location}', which is not a file of the bundle"
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


def check_declared_ops(model: Any, custom_ops: Sequence[str]) -> None:
    """Refuse a model (an ``onnx.ModelProto``) using custom operators its version does not declare.

    Raises:
        InvalidArgument: A node uses an onnxruntime-extensions operator without the declaration;
            the message names the node, the operator, its domain and the declaration.
    """
    reason = undeclared_extension_op(_operators(model), custom_ops)
    if reason is not None:
        raise InvalidArgument(reason)


def _operators(model: Any) -> Iterator[tuple[str, str, str]]:
    """Yield ``(node name, op type, domain)`` of every node: graph, subgraphs and functions."""
    yield from _node_operators(model.graph.node)
    for function in model.functions:
        yield from _node_operators(function.node)


def _node_operators(nodes: Any) -> Iterator[tuple[str, str, str]]:
    for node in nodes:
        yield node.name, node.op_type, node.domain
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for graph in (*subgraphs, *attribute.graphs):
                yield from _node_operators(graph.node)


def _validate(path: Path, custom_ops: Sequence[str] = (), bundle_root: Path | None = None) -> dict[str, Any]:
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
        check_external_data(model, path, bundle_root)
        check_declared_ops(model, custom_ops)
        del model  # free the parse before ONNX Runtime loads the file again
    try:
        signature = read_signature(path, custom_ops=custom_ops)
    except InvalidArgument as exc:
        if "bad_alloc" in exc.message:  # ORT turns std::bad_alloc into a load failure
            raise MemoryError from None
        raise
    if parse_error:  # never accept what the external-data check could not read
        raise InvalidArgument(f"artifact is not a loadable ONNX model: {parse_error}")
    return {"inputs": [_spec_json(s) for s in signature.inputs], "outputs": [_spec_json(s) for s in signature.outputs]}


def _config_files(config: Any) -> Iterator[str]:
    """Yield every ``filename`` value of a genai_config.json (the ONNX files it loads)."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "filename" and isinstance(value, str):
                yield value
            else:
                yield from _config_files(value)
    elif isinstance(config, list):
        for item in config:
            yield from _config_files(item)


def _validate_generative(path: Path, bundle_root: Path) -> dict[str, Any]:
    """Check and load an ONNX Runtime GenAI bundle, generate one token; return the fixed signature."""
    from services.common import generation

    config_path = bundle_root / generation.CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{generation.CONFIG_FILE} is not valid JSON: {exc}") from None
    for name in _config_files(config):
        # NOTE: onnxruntime-genai opens these relative to the bundle: never a file outside it.
        if _is_outside(name) or not (bundle_root / name).resolve().is_relative_to(bundle_root.resolve()):
            raise InvalidArgument(f"{generation.CONFIG_FILE}: filename '{name}' is outside the bundle")
        if not (bundle_root / name).is_file():
            raise InvalidArgument(f"{generation.CONFIG_FILE}: filename '{name}' is not a file of the bundle")
    import onnx

    check_external_data(onnx.load(str(path), load_external_data=False), path, bundle_root)
    import onnxruntime_genai as og

    try:
        model = og.Model(str(bundle_root))
        tokenizer = og.Tokenizer(model)
        params = og.GeneratorParams(model)
        tokens = tokenizer.encode("a")
        params.set_search_options(max_length=len(tokens) + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(tokens)
        generator.generate_next_token()
    except Exception as exc:  # onnxruntime-genai raises RuntimeError (or its own) for a bad bundle
        if "bad_alloc" in str(exc):
            raise MemoryError from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(f"generative model does not load or generate with onnxruntime-genai: {first}") from None
    return {
        "inputs": [_spec_json(s) for s in generation.INPUTS],
        "outputs": [_spec_json(s) for s in generation.OUTPUTS],
    }


def _child_main(memory_bytes: int) -> int:
    def prepare() -> None:
        import onnxruntime  # noqa: F401  # imported before `ready`: not charged to the model

    def work() -> dict[str, Any]:
        path = Path(sys.stdin.readline().strip())
        custom_ops = tuple(name for name in sys.stdin.readline().strip().split(",") if name)
        root = sys.stdin.readline().strip()
        if sys.stdin.readline().strip() == "1":
            return _validate_generative(path, Path(root))
        return _validate(path, custom_ops, Path(root) if root else None)

    return answer_once(memory_bytes, prepare, work)


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1])))
