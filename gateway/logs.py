"""Structured logs: every line is one JSON object, written off the event loop.

Lines are formatted where they happen and written to stderr by one writer thread in
batches (at most one every ``FLUSH_INTERVAL_S``), so a slow stderr never blocks a request and a
line costs no thread hand-off: with one queued record per request (a QueueHandler),
the request line cost ~250 CPU-µs per request here, as much as the rest of the hot
path (bench/README.md). The per-request line (logger ``meshgate.request``) is
written by ``REQUEST_LOG`` without a LogRecord; it never includes prompt text or keys.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import Any, BinaryIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

REQUEST_LOGGER = "meshgate.request"
FLUSH_INTERVAL_S = 0.05


# (second, its "%Y-%m-%dT%H:%M:%S" text): formatting a time costs a few µs, which every
# request line paid; one formatting per second is enough. Replaced as a whole, so any
# thread may read it.
_last_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    global _last_second
    second, text = _last_second
    if int(created) != second:
        second = int(created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``; a traceback goes to ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
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


class LineWriter:
    """Lines appended from any thread, written to ``stream`` in one write per batch.

    The thread sleeps until a line is appended, then waits ``FLUSH_INTERVAL_S`` for the
    batch to gather and writes it: an idle gateway's writer never wakes (polling every
    interval cost ~0.2% of a core per process here, measured by thread CPU time)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lines: deque[bytes] = deque()  # append and popleft are thread-safe
        self._pending = threading.Event()  # set: lines wait, or the writer should stop
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def append(self, line: bytes) -> None:
        self._lines.append(line)
        if not self._pending.is_set():  # once per batch: set() takes a lock
            self._pending.set()

    def _run(self) -> None:
        # Cleared only before the stop check: a stop during the sleep is still seen.
        while not self._stopped:
            self._pending.wait()
            time.sleep(FLUSH_INTERVAL_S)
            # Cleared before the batch is taken: a line appended after this sets it
            # again, one appended before is in the batch.
            self._pending.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        lines = self._lines
        batch = [lines.popleft() for _ in range(len(lines))]
        if batch:
            self._stream.write(b"".join(batch))
            self._stream.flush()

    def stop(self) -> None:
        """Write what is still pending and end the thread."""
        self._stopped = True
        self._pending.set()
        self._thread.join()


class _LineHandler(logging.Handler):
    """Every other log record, formatted on the thread that logs it (they are rare)."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        self._writer.append(self.format(record).encode() + b"\n")


# The request line's levels (what logging.getLevelName says, without its lookups).
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO"}


class RequestLog:
    """The per-request line: one orjson call on the loop, no LogRecord."""

    def __init__(self) -> None:
        self._logger = logging.getLogger(REQUEST_LOGGER)
        self.writer: LineWriter | None = None  # set by setup_logging

    def write(self, level: int, fields: dict[str, Any]) -> None:
        """One request's line at ``level``, DEBUG or INFO."""
        if not self._logger.isEnabledFor(level):
            return
        if self.writer is None:  # logging was not set up (in-process use): the usual way
            self._logger.log(level, "request", extra={"fields": fields})
            return
        line = {
            "ts": _timestamp(time.time()),
            "level": _LEVEL_NAMES[level],
            "logger": REQUEST_LOGGER,
            "msg": "request",
            **fields,
        }
        self.writer.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))


REQUEST_LOG = RequestLog()


def setup_logging(level: str) -> LineWriter:
    """Route every log record as a JSON line to stderr through the writer thread; the
    caller stops the returned writer at exit (which writes what is pending)."""
    writer = LineWriter(sys.stderr.buffer)
    root = logging.getLogger()
    root.handlers[:] = [_LineHandler(writer)]
    logging.getLogger("aiohttp.server").addFilter(_client_faults_as_warnings)
    root.setLevel(level)
    REQUEST_LOG.writer = writer
    return writer


def _client_faults_as_warnings(record: logging.LogRecord) -> bool:
    """aiohttp logs a malformed request (an undecodable Content-Encoding, say, found
    while parsing or while draining an unread body) with a traceback, though it is the
    client's fault and was answered with a 400: make it one warning line."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, RequestPayloadError | HttpProcessingError):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args, record.exc_info = f"malformed request: {error!r}", (), None
    return True
