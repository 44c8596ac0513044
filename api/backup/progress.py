"""A one-line progress bar on stderr, with rate and ETA, drawn only when stderr is a terminal."""

from __future__ import annotations

import threading
import time
from typing import TextIO

_WIDTH = 24
_REDRAW_S = 0.2


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover - the loop returns


def clock_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render(
    label: str, *, done: int, total: int, objects: int, total_objects: int, elapsed: float
) -> str:
    """``label [#####.....]  42%  3/10 files  1.2 GiB/2.9 GiB  310 MB/s  ETA 0:00:05``."""
    share = 1.0 if total == 0 else min(1.0, done / total)
    filled = int(share * _WIDTH)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    return (
        f"{label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {share:4.0%}  "
        f"{objects}/{total_objects} files  {human_bytes(done)}/{human_bytes(total)}  "
        f"{rate / 1e6:.0f} MB/s  ETA {'?' if eta is None else clock_text(eta)}"
    )


class Progress:
    """Thread-safe counters; drawn at most five times a second, and only on a terminal."""

    def __init__(
        self, label: str, total_bytes: int, total_objects: int, stream: TextIO | None
    ) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.total_objects = total_objects
        self.done_bytes = 0
        self.done_objects = 0
        self._stream = stream if stream is not None and stream.isatty() else None
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._drawn = 0.0

    def advance(self, nbytes: int, objects: int = 0) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_objects += objects
            now = time.monotonic()
            if self._stream is not None and now - self._drawn >= _REDRAW_S:
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        assert self._stream is not None
        line = render(
            self.label,
            done=self.done_bytes,
            total=self.total_bytes,
            objects=self.done_objects,
            total_objects=self.total_objects,
            elapsed=now - self._start,
        )
        self._stream.write("\r" + line + "\x1b[K")
        self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._draw(time.monotonic())
                self._stream.write("\n")
                self._stream.flush()
                self._stream = None
