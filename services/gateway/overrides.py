"""RepositoryModelLoad's ``config`` parameter: the Triton model-configuration settings MaaS has.

MaaS honours ``max_batch_size``, ``dynamic_batching.max_queue_delay_microseconds`` (as the
deployment's ``max_wait_ms``) and ``parameters.pool.string_value`` (the worker pool) as a
deployment change; every other setting is refused, never silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument

_KEYS = ("name", "max_batch_size", "dynamic_batching", "parameters")


@dataclass(frozen=True)
class DeployOverrides:
    """Deployment settings a load asks for; None keeps the current (or default) value."""

    max_batch_size: int | None = None
    max_wait_ms: int | None = None
    pool: str | None = None


def _integer(where: str, value: Any) -> int:
    # NOTE: protobuf's JSON mapping writes 64-bit integers as strings ("100").
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise InvalidArgument(f"config {where} must be a non-negative integer, got {json.dumps(value)}")
    return int(value)


def _object(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"config {where} must be a JSON object, got {json.dumps(value)}")
    return value


def _only(where: str, value: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in value:
        if key not in allowed:
            raise InvalidArgument(
                f"config {where}'{key}' is not supported by MaaS; it honours {', '.join(allowed)} only"
            )


def _max_wait_ms(value: Any) -> int:
    batching = _object("dynamic_batching", value)
    _only("dynamic_batching.", batching, ("max_queue_delay_microseconds",))
    delay_us = _integer(
        "dynamic_batching.max_queue_delay_microseconds", batching.get("max_queue_delay_microseconds", 0)
    )
    return math.ceil(delay_us / 1000)


def _pool(value: Any) -> str:
    parameters = _object("parameters", value)
    _only("parameters.", parameters, ("pool",))
    pool = _object("parameters.pool", parameters["pool"]).get("string_value")
    if not isinstance(pool, str) or not pool:
        raise InvalidArgument('config parameters.pool must be {"string_value": "<pool name>"}')
    return pool


def parse_load_config(model: str, text: str) -> DeployOverrides:
    """Parse a ``config`` JSON into the deployment settings it changes.

    Raises:
        InvalidArgument: It is not JSON, names another model, or sets what MaaS does not have.
    """
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"parameter 'config' is not valid JSON: {exc.msg} (position {exc.pos})") from None
    if not isinstance(config, dict):
        raise InvalidArgument("parameter 'config' must be a JSON object (a Triton model configuration)")
    _only("", config, _KEYS)
    if config.get("name", model) != model:
        raise InvalidArgument(f"config name {json.dumps(config['name'])} does not match model '{model}'")
    return DeployOverrides(
        max_batch_size=_integer("max_batch_size", config["max_batch_size"]) if "max_batch_size" in config else None,
        max_wait_ms=_max_wait_ms(config["dynamic_batching"]) if "dynamic_batching" in config else None,
        pool=_pool(config["parameters"]) if "parameters" in config else None,
    )
