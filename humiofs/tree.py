"""FUSE-free read-only model of the stores in BACKUP_DIR: inodes, attributes, lookup, read.

What the mount shows:

    /NAME/                         store NAME at its latest generation (or the one --at TIME)
    /NAME/globaldata/cluster_membership-NODEID-UUID.uuid    the node's seed file (synthetic)
    /.generations/NAME/TIME/       every generation of NAME, TIME like 20261124T100000.123Z

Inodes are handed out lazily and never change meaning: when a directory's listing is first read,
its children get a contiguous range of inode numbers (base + index in the sorted listing). So an
inode is resolved by a bisect over the ranges plus the parent's listing, which is kept in a
bounded LRU and read again from the store if it was dropped. Memory grows with the number of
directories visited, not with the number of files, and every inode the kernel was ever given
stays resolvable, so forget() needs no bookkeeping. A new generation gets new inodes: `NAME`
then simply points at another inode, and nothing the kernel caches about an inode can go stale.

Calls that may need store I/O take `block`: with block=False they raise WouldBlock instead of
reading the store, so the FUSE adapter can answer from memory on the event loop and run only
the misses in a worker thread. Everything here is thread-safe, except read(), which is async and
runs on the trio thread (see reader.py).
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
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from humiofs import generations
from humiofs.errors import NoSuchStore, StoreError, WrongKey
from humiofs import format
from humiofs.format import (DIR, FILE, SYMLINK, Entry, Generation, Ref, Xattrs,
                            generation_time)
from humiofs.chunkcache import CACHE_BYTES
from humiofs.keys import Passphrase
from humiofs.localstate import LocalState
from humiofs.reader import Damaged, Reader, WouldBlock
from humiofs.store import Store, list_stores, looks_like_store

log = logging.getLogger(__name__)

ROOT_INODE = 1
GENERATIONS = b".generations"
GLOBALDATA = b"globaldata"
REFRESH_S = 1.0               # how often the list of generations is read again
LISTING_BUDGET = 64_000       # tree entries kept decoded (about 40 MB)
_BLOCK = 4096
_NAME = attrgetter("name")
_SPECIAL_MODES = {format.FIFO: stat.S_IFIFO, format.CHR: stat.S_IFCHR, format.BLK: stat.S_IFBLK}


class NotFound(Exception):
    """No such name or inode."""


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
    rdev: int = 0


def _blocks(nbytes: int) -> int:
    """512-byte blocks of `nbytes` of data allocated in 4 KiB blocks, as `du` counts them."""
    return -(-nbytes // _BLOCK) * (_BLOCK // 512)


class _Source:
    """One opened store and the generations the mount shows of it."""

    def __init__(self, store: Store, at: generations.At | None,
                 state: LocalState | None = None) -> None:
        self.store = store
        self.name = store.name.encode()
        self.at = at
        self.state = state          # rollback detection, when NAME/ shows the latest
        self.names: list[str] = []
        self.gens: dict[str, Generation] = {}
        self.bad: set[str] = set()
        self.current: Generation | None = None
        self.checked = -1e9
        self.told: tuple[str, str] | None = None    # (shown, newest damaged) last logged
        self.rollback_told: str | None = None

    def stale(self) -> bool:
        return time.monotonic() - self.checked > REFRESH_S

    def refresh(self) -> None:
        """Lists the generations again and picks the one NAME/ shows (blocking I/O): the
        latest that reads back, as restore and ls take it (generations.pick)."""
        names = self.store.list_generations()
        current = None
        skipped = []
        partial = set()         # checkpoints (FORMAT.md 7.4): neither NAME/ nor .generations
        for name in reversed(names):
            if self.at is not None and not self.at.admits(name):
                continue
            current = self.generation(name)
            if current is not None and current.checkpoint and (self.at is None
                                                               or self.at.name != name):
                partial.add(name)
                current = None
                continue
            if current is not None:
                break
            skipped.append(name)
        if skipped and current is not None and (current.name, skipped[0]) != self.told:
            self.told = (current.name, skipped[0])
            log.warning("backup %s: %s/ shows %s, the latest intact generation; the newer "
                        "%s damaged (run humiofs check)", self.store.name, self.store.name,
                        generations.describe(current),
                        ", ".join(skipped) + (" is" if len(skipped) == 1 else " are"))
        if self.state is not None and self.at is None:
            rollback = self.state.observe(self.store, current.name if current else None, names)
            if rollback and rollback != self.rollback_told:
                log.warning("backup %s: %s", self.store.name, rollback)
            self.rollback_told = rollback
        self.names = [n for n in names if n not in partial]
        self.current, self.checked = current, time.monotonic()

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
        """(folder name, generation name) for every generation: the commit time in ISO 8601
        basic format to the millisecond (generations.folder_time)."""
        return [(generations.folder_time(generation_time(n)).encode(), n) for n in self.names]


class _Top:
    """A synthetic folder above the node trees: the root, .generations or .generations/NAME."""

    __slots__ = ("inode", "parent", "source")

    def __init__(self, inode: int, parent: int, source: _Source | None) -> None:
        self.inode, self.parent, self.source = inode, parent, source


class _Dir:
    """A folder of a node tree (or a node root, or the synthetic globaldata folder) whose
    children get the inode range base .. base+count-1 once its listing is first read.
    `seeded`: the node root's globaldata folder, where the seed file is shown (the folder is
    synthetic if `ref` is None, else the node's own)."""

    __slots__ = ("inode", "parent", "path", "source", "gen", "ref", "view", "is_root", "seeded",
                 "base", "count")

    def __init__(self, inode: int, parent: int, path: str, source: _Source, gen: Generation,
                 ref: Ref | None, view: int, is_root: bool = False, seeded: bool = False) -> None:
        self.inode, self.parent, self.path = inode, parent, path
        self.source, self.gen, self.ref, self.is_root = source, gen, ref, is_root
        self.seeded = seeded
        self.view = view            # the inode of the node root this folder is under
        self.base = self.count = 0


class Listing:
    """An opened folder as readdir(3) shows it, fixed from opendir to releasedir: `.` and `..`
    first, then its children in name order. Item i is the same entry for the listing's life,
    so an index is a stable position to resume or seek to."""

    def __init__(self, dots: tuple[Attr, Attr], items: list[tuple[bytes, int]],
                 attr: Callable[[int, int], Attr], volatile: bool) -> None:
        self._dots = ((b".", dots[0]), (b"..", dots[1]))
        self._items = items
        self._attr = attr
        self.volatile = volatile

    def __len__(self) -> int:
        return len(self._dots) + len(self._items)

    def item(self, index: int) -> tuple[bytes, Attr]:
        if index < len(self._dots):
            return self._dots[index]
        index -= len(self._dots)
        name, inode = self._items[index]
        return name, self._attr(index, inode)


def open_sources(backup_dir: Path, key: str | Passphrase,
                 name: str | None = None) -> list[Store]:
    """Opens every store in `backup_dir` that `key` opens (or only `name`).

    A store the key does not open is left out with a warning; if it opens none, WrongKey.
    The Argon2id unwraps run one after another: run concurrently in threads, the `cryptography`
    Argon2id (lanes > 1) deadlocks, and each unwrap already uses several cores.
    """
    if name is not None:
        if not looks_like_store(backup_dir / name):
            raise NoSuchStore(f"no humiofs store at {backup_dir / name}")
        return [Store.open(backup_dir / name, key)]
    names = list_stores(backup_dir)
    if not names:
        raise NoSuchStore(f"no humiofs backups in {backup_dir}")
    stores = []
    damaged: list[StoreError] = []
    for n in names:
        try:
            stores.append(Store.open(backup_dir / n, key))
        except WrongKey:
            log.warning("the key does not open the backup %s; it is left out of the mount", n)
        except StoreError as exc:
            log.warning("backup %s is left out of the mount: %s", n, exc)
            damaged.append(exc)
    if not stores and len(damaged) == len(names):
        raise damaged[0]      # not a matter of the key: say what is wrong with the store
    if not stores:
        raise WrongKey(f"the key does not open any store in {backup_dir} ({', '.join(names)}). "
                       f"{Passphrase.of(key).check_advice()}. If the key is lost, nobody can "
                       "read these backups")
    return stores


class Tree:
    """The read-only model of the mount: every method is safe to call from any thread."""

    def __init__(self, stores: list[Store], at: generations.At | None = None,
                 cache_bytes: int = CACHE_BYTES, listing_budget: int = LISTING_BUDGET,
                 state: LocalState | None = None) -> None:
        self.uid, self.gid = os.getuid(), os.getgid()
        self.reader = Reader(cache_bytes)
        self.cache = self.reader.cache
        self.listing_budget = listing_budget
        self._lock = threading.RLock()
        self._sources = sorted((_Source(s, at, state) for s in stores), key=attrgetter("name"))
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
        # Hard links: (view, Entry.link_key()) -> the one inode all names of it get: the
        # inode of the first name handed out. Grows with the hard-linked names visited.
        self._link_inodes: dict[tuple[int, object], int] = {}

    @classmethod
    def from_backup_dir(cls, backup_dir: Path, key: str | Passphrase, name: str | None = None,
                        at: generations.At | None = None,
                        state: LocalState | None = None) -> Tree:
        """Opens the stores and reads which generation each shows (see open_sources); with
        `state`, warns when a store was rolled back (localstate)."""
        tree = cls(open_sources(backup_dir, key, name), at, state=state)
        for src in tree._sources:
            src.refresh()
        if at is not None and at.name is not None and \
                not any(at.name in src.names for src in tree._sources):
            tree.close()
            raise StoreError(f"no backup in {backup_dir} has the generation {at.name}", 2)
        for src in tree._sources:
            if src.current is None and at is None:
                log.warning("backup %s has no generation yet; it appears once it has",
                            src.store.name)
            elif src.current is None:
                log.warning("backup %s has no generation at or before --at %s; it is left out",
                            src.store.name, at.text if at else "")
        if at is not None and all(src.current is None for src in tree._sources):
            tree.close()
            raise StoreError(f"no backup in {backup_dir} has a generation at or before "
                             f"{generations.format_time(at.until_ms)} (--at {at.text})", 2)
        return tree

    def shown(self) -> list[tuple[str, Generation | None]]:
        """(store name, the generation NAME/ shows now) for every store in the mount."""
        return [(src.store.name, src.current) for src in self._sources]

    def start_worker(self, close_fds: tuple[int, ...] = ()) -> None:
        """Forks the decryption worker over the open stores (see reader.Reader.start_worker)."""
        self.reader.start_worker([src.store for src in self._sources], close_fds)

    def close(self) -> None:
        self.reader.close()
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
                self._dirs[inode] = _Dir(inode, parent, path, src, gen, gen.root.tree, inode,
                                         True)
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
            entries = []
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
                                            d.gen.time_ms * 1_000_000, 0, 0, _BLOCK, nlink=2))
        if d.seeded and d.gen.identity is not None:
            # The seed file joins the node's own globaldata folder, if it has one; a real file
            # of that very name wins.
            seed = _seed(d.gen)
            i = bisect_left(entries, seed.name, key=_NAME)
            if i == len(entries) or entries[i].name != seed.name:
                entries.insert(i, seed)
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
                                             parent.source, parent.gen, e.subtree, parent.view,
                                             seeded=parent.is_root and e.name == GLOBALDATA)
            return d

    # -- attributes ---------------------------------------------------------------------------

    def _top_attr(self, inode: int) -> Attr:
        mtime = max((s.current.time_ms for s in self._sources if s.current), default=0)
        # 2 + subfolders, from what is known without store I/O (these folders are volatile:
        # their attributes expire within a second).
        top = self._top[inode]
        if inode == ROOT_INODE:
            nlink = 3 + sum(1 for s in self._sources if s.current is not None)
        elif top.source is None:
            nlink = 2 + len(self._sources)
        else:
            nlink = 2 + len(top.source.names)
        return Attr(inode, stat.S_IFDIR | 0o555, nlink, self.uid, self.gid, _BLOCK, 8,
                    mtime * 1_000_000, volatile=True)

    def _entry_attr(self, inode: int, e: Entry) -> Attr:
        if e.type == FILE:
            return Attr(inode, stat.S_IFREG | e.mode, e.nlink, e.uid, e.gid, e.size,
                        _blocks(e.data_bytes), e.mtime_ns)
        if e.type == DIR:
            # Trees do not keep a folder's size; one 4 KiB block is what ext4 and xfs show.
            # nlink is 2 + subfolders, or 1 ("not counted") from a version 1 tree.
            return Attr(inode, stat.S_IFDIR | e.mode, e.nlink, e.uid, e.gid, _BLOCK, 8,
                        e.mtime_ns)
        if e.type == SYMLINK:
            return Attr(inode, stat.S_IFLNK | e.mode, 1, e.uid, e.gid, len(e.target), 0,
                        e.mtime_ns)
        return Attr(inode, _SPECIAL_MODES[e.type] | e.mode, e.nlink, e.uid, e.gid, 0, 0,
                    e.mtime_ns, rdev=os.makedev(*e.rdev))

    def _child_inode(self, d: _Dir, index: int, e: Entry) -> int:
        """The inode of entry `index` of the folder `d`: base + index, except that all names
        of one hard-linked inode get the inode of the first of them handed out."""
        key = e.link_key()
        if key is None:
            return d.base + index
        with self._lock:
            return self._link_inodes.setdefault((d.view, key), d.base + index)

    def getattr(self, inode: int, block: bool = True) -> Attr:
        """The attributes of `inode`; NotFound if the model never handed it out."""
        top = self._top.get(inode)
        if top is not None:
            return self._top_attr(inode)
        with self._lock:
            d = self._dirs.get(inode)
        if d is not None and d.is_root:
            r = d.gen.root
            # 2 + subfolders, the globaldata folder the mount may add included: counted from
            # the listing, which a lookup of the root needs next anyway.
            subdirs = sum(1 for e in self._listing(d, block) if e.type == DIR)
            return Attr(inode, stat.S_IFDIR | r.mode, 2 + subdirs, r.uid, r.gid, _BLOCK, 8,
                        r.mtime_ns)
        return self._entry_attr(inode, self._entry(inode, block)[1])

    def xattrs(self, inode: int, block: bool = True) -> Xattrs:
        """The stored extended attributes of `inode` (FORMAT.md 7.1), sorted by name."""
        if inode in self._top:
            return ()
        with self._lock:
            d = self._dirs.get(inode)
        if d is not None and d.is_root:
            return d.gen.root.xattrs
        return self._entry(inode, block)[1].xattrs

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

    def statfs(self, block: bool = True) -> tuple[int, int]:
        """The size of what the NAME/ folders show, as (bytes, inodes).

        bytes: the file data of the generations NAME/ shows, holes left out, as `du` counts it
        (but not rounded up to whole blocks per file). inodes: their files, folders and
        symlinks, plus the synthetic folders and seed files (a few more than `find | wc -l`).
        The earlier generations under .generations are not counted: they mostly share their
        data with these. Both come from the generations' own stats, already in memory; only a
        stale list of generations needs store I/O (WouldBlock with block=False).
        """
        data_bytes, inodes = 0, len(self._top)
        for src in self._sources:
            gen = self._fresh(src, block).current
            if gen is None:
                continue
            # The stats are a backup's own count, not checked against its trees: never below 0.
            counts = {k: max(0, gen.stats.get(k, 0)) for k in
                      ("data_bytes", "files", "dirs", "symlinks")}
            data_bytes += counts["data_bytes"]
            inodes += 1 + counts["files"] + counts["dirs"] + counts["symlinks"]  # 1: NAME/
            if gen.identity is not None:
                inodes += 2  # globaldata/ and its seed file
        return data_bytes, inodes

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
        return self._entry_attr(self._child_inode(d, i, entries[i]), entries[i])

    def opendir(self, inode: int, block: bool = True) -> Listing:
        """A folder's listing as it is now: `.`, `..` (the root's `..` is the root itself, as
        the kernel expects), then its children."""
        top = self._top.get(inode)
        if top is not None:
            items = self._top_items(top, block)
            return Listing(self._dots(inode, block), items,
                           lambda _i, child: self.getattr(child), volatile=True)
        d = self._dir(inode, block)
        entries = self._listing(d, block)
        return Listing(self._dots(inode, block),
                       [(e.name, self._child_inode(d, i, e)) for i, e in enumerate(entries)],
                       lambda i, child: self._entry_attr(child, entries[i]), volatile=False)

    def _dots(self, inode: int, block: bool) -> tuple[Attr, Attr]:
        """The attributes of `.` and `..` in the folder `inode`."""
        return self.getattr(inode, block), self.getattr(self.parent(inode, block), block)

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
        inline = d.gen.identity.uuid.encode() if _is_seed(d, e) and d.gen.identity else None
        return self.reader.open(inode, f"{d.path}/{os.fsdecode(e.name)}", d.source.store, e,
                                inline)

    def release(self, fh: int) -> None:
        self.reader.release(fh)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """See Reader.read (runs on the trio thread)."""
        return await self.reader.read(fh, off, size)


def _seed(gen: Generation) -> Entry:
    """The seed file's entry: globaldata/cluster_membership-NODEID-UUID.uuid."""
    assert gen.identity is not None
    uuid = gen.identity.uuid.encode()
    mtime = gen.time_ms * 1_000_000
    # Its contents are served from memory (the reader's inline data); the extent only makes
    # st_blocks true. A stored file with data always has a ref, so data=None with an extent
    # tells the seed from a real file of the same name (_is_seed).
    return Entry(gen.identity.seed_name, FILE, 0o644, gen.root.uid, gen.root.gid, mtime, 0, 0,
                 len(uuid), extents=((0, len(uuid)),))


def _is_seed(d: _Dir, e: Entry) -> bool:
    return d.seeded and e.type == FILE and e.data is None and bool(e.extents)
