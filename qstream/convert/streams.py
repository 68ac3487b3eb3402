"""Overlapping reads, compute and writes with bounded memory (two small thread helpers).

Reading the next slice and writing the last one release the GIL (file I/O), so one
reader thread and one writer thread beside the compute keep the disk busy while
the cores quantize. Queues are bounded: at most `depth` slices wait on each side.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Yield from `items`, produced up to `depth` ahead in a background thread.

    An exception in the producer is re-raised here; closing the consumer stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((_DONE, exc))

    thread = threading.Thread(target=produce, name="qstream-read", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


class OrderedWriter:
    """Runs write calls in submission order on one thread, at most `depth` pending.

    `submit` blocks when the queue is full (bounding memory) and re-raises the first
    failure of an earlier write; `drain` waits for all and re-raises too.
    """

    def __init__(self, depth: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qstream-write")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def poll(self) -> None:
        """Re-raise the first failure among the calls finished so far, without waiting for any."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Cancel the calls not yet started, wait for the one running (errors ignored: the caller is already failing
        or has drained)."""
        for f in self._pending:
            f.cancel()
        for f in self._pending:
            if not f.cancelled():
                f.exception()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
