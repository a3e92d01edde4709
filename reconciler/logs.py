"""structlog setup: JSON or console lines on stderr, context from contextvars (run_id, customer, item,
meter, period), and every configured secret scrubbed from every value before it is rendered."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

from reconciler.redact import redact


class SecretScrubber:
    """A processor that replaces any occurrence of a known secret in any string value of an event."""

    def __init__(self, secrets: Iterable[str]):
        self._secrets = list(secrets)

    def scrub(self, text: str) -> str:
        return redact(text, self._secrets)

    def __call__(self, _logger: Any, _method: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.scrub(value)
            elif value is not None and not isinstance(value, int | float | bool):
                event[key] = self.scrub(str(value))
        return event


def configure_logging(level: str = "INFO", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        SecretScrubber(secrets),
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The SDKs' own loggers can print request lines; keep them quiet unless something is wrong.
    for name in ("stripe", "corehttp", "urllib3", "apscheduler"):
        logging.getLogger(name).setLevel(logging.WARNING)
