"""The ``maas.registry.v1.ModelRegistry`` servicer: convert, call the store, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.errors import MaasError
from services.common.grpc_server import drain_requests
from services.registry import convert
from services.registry.cluster_status import ClusterStatusReader
from services.registry.events_watch import visibility
from services.registry.identities import IdentityStore
from services.registry.optimize import Optimizer
from services.registry.store import ModelStore

_Context = Any
"""``grpc.aio.ServicerContext``; unused here (errors reach clients through ErrorInterceptor)."""


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    """Serves the registry API from a ``ModelStore`` and an ``IdentityStore``."""

    def __init__(
        self, store: ModelStore, identities: IdentityStore, cluster: ClusterStatusReader, optimizer: Optimizer
    ) -> None:
        self._store = store
        self._identities = identities
        self._cluster = cluster
        self._optimizer = optimizer

    async def CreateModel(
        self, request: registry_pb2.CreateModelRequest, context: _Context
    ) -> registry_pb2.CreateModelResponse:
        """Create a model."""
        model = await self._store.create_model(request.name, request.description)
        return registry_pb2.CreateModelResponse(model=convert.model_to_pb(model))

    async def GetModel(self, request: registry_pb2.GetModelRequest, context: _Context) -> registry_pb2.GetModelResponse:
        """Get one model with its deployment."""
        model = await self._store.get_model(request.name)
        return registry_pb2.GetModelResponse(model=convert.model_to_pb(model))

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: _Context
    ) -> registry_pb2.ListModelsResponse:
        """List a page of the models by name, filtered by name prefix and labels."""
        page = await self._store.lifecycle.list_models(convert.page_query(request))
        return registry_pb2.ListModelsResponse(
            models=[convert.model_to_pb(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def DeleteModel(
        self, request: registry_pb2.DeleteModelRequest, context: _Context
    ) -> registry_pb2.DeleteModelResponse:
        """Delete a model with its versions and deployment."""
        await self._store.delete_model(request.name, force=convert.delete_force(request))
        return registry_pb2.DeleteModelResponse()

    async def UploadVersion(
        self, request_iterator: AsyncIterator[registry_pb2.UploadVersionRequest], context: _Context
    ) -> registry_pb2.UploadVersionResponse:
        """Upload a version: a header, then chunks."""
        try:
            header, chunks = await convert.upload_stream(request_iterator)
            version = await self._store.upload_version(header, chunks)
        except MaasError:
            await drain_requests(request_iterator)
            raise
        return registry_pb2.UploadVersionResponse(version=convert.version_to_pb(version))

    async def GetVersion(
        self, request: registry_pb2.GetVersionRequest, context: _Context
    ) -> registry_pb2.GetVersionResponse:
        """Get one version (0: the latest)."""
        version = await self._store.get_version(request.model, request.version)
        return registry_pb2.GetVersionResponse(version=convert.version_to_pb(version))

    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: _Context
    ) -> registry_pb2.ListVersionsResponse:
        """List a page of a model's versions, oldest first, filtered by labels."""
        page = await self._store.lifecycle.list_versions(request.model, convert.page_query(request))
        return registry_pb2.ListVersionsResponse(
            versions=[convert.version_to_pb(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def UpdateVersion(
        self, request: registry_pb2.UpdateVersionRequest, context: _Context
    ) -> registry_pb2.UpdateVersionResponse:
        """Change a version's description and labels."""
        update = convert.version_update(request)
        version = await self._store.lifecycle.update_version(request.model, request.version, update)
        return registry_pb2.UpdateVersionResponse(version=convert.version_to_pb(version))

    async def DeleteVersion(
        self, request: registry_pb2.DeleteVersionRequest, context: _Context
    ) -> registry_pb2.DeleteVersionResponse:
        """Delete a version that serves no traffic and no alias points to."""
        await self._store.lifecycle.delete_version(request.model, request.version)
        return registry_pb2.DeleteVersionResponse()

    async def WatchEvents(
        self, request: registry_pb2.WatchEventsRequest, context: _Context
    ) -> AsyncIterator[registry_pb2.WatchEventsResponse]:
        """Stream the registry's events from a position, in order."""
        is_visible = visibility(self._store.get_model)
        async with aclosing(self._store.event_watch.watch(convert.watch_request(request), is_visible)) as watched:
            async for event in watched:
                yield convert.event_to_pb(event)

    async def DownloadVersion(
        self, request: registry_pb2.DownloadVersionRequest, context: _Context
    ) -> AsyncIterator[registry_pb2.DownloadVersionResponse]:
        """Stream a version: its record, then its artifact's chunks (from each file's offset when resuming)."""
        download = self._store.download_version(
            request.model, request.version, tuple(request.paths), dict(request.offsets)
        )
        async with aclosing(download) as parts:
            async for part in parts:
                yield convert.download_part_to_pb(part)

    async def Deploy(self, request: registry_pb2.DeployRequest, context: _Context) -> registry_pb2.DeployResponse:
        """Set a model's deployment."""
        deployment = await self._store.deploy(convert.deploy_spec(request))
        return registry_pb2.DeployResponse(deployment=convert.deployment_to_pb(deployment))

    async def Undeploy(self, request: registry_pb2.UndeployRequest, context: _Context) -> registry_pb2.UndeployResponse:
        """Remove a model's deployment."""
        await self._store.undeploy(request.model)
        return registry_pb2.UndeployResponse()

    async def ListDeployments(
        self, request: registry_pb2.ListDeploymentsRequest, context: _Context
    ) -> registry_pb2.ListDeploymentsResponse:
        """List the deployments, optionally of one pool."""
        deployments = await self._store.list_deployments(request.pool)
        return registry_pb2.ListDeploymentsResponse(deployments=[convert.deployment_to_pb(d) for d in deployments])

    async def ShareModel(
        self, request: registry_pb2.ShareModelRequest, context: _Context
    ) -> registry_pb2.ShareModelResponse:
        """Share a model with a tenant (read and infer)."""
        model = await self._store.share_model(request.name, request.tenant)
        return registry_pb2.ShareModelResponse(model=convert.model_to_pb(model))

    async def UnshareModel(
        self, request: registry_pb2.UnshareModelRequest, context: _Context
    ) -> registry_pb2.UnshareModelResponse:
        """Stop sharing a model with a tenant."""
        model = await self._store.share_model(request.name, request.tenant, is_shared=False)
        return registry_pb2.UnshareModelResponse(model=convert.model_to_pb(model))

    async def Rollback(self, request: registry_pb2.RollbackRequest, context: _Context) -> registry_pb2.RollbackResponse:
        """Go back to a deployment's previous traffic split."""
        deployment = await self._store.rollouts.rollback(request.model)
        return registry_pb2.RollbackResponse(deployment=convert.deployment_to_pb(deployment))

    async def SetAlias(self, request: registry_pb2.SetAliasRequest, context: _Context) -> registry_pb2.SetAliasResponse:
        """Point an alias at a version."""
        alias = await self._store.rollouts.set_alias(request.model, request.alias, request.version)
        return registry_pb2.SetAliasResponse(alias=convert.alias_to_pb(alias))

    async def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: _Context
    ) -> registry_pb2.DeleteAliasResponse:
        """Remove an alias."""
        await self._store.rollouts.delete_alias(request.model, request.alias)
        return registry_pb2.DeleteAliasResponse()

    async def ListAliases(
        self, request: registry_pb2.ListAliasesRequest, context: _Context
    ) -> registry_pb2.ListAliasesResponse:
        """List a model's aliases."""
        aliases = await self._store.rollouts.list_aliases(request.model)
        return registry_pb2.ListAliasesResponse(aliases=[convert.alias_to_pb(alias) for alias in aliases])

    async def CreateTenant(
        self, request: registry_pb2.CreateTenantRequest, context: _Context
    ) -> registry_pb2.CreateTenantResponse:
        """Create a tenant."""
        tenant = await self._identities.create_tenant(request.name, request.description)
        return registry_pb2.CreateTenantResponse(tenant=convert.tenant_to_pb(tenant))

    async def ListTenants(
        self, request: registry_pb2.ListTenantsRequest, context: _Context
    ) -> registry_pb2.ListTenantsResponse:
        """List the tenants by name, with their quotas and usage."""
        report = await self._identities.tenant_report()
        return registry_pb2.ListTenantsResponse(tenants=[convert.tenant_to_pb(t, usage) for t, usage in report])

    async def SetTenantQuota(
        self, request: registry_pb2.SetTenantQuotaRequest, context: _Context
    ) -> registry_pb2.SetTenantQuotaResponse:
        """Set a tenant's quota at the gateways."""
        tenant = await self._identities.set_tenant_quota(request.tenant, convert.tenant_quota(request))
        return registry_pb2.SetTenantQuotaResponse(tenant=convert.tenant_to_pb(tenant))

    async def GetClusterStatus(
        self, request: registry_pb2.GetClusterStatusRequest, context: _Context
    ) -> registry_pb2.GetClusterStatusResponse:
        """Report live workers and every deployed version's queue and last-minute calls."""
        return convert.cluster_status_to_pb(await self._cluster.read())

    async def CreateApiKey(
        self, request: registry_pb2.CreateApiKeyRequest, context: _Context
    ) -> registry_pb2.CreateApiKeyResponse:
        """Create an API key; the reply is the only place its secret appears."""
        record, key = await self._identities.create_api_key(convert.new_api_key(request))
        return registry_pb2.CreateApiKeyResponse(api_key=convert.api_key_to_pb(record), key=key)

    async def ListApiKeys(
        self, request: registry_pb2.ListApiKeysRequest, context: _Context
    ) -> registry_pb2.ListApiKeysResponse:
        """List API keys (without secrets)."""
        records = await self._identities.list_api_keys(request.tenant)
        return registry_pb2.ListApiKeysResponse(api_keys=[convert.api_key_to_pb(r) for r in records])

    async def RevokeApiKey(
        self, request: registry_pb2.RevokeApiKeyRequest, context: _Context
    ) -> registry_pb2.RevokeApiKeyResponse:
        """Revoke an API key."""
        record = await self._identities.revoke_api_key(request.id)
        return registry_pb2.RevokeApiKeyResponse(api_key=convert.api_key_to_pb(record))

    async def OptimizeVersion(
        self, request: registry_pb2.OptimizeVersionRequest, context: _Context
    ) -> registry_pb2.OptimizeVersionResponse:
        """Start deriving a version (a long-running operation, returned PENDING)."""
        operation = await self._optimizer.start(convert.optimize_request(request))
        return registry_pb2.OptimizeVersionResponse(operation=convert.operation_to_pb(operation))

    async def GetOperation(
        self, request: registry_pb2.GetOperationRequest, context: _Context
    ) -> registry_pb2.GetOperationResponse:
        """Get an optimisation operation."""
        operation = await self._optimizer.get(request.id)
        return registry_pb2.GetOperationResponse(operation=convert.operation_to_pb(operation))

    async def WatchOperation(
        self, request: registry_pb2.WatchOperationRequest, context: _Context
    ) -> AsyncIterator[registry_pb2.WatchOperationResponse]:
        """Stream an operation until it ends."""
        async with aclosing(self._optimizer.watch(request.id)) as operations:
            async for operation in operations:
                yield registry_pb2.WatchOperationResponse(operation=convert.operation_to_pb(operation))
