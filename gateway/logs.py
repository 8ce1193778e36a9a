"""Structured logs: every line is one JSON object, written off the event loop.

Records are handed to a queue and written by a listener thread, so a slow stderr
never blocks a request. The per-request line (logger ``meshgate.request``) carries
its fields in ``extra={"fields": ...}``; they never include prompt text or keys.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

REQUEST_LOGGER = "meshgate.request"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``; a traceback goes to ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str) -> logging.handlers.QueueListener:
    """Route every log record as a JSON line to stderr through a writer thread; the
    caller stops the returned listener at exit (which flushes what is queued)."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter())
    listener = logging.handlers.QueueListener(records, writer)
    root = logging.getLogger()
    root.handlers[:] = [_RecordQueue(records)]
    logging.getLogger("aiohttp.server").addFilter(_client_faults_as_warnings)
    root.setLevel(level)
    listener.start()
    return listener


class _RecordQueue(logging.handlers.QueueHandler):
    # The stock prepare() flattens the record into text on the loop's thread; the JSON
    # formatter in the writer thread needs its fields and exc_info as they are.
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def _client_faults_as_warnings(record: logging.LogRecord) -> bool:
    """aiohttp logs a malformed request (an undecodable Content-Encoding, say, found
    while parsing or while draining an unread body) with a traceback, though it is the
    client's fault and was answered with a 400: make it one warning line."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, RequestPayloadError | HttpProcessingError):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args, record.exc_info = f"malformed request: {error!r}", (), None
    return True
