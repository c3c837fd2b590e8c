"""Pure conversions between the KServe v2 messages and the gateway's domain types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc

from inference import grpc_service_pb2 as pb
from inference import model_config_pb2 as mc
from services.common import dtypes
from services.common.errors import InvalidArgument
from services.common.metadata import DeploymentRecord, ModelRecord, TensorSpec, VersionRecord
from services.gateway.overrides import DeployOverrides, parse_load_config
from services.gateway.router import InferCall, InputView, ModelStats

SERVER_NAME = "maas"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("model_configuration", "model_repository", "statistics")


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


def request_size(request: pb.ModelInferRequest) -> int:
    """Bytes of the serialized request (computed, not serialized: no copy of the tensors)."""
    return int(request.ByteSize())


def infer_call(request: pb.ModelInferRequest) -> InferCall:
    """Extract what the router validates; the serialized request travels on untouched."""
    raw = list(request.raw_input_contents)  # NOTE: each access to the field copies the bytes
    return InferCall(
        model=request.model_name,
        version=request.model_version,
        inputs=tuple(_input_view(tensor, raw[i] if i < len(raw) else None) for i, tensor in enumerate(request.inputs)),
        outputs=tuple(output.name for output in request.outputs),
        raw_count=len(raw),
        payload=request.SerializeToString(),
        parameters=tuple(request.parameters),
        output_parameters=tuple((output.name, name) for output in request.outputs for name in output.parameters),
    )


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

    The gateway's size ``limits`` are reported as ``parameters`` (string values, in bytes).
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
    for name, value in limits.items():
        config.parameters[name].string_value = str(value)
    return pb.ModelConfigResponse(config=config)


def model_statistics(stats: dict[tuple[str, int], ModelStats]) -> pb.ModelStatisticsResponse:
    """Report this gateway's cumulative statistics."""
    response = pb.ModelStatisticsResponse()
    for (name, version), item in sorted(stats.items()):
        entry = response.model_stats.add(
            name=name,
            version=str(version),
            last_inference=item.last_inference_ms,
            inference_count=item.success,
            execution_count=item.success,
        )
        entry.inference_stats.success.count = item.success
        entry.inference_stats.success.ns = item.success_ns
        entry.inference_stats.fail.count = item.fail
        entry.inference_stats.fail.ns = item.fail_ns
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
