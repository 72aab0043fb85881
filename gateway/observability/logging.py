"""Structured logs: one JSON object per line (or plain text for humans).

Fields passed with ``extra=`` become top-level keys, so an access-log line carries
``method``, ``path``, ``status``, ``duration_ms``, ``upstream`` and ``request_id``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__.keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A log record for humans, extras appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")
        )
        return f"{base} {extras}" if extras else base


def configure_logging(settings: Any) -> None:
    """Route the gateway's and the ASGI server's logs through one formatter."""
    config = settings.observability.logging
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = getattr(logging, str(config.level).upper(), logging.INFO)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "granian"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.error").addFilter(_drop_aborted_responses)
    logging.getLogger("octopus.access").disabled = not config.access_log


def _drop_aborted_responses(record: logging.LogRecord) -> bool:
    """An aborted upstream response is logged by the gateway already; no traceback twice."""
    if record.exc_info and record.exc_info[1] is not None:
        from gateway.proxy.http import ResponseAborted

        return not isinstance(record.exc_info[1], ResponseAborted)
    return True
