"""Run the gateway: ``python -m services.gateway`` (configured by MAAS_GATEWAY_* variables)."""

import asyncio

from services.common.logging import configure_logging
from services.gateway.server import serve
from services.gateway.settings import GatewaySettings

if __name__ == "__main__":
    settings = GatewaySettings()
    configure_logging(settings.log_level, json=settings.log_json, service="gateway")
    asyncio.run(serve(settings))
