"""qstream.convert.streams: read-ahead and ordered write-behind with bounded queues, errors carried across threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from qstream.common import row_chunks
from qstream.convert.streams import OrderedWriter, prefetch


def test_prefetch_yields_everything_in_order_and_stays_bounded() -> None:
    produced: list[int] = []

    def items() -> Iterator[int]:
        for i in range(20):
            produced.append(i)
            yield i

    got = []
    for i in prefetch(items(), depth=2):
        got.append(i)
        deadline = time.monotonic() + 0.5
        while len(produced) < min(20, i + 4) and time.monotonic() < deadline:
            time.sleep(0.001)  # let the reader run ahead as far as it may
        assert len(produced) <= i + 1 + 2 + 1  # the consumed, `depth` queued, one waiting to be queued
    assert got == list(range(20))


def test_prefetch_reraises_the_producers_error() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    it = prefetch(items(), depth=2)
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def test_closing_the_consumer_stops_the_producer() -> None:
    def items() -> Iterator[int]:
        i = 0
        while True:  # endless: only the consumer's close ends it
            yield i
            i += 1

    it = prefetch(items(), depth=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # returns once the reader thread has ended
    assert "qstream-read" not in [t.name for t in threading.enumerate()]


def test_ordered_writer_keeps_order_and_reports_the_first_failure() -> None:
    done: list[int] = []
    with OrderedWriter(depth=2) as writes:
        for i in range(10):
            writes.submit(done.append, i)
        writes.drain()
    assert done == list(range(10))

    def fail(i: int) -> None:
        raise ValueError(f"write {i} failed")

    with pytest.raises(ValueError, match="write 0 failed"):
        with OrderedWriter(depth=1) as writes:
            writes.submit(fail, 0)
            writes.submit(done.append, 99)  # waits for the failed write, and raises its error
            writes.drain()


def test_row_chunks_cover_every_row_within_the_budget() -> None:
    assert list(row_chunks(10, 4, 12)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(row_chunks(3, 100, 10)) == [(0, 1), (1, 2), (2, 3)]  # at least one row, however wide
    assert list(row_chunks(5, 2, 100, start=2)) == [(2, 5)]
    assert list(row_chunks(0, 8, 16)) == []


def test_ordered_writer_poll_reraises_a_finished_failure_without_waiting() -> None:
    gate = threading.Event()

    def fail() -> None:
        raise OSError("copy failed")

    with OrderedWriter(depth=4) as writes:
        writes.submit(gate.wait)
        writes.poll()  # the first call is still running: nothing to report, and poll does not wait for it
        gate.set()
        writes.submit(fail)
        with pytest.raises(OSError, match="copy failed"):
            while True:
                writes.poll()
