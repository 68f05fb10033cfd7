"""The mount's read path: open files, their extent maps (file offsets to offsets in the data
blob), holes served as zeros without the store, decrypted chunks from the cache, and read-ahead
of a sequential reader's next chunks into the page cache.
"""
from __future__ import annotations

import errno
import logging
import threading
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor

from humiofs import crypto
from humiofs.chunkcache import CACHE_BYTES, ChunkCache
from humiofs.crypto import CHUNK
from humiofs.errors import StoreError
from humiofs.format import Entry
from humiofs.store import Store

log = logging.getLogger(__name__)

PREFETCH_CHUNKS = 128         # how far ahead of a sequential reader packs are read (8 MiB)
PREFETCH_THREADS = 2
# A miss of up to this many chunks whose ciphertext is already in the page cache (checked with
# RWF_NOWAIT, so it never waits for a disk) is decrypted on the event loop. Both cryptography's
# AES-GCM and pyfuse3's request loop hold the GIL, so decrypting in a worker thread cannot run
# in parallel with the loop anyway; the hand-over only adds cost (measured: 1 GiB read 10-35%
# faster inline). 2 MiB covers a 1 MiB kernel read that straddles chunks, and takes ~0.3 ms.
NOWAIT_CHUNKS = 32


class WouldBlock(Exception):
    """The call needs store I/O: run it again with block=True in a worker thread."""


class Damaged(StoreError):
    """Store data behind a path is damaged or missing; the message names the path."""


class _File:
    """An open file's extent map: file offsets to offsets in its data blob."""

    __slots__ = ("inode", "path", "store", "ref", "size", "starts", "ends", "blob", "inline",
                 "users")

    def __init__(self, inode: int, path: str, store: Store, entry: Entry,
                 inline: bytes | None) -> None:
        self.inode, self.path, self.store = inode, path, store
        self.ref, self.size = entry.data, entry.size
        self.inline = inline
        self.starts = [off for off, _ in entry.extents]
        self.ends = [off + length for off, length in entry.extents]
        self.blob = []
        pos = 0
        for off, length in entry.extents:
            self.blob.append(pos)
            pos += length
        self.users = 0


class _Handle:
    __slots__ = ("file", "next_off", "ahead")

    def __init__(self, file: _File) -> None:
        self.file, self.next_off, self.ahead = file, 0, 0


class Reader:
    """Open files and their reads; every method is safe to call from any thread."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache = ChunkCache(cache_bytes)
        self._lock = threading.Lock()
        self._files: dict[int, _File] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._prefetcher: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)

    def open(self, inode: int, path: str, store: Store, entry: Entry,
             inline: bytes | None) -> int:
        """A handle for reading the file `entry` (whose contents are `inline` if given)."""
        with self._lock:
            f = self._files.get(inode)
            if f is None:
                f = self._files[inode] = _File(inode, path, store, entry, inline)
            f.users += 1
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(f)
            return fh

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is not None:
                h.file.users -= 1
                if h.file.users == 0:
                    del self._files[h.file.inode]

    def read(self, fh: int, off: int, size: int, block: bool = True) -> bytes | memoryview:
        """`size` bytes of the file at `off` (fewer at the end); holes read as zeros without
        touching the store. Raises Damaged, naming the file and offset, if the store data
        does not authenticate."""
        with self._lock:
            h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "bad file handle")
        f = h.file
        end = min(off + size, f.size)
        if off >= end:
            return b""
        if f.inline is not None:
            return f.inline[off:end]
        parts: list[bytes | memoryview] = []
        i = max(0, bisect_right(f.starts, off) - 1)
        pos = off
        while pos < end:
            if i < len(f.starts) and f.starts[i] <= pos < f.ends[i]:
                stop = min(end, f.ends[i])
                parts.append(self._data(f, f.blob[i] + pos - f.starts[i], stop - pos, block))
                pos = stop
                i += 1
            else:
                if i < len(f.starts) and f.ends[i] <= pos:
                    i += 1
                    continue
                stop = min(end, f.starts[i]) if i < len(f.starts) else end
                parts.append(bytes(stop - pos))
                pos = stop
        self._prefetch(h, off, end)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _data(self, f: _File, start: int, n: int, block: bool) -> bytes | memoryview:
        assert f.ref is not None
        first, last = start // CHUNK, (start + n - 1) // CHUNK
        slots = self.cache.get(f.ref, first, last)
        if slots is None and not block and last - first < NOWAIT_CHUNKS:
            try:
                slots = self.cache.load_nowait(f.store, f.ref, first, last)
            except StoreError as exc:
                raise Damaged(f"cannot read {f.path} at data offset {start}: {exc}") from None
        if slots is None:
            if not block:
                raise WouldBlock()
            try:
                slots = self.cache.load(f.store, f.ref, first, last)
            except StoreError as exc:
                raise Damaged(f"cannot read {f.path} at data offset {start}: {exc}") from None
        skip = start - first * CHUNK
        buf, base, _ = slots[0]
        if all(b is buf and s == base + k * CHUNK for k, (b, s, _) in enumerate(slots)):
            return memoryview(buf)[base + skip:base + skip + n]
        joined = b"".join(memoryview(b)[s:s + size] for b, s, size in slots)
        return joined[skip:skip + n]

    def _prefetch(self, h: _Handle, off: int, end: int) -> None:
        """Keeps a sequential reader's next PREFETCH_CHUNKS of ciphertext read into the page
        cache ahead of it, half a window at a time, by worker threads. They only read (which
        releases the GIL), so the loop then decrypts page-cache hits without waiting and the
        threads never compete with it for the GIL."""
        f = h.file
        sequential = abs(off - h.next_off) <= 4 * CHUNK
        h.next_off = end
        if not sequential or f.ref is None:
            return
        k = bisect_right(f.starts, end) - 1
        # The first chunk past the data this read covered: its own chunks are loaded already.
        first = -(-(f.blob[k] + min(end, f.ends[k]) - f.starts[k]) // CHUNK) if k >= 0 else 0
        h.ahead = max(h.ahead, first)
        if h.ahead - first >= PREFETCH_CHUNKS // 2:
            return
        n = crypto.chunk_count(f.ref.plain_len)
        with self._lock:
            if self._prefetcher is None:  # created late: never before a fork
                self._prefetcher = ThreadPoolExecutor(PREFETCH_THREADS, "humiofs-ahead")
            while h.ahead < n and h.ahead - first < PREFETCH_CHUNKS // 2:
                hi = min(n, h.ahead + PREFETCH_CHUNKS // 2)
                self._prefetcher.submit(self._ahead, f, h.ahead, hi - 1)
                h.ahead = hi

    def _ahead(self, f: _File, first: int, last: int) -> None:
        assert f.ref is not None
        try:
            f.store.warm(f.ref, first, last)
        except StoreError as exc:  # the reader that gets there reports it, with the path
            log.debug("read-ahead of %s failed: %s", f.path, exc)
