"""A one-line progress display for terminals: files, bytes, rate and ETA."""
from __future__ import annotations

import os
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
    """Redraws one status line at most a few times a second; silent unless on a terminal.

    The line always fits the terminal's width, read at each redraw (a line one column too
    long wraps, and every redraw then stacks a new line): the bar is dropped first, then the
    rate, the ETA, the percentage, the file count, the bytes; a field is dropped whole, never
    cut, and a terminal too narrow for any gets nothing. On a terminal without escape sequences (TERM=dumb or
    unset, such as Emacs' shell) the line is redrawn with a carriage return and blanks.
    """

    def __init__(self, total_bytes: int = 0, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_bytes = total_bytes
        self.files = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = 0         # the length of the line on screen
        term = os.environ.get("TERM", "")
        self._escapes = bool(term) and term != "dumb"

    def update(self, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(now)

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 80

    def line(self, width: int, now: float | None = None) -> str:
        """The status line, at most width - 1 columns (the last column would wrap on some
        terminals)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-6)
        rate = self.bytes / elapsed
        counts = f"{self.files} files, {human_bytes(self.bytes)}"
        speed = f", {human_bytes(rate)}/s"
        pct = eta = ""
        fraction = 0.0
        if self.total_bytes:
            fraction = min(1.0, self.bytes / self.total_bytes)
            pct = f"{100 * fraction:5.1f}% "
            # An ETA from the first second or first percent is noise; leave it out until then.
            if rate > 0 and self.bytes < self.total_bytes and (elapsed > 1 or fraction > 0.01):
                eta = f", ETA {human_seconds((self.total_bytes - self.bytes) / rate)}"
        room = width - 1
        # Narrower and narrower; never a number cut from its unit: at the very least nothing.
        for text in (pct + counts + eta + speed, pct + counts + eta, pct + counts, counts,
                     human_bytes(self.bytes), pct.strip(), ""):
            if len(text) <= room:
                break
        bar = min(20, room - len(text) - 3)
        if pct and bar >= 5:
            fill = int(bar * fraction)
            text = f"[{'#' * fill}{'.' * (bar - fill)}] " + text
        return text

    def _draw(self, now: float) -> None:
        width = self._width()
        line = self.line(width, now)
        if not line and not self._drawn:
            return      # too narrow for anything: nothing to draw, nothing to clear
        if self._escapes:
            self.stream.write("\r\x1b[K" + line)
        else:   # blanks over what is left of the last line
            self.stream.write("\r" + line.ljust(min(self._drawn, width - 1)))
        self.stream.flush()
        self._drawn = len(line)

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K" if self._escapes else "\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0
