"""FUSE-free read-only model of the stores in BACKUP_DIR: inodes, attributes, lookup, read.

What the mount shows:

    /NAME/                         store NAME at its latest generation (or the one --at TIME)
    /NAME/globaldata/cluster_membership-NODEID-UUID.uuid    the node's seed file (synthetic)
    /.generations/NAME/TIME/       every generation of NAME, TIME like 2026-11-24T10:00:00Z

Inodes are handed out lazily and never change meaning: when a directory's listing is first read,
its children get a contiguous range of inode numbers (base + index in the sorted listing). So an
inode is resolved by a bisect over the ranges plus the parent's listing, which is kept in a
bounded LRU and read again from the store if it was dropped. Memory grows with the number of
directories visited, not with the number of files, and every inode the kernel was ever given
stays resolvable, so forget() needs no bookkeeping. A new generation gets new inodes: `NAME`
then simply points at another inode, and nothing the kernel caches about an inode can go stale.

Calls that may need store I/O take `block`: with block=False they raise WouldBlock instead of
reading the store, so the FUSE adapter can answer from memory on the event loop and run only
the misses in a worker thread. Everything here is thread-safe.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from humiofs import crypto, generations
from humiofs.crypto import CHUNK
from humiofs.errors import NoSuchStore, StoreError, WrongKey
from humiofs.format import DIR, FILE, SYMLINK, Entry, Generation, Ref
from humiofs.store import Store, is_store, list_stores

log = logging.getLogger(__name__)

ROOT_INODE = 1
GENERATIONS = b".generations"
GLOBALDATA = b"globaldata"
REFRESH_S = 1.0               # how often the list of generations is read again
LISTING_BUDGET = 64_000       # tree entries kept decoded (about 40 MB)
CACHE_BYTES = 64 << 20        # decrypted file data kept
PREFETCH_CHUNKS = 128         # how far ahead of a sequential reader packs are read (8 MiB)
PREFETCH_THREADS = 2
# A miss of up to this many chunks whose ciphertext is already in the page cache (checked with
# RWF_NOWAIT, so it never waits for a disk) is decrypted on the event loop. Both cryptography's
# AES-GCM and pyfuse3's request loop hold the GIL, so decrypting in a worker thread cannot run
# in parallel with the loop anyway; the hand-over only adds cost (measured: 1 GiB read 10-35%
# faster inline). 2 MiB covers a 1 MiB kernel read that straddles chunks, and takes ~0.3 ms.
NOWAIT_CHUNKS = 32
_BLOCK = 4096
_NAME = attrgetter("name")


class WouldBlock(Exception):
    """The call needs store I/O: run it again with block=True in a worker thread."""


class NotFound(Exception):
    """No such name or inode."""


class Damaged(StoreError):
    """Store data behind a path is damaged or missing; the message names the path."""


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode. `volatile` inodes (the top-level folders, whose listings
    follow new backups) may change; every other inode is immutable."""

    inode: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    mtime_ns: int
    volatile: bool = False


def _blocks(nbytes: int) -> int:
    """512-byte blocks of `nbytes` of data allocated in 4 KiB blocks, as `du` counts them."""
    return -(-nbytes // _BLOCK) * (_BLOCK // 512)


class _Source:
    """One opened store and the generations the mount shows of it."""

    def __init__(self, store: Store, at_ms: int | None) -> None:
        self.store = store
        self.name = store.name.encode()
        self.at_ms = at_ms
        self.names: list[str] = []
        self.gens: dict[str, Generation] = {}
        self.bad: set[str] = set()
        self.current: Generation | None = None
        self.checked = -1e9

    def stale(self) -> bool:
        return time.monotonic() - self.checked > REFRESH_S

    def refresh(self) -> None:
        """Lists the generations again and picks the one NAME/ shows (blocking I/O)."""
        names = self.store.list_generations()
        current = None
        for name in reversed(names):
            if self.at_ms is not None and int(name[:13]) > self.at_ms:
                continue
            current = self.generation(name)
            if current is not None:
                break
        self.names, self.current, self.checked = names, current, time.monotonic()

    def generation(self, name: str) -> Generation | None:
        """The generation `name`, loaded once; None (with one warning) if it is damaged."""
        gen = self.gens.get(name)
        if gen is None and name not in self.bad:
            try:
                gen = self.gens[name] = self.store.load_generation(name)
            except StoreError as exc:
                self.bad.add(name)
                log.warning("backup %s: leaving out damaged generation %s: %s",
                            self.store.name, name, exc)
        return gen

    def time_names(self) -> list[tuple[bytes, str]]:
        """(folder name, generation name) for every generation: the commit time to the second,
        or to the millisecond where two generations share a second."""
        seconds = [generations.format_time(int(n[:13])) for n in self.names]
        out = []
        for name, sec in zip(self.names, seconds):
            if seconds.count(sec) > 1:
                sec = f"{sec[:-1]}.{int(name[:13]) % 1000:03d}Z"
            out.append((sec.encode(), name))
        return out


class _Top:
    """A synthetic folder above the node trees: the root, .generations or .generations/NAME."""

    __slots__ = ("inode", "parent", "source")

    def __init__(self, inode: int, parent: int, source: _Source | None) -> None:
        self.inode, self.parent, self.source = inode, parent, source


class _Dir:
    """A folder of a node tree (or a node root, or the synthetic globaldata folder) whose
    children get the inode range base .. base+count-1 once its listing is first read."""

    __slots__ = ("inode", "parent", "path", "source", "gen", "ref", "is_root", "base", "count")

    def __init__(self, inode: int, parent: int, path: str, source: _Source, gen: Generation,
                 ref: Ref | None, is_root: bool = False) -> None:
        self.inode, self.parent, self.path = inode, parent, path
        self.source, self.gen, self.ref, self.is_root = source, gen, ref, is_root
        self.base = self.count = 0


class Listing:
    """An opened folder: its children, fixed from opendir to releasedir."""

    def __init__(self, items: list[tuple[bytes, int]], attr: Callable[[int, int], Attr],
                 volatile: bool) -> None:
        self._items = items
        self._attr = attr
        self.volatile = volatile

    def __len__(self) -> int:
        return len(self._items)

    def item(self, index: int) -> tuple[bytes, Attr]:
        name, inode = self._items[index]
        return name, self._attr(index, inode)


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


_Slot = tuple[bytearray, int, int]  # a decrypted chunk: its buffer, start and length there


class ChunkCache:
    """Decrypted 64 KiB chunks of file data, least recently used dropped past `max_bytes`.

    A load decrypts a run of chunks into one buffer, and each chunk is kept as a slot (buffer,
    start, length) of it, so that a read within a run is answered with a memoryview and no copy.
    Loads are shared: a reader that needs a chunk another thread is decrypting waits for it.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[tuple[bytes, bytes, int], _Slot] = OrderedDict()
        self._loading: dict[tuple[bytes, bytes, int], threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, ref: Ref, first: int, last: int) -> list[_Slot] | None:
        """Chunks first..last if all are cached, else None; never blocks on I/O."""
        out = []
        with self._lock:
            for i in range(first, last + 1):
                slot = self._data.get((ref.pack, ref.oid, i))
                if slot is None:
                    return None
                self._data.move_to_end((ref.pack, ref.oid, i))
                out.append(slot)
        return out

    def load(self, store: Store, ref: Ref, first: int, last: int) -> list[_Slot]:
        """Chunks first..last, read and authenticated from the store where not cached."""
        mine: list[int] = []
        waits: list[threading.Event] = []
        with self._lock:
            for i in range(first, last + 1):
                key = (ref.pack, ref.oid, i)
                if key in self._data:
                    continue
                event = self._loading.get(key)
                if event is not None:
                    waits.append(event)
                else:
                    self._loading[key] = threading.Event()
                    mine.append(i)
        try:
            for lo, hi in _runs(mine):
                slots = _decrypt(store, ref, lo, hi)
                assert slots is not None
                self._insert(ref, lo, slots)
        finally:
            with self._lock:
                for i in mine:
                    self._loading.pop((ref.pack, ref.oid, i)).set()
        for event in waits:
            event.wait(60)
        out = self.get(ref, first, last)
        # None if another thread's load failed or the cache is too small for the request.
        if out is None:
            out = _decrypt(store, ref, first, last)
            assert out is not None
        return out

    def _insert(self, ref: Ref, first: int, slots: list[_Slot]) -> None:
        with self._lock:
            for i, slot in enumerate(slots, first):
                old = self._data.pop((ref.pack, ref.oid, i), None)
                if old is not None:
                    self.bytes -= old[2]
                self._data[(ref.pack, ref.oid, i)] = slot
                self.bytes += slot[2]
            while self.bytes > self.max_bytes and self._data:
                self.bytes -= self._data.popitem(last=False)[1][2]

    def load_nowait(self, store: Store, ref: Ref, first: int, last: int) -> list[_Slot] | None:
        """Chunks first..last if their stored bytes are in the page cache (else None), for a
        small read on the event loop: it then never waits for the disk, and decrypting a
        chunk or two costs less than the hand-over to a worker thread."""
        with self._lock:
            if any((ref.pack, ref.oid, i) in self._loading for i in range(first, last + 1)):
                return None
        slots = _decrypt(store, ref, first, last, nowait=True)
        if slots is not None:
            self._insert(ref, first, slots)
        return slots


def _decrypt(store: Store, ref: Ref, first: int, last: int,
             nowait: bool = False) -> list[_Slot] | None:
    """Chunks first..last decrypted into one new buffer, as slots of it (None: see nowait)."""
    size = min(ref.plain_len, (last + 1) * CHUNK) - first * CHUNK
    buf = bytearray(size)
    if store.read_chunks_into(ref, crypto.KIND_DATA, first, last, memoryview(buf),
                              nowait) is None:
        return None
    return [(buf, k, min(CHUNK, size - k)) for k in range(0, size, CHUNK)] or [(buf, 0, 0)]


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def open_sources(backup_dir: Path, key: str, name: str | None = None) -> list[Store]:
    """Opens every store in `backup_dir` that `key` opens (or only `name`).

    A store the key does not open is left out with a warning; if it opens none, WrongKey.
    The Argon2id unwraps run one after another: run concurrently in threads, the `cryptography`
    Argon2id (lanes > 1) deadlocks, and each unwrap already uses several cores.
    """
    if name is not None:
        if not is_store(backup_dir / name):
            raise NoSuchStore(f"no humiofs store at {backup_dir / name}")
        return [Store.open(backup_dir / name, key)]
    names = list_stores(backup_dir)
    if not names:
        raise NoSuchStore(f"no humiofs backups in {backup_dir}")
    stores = []
    for n in names:
        try:
            stores.append(Store.open(backup_dir / n, key))
        except WrongKey:
            log.warning("the key does not open the backup %s; it is left out of the mount", n)
        except StoreError as exc:
            log.warning("backup %s is left out of the mount: %s", n, exc)
    if not stores:
        raise WrongKey(f"the key does not open any store in {backup_dir} ({', '.join(names)}). "
                       "If the key is lost, these backups cannot be read by anyone")
    return stores


class Tree:
    """The read-only model of the mount: every method is safe to call from any thread."""

    def __init__(self, stores: list[Store], at_ms: int | None = None,
                 cache_bytes: int = CACHE_BYTES, listing_budget: int = LISTING_BUDGET) -> None:
        self.uid, self.gid = os.getuid(), os.getgid()
        self.cache = ChunkCache(cache_bytes)
        self.listing_budget = listing_budget
        self._lock = threading.RLock()
        self._sources = sorted((_Source(s, at_ms) for s in stores), key=attrgetter("name"))
        self._top: dict[int, _Top] = {ROOT_INODE: _Top(ROOT_INODE, ROOT_INODE, None),
                                      2: _Top(2, ROOT_INODE, None)}
        self._gens_of: dict[bytes, int] = {}
        self._next = 3
        for src in self._sources:
            self._top[self._next] = _Top(self._next, 2, src)
            self._gens_of[src.name] = self._next
            self._next += 1
        self._dirs: dict[int, _Dir] = {}
        self._roots: dict[tuple[bytes, str, bool], int] = {}
        self._bases: list[int] = []
        self._ranges: list[_Dir] = []
        self._listings: OrderedDict[int, list[Entry]] = OrderedDict()
        self._listed = 0
        self._files: dict[int, _File] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._prefetcher: ThreadPoolExecutor | None = None

    @classmethod
    def from_backup_dir(cls, backup_dir: Path, key: str, name: str | None = None,
             at_ms: int | None = None) -> Tree:
        """Opens the stores and reads which generation each shows (see open_sources)."""
        tree = cls(open_sources(backup_dir, key, name), at_ms)
        for src in tree._sources:
            src.refresh()
            if src.current is None and at_ms is None:
                log.warning("backup %s has no generation yet; it appears once it has",
                            src.store.name)
            elif src.current is None:
                log.warning("backup %s has no generation at or before --at; it is left out",
                            src.store.name)
        if at_ms is not None and all(src.current is None for src in tree._sources):
            raise StoreError(f"no backup in {backup_dir} has a generation at or before --at", 2)
        return tree

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
        for src in self._sources:
            src.store.close()

    # -- inodes -------------------------------------------------------------------------------

    def _fresh(self, src: _Source, block: bool) -> _Source:
        if src.stale():
            if not block:
                raise WouldBlock()
            src.refresh()
        return src

    def _root_of(self, src: _Source, gen: Generation, pinned: bool, parent: int,
                 path: str) -> int:
        """The inode of a node root: NAME/ (pinned=False) or .generations/NAME/TIME/."""
        key = (src.name, gen.name, pinned)
        with self._lock:
            inode = self._roots.get(key)
            if inode is None:
                inode = self._roots[key] = self._next
                self._next += 1
                self._dirs[inode] = _Dir(inode, parent, path, src, gen, gen.root.tree, True)
            return inode

    def _top_items(self, top: _Top, block: bool) -> list[tuple[bytes, int]]:
        if top.inode == ROOT_INODE:
            items = [(GENERATIONS, 2)]
            for src in self._sources:
                gen = self._fresh(src, block).current
                if gen is not None:
                    items.append((src.name, self._root_of(src, gen, False, ROOT_INODE,
                                                          src.name.decode())))
            return items
        if top.source is None:
            return [(src.name, self._gens_of[src.name]) for src in self._sources]
        src = self._fresh(top.source, block)
        items = []
        for folder, gen_name in src.time_names():
            if gen_name not in src.gens and gen_name not in src.bad and not block:
                raise WouldBlock()
            gen = src.generation(gen_name)
            if gen is not None:
                path = f"{GENERATIONS.decode()}/{src.store.name}/{folder.decode()}"
                items.append((folder, self._root_of(src, gen, True, top.inode, path)))
        return items

    def _listing(self, d: _Dir, block: bool) -> list[Entry]:
        """The children of a tree folder; reads and decodes its tree if it is not cached."""
        with self._lock:
            entries = self._listings.get(d.inode)
            if entries is not None:
                self._listings.move_to_end(d.inode)
                return entries
        if not block:
            raise WouldBlock()
        if d.ref is None:
            entries = _globaldata(d.gen)
        else:
            try:
                entries = d.source.store.read_tree(d.ref)
            except StoreError as exc:
                raise Damaged(f"cannot list {d.path}: {exc}") from None
            if d.is_root and d.gen.identity is not None:
                i = bisect_left(entries, GLOBALDATA, key=_NAME)
                if i == len(entries) or entries[i].name != GLOBALDATA:
                    root = d.gen.root
                    entries.insert(i, Entry(GLOBALDATA, DIR, 0o755, root.uid, root.gid,
                                            d.gen.time_ms * 1_000_000, 0, 0, _BLOCK))
        with self._lock:
            if d.base == 0:
                d.base, d.count = self._next, len(entries)
                self._next += len(entries)
                self._bases.append(d.base)
                self._ranges.append(d)
            elif d.count != len(entries):
                raise Damaged(f"cannot list {d.path}: its tree changed in the store")
            if d.inode not in self._listings:
                self._listings[d.inode] = entries
                self._listed += len(entries)
            while self._listed > self.listing_budget and len(self._listings) > 1:
                _, old = self._listings.popitem(last=False)
                self._listed -= len(old)
        return entries

    def _entry(self, inode: int, block: bool) -> tuple[_Dir, Entry]:
        """The folder holding a tree inode, and its entry there."""
        with self._lock:
            i = bisect_right(self._bases, inode) - 1
            if i < 0:
                raise NotFound()
            d = self._ranges[i]
        if inode >= d.base + d.count:
            raise NotFound()
        return d, self._listing(d, block)[inode - d.base]

    def _dir(self, inode: int, block: bool) -> _Dir:
        """The tree folder with this inode, registered on first use."""
        with self._lock:
            d = self._dirs.get(inode)
        if d is not None:
            return d
        parent, e = self._entry(inode, block)
        if e.type != DIR:
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        with self._lock:
            d = self._dirs.get(inode)
            if d is None:
                d = self._dirs[inode] = _Dir(inode, parent.inode,
                                             f"{parent.path}/{os.fsdecode(e.name)}",
                                             parent.source, parent.gen, e.subtree)
            return d

    # -- attributes ---------------------------------------------------------------------------

    def _top_attr(self, inode: int) -> Attr:
        mtime = max((s.current.time_ms for s in self._sources if s.current), default=0)
        return Attr(inode, stat.S_IFDIR | 0o555, 2, self.uid, self.gid, _BLOCK, 8,
                    mtime * 1_000_000, volatile=True)

    def _entry_attr(self, inode: int, e: Entry) -> Attr:
        if e.type == FILE:
            return Attr(inode, stat.S_IFREG | e.mode, 1, e.uid, e.gid, e.size,
                        _blocks(e.data_bytes), e.mtime_ns)
        if e.type == DIR:
            # Trees do not keep a folder's size; one 4 KiB block is what ext4 and xfs show.
            return Attr(inode, stat.S_IFDIR | e.mode, 2, e.uid, e.gid, _BLOCK, 8, e.mtime_ns)
        return Attr(inode, stat.S_IFLNK | e.mode, 1, e.uid, e.gid, len(e.target), 0, e.mtime_ns)

    def getattr(self, inode: int, block: bool = True) -> Attr:
        """The attributes of `inode`; NotFound if the model never handed it out."""
        top = self._top.get(inode)
        if top is not None:
            return self._top_attr(inode)
        with self._lock:
            d = self._dirs.get(inode)
        if d is not None and d.is_root:
            r = d.gen.root
            return Attr(inode, stat.S_IFDIR | r.mode, 2, r.uid, r.gid, _BLOCK, 8, r.mtime_ns)
        return self._entry_attr(inode, self._entry(inode, block)[1])

    def volatile(self, inode: int) -> bool:
        """True for folders whose listing changes as backups come and go."""
        return inode in self._top

    def parent(self, inode: int, block: bool = True) -> int:
        """The inode of the folder holding `inode` (for lookups of '..')."""
        top = self._top.get(inode)
        if top is not None:
            return top.parent
        with self._lock:
            d = self._dirs.get(inode)
        return d.parent if d is not None else self._entry(inode, block)[0].inode

    # -- folders ------------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes, block: bool = True) -> Attr:
        """The attributes of `name` in the folder `parent`; NotFound if there is none."""
        top = self._top.get(parent)
        if top is not None:
            for item_name, inode in self._top_items(top, block):
                if item_name == name:
                    return self.getattr(inode, block)
            raise NotFound()
        d = self._dir(parent, block)
        entries = self._listing(d, block)
        i = bisect_left(entries, name, key=_NAME)
        if i == len(entries) or entries[i].name != name:
            raise NotFound()
        return self._entry_attr(d.base + i, entries[i])

    def opendir(self, inode: int, block: bool = True) -> Listing:
        """The children of a folder, as they are now."""
        top = self._top.get(inode)
        if top is not None:
            items = self._top_items(top, block)
            return Listing(items, lambda _i, child: self.getattr(child), volatile=True)
        d = self._dir(inode, block)
        entries = self._listing(d, block)
        base = d.base
        return Listing([(e.name, base + i) for i, e in enumerate(entries)],
                       lambda i, child: self._entry_attr(child, entries[i]), volatile=False)

    def readlink(self, inode: int, block: bool = True) -> bytes:
        if inode in self._top or inode in self._dirs:
            raise OSError(errno.EINVAL, "not a symlink")
        e = self._entry(inode, block)[1]
        if e.type != SYMLINK:
            raise OSError(errno.EINVAL, "not a symlink")
        return e.target

    # -- files --------------------------------------------------------------------------------

    def open(self, inode: int, block: bool = True) -> int:
        """Opens a file for reading; returns a handle for read() and release()."""
        if inode in self._top or inode in self._dirs:
            raise IsADirectoryError(errno.EISDIR, "is a folder")
        d, e = self._entry(inode, block)
        if e.type != FILE:
            raise IsADirectoryError(errno.EISDIR, "is a folder") if e.type == DIR else \
                OSError(errno.ELOOP, "is a symlink")
        with self._lock:
            f = self._files.get(inode)
            if f is None:
                inline = d.gen.identity.uuid.encode() if d.ref is None and d.gen.identity else None
                f = self._files[inode] = _File(inode, f"{d.path}/{os.fsdecode(e.name)}",
                                               d.source.store, e, inline)
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


def _globaldata(gen: Generation) -> list[Entry]:
    assert gen.identity is not None
    uuid = gen.identity.uuid.encode()
    mtime = gen.time_ms * 1_000_000
    # Its contents are served from memory (_File.inline); the extent only makes st_blocks true.
    return [Entry(gen.identity.seed_name, FILE, 0o644, gen.root.uid, gen.root.gid, mtime, 0, 0,
                  len(uuid), extents=((0, len(uuid)),))]
