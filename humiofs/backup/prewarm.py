"""Work a one-shot backup does while the store's key is being derived: its modules imported
and the data directory's metadata read into the kernel's caches, in a background thread.

Opening a store spends most of its time in Argon2id (about 0.2-0.4 s, one core, the GIL
released): a no-change run then stats every file of the node and imports the writer's
modules, both slow when the page and inode caches are cold (as after a reboot, or on a busy
host). Doing them meanwhile shortens the run by that much and changes nothing it does: the
thread only reads metadata (os.scandir and lstat, never a file's bytes, never following a
symlink), ignores every error, and stops as soon as the store is open; the walk itself
runs afterwards exactly as before, just against warm caches.
"""
from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from types import TracebackType

# The modules a backup run imports after the store is open.
MODULES = ("humiofs.backup.writer",)
# A folder depth the warm-up does not go past: a very deep node is walked by the run only.
MAX_DEPTH = 64


class Prewarm:
    """A context manager: while it is entered, a daemon thread imports MODULES, then stats
    the entries of `source` folder by folder (depth first, at most MAX_DEPTH deep), until
    the block ends or it has seen everything. Leaving the block stops it and waits for it
    (it checks for that after every entry). Raises nothing."""

    def __init__(self, source: Path | str) -> None:
        self.source = os.fspath(source)
        self.stopped = threading.Event()
        self.finished = threading.Event()     # set when the thread has nothing left to do
        self.entries = 0        # entries stat'ed, for tests
        self._thread = threading.Thread(target=self._run, name="humiofs-prewarm", daemon=True)

    def __enter__(self) -> Prewarm:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stopped.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            for name in MODULES:
                if self.stopped.is_set():
                    return
                importlib.import_module(name)
            self._walk(self.source, 0)
        except Exception:   # noqa: BLE001 - only a head start: the run does it all again
            pass
        finally:
            self.finished.set()

    def _walk(self, folder: str, depth: int) -> None:
        try:
            with os.scandir(folder) as it:
                subdirs = []
                for entry in it:
                    if self.stopped.is_set():
                        return
                    try:
                        entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    self.entries += 1
                    if entry.is_dir(follow_symlinks=False) and depth < MAX_DEPTH:
                        subdirs.append(entry.path)
        except OSError:
            return
        for path in subdirs:
            if self.stopped.is_set():
                return
            self._walk(path, depth + 1)
