"""Structured logging: one JSON object per line on stdout, for our code and the libraries'.

Credentials never reach a log line: tokens in query strings, bearer headers and passwords in
URLs are masked by a processor that every record passes through.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any
from urllib.parse import unquote_plus

import orjson
import structlog

# Query parameters whose value is a credential, compared once percent-decoded and lowercased.
SECRET_PARAMETERS = frozenset({"token", "access_token", "jwt", "password", "secret"})
# One `key=value` of a query string (or of a form body): what a parser would split at & and ;.
_PARAMETER = re.compile(r"(?P<lead>^|[?&;\s])(?P<key>[^=&;?#\s\"']+)=(?P<value>[^&;#\s\"']*)")
_SECRETS = (
    # Authorization: Bearer xxx
    (re.compile(r"(bearer\s+)[A-Za-z0-9._~+/=%-]+", re.IGNORECASE), r"\1***"),
    # scheme://user:password@host (amqp, rtsp, postgresql, ...)
    (re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+(@)", re.IGNORECASE), r"\1***\2"),
    # a bare JWT anywhere, its dots written out or percent-encoded
    (
        re.compile(
            r"eyJ[A-Za-z0-9_-]{8,}(?:\.|%2e)[A-Za-z0-9_-]{8,}(?:\.|%2e)[A-Za-z0-9_-]{8,}", re.I
        ),
        "***",
    ),
)


def _mask_parameter(match: re.Match[str]) -> str:
    # The key as a query parser reads it: `%74oken` and `TOKEN` are both `token`.
    if unquote_plus(match["key"]).strip().lower() in SECRET_PARAMETERS:
        return f"{match['lead']}{match['key']}=***"
    return match[0]


def mask_secrets(text: str) -> str:
    """`text` with credentials replaced by ***: query parameters named as secrets (however their
    names are encoded), bearer tokens, passwords in URLs, and anything shaped like a JWT."""
    if "=" in text:
        text = _PARAMETER.sub(_mask_parameter, text)
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _mask_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = mask_secrets(value)
    return event


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(*, service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route structlog and the standard library (uvicorn, FastStream, aio-pika) to one sink."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _mask_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # Filter first: an event below the level costs no other processor.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                lambda _, __, event: {**event, "service": service},
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log prints query strings (where tokens may be); the gateway logs its own.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error", "faststream", "aio_pika", "aiormq"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
    # Chatty at INFO: aiormq and aio-pika on every reconnect, httpx on every request (a logger
    # uploading every 300 ms wrote ~200 KB of "HTTP Request: POST ..." lines each 5 minutes).
    for chatty in ("aiormq", "aio_pika", "httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(root.level, logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
