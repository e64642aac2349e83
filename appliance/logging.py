"""Structured logging (console or JSON) with structlog; the session id is bound where it is known."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# The HTTP/2 and gRPC libraries log every header they encode or decode at DEBUG, `authorization`
# included: they stay at INFO even when the appliance logs at DEBUG.
# The same for the HTTP client of `--auth introspection` (its requests carry the client secret and a
# token) and the OAuth library that drives it.
PROTOCOL_LOGGERS = (
    *("hpack", "h2", "grpclib.protocol", "grpclib.client", "grpclib.server"),
    *("httpx2", "httpcore2", "authlib"),
)

# What a credential looks like on its way through a log line: our bearer tokens (sst_...), anything
# after "Bearer", and JWTs (three base64url parts, the first two starting with eyJ, i.e. '{"').
_CREDENTIAL = re.compile(
    r"sst_[A-Za-z0-9_-]{8,}"
    r"|(?i:bearer)\s+[^\s'\"]+"
    r"|eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced by [REDACTED]."""
    return _CREDENTIAL.sub(REDACTED, text)


def redact_credentials(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: the last line of defence, should a credential reach any log field."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
        elif isinstance(value, bytes):
            event_dict[key] = redact(value.decode("utf-8", "replace"))
    return event_dict


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Routes structlog and the stdlib loggers (grpclib, quic_relay) to stderr in one format."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_credentials,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in PROTOCOL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    # grpclib logs every handler exception at ERROR with a traceback; ours are mapped already.
    logging.getLogger("grpclib.server").setLevel(logging.CRITICAL)
