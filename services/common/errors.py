"""The one error taxonomy of MaaS, mapped to gRPC status codes in one place.

::

    MaasError (INTERNAL)
    ├── InvalidArgument (INVALID_ARGUMENT)
    ├── NotFound (NOT_FOUND)
    ├── AlreadyExists (ALREADY_EXISTS)
    ├── FailedPrecondition (FAILED_PRECONDITION)
    ├── Unavailable (UNAVAILABLE)
    ├── ResourceExhausted (RESOURCE_EXHAUSTED)
    ├── DeadlineExceeded (DEADLINE_EXCEEDED)
    ├── Unimplemented (UNIMPLEMENTED)
    ├── Unauthenticated (UNAUTHENTICATED)
    └── PermissionDenied (PERMISSION_DENIED)

Messages are shown to clients as they are: never put secrets or internals in them.
``ErrorInterceptor`` (interceptors.py) is the only place that turns these into statuses.
"""

from __future__ import annotations

import grpc


class MaasError(Exception):
    """Base of every error a client may see; an unexpected failure."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    trailing_metadata: tuple[tuple[str, str], ...] = ()
    """Sent with the status (e.g. ``retry-after-ms``), after the server's own trailing metadata."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MaasError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MaasError):
    """A named model, version or deployment does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MaasError):
    """The thing to create exists already."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MaasError):
    """The system is not in the state the request needs (e.g. model not deployed)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(MaasError):
    """A dependency (Redis, registry, workers) cannot be reached; retry later."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(MaasError):
    """A queue limit or quota is reached; retry later with backoff."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        """``retry_after_ms``: the wait to suggest, sent as trailing metadata ``retry-after-ms``."""
        super().__init__(message)
        if retry_after_ms is not None:
            self.trailing_metadata = (("retry-after-ms", str(retry_after_ms)),)


class DeadlineExceeded(MaasError):
    """The request's deadline passed before a reply was ready."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(MaasError):
    """The RPC or option is part of the protocol but not served by MaaS."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(MaasError):
    """No API key, or one that is unknown, revoked or expired (one message for every reason)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MaasError):
    """A valid API key lacks the scope, or the model pattern, that the call needs."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[MaasError]] = {
    cls.grpc_code: cls
    for cls in (
        MaasError,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Unimplemented,
        Unauthenticated,
        PermissionDenied,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> MaasError:
    """Build the taxonomy error for a gRPC status code (unknown codes map to MaasError).

    Args:
        code: The status code received from an upstream service or a worker.
        message: The message to carry.

    Returns:
        An instance of the matching taxonomy class.
    """
    return _BY_CODE.get(code, MaasError)(message)


def code_from_value(value: int) -> grpc.StatusCode:
    """Return the ``grpc.StatusCode`` whose numeric value is ``value`` (INTERNAL if unknown)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.INTERNAL


def map_rpc_error(exc: grpc.aio.AioRpcError, upstream: str) -> MaasError:
    """Map an upstream service's ``AioRpcError`` back into the taxonomy.

    Args:
        exc: The error raised by a call on a ``grpc.aio`` channel.
        upstream: A short name of the upstream service, used in connectivity messages.

    Returns:
        The taxonomy error to raise (chain it with ``from exc``).
    """
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"{upstream} unreachable: {exc.details()}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{upstream} did not answer in time")
    return error_for_code(code, exc.details() or f"{upstream} error")
