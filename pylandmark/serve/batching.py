"""Dynamic batching: items submitted from many threads or coroutines run through one function in
batches, on one worker thread.

The worker takes the first waiting item, then gathers more until ``max_batch`` items are in hand
or ``max_wait`` seconds have passed since the first (0: only what is already waiting, so an idle
service adds no latency and a busy one batches whatever queued up during the previous run).
Items are grouped by ``key`` (for images: their shape, since a batch must be one tensor and
padding would change the descriptors) and each group is one call of ``fn``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

__all__ = ["Batcher", "Overloaded"]

log = logging.getLogger(__name__)

_STOP = object()


class Overloaded(RuntimeError):
    """More items are waiting than the batcher accepts; the caller should retry later."""


class Batcher:
    """Runs ``fn(items) -> results`` (one result per item, same order) in batches on a thread.

    Args:
        fn: called with a list of 1..max_batch items sharing one key; returns a sequence of as
            many results. An exception fails every item of that call (and only those).
        max_batch: most items per call.
        max_wait: seconds to wait for more items after the first of a batch arrives.
        key: groups items that may share a call (default: all may).
        max_queue: most items waiting; ``submit`` raises :class:`Overloaded` beyond it.
        name: the worker thread's name.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 16, max_wait: float = 0.0,
                 key: Callable[[Any], Hashable] | None = None, max_queue: int = 1024, name: str = "batcher"):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, float(max_wait)
        self.key = key or (lambda item: None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self.sizes: Counter = Counter()  # call size -> number of calls
        self.items = 0
        self.busy_seconds = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        """Queues one item; the future resolves to its result (or raises fn's exception)."""
        fut: Future = Future()
        if self._closed:
            raise RuntimeError("the batcher is closed")
        try:
            self._queue.put_nowait((item, fut))
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} images are already waiting for the network; "
                             "retry later or start the service with more --workers") from None
        return fut

    def stats(self) -> dict:
        """Calls by size, items processed and seconds spent in ``fn`` so far."""
        with self._lock:
            calls = sum(self.sizes.values())
            return {"calls": calls, "items": self.items, "mean_batch": self.items / calls if calls else 0.0,
                    "sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                    "busy_seconds": round(self.busy_seconds, 3), "waiting": self._queue.qsize()}

    def close(self, timeout: float | None = 10.0) -> None:
        """Stops after the items already queued; later submits raise."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)  # blocks only while the queue is full, i.e. while work drains
        self._thread.join(timeout)

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - time.monotonic()
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._gather(first)
            groups: dict[Hashable, list[tuple]] = {}
            for entry in batch:
                try:
                    k = self.key(entry[0])
                except Exception as err:  # noqa: BLE001 - a bad item fails alone
                    entry[1].set_exception(err)
                    continue
                groups.setdefault(k, []).append(entry)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[tuple]) -> None:
        live = [(item, fut) for item, fut in group if fut.set_running_or_notify_cancel()]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            results = self.fn([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except Exception as err:  # noqa: BLE001 - delivered to the waiting callers
            log.debug("batch of %d failed: %s", len(live), err)
            for _, fut in live:
                fut.set_exception(err)
        except BaseException as err:  # never leave callers waiting, then let it end the thread
            for _, fut in live:
                fut.set_exception(err)
            raise
        else:
            for (_, fut), res in zip(live, results):
                fut.set_result(res)
        finally:
            with self._lock:
                self.sizes[len(live)] += 1
                self.items += len(live)
                self.busy_seconds += time.perf_counter() - t0
