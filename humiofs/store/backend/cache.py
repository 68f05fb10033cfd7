"""The mount's bounded on-disk cache of pack ciphertext, in front of a slow backend (S3).

`CachedBackend` wraps any Backend and passes every call through, except `read_into` of an
immutable pack (a name under `packs/`): that is served from aligned blocks of the pack's
stored bytes (`block_bytes`, 1 MiB by default) kept as files in a local folder
(blockfolder.py: their layout, checks and eviction) or in memory, and a sequential reader
gets the next blocks fetched ahead of it in the background. The mount uses it with a folder; a restore
from object storage with its blocks in memory (MemoryBlocks), for the read-ahead alone: it
reads each pack once, in order.

What is cached is ciphertext exactly as the store holds it, so the cache reveals no more than
the store does, and every byte it serves is still authenticated by the Store above it.

Damaged bytes. The IntegrityError for bytes that do not authenticate is raised by the Store,
above this wrapper, which cannot see it. A block file is checked against the CRCs written
with it, so the cache serves exactly the bytes it fetched, and a block file damaged on the
local disk is a miss, fetched again. So a cached block fails authentication only if the pack
already did when it was fetched, and then it would again: packs are immutable. The exception
is a pack put back from a copy after damage (README, "After a bad check"): for that,
`discard(name)` drops a pack's blocks, and the Store, when bytes read through a cache
(`caches`) fail authentication, calls it and reads them once more from the store
(Store.read_chunks_into), so a bad block never becomes a permanent EIO.

Errors: the wrapped backend's (FileNotFoundError for a missing pack, EOFError for a read past
its end, OSError). The cache's own trouble (a full disk, its folder removed) is logged once
and the read is served from the wrapped backend: the cache never fails a read.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from humiofs.store.backend import Backend, Wrapper
from humiofs.store.backend.blockfolder import BlockFolder, MemoryBlocks

log = logging.getLogger(__name__)

BLOCK_BYTES = 1 << 20        # default block: one ranged GET per MiB of a pack
READAHEAD_BLOCKS = 8         # how far ahead of a sequential reader blocks are fetched
READAHEAD_THREADS = 2        # fetches in flight at once for read-ahead
READAHEAD_RUN = 2            # blocks per read-ahead fetch (one ranged GET)
MEMORY_BYTES = 32 << 20      # blocks a restore keeps in memory (read-ahead included)
_SIZES = 4096                # pack sizes remembered (a HEAD each otherwise)
_SEQUENTIAL = 1024           # packs whose last read block is remembered

_Ints = list[int]     # (the class's method `list` hides the builtin in its body)
_instances: weakref.WeakSet[CachedBackend] = weakref.WeakSet()


def _after_fork() -> None:
    for cache in list(_instances):
        cache._reset()


os.register_at_fork(after_in_child=_after_fork)


class _Fetch:
    """A block being fetched: others wanting it wait for it instead of fetching it again."""
    __slots__ = ("done", "data")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: memoryview | None = None     # None: the fetch failed


class CachedBackend(Wrapper):
    """`inner` with its packs' bytes cached in `folder`, at most `max_bytes` of block files
    (see BlockFolder); with `folder` None, in memory (MemoryBlocks: for a restore). `block_bytes` must be a multiple of 64 KiB. A sequential reader of a
    pack gets up to `readahead_blocks` blocks fetched ahead of it, by `readahead_threads`
    threads; read-ahead holds at most 2 x readahead_blocks blocks in memory at once.
    Thread-safe, and safe in a child forked from a process using it.
    Raises OSError if `folder` cannot be made or is not a folder this user owns."""

    caches = True

    def __init__(self, inner: Backend, folder: Path | None, max_bytes: int, *,
                 block_bytes: int = BLOCK_BYTES, readahead_blocks: int = READAHEAD_BLOCKS,
                 readahead_threads: int = READAHEAD_THREADS) -> None:
        super().__init__(inner)
        self.blocks: BlockFolder | MemoryBlocks = (
            BlockFolder(folder, inner.location, max_bytes, block_bytes) if folder is not None
            else MemoryBlocks(max_bytes, block_bytes))
        self.block_bytes = block_bytes
        self.readahead_blocks = readahead_blocks
        self.readahead_threads = readahead_threads
        self.fetched = 0        # blocks fetched from `inner` (by readers and read-ahead)
        self._reset()
        _instances.add(self)

    def _reset(self) -> None:
        """Per-process state: also what a forked child starts afresh (the parent's threads,
        locks and flock are not its own)."""
        self._lock = threading.Lock()
        self._fetching: dict[tuple[str, int], _Fetch] = {}
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._last: OrderedDict[str, int] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._ahead = 0              # blocks queued or being fetched by read-ahead
        self.blocks.reset()

    # -- the interface: packs from the cache, everything else passed through ----------------

    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        """See Backend.read_into. With `nowait`, True only when the whole range is in the
        cache folder and in the page cache; else False, without fetching anything."""
        n = len(out)
        if not name.startswith("packs/") or n == 0 or offset < 0:
            return self.inner.read_into(name, offset, out, nowait)
        B = self.block_bytes
        first, last = offset // B, (offset + n - 1) // B
        missing: _Ints = []
        for index in range(first, last + 1):
            if not self._from_disk(name, index, offset, out, nowait):
                if nowait:
                    return False
                missing.append(index)
        if missing:
            size = self._size(name)
            if offset + n > size:
                raise EOFError(f"{name} ends before byte {offset + n} (it has {size})")
            self._fill(name, size, missing, offset, out)
        self._note_read(name, first, last)
        return True

    def discard(self, name: str) -> None:
        """Drops every cached block of the pack `name` (after its bytes failed authentication:
        see the module's docstring). Never raises."""
        with self._lock:
            self._sizes.pop(name, None)
        self.blocks.discard(name)







    def delete(self, name: str) -> None:
        # A pack deleted (prune) loses its blocks too; they would only wait for eviction.
        if name.startswith("packs/"):
            self.discard(name)
        self.inner.delete(name)







    def close(self) -> None:
        """Stops read-ahead (waiting for fetches under way), then closes the wrapped backend."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            # Read-ahead cancelled before it ran: nobody may wait for it.
            for (name, index) in list(self._fetching):
                self._finish_locked(name, index, None)
        self.blocks.close()
        _instances.discard(self)
        self.inner.close()

    # -- fetching -----------------------------------------------------------------------------

    def _size(self, name: str) -> int:
        with self._lock:
            size = self._sizes.get(name)
            if size is not None:
                self._sizes.move_to_end(name)
                return size
        size = self.inner.stat(name).size
        with self._lock:
            self._remember_size(name, size)
        return size

    def _remember_size(self, name: str, size: int) -> None:
        self._sizes[name] = size
        self._sizes.move_to_end(name)
        if len(self._sizes) > _SIZES:
            self._sizes.popitem(last=False)

    def _from_disk(self, name: str, index: int, offset: int, out: memoryview,
                   nowait: bool = False) -> bool:
        """Copies block `index`'s part of [offset, offset + len(out)) from the cache folder
        into `out`: False if it is not there."""
        B = self.block_bytes
        lo = max(offset, index * B)
        hi = min(offset + len(out), (index + 1) * B)
        size = self.blocks.get(name, index, lo - index * B, out[lo - offset:hi - offset], nowait)
        if size is None:
            return False
        with self._lock:
            self._remember_size(name, size)
        return True

    def _fill(self, name: str, size: int, missing: _Ints, offset: int,
              out: memoryview) -> None:
        """Fetches the blocks `missing` (sorted) of a pack of `size` bytes, runs of adjacent
        ones in one read, and copies their part of [offset, offset + len(out)) into `out`.
        Blocks another thread is fetching are waited for instead."""
        B = self.block_bytes
        for attempt in range(3):
            mine: _Ints = []
            theirs: dict[int, _Fetch] = {}
            with self._lock:
                for index in missing:
                    other = self._fetching.get((name, index))
                    if other is not None:
                        theirs[index] = other
                    elif attempt < 2:
                        self._fetching[(name, index)] = _Fetch()
                        mine.append(index)
                    else:
                        mine.append(index)     # others keep failing: fetch it unshared
            blocks: dict[int, memoryview] = {}
            try:
                # A fetch that ended since this thread looked stored its block first.
                wanted = [i for i in mine if not self._from_disk(name, i, offset, out)]
                for run in _runs(wanted):
                    blocks.update(self._fetch(name, size, run, shared=attempt < 2))
            finally:
                # Whatever was not fetched (an error, or found on disk) is released.
                if attempt < 2:
                    self._finish(name, [i for i in mine if i not in blocks])
            missing = []
            for index, fetch in theirs.items():
                fetch.done.wait()
                if fetch.data is not None:
                    blocks[index] = fetch.data
                elif not self._from_disk(name, index, offset, out):
                    missing.append(index)      # that fetch failed: try it here
            for index, data in blocks.items():
                lo = max(offset, index * B)
                hi = min(offset + len(out), index * B + len(data))
                out[lo - offset:hi - offset] = data[lo - index * B:hi - index * B]
            if not missing:
                return

    def _fetch(self, name: str, size: int, run: _Ints, shared: bool = True
               ) -> dict[int, memoryview]:
        """Reads the blocks `run` (adjacent; if `shared`, registered in _fetching by this
        thread) from the wrapped backend in one read, stores them and wakes their waiters."""
        B = self.block_bytes
        start = run[0] * B
        buf = bytearray(min(size, (run[-1] + 1) * B) - start)
        try:
            self.inner.read_into(name, start, memoryview(buf))
        except BaseException:
            if shared:
                self._finish(name, run)
            raise
        view = memoryview(buf)
        blocks = {i: view[(i - run[0]) * B:(i - run[0] + 1) * B] for i in run}
        for index, data in blocks.items():
            self.blocks.put(name, index, size, data)
        with self._lock:
            self.fetched += len(run)
        if shared:
            self._finish(name, run, blocks)
        return blocks

    def _finish(self, name: str, run: _Ints, blocks: dict[int, memoryview] | None = None
                ) -> None:
        """Wakes whoever waits for the blocks `run`, giving them `blocks` (None: failed)."""
        with self._lock:
            for index in run:
                self._finish_locked(name, index, blocks[index] if blocks else None)

    def _finish_locked(self, name: str, index: int, data: memoryview | None) -> None:
        fetch = self._fetching.pop((name, index), None)
        if fetch is not None:
            fetch.data = data
            fetch.done.set()

    # -- read-ahead ---------------------------------------------------------------------------

    def _note_read(self, name: str, first: int, last: int) -> None:
        """Starts read-ahead when this read of `name` continues the previous one (it starts
        in the block where that one ended, or the next)."""
        if self.readahead_blocks <= 0:
            return
        with self._lock:
            prev = self._last.get(name)
            self._last[name] = last
            self._last.move_to_end(name)
            if len(self._last) > _SEQUENTIAL:
                self._last.popitem(last=False)
            size = self._sizes.get(name)
        if prev is None or not prev <= first <= prev + 1 or size is None:
            return
        end = min(last + self.readahead_blocks, (size - 1) // self.block_bytes)
        wanted = [i for i in range(last + 1, end + 1) if not self.blocks.has(name, i)]
        for run in _runs(wanted, READAHEAD_RUN):
            with self._lock:
                # Bounded memory: at most two readers' worth of blocks queued or in flight.
                if self._ahead + len(run) > 2 * self.readahead_blocks:
                    return
                run = [i for i in run if (name, i) not in self._fetching]
                if not run:
                    continue
                for i in run:
                    self._fetching[(name, i)] = _Fetch()
                self._ahead += len(run)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.readahead_threads,
                                                    thread_name_prefix="humiofs-readahead")
                pool = self._pool
            try:
                pool.submit(self._ahead_fetch, name, size, run)
            except RuntimeError:      # closed meanwhile
                self._ahead_done(name, run)
                return

    def _ahead_fetch(self, name: str, size: int, run: _Ints) -> None:
        try:
            # A reader's fetch that ended before `run` was registered stored its block.
            present = [i for i in run if self.blocks.has(name, i)]
            self._finish(name, present)
            for part in _runs([i for i in run if i not in present]):
                self._fetch(name, size, part)
        except BaseException as exc:
            # Not the reader's business: it fetches the block itself when it gets there, and
            # sees the error then.
            log.debug("read-ahead of %s blocks %s failed: %s", name, run, exc)
        finally:
            self._ahead_done(name, run)

    def _ahead_done(self, name: str, run: _Ints) -> None:
        self._finish(name, run)   # what is still registered (after an error) is freed
        with self._lock:
            self._ahead -= len(run)


def _runs(indexes: _Ints, longest: int = 0) -> list[_Ints]:
    """Sorted `indexes` cut into runs of adjacent ones (at most `longest` each, if given)."""
    runs: list[_Ints] = []
    for i in indexes:
        if runs and runs[-1][-1] == i - 1 and (not longest or len(runs[-1]) < longest):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs

