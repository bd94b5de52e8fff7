"""An ordered map over worker processes with a bounded number of items in flight, so memory stays flat."""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import cv2

_function: Callable[[Any], Any] | None = None


def _start(make: Callable[[], Callable[[Any], Any]]) -> None:
    """Pool initializer: the processes are the parallelism, so OpenCV gets one thread in each."""
    global _function
    cv2.setNumThreads(1)
    _function = make()


def _call(item: Any) -> Any:
    return _function(item)


def ordered_map(make: Callable[[], Callable[[Any], Any]], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`make()(item)` for each item, yielded in the items' order.

    `workers` ≤ 1 runs in this process; more start that many processes (forked where the system allows, so
    they need not import everything again), each calling `make()` once, with at most 4 items per worker queued.
    """
    if workers <= 1:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            yield from map(make(), items)
        finally:
            cv2.setNumThreads(threads)
        return
    context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=(make,))
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(_call, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)
