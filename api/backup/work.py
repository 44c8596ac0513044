"""Running one function over many objects on a few threads, stopping at the first failure."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

T = TypeVar("T")
R = TypeVar("R")


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
