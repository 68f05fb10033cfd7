"""The mount's read path: open files, their extent maps (file offsets to offsets in the data
blob), holes served as zeros without the store, and decrypted chunks from the chunk cache.

Where a missing run of chunks is decrypted:
- a short run (NOWAIT_CHUNKS): on the trio loop if its pack is open and its ciphertext is in
  the page cache (read with RWF_NOWAIT, so the loop never waits for a disk), else in a thread;
  a small file then costs no hand-over at all;
- a longer run: in the decryption worker process (decryptd), straight into the cache's shared
  memory, or in a thread if there is no worker (or it died).
A sequential reader gets the next PREFETCH_CHUNKS decrypted ahead of it by the worker, so its
reads are answered from memory while the worker runs on the other core.

The worker is never waited for without a deadline: if it answers no job for JOB_DEADLINE_S
(stopped, or stuck; longer while it waits for the disk), it is killed and its jobs, and all
later ones, are decrypted in threads. Killing it first matters: a worker that woke up later
would write into cache slots that may hold other chunks by then.

Reads run on the trio thread; open() and release() may run on any thread.
"""
from __future__ import annotations

import errno
import logging
import threading
from bisect import bisect_right

import trio

from humiofs.errors import StoreError, StoreIOError
from humiofs.mount.chunkcache import CACHE_BYTES, ChunkCache, Load
from humiofs.mount.decryptd import Worker
from humiofs.store import crypto
from humiofs.store.crypto import CHUNK
from humiofs.store.format import Entry
from humiofs.store.repository import Store

log = logging.getLogger(__name__)

PREFETCH_CHUNKS = 128         # how far ahead of a sequential reader chunks are decrypted (8 MiB)
PREFETCH_JOB = 16             # chunks per read-ahead job (1 MiB)
# A miss of up to this many chunks whose ciphertext is in the page cache is decrypted on the
# loop: 256 KiB take ~60 us, less than a round trip to the worker.
NOWAIT_CHUNKS = 4
# A worker that answers no job for this long while some wait is given up (a decryption job
# takes milliseconds); one waiting for the disk (state D) gets up to DISK_WAIT_S, since
# threads would wait for the same disk.
JOB_DEADLINE_S = 3.0
DISK_WAIT_S = 60.0
_REAP_S = 2.0


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
    """Open files and their reads."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache = ChunkCache(cache_bytes)
        self.worker: Worker | None = None
        self._lock = threading.Lock()
        self._files: dict[int, _File] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self.offloaded = 0            # loads run off the loop (worker or thread), for tests
        self._jobs: dict[int, tuple[Load, _File, int, int]] = {}
        self._next_job = 1
        self._collecting = False
        # When the worker last answered, or was given a job while it had none (trio clock),
        # and the wait for its next answer, whose deadline a new job may set.
        self._progress_at = 0.0
        self._waiting: trio.CancelScope | None = None

    def start_worker(self, stores: list[Store], close_fds: tuple[int, ...] = ()) -> None:
        """Forks the decryption worker (see decryptd.Worker.start for when to call it)."""
        self.worker = Worker.start(stores, self.cache.shared, close_fds)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.cache.close()

    def kill_worker(self) -> None:
        """Ends the worker at once (on the trio thread; at shutdown): its jobs move to threads,
        so no read waits for a worker that may never answer."""
        if self.worker is not None:
            self.worker.kill()

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

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """`size` bytes of the file at `off` (fewer at the end); holes read as zeros without
        touching the store. Raises Damaged, naming the file and offset, if the store data
        does not authenticate. A memoryview into the cache stays valid only until this thread
        next yields to trio: copy it to keep it."""
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
        # The chunks this read hands out stay pinned until it returns: no load (this read's
        # own read-ahead included) can take their slots before their bytes are copied out.
        pinned: list[int] = []
        try:
            i = max(0, bisect_right(f.starts, off) - 1)
            pos = off
            while pos < end:
                if i < len(f.starts) and f.starts[i] <= pos < f.ends[i]:
                    stop = min(end, f.ends[i])
                    parts.append(await self._data(f, f.blob[i] + pos - f.starts[i], stop - pos,
                                                  pinned))
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
        finally:
            for slot in pinned:
                self.cache.unpin(slot)

    async def _data(self, f: _File, start: int, n: int, pinned: list[int]) -> bytes | memoryview:
        """`n` bytes of f's data blob at `start`: chunks from the cache, missing runs loaded.
        Every chunk it uses is pinned, and added to `pinned` for the caller to unpin."""
        ref = f.ref
        first, last = start // CHUNK, (start + n - 1) // CHUNK
        if ref is None or last >= crypto.chunk_count(ref.plain_len):
            raise Damaged(f"cannot read {f.path} at data offset {start}: the file's extents "
                          "lie beyond its stored data")
        cache = self.cache
        # All ready in one run of slots (as one load leaves them): the bytes are handed out in
        # place. They stay pinned until read() returns, and pyfuse3 copies a read's reply into
        # the kernel before anything that could take a slot runs on this thread.
        start_slot = cache.ready_run(ref, first, last)
        if start_slot is not None:
            for slot in range(start_slot, start_slot + last - first + 1):
                cache.pin(slot)
                pinned.append(slot)
            return cache.run(start_slot, start - first * CHUNK, n)
        waits: list[Load] = []
        i = first
        while i <= last:
            found = cache.find((ref.pack, ref.oid, i))
            if found is not None:
                cache.pin(found[0])
                pinned.append(found[0])
                if found[1] is not None and found[1] not in waits:
                    waits.append(found[1])
                i += 1
                continue
            j = i
            while j < last and cache.find((ref.pack, ref.oid, j + 1)) is None:
                j += 1
            load = self._load(f, i, j, inline=j - i < NOWAIT_CHUNKS)
            if load is None:  # every slot is busy: read around the cache
                return await self._uncached(f, start, n)
            for slot in range(load.start, load.start + j - i + 1):
                cache.pin(slot)
                pinned.append(slot)
            waits.append(load)
            i = j + 1
        for load in waits:
            if not load.done.is_set():
                await load.done.wait()
            if load.error is not None:
                raise Damaged(f"cannot read {f.path} at data offset {start}: {load.error}")
        skip = start - first * CHUNK
        start_slot = cache.ready_run(ref, first, last)
        if start_slot is not None:  # loaded as one run: in place, as above
            return cache.run(start_slot, skip, n)
        views = []
        for i in range(first, last + 1):
            found = cache.find((ref.pack, ref.oid, i))
            assert found is not None and found[1] is None  # pinned and loaded
            views.append(cache.chunk(found[0]))
        views[0] = views[0][skip:]
        excess = sum(len(v) for v in views) - n
        if excess:
            views[-1] = views[-1][:len(views[-1]) - excess]
        return b"".join(views)

    def _load(self, f: _File, first: int, last: int, inline: bool) -> Load | None:
        """Starts decrypting chunks first..last of f's blob into the cache; None if there is no
        room. With `inline`, a run whose ciphertext is in the page cache is done at once."""
        ref = f.ref
        assert ref is not None
        load = self.cache.reserve(ref, first, last)
        if load is None:
            return None
        if inline:
            try:
                done = f.store.read_chunks_into(ref, crypto.KIND_DATA, first, last,
                                                self.cache.region(load), nowait=True)
            except StoreError as exc:
                self.cache.finish(load, str(exc))
                return load
            if done is not None:
                self.cache.finish(load, None)
                return load
        self.offloaded += 1
        job = self._next_job
        self._next_job += 1
        w = self.worker
        # A small file goes to a thread, which also opens its pack in this process, so that
        # the next small files from that pack (they are packed together) stay on the loop.
        if ((not inline or ref.plain_len > NOWAIT_CHUNKS * CHUNK)
                and w is not None and w.serves(f.store)
                and w.submit(job, f.store, ref, first, last, load.start * CHUNK)):
            if not self._jobs:
                # The worker had nothing to do: its deadline runs from now.
                self._progress_at = trio.current_time()
                if self._waiting is not None:
                    self._waiting.deadline = self._progress_at + JOB_DEADLINE_S
            self._jobs[job] = (load, f, first, last)
            if not self._collecting:
                self._collecting = True
                trio.lowlevel.spawn_system_task(self._collect, w)
        else:
            trio.lowlevel.spawn_system_task(self._in_thread, load, f, first, last)
        return load

    async def _collect(self, worker: Worker) -> None:
        """Finishes the worker's jobs as its results come in. If it dies, or answers nothing
        for too long (JOB_DEADLINE_S), it is killed and its unanswered jobs move to threads."""
        limit = JOB_DEADLINE_S
        try:
            while worker.alive:
                with trio.CancelScope() as waiting:
                    if self._jobs:
                        waiting.deadline = self._progress_at + limit
                    self._waiting = waiting
                    await trio.lowlevel.wait_readable(worker.sock)
                self._waiting = None
                if waiting.cancelled_caught:
                    if not self._jobs:
                        continue
                    waited = trio.current_time() - self._progress_at
                    if worker.state() == "D" and waited < DISK_WAIT_S:
                        limit = DISK_WAIT_S     # reading the disk: threads would wait too
                        continue
                    if waited < limit:
                        continue
                    log.warning("the decryption worker (pid %d) has answered no job for %.1f s "
                                "(state %s); stopping it, and decrypting in threads from now "
                                "on", worker.pid, waited, worker.state() or "gone")
                    await self._abandon(worker)
                    break
                limit = JOB_DEADLINE_S
                self._progress_at = trio.current_time()
                for job, error in worker.results() or ():
                    entry = self._jobs.pop(job, None)
                    if entry is None:  # never sent by us: the worker cannot be trusted
                        log.error("the decryption worker answered an unknown job %d", job)
                        await self._abandon(worker)
                        break
                    self.cache.finish(entry[0], error)
            else:
                if not worker.killed:
                    log.warning("the decryption worker has exited; decrypting in threads from "
                                "now on")
            jobs, self._jobs = self._jobs, {}
            for load, f, first, last in jobs.values():
                trio.lowlevel.spawn_system_task(self._in_thread, load, f, first, last)
        finally:
            self._waiting = None
            self._collecting = False

    async def _abandon(self, worker: Worker) -> None:
        """Kills the worker and waits (briefly) until it is gone, so that it can no longer
        write into slots its jobs owned once threads redo those jobs."""
        worker.kill()
        deadline = trio.current_time() + _REAP_S
        while not worker.reaped() and trio.current_time() < deadline:
            await trio.sleep(0.01)

    async def _in_thread(self, load: Load, f: _File, first: int, last: int) -> None:
        ref = f.ref
        assert ref is not None
        error = None
        try:
            await trio.to_thread.run_sync(f.store.read_chunks_into, ref, crypto.KIND_DATA,
                                          first, last, self.cache.region(load))
        except (StoreError, StoreIOError) as exc:
            error = str(exc)        # damaged, or the store unreadable (the S3 service down)
        except OSError as exc:
            error = exc.strerror or str(exc)
        except Exception as exc:  # a system task must not raise: it would end the mount
            if self.cache.closed:
                # A read-ahead still running when the mount closed: its slots are gone, and
                # nobody should wait for them (ValueError: released memoryview). Not a fault.
                load.error = "the mount is closing"
                load.done.set()
                return
            log.exception("internal error reading %s", f.path)
            error = f"internal error: {exc}"
        self.cache.finish(load, error)

    async def _uncached(self, f: _File, start: int, n: int) -> bytes:
        assert f.ref is not None
        first, last = start // CHUNK, (start + n - 1) // CHUNK
        try:
            buf = await trio.to_thread.run_sync(f.store.read_chunks, f.ref, crypto.KIND_DATA,
                                                first, last)
        except (StoreError, StoreIOError) as exc:
            raise Damaged(f"cannot read {f.path} at data offset {start}: {exc}") from None
        except OSError as exc:
            raise Damaged(f"cannot read {f.path} at data offset {start}: "
                          f"{exc.strerror or exc}") from None
        skip = start - first * CHUNK
        return bytes(memoryview(buf)[skip:skip + n])

    def _prefetch(self, h: _Handle, off: int, end: int) -> None:
        """Keeps a sequential reader's next PREFETCH_CHUNKS decrypted ahead of it, half a
        window at a time, in jobs of PREFETCH_JOB chunks."""
        f = h.file
        sequential = abs(off - h.next_off) <= 4 * CHUNK
        h.next_off = end
        if not sequential or f.ref is None:
            return
        ref = f.ref
        k = bisect_right(f.starts, end) - 1
        # The first chunk past the data this read covered: its own chunks are loaded already.
        first = -(-(f.blob[k] + min(end, f.ends[k]) - f.starts[k]) // CHUNK) if k >= 0 else 0
        h.ahead = max(h.ahead, first)
        if h.ahead - first >= PREFETCH_CHUNKS // 2:
            return
        stop = min(crypto.chunk_count(ref.plain_len), first + PREFETCH_CHUNKS)
        while h.ahead < stop:
            lo = h.ahead
            while lo < stop and self.cache.find((ref.pack, ref.oid, lo)) is not None:
                lo += 1
            if lo == stop:
                h.ahead = stop
                return
            # Jobs near the reader are small, so that its next read waits for little; further
            # ahead they grow to PREFETCH_JOB, fewer jobs for the same bytes.
            size = max(NOWAIT_CHUNKS, min(PREFETCH_JOB, (lo - first) // 2))
            hi = lo
            while (hi + 1 < min(stop, lo + size)
                   and self.cache.find((ref.pack, ref.oid, hi + 1)) is None):
                hi += 1
            if self._load(f, lo, hi, inline=False) is None:
                return  # no room: try again on the next read
            h.ahead = hi + 1
