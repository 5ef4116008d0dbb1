"""A one-line progress display for long work (imports): rows, rows/s, bad rows so far, time left.

Writes to a terminal only (or when forced); quiet otherwise. No dependency: one carriage-returned line on
standard error, redrawn at most five times a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``update(done, bad)`` as work advances; ``close()`` at the end. ``total`` may be None (unknown)."""

    def __init__(self, total: int | None, *, label: str = "import", enabled: bool | None = None,
                 stream: TextIO | None = None, every: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(self.stream.isatty()) if enabled is None else enabled
        self.total = total
        self.label = label
        self.every = every
        self.start = time.perf_counter()
        self._last = 0.0
        self._width = 0
        self.done = 0
        self.bad = 0

    def line(self) -> str:
        """The text of the display now."""
        took = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / took
        parts = [self.label]
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            parts.append(f"{self.done:,}/{self.total:,} rows ({pct:.0f}%)")
        else:
            parts.append(f"{self.done:,} rows")
        parts.append(f"{rate:,.0f} rows/s")
        parts.append(f"bad {self.bad:,}")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"left {_clock((self.total - self.done) / rate)}")
        else:
            parts.append(f"took {_clock(took)}")
        return "  ".join(parts)

    def update(self, done: int, bad: int, *, force: bool = False) -> None:
        self.done, self.bad = done, bad
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.every:
            return
        self._last = now
        text = self.line()
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, self.bad, force=True)
            self.stream.write("\n")
            self.stream.flush()
