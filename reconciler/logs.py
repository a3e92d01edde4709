"""structlog setup: console lines for a person at a terminal, JSON lines for whatever reads a pipe or a file (or
either, as `logging.format` says), on stderr; context from contextvars (run_id, customer, item, meter, period), and
every configured secret scrubbed from every line before it is written."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

from reconciler.output import json_value
from reconciler.redact import redact


def chosen_format(fmt: str, terminal: bool) -> str:
    """`auto` is `console` when the log stream is a terminal, `json` otherwise; `console` and `json` are themselves."""
    if fmt == "auto":
        return "console" if terminal else "json"
    return fmt


class Scrubbed:
    """A renderer whose lines carry no configured secret, wherever in the line it sits (a value, a list, a key, a
    traceback), and also in the escaped form JSON gives it."""

    def __init__(self, renderer: Processor, secrets: Iterable[str]):
        self._renderer = renderer
        self._forms = [form for secret in secrets if secret for form in (secret, json.dumps(secret)[1:-1])]

    def __call__(self, logger: Any, method: str, event: EventDict) -> str:
        return redact(str(self._renderer(logger, method, event)), self._forms)


def configure_logging(level: str = "INFO", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    renderer: Processor = (
        structlog.processors.JSONRenderer(default=json_value)
        if chosen_format(fmt, sys.stderr.isatty()) == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Scrubbed(renderer, secrets),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The SDKs' own loggers can print request lines; keep them quiet unless something is wrong.
    for name in ("stripe", "corehttp", "urllib3", "apscheduler"):
        logging.getLogger(name).setLevel(logging.WARNING)
