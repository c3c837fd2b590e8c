"""``AsyncMaasClient``: inference through the gateway and model management through the registry, on asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import grpc
import numpy as np
import numpy.typing as npt

from inference import grpc_service_pb2_grpc
from services.client import conversion, convert, tuning
from services.client.results import InferResult, ModelMetadata, TextPiece
from services.common.auth import ApiKeyRecord, TenantQuota, TenantRecord
from services.common.errors import AlreadyExists, map_rpc_error
from services.common.events import Event
from services.common.metadata import DeploymentRecord, ModelRecord, VersionRecord
from services.common.optimization import OperationRecord
from services.common.registry_client import (
    DEFAULT_MIN_TRANSFER_BYTES_PER_S,
    MetadataSource,
    ProgressCallback,
    RegistryClient,
    call_upstream,
    create_channel,
    resolve_metadata,
)
from services.common.status import ClusterStatus
from services.common.usage import TenantUsage

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
"""A pushed file with one of these names is a bundle's tar archive (``upload_tar``)."""


class DeploySettings(TypedDict, total=False):
    """Deployment options; an option left out takes the registry's default."""

    max_batch_size: int
    max_wait_ms: int
    pool: str
    max_queue_length: int


class GenerationOptions(TypedDict, total=False):
    """Generation parameters of a generative model's call; one left out takes the model's default.

    The gateway checks them: ``max_new_tokens`` 1..its limit (default 128), ``temperature`` > 0,
    ``top_k`` >= 0, ``top_p`` in (0, 1], ``seed`` an int64. ``do_sample`` samples (with
    temperature, top-k, top-p) instead of greedy decoding; a seeded sampling is reproducible.
    """

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    do_sample: bool


class ClientOptions(TypedDict, total=False):
    """Keyword options of both clients; see ``AsyncMaasClient``."""

    credentials: grpc.ChannelCredentials | None
    metadata: MetadataSource
    timeout_s: float
    registry_timeout_s: float
    min_transfer_bytes_per_s: float


class AsyncMaasClient:
    """A typed client of a MaaS gateway (KServe v2 inference) and registry (models, versions, deployments).

    Every failure is raised as a ``services.common.errors`` class whose ``grpc_code`` is the call's
    status: ``NotFound`` for an unknown model, ``InvalidArgument`` for a wrong shape or datatype,
    ``FailedPrecondition`` when nothing is deployed, ``Unavailable`` when a service cannot be reached.

    Aliases (``set_alias``: ``production`` -> 3) name versions: pass one as ``version`` to ``infer``.
    A deployment may split calls that name no version among several versions (``deploy`` with
    ``traffic``), ``promote`` one, and ``rollback`` to the split before.

    Args:
        gateway: host:port of the gateway.
        registry: host:port of the registry.
        credentials: TLS credentials for both channels; plaintext when None.
        metadata: Sent with every call: fixed ``(key, value)`` pairs, or a hook returning them before
            each call (e.g. for a token that expires).
        timeout_s: Default deadline of an inference call, in seconds.
        registry_timeout_s: Deadline of a registry call. Uploads and downloads get at least 300 s
            plus their size at ``min_transfer_bytes_per_s``.
        min_transfer_bytes_per_s: Slowest link a push or pull is given time for (default 1 MiB/s:
            a 10 GiB bundle gets 300 s + 10240 s).
    """

    def __init__(
        self,
        gateway: str = "127.0.0.1:8001",
        registry: str = "127.0.0.1:8002",
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: MetadataSource = (),
        timeout_s: float = 60.0,
        registry_timeout_s: float = 30.0,
        min_transfer_bytes_per_s: float = DEFAULT_MIN_TRANSFER_BYTES_PER_S,
    ) -> None:
        self.timeout_s = timeout_s
        self._metadata = metadata
        self._channel = create_channel(gateway, credentials)
        self._inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._registry = RegistryClient(
            registry, timeout_s=registry_timeout_s, credentials=credentials, metadata=metadata,
            min_transfer_bytes_per_s=min_transfer_bytes_per_s,
        )  # fmt: skip

    async def close(self) -> None:
        """Close both channels."""
        await self._channel.close()
        await self._registry.close()

    async def __aenter__(self) -> AsyncMaasClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _gateway_call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        return await call_upstream(
            method,
            request,
            upstream="gateway",
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            metadata=resolve_metadata(self._metadata),
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        version: int | str | None = None,
        outputs: Iterable[str] = (),
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run a model once (KServe v2 ModelInfer with raw contents) and return its outputs.

        Args:
            model: The model's name.
            inputs: Arrays by input name; each one's numpy dtype picks its datatype (str, bytes and
                object arrays are BYTES).
            version: The version to run; None runs the deployed one.
            outputs: Names of the outputs to return; empty returns them all.
            timeout_s: Deadline of this call (the client's ``timeout_s`` when None).

        Returns:
            The outputs by name (a dict), with ``model_name`` and ``model_version`` of the model that answered.

        Raises:
            NotFound: The model or version does not exist.
            InvalidArgument: An input's name, datatype or shape does not match the model.
            FailedPrecondition: The model, or that version, is not deployed.
            ResourceExhausted: The model's queue is full.
            DeadlineExceeded: No reply by the deadline.
        """
        request = convert.infer_request(model, inputs, version=convert.version_string(version), outputs=outputs)
        return convert.infer_result(await self._gateway_call(self._inference.ModelInfer, request, timeout_s))

    async def generate(
        self,
        model: str,
        prompt: str,
        *,
        version: int | str | None = None,
        timeout_s: float | None = None,
        **options: Unpack[GenerationOptions],
    ) -> AsyncGenerator[TextPiece, None]:
        """Run a generative model on ``prompt``; yield its answer piece by piece as it is produced.

        Uses ModelStreamInfer (Triton's decoupled protocol); the last piece has ``is_final`` and
        the ``finish_reason``. Closing the iteration early (``break``, ``aclose``) cancels the call,
        which stops the generation on the worker.

        Args:
            model: The model's name.
            prompt: The text to continue.
            version: The version to run; None runs the deployed one.
            timeout_s: Deadline of the whole generation (the client's ``timeout_s`` when None).
            **options: Generation parameters (``GenerationOptions``).

        Raises:
            NotFound: The model or version does not exist.
            InvalidArgument: An unknown parameter, or one out of its range (named in the message).
            FailedPrecondition: The model is not deployed.
            DeadlineExceeded: The generation did not end by the deadline.
            Unavailable: The gateway cannot be reached, or the worker died during an unseeded sampling.
        """
        request = convert.generation_request(
            model, prompt, version=convert.version_string(version), options={**options}
        )
        call = self._inference.ModelStreamInfer(
            iter([request]),
            timeout=self.timeout_s if timeout_s is None else timeout_s,
            metadata=resolve_metadata(self._metadata),
        )
        decoder = convert.PieceDecoder()
        try:
            async for response in call:
                yield decoder.piece(response)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "gateway") from exc
        finally:
            call.cancel()  # a no-op once the call is over

    async def generate_text(
        self,
        model: str,
        prompt: str,
        *,
        version: int | str | None = None,
        timeout_s: float | None = None,
        **options: Unpack[GenerationOptions],
    ) -> str:
        """Run a generative model on ``prompt`` and return the whole answer (ModelInfer).

        Arguments and errors as for ``generate``.
        """
        answer = await self.generate_answer(model, prompt, version=version, timeout_s=timeout_s, **options)
        return answer.text

    async def generate_answer(
        self,
        model: str,
        prompt: str,
        *,
        version: int | str | None = None,
        timeout_s: float | None = None,
        **options: Unpack[GenerationOptions],
    ) -> TextPiece:
        """Run a generative model on ``prompt`` (ModelInfer); return the whole answer as one final piece.

        The piece has the whole text, the ``finish_reason`` and the version that answered.
        Arguments and errors as for ``generate``.
        """
        request = convert.generation_request(
            model, prompt, version=convert.version_string(version), options={**options}
        )
        return convert.generated_answer(await self._gateway_call(self._inference.ModelInfer, request, timeout_s))

    async def model_metadata(
        self, model: str, *, version: int | str | None = None, timeout_s: float | None = None
    ) -> ModelMetadata:
        """Return a model's signature (of ``version``, or of the deployed one).

        Raises:
            NotFound: The model or version does not exist.
        """
        request = convert.metadata_request(model, convert.version_string(version))
        return convert.metadata_from_proto(await self._gateway_call(self._inference.ModelMetadata, request, timeout_s))

    async def model_ready(
        self, model: str, *, version: int | str | None = None, timeout_s: float | None = None
    ) -> bool:
        """Whether a live worker serves the model (``version``, or the deployed one)."""
        request = convert.ready_request(model, convert.version_string(version))
        return bool((await self._gateway_call(self._inference.ModelReady, request, timeout_s)).ready)

    async def push(
        self,
        name: str,
        artifact: bytes | str | os.PathLike[str],
        *,
        description: str | None = None,
        progress: ProgressCallback | None = None,
        class_labels: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        custom_ops: Sequence[str] = (),
        entry_point: str = "",
    ) -> VersionRecord:
        """Upload an ONNX model as a new version of ``name``, creating the model if it does not exist.

        Concurrent pushes of a new name all succeed, each with its own version.

        Args:
            name: The model's name.
            artifact: The .onnx bytes, or the path of a file (streamed, never read whole into memory);
                a directory is pushed as a bundle (every file in it), a ``.tar`` (``.tar.gz``,
                ``.tgz``) file as a bundle that the registry extracts.
            description: The version's description, and the model's when this call creates it.
            progress: Called as ``progress(sent_bytes, total_bytes)`` as chunks are sent (on the
                event loop; on the client's loop thread for ``MaasClient``).
            class_labels: Labels of the classification extension, by class index (``class_count``).
            labels: The version's labels (keys follow the name rule; values up to 256 characters).
            custom_ops: Custom-operator libraries the model needs: ``["onnxruntime-extensions"]`` for
                a model with its operators (tokenizers, string ops); nothing else is accepted.
            entry_point: A bundle's .onnx file to load; empty: its only .onnx file at the top level.

        Returns:
            The new version (its number is ``.version``; ``pushed_by`` names the API key).

        Raises:
            InvalidArgument: The artifact is not an ONNX model that ONNX Runtime can load.
        """
        # Create-if-missing without a read first: when concurrent pushes race to create it, one wins
        # and the others' AlreadyExists is just as good (issue 7).
        with contextlib.suppress(AlreadyExists):
            await self._registry.create_model(name, description or "")
        data = artifact if isinstance(artifact, bytes) else Path(artifact)
        is_dir = isinstance(data, Path) and await asyncio.to_thread(data.is_dir)
        if isinstance(data, Path) and (is_dir or data.name.endswith(_TAR_SUFFIXES)):
            upload = self._registry.upload_bundle if is_dir else self._registry.upload_tar
            return await upload(
                name, data, entry_point=entry_point, progress=progress, class_labels=class_labels,
                description=description or "", labels=labels, custom_ops=custom_ops,
            )  # fmt: skip
        return await self._registry.upload_version(
            name, data, progress=progress, class_labels=class_labels, description=description or "", labels=labels,
            custom_ops=custom_ops,
        )  # fmt: skip

    async def convert_and_push(
        self,
        name: str,
        estimator: Any,
        *,
        sample: npt.ArrayLike | None = None,
        n_features: int | None = None,
        tolerance: float = conversion.DEFAULT_TOLERANCE,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> tuple[VersionRecord, conversion.Conversion]:
        """Convert a fitted scikit-learn estimator to ONNX here, check it on sample rows, then ``push`` it.

        Needs ``pip install 'maas[convert]'``. A classifier's ``classes_`` become the version's class labels.

        Args:
            name: The model.
            estimator: A fitted estimator or pipeline (an object; ``conversion.load_estimator`` reads files).
            sample: Rows [n, features] to type the input and check the outputs on; None: random rows.
            n_features: The input width when there is no sample and the estimator does not tell it.
            tolerance: Allowed |onnx - estimator| per value: ``tolerance + tolerance * |estimator|``.
            description: The version's description.
            labels: The version's labels.
            progress: As for ``push``.

        Returns:
            The new version and the conversion (its checks).

        Raises:
            FailedPrecondition: An output differs over the tolerance (nothing is pushed), or the extra is missing.
            InvalidArgument: skl2onnx cannot convert the estimator, or the sample cannot be used.
        """
        rows = None if sample is None else np.asarray(sample)
        converted = await asyncio.to_thread(
            conversion.convert_estimator, estimator, rows, n_features=n_features, tolerance=tolerance
        )
        version = await self.push(
            name, converted.model, description=description, progress=progress,
            class_labels=converted.class_labels, labels=labels,
        )  # fmt: skip
        return version, converted

    async def tune(
        self,
        model: str,
        grid: Sequence[tuning.TuneSetting],
        *,
        p99_budget_ms: float,
        inputs: Mapping[str, npt.NDArray[Any]] | None = None,
        options: tuning.TuneOptions | None = None,
        apply: bool = False,
        is_stopped: tuning.StopCheck = lambda: False,
        on_result: Callable[[tuning.TuneResult], None] = lambda result: None,
    ) -> tuning.TuneReport:
        """Measure a deployed model under load at each setting and recommend one (``services.client.tuning``).

        The original deployment is put back at the end, even after an error, unless ``apply``
        deploys the recommendation. Build ``grid`` with ``tuning.settings_grid``.

        Raises:
            FailedPrecondition: The model is not deployed.
            InvalidArgument: An option or setting is out of range.
        """
        return await tuning.tune(
            self, model, grid, p99_budget_ms=p99_budget_ms, inputs=inputs, options=options, apply=apply,
            is_stopped=is_stopped, on_result=on_result,
        )  # fmt: skip

    async def deploy(
        self,
        name: str,
        version: int = 0,
        *,
        traffic: Mapping[int, int] | None = None,
        keep_settings: bool = False,
        **settings: Unpack[DeploySettings],
    ) -> DeploymentRecord:
        """Deploy a version (0: the latest), or split calls among versions, replacing the model's deployment.

        The split it replaces is kept for ``rollback``.

        Args:
            name: The model.
            version: The version to serve (0: the latest); leave it 0 with ``traffic``.
            traffic: Weight by version, summing to 100 (``{3: 90, 4: 10}``: a canary).
            keep_settings: Settings left out keep the current deployment's values (else the defaults).
            **settings: Batching, pool and queue options.

        Raises:
            NotFound: The model or a version does not exist.
            InvalidArgument: A setting is out of range, or the weights are not 1..100 summing to 100.
        """
        if keep_settings:
            settings = await self._current_settings(name) | settings
        return await self._registry.deploy(name, version, traffic=(traffic or {}).items(), **settings)

    async def promote(self, name: str, version: int) -> DeploymentRecord:
        """Send every call that names no version to ``version``, keeping the deployment's settings.

        Raises:
            NotFound: The model or version does not exist.
        """
        return await self.deploy(name, traffic={version: 100}, keep_settings=True)

    async def rollback(self, name: str) -> DeploymentRecord:
        """Go back to the traffic split before the last deploy, promote or rollback.

        Raises:
            NotFound: The model does not exist or is not deployed.
            FailedPrecondition: There is no previous split, or one of its versions was deleted.
        """
        return await self._registry.rollback(name)

    async def _current_settings(self, name: str) -> DeploySettings:
        current = (await self._registry.get_model(name)).deployment
        if current is None:
            return {}
        return DeploySettings(
            max_batch_size=current.max_batch_size,
            max_wait_ms=current.max_wait_ms,
            pool=current.pool,
            max_queue_length=current.max_queue_length,
        )

    async def set_alias(self, name: str, alias: str, version: int) -> tuple[str, int]:
        """Point ``alias`` at a version of model ``name`` (created or moved); calls may then name it.

        Raises:
            NotFound: The model or version does not exist.
            InvalidArgument: The alias is not a valid name, or is a number.
        """
        return await self._registry.set_alias(name, alias, version)

    async def delete_alias(self, name: str, alias: str) -> None:
        """Remove an alias of model ``name`` (NotFound if it has no such alias)."""
        await self._registry.delete_alias(name, alias)

    async def list_aliases(self, name: str) -> list[tuple[str, int]]:
        """List the aliases of model ``name`` as (alias, version), by alias."""
        return await self._registry.list_aliases(name)

    async def undeploy(self, name: str) -> None:
        """Remove a model's deployment."""
        await self._registry.undeploy(name)

    async def list_models(self, prefix: str = "", labels: Mapping[str, str] | None = None) -> list[ModelRecord]:
        """List every model with its latest version and deployment, by name (all pages).

        Args:
            prefix: Only models whose name starts with it.
            labels: Only models with a version that carries all of them.
        """
        return await self._registry.list_models(prefix, labels)

    async def get_model(self, name: str) -> ModelRecord:
        """Return one model with its latest version and deployment (NotFound if absent)."""
        return await self._registry.get_model(name)

    async def list_versions(self, name: str, labels: Mapping[str, str] | None = None) -> list[VersionRecord]:
        """List a model's versions (those carrying all ``labels``), oldest first, with their signatures."""
        return await self._registry.list_versions(name, labels)

    async def update_version(
        self,
        name: str,
        version: int,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        remove_labels: Sequence[str] = (),
    ) -> VersionRecord:
        """Change a version's description and labels; the artifact stays as it is.

        Args:
            name: The model.
            version: The version (>= 1).
            description: The new description; None leaves it, "" clears it.
            labels: Labels to add or overwrite (the others stay).
            remove_labels: Keys of labels to remove (not also in ``labels``).

        Raises:
            NotFound: The model or version does not exist.
            InvalidArgument: A label or the description breaks the rules.
        """
        return await self._registry.update_version(
            name, version, description=description, labels=labels, remove_labels=remove_labels
        )

    async def delete_version(self, name: str, version: int) -> None:
        """Delete a version and its artifact.

        Raises:
            NotFound: The model or version does not exist.
            FailedPrecondition: The version serves traffic, or an alias points to it.
        """
        await self._registry.delete_version(name, version)

    def watch_events(self, after_id: str = "", *, follow: bool = False, model: str = "") -> AsyncGenerator[Event, None]:
        """Iterate over the registry's events after ``after_id`` (see ``RegistryClient.watch_events``)."""
        return self._registry.watch_events(after_id, follow=follow, model=model)

    async def get_version(self, name: str, version: int = 0) -> VersionRecord:
        """Return one version (0: the latest) with its signature, size and sha256."""
        return await self._registry.get_version(name, version)

    async def pull(
        self, name: str, dest: str | os.PathLike[str], *, version: int = 0, progress: ProgressCallback | None = None
    ) -> VersionRecord:
        """Download a version's .onnx file (0: the latest) to ``dest``, streamed and sha256-checked.

        A bundle version is written into the directory ``dest``, each file checked; files already
        there with the right sha256 are not downloaded again.

        Args:
            name: The model.
            dest: Where to write it (a bundle: its directory); it appears only whole and verified.
            version: The version; 0 is the latest.
            progress: Called as ``progress(received_bytes, total_bytes)`` as chunks arrive.

        Returns:
            The version downloaded.
        """
        record = await self._registry.get_version(name, version)
        if record.is_bundle:
            return await self._registry.download_bundle(name, record.version, Path(dest), progress=progress)
        return await self._registry.download_version(name, record.version, Path(dest), progress=progress)

    async def delete_model(self, name: str, *, force: bool | None = None) -> None:
        """Delete a model with all its versions and its deployment.

        Args:
            name: The model.
            force: True undeploys a deployed model first; False refuses it (FailedPrecondition);
                None: the registry's default, the same as True.
        """
        await self._registry.delete_model(name, force=force)

    async def share_model(self, name: str, tenant: str) -> ModelRecord:
        """Share a model with ``tenant``: its keys may then read and infer it, not change it.

        Needs the ``write`` scope and a key of the model's owner tenant or an admin's; sharing twice is fine.

        Returns:
            The model, with ``owner`` and ``shared_with``.

        Raises:
            NotFound: No such model (or one this key may not see), or no such tenant.
            PermissionDenied: This key's tenant only has the model shared.
            FailedPrecondition: The model has no owner: every tenant sees it.
            InvalidArgument: A name is invalid, or ``tenant`` is the owner.
        """
        return await self._registry.share_model(name, tenant)

    async def unshare_model(self, name: str, tenant: str) -> ModelRecord:
        """Stop sharing a model with ``tenant``; its gateways refuse that tenant within about a second.

        Raises:
            NotFound: No such model (or one this key may not see), or it is not shared with ``tenant``.
            PermissionDenied: This key's tenant only has the model shared.
        """
        return await self._registry.unshare_model(name, tenant)

    async def create_tenant(self, name: str, description: str = "") -> TenantRecord:
        """Create a tenant (needs a key with the ``admin`` scope).

        Raises:
            AlreadyExists: The name is taken.
        """
        return await self._registry.create_tenant(name, description)

    async def list_tenants(self) -> list[TenantRecord]:
        """List the tenants by name (``admin`` scope)."""
        return await self._registry.list_tenants()

    async def tenant_report(self) -> list[tuple[TenantRecord, TenantUsage]]:
        """List the tenants by name with their cluster-wide usage: calls, errors, compute (``admin`` scope)."""
        return await self._registry.tenant_report()

    async def cluster_status(self) -> ClusterStatus:
        """Return live workers and every deployed version's queue and last-minute calls (``admin`` scope).

        Raises:
            PermissionDenied: The key lacks the ``admin`` scope.
            Unavailable: The registry or its Redis cannot be reached.
        """
        return await self._registry.get_cluster_status()

    async def set_tenant_quota(
        self, tenant: str, *, rps: float = 0.0, burst: int = 0, max_in_flight: int = 0
    ) -> TenantRecord:
        """Set a tenant's quota at the gateways (``admin`` scope); 0 turns a limit off.

        Args:
            tenant: An existing tenant.
            rps: Calls admitted per second.
            burst: Calls admitted at once (>= 1 with ``rps``).
            max_in_flight: Calls admitted and not yet answered, across every gateway.

        Raises:
            NotFound: No such tenant.
            InvalidArgument: A limit is out of range, or ``burst`` and ``rps`` do not go together.
        """
        return await self._registry.set_tenant_quota(tenant, TenantQuota(rps, burst, max_in_flight))

    async def create_api_key(
        self, tenant: str, name: str, scopes: Sequence[str], *, models: Sequence[str] = (), expires_at_ms: int = 0
    ) -> tuple[ApiKeyRecord, str]:
        """Create an API key of ``tenant`` (``admin`` scope) and return its record and the key itself.

        Args:
            tenant: An existing tenant.
            name: A name for people and the audit log.
            scopes: Any of ``infer``, ``read``, ``write``, ``admin``.
            models: Model-name glob patterns the key may use (empty: every model).
            expires_at_ms: Unix time in ms after which the key is refused (0: never).

        Returns:
            The record and the key, which is shown only this once.

        Raises:
            NotFound: No such tenant.
            InvalidArgument: A name, scope, pattern or the expiry is invalid.
        """
        return await self._registry.create_api_key(tenant, name, scopes, models, expires_at_ms)

    async def list_api_keys(self, tenant: str = "") -> list[ApiKeyRecord]:
        """List API keys (of ``tenant``, or of all), never their secrets (``admin`` scope)."""
        return await self._registry.list_api_keys(tenant)

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord:
        """Revoke an API key by id (``admin`` scope); every server refuses it within about a second."""
        return await self._registry.revoke_api_key(key_id)

    async def optimize(
        self,
        name: str,
        version: int = 0,
        transform: str = "",
        *,
        auto: bool = False,
        device: str = "",
        max_abs_diff: float | None = None,
        options: Mapping[str, str] | None = None,
        calibration: bytes | str | os.PathLike[str] | None = None,
    ) -> OperationRecord:
        """Start deriving a faster or smaller variant of a version; return the operation (PENDING).

        Wait for it with ``wait_operation``; the variant becomes a new version with its lineage
        and report (``get_version``).

        Args:
            name: The model.
            version: The source version (0: the latest).
            transform: ``graph``, ``int8-dynamic``, ``int8-static`` or ``fp16`` (empty with ``auto``).
            auto: Try every transform that suits ``device`` and keep the fastest within ``max_abs_diff``.
            device: ``cpu`` (default) or ``gpu``.
            max_abs_diff: Largest absolute difference allowed on any output element (None: no limit).
            options: Transform options, e.g. ``{"per_channel": "true"}``.
            calibration: A .npz (bytes or a path) with one array per input: comparison and calibration rows.

        Raises:
            InvalidArgument: A bad transform, option, device or tolerance (named in the message).
            NotFound: No such model or version.
        """
        npz = b""
        if isinstance(calibration, bytes):
            npz = calibration
        elif calibration is not None:
            npz = await asyncio.to_thread(Path(calibration).read_bytes)
        return await self._registry.optimize_version(
            name, version, transform, is_auto=auto, device=device, max_abs_diff=max_abs_diff, options=options,
            calibration_npz=npz,
        )  # fmt: skip

    async def get_operation(self, operation_id: str) -> OperationRecord:
        """Return an optimisation operation (NotFound: unknown, expired, or of a model the key may not see)."""
        return await self._registry.get_operation(operation_id)

    def watch_operation(self, operation_id: str) -> AsyncGenerator[OperationRecord, None]:
        """Iterate over an operation now and at each change, until it ends."""
        return self._registry.watch_operation(operation_id)

    async def wait_operation(
        self, operation_id: str, progress: Callable[[OperationRecord], None] | None = None
    ) -> OperationRecord:
        """Wait for an operation to end and return it (SUCCEEDED or FAILED: check ``state``).

        Args:
            operation_id: The operation.
            progress: Called with the operation at each change.
        """
        async with contextlib.aclosing(self._registry.watch_operation(operation_id)) as updates:
            async for operation in updates:
                if progress is not None:
                    progress(operation)
                if operation.is_done:
                    return operation
        return await self._registry.get_operation(operation_id)
