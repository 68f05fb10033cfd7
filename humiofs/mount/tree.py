"""FUSE-free read-only model of the stores in BACKUP_DIR: inodes, attributes, lookup, read.

What the mount shows:

    /NAME/                         store NAME at its latest generation (or the one --at TIME)
    /NAME/globaldata/cluster_membership-NODEID-UUID.uuid    the node's seed file (synthetic)
    /.generations/NAME/TIME/       every generation of NAME, TIME like 20261124T100000.123Z

Inode numbers derive from what they show (inodes.py): an unchanged file keeps its number across
remounts and generations, a changed one gets a new number, and a folder a new one in every
generation. So a number never stands for two different things and nothing the kernel caches
about an inode can go stale. When a folder's listing is read, the numbers of its children are
computed with it; a folder is registered then (memory grows with the folders listed, not with
the files), and a file's number leads back to its folder's path key and from there to the
listing, which is kept in a bounded LRU (listing.py) and read again if it was dropped. Every
inode the kernel was ever given stays resolvable, so forget() needs no bookkeeping. NAME/ simply
points at another folder when a new generation appears, and so does the root when a new store
appears in BACKUP_DIR.

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
from bisect import bisect_left
from operator import attrgetter
from pathlib import Path

from humiofs.errors import StoreError
from humiofs.mount import inodes
from humiofs.mount.attrs import BLOCK as _BLOCK
from humiofs.mount.attrs import Attr, Listing
from humiofs.mount.chunkcache import CACHE_BYTES
from humiofs.mount.listing import Listings, Loaded, Replies, is_seed
from humiofs.mount.numbering import Folder, Numbering
from humiofs.mount.reader import Damaged, Reader, WouldBlock
from humiofs.mount.sources import (NewStores, PackCache, Source, backup_dir_stores,
                                   open_sources)
from humiofs.store import generations
from humiofs.store.format import DIR, FILE, SYMLINK, Entry, Generation, Xattrs
from humiofs.store.keys import Passphrase
from humiofs.store.localstate import LocalState
from humiofs.store.repository import Store

__all__ = ["Attr", "Damaged", "Listing", "NotFound", "ROOT_INODE", "Tree", "WouldBlock",
           "open_sources"]

log = logging.getLogger(__name__)

ROOT_INODE = 1
GENERATIONS = b".generations"
REFRESH_S = 1.0               # how often the lists of stores and generations are read again
LISTING_BUDGET = 64_000       # tree entries kept decoded, with their replies (~1 KB each)


class NotFound(Exception):
    """No such name or inode."""


class _Top:
    """A synthetic folder above the node trees: the root, .generations or .generations/NAME."""

    __slots__ = ("inode", "parent", "source")

    def __init__(self, inode: int, parent: int, source: Source | None) -> None:
        self.inode, self.parent, self.source = inode, parent, source


class Tree:
    """The read-only model of the mount: every method is safe to call from any thread."""

    def __init__(self, stores: list[Store], at: generations.At | None = None,
                 cache_bytes: int = CACHE_BYTES, listing_budget: int = LISTING_BUDGET,
                 state: LocalState | None = None, new_stores: NewStores | None = None) -> None:
        self.uid, self.gid = os.getuid(), os.getgid()
        self.reader = Reader(cache_bytes)
        self.cache = self.reader.cache
        self._lock = threading.RLock()
        self._at, self._state, self._new_stores = at, state, new_stores
        self._sources: list[Source] = []
        self._top: dict[int, _Top] = {ROOT_INODE: _Top(ROOT_INODE, ROOT_INODE, None),
                                      2: _Top(2, ROOT_INODE, None)}
        self._gens_of: dict[bytes, int] = {}
        self._next = 3
        for store in stores:
            self._add_source(Source(store, at, state))
        self._numbering = Numbering()
        self._dirs = self._numbering.dirs
        self.listings = Listings(self._numbering, self._lock, listing_budget)

    def _add_source(self, src: Source) -> None:
        """Adds a store to the mount, in place of one of the same name that went away."""
        with self._lock:
            others = [s for s in self._sources if s.name != src.name]
            self._sources = sorted([*others, src], key=attrgetter("name"))
            self._top[self._next] = _Top(self._next, 2, src)
            self._gens_of[src.name] = self._next
            self._next += 1

    @property
    def replies_of(self) -> Replies | None:
        """What the FUSE adapter answers for a listing's attributes, built with each listing
        (listing.Replies) and handed out as Listing.replies; set by the adapter."""
        return self.listings.replies_of

    @replies_of.setter
    def replies_of(self, replies_of: Replies | None) -> None:
        self.listings.replies_of = replies_of

    @classmethod
    def from_backup_dir(cls, backup_dir: Path | str, key: str | Passphrase, name: str | None = None,
                        at: generations.At | None = None,
                        state: LocalState | None = None,
                        stores: list[Store] | None = None,
                        cache: PackCache | None = None) -> Tree:
        """Opens the stores and reads which generation each shows (see open_sources); with
        `state`, warns when a store was rolled back (localstate). Without `name` and `at`, a
        BACKUP_DIR with no stores yet (or none at all yet) is fine: stores created later
        appear in the mount (within REFRESH_S of a listing of its root). `stores`: what
        open_sources(backup_dir, key, name, allow_none=name is None and at is None) gave,
        if the caller opened them already. `cache`: stores on object storage are read through
        it (sources.mount_backend)."""
        watch = name is None and at is None
        listed = backup_dir_stores(backup_dir) if watch else []
        if stores is None:
            stores = open_sources(backup_dir, key, name, allow_none=watch, cache=cache)
        new_stores = NewStores(backup_dir, Passphrase.of(key),
                               listed + [s.name for s in stores], cache) if watch else None
        tree = cls(stores, at, state=state, new_stores=new_stores)
        if not stores:
            log.warning("no backups in %s yet; each appears in the mount once it is created",
                        backup_dir)
        for src in tree._sources:
            src.refresh()
        if at is not None and at.name is not None and \
                not any(at.name in src.names for src in tree._sources):
            tree.close()
            raise StoreError(f"no backup in {backup_dir} has the generation {at.name}", 2)
        for src in tree._sources:
            if src.current is None and at is None and src.gens and \
                    all(g.checkpoint for g in src.gens.values()):
                log.warning("backup %s has only a checkpoint of a first backup that has not "
                            "finished; it appears once that backup finishes", src.store.name)
            elif src.current is None and at is None:
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
        """Forks the decryption worker over the open stores (see reader.Reader.start_worker).
        Stores that appear later are read in threads, and so is object storage: its client
        (obstore's tokio runtime) does not work in a forked child."""
        if any(src.store.backend.local_path is None for src in self._sources):
            return
        self.reader.start_worker([src.store for src in self._sources], close_fds)

    def close(self) -> None:
        self.listings.close()
        self.reader.close()
        for src in self._sources:
            src.store.close()

    # -- stores and generations ---------------------------------------------------------------

    def _fresh(self, src: Source, block: bool) -> Source:
        if src.stale(REFRESH_S):
            if not block:
                raise WouldBlock()
            src.refresh()
        return src

    def _fresh_stores(self, block: bool) -> list[Source]:
        """The sources, with any store created in BACKUP_DIR since the last look added."""
        watch = self._new_stores
        if watch is not None and watch.stale(REFRESH_S):
            if not block:
                raise WouldBlock()
            for store in watch.poll():
                src = Source(store, self._at, self._state)
                src.refresh()
                self._add_source(src)
            for src in self._sources:
                if src.gone and not src.forgotten:
                    # Another store may take its name (a copy put back): open that one then.
                    watch.forget(src.store.name)
                    src.forgotten = True
        return self._sources

    # -- inodes -------------------------------------------------------------------------------

    def _root_of(self, src: Source, gen: Generation, pinned: bool, parent: int,
                 path: str) -> int:
        """The inode of a node root: NAME/ (pinned=False) or .generations/NAME/TIME/."""
        view = src.view + gen.name.encode() if pinned else src.view
        with self._lock:
            return self._numbering.new_folder(inodes.dir_inode(view, b"", gen.name.encode()), parent, -1,
                                 path, b"", src, gen, gen.root.tree, view, True, False).inode

    def _top_items(self, top: _Top, block: bool) -> list[tuple[bytes, int]]:
        if top.inode == ROOT_INODE:
            items = [(GENERATIONS, 2)]
            for src in self._fresh_stores(block):
                gen = self._fresh(src, block).current
                if gen is not None:
                    items.append((src.name, self._root_of(src, gen, False, ROOT_INODE,
                                                          src.name.decode())))
            return items
        if top.source is None:
            return [(src.name, self._gens_of[src.name]) for src in self._fresh_stores(block)
                    if not self._fresh(src, block).gone]
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

    def _locate(self, inode: int, block: bool) -> tuple[Folder, Loaded, int]:
        """The folder holding a tree inode, its listing, and the inode's index there; NotFound
        if the model never handed the number out."""
        tag = inode & inodes.TAG_MASK
        if tag == inodes.TAG_FILE:
            with self._lock:
                folders = list(self._numbering.keys.get(inodes.key_of(inode), ()))
            # Newest first: a file unchanged in several generations is in all of them, alike.
            for d in reversed(folders):
                loaded = self.listings.get(d, block)
                i = loaded.where.get(inode)
                if i is not None:
                    return d, loaded, i
            raise NotFound()
        if tag == inodes.TAG_DIR:
            with self._lock:
                sub = self._dirs.get(inode)
                parent = self._dirs.get(sub.parent) if sub is not None else None
            if sub is None or parent is None:
                raise NotFound()
            return parent, self.listings.get(parent, block), sub.index
        if tag == inodes.TAG_LINK:
            with self._lock:
                link = self._numbering.links.get(inode)
            if link is None:
                raise NotFound()
            return link[0], self.listings.get(link[0], block), link[1]
        raise NotFound()

    def _entry(self, inode: int, block: bool) -> tuple[Folder, Entry]:
        """The folder holding a tree inode, and its entry there (see _locate)."""
        d, loaded, i = self._locate(inode, block)
        return d, loaded.entry(i)

    def _dir(self, inode: int) -> Folder:
        """The tree folder with this number; NotFound or NotADirectoryError if there is none."""
        with self._lock:
            d = self._dirs.get(inode)
        if d is not None:
            return d
        if inode & inodes.TAG_MASK in (inodes.TAG_FILE, inodes.TAG_LINK):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        raise NotFound()

    # -- attributes ---------------------------------------------------------------------------

    def _top_attr(self, inode: int) -> Attr:
        mtime = max((s.current.time_ms for s in self._sources if s.current), default=0)
        # 2 + subfolders, from what is known without store I/O (these folders are volatile:
        # their attributes expire within a second).
        top = self._top[inode]
        if inode == ROOT_INODE:
            nlink = 3 + sum(1 for s in self._sources if s.current is not None)
        elif top.source is None:
            nlink = 2 + sum(1 for s in self._sources if not s.gone)
        else:
            nlink = 2 + len(top.source.names)
        return Attr(inode, stat.S_IFDIR | 0o555, nlink, self.uid, self.gid, _BLOCK, 8,
                    mtime * 1_000_000, volatile=True)

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
            subdirs = len(self.listings.get(d, block).subfolders)
            return Attr(inode, stat.S_IFDIR | r.mode, 2 + subdirs, r.uid, r.gid, _BLOCK, 8,
                        r.mtime_ns)
        _, loaded, i = self._locate(inode, block)
        return loaded.attrs[i]

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
        return d.parent if d is not None else self._locate(inode, block)[0].inode

    def statfs(self, block: bool = True) -> tuple[int, int]:
        """The size of what the NAME/ folders show, as (bytes, inodes).

        bytes: the file data of the generations NAME/ shows, holes left out, as `du` counts it
        (but not rounded up to whole blocks per file). inodes: their files, folders and
        symlinks, plus the synthetic folders and seed files (a few more than `find | wc -l`).
        The earlier generations under .generations are not counted: they mostly share their
        data with these. Both come from the generations' own stats, already in memory; only a
        stale list of generations needs store I/O (WouldBlock with block=False).
        """
        data_bytes, inodes_ = 0, len(self._top)
        for src in self._sources:
            gen = self._fresh(src, block).current
            if gen is None:
                continue
            # The stats are a backup's own count, not checked against its trees: never below 0.
            counts = {k: max(0, gen.stats.get(k, 0)) for k in
                      ("data_bytes", "files", "dirs", "symlinks")}
            data_bytes += counts["data_bytes"]
            inodes_ += 1 + counts["files"] + counts["dirs"] + counts["symlinks"]  # 1: NAME/
            if gen.identity is not None:
                inodes_ += 2  # globaldata/ and its seed file
        return data_bytes, inodes_

    # -- folders ------------------------------------------------------------------------------

    def lookup_inode(self, parent: int, name: bytes, block: bool = True) -> int:
        """The number of `name` in the folder `parent`; NotFound if there is none."""
        top = self._top.get(parent)
        if top is not None:
            for item_name, inode in self._top_items(top, block):
                if item_name == name:
                    return inode
            raise NotFound()
        loaded = self.listings.get(self._dir(parent), block)
        i = bisect_left(loaded.names, name)
        if i == len(loaded.names) or loaded.names[i] != name:
            raise NotFound()
        return loaded.inodes[i]

    def lookup(self, parent: int, name: bytes, block: bool = True) -> Attr:
        """The attributes of `name` in the folder `parent`; NotFound if there is none."""
        top = self._top.get(parent)
        if top is not None:
            return self.getattr(self.lookup_inode(parent, name, block), block)
        loaded = self.listings.get(self._dir(parent), block)
        i = bisect_left(loaded.names, name)
        if i == len(loaded.names) or loaded.names[i] != name:
            raise NotFound()
        return loaded.attrs[i]

    def opendir(self, inode: int, block: bool = True) -> Listing:
        """A folder's listing as it is now: `.`, `..` (the root's `..` is the root itself, as
        the kernel expects), then its children."""
        top = self._top.get(inode)
        if top is not None:
            items = self._top_items(top, block)
            numbers = [n for _, n in items]
            return Listing(self._dots(inode, block), [name for name, _ in items], numbers,
                           [self.getattr(n, block) for n in numbers], volatile=True)
        loaded = self.listings.get(self._dir(inode), block)
        self.listings.prefetcher.opened(inode, loaded.subfolders)
        return Listing(self._dots(inode, block), loaded.names, loaded.inodes, loaded.attrs,
                       volatile=False, replies=loaded.replies)

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
        inline = d.gen.identity.uuid.encode() if is_seed(d, e) and d.gen.identity else None
        return self.reader.open(inode, f"{d.path}/{os.fsdecode(e.name)}", d.source.store, e,
                                inline)

    def release(self, fh: int) -> None:
        self.reader.release(fh)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """See Reader.read (runs on the trio thread)."""
        return await self.reader.read(fh, off, size)
