"""The tree folders' listings as the mount keeps them (Loaded), and the bounded cache that
reads them on demand or ahead of the kernel (Listings). FUSE-free.

A listing holds its entries in name order (the common files as format.FileRow), with their
names, inode numbers, attributes and the FUSE adapter's replies, all computed in one pass when
the listing is read, off the request loop: a walk asks for every one of them.

The files' numbers are inodes.py's rule: key | slot, the slot from the entry's fingerprint,
and a slot taken earlier in the listing moves on to the next free one, in name order. Every
entry takes a slot, files or not, so that adding a folder or a link never renumbers a file.
Folders and hard links are numbered by numbering.Numbering (place()), which registers them.
"""
from __future__ import annotations

import stat
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Sequence
from operator import attrgetter

from humiofs.errors import StoreError
from humiofs.mount import inodes
from humiofs.mount.attrs import BLOCK, Attr, entry_attr
from humiofs.mount.numbering import GLOBALDATA, Folder, Numbering
from humiofs.mount.prefetch import Prefetcher
from humiofs.mount.reader import Damaged, WouldBlock
from humiofs.store import crypto
from humiofs.store.format import DIR, FILE, Entry, FileRow, Generation, decode_tree_rows

_new_attr = tuple.__new__
_NAME = attrgetter("name")
_BLOCKS = BLOCK // 512
# What the FUSE adapter answers for a list of attributes (fs.py), in the same order: built
# where a listing is read, off the request loop, and kept with it.
Replies = Callable[[list[Attr]], Sequence[object]]


class Loaded:
    """The decoded listing of one tree folder. `rows[i]`, `names[i]`, `inodes[i]`, `attrs[i]`
    and `replies[i]` (what `replies_of` made of attrs[i], if given) are child i; `where` maps
    an inode number to its index, `subfolders` are the numbers of the child folders. Built in
    two steps: __init__ numbers the FileRows (no lock needed), place() the rest, which
    `pending` lists as (index, entry, slot)."""

    __slots__ = ("rows", "names", "inodes", "attrs", "replies", "_replies_of", "pending",
                 "where", "subfolders")

    def __init__(self, rows: list[Entry | FileRow], key: int,
                 replies_of: Replies | None = None) -> None:
        self.rows = rows
        names: list[bytes] = []
        numbers: list[int] = []
        attrs: list[Attr] = []
        pending: list[tuple[int, Entry, int]] = []
        taken: set[int] = set()
        add_name, add_number, add_attr, take = names.append, numbers.append, attrs.append, \
            taken.add
        files = inodes.TAG_FILE | (key << inodes.SLOT_BITS)
        mask, reg = inodes.SLOT_MASK, stat.S_IFREG
        row_fingerprint, fingerprint = inodes.row_fingerprint, inodes.fingerprint
        for i, e in enumerate(rows):
            if isinstance(e, FileRow):
                slot = row_fingerprint(e) & mask
                while slot in taken:
                    slot = (slot + 1) & mask
                take(slot)
                name, mode, uid, gid, mtime, _, _, size, _, _, _, _, _, length = e
                number = files | slot
                add_attr(_new_attr(Attr, (number, reg | mode, 1, uid, gid, size,
                                          -(-length // BLOCK) * _BLOCKS, mtime, False, 0)))
            else:
                slot = fingerprint(e) & mask
                while slot in taken:
                    slot = (slot + 1) & mask
                take(slot)
                name, number = e.name, 0
                pending.append((i, e, slot))
                add_attr(None)  # type: ignore[arg-type]   # set by place()
            add_name(name)
            add_number(number)
        self.names, self.inodes, self.attrs, self.pending = names, numbers, attrs, pending
        self._replies_of = replies_of
        self.replies: list[object] = []
        if replies_of is not None and not pending:
            self.replies = list(replies_of(attrs))
        elif replies_of is not None:
            made = iter(replies_of([a for a in attrs if a is not None]))
            self.replies = [None if a is None else next(made) for a in attrs]
        self.where = {n: i for i, n in enumerate(numbers)}
        self.where.pop(0, None)   # the pending entries'
        self.subfolders: list[int] = []

    def place(self, numbers: list[int]) -> None:
        """Takes the numbers of the pending entries (in their order) and completes the
        listing."""
        for (i, e, _), number in zip(self.pending, numbers, strict=True):
            self.inodes[i] = number
            self.where[number] = i
            self.attrs[i] = entry_attr(number, e)
            if self._replies_of is not None:
                self.replies[i] = self._replies_of([self.attrs[i]])[0]
            if number & inodes.TAG_MASK == inodes.TAG_DIR:   # folders are never FileRows
                self.subfolders.append(number)
        self.pending = []

    def __len__(self) -> int:
        return len(self.rows)

    def entry(self, index: int) -> Entry:
        """Child `index` as an Entry."""
        e = self.rows[index]
        return e.entry() if isinstance(e, FileRow) else e


class Listings:
    """The decoded listings of the tree folders: read when asked for (get) or ahead of the
    kernel (prefetch.py), kept in an LRU of at most `budget` entries. Shares the model's lock,
    which also guards the numbering. Thread-safe."""

    def __init__(self, numbering: Numbering, lock: threading.RLock, budget: int) -> None:
        self.budget = budget
        self.replies_of: Replies | None = None   # set by the FUSE adapter (tree.Tree)
        self._numbering, self._lock = numbering, lock
        self._cache: OrderedDict[int, Loaded] = OrderedDict()
        self._listed = 0
        self._loading: dict[int, threading.Event] = {}    # listings being read, by folder
        self.prefetcher = Prefetcher(self._prefetch, budget // 4)

    def close(self) -> None:
        self.prefetcher.close()

    def get(self, d: Folder, block: bool) -> Loaded:
        """The children of a tree folder; reads and decodes its tree if it is not cached."""
        with self._lock:
            loaded = self._cache.get(d.inode)
            if loaded is not None:
                self._cache.move_to_end(d.inode)
                return loaded
        if not block:
            raise WouldBlock()
        with self._lock:
            busy = self._loading.get(d.inode)
            if busy is None:
                mine = self._loading[d.inode] = threading.Event()
        if busy is not None:
            # Another thread (the prefetcher, say) is reading it: wait rather than read twice.
            busy.wait()
            with self._lock:
                loaded = self._cache.get(d.inode)
            return loaded if loaded is not None else self._load(d)
        try:
            return self._load(d)
        finally:
            with self._lock:
                del self._loading[d.inode]
            mine.set()

    def _load(self, d: Folder) -> Loaded:
        """Reads and decodes a tree folder's listing into the cache (blocking)."""
        entries: list[Entry | FileRow] = []
        if d.ref is not None:
            try:
                entries = decode_tree_rows(d.source.store.read_blob(d.ref, crypto.KIND_TREE))
            except StoreError as exc:
                raise Damaged(f"cannot list {d.path}: {exc}") from None
            if d.is_root and d.gen.identity is not None:
                i = bisect_left(entries, GLOBALDATA, key=_NAME)
                if i == len(entries) or entries[i].name != GLOBALDATA:
                    root = d.gen.root
                    entries.insert(i, Entry(GLOBALDATA, DIR, 0o755, root.uid, root.gid,
                                            d.gen.time_ms * 1_000_000, 0, 0, BLOCK, nlink=2))
        if d.seeded and d.gen.identity is not None:
            # The seed file joins the node's own globaldata folder, if it has one; a real file
            # of that very name wins.
            seed = seed_entry(d.gen)
            i = bisect_left(entries, seed.name, key=_NAME)
            if i == len(entries) or entries[i].name != seed.name:
                entries.insert(i, seed)
        loaded = Loaded(entries, d.key, self.replies_of)
        with self._lock:
            first = self._cache.get(d.inode)
            if first is not None:      # another thread was first
                return first
            loaded.place(self._numbering.children(d, loaded.pending))
            self._cache[d.inode] = loaded
            self._listed += len(entries)
            while self._listed > self.budget and len(self._cache) > 1:
                gone, old = self._cache.popitem(last=False)
                self._listed -= len(old.rows)
                self.prefetcher.dropped(gone)
        return loaded

    def _prefetch(self, inode: int) -> int:
        """Loads a folder's listing ahead of its opendir (prefetch.py); the entries decoded."""
        with self._lock:
            d = self._numbering.dirs.get(inode)
            if d is None or inode in self._cache:
                return 0
        return len(self.get(d, True).rows)


def seed_entry(gen: Generation) -> Entry:
    """The seed file's entry: globaldata/cluster_membership-NODEID-UUID.uuid."""
    assert gen.identity is not None
    uuid = gen.identity.uuid.encode()
    mtime = gen.time_ms * 1_000_000
    # Its contents are served from memory (the reader's inline data); the extent only makes
    # st_blocks true. A stored file with data always has a ref, so data=None with an extent
    # tells the seed from a real file of the same name (is_seed).
    return Entry(gen.identity.seed_name, FILE, 0o644, gen.root.uid, gen.root.gid, mtime, 0, 0,
                 len(uuid), extents=((0, len(uuid)),))


def is_seed(d: Folder, e: Entry) -> bool:
    """True for the seed file seed_entry() made, in the folder that shows it."""
    return d.seeded and e.type == FILE and e.data is None and bool(e.extents)
