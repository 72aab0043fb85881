"""Structured logs: one JSON object per line (or plain text for humans).

Fields passed with ``extra=`` become top-level keys, so an access-log line carries
``method``, ``path``, ``status``, ``duration_ms``, ``route``, ``upstream``,
``request_id`` and, with tracing on, ``trace_id``.

Two filters sit on the gateway's log handler:

* :class:`RedactingFilter`, always: logs end up in places with wider access than the
  gateway's secrets, so any field named like a credential (``authorization``,
  ``cookie``, ``set-cookie``, ``password``, ``token``, ``secret``, API keys), at any depth
  of a dict or header list, is replaced by ``***``, and credential-looking query
  parameters (``?token=``, ``?api_key=``, ``?password=``...) and URL passwords in logged
  paths and URLs are masked. It runs on every record that reaches the handler, whoever
  logged it (plugins included).
* :class:`TraceContextFilter`, only with tracing on: adds the current span's
  ``trace_id``/``span_id`` so log lines and traces can be joined.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from typing import Any

from settings.redaction import MASK, is_secret_key, redact_url_credentials

_STANDARD = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__.keys()
) | {
    "message",
    "asctime",
    "taskName",
}
#: Field names (lower case, ``-`` as ``_``) whose values are never logged, besides those
#: ``settings.redaction.is_secret_key`` already knows (password, token, secret...).
_SECRET_FIELDS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "cookies",
        "set_cookie",
        "x_api_key",
        "apikey",
        "api_key",
        "passwd",
        "pwd",
    }
)
_SECRET_WORDS = ("password", "secret", "token", "authorization", "cookie", "credential")
#: ``name=value`` in a query string where the name says "credential".
_SECRET_QUERY = re.compile(
    r"(?P<name>(?:^|(?<=[?&;]))[^&=;#?]*?(?:token|key|password|passwd|pwd|secret|signature"
    r"|auth|session|credential)[^&=;#]*=)[^&;#\s]*",
    re.IGNORECASE,
)


#: Verdicts by field name: names come from code (a small set), and every access-log line
#: asks about each of its fields.
_VERDICTS: dict[object, bool] = {}
_MAX_VERDICTS = 4096


def is_secret_field(name: object) -> bool:
    """Whether a log field (or header) called ``name`` may hold a credential."""
    verdict = _VERDICTS.get(name)
    if verdict is None:
        text = (name.decode("latin-1") if isinstance(name, bytes) else str(name)).lower()
        text = text.replace("-", "_")
        verdict = (
            text in _SECRET_FIELDS
            or is_secret_key(text)
            or any(word in text for word in _SECRET_WORDS)
        )
        if len(_VERDICTS) >= _MAX_VERDICTS:
            _VERDICTS.clear()
        _VERDICTS[name] = verdict
    return verdict


def redact_query(text: str) -> str:
    """Mask credential-looking query parameters and URL passwords in a path or URL."""
    if "?" in text:
        path, _, query = text.partition("?")
        text = path + "?" + _SECRET_QUERY.sub(lambda m: m.group("name") + MASK, query)
    if "@" in text:
        text = redact_url_credentials(text)
    return text


def redact_value(value: Any) -> Any:
    """A copy of ``value`` with secrets masked: dict keys and header pairs by name."""
    if isinstance(value, dict):
        return {
            k: MASK if v is not None and is_secret_field(k) else redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        if (
            len(value) == 2
            and isinstance(value[0], str | bytes)
            and not isinstance(value[1], list | tuple | dict)
            and is_secret_field(value[0])
        ):
            return type(value)((value[0], MASK))
        return type(value)(redact_value(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """Masks credentials in log records before any formatter sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        for key in fields.keys() - _STANDARD:
            value = fields[key]
            if value is None:
                continue
            if is_secret_field(key):
                fields[key] = MASK
            elif isinstance(value, str):
                if "?" in value or "@" in value:
                    fields[key] = redact_query(value)
            elif isinstance(value, dict | list | tuple):
                fields[key] = redact_value(value)
        try:
            message = record.getMessage() if record.args else record.msg
        except Exception:
            return True  # a broken format string: the handler reports it as usual
        if isinstance(message, str) and ("?" in message or "@" in message):
            redacted = redact_query_in_text(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


_URLISH = re.compile(r"\S*\?\S*|\S+://\S+@\S+")


def redact_query_in_text(text: str) -> str:
    """:func:`redact_query` applied to each path- or URL-looking word of a message."""
    return _URLISH.sub(lambda m: redact_query(m.group(0)), text)


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the current span (when there is one)."""

    def __init__(self) -> None:
        super().__init__()
        from opentelemetry import trace

        self._current_span = trace.get_current_span

    def filter(self, record: logging.LogRecord) -> bool:
        if "trace_id" not in record.__dict__:
            context = self._current_span().get_span_context()
            if context.is_valid:
                record.trace_id = format(context.trace_id, "032x")
                record.span_id = format(context.span_id, "016x")
        return True


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
    """A log record for humans, extras appended as key=value.

    Access-log lines read like a web server's: ``GET /path 200 1.2ms`` first, then the
    rest of the fields.
    """

    _ACCESS_FIRST = ("method", "path", "status", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        }
        if record.name == "octopus.access" and all(k in fields for k in self._ACCESS_FIRST):
            method, path, status, duration = (fields.pop(k) for k in self._ACCESS_FIRST)
            record.message = f"{method} {path} {status} {duration}ms"
            stamp = self.formatTime(record)
            base = f"{stamp} {record.levelname} {record.name}: {record.message}"
        else:
            base = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{base} {extras}" if extras else base


def configure_logging(settings: Any) -> None:
    """Route the gateway's and the ASGI server's logs through one formatter."""
    config = settings.observability.logging
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    if settings.observability.tracing.enabled:
        # Without the SDK the gateway refuses to start, and says why; nothing to add here.
        with contextlib.suppress(ImportError):
            handler.addFilter(TraceContextFilter())
    level = getattr(logging, str(config.level).upper(), logging.INFO)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "granian"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.error").addFilter(_drop_aborted_responses)
    logging.getLogger("octopus.access").disabled = not (
        config.access_log and config.access_log_sample > 0
    )


def _drop_aborted_responses(record: logging.LogRecord) -> bool:
    """An aborted upstream response is logged by the gateway already; no traceback twice."""
    if record.exc_info and record.exc_info[1] is not None:
        from gateway.proxy.http import ResponseAborted

        return not isinstance(record.exc_info[1], ResponseAborted)
    return True
