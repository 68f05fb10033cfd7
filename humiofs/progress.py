"""A one-line progress display for terminals: files, bytes, rate and ETA."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Redraws one status line at most a few times a second; silent unless on a terminal."""

    def __init__(self, total_bytes: int = 0, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_bytes = total_bytes
        self.files = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.bytes / elapsed
        line = f"{self.files} files, {human_bytes(self.bytes)}"
        if self.total_bytes:
            pct = min(100.0, 100.0 * self.bytes / self.total_bytes)
            width = 20
            fill = int(width * pct / 100)
            line = f"[{'#' * fill}{'.' * (width - fill)}] {pct:5.1f}% " + line
            # An ETA from the first second or first percent is noise; leave it out until then.
            if rate > 0 and self.bytes < self.total_bytes and (elapsed > 1 or pct > 1):
                line += f", ETA {human_seconds((self.total_bytes - self.bytes) / rate)}"
        line += f", {human_bytes(rate)}/s"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
