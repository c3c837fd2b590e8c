"""Every Redis key and stream name used by MaaS, under one versioned prefix.

Model names are restricted to ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (registry), so a name
can never contain the ``:`` separator.
"""

from __future__ import annotations

PREFIX = "maas:v1:"

MODELS = f"{PREFIX}models"
"""Sorted set of model names (score: creation time in ms)."""
DEPLOYMENTS = f"{PREFIX}deployments"
"""Hash: model name -> deployment JSON (the desired state)."""
EVENTS = f"{PREFIX}events"
"""Stream of registry events (model created, version uploaded, deployed, ...)."""
QUEUE_GROUP = "workers"
"""Consumer group every inference worker of a queue reads through."""
WORKER_PREFIX = f"{PREFIX}worker:"
"""Prefix of worker heartbeat keys."""
MODEL_PREFIX = f"{PREFIX}model:"
"""Prefix of each model's hashes (``model``, ``versions``)."""
QUEUE_PREFIX = f"{PREFIX}queue:"
"""Prefix of the request streams (``queue``)."""
DEAD_LETTER_PREFIX = f"{PREFIX}dlq:"
"""Prefix of the dead-letter streams (``dead_letter``)."""
STATS_PREFIX = f"{PREFIX}stats:"
"""Prefix of the statistics hashes (``stats``)."""
REPLIES_PREFIX = f"{PREFIX}replies:"
"""Prefix of the gateways' reply streams (``replies``)."""
TENANTS = f"{PREFIX}tenants"
"""Hash: tenant name -> tenant JSON (``services.registry.identities``)."""
API_KEYS = f"{PREFIX}apikeys"
"""Hash: API key id -> key record JSON (``services.common.auth``: its secret only as an HMAC)."""
QUOTA_PREFIX = f"{PREFIX}quota:"
"""Prefix of the tenants' admission state (``quota_bucket``, ``quota_in_flight``)."""
USAGE_PREFIX = f"{PREFIX}usage:"
"""Prefix of the tenants' usage counters (``usage``)."""


def model(name: str) -> str:
    """Hash of one model's fields."""
    return f"{PREFIX}model:{name}"


def versions(name: str) -> str:
    """Hash: version number -> version JSON, for one model."""
    return f"{PREFIX}model:{name}:versions"


def aliases(name: str) -> str:
    """Hash: alias name -> version number, for one model."""
    return f"{PREFIX}model:{name}:aliases"


def queue(name: str, version: int) -> str:
    """Request stream of one model version."""
    return f"{PREFIX}queue:{name}:{version}"


def dead_letter(name: str, version: int) -> str:
    """Dead-letter stream of one model version (poison requests)."""
    return f"{PREFIX}dlq:{name}:{version}"


def stats(name: str, version: int) -> str:
    """Hash of one model version's cluster-wide inference statistics (``services.common.stats``)."""
    return f"{PREFIX}stats:{name}:{version}"


def stats_window(name: str, version: int, slot: int) -> str:
    """Hash of one model version's calls in one short time slot (``services.common.stats``; expires)."""
    return f"{PREFIX}stats:{name}:{version}:w:{slot}"


def replies(gateway_id: str) -> str:
    """Reply stream of one gateway process."""
    return f"{PREFIX}replies:{gateway_id}"


def worker(worker_id: str) -> str:
    """Heartbeat key of one inference worker (expires when the worker stops beating)."""
    return f"{WORKER_PREFIX}{worker_id}"


def quota_bucket(tenant: str) -> str:
    """Hash of one tenant's token bucket (``tokens``, ``at_ms``), kept by the admission script."""
    return f"{QUOTA_PREFIX}{tenant}:bucket"


def quota_in_flight(tenant: str) -> str:
    """Sorted set of one tenant's calls in flight (member: reply stream and call id; score: deadline ms)."""
    return f"{QUOTA_PREFIX}{tenant}:in_flight"


def usage(tenant: str) -> str:
    """Hash of one tenant's cluster-wide usage counters (``services.common.usage``)."""
    return f"{USAGE_PREFIX}{tenant}"
