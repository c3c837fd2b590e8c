"""The gateway's message limit follows its request limit unless it is set."""

from __future__ import annotations

import pytest

from services.gateway.settings import GatewaySettings

MIB = 1024 * 1024


def test_message_limit_defaults_to_the_request_limit_plus_one_mib() -> None:
    assert GatewaySettings().max_message_bytes == 33 * MIB
    assert GatewaySettings(max_request_tensor_bytes=4 * MIB).max_message_bytes == 5 * MIB


def test_message_limit_set_explicitly_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings(max_message_bytes=100 * MIB).max_message_bytes == 100 * MIB
    monkeypatch.setenv("MAAS_GATEWAY_MAX_MESSAGE_BYTES", str(2 * MIB))
    assert GatewaySettings().max_message_bytes == 2 * MIB
