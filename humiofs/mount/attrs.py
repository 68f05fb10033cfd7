"""What the mount's model hands the FUSE adapter: the attributes of an inode, and a folder's
listing as opened. FUSE-free."""
from __future__ import annotations

import os
import stat
from typing import NamedTuple

from humiofs.store import format
from humiofs.store.format import DIR, FILE, SYMLINK, Entry

BLOCK = 4096
_SPECIAL_MODES = {format.FIFO: stat.S_IFIFO, format.CHR: stat.S_IFCHR, format.BLK: stat.S_IFBLK}


class Attr(NamedTuple):
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


def blocks(nbytes: int) -> int:
    """512-byte blocks of `nbytes` of data allocated in 4 KiB blocks, as `du` counts them."""
    return -(-nbytes // BLOCK) * (BLOCK // 512)


_new_attr = tuple.__new__


def entry_attr(inode: int, e: Entry) -> Attr:
    """The attributes of the tree entry `e` as inode `inode`. Called once an entry on the
    first walk of a folder, so it builds the Attr tuple directly (the NamedTuple constructor
    is a Python function call more)."""
    t = e.type
    if t == FILE:
        ext = e.extents
        data = ext[0][1] if len(ext) == 1 else sum([n for _, n in ext])
        return _new_attr(Attr, (inode, stat.S_IFREG | e.mode, e.nlink, e.uid, e.gid, e.size,
                                -(-data // BLOCK) * (BLOCK // 512), e.mtime_ns, False, 0))
    if t == DIR:
        # Trees do not keep a folder's size; one 4 KiB block is what ext4 and xfs show.
        # nlink is 2 + subfolders, or 1 ("not counted") from a version 1 tree.
        return _new_attr(Attr, (inode, stat.S_IFDIR | e.mode, e.nlink, e.uid, e.gid, BLOCK, 8,
                                e.mtime_ns, False, 0))
    if t == SYMLINK:
        return Attr(inode, stat.S_IFLNK | e.mode, 1, e.uid, e.gid, len(e.target), 0,
                    e.mtime_ns)
    return Attr(inode, _SPECIAL_MODES[t] | e.mode, e.nlink, e.uid, e.gid, 0, 0, e.mtime_ns,
                rdev=os.makedev(*e.rdev))


class Listing:
    """An opened folder as readdir(3) shows it, fixed from opendir to releasedir: `.` and `..`
    first, then its children in name order. Item i is the same entry for the listing's life,
    so an index is a stable position to resume or seek to. `names`, `inodes` and `attrs` hold
    the children alone (item i is child i - 2); `attr(i)` gives the attributes of item i.
    `replies`: the FUSE adapter's replies for `attrs`, if it had them built with the listing
    (tree.Tree.replies_of), else empty."""

    __slots__ = ("_dots", "names", "inodes", "attrs", "volatile", "replies")

    def __init__(self, dots: tuple[Attr, Attr], names: list[bytes], numbers: list[int],
                 attrs: list[Attr], volatile: bool, replies: list[object] | None = None) -> None:
        self._dots = dots
        self.names, self.inodes, self.attrs = names, numbers, attrs
        self.volatile = volatile
        self.replies = replies or []

    def __len__(self) -> int:
        return 2 + len(self.names)

    def attr(self, index: int) -> Attr:
        return self._dots[index] if index < 2 else self.attrs[index - 2]

    def item(self, index: int) -> tuple[bytes, Attr]:
        if index < 2:
            return (b".", b"..")[index], self._dots[index]
        return self.names[index - 2], self.attrs[index - 2]
