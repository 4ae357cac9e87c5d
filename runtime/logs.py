"""One logging setup for both programs: plain text, or one JSON object a line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from aiormq.exceptions import AMQPConnectionError, ConnectionClosed
from opentelemetry import trace

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """One line of text; a line logged within a task's span ends with its ids."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        span_id = getattr(record, "span_id", None)
        return line if trace_id is None else f"{line} trace_id={trace_id} span_id={span_id}"


def _trace_ids(record: logging.LogRecord) -> bool:
    """Gives a line the ids of the span current where it was logged (a task's step):
    the line and the trace find each other."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        record.trace_id = format(context.trace_id, "032x")
        record.span_id = format(context.span_id, "016x")
    return True


def log_reconnects(connection: Any, log: logging.Logger) -> None:
    """Makes each loss and recovery of a robust aio-pika connection one log line (its
    failed attempts to connect again meanwhile are not losses)."""
    down = False

    def lost(_sender: object, exc: BaseException | None = None) -> None:
        nonlocal down
        if exc is not None and not connection.close_called and not down:  # not our close
            down = True
            log.warning("lost the connection to RabbitMQ (%s); reconnecting", exc)

    def back(_sender: object, *_: object) -> None:
        nonlocal down
        down = False
        log.warning("reconnected to RabbitMQ")

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(back)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_trace_ids)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    # aio-pika logs each channel callback of a dropped connection as an ERROR with a
    # traceback; the reconnect itself is what matters, and it is logged by us
    logging.getLogger("aio_pika.tools").setLevel(logging.CRITICAL)
    logging.getLogger("aiormq.connection").addFilter(_connection_losses)
    logging.getLogger("aio_pika.robust_connection").addFilter(_FailedAttempts())
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _connection_losses(record: logging.LogRecord) -> bool:
    """Drops aiormq's lines for a connection the broker closed or the network dropped
    (an ERROR, a WARNING with a traceback): each program logs that loss as one line of
    its own. A reader that failed otherwise (a malformed frame, say) still shows. Its
    ERROR for an attempt to connect that failed goes too: the caller tells of it."""
    if str(record.msg).startswith(
        (
            "Unexpected connection close from remote",
            "error when creating transport",
        )
    ):
        return False
    if not str(record.msg).startswith("Cancelling cause reader exited abnormally"):
        return True
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, ConnectionClosed):
        return False
    return not (
        isinstance(error, AMQPConnectionError)  # the socket ended or was reset
        and isinstance(error.__cause__, asyncio.IncompleteReadError | ConnectionError)
    )


class _FailedAttempts(logging.Filter):
    """aio-pika warns of each failed attempt to connect, every reconnect interval
    (1 s by default) for as long as the broker is away: the first line tells the
    operator what is wrong, then one a minute that it still is."""

    EVERY = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._last = -self.EVERY

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Connection attempt to"):
            return True
        if record.created - self._last < self.EVERY:
            return False
        self._last = record.created
        return True
