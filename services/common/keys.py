"""Every Redis key and stream name used by MaaS, under one versioned prefix.

Model names are restricted to ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (registry), so a name
can never contain the ``:`` separator (nor ``{`` or ``}``).

Redis Cluster hash tags (docs/redis.md): a Lua script or a MULTI may only touch keys of one hash
slot, so keys that one script or transaction uses together share a ``{tag}`` (only the part in
braces is hashed):

- one model version's data plane: ``queue``, ``dead_letter``, ``stats`` and ``stats_window``
  share ``{<model>:<version>}`` (the worker acks, dead-letters and counts in one MULTI);
- one tenant: ``quota_bucket``, ``quota_in_flight`` and ``usage`` share ``{<tenant>}`` (the
  quota script takes the bucket and the in-flight set together);
- each gateway's reply stream is its own slot, ``{<gateway id>}``;
- the registry's metadata (``MODELS``, ``DEPLOYMENTS`` and every model's ``model``,
  ``versions``, ``aliases``) share ``{registry}``: its scripts and WATCH transactions read a
  model's hashes with the model set and the deployments hash. It is small and written rarely,
  so one slot costs nothing; the request path only reads it (cached).

On a single Redis the tags are plain characters of the names. Changing them (from the untagged
names before issue 10) is a one-time migration: data written under the old names is not read.
"""

from __future__ import annotations

PREFIX = "maas:v1:"
REGISTRY_TAG = "{registry}"
"""Hash tag of the registry's metadata keys (one cluster slot)."""

MODELS = f"{PREFIX}{REGISTRY_TAG}:models"
"""Sorted set of model names (score: creation time in ms)."""
DEPLOYMENTS = f"{PREFIX}{REGISTRY_TAG}:deployments"
"""Hash: model name -> deployment JSON (the desired state)."""
EVENTS = f"{PREFIX}events"
"""Stream of registry events (model created, version uploaded, deployed, ...)."""
QUEUE_GROUP = "workers"
"""Consumer group every inference worker of a queue reads through."""
WORKER_PREFIX = f"{PREFIX}worker:"
"""Prefix of worker heartbeat keys."""
MODEL_PREFIX = f"{PREFIX}{REGISTRY_TAG}:model:"
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
OPERATION_PREFIX = f"{PREFIX}operation:"
"""Prefix of the optimisation operations (``operation``)."""
GENERATION_CANCEL_PREFIX = f"{PREFIX}gencancel:"
"""Prefix of the cancel flags of generations (``generation_cancel``)."""


def model(name: str) -> str:
    """Hash of one model's fields."""
    return f"{MODEL_PREFIX}{name}"


def versions(name: str) -> str:
    """Hash: version number -> version JSON, for one model."""
    return f"{MODEL_PREFIX}{name}:versions"


def aliases(name: str) -> str:
    """Hash: alias name -> version number, for one model."""
    return f"{MODEL_PREFIX}{name}:aliases"


def version_tag(name: str, version: int) -> str:
    """The hash tag every data-plane key of one model version carries: ``{<name>:<version>}``."""
    return f"{{{name}:{version}}}"


def queue(name: str, version: int) -> str:
    """Request stream of one model version."""
    return f"{QUEUE_PREFIX}{version_tag(name, version)}"


def dead_letter(name: str, version: int) -> str:
    """Dead-letter stream of one model version (poison requests)."""
    return f"{DEAD_LETTER_PREFIX}{version_tag(name, version)}"


def stats(name: str, version: int) -> str:
    """Hash of one model version's cluster-wide inference statistics (``services.common.stats``)."""
    return f"{STATS_PREFIX}{version_tag(name, version)}"


def stats_window(name: str, version: int, slot: int) -> str:
    """Hash of one model version's calls in one short time slot (``services.common.stats``; expires)."""
    return f"{STATS_PREFIX}{version_tag(name, version)}:w:{slot}"


def replies(gateway_id: str) -> str:
    """Reply stream of one gateway process."""
    return f"{REPLIES_PREFIX}{{{gateway_id}}}"


def worker(worker_id: str) -> str:
    """Heartbeat key of one inference worker (expires when the worker stops beating)."""
    return f"{WORKER_PREFIX}{worker_id}"


def quota_bucket(tenant: str) -> str:
    """Hash of one tenant's token bucket (``tokens``, ``at_ms``), kept by the admission script."""
    return f"{QUOTA_PREFIX}{{{tenant}}}:bucket"


def quota_in_flight(tenant: str) -> str:
    """Sorted set of one tenant's calls in flight (member: reply stream and call id; score: deadline ms)."""
    return f"{QUOTA_PREFIX}{{{tenant}}}:in_flight"


def usage(tenant: str) -> str:
    """Hash of one tenant's cluster-wide usage counters (``services.common.usage``)."""
    return f"{USAGE_PREFIX}{{{tenant}}}"


def operation(operation_id: str) -> str:
    """Hash holding one optimisation operation as JSON (``services.registry.operations``; expires after it ends)."""
    return f"{OPERATION_PREFIX}{operation_id}"


def generation_cancel(call_id: str) -> str:
    """Flag set by a gateway when the caller of a generation went away (the worker stops it; expires)."""
    return f"{GENERATION_CANCEL_PREFIX}{call_id}"
