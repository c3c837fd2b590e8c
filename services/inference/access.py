"""Model ownership on a worker's direct inference service: the gateway's check, on the registry's record.

The API key check (scope and model patterns) runs in the ``AuthInterceptor`` as on the gateway;
this adds the tenant check the gateway makes (``auth.check_owner``), so that a tenant's key gets
the same NOT_FOUND for another tenant's model here as there, whether the model exists or not.
Keys that see every model (the ``system`` tenant's) and a worker without keys cost no lookup; a
tenant's key costs one registry call per direct call (this service is for debugging and
benchmarks, not traffic).
"""

from __future__ import annotations

from typing import Protocol

from services.common import auth
from services.common.errors import NotFound
from services.common.metadata import ModelRecord


class ModelLookup(Protocol):
    """Where a model's owner and shares are read (``RegistryClient`` with the worker's key)."""

    async def get_model(self, name: str) -> ModelRecord:
        """Get one model's record."""
        ...


class DirectAccess:
    """Refuses, on a worker's direct service, a model the calling key's tenant may not see.

    Args:
        models: Reads model records; None refuses every model to a tenant's key (fails closed).
    """

    def __init__(self, models: ModelLookup | None) -> None:
        self._models = models

    async def check(self, name: str) -> None:
        """Refuse ``name`` if the calling key's tenant may not see it.

        Raises:
            NotFound: The model does not exist, or the tenant may not see it (one message for both).
            Unavailable: The registry cannot be reached.
        """
        if not auth.is_restricted():
            return
        if self._models is None:
            raise auth.model_not_found(name)
        try:
            record = await self._models.get_model(name)
        except NotFound:
            raise auth.model_not_found(name) from None
        auth.check_owner(name, record.owner, record.shared_with)
