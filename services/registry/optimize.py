"""Model optimisation as a service: derive variants of a version as new, normal versions.

``Optimizer.start`` checks an OptimizeVersion request, stores a PENDING operation
(``services.registry.operations``) and runs it in a background task it owns. The task downloads
the source artifact from the blob store, runs each transform in a child process
(``services.registry.transforms``: ``RLIMIT_AS`` at ``optimize_memory_bytes``, killed after
``optimize_timeout_s``, the same ``childproc`` helpers as upload validation), checks the report
against ``max_abs_diff``, and uploads the kept variant through ``ModelStore.upload_version``: it
is validated by the sandbox like any upload, gets the next version number, a ``version_uploaded``
event, and takes part in aliases, canaries and deployments unchanged. Its lineage and report are
stored in its version record.

Why the registry runs it, not an optimizer worker pool: a transform needs the artifact (the
registry's blob store), the version-creation path (the registry's store) and a CPU for a few
seconds to minutes; operations are rare (a person asks for one), and ``optimize_concurrency``
bounds them. A pool would add a queue, a service and a deployment for no gain in isolation: the
child process already isolates the registry from a crashing, hanging or memory-hungry transform.
Inference workers are the wrong place too: they serve latency-sensitive traffic.

A registry that crashes mid-operation: its child processes end with it (or by their own
``SIGALRM`` backstop), its work directory (``maas-optimize-*`` in the OS's temp dir) is left for
the OS to clean, and the operation's lease (``operation_lease_s``) is no longer renewed, so the
next read of it (GetOperation, WatchOperation, from any replica) marks it FAILED with UNAVAILABLE.
No version is half-created: the upload path commits the artifact before the record, and deletes
it if the record fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from services.common import auth
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    Unavailable,
    error_for_code,
)
from services.common.metadata import VersionRecord, check_name, shown
from services.common.optimization import (
    DEVICE_TRANSFORMS,
    TRANSFORMS,
    Lineage,
    OperationRecord,
    OperationState,
    OptimizationReport,
)
from services.common.queue import now_ms
from services.registry import transforms as child
from services.registry.childproc import READY, kill
from services.registry.operations import OperationStore, new_operation_id
from services.registry.store import ModelStore, UploadHeader

log = structlog.get_logger(__name__)

_BOOL = ("true", "false")
OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "graph": {"level": ("basic", "extended")},
    "int8-dynamic": {"per_channel": _BOOL, "reduce_range": _BOOL},
    "int8-static": {"per_channel": _BOOL},
    "fp16": {},
}
"""Each transform's options and their allowed values."""
DEVICES = tuple(DEVICE_TRANSFORMS)
_START_TIMEOUT_S = 60.0
_REPORT_LIMIT_BYTES = 16 * 1024 * 1024
_FILE_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class OptimizeRequest:
    """What an OptimizeVersion call asks for."""

    model: str
    version: int = 0
    """0: the latest."""
    transform: str = ""
    is_auto: bool = False
    device: str = ""
    """cpu (when empty) or gpu."""
    max_abs_diff: float | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    calibration_npz: bytes = b""


@dataclass(frozen=True)
class OptimizeLimits:
    """What one operation may use (``RegistrySettings.optimize_*``)."""

    timeout_s: float = 600.0
    memory_bytes: int = 8 * 1024**3
    concurrency: int = 1
    latency_iterations: int = 50
    max_calibration_bytes: int = 64 * 1024**2


def plan(request: OptimizeRequest, max_calibration_bytes: int) -> tuple[str, ...]:
    """Check a request and return the transforms to try, in order.

    Raises:
        InvalidArgument: A field is wrong; the message names it and what is expected.
    """
    check_name(request.model)
    if request.version < 0:
        raise InvalidArgument(f"version must be >= 0 (0 means the latest), got {request.version}")
    device = request.device or "cpu"
    if device not in DEVICES:
        raise InvalidArgument(f"device '{shown(device)}' is unknown: expected one of {', '.join(DEVICES)}")
    if request.is_auto == bool(request.transform):
        raise InvalidArgument(f"set transform (one of {', '.join(TRANSFORMS)}) or auto, not both and not neither")
    if request.transform and request.transform not in TRANSFORMS:
        raise InvalidArgument(
            f"transform '{shown(request.transform)}' is unknown: expected one of {', '.join(TRANSFORMS)}"
        )
    if request.max_abs_diff is not None and not request.max_abs_diff >= 0:  # NaN too
        raise InvalidArgument(f"max_abs_diff must be >= 0, got {request.max_abs_diff}")
    if len(request.calibration_npz) > max_calibration_bytes:
        raise InvalidArgument(
            f"calibration_npz has {len(request.calibration_npz)} bytes, at most {max_calibration_bytes} are "
            "allowed (optimize_max_calibration_bytes)"
        )
    chosen = DEVICE_TRANSFORMS[device] if request.is_auto else (request.transform,)
    _check_options(request.options, chosen)
    return chosen


def _check_options(options: Mapping[str, str], transforms: tuple[str, ...]) -> None:
    allowed: dict[str, tuple[str, ...]] = {}
    for transform in transforms:
        allowed |= OPTIONS[transform]
    for key, value in options.items():
        if key not in allowed:
            expected = ", ".join(sorted(allowed)) or "none"
            raise InvalidArgument(
                f"options['{shown(key)}'] is not an option of {', '.join(transforms)} (expected: {expected})"
            )
        if value not in allowed[key]:
            raise InvalidArgument(f"options['{key}'] must be one of {', '.join(allowed[key])}, got '{shown(value)}'")


def exceeding(report: OptimizationReport, max_abs_diff: float | None) -> str:
    """Return why ``report`` breaks the tolerance (empty: it does not)."""
    if max_abs_diff is None:
        return ""
    for output in report.outputs:
        if output.max_abs_diff > max_abs_diff:
            return (
                f"{report.transform}: output '{output.name}' max abs diff {output.max_abs_diff:.3g} "
                f"> {max_abs_diff:g} (max_abs_diff)"
            )
    return ""


def fastest(reports: tuple[OptimizationReport, ...]) -> OptimizationReport | None:
    """Return the passing report with the lowest batch-1 p50 of the variant (None: none passed)."""
    passed = [r for r in reports if not r.error]
    return min(passed, key=lambda r: r.p50_ms(1) or float("inf"), default=None)


class _Run:
    """One running operation: its latest record, saved under a lock (progress and lease renewals)."""

    def __init__(self, operations: OperationStore, record: OperationRecord) -> None:
        self.record = record
        self._operations = operations
        self._lock = asyncio.Lock()

    async def update(self, **changes: Any) -> None:
        async with self._lock:
            self.record = await self._operations.save(replace(self.record, **changes))

    async def renew(self) -> None:
        while True:
            await asyncio.sleep(self._operations.lease_s / 3)
            await self.update()


class Optimizer:
    """Starts, runs and reports optimisation operations.

    Args:
        store: The model store: source versions come from it, variants go into it.
        operations: Where operations are kept.
        limits: Time, memory and concurrency of the transforms.
    """

    def __init__(self, store: ModelStore, operations: OperationStore, limits: OptimizeLimits | None = None) -> None:
        self._store = store
        self._operations = operations
        self.limits = limits or OptimizeLimits()
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, request: OptimizeRequest) -> OperationRecord:
        """Check the request, store a PENDING operation and start running it.

        Raises:
            InvalidArgument: A field is wrong (named in the message).
            NotFound: No such model or version, or one the caller may not see.
            PermissionDenied: The caller's tenant only has the model shared.
            Unavailable: Redis cannot be reached.
        """
        transforms = plan(request, self.limits.max_calibration_bytes)
        model = await self._store.get_model(request.model)
        auth.check_owner(model.name, model.owner, model.shared_with, is_write=True)
        source = await self._store.get_version(request.model, request.version)
        if source.is_bundle:
            raise FailedPrecondition(
                f"model '{source.model}' version {source.version} is a bundle: "
                "only single-file versions can be optimised"
            )
        if source.custom_ops:
            # The quantisers open their own ONNX Runtime sessions, which know no custom operators.
            raise FailedPrecondition(
                f"model '{source.model}' version {source.version} needs custom operators "
                f"({', '.join(source.custom_ops)}): only models of standard ONNX operators can be optimised"
            )
        record = await self._operations.save(
            OperationRecord(
                id=new_operation_id(),
                model=source.model,
                source_version=source.version,
                transforms=transforms,
                device=request.device or "cpu",
                progress_message="waiting for a free optimisation slot",
                created_at_ms=now_ms(),
            )
        )
        log.info("optimization_started", operation=record.id, model=record.model, transforms=transforms)
        if self._slots is None:  # NOTE: created on first use, inside the running loop
            self._slots = asyncio.Semaphore(self.limits.concurrency)
        # The task copies this call's context: the upload at its end runs as the caller's API key.
        task = asyncio.create_task(self._run(_Run(self._operations, record), request, source))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def get(self, operation_id: str) -> OperationRecord:
        """Return an operation of a model the caller may see.

        Raises:
            InvalidArgument: The id is malformed.
            NotFound: No such operation, or of a model the caller may not see.
            Unavailable: Redis cannot be reached.
        """
        return await self._visible(await self._operations.get(operation_id))

    async def watch(self, operation_id: str) -> AsyncGenerator[OperationRecord, None]:
        """Yield the operation, then each change, until it ends (``get``'s errors)."""
        checked = False
        async with contextlib.aclosing(self._operations.watch(operation_id)) as records:
            async for record in records:
                if not checked:
                    await self._visible(record)
                    checked = True
                yield record

    async def _visible(self, record: OperationRecord) -> OperationRecord:
        """Return ``record`` if the calling key may see its model (its patterns, owner, shares)."""
        if auth.current_identity() is None:
            return record
        try:
            is_seen = auth.may_see(await self._store.get_model(record.model))
        except NotFound:
            is_seen = False
        if not is_seen:  # the same answer as for an unknown operation
            raise NotFound(f"operation '{record.id}' not found (unknown, or expired)")
        return record

    async def close(self) -> None:
        """Cancel the running operations (each is marked FAILED) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, run: _Run, request: OptimizeRequest, source: VersionRecord) -> None:
        assert self._slots is not None
        async with self._slots:
            renewal = asyncio.create_task(run.renew())
            try:
                await run.update(state=OperationState.RUNNING, progress_message="downloading the source")
                await self._derive(run, request, source)
            except MaasError as exc:
                await self._end(run, exc.grpc_code.name, exc.message)
            except asyncio.CancelledError:
                await asyncio.shield(self._end(run, "UNAVAILABLE", "the registry stopped: start the operation again"))
                raise
            except Exception:
                log.exception("optimization_crashed", operation=run.record.id)
                await self._end(run, "INTERNAL", f"internal error (operation {run.record.id})")
            finally:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal

    async def _end(self, run: _Run, code: str, message: str) -> None:
        log.info("optimization_failed", operation=run.record.id, code=code, reason=message)
        with contextlib.suppress(MaasError):  # Redis gone: the lease expiry fails it instead
            await run.update(
                state=OperationState.FAILED, error_code=code, error_message=message, lease_until_ms=now_ms()
            )

    async def _derive(self, run: _Run, request: OptimizeRequest, source: VersionRecord) -> None:
        loop = asyncio.get_running_loop()
        work = Path(await loop.run_in_executor(None, lambda: tempfile.mkdtemp(prefix="maas-optimize-")))
        try:
            source_path = await self._download(source, work / "source.onnx")
            calibration = ""
            if request.calibration_npz:
                calibration = str(work / "calibration.npz")
                await loop.run_in_executor(None, Path(calibration).write_bytes, request.calibration_npz)
            outcomes: list[tuple[OptimizationReport, dict[str, str]]] = []
            for index, transform in enumerate(run.record.transforms):
                job = self._job(request, transform, source_path, work / f"{transform}.onnx", calibration)
                outcomes.append(await self._try(run, job, index))
                await run.update(reports=tuple(report for report, _ in outcomes))
            await self._keep(run, request, source, outcomes, work)
        finally:
            await loop.run_in_executor(None, shutil.rmtree, work, True)

    def _job(
        self, request: OptimizeRequest, transform: str, source: Path, variant: Path, calibration: str
    ) -> dict[str, Any]:
        own = {key: value for key, value in request.options.items() if key in OPTIONS[transform]}
        return {
            "transform": transform, "options": own, "device": request.device or "cpu", "source": str(source),
            "variant": str(variant), "calibration": calibration, "iterations": self.limits.latency_iterations,
            "timeout_s": self.limits.timeout_s, "max_abs_diff": request.max_abs_diff,
        }  # fmt: skip

    async def _try(self, run: _Run, job: dict[str, Any], index: int) -> tuple[OptimizationReport, dict[str, str]]:
        """Run one transform; a failure becomes the report's ``error`` (the others still run)."""
        transform = job["transform"]
        try:
            raw = await self._child(run, job, index)
        except (FailedPrecondition, DeadlineExceeded, InvalidArgument) as exc:
            if isinstance(exc, InvalidArgument) or len(run.record.transforms) == 1:
                raise  # keep its code; with auto, one failure is a row of the table and the others go on
            return OptimizationReport(transform=transform, error=exc.message), {}
        tools = raw.pop("tool_versions")
        report = OptimizationReport.from_dict(raw)
        return replace(report, error=exceeding(report, job["max_abs_diff"])), tools

    async def _child(self, run: _Run, job: dict[str, Any], index: int) -> dict[str, Any]:
        """Run ``job`` in a transforms child process; return its report.

        Raises:
            FailedPrecondition: The transform failed, or ran out of memory.
            DeadlineExceeded: It passed ``optimize_timeout_s`` (it is killed).
            InvalidArgument: The calibration data does not fit the model.
        """
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", child.__name__, str(self.limits.memory_bytes),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                limit=_REPORT_LIMIT_BYTES,
            )  # fmt: skip
        except OSError as exc:
            raise Unavailable("the optimisation process could not be started") from exc
        try:
            return await self._talk(run, process, job, index)
        finally:
            await kill(process)

    async def _talk(
        self, run: _Run, process: asyncio.subprocess.Process, job: dict[str, Any], index: int
    ) -> dict[str, Any]:
        assert process.stdin is not None and process.stdout is not None
        transform, steps = job["transform"], len(run.record.transforms)
        async with asyncio.timeout(_START_TIMEOUT_S):
            ready = await process.stdout.readline()
        if ready.decode().strip() != READY:
            raise self._died(transform, process.returncode)
        try:
            async with asyncio.timeout(self.limits.timeout_s) as limit:  # the job's hand-over included
                process.stdin.write(json.dumps(job).encode() + b"\n")
                await process.stdin.drain()
                async for line in process.stdout:
                    message = json.loads(line)
                    if "progress" not in message:
                        break
                    percent = (index * 100 + int(message["percent"])) * 90 // (100 * steps)
                    await run.update(progress_message=message["progress"], progress_percent=percent)
                else:
                    message = None
            # NOTE: on Python 3.11, asyncio.wait_for (which redis-py's commands use, so run.update)
            # swallows a cancellation that lands as its inner call completes: the limit can expire
            # without raising. It still counts.
            if limit.expired():
                raise TimeoutError
            if message is not None:
                return self._result(transform, message)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{transform}: did not finish within the registry's time limit of {self.limits.timeout_s:g} s "
                "(optimize_timeout_s); it was stopped"
            ) from None
        except (ConnectionError, ValueError):
            pass
        await process.wait()
        raise self._died(transform, process.returncode)

    def _result(self, transform: str, message: dict[str, Any]) -> dict[str, Any]:
        if "report" in message:
            report: dict[str, Any] = message["report"]
            return report
        if "error" in message:
            import grpc

            raise error_for_code(grpc.StatusCode[message["code"]], message["error"])
        raise self._died(transform, None)

    def _died(self, transform: str, returncode: int | None) -> FailedPrecondition:
        log.info("optimization_process_failed", transform=transform, returncode=returncode)
        return FailedPrecondition(
            f"{transform}: the transform process ended without a result (exit status {returncode}), most likely "
            f"past the registry's memory limit of {self.limits.memory_bytes} bytes (optimize_memory_bytes)"
        )

    async def _keep(
        self,
        run: _Run,
        request: OptimizeRequest,
        source: VersionRecord,
        outcomes: list[tuple[OptimizationReport, dict[str, str]]],
        work: Path,
    ) -> None:
        """Store the fastest passing variant as a new version, or fail naming why none passed."""
        reports = tuple(report for report, _ in outcomes)
        best = fastest(reports)
        if best is None:
            reasons = "; ".join(report.error for report in reports)
            raise FailedPrecondition(reasons if len(reports) == 1 else f"auto: no transform passed: {reasons}")
        tools = dict(outcomes[reports.index(best)][1])
        await run.update(progress_message=f"{best.transform}: validating and storing the variant", progress_percent=92)
        lineage = Lineage(
            source_version=source.version,
            transform=best.transform,
            options=self._lineage_options(request, best.transform),
            tool_versions=tools,
            operation_id=run.record.id,
        )
        try:
            version = await self._upload(source, work / f"{best.transform}.onnx", lineage, best)
        except InvalidArgument as exc:  # the variant, not the request, is wrong
            raise FailedPrecondition(
                f"{best.transform}: the variant was refused by validation: {exc.message}"
            ) from None
        kept = tuple(replace(r, version=version.version) if r is best else r for r in reports)
        await run.update(
            state=OperationState.SUCCEEDED, result_versions=(version.version,), reports=kept,
            progress_message=f"{best.transform}: stored as version {version.version}", progress_percent=100,
            lease_until_ms=now_ms(),
        )  # fmt: skip
        log.info("optimization_succeeded", operation=run.record.id, model=source.model, version=version.version)

    @staticmethod
    def _lineage_options(request: OptimizeRequest, transform: str) -> dict[str, str]:
        options = {key: value for key, value in request.options.items() if key in OPTIONS[transform]}
        options["device"] = request.device or "cpu"
        if request.max_abs_diff is not None:
            options["max_abs_diff"] = f"{request.max_abs_diff:g}"
        if request.is_auto:
            options["auto"] = "true"
        if transform == "int8-static":
            options["calibration"] = "npz" if request.calibration_npz else "random"
        return options

    async def _upload(
        self, source: VersionRecord, path: Path, lineage: Lineage, report: OptimizationReport
    ) -> VersionRecord:
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, path.read_bytes)
        header = UploadHeader(
            model=source.model,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            class_labels=source.class_labels,
            description=f"{lineage.transform} of version {source.version}",
            labels=dict(source.labels),
            custom_ops=source.custom_ops,
            lineage=lineage,
            report=report,
        )
        return await self._store.upload_version(header, _chunks(data))

    async def _download(self, source: VersionRecord, path: Path) -> Path:
        """Write the source artifact (sha256-checked by the store) to ``path``."""
        loop = asyncio.get_running_loop()
        handle = await loop.run_in_executor(None, path.open, "wb")
        try:
            async with contextlib.aclosing(self._store.download_version(source.model, source.version)) as parts:
                async for part in parts:
                    if isinstance(part, bytes):
                        await loop.run_in_executor(None, handle.write, part)
        finally:
            await loop.run_in_executor(None, handle.close)
        return path


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), _FILE_CHUNK_BYTES):
        yield data[start : start + _FILE_CHUNK_BYTES]
