"""Pure conversions between the KServe v2 messages and the gateway's domain types."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

import grpc

from inference import grpc_service_pb2 as pb
from inference import model_config_pb2 as mc
from services.common import dtypes, generation
from services.common.errors import InvalidArgument
from services.common.metadata import DeploymentRecord, ModelRecord, TensorSpec, VersionRecord
from services.common.stats import Duration, VersionStats
from services.gateway import shm
from services.gateway.generation import GenerationPiece
from services.gateway.overrides import DeployOverrides, parse_load_config
from services.gateway.router import CLASSIFICATION, InferCall, InputView

SERVER_NAME = "maas"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics", "system_shared_memory")


def _content_count(tensor: pb.ModelInferRequest.InferInputTensor) -> int | None:
    if not tensor.HasField("contents"):
        return None
    known = dtypes.DATATYPES.get(tensor.datatype)
    field = known.contents_field if known else None
    return len(getattr(tensor.contents, field)) if field else 0


def _has_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bool:
    return bool(tensor.HasField("contents") and tensor.contents.ByteSize() > 0)


def _input_view(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputView:
    return InputView(
        name=tensor.name,
        datatype=tensor.datatype,
        shape=tuple(tensor.shape),
        raw_bytes=None if raw is None else len(raw),
        content_count=_content_count(tensor) if raw is None else None,
        raw=raw,
        has_both=raw is not None and _has_contents(tensor),
        parameters=tuple(tensor.parameters),
    )


def _class_counts(
    outputs: Iterable[pb.ModelInferRequest.InferRequestedOutputTensor],
) -> tuple[tuple[str, str | None, int], ...]:
    counts = []
    for output in outputs:
        if CLASSIFICATION in output.parameters:
            parameter = output.parameters[CLASSIFICATION]
            counts.append((output.name, parameter.WhichOneof("parameter_choice"), parameter.int64_param))
    return tuple(counts)


def request_size(request: pb.ModelInferRequest) -> int:
    """Bytes of the serialized request (computed, not serialized: no copy of the tensors)."""
    return int(request.ByteSize())


def infer_call(request: pb.ModelInferRequest) -> InferCall:
    """Extract what the router validates; the serialized request travels on untouched."""
    raw = list(request.raw_input_contents)  # NOTE: each access to the field copies the bytes
    outputs = list(request.outputs)
    # NOTE: most calls carry no parameters: their tuples are skipped, not built empty (µs a call).
    has_output_parameters = any(output.parameters for output in outputs)
    inputs = [_input_view(tensor, raw[i] if i < len(raw) else None) for i, tensor in enumerate(request.inputs)]
    return InferCall(
        model=request.model_name,
        version=request.model_version,
        inputs=tuple(inputs),
        outputs=tuple([output.name for output in outputs]),
        raw_count=len(raw),
        payload=request.SerializeToString(),
        parameters=tuple(request.parameters),
        output_parameters=tuple((output.name, name) for output in outputs for name in output.parameters)
        if has_output_parameters
        else (),
        class_counts=_class_counts(outputs) if has_output_parameters else (),
        typed_parameters=_typed_parameters(request.parameters) if request.parameters else (),
    )


def _typed_parameters(parameters: Mapping[str, pb.InferParameter]) -> tuple[generation.TypedParameter, ...]:
    return tuple(
        (name, parameter.WhichOneof("parameter_choice"), value)
        for (name, parameter), value in zip(parameters.items(), _parameter_values(parameters).values(), strict=True)
    )


def generation_response(request: pb.ModelInferRequest, piece: GenerationPiece) -> pb.ModelInferResponse:
    """One response of a generation: a piece of its ``text`` (BYTES [1]); the last one marked final.

    As Triton's decoupled models: ``triton_final_response`` (bool) on every response, true on the
    last, which also carries the ``finish_reason`` (string) parameter.
    """
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(piece.version), id=request.id)
    if piece.has_output:
        response.outputs.add(name=generation.TEXT, datatype="BYTES", shape=[1])
        response.raw_output_contents.append(struct.pack("<I", len(piece.text)) + piece.text)
    response.parameters[generation.FINAL].bool_param = piece.is_final
    if piece.is_final:
        response.parameters[generation.FINISH_REASON].string_param = piece.finish_reason
    return response


def load_overrides(request: pb.RepositoryModelLoadRequest) -> DeployOverrides:
    """The deployment changes a RepositoryModelLoad asks for (its ``config`` parameter).

    Raises:
        InvalidArgument: A parameter MaaS does not take, or a config it cannot honour.
    """
    overrides = DeployOverrides()
    for name, parameter in request.parameters.items():
        if name.startswith("file:"):
            raise InvalidArgument(
                f"parameter '{name}': model files cannot be loaded through RepositoryModelLoad; "
                "push a version with `maas models push`"
            )
        if name != "config":
            raise InvalidArgument(f"parameter '{name}' is not supported by RepositoryModelLoad; it takes 'config' only")
        if parameter.WhichOneof("parameter_choice") != "string_param":
            raise InvalidArgument("parameter 'config' must be a string_param holding the JSON model configuration")
        overrides = parse_load_config(request.model_name, parameter.string_param)
    return overrides


def infer_response(payload: bytes) -> pb.ModelInferResponse:
    """Parse a worker's serialized response."""
    response = pb.ModelInferResponse()
    response.ParseFromString(payload)
    return response


def stream_response(
    request: pb.ModelInferRequest,
    response: pb.ModelInferResponse | None,
    error: tuple[grpc.StatusCode, str] | None,
) -> pb.ModelStreamInferResponse:
    """One answer on a ModelStreamInfer stream: the response, or the request's error.

    An error is Triton's ``error_message``; MaaS also fills ``infer_response`` with the request's
    id, model and version, and the status code name as its ``error_code`` parameter, so a client
    can tell which request failed and whether to retry it.
    """
    if error is None:
        return pb.ModelStreamInferResponse(infer_response=response)
    code, message = error
    failed = pb.ModelInferResponse(id=request.id, model_name=request.model_name, model_version=request.model_version)
    failed.parameters["error_code"].string_param = code.name
    return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)


def _parameter_values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[name] = getattr(parameter, choice) if choice else None
    return values


_NO_SHARED_MEMORY = shm.ShmUse()


def shared_memory_use(request: pb.ModelInferRequest) -> shm.ShmUse:
    """The shared memory regions a request's inputs and requested outputs name in their parameters.

    Raises:
        InvalidArgument: A shared memory parameter that is malformed or incomplete.
    """
    if not any(t.parameters for t in request.inputs) and not any(o.parameters for o in request.outputs):
        return _NO_SHARED_MEMORY
    inputs = tuple(shm.parse_ref("input", t.name, _parameter_values(t.parameters)) for t in request.inputs)
    outputs = (shm.parse_ref("output", o.name, _parameter_values(o.parameters)) for o in request.outputs)
    return shm.ShmUse(inputs, tuple(ref for ref in outputs if ref is not None))


def put_shared_memory_inputs(request: pb.ModelInferRequest, data: Sequence[bytes | None]) -> None:
    """Turn ``request`` into one that carries its tensors itself, without shared memory parameters.

    The inputs read from shared memory (``data``, per input; None for those in the request) join
    raw_input_contents, which then holds one entry per input.

    Raises:
        InvalidArgument: An input in shared memory with ``contents`` too; raw_input_contents not one
            entry per input outside shared memory; inputs sent as typed ``contents`` beside inputs
            in shared memory (raw_input_contents must then hold them all).
    """
    if any(item is not None for item in data):
        raw = list(request.raw_input_contents)
        outside = sum(item is None for item in data)
        if raw and len(raw) != outside:
            raise InvalidArgument(
                f"raw_input_contents has {len(raw)} entries, expected one per input not in shared memory ({outside})"
            )
        given = iter(raw)
        merged: list[bytes] = []
        for tensor, item in zip(request.inputs, data, strict=True):
            if item is not None and _has_contents(tensor):
                raise InvalidArgument(
                    f"input '{tensor.name}': contents are set, but its data is in shared memory; send one of them"
                )
            if item is None and not raw:
                raise InvalidArgument(
                    f"input '{tensor.name}': send it in raw_input_contents (not contents) or in shared memory: "
                    "a request with inputs in shared memory carries the others raw"
                )
            merged.append(item if item is not None else next(given))
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(merged)
    for tensor in (*request.inputs, *request.outputs):
        for name in shm.PARAMETERS:
            if name in tensor.parameters:
                del tensor.parameters[name]


def take_shared_memory_outputs(response: pb.ModelInferResponse, use: shm.ShmUse) -> dict[str, bytes]:
    """Take the bytes of the outputs to write into shared memory out of ``response``.

    Their raw_output_contents entries stay, empty (as in Triton's response), so the others keep their index.
    """
    names = {ref.tensor for ref in use.outputs}
    taken: dict[str, bytes] = {}
    for index, output in enumerate(response.outputs):
        if output.name in names and index < len(response.raw_output_contents):
            taken[output.name] = response.raw_output_contents[index]
            response.raw_output_contents[index] = b""
    return taken


def shared_memory_status(regions: Iterable[shm.RegionStatus]) -> pb.SystemSharedMemoryStatusResponse:
    """Describe registered system shared memory regions."""
    response = pb.SystemSharedMemoryStatusResponse()
    for region in regions:
        response.regions[region.name].CopyFrom(
            pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
            )
        )
    return response


def _tensor_metadata(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def model_metadata(model: ModelRecord, version: VersionRecord) -> pb.ModelMetadataResponse:
    """Describe a model version's signature."""
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[str(version.version)],
        platform=version.platform,
        inputs=_tensor_metadata(version.inputs),
        outputs=_tensor_metadata(version.outputs),
    )


def server_metadata() -> pb.ServerMetadataResponse:
    """Describe this server."""
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)


def _data_type(datatype: str) -> int:
    return int(mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    return list(spec.shape[1:] if batched else spec.shape)


def model_config(
    version: VersionRecord, deployment: DeploymentRecord | None, limits: Mapping[str, int]
) -> pb.ModelConfigResponse:
    """Describe a version as a Triton model configuration (batch dimension excluded when batched).

    The gateway's size ``limits`` are reported as ``parameters`` (string values, in bytes). A
    generative model is ``decoupled`` (``model_transaction_policy``), as Triton's streaming models.
    """
    max_batch = deployment.max_batch_size if deployment and version.is_batchable else 0
    config = mc.ModelConfig(
        name=version.model,
        platform=version.platform,
        backend="onnxruntime",
        max_batch_size=max_batch,
        input=[
            mc.ModelInput(name=s.name, data_type=_data_type(s.datatype), dims=_dims(s, max_batch > 0))
            for s in version.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=_data_type(s.datatype), dims=_dims(s, max_batch > 0))
            for s in version.outputs
        ],
    )
    if max_batch > 0 and deployment is not None:
        config.dynamic_batching.max_queue_delay_microseconds = deployment.max_wait_ms * 1000
    if generation.is_generative(version.platform):  # several responses per request (a token each)
        config.model_transaction_policy.decoupled = True
    for name, value in limits.items():
        config.parameters[name].string_value = str(value)
    return pb.ModelConfigResponse(config=config)


def _duration(target: pb.StatisticDuration, duration: Duration) -> None:
    target.count = duration.count
    target.ns = duration.ns


def model_statistics(stats: Iterable[VersionStats]) -> pb.ModelStatisticsResponse:
    """Report cluster-wide cumulative statistics (Triton's statistics extension), sorted by model and version."""
    response = pb.ModelStatisticsResponse()
    for item in sorted(stats, key=lambda item: (item.model, item.version)):
        entry = response.model_stats.add(
            name=item.model,
            version=str(item.version),
            last_inference=item.last_inference_ms,
            inference_count=item.inference_count,
            execution_count=item.execution_count,
        )
        inference = entry.inference_stats
        for target, duration in [
            (inference.success, item.success),
            (inference.fail, item.fail),
            (inference.queue, item.queue),
            (inference.compute_input, item.compute_input),
            (inference.compute_infer, item.compute_infer),
            (inference.compute_output, item.compute_output),
        ]:
            _duration(target, duration)
        for batch in item.batches:
            added = entry.batch_stats.add(batch_size=batch.batch_size)
            _duration(added.compute_input, Duration(batch.count, batch.compute_input_ns))
            _duration(added.compute_infer, Duration(batch.count, batch.compute_infer_ns))
            _duration(added.compute_output, Duration(batch.count, batch.compute_output_ns))
    return response


def repository_index(models: Iterable[ModelRecord]) -> pb.RepositoryIndexResponse:
    """List models with their deployed version and state."""
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=m.name,
                version=str(m.deployment.version) if m.deployment else "",
                state="READY" if m.deployment else "UNAVAILABLE",
                reason="" if m.deployment else "not deployed",
            )
            for m in models
        ]
    )
