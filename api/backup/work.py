"""Running one function over many objects on a few threads, stopping at the first failure."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from api.backup.archive import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 64  # more threads than that only queue for the GIL and for the disk


def check_workers(workers: int) -> int:
    """``--workers`` as given: 0 or a negative count is a typo, not a request for one thread."""
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}")
    return workers


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``fn`` over ``items``, results in order. The first failure (or Ctrl-C) cancels what has
    not started and waits for what has, so no thread is still writing when this returns."""
    pool = ThreadPoolExecutor(max(1, workers))
    futures: list[Future[R]] = []
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [future.result() for future in futures]
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
