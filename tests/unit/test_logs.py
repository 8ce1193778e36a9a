"""gateway/logs.py: the writer thread's batches."""

from __future__ import annotations

import io
import threading
import time

import pytest

from gateway import logs
from gateway.logs import LineWriter


class CountingStream(io.BytesIO):
    """What the writer wrote, and how many writes it took."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


@pytest.fixture
def fast_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "FLUSH_INTERVAL_S", 0.01)


def wait_for(condition: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_lines_from_several_threads_arrive_whole_and_in_batches(fast_flush: None) -> None:
    stream = CountingStream()
    writer = LineWriter(stream)

    def append(prefix: bytes) -> None:
        for n in range(200):
            writer.append(b"%s %d\n" % (prefix, n))

    threads = [threading.Thread(target=append, args=(b"t%d" % i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: stream.getvalue().count(b"\n") == 800)
    writer.stop()
    lines = stream.getvalue().splitlines()
    for i in range(4):  # each thread's lines in its order
        assert [line for line in lines if line.startswith(b"t%d " % i)] == [
            b"t%d %d" % (i, n) for n in range(200)
        ]
    assert stream.writes < 800


def test_an_idle_writer_does_not_wake(fast_flush: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Polling every interval cost an idle process ~0.2% of a core."""
    flushes = 0
    flush = LineWriter._flush

    def counting_flush(self: LineWriter) -> None:
        nonlocal flushes
        flushes += 1
        flush(self)

    monkeypatch.setattr(LineWriter, "_flush", counting_flush)
    stream = CountingStream()
    writer = LineWriter(stream)
    time.sleep(0.2)  # 20 intervals
    assert flushes == 0
    writer.append(b"one\n")
    wait_for(lambda: stream.getvalue() == b"one\n")
    time.sleep(0.2)
    assert flushes == 1
    writer.stop()


def test_stop_writes_what_is_pending_and_ends_the_thread(fast_flush: None) -> None:
    stream = CountingStream()
    writer = LineWriter(stream)
    writer.append(b"a\n")
    writer.append(b"b\n")
    writer.stop()  # during the batch's wait, or before it began
    assert stream.getvalue() == b"a\nb\n"
    assert not writer._thread.is_alive()


def test_stop_when_idle_ends_the_thread() -> None:
    writer = LineWriter(CountingStream())
    stopper = threading.Thread(target=writer.stop)
    stopper.start()
    stopper.join(5.0)  # a writer that missed the stop would hang here
    assert not stopper.is_alive()
