"""Run the registry service: ``python -m services.registry``."""

from __future__ import annotations

import asyncio

from services.common.logging import configure_logging
from services.registry.server import serve
from services.registry.settings import RegistrySettings


def main() -> None:
    """Build the settings, configure logging and serve until SIGTERM."""
    settings = RegistrySettings()
    configure_logging(settings.log_level, json=settings.log_json, service="registry")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
