"""RepositoryModelLoad's config parameter: what MaaS honours, and a clear refusal for the rest."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.gateway.overrides import DeployOverrides, parse_load_config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", DeployOverrides()),
        ('{"max_batch_size": 16}', DeployOverrides(max_batch_size=16)),
        ('{"name": "m", "max_batch_size": "4"}', DeployOverrides(max_batch_size=4)),
        ('{"dynamic_batching": {"max_queue_delay_microseconds": "1500"}}', DeployOverrides(max_wait_ms=2)),
        ('{"dynamic_batching": {}}', DeployOverrides(max_wait_ms=0)),
        ('{"parameters": {"pool": {"string_value": "gpu"}}}', DeployOverrides(pool="gpu")),
    ],
)
def test_settings_maas_has_become_deployment_changes(text: str, expected: DeployOverrides) -> None:
    assert parse_load_config("m", text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "parameter 'config' is not valid JSON: Expecting property name enclosed in double quotes"),
        ("[1]", "parameter 'config' must be a JSON object (a Triton model configuration)"),
        ('{"instance_group": []}', "config 'instance_group' is not supported by MaaS; it honours name, max_batch_size"),
        ('{"name": "other"}', "config name \"other\" does not match model 'm'"),
        ('{"max_batch_size": -1}', "config max_batch_size must be a non-negative integer, got -1"),
        ('{"max_batch_size": true}', "config max_batch_size must be a non-negative integer, got true"),
        ('{"dynamic_batching": {"preferred_batch_size": [4]}}', "config dynamic_batching.'preferred_batch_size'"),
        ('{"parameters": {"pool": {"int64_value": 1}}}', 'config parameters.pool must be {"string_value"'),
    ],
)
def test_everything_else_is_refused_naming_it(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_load_config("m", text)
    assert info.value.message.startswith(message)
