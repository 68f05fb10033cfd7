"""Ranged reads of packs on object storage (S3Backend.read_into, docs/S3.md): a request costs
its latency (2-5 ms on a LAN) more than its bytes, so a reader going forward through a pack in
small pieces (a restore of many small files, whose blobs lie one after the other) is served
from windows of WINDOW bytes fetched in one request each. Reads of WINDOW_BELOW bytes or more
(the mount's cache asks for 1 MiB blocks) and reads that jump around fetch what they ask for."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

WINDOW = 4 << 20        # bytes fetched for a small read that follows the last one forward
WINDOW_BELOW = 1 << 20  # reads this large or larger are never widened
WINDOWS = 4             # windows kept (memory: WINDOWS * WINDOW per backend)
FORWARD_GAP = 1 << 20   # a read at most this far past the last one's end counts as forward
_TRACKED = 256          # packs whose last read end is remembered

Fetch = Callable[[str, int, int], memoryview]     # (name, offset, length) -> bytes, maybe short


class ReadWindows:
    """The recent windows of one backend's packs. Thread-safe; fetches run unlocked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, int], memoryview] = OrderedDict()
        self._ends: OrderedDict[str, int] = OrderedDict()

    def read(self, name: str, offset: int, length: int, fetch: Fetch) -> memoryview:
        """`length` bytes at `offset` of the pack `name` (fewer at its end)."""
        with self._lock:
            for (wname, start), data in reversed(self._windows.items()):
                if wname == name and start <= offset and offset + length <= start + len(data):
                    self._windows.move_to_end((wname, start))
                    self._note(name, offset + length)
                    return data[offset - start:offset - start + length]
            last = self._ends.get(name)
            self._note(name, offset + length)
        forward = last is not None and last <= offset <= last + FORWARD_GAP
        if length >= WINDOW_BELOW or not forward:
            return fetch(name, offset, length)
        data = fetch(name, offset, WINDOW)
        with self._lock:
            self._windows[(name, offset)] = data
            while len(self._windows) > WINDOWS:
                self._windows.popitem(last=False)
        return data[:length]

    def _note(self, name: str, end: int) -> None:
        self._ends[name] = end
        self._ends.move_to_end(name)
        while len(self._ends) > _TRACKED:
            self._ends.popitem(last=False)

    def forget(self, name: str) -> None:
        """Drops what is kept of `name` (deleted, or to be read afresh)."""
        with self._lock:
            for key in [k for k in self._windows if k[0] == name]:
                del self._windows[key]
            self._ends.pop(name, None)
