"""Loading folder listings ahead of the kernel: when a folder is opened, its subfolders'
listings are read and decoded in one background thread, so that a walk (find, cp -a, rsync)
finds the next folders in memory instead of waiting for a store read in its own request.

Bounded: the thread works only while fewer than `limit` prefetched entries wait unopened, and
what it loads goes into the model's own bounded listing cache.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class Prefetcher:
    """Calls `load(inode)` in a daemon thread for the subfolders of the folder opened last;
    `load` returns how many entries it decoded (0 if the listing was in memory already)."""

    def __init__(self, load: Callable[[int], int], limit: int) -> None:
        self._load = load
        self._limit = limit
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._ahead: dict[int, int] = {}      # loaded, not opened yet: inode -> entries
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def opened(self, inode: int, subfolders: list[int]) -> None:
        """A folder was opened; its subfolders are what to load next (a folder without
        subfolders leaves the queue as it is: its siblings come next)."""
        with self._cond:
            self.dropped(inode)
            if subfolders:
                self._queue = deque(subfolders)
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._run, name="humiofs-prefetch",
                                                    daemon=True)
                    self._thread.start()
                self._cond.notify()

    def dropped(self, inode: int) -> None:
        """A listing was opened or evicted: it no longer counts as waiting."""
        with self._cond:
            n = self._ahead.pop(inode, 0)
            if n:
                self._waiting -= n
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._queue or self._waiting >= self._limit):
                    self._cond.wait()
                if self._closed:
                    return
                inode = self._queue.popleft()
            try:
                n = self._load(inode)
            except Exception as exc:   # the request that needs it will say what is wrong
                log.debug("prefetch of inode %d: %s", inode, exc)
                continue
            if n:
                with self._cond:
                    self._ahead[inode] = self._ahead.get(inode, 0) + n
                    self._waiting += n
