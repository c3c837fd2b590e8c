"""Run one inference worker: ``python -m services.inference``."""

from __future__ import annotations

import asyncio

from services.common.logging import configure_logging
from services.inference.server import serve
from services.inference.settings import InferenceSettings


def main() -> None:
    """Build the settings, configure logging and serve until SIGTERM."""
    settings = InferenceSettings()
    configure_logging(settings.log_level, json=settings.log_json, service="inference")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
