"""Run one inference worker: ``python -m services.inference``."""

from __future__ import annotations

import asyncio

from services.common.logging import configure_logging
from services.inference.server import serve
from services.inference.settings import InferenceSettings

if __name__ == "__main__":
    settings = InferenceSettings()
    configure_logging(settings.log_level, json=settings.log_json)
    asyncio.run(serve(settings))
