"""A typed Python client of MaaS, sync (``MaasClient``) and asyncio (``AsyncMaasClient``).

Inference goes through the gateway with numpy arrays in and out; models, versions and deployments
through the registry. Failures are ``services.common.errors`` classes, each with its ``grpc_code``::

    import numpy as np
    from services.client import MaasClient

    with MaasClient("127.0.0.1:8001", "127.0.0.1:8002") as client:
        client.push("affine", "affine.onnx", progress=lambda sent, total: print(sent, total))
        client.deploy("affine")
        outputs = client.infer("affine", {"x": np.ones((1, 4), np.float32)})
"""

from services.client.aio import AsyncMaasClient, ClientOptions, DeploySettings, GenerationOptions
from services.client.results import InferResult, ModelMetadata, TextPiece
from services.client.sync import MaasClient
from services.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "AlreadyExists",
    "AsyncMaasClient",
    "ClientOptions",
    "DeadlineExceeded",
    "DeploySettings",
    "FailedPrecondition",
    "GenerationOptions",
    "InferResult",
    "InvalidArgument",
    "MaasClient",
    "MaasError",
    "ModelMetadata",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TextPiece",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
