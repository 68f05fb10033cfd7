"""A tree folder's listing as the mount keeps it: its entries in name order (the common files
as format.FileRow), with their names, inode numbers and attributes, all computed in one pass
when the listing is read, since a walk asks for every one of them. FUSE-free.

The files' numbers are inodes.py's rule: key | slot, the slot from the entry's fingerprint,
and a slot taken earlier in the listing moves on to the next free one, in name order. Every
entry takes a slot, files or not, so that adding a folder or a link never renumbers a file.
Folders and hard links are numbered by numbering.Numbering (place()), which registers them.
"""
from __future__ import annotations

import stat
from collections.abc import Callable, Sequence

from humiofs.mount import inodes
from humiofs.mount.attrs import BLOCK, Attr, entry_attr
from humiofs.store.format import Entry, FileRow

_new_attr = tuple.__new__
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
