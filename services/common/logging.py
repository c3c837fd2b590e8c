"""structlog configuration: JSON lines to stdout, context variables first."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict

from services.common.tracing import add_trace_ids

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", *, json: bool = True, service: str | None = None) -> None:
    """Configure structlog for the process.

    Args:
        level: Lowest level logged (debug, info, warning, error).
        json: One JSON object a line if True, coloured console lines otherwise.
        service: If given, every line carries ``service=<name>`` (one terminal, many services).
    """

    def add_service(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
        if service is not None:
            event_dict.setdefault("service", service)
        return event_dict

    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,  # trace_id/span_id of the current span, when tracing is on
            add_service,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
