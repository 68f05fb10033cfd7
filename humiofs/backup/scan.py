"""Reading a data directory: excludes, data extents via SEEK_DATA/SEEK_HOLE, bounded-memory
reads of a file's data, and the stat signature used for change detection.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import queue
import resource
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

from humiofs.errors import SourceChanged

# 256 KiB keeps the read buffer and its ciphertext in the CPU cache between the read and the
# write; 1 MiB buffers measured slower here.
READ_BUFFER = 256 << 10
DEFAULT_EXCLUDES = ("/jvm-tmp",)


# Folder depth a walk handles: it recurses a few frames and holds one open fd per level.
MAX_DEPTH = 20_000


@contextlib.contextmanager
def deep_walk() -> Iterator[None]:
    """Lets a recursive walk that opens each folder relative to its parent go MAX_DEPTH
    folders deep: raises the recursion limit for the block, and the soft limit of open files
    to the hard one. A node can hold paths far longer than PATH_MAX (4096 bytes), which only
    such a walk reaches. (CPython 3.11 keeps Python-to-Python calls off the C stack.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 4 * MAX_DEPTH))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@dataclass(frozen=True, slots=True)
class Signature:
    """What must be unchanged for a file to be taken as unchanged without reading it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class Excluder:
    """Decides which entries a backup skips.

    A pattern starting with `/` is anchored at the data directory and matched component by
    component against the relative path (`/jvm-tmp`, `/dataspace_*/tmp`); any other pattern is
    matched against the entry's name at every depth (`*.tmp`). Components use shell wildcards,
    which never match across a `/`.
    """

    def __init__(self, patterns: tuple[str, ...] | list[str]) -> None:
        self.anchored: dict[int, list[list[bytes]]] = {}
        self.names: list[bytes] = []
        for p in patterns:
            if p.startswith("/"):
                parts = [os.fsencode(c) for c in p.strip("/").split("/") if c]
                if parts:
                    self.anchored.setdefault(len(parts), []).append(parts)
            elif p:
                self.names.append(os.fsencode(p))

    def applies_at(self, depth: int) -> bool:
        """False if no pattern can exclude an entry at `depth` (1: the source's own entries),
        so the caller need not ask `excluded` for each."""
        return bool(self.names) or depth in self.anchored

    def excluded(self, rel: bytes, name: bytes) -> bool:
        for pattern in self.names:
            if fnmatch.fnmatchcase(name, pattern):
                return True
        depth = rel.count(b"/") + 1
        candidates = self.anchored.get(depth)
        if candidates:
            parts = rel.split(b"/")
            for pat in candidates:
                if all(fnmatch.fnmatchcase(c, p) for c, p in zip(parts, pat)):
                    return True
        return False


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data regions of an open file as (offset, length), holes left out.

    Falls back to one extent over the whole file where the filesystem cannot report holes.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)] if size else []
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        if extents and extents[-1][0] + extents[-1][1] == start:
            extents[-1] = (extents[-1][0], end - extents[-1][0])
        else:
            extents.append((start, end - start))
        pos = end
    return extents


def iter_extent_data(fd: int, extents: list[tuple[int, int]],
                     bufsize: int = READ_BUFFER) -> Iterator[memoryview]:
    """Yields the bytes of the extents in order, reusing one buffer.

    Each view is valid only until the next one is requested. Raises SourceChanged if the file
    ends early (it was truncated while being read).
    """
    buf = bytearray(bufsize)
    view = memoryview(buf)
    for offset, length in extents:
        done = 0
        while done < length:
            want = min(bufsize, length - done)
            n = os.preadv(fd, [view[:want]], offset + done)
            if n <= 0:
                raise SourceChanged("file shrank while it was read")
            yield view[:n]
            done += n


class ReadAhead:
    """Reads the extents of a file on a thread of its own, up to `depth` buffers ahead, so the
    disk reads overlap the encryption and the writes of the pack.

    Use as a context manager: leaving it stops and joins the thread, so the caller may close
    the fd afterwards. Iterating yields views that are valid until the next one is requested.
    Raises SourceChanged if the file ends early.
    """

    def __init__(self, fd: int, extents: list[tuple[int, int]], bufsize: int = READ_BUFFER,
                 depth: int = 4) -> None:
        self._fd = fd
        self._extents = extents
        self._free: queue.Queue[bytearray | None] = queue.Queue()
        self._full: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue()
        for _ in range(depth):
            self._free.put(bytearray(bufsize))
        self._bufsize = bufsize
        self._thread = threading.Thread(target=self._read, name="read-ahead", daemon=True)

    def _read(self) -> None:
        try:
            for offset, length in self._extents:
                done = 0
                while done < length:
                    buf = self._free.get()
                    if buf is None:
                        return
                    want = min(self._bufsize, length - done)
                    n = os.preadv(self._fd, [memoryview(buf)[:want]], offset + done)
                    if n <= 0:
                        self._full.put(SourceChanged("file shrank while it was read"))
                        return
                    self._full.put((buf, n))
                    done += n
            self._full.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._full.put(exc)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[memoryview]:
        held: bytearray | None = None
        while True:
            item = self._full.get()
            if held is not None:
                self._free.put(held)
                held = None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            held, n = item
            yield memoryview(held)[:n]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._free.put(None)
        self._thread.join()
