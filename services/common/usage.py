"""Per-tenant usage, cluster-wide: one Redis hash per tenant (``keys.usage``), added to with HINCRBY.

- Gateways add ``calls`` and ``errors`` (calls that ended with another code than OK, quota
  refusals included), counted in memory and sent with the admission round trips
  (``services.gateway.quotas``).
- Workers add ``compute_ns`` inside the MULTI that answers a batch: each request that ran
  successfully is charged its decode and encode time and an equal share of its batch's run.

Calls of gateways that check no keys have no tenant and are not counted here. The registry
reads the hashes for ``ListTenants`` (``maas tenants ls``, ``maas status``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from services.common import keys

CALLS = "calls"
ERRORS = "errors"
COMPUTE_NS = "compute_ns"

TENANT_COMPUTE = Counter(
    "maas_inference_tenant_compute_seconds",
    "Compute time charged to each tenant (decode, its share of the batch run, encode), in seconds.",
    ["tenant", "model", "version"],
)


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant used, across every gateway and worker."""

    calls: int = 0
    errors: int = 0
    compute_ns: int = 0

    @classmethod
    def parse(cls, fields: Mapping[bytes, bytes]) -> TenantUsage:
        """Build from a usage hash (missing fields are 0)."""
        return cls(
            calls=int(fields.get(CALLS.encode(), 0)),
            errors=int(fields.get(ERRORS.encode(), 0)),
            compute_ns=int(fields.get(COMPUTE_NS.encode(), 0)),
        )


class ComputeCharges:
    """The compute time one worker batch charges to each tenant (for the MULTI that answers it).

    Args:
        labels: The worker's ``model`` and ``version`` metric labels.
    """

    __slots__ = ("_by_tenant", "_labels")

    def __init__(self, labels: Mapping[str, str]) -> None:
        self._labels = labels
        self._by_tenant: dict[str, int] = defaultdict(int)

    def charge(self, tenant: str, ns: int) -> None:
        """Charge ``ns`` of compute to ``tenant`` (nothing without a tenant)."""
        if tenant:
            self._by_tenant[tenant] += ns

    def commands(self) -> list[tuple[Any, ...]]:
        """Count the charges in the metrics; return their HINCRBYs."""
        for tenant, ns in self._by_tenant.items():
            TENANT_COMPUTE.labels(tenant=tenant, **self._labels).inc(ns / 1e9)
        return [("HINCRBY", keys.usage(tenant), COMPUTE_NS, ns) for tenant, ns in self._by_tenant.items() if ns]
